"""`nvfp4ctl serve` against a real Ray Serve + vLLM (CPU) cluster, with a client sending
requests the whole time: deploy a job's checkpoint, scale 1 -> 2 -> 1, set autoscaling
bounds, read the replicas' logs, roll back, and not one request may fail."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from nvfp4_admin.serve_config import apps_on_route
from nvfp4_common.jobs import JobResult, JobSpec
from nvfp4_common.queue import JobQueue
from nvfp4_common.serving import DIRECT_STREAMING_ENV, RAY_ENV_DIRECT_STREAMING, RAY_ENV_INGRESS
from nvfp4_common.settings import Settings
from tests.serve_harness import ServeCluster, make_test_models, serve_env_available

ROOT = Path(__file__).resolve().parents[2]
NVFP4CTL = ROOT / ".venv" / "bin" / "nvfp4ctl"

pytestmark = [pytest.mark.serve, pytest.mark.timeout(1800)]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_test_models(tmp_path_factory.mktemp("cli-serve-models"))


# Our ingress deployment in front of the engine, and direct streaming (the default: the
# engine replica as the ingress, behind Ray's HAProxy: nvfp4_serve.direct).
@pytest.fixture(scope="module", params=["ingress", "direct"])
def cluster(models: tuple[Path, Path], request: pytest.FixtureRequest) -> Iterator[ServeCluster]:
    if not serve_env_available():
        pytest.fail(".venv-serve is missing: run `make install-serve`")
    bf16, _ = models
    c = ServeCluster(
        env=RAY_ENV_DIRECT_STREAMING if request.param == "direct" else RAY_ENV_INGRESS,
        app_args={
            "model": str(bf16),
            "accelerator": "cpu",
            "max_model_len": 512,
            # float16: on some hosts vLLM's CPU BF16 kernels die with SIGILL under Ray.
            "engine_kwargs": {"enforce_eager": True, "dtype": "float16"},
        },
        num_cpus=16,  # logical CPUs: room for two models and two replicas at once
    )
    c.start(timeout_s=600)
    yield c
    c.stop()


class Prober:
    """Sends a small completion every 0.2 s, in a thread: to whatever model /v1/models
    lists just before, or always to the `pinned` model id, as a configured client does."""

    def __init__(self, base_url: str, pinned: str | None = None) -> None:
        self.base_url = base_url
        self.pinned = pinned
        self.results: list[tuple[float, int | str, str | None]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(base_url=self.base_url, timeout=60) as client:
            while not self._stop.is_set():
                model = self.pinned
                try:
                    model = model or client.get("/v1/models").json()["data"][0]["id"]
                    r = client.post(
                        "/v1/completions", json={"model": model, "prompt": "hi", "max_tokens": 4}
                    )
                    # Which model answered: an alias is answered under the served id.
                    answered = r.json().get("model") if r.status_code == 200 else None
                    self.results.append((time.time(), r.status_code, answered))
                except Exception as e:
                    self.results.append((time.time(), type(e).__name__, model))
                time.sleep(0.2)

    def __enter__(self) -> Prober:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(90)

    def failures(self) -> list[tuple[float, int | str, str | None]]:
        return [r for r in self.results if r[1] != 200]

    def models_seen(self) -> list[str | None]:
        seen: list[str | None] = []
        for _, _, model in self.results:
            if not seen or seen[-1] != model:
                seen.append(model)
        return seen


def serve_apps(cluster: ServeCluster) -> str:
    """Each application's status, route and whether Ray kept its config (for a failure)."""
    try:
        r = httpx.get(f"{cluster.dashboard_url}/api/serve/applications/", timeout=30)
        apps = r.json().get("applications", {})
    except Exception as e:
        return f"(no status: {e})"
    return json.dumps(
        {
            name: [a.get("status"), a.get("route_prefix"), bool(a.get("deployed_app_config"))]
            for name, a in apps.items()
        }
    )


