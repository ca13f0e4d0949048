"""Redis: the built-in StatefulSet (AOF, password, volume) or an external URL."""

from __future__ import annotations

from typing import Any

import pytest

from .chart import FULLNAME, Chart, Manifests

REDIS = f"{FULLNAME}-redis"


def redis_container(docs: Manifests) -> dict[str, Any]:
    (container,) = docs.get("StatefulSet", REDIS)["spec"]["template"]["spec"]["containers"]
    return container


def redis_urls(docs: Manifests) -> set[str]:
    """NVFP4_REDIS_URL of every container that has one."""
    urls = set()
    for _, pod in docs.pod_specs():
        for container in pod["containers"]:
            urls |= {e["value"] for e in container.get("env", []) if e["name"] == "NVFP4_REDIS_URL"}
    return urls


def test_runs_redis_with_an_append_only_file_and_no_eviction(default: Manifests) -> None:
    args = redis_container(default)["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    assert args[args.index("--appendfsync") + 1] == "everysec"
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction"
    assert args[args.index("--dir") + 1] == "/data"


def test_keeps_redis_data_on_a_volume(chart: Chart) -> None:
    docs = chart.render({"redis": {"persistence": {"size": "20Gi", "storageClass": "fast"}}})
    (claim,) = docs.get("StatefulSet", REDIS)["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["resources"]["requests"]["storage"] == "20Gi"
    assert claim["spec"]["storageClassName"] == "fast"
    mounts = {m["name"]: m["mountPath"] for m in redis_container(docs)["volumeMounts"]}
    assert mounts[claim["metadata"]["name"]] == "/data"


def test_requires_the_password_from_the_secret(default: Manifests) -> None:
    container = redis_container(default)
    args = container["args"]
    assert args[args.index("--requirepass") + 1] == "$(REDIS_PASSWORD)"
    env = {e["name"]: e for e in container["env"]}
    assert env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == FULLNAME


def test_every_client_reaches_the_built_in_redis_by_its_service(default: Manifests) -> None:
    assert default.get("Service", REDIS)["spec"]["ports"][0]["port"] == 6379
    assert redis_urls(default) == {f"redis://:$(REDIS_PASSWORD)@{REDIS}:6379/0"}


def test_omits_redis_when_redis_enabled_is_false(chart: Chart) -> None:
    docs = chart.render({"redis": {"enabled": False, "externalUrl": "redis://cache:6379/1"}})
    assert not docs.has("StatefulSet")
    assert all(s["metadata"]["name"] != REDIS for s in docs.all("Service"))
    assert not docs.has("NetworkPolicy")


@pytest.mark.parametrize(
    ("external", "expected"),
    [
        ("redis://cache.internal:6379/1", "redis://:$(REDIS_PASSWORD)@cache.internal:6379/1"),
        ("rediss://cache.internal:6380", "rediss://:$(REDIS_PASSWORD)@cache.internal:6380/0"),
    ],
)
def test_uses_the_external_url_with_the_password_from_the_secret(
    chart: Chart, external: str, expected: str
) -> None:
    docs = chart.render({"redis": {"enabled": False, "externalUrl": external}})
    assert redis_urls(docs) == {expected}


def test_requires_an_external_url_when_redis_is_disabled(chart: Chart) -> None:
    error = chart.error({"redis": {"enabled": False}})
    assert "redis.externalUrl is required when redis.enabled=false" in error


def test_refuses_credentials_inside_the_external_url(chart: Chart) -> None:
    error = chart.error({"redis": {"enabled": False, "externalUrl": "redis://:pw@cache:6379/0"}})
    assert "must not contain credentials" in error
