"""The private Ray attributes nvfp4_serve overrides: all in nvfp4_serve.ray_hooks, and all
still present, with the signatures we call, in the installed Ray (.venv-serve). A Ray
upgrade that renames one fails here instead of quietly losing a feature in production."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from tests.serve_harness import SERVE_PYTHON, serve_env_available

ROOT = Path(__file__).resolve().parents[2]
SERVE_PKG = ROOT / "services" / "nvfp4_serve"
HOOK_NAMES = {
    "_set_asgi_app",
    "_get_response",
    "_default_serve_handles",
    "_batch_output_stream",
    "_get_batch_interval_ms",
    "_get_global_client",
    "get_serve_details",
    "__serve_build_asgi_app__",
}

# Runs in .venv-serve: Ray Serve LLM cannot be imported in .venv.
CHECK = """
import asyncio, json, types
from fastapi import FastAPI
from ray.serve._private.http_util import ASGIAppReplicaWrapper
from ray.serve.llm.deployment import LLMServer
from ray.serve.llm.ingress import OpenAiIngress
from nvfp4_serve import ray_hooks
from nvfp4_serve.ray_hooks import (
    HOOKS, DirectServerHooks, IngressHooks, LLMServerHooks, hook_problem,
)

out = {"names": sorted(h.name for h in HOOKS)}
out["problems"] = [hook_problem(h) for h in HOOKS if h.params is not None]
ingress = IngressHooks({}, {})  # Ray sets _default_serve_handles in __init__
out["instance_problems"] = [hook_problem(h, ingress) for h in HOOKS if h.params is None]
out["engine_handles_ok"] = ingress.engine_handles_ok

# Each hook of ours really replaces Ray's, and routes to our public-named method.
seen = {}

class Ingress(IngressHooks, ASGIAppReplicaWrapper):
    def add_to_app(self, app):
        seen["add_to_app"] = isinstance(app, FastAPI)

    async def responses(self, body, call_method, raw_request=None):
        yield (body, call_method)

ing = Ingress.__new__(Ingress)
ing._set_asgi_app(FastAPI())
seen["asgi_app_set"] = isinstance(ing._asgi_app, FastAPI)

async def collect():
    return [r async for r in ing._get_response(body="b", call_method="completions")]

seen["responses"] = asyncio.run(collect())

class Server(LLMServerHooks):
    def batch_stream(self, generator, interval_ms):
        seen["interval_ms"] = interval_ms
        return generator

srv = Server.__new__(Server)
srv._llm_config = types.SimpleNamespace(experimental_configs={"stream_batching_interval_ms": 7})
srv._batch_output_stream("gen")
out["seen"] = seen
out["overridden"] = [
    IngressHooks._set_asgi_app is not ASGIAppReplicaWrapper._set_asgi_app,
    IngressHooks._get_response is not OpenAiIngress._get_response,
    LLMServerHooks._batch_output_stream is not LLMServer._batch_output_stream,
    DirectServerHooks.__serve_build_asgi_app__ is not LLMServer.__serve_build_asgi_app__,
]
print("HOOKS " + json.dumps(out))
"""


@pytest.mark.serve
@pytest.mark.skipif(not serve_env_available(), reason="needs .venv-serve (make install-serve)")
def test_every_hook_exists_in_the_installed_ray_with_the_expected_signature() -> None:
    proc = subprocess.run(
        [str(SERVE_PYTHON), "-c", CHECK], capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    lines = [x for x in proc.stdout.splitlines() if x.startswith("HOOKS ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    out = json.loads(lines[0][len("HOOKS ") :])
    assert set(out["names"]) == HOOK_NAMES and len(out["names"]) == 8
    assert out["problems"] == [None] * 7
    assert out["instance_problems"] == [None]
    assert out["engine_handles_ok"] is True
    assert out["overridden"] == [True, True, True, True]
    assert out["seen"] == {
        "add_to_app": True,
        "asgi_app_set": True,
        "responses": [["b", "completions"]],
        "interval_ms": 7,
    }


def test_no_module_but_ray_hooks_names_a_private_ray_hook() -> None:
    pattern = re.compile("|".join(sorted(HOOK_NAMES)))
    offenders = [
        f"{path.name}: {m.group(0)}"
        for path in sorted(SERVE_PKG.glob("*.py"))
        if path.name != "ray_hooks.py"
        for m in pattern.finditer(path.read_text())
    ]
    assert not offenders, offenders
    assert all(name in (SERVE_PKG / "ray_hooks.py").read_text() for name in HOOK_NAMES)