def ctl(cluster: ServeCluster, redis_url: str, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NVFP4")}
    env.update(
        {
            "NVFP4_REDIS_URL": redis_url,
            "NVFP4_RAY_ADDRESS": cluster.dashboard_url,
            "NVFP4_SERVE_URL": cluster.base_url,
            "NVFP4_SERVE_APP_NAME": cluster.app_name,
        }
    )
    run = subprocess.run(
        [str(NVFP4CTL), *args], env=env, capture_output=True, text=True, timeout=1200
    )
    assert run.returncode == 0, (
        f"nvfp4ctl {' '.join(args)}: {run.stdout}\n{run.stderr}\n{serve_apps(cluster)}"
    )
    return run.stdout


def wait_replicas(cluster: ServeCluster, redis_url: str, want: int, timeout_s: float) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        apps = json.loads(ctl(cluster, redis_url, "serve", "status", "--json"))["applications"]
        live = [a for a in apps if a["route_prefix"] == "/"]
        engines = [
            d for a in live for name, d in a["deployments"].items() if name.startswith("LLMServer")
        ]
        if engines and all(d["replica_states"] == ["RUNNING"] * want for d in engines):
            return
        time.sleep(3)
    raise AssertionError(f"never reached {want} replicas: {apps}")


def engine_autoscaling(cluster: ServeCluster, timeout_s: float) -> dict[str, Any]:
    """The autoscaling config Ray applied to the live app's engine (Ray's own API), once
    the redeploy has run: while Ray rebuilds the app its deployments are not listed."""
    deadline = time.time() + timeout_s
    while True:
        r = httpx.get(f"{cluster.dashboard_url}/api/serve/applications/", timeout=30)
        r.raise_for_status()
        details = r.json()
        (live,) = apps_on_route(details, "/")  # a replaced app may linger as DELETING
        app = details["applications"][live]
        engines = [d for name, d in app["deployments"].items() if name.startswith("LLMServer")]
        config = engines[0]["deployment_config"] if engines else {}
        if config.get("autoscaling_config") or time.time() > deadline:
            assert config.get("autoscaling_config"), app
            return dict(config["autoscaling_config"])
        time.sleep(2)


def test_deploy_from_a_job_scale_and_rollback_without_a_failed_request(
    cluster: ServeCluster, models: tuple[Path, Path], settings: Settings, redis_url: str
) -> None:
    bf16, nvfp4 = models
    # A succeeded job whose output is the NVFP4 checkpoint (quantized by the worker's
    # code in make_test_models); the CLI resolves `--job` through the queue.
    queue = JobQueue(settings)
    queue.submit(JobSpec(model=str(bf16)))
    job = queue.claim("w")
    assert job is not None
    result = JobResult(
        output_name=nvfp4.name,
        output_path=str(nvfp4),
        source_bytes=1,
        output_bytes=1,
        duration_s=1,
    )
    assert queue.succeed(job, "w", result)

    # The pinned client keeps the first model's id through both switches: the new app
    # answers to the id of the app it replaced.
    with Prober(cluster.base_url) as prober, Prober(cluster.base_url, bf16.name) as pinned:
        ctl(cluster, redis_url, "serve", "deploy", "--job", job.id)
        time.sleep(2)
        assert nvfp4.name in ctl(cluster, redis_url, "serve", "status")

        ctl(cluster, redis_url, "serve", "scale", "--replicas", "2")
        wait_replicas(cluster, redis_url, 2, timeout_s=600)
        ctl(cluster, redis_url, "serve", "scale", "--replicas", "1")
        wait_replicas(cluster, redis_url, 1, timeout_s=300)
        ctl(cluster, redis_url, "serve", "scale", "--min", "1", "--max", "2")
        autoscaling = engine_autoscaling(cluster, timeout_s=120)
        assert (autoscaling["min_replicas"], autoscaling["max_replicas"]) == (1, 2)
        logs = ctl(cluster, redis_url, "serve", "logs", "-n", "20")
        out = ctl(cluster, redis_url, "serve", "logs", "--kind", "out", "-n", "20")

        ctl(cluster, redis_url, "serve", "rollback")
        time.sleep(2)
    status = ctl(cluster, redis_url, "serve", "status")
    assert bf16.name in status and nvfp4.name not in status
    assert len(prober.results) > 50
    assert prober.failures() == [], prober.failures()[:5]
    assert pinned.failures() == [], pinned.failures()[:5]
    # A section per replica of the live app (ingress and engine; a replica still starting
    # says so), with Serve's log lines ("INFO <time> <deployment> <replica> -- ...").
    direct = cluster.env.get(DIRECT_STREAMING_ENV) == "1"
    assert direct or "Ingress replica" in logs, logs
    assert "/LLMServer:" in logs, logs
    assert " -- " in logs.split("<==", 1)[1], logs
    assert "/LLMServer:" in out, out
    # Traffic moved to the new model and back, with no gap.
    assert prober.models_seen() == [bf16.name, nvfp4.name, bf16.name]
    assert pinned.models_seen() == [bf16.name, nvfp4.name, bf16.name]
