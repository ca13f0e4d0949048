"""Redis: the built-in StatefulSet (AOF, password, volume) or an external URL."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import redis

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
    env = {e["name"]: e for e in redis_container(default)["env"]}
    assert env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == FULLNAME


def test_keeps_the_password_off_the_command_line(default: Manifests) -> None:
    container = redis_container(default)
    command_line = json.dumps(container["command"] + container["args"])
    # $(VAR) is expanded by the kubelet into the process's argv, visible to `ps`.
    assert "$(" not in command_line
    assert "requirepass" not in container["args"]
    assert "--requirepass" not in command_line
    # The config file with the password sits on a memory volume, not the data disk.
    pod = default.get("StatefulSet", REDIS)["spec"]["template"]["spec"]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "/run/redis/auth.conf" in container["command"][2]
    assert volumes[mounts["/run/redis"]]["emptyDir"]["medium"] == "Memory"


def test_the_rendered_redis_command_serves_only_clients_with_the_password(
    default: Manifests, tmp_path: Path
) -> None:
    """Runs the container's command and readiness probe with the real redis-server, the
    pod's volumes mapped to temporary folders and the port moved off 6379."""
    redis_server = shutil.which("redis-server")
    if redis_server is None:
        pytest.fail("redis-server is not installed (apt-get install redis-server)")
    container = redis_container(default)
    run, data = tmp_path / "run", tmp_path / "data"
    run.mkdir()
    data.mkdir()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = [a.replace("/run/redis/", f"{run}/") for a in container["command"]]
    argv += [str(data) if a == "/data" else a for a in container["args"]]
    argv += ["--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    password = "Pass-word-123"
    env = {"PATH": os.environ["PATH"], "REDIS_PASSWORD": password}
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        shell, flag, script = container["readinessProbe"]["exec"]["command"]
        probe = [shell, flag, script.replace("redis-cli", f"redis-cli -p {port}")]

        def ready(auth: str) -> bool:
            done = subprocess.run(probe, env={"PATH": os.environ["PATH"], "REDISCLI_AUTH": auth})
            return done.returncode == 0

        deadline = time.monotonic() + 10
        while not ready(password):
            assert proc.poll() is None, "redis-server exited"
            assert time.monotonic() < deadline, "redis never answered PONG"
            time.sleep(0.1)
        assert not ready("wrong-password")
        assert not ready("")  # no password: NOAUTH
        assert redis.Redis(port=port, password=password).config_get("appendonly") == {
            "appendonly": "yes"
        }
        assert password not in Path(f"/proc/{proc.pid}/cmdline").read_text()
        assert (run / "auth.conf").stat().st_mode & 0o077 == 0
    finally:
        proc.terminate()
        proc.wait(10)


def test_pins_an_exact_redis_release(default: Manifests) -> None:
    image = redis_container(default)["image"]
    assert re.fullmatch(r"docker\.io/library/redis:\d+\.\d+\.\d+(-[a-z0-9.]+)?", image), image


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
