"""The serving app for real: Ray Serve + vLLM's CPU build serving an NVFP4 checkpoint
made by the worker's quantization code, driven with the official `openai` client, through
our ingress deployment (direct streaming, the default: test_direct_streaming.py).

The app is started once for the module (about a minute on 2 cores, more on a busy
machine) from .venv-serve on free ports; tests that need no server run first, so
only one heavy process runs at a time.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from nvfp4_common.serving import RAY_ENV_INGRESS
from tests.serve_harness import SERVE_PYTHON, ServeCluster, make_test_models, serve_env_available

pytestmark = [
    pytest.mark.serve,
    pytest.mark.skipif(not serve_env_available(), reason="needs .venv-serve (make install-serve)"),
]

API_KEY = "sk-test-3f9a"
MODEL = "tiny-nvfp4"
OLD_NAME = "tiny-replaced"  # the id of a model this app replaced (an alias)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_test_models(tmp_path_factory.mktemp("serve-models"))


@pytest.fixture(scope="module")
def key_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A mounted secret's stand-in: the replica reads it as it would a Kubernetes Secret."""
    path = tmp_path_factory.mktemp("secrets") / "api-keys"
    path.write_text("# rotated by the operator\nsk-file-1\n")
    return path


@pytest.fixture(scope="module")
def cluster(models: tuple[Path, Path], key_file: Path) -> Iterator[ServeCluster]:
    _, nvfp4 = models
    c = ServeCluster(
        app_args={
            "model": str(nvfp4),
            "model_name": MODEL,
            "model_aliases": [OLD_NAME],
            "api_key_file": str(key_file),
            "accelerator": "cpu",
            # 8192 asked, the model allows 1024: the app clamps instead of failing.
            "max_model_len": 8192,
            "engine_kwargs": {"enforce_eager": True},
        },
        env={
            "NVFP4_ENV": "development",
            "NVFP4_SERVE_API_KEYS": json.dumps([API_KEY]),
            **RAY_ENV_INGRESS,
        },
    )
    # Generous: on a busy 2-core machine, start-up alone has taken over 7 minutes.
    c.start(timeout_s=600)
    yield c
    c.stop()


@pytest.fixture
def client(cluster: ServeCluster) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{cluster.base_url}/v1", api_key=API_KEY, timeout=120)


# --- without a server ----------------------------------------------------------------


