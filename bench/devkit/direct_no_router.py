"""Our direct streaming without Ray's ingress request router, for measuring that hop.

In direct streaming Ray Serve LLM puts a request router (`LLMRouter`, a deployment of its
own) in front of the engine replicas: HAProxy asks it, for every request, which replica
to send the request to. With one replica, or for HAProxy's own least-connections choice,
that is one more hop before the first token. This builder serves the same engine
deployment (nvfp4_serve.direct, with our keys and routes) as the ingress with no router,
through Ray's public `build_llm_deployment` and `serve.ingress()`
(`bench/gpu_run.sh variant direct-no-router`); a measurement, not a way to serve yet.
"""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve.deployment import Application
from ray.serve.llm import build_llm_deployment

from nvfp4_common.settings import get_settings
from nvfp4_serve.app import direct_streaming, llm_config
from nvfp4_serve.checkpoint import inspect_checkpoint, resolve_local
from nvfp4_serve.config import load_args
from nvfp4_serve.direct import LLMServer


def build_app(args: dict[str, Any]) -> Application:
    if not direct_streaming():  # our engine deployment's app needs the mode's HAProxy
        raise ValueError("set RAY_SERVE_LLM_ENABLE_DIRECT_STREAMING=1, RAY_SERVE_ENABLE_HA_PROXY=1")
    serve_args = load_args(get_settings(), args)
    local = resolve_local(serve_args.model)
    config = llm_config(serve_args, inspect_checkpoint(local) if local else None)
    return build_llm_deployment(config, deployment_cls=serve.ingress()(LLMServer))
