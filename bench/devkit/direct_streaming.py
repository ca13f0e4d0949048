"""Ray Serve LLM's direct streaming on our engine config, with Ray's own LLMServer.

With `RAY_SERVE_LLM_ENABLE_DIRECT_STREAMING=1` the engine replica is the ingress and
serves vLLM's own OpenAI app; build_app then serves it with our keys, health routes and
aliases added (nvfp4_serve.direct). This builder leaves them out: no API keys, no /healthz
or /readyz, no model aliases. It measures what ours add to the mode
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
    # Ray's own LLMServer: our first-chunk batcher has no stream to batch here.
    serve_args = load_args(get_settings(), {**args, "first_chunk_now": False})
    local = resolve_local(serve_args.model)
    config = llm_config(serve_args, inspect_checkpoint(local) if local else None)
    return build_openai_app({"llm_configs": [config.model_copy(update={"server_cls": None})]})
