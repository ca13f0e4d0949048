"""The NVFP4_* ConfigMap and the Secrets: no default credentials, existing Secrets honoured."""

from __future__ import annotations

import base64
from typing import Any

import yaml

from .chart import FULLNAME, RELEASE, Chart, Manifests


def secret_refs(docs: Manifests) -> set[tuple[str, str]]:
    """(Secret name, key) of every secretKeyRef and secret volume item in the release's pods."""
    refs = set()
    for _, pod in docs.pod_specs():
        for container in pod["containers"]:
            for e in container.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    refs.add((ref["name"], ref["key"]))
        for volume in pod.get("volumes", []):
            if "secret" in volume:
                for item in volume["secret"]["items"]:
                    refs.add((volume["secret"]["secretName"], item["key"]))
    return refs


def decoded(secret: dict[str, Any]) -> dict[str, str]:
    return {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}


def test_renders_the_production_settings(default: Manifests) -> None:
    data = default.get("ConfigMap", FULLNAME)["data"]
    assert data["NVFP4_ENV"] == "production"
    assert data["NVFP4_MODELS_DIR"] == "/models"
    assert data["NVFP4_HF_OFFLINE"] == "false"
    assert data["NVFP4_MAX_ATTEMPTS"] == "3"
    assert data["NVFP4_HEARTBEAT_TIMEOUT_S"] == "30"
    assert data["HF_HOME"] == "/hf-cache"


def test_points_the_admin_settings_at_the_in_cluster_services(default: Manifests) -> None:
    data = default.get("ConfigMap", FULLNAME)["data"]
    assert data["NVFP4_RAY_ADDRESS"] == f"http://{FULLNAME}-head-svc:8265"
    assert data["NVFP4_SERVE_URL"] == f"http://{FULLNAME}-serve-svc:8000"
    assert data["NVFP4_SERVE_APP_NAME"] == "nvfp4"
    assert data["NVFP4_WORKERS_MODE"] == "kubernetes"
    assert data["NVFP4_HELM_RELEASE"] == RELEASE
    assert data["NVFP4_K8S_NAMESPACE"] == "ml"


def test_adds_extra_settings_with_the_prefix(chart: Chart) -> None:
    docs = chart.render({"config": {"extra": {"RESULT_TTL_S": 86400, "min_free_disk_gb": "5"}}})
    data = docs.get("ConfigMap", FULLNAME)["data"]
    assert data["NVFP4_RESULT_TTL_S"] == "86400"
    assert data["NVFP4_MIN_FREE_DISK_GB"] == "5"


def test_every_setting_the_pods_read_is_a_string(default: Manifests) -> None:
    data = default.get("ConfigMap", FULLNAME)["data"]
    assert all(isinstance(v, str) for v in data.values()), data


def test_generates_credentials_instead_of_shipping_defaults(chart: Chart) -> None:
    # Two separate renders (no cache): generated values must differ, so none is a constant.
    secrets = []
    for _ in range(2):
        proc = chart.run(
            "template", RELEASE, str(chart.path), "--show-only", "templates/secret.yaml"
        )
        assert proc.returncode == 0, proc.stderr
        secrets.append(decoded(yaml.safe_load(proc.stdout)))
    first, second = secrets
    assert len(first["redis-password"]) == 32 and first["redis-password"].isalnum()
    assert len(first["api-keys"]) == 40
    assert len(first["auth_token"]) == 40
    assert first["redis-password"] != second["redis-password"]
    assert first["api-keys"] != second["api-keys"]
    assert first["auth_token"] != second["auth_token"]
    assert "hf-token" not in first


def test_keeps_generated_credentials_across_upgrades(default: Manifests) -> None:
    # No cluster here to answer `lookup`; the stable reuse itself is only checkable on a
    # live cluster. What can be checked: the Secret survives uninstall and reinstall.
    secret = default.get("Secret", FULLNAME)
    assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"


def test_stores_given_credentials(chart: Chart) -> None:
    values = {
        "secrets": {
            "redisPassword": "Redis-pass-0123456789",
            "apiKeys": ["first-key-0123456789", "second-key-0123456789"],
            "hfToken": "hf_token_value",
            "rayAuthToken": "ray-token-0123456789",
        }
    }
    data = decoded(chart.render(values).get("Secret", FULLNAME))
    assert data == {
        "redis-password": "Redis-pass-0123456789",
        "api-keys": "first-key-0123456789\nsecond-key-0123456789",
        "hf-token": "hf_token_value",
        "auth_token": "ray-token-0123456789",
    }


def test_uses_an_existing_secret_and_creates_none(chart: Chart) -> None:
    keys = {"redisPassword": "REDIS", "apiKeys": "KEYS", "hfToken": "HF"}
    docs = chart.render({"secrets": {"existingSecret": "vault-creds", "keys": keys}})
    assert not docs.has("Secret")
    assert secret_refs(docs) == {
        ("vault-creds", "REDIS"),
        ("vault-creds", "KEYS"),
        ("vault-creds", "HF"),
    }


def test_every_secret_reference_points_at_a_key_the_chart_writes(default: Manifests) -> None:
    secret = default.get("Secret", FULLNAME)
    optional = {"hf-token"}  # referenced with optional: true
    for name, key in secret_refs(default):
        assert name == FULLNAME
        assert key in secret["data"] or key in optional, key
