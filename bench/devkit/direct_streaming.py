"""Ray Serve LLM's own builder for direct streaming, on our engine config.

With `RAY_SERVE_LLM_ENABLE_DIRECT_STREAMING=1` the engine replica is the ingress and
serves vLLM's own OpenAI app. build_app serves that deployment alone behind HAProxy, with
our keys, health routes and aliases (nvfp4_serve.direct); Ray's builder puts its request
router (`LLMRouter`) between HAProxy and the replicas and adds nothing of ours: no API
keys, no /healthz or /readyz, no model aliases. It measures the difference
(`bench/gpu_run.sh variant ray-direct-streaming`); it is not a way to serve.
"""

from __future__ import annotations

from typing import Any

from ray.serve.deployment import Application
from ray.serve.llm import build_openai_app

from nvfp4_common.settings import get_settings
from nvfp4_serve.app import llm_config
from nvfp4_serve.checkpoint import inspect_checkpoint, resolve_local
from nvfp4_serve.config import load_args


def build_app(args: dict[str, Any]) -> Application:
    serve_args = load_args(get_settings(), args)
    local = resolve_local(serve_args.model)
    config = llm_config(serve_args, inspect_checkpoint(local) if local else None)
    # In this mode llm_config names no server class of ours: Ray's LLMServer serves.
    return build_openai_app({"llm_configs": [config]})
