"""What the chart hands the services is what the services accept: the rendered NVFP4_*
environment loads into the real `Settings`, and the Serve args pass nvfp4_serve's own
validation (`load_args`, the first thing `build_app` does)."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml

from nvfp4_common.settings import Settings
from nvfp4_serve.config import load_args

from .chart import FULLNAME, VALUES_FILES, Chart, Manifests, values_id


def container_env(docs: Manifests, container: dict[str, Any]) -> dict[str, str]:
    """The environment a container sees: the ConfigMap, then its env, with $(REDIS_PASSWORD)
    expanded as the kubelet would (the password value is made up here)."""
    (source,) = container["envFrom"]
    env = dict(docs.get("ConfigMap", source["configMapRef"]["name"])["data"])
    for var in container["env"]:
        if "value" in var:
            env[var["name"]] = var["value"].replace("$(REDIS_PASSWORD)", "Pass-word-123")
    return env


def ray_worker_env(docs: Manifests) -> dict[str, str]:
    """The environment a Serve replica sees."""
    cluster = docs.get("RayService")["spec"]["rayClusterConfig"]
    (container,) = cluster["workerGroupSpecs"][0]["template"]["spec"]["containers"]
    return container_env(docs, container)


def settings_from(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return Settings(_env_file=None)  # type: ignore[call-arg]


@pytest.mark.parametrize("values_file", VALUES_FILES, ids=values_id)
def test_the_rendered_settings_load_into_the_apps_settings(
    chart: Chart, values_file: Path | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = settings_from(ray_worker_env(chart.render(values_file=values_file)), monkeypatch)
    assert settings.env == "production"
    assert settings.models_dir == Path("/models")
    assert urlparse(settings.redis_url).password  # production refuses a URL without one
    assert settings.serve_api_key_file == Path("/etc/nvfp4/api-keys/api-keys")
    assert settings.workers_mode == "kubernetes"


def test_the_quantization_worker_settings_load_with_the_gpu_device(
    default: Manifests, monkeypatch: pytest.MonkeyPatch
) -> None:
    (container,) = default.get("Deployment", f"{FULLNAME}-worker")["spec"]["template"]["spec"][
        "containers"
    ]
    settings = settings_from(container_env(default, container), monkeypatch)
    assert settings.device == "cuda"
    assert settings.cancel_grace_s == 100.0  # the 120 s grace period minus the margin
    assert settings.max_attempts == 3
    assert settings.heartbeat_timeout_s == 30.0
    assert settings.hf_offline is False
    assert settings.worker_metrics_port == 9400


@pytest.mark.parametrize("values_file", VALUES_FILES, ids=values_id)
def test_the_serve_args_pass_the_apps_validation(
    chart: Chart, values_file: Path | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    docs = chart.render(values_file=values_file)
    (app,) = yaml.safe_load(docs.get("RayService")["spec"]["serveConfigV2"])["applications"]
    args = load_args(settings_from(ray_worker_env(docs), monkeypatch), app["args"])
    assert args.model.startswith("/models/")
    assert args.accelerator == "gpu"
    assert args.autoscaling is not None
    assert args.api_key_file == Path("/etc/nvfp4/api-keys/api-keys")


def test_an_unknown_extra_arg_is_refused_by_the_app(
    chart: Chart, monkeypatch: pytest.MonkeyPatch
) -> None:
    docs = chart.render({"serve": {"extraArgs": {"enforce_eager": True}}})
    (app,) = yaml.safe_load(docs.get("RayService")["spec"]["serveConfigV2"])["applications"]
    settings = settings_from(ray_worker_env(docs), monkeypatch)
    with pytest.raises(ValueError, match="unknown arg 'enforce_eager'"):
        load_args(settings, app["args"])
