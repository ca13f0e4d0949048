"""The serving app (Ray Serve + build_app) on a GPU, with our ingress and with direct
streaming: NVFP4 export, API keys, readiness."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from nvfp4_common.serving import RAY_ENV_DIRECT_STREAMING, RAY_ENV_INGRESS
from tests import serve_harness

from .support import needs_cuda

pytestmark = needs_cuda
pytest.importorskip("vllm")
pytest.importorskip("ray.serve.llm")

KEY = "gpu-test-key"


# Our ingress deployment, and direct streaming (the default): the engine replica as the
# ingress behind Ray's HAProxy (nvfp4_serve.direct).
@pytest.fixture(scope="module", params=["ingress", "direct"])
def cluster(
    gpu_nvfp4: Path, monkeypatch_module: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> Iterator[serve_harness.ServeCluster]:
    ray = shutil.which("ray")
    if ray is None:
        pytest.skip("no `ray` command on PATH")
    # The harness runs `ray`/`serve` from a venv; on a GPU machine they may live elsewhere.
    monkeypatch_module.setattr(serve_harness, "SERVE_VENV", Path(ray).parent.parent)
    c = serve_harness.ServeCluster(
        app_args={
            "model": str(gpu_nvfp4),
            "model_name": "small",
            "accelerator": "gpu",
            "max_model_len": 512,
            "gpu_memory_utilization": 0.3,
            "engine_kwargs": {"enforce_eager": True},
        },
        env={
            "NVFP4_SERVE_API_KEYS": json.dumps([KEY]),
            **(RAY_ENV_DIRECT_STREAMING if request.param == "direct" else RAY_ENV_INGRESS),
        },
        num_cpus=8,
    ).start(timeout_s=480)
    yield c
    c.stop()


@pytest.fixture(scope="module")
def monkeypatch_module() -> Iterator[pytest.MonkeyPatch]:
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def test_completion_with_key(cluster: serve_harness.ServeCluster) -> None:
    body = {"model": "small", "prompt": "To be", "max_tokens": 8, "ignore_eos": True}
    r = httpx.post(
        f"{cluster.base_url}/v1/completions",
        json=body,
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=120,
    )
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 8


def test_key_is_required_and_health_is_open(cluster: serve_harness.ServeCluster) -> None:
    body = {"model": "small", "prompt": "To be", "max_tokens": 1}
    assert (
        httpx.post(f"{cluster.base_url}/v1/completions", json=body, timeout=60).status_code == 401
    )
    assert httpx.get(f"{cluster.base_url}/readyz", timeout=30).status_code == 200
    assert httpx.get(f"{cluster.base_url}/healthz", timeout=30).status_code == 200
