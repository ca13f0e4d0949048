"""The serving app under fire, for real: Ray Serve + vLLM's CPU build serving an NVFP4
checkpoint made by the worker's quantization code.

- Generated requests: schemathesis draws valid and invalid requests from the app's
  own OpenAPI schema; none gets a 5xx, every error has OpenAI's error shape.
- Load: concurrent streaming chats for a fixed time, zero errors (bench/chat_soak.py
  prints the latency percentiles).
- An engine replica SIGKILLed: the request it was streaming ends with an error (no
  hang, no truncated "success"), /readyz says not ready until Ray has replaced it, then
  200, and new requests succeed.

The app runs with the serving defaults (direct streaming: the engine replica serves
vLLM's app, with our keys, checks and error handlers, behind Ray's HAProxy).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable

from bench.chat_soak import soak, table
from tests.serve_harness import ServeCluster, make_test_models, serve_env_available

pytestmark = [
    pytest.mark.serve,
    pytest.mark.timeout(1500),
    pytest.mark.skipif(not serve_env_available(), reason="needs .venv-serve (make install-serve)"),
]

API_KEY = "sk-faults-81c2"
MODEL = "tiny-nvfp4"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeCluster]:
    _, nvfp4 = make_test_models(tmp_path_factory.mktemp("fault-models"))
    c = ServeCluster(
        app_args={
            "model": str(nvfp4),
            "model_name": MODEL,
            "accelerator": "cpu",
            "max_model_len": 1024,
            "engine_kwargs": {"enforce_eager": True},
        },
        env={"NVFP4_ENV": "development", "NVFP4_SERVE_API_KEYS": json.dumps([API_KEY])},
    )
    c.start(timeout_s=600)
    yield c
    c.stop()


def client(cluster: ServeCluster) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{cluster.base_url}/v1", api_key=API_KEY, timeout=120)


def answers(cluster: ServeCluster) -> None:
    done = client(cluster).completions.create(model=MODEL, prompt="Still there?", max_tokens=2)
    assert done.usage is not None and done.usage.completion_tokens == 2


# Costly knobs are kept small so that each generated request stays cheap on a CPU.
_SMALL = {"max_tokens": 4, "max_completion_tokens": 4, "n": 1, "best_of": 1, "logprobs": None,
          "top_logprobs": None, "prompt_logprobs": None}  # fmt: skip


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
def test_a_body_that_crashes_vllms_validators_is_a_400(cluster: ServeCluster, route: str) -> None:
    """vLLM's request validators call `.get` on `structured_outputs`; a number there must
    be the client's 400 in OpenAI's shape, not a 500 (found by the fuzzing test below)."""
    body: dict[str, Any] = {"model": MODEL, "max_tokens": 2, "structured_outputs": 3}
    body |= (
        {"messages": [{"role": "user", "content": "hi"}]} if "chat" in route else {"prompt": "hi"}
    )
    r = httpx.post(f"{cluster.base_url}{route}", json=body, headers=AUTH, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["message"].startswith("invalid request body:"), r.text


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize("penalty", [1e308, -1e308])
def test_a_length_penalty_that_breaks_beam_search_is_a_400(
    cluster: ServeCluster, route: str, penalty: float
) -> None:
    """Beam search divides by length ** length_penalty: a huge penalty overflows and a
    huge negative one divides by zero in vLLM's engine, a 500 (found by the fuzzing test
    below). It is the client's 400, naming the parameter."""
    body: dict[str, Any] = {
        "model": MODEL, "max_tokens": 2, "use_beam_search": True, "length_penalty": penalty
    }  # fmt: skip
    body |= (
        {"messages": [{"role": "user", "content": "hi"}]} if "chat" in route else {"prompt": "hi"}
    )
    r = httpx.post(f"{cluster.base_url}{route}", json=body, headers=AUTH, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "length_penalty" and "use_beam_search" in error["message"], r.text


def test_generated_requests_never_get_a_server_error(
    cluster: ServeCluster, record_stat: Callable[..., None]
) -> None:
    import schemathesis
    from schemathesis.generation import GenerationMode

    schema = schemathesis.openapi.from_url(f"{cluster.base_url}/openapi.json", headers=AUTH)
    tried: dict[str, int] = {}
    failures: list[str] = []

    def fuzz(op: Any, mode: GenerationMode, label: str) -> Callable[[], None]:
        @settings(
            max_examples=25, deadline=None, database=None, suppress_health_check=list(HealthCheck)
        )
        @given(case=op.as_strategy(generation_mode=mode), use_our_model=st.booleans())
        def check(case: Any, use_our_model: bool) -> None:
            tried[label] += 1
            if mode == GenerationMode.POSITIVE and isinstance(case.body, dict):
                case.body.update({k: v for k, v in _SMALL.items() if k in case.body})
                if use_our_model:  # else the model name is generated: a 404 path
                    case.body["model"] = MODEL
            response = case.call(base_url=cluster.base_url, headers=AUTH, timeout=120)
            if response.status_code >= 500:
                failures.append(f"{label}: {response.status_code} {response.text[:300]}")
            elif response.status_code >= 400:
                body = response.json()
                assert isinstance(body.get("error"), dict), f"{label}: {response.text[:300]}"
                assert body["error"].get("message"), f"{label}: {response.text[:300]}"

        return check

    for result in schema.get_all_operations():
        op = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            label = f"{op.method.upper()} {op.path} {mode.value}"
            tried[label] = 0
            try:
                fuzz(op, mode, label)()
            except Unsatisfiable:  # e.g. no invalid form of a GET without parameters
                del tried[label]
    total = sum(tried.values())
    print(json.dumps(tried, indent=1))
    assert not failures, "\n".join(failures[:10])
    assert total >= 100, tried
    answers(cluster)
    record_stat("openapi_fuzz", inputs=total, server_errors=len(failures))


def test_concurrent_chat_streams_for_a_fixed_time_have_no_errors(
    cluster: ServeCluster, record_stat: Callable[..., None]
) -> None:
    result = asyncio.run(
        soak(cluster.base_url, API_KEY, MODEL, concurrency=8, seconds=45, max_tokens=16)
    )
    summary = result.summary()
    print(table(summary))
    assert result.errors == []
    assert result.ok >= 8  # every stream completed at least one request
    record_stat(
        "chat_soak",
        requests=result.ok,
        errors=len(result.errors),
        streams=8,
        seconds=summary["seconds"],
        ttft_p50_ms=summary["ttft_ms"]["p50"],
        ttft_p99_ms=summary["ttft_ms"]["p99"],
        latency_p99_ms=summary["latency_ms"]["p99"],
    )


# /readyz while no engine replica runs. With direct streaming the replica answers /readyz
# itself, and HAProxy holds a request while none runs: no answer within the probe's 10 s
# (0), which a kubelet or Docker health check counts as a failure too. Through our
# ingress it is a 503.
NOT_READY = (503, 0)


def readyz(cluster: ServeCluster) -> int:
    try:
        return httpx.get(f"{cluster.base_url}/readyz", timeout=10).status_code
    except httpx.HTTPError:
        return 0


def test_killed_engine_replica_fails_in_flight_cleanly_then_is_replaced(
    cluster: ServeCluster, record_stat: Callable[..., None]
) -> None:
    # Last in the file: it costs a full engine restart.
    assert readyz(cluster) == 200
    outcome: dict[str, Any] = {}

    def stream_long() -> None:
        # The official client: the error chunk must surface as an exception, not as a
        # stream that simply ends (which the client would take for a complete answer).
        chunks = 0
        try:
            stream = client(cluster).completions.create(
                model=MODEL, prompt="Once upon a time", max_tokens=900, stream=True,
                extra_body={"ignore_eos": True},
            )  # fmt: skip
            for _ in stream:
                chunks += 1
                if chunks == 3:
                    outcome["streaming"] = time.monotonic()
            outcome["done"] = True
        except (openai.APIError, httpx.HTTPError) as e:
            outcome["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        outcome["chunks"] = chunks
        outcome["ended"] = time.monotonic()

    (pid,) = cluster.replica_pids("LLMServer")
    reader = threading.Thread(target=stream_long, daemon=True)
    reader.start()
    deadline = time.monotonic() + 120
    while "streaming" not in outcome and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "streaming" in outcome, f"the long request never streamed: {outcome}"
    killed_at = time.monotonic()
    os.kill(pid, signal.SIGKILL)

    reader.join(120)
    assert not reader.is_alive(), "the in-flight request hung after its replica died"
    assert outcome.get("error"), f"the in-flight request did not report the failure: {outcome}"
    assert outcome["chunks"] < 900

    # /readyz: not ready while no engine replica runs, then 200 once Ray has replaced it.
    codes: list[tuple[float, int]] = []
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        code = readyz(cluster)
        if not codes or codes[-1][1] != code:
            codes.append((round(time.monotonic() - killed_at, 1), code))
        if code == 200 and any(c in NOT_READY for _, c in codes):
            break
        time.sleep(0.5)
    print("readyz after the kill (seconds, status):", codes)
    assert any(c in NOT_READY for _, c in codes), f"/readyz never said not ready: {codes}"
    assert codes[-1][1] == 200, f"/readyz never came back: {codes}"
    assert [p for p in cluster.replica_pids("LLMServer") if p != pid], "no new replica"
    answers(cluster)
    recovered_s = codes[-1][0]
    record_stat("engine_replica_kill", faults=1, in_flight_failed_cleanly=1,
                not_ready_after_s=next(t for t, c in codes if c in NOT_READY),
                ready_again_after_s=recovered_s)  # fmt: skip


def test_the_cluster_logs_hold_no_api_key(cluster: ServeCluster) -> None:
    logs = cluster.logs_text()
    assert MODEL in logs, "no Ray logs were read"
    assert API_KEY not in logs, "an API key was written to a Ray log"
