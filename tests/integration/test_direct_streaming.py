"""Direct streaming for real: RAY_SERVE_LLM_ENABLE_DIRECT_STREAMING=1 behind Ray's HAProxy,
the engine replica serving vLLM's own app (vLLM's CPU build, an NVFP4 checkpoint made by
the worker's code), with our keys, health routes and aliases added to that app by
nvfp4_serve.direct.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import openai
import pytest

from nvfp4_common.serving import RAY_ENV_DIRECT_STREAMING
from tests.serve_harness import ServeCluster, make_test_models, serve_env_available

pytestmark = [
    pytest.mark.serve,
    pytest.mark.skipif(not serve_env_available(), reason="needs .venv-serve (make install-serve)"),
]

API_KEY = "sk-direct-7c21"
MODEL = "tiny-nvfp4"
OLD_NAME = "tiny-replaced"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeCluster]:
    _, nvfp4 = make_test_models(tmp_path_factory.mktemp("direct-models"))
    key_file = tmp_path_factory.mktemp("secrets") / "api-keys"
    key_file.write_text("sk-file-9\n")
    c = ServeCluster(
        app_args={
            "model": str(nvfp4),
            "model_name": MODEL,
            "model_aliases": [OLD_NAME],
            "api_key_file": str(key_file),
            "accelerator": "cpu",
            "max_model_len": 1024,
            "engine_kwargs": {"enforce_eager": True},
        },
        env={
            "NVFP4_ENV": "development",
            "NVFP4_SERVE_API_KEYS": json.dumps([API_KEY]),
            **RAY_ENV_DIRECT_STREAMING,
        },
    )
    c.start(timeout_s=600)  # ready: our /readyz, served by the engine replica, said 200
    yield c
    c.stop()


@pytest.fixture
def client(cluster: ServeCluster) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{cluster.base_url}/v1", api_key=API_KEY, timeout=120)


def test_the_engine_replica_is_the_ingress_and_answers_health_and_readiness(
    cluster: ServeCluster,
) -> None:
    # The engine deployment alone: no ingress, no request router in front of it.
    deployments = set(cluster.app_status()["deployments"])
    assert deployments == {f"LLMServer:{MODEL}"}, deployments
    assert httpx.get(f"{cluster.base_url}/healthz").json() == {"status": "alive"}
    ready = httpx.get(f"{cluster.base_url}/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    logs = cluster.logs_text()
    assert "direct streaming: 2 API key(s), keys required" in logs
    assert "ready after" in logs  # a real 1-token generation through the engine


def test_keys_are_required_from_settings_and_the_mounted_file(cluster: ServeCluster) -> None:
    url = f"{cluster.base_url}/v1/models"
    for key, code in (("sk-file-9", 200), (API_KEY, 200), ("wrong", 401), (None, 401)):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        assert httpx.get(url, headers=headers, timeout=30).status_code == code, key
    r = httpx.post(f"{cluster.base_url}/v1/completions", json={"model": MODEL, "prompt": "x"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def test_completions_chat_streams_and_an_alias(client: openai.OpenAI) -> None:
    done = client.completions.create(model=MODEL, prompt="Hello", max_tokens=5)
    assert done.usage.completion_tokens == 5 and done.choices[0].finish_reason == "length"
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=6, stream=True
    )
    chunks = [c for c in stream if c.choices]
    assert len(chunks) >= 2  # a real stream: no batching into one message
    old = client.completions.create(model=OLD_NAME, prompt="Hello", max_tokens=2)
    assert old.model == MODEL and old.usage.completion_tokens == 2
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_bad_input_gets_a_4xx_and_the_replica_keeps_serving(
    cluster: ServeCluster, client: openai.OpenAI
) -> None:
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    url = f"{cluster.base_url}/v1/completions"
    for body in (b"{not json", json.dumps({"model": MODEL, "prompt": "x", "max_tokens": -1})):
        r = httpx.post(url, content=body, headers=headers, timeout=60)
        assert 400 <= r.status_code < 500 and "error" in r.json(), r.text
    r = httpx.post(url, json={"model": "no-such-model", "prompt": "x"}, headers=headers)
    assert r.status_code == 404, r.text
    assert client.completions.create(model=MODEL, prompt="Hi", max_tokens=1).usage


def test_clients_get_the_ingress_routes_only(cluster: ServeCluster) -> None:
    """vLLM's own extra routes (its health, version, metrics, responses API) are not served:
    the API is the one the ingress serves, in OpenAI's error shape."""
    headers = {"Authorization": f"Bearer {API_KEY}"}
    for method, path in (("GET", "/version"), ("GET", "/metrics"), ("POST", "/v1/responses")):
        r = httpx.request(method, f"{cluster.base_url}{path}", headers=headers, json={})
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", (path, r.text)
    paths = set(httpx.get(f"{cluster.base_url}/openapi.json", headers=headers).json()["paths"])
    assert paths == {"/v1/models", "/v1/completions", "/v1/chat/completions", "/tokenize",
                     "/detokenize"}, paths  # fmt: skip