def test_cpu_kernel_is_nvfp4_and_matches_vllms_stock_kernel(models: tuple[Path, Path]) -> None:
    """Loaded layers stay packed NVFP4 on our kernel; unpacking once at load gives the
    same tokens and log-probabilities as vLLM's stock emulation kernel."""
    env = {
        **os.environ,
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # in-process engine, so layers can be read
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_HOST_IP": "127.0.0.1",
    }
    out = subprocess.run(
        [str(SERVE_PYTHON), "-m", "nvfp4_serve.kernel_check", str(models[1])],
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert out.returncode == 0, out.stderr[-3000:] + out.stdout[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["load_report"] == {
        "kernels": {"CachedEmulationNvFp4LinearKernel": 8},  # 2 layers x (qkv, o, gate_up, down)
        "packed_uint8_layers": 8,
    }
    assert result["identical_tokens"] and result["identical_logprobs"]


def test_production_refuses_to_build_without_keys(models: tuple[Path, Path]) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NVFP4_")}
    env["NVFP4_ENV"] = "production"
    env["NVFP4_REDIS_URL"] = "redis://:pw@redis:6379/0"
    code = "from nvfp4_serve.app import build_app; build_app({'model': %r, 'accelerator': 'cpu'})"
    out = subprocess.run(
        [str(SERVE_PYTHON), "-c", code % str(models[1])],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert out.returncode != 0
    assert "production serving needs API keys" in out.stderr


# One interpreter for every case: importing Ray Serve LLM takes most of the time. The
# meminfo text stands in for /proc/meminfo: the preflight must be tested against a host
# that is short of memory, which this one is not.
BUILD_CASES = """
import json, sys
import nvfp4_serve.app as app
from nvfp4_common.settings import Settings
from nvfp4_serve.config import load_args
from nvfp4_serve.preflight import PreflightError

model = sys.argv[1]
GIB = 1024**3

def meminfo(available_gib):
    text = f"MemTotal: {64 * GIB // 1024} kB\\n"
    text += f"MemAvailable: {int(available_gib * GIB) // 1024} kB\\n"
    return lambda: text

def config(settings, args):
    serve_args = load_args(settings, args)
    ckpt = app.inspect_checkpoint(app.resolve_local(serve_args.model))
    c = app.llm_config(serve_args, ckpt)
    return {
        "engine": c.engine_kwargs,
        "deployment": c.deployment_config,
        "experimental": c.experimental_configs,
        "server_cls": str(c.server_cls) if c.server_cls else None,
        "accelerator": c.accelerator_config.model_dump() if c.accelerator_config else None,
        "model_id": c.model_id,
        "runtime_env": c.runtime_env,
    }

def outcome(settings, args):
    try:
        app.build_app_with(settings, args)
        return None
    except (PreflightError, ValueError) as e:
        return f"{type(e).__name__}: {e}"

plain = Settings(_env_file=None)
app.read_meminfo = meminfo(48)
results = {
    "cpu": config(plain, {"model": model, "accelerator": "cpu", "max_model_len": 8192}),
    "gpu": config(plain, {
        "model": model, "model_name": "m", "accelerator": "gpu", "tensor_parallel_size": 2,
        "gpu_memory_utilization": 0.5, "quantization": "none", "first_chunk_now": False,
        "autoscaling": {"min_replicas": 0, "max_replicas": 4, "target_ongoing_requests": 8},
        "engine_kwargs": {"enforce_eager": True},
    }),
    "settings": config(
        Settings(_env_file=None, serve_stream_batching_interval_ms=0, serve_first_chunk_now=False,
                 serve_num_replicas=3),
        {"model": model, "accelerator": "cpu"},
    ),
    "no_cache": config(plain, {"model": model, "accelerator": "cpu", "cpu_weight_cache": False}),
}
app.read_meminfo = meminfo(0.5)
results["short_cpu"] = outcome(plain, {"model": model, "accelerator": "cpu"})
results["short_discrete_gpu"] = outcome(plain, {"model": model, "accelerator": "gpu"})
results["short_spark"] = outcome(
    plain, {"model": model, "accelerator": "gpu", "unified_memory": True}
)
results["short_preflight_off"] = outcome(
    plain, {"model": model, "accelerator": "cpu", "preflight": False}
)
app.read_meminfo = meminfo(48)
results["spark_share_too_big"] = outcome(
    plain,
    {"model": model, "accelerator": "gpu", "unified_memory": True, "gpu_memory_utilization": 0.9},
)
print("RESULTS " + json.dumps(results), flush=True)
"""


def test_build_app_maps_args_and_settings_onto_ray_serve_llm_and_runs_the_preflight(
    models: tuple[Path, Path],
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NVFP4_")}
    out = subprocess.run(
        [str(SERVE_PYTHON), "-c", BUILD_CASES, str(models[1])],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [x for x in out.stdout.splitlines() if x.startswith("RESULTS ")]
    assert out.returncode == 0 and lines, out.stderr[-3000:]
    r = json.loads(lines[0][len("RESULTS ") :])

    cpu = r["cpu"]
    assert cpu["engine"]["quantization"] == "modelopt_fp4"  # read from hf_quant_config.json
    assert cpu["engine"]["max_model_len"] == 1024  # 8192 clamped to the model's limit
    assert "gpu_memory_utilization" not in cpu["engine"]
    assert cpu["accelerator"]["kind"] == "cpu"
    assert cpu["deployment"]["num_replicas"] == 1
    assert cpu["server_cls"] and "nvfp4_serve.server" in cpu["server_cls"]
    assert cpu["experimental"]["stream_batching_interval_ms"] == 50
    # The vLLM plugin in each engine process reads cpu_weight_cache from its environment.
    assert cpu["runtime_env"] == {"env_vars": {"NVFP4_SERVE_CPU_WEIGHT_CACHE": "true"}}
    assert r["no_cache"]["runtime_env"] == {"env_vars": {"NVFP4_SERVE_CPU_WEIGHT_CACHE": "false"}}

    gpu = r["gpu"]
    assert gpu["model_id"] == "m"
    assert gpu["engine"]["tensor_parallel_size"] == 2
    assert gpu["engine"]["gpu_memory_utilization"] == 0.5
    assert gpu["engine"]["enforce_eager"] is True
    assert "quantization" not in gpu["engine"]
    assert gpu["deployment"]["autoscaling_config"] == {
        "min_replicas": 0,
        "max_replicas": 4,
        "target_ongoing_requests": 8,
    }
    assert "num_replicas" not in gpu["deployment"]
    assert gpu["server_cls"] is None  # first_chunk_now off: Ray's own LLMServer
    assert gpu["runtime_env"] is None

    assert r["settings"]["experimental"]["stream_batching_interval_ms"] == 0
    assert r["settings"]["server_cls"] is None
    assert r["settings"]["deployment"]["num_replicas"] == 3

    # Short of memory: CPU serving and a Spark's shared memory are refused with numbers
    # and a way out; a discrete GPU has its own memory, which vLLM checks itself.
    for case in ("short_cpu", "short_spark"):
        assert r[case].startswith("PreflightError: model does not fit: needs"), r[case]
        assert "available 0.50 GiB of 64.00 GiB" in r[case]
        assert "free memory" in r[case]
    assert r["short_discrete_gpu"] is None
    assert r["short_preflight_off"] is None
    assert r["spark_share_too_big"].startswith(
        "PreflightError: gpu_memory_utilization=0.9 would claim 57.60 GiB"
    ), r["spark_share_too_big"]
    assert "use gpu_memory_utilization between" in r["spark_share_too_big"]


# --- against the running app -----------------------------------------------------------


def test_readiness_waited_for_a_real_generation(cluster: ServeCluster) -> None:
    # Before ready, /readyz was not routed yet (Ray's proxy answers 404/503) or said 503
    # "starting" (ingress up, engine loading); which ones were seen depends on timing.
    before = cluster.probe_history[:-1]
    assert all(code in (404, 503) for code, _ in before), before[:8]
    ours = [body for _, body in before if body.startswith('{"status"')]
    assert all('"starting"' in body for body in ours), ours[:3]
    assert httpx.get(f"{cluster.base_url}/healthz").json() == {"status": "alive"}
    ready = httpx.get(f"{cluster.base_url}/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    # Ready came from a real generation through the engine, as the ingress logged.
    assert re.search(r"ready after [0-9.]+ s \(generated ", cluster.logs_text()), "no probe log"


def test_models_lists_the_served_name_with_clamped_context(client: openai.OpenAI) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]
    assert models[0].model_extra["metadata"]["max_request_context_length"] == 1024


def test_completion_and_chat(client: openai.OpenAI) -> None:
    done = client.completions.create(model=MODEL, prompt="Hello", max_tokens=5)
    assert done.usage.completion_tokens == 5 and done.choices[0].finish_reason == "length"
    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4
    )
    assert chat.choices[0].message.role == "assistant"
    assert chat.usage.completion_tokens >= 1


def test_an_alias_is_answered_under_the_served_id_and_not_listed(
    client: openai.OpenAI,
) -> None:
    done = client.completions.create(model=OLD_NAME, prompt="Hello", max_tokens=2)
    assert done.model == MODEL and done.usage.completion_tokens == 2
    stream = client.chat.completions.create(
        model=OLD_NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=3, stream=True
    )
    assert {c.model for c in stream} == {MODEL}
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_streaming_completion_and_chat(client: openai.OpenAI) -> None:
    stream = client.completions.create(model=MODEL, prompt="Once", max_tokens=6, stream=True)
    chunks = [c for c in stream if c.choices]
    assert len(chunks) >= 2 and chunks[-1].choices[0].finish_reason == "length"
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=6, stream=True
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text


def test_api_keys_are_required(cluster: ServeCluster) -> None:
    for key in ("wrong-key", API_KEY + "x"):
        bad = openai.OpenAI(base_url=f"{cluster.base_url}/v1", api_key=key)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
    r = httpx.post(f"{cluster.base_url}/v1/completions", json={"model": MODEL, "prompt": "x"})
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "invalid_api_key"
    assert set(r.json()["error"]) >= {"message", "type", "code"}


def test_keys_from_the_mounted_file_work_and_a_rotation_takes_effect(
    cluster: ServeCluster, key_file: Path
) -> None:
    def status(key: str) -> int:
        r = httpx.get(
            f"{cluster.base_url}/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=30
        )
        return r.status_code

    assert status("sk-file-1") == 200 and status(API_KEY) == 200  # file and settings keys
    key_file.write_text("sk-file-2\n")  # rotated: the old file key stops working at once
    assert status("sk-file-2") == 200
    assert status("sk-file-1") == 401
    assert status(API_KEY) == 200


BAD_REQUESTS = [
    ("/v1/completions", b'{"model": "tiny", "prompt": ', 400),  # malformed JSON
    ("/v1/chat/completions", json.dumps({"model": MODEL}).encode(), 400),  # no messages
    ("/v1/completions", json.dumps({"model": MODEL, "prompt": "a", "max_tokens": 0}).encode(), 400),
    (
        "/v1/chat/completions",
        json.dumps(
            {"model": MODEL, "messages": [{"role": "user", "content": "a"}], "max_tokens": -3}
        ).encode(),
        400,
    ),
    (
        "/v1/completions",
        json.dumps({"model": MODEL, "prompt": "a", "max_tokens": 5000}).encode(),
        400,
    ),  # beyond the 1024-token context
    ("/v1/completions", json.dumps({"model": "no-such-model", "prompt": "a"}).encode(), 404),
    (
        "/v1/completions",
        json.dumps({"model": MODEL, "prompt": "word " * 3000, "max_tokens": 2}).encode(),
        400,
    ),  # oversized prompt
]


@pytest.mark.parametrize(("path", "body", "status"), BAD_REQUESTS)
def test_bad_input_gets_an_openai_error_and_the_replica_keeps_serving(
    cluster: ServeCluster, client: openai.OpenAI, path: str, body: bytes, status: int
) -> None:
    r = httpx.post(
        cluster.base_url + path,
        content=body,
        headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"},
        timeout=60,
    )
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["message"] and error["code"] and "\n" not in error["message"]
    assert error["type"] == "invalid_request_error", error
    assert error["param"] is None or isinstance(error["param"], str), error  # a field name
    ok = client.completions.create(model=MODEL, prompt="Hello", max_tokens=2)
    assert ok.usage.completion_tokens == 2


def test_sixteen_concurrent_streams_all_complete(client: openai.OpenAI) -> None:
    results: dict[int, tuple[int, str | None, int]] = {}

    def stream(i: int) -> None:
        usage, finish, chunks = 0, None, 0
        for chunk in client.completions.create(
            model=MODEL,
            prompt=f"Story {i}:",
            max_tokens=16,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},  # random weights may emit EOS at once
        ):
            if chunk.choices:
                chunks += 1
                finish = chunk.choices[0].finish_reason or finish
            if chunk.usage:  # Ray Serve may pack several tokens into one chunk
                usage = chunk.usage.completion_tokens
        results[i] = (usage, finish, chunks)

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert len(results) == 16
    assert all(u == 16 and f == "length" and c >= 1 for u, f, c in results.values()), results


def test_engine_ran_on_the_nvfp4_kernel(cluster: ServeCluster) -> None:
    logs = cluster.logs_text("*.*")
    assert "quantization=modelopt_fp4" in logs
    assert "Using CachedEmulationNvFp4LinearKernel for NVFP4 GEMM" in logs


def test_prometheus_metrics_from_serve_and_vllm(
    cluster: ServeCluster, client: openai.OpenAI
) -> None:
    client.completions.create(model=MODEL, prompt="Hello", max_tokens=2)
    deadline = time.monotonic() + 60  # Ray exports on an interval
    names: set[str] = set()
    while time.monotonic() < deadline:
        text = httpx.get(cluster.metrics_url, timeout=10).text  # no API key needed
        names = {line.split("{")[0] for line in text.splitlines() if not line.startswith("#")}
        if any(n.startswith("ray_serve_num_http_requests") for n in names) and any(
            n.startswith("ray_vllm_") for n in names
        ):
            break
        time.sleep(3)
    assert any(n.startswith("ray_serve_num_http_requests") for n in names), sorted(names)[:50]
    assert any(n.startswith("ray_vllm_") for n in names), sorted(names)[:50]
