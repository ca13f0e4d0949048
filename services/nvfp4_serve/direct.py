"""Direct streaming: the engine replica serves vLLM's own OpenAI app, with our API keys,
request checks, error shapes, /healthz, /readyz and model aliases added to it.

With `RAY_SERVE_LLM_ENABLE_DIRECT_STREAMING=1` (and Ray's HAProxy,
`RAY_SERVE_ENABLE_HA_PROXY=1`) build_app serves this deployment alone, as the ingress:
HAProxy hands each request to an engine replica, which answers with vLLM's FastAPI app.
That removes the ingress hop and Ray's stream batching: on an H100, 0.98-1.02x of plain
vLLM's tok/s at 1-128 streams, against 0.91x at 64 streams with an ingress deployment
(docs/serving.md). There is no ingress of ours in this mode, so what NVFP4Ingress adds is
added to vLLM's app here, when Ray builds it in the replica.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from ray.serve.llm.openai_api_models import CompletionRequest

from nvfp4_common.settings import get_settings
from nvfp4_serve.auth import add_key_check, replica_keys
from nvfp4_serve.direct_requests import DirectRequests
from nvfp4_serve.error_handlers import add_error_handlers
from nvfp4_serve.errors import OpenAIErrorBodies
from nvfp4_serve.health import Readiness, add_health_routes, one_token_text
from nvfp4_serve.ray_hooks import DirectServerHooks

logger = logging.getLogger(__name__)

# vLLM's routes that clients get, as through the ingress (Ray's OpenAI endpoints less
# embeddings, transcription and scoring, which a text generator does not serve). vLLM's
# others (its own health, metrics, version, responses, pooling routes) are left out: the
# API is the same in both modes, and Ray exports vLLM's metrics on its own port.
CLIENT_ROUTES = frozenset(
    {"/v1/models", "/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"}
)

# Where build_app leaves this module's options in the LLMConfig: plain values only (a
# key file's path, never a key), which Ray stores with the deployment's config.
OPTIONS = "nvfp4_direct"


def direct_options(
    api_key_file: Path | None, readiness_prompt: str, model_aliases: list[str]
) -> dict[str, Any]:
    return {
        OPTIONS: {
            "api_key_file": str(api_key_file) if api_key_file else None,
            "readiness_prompt": readiness_prompt,
            "model_aliases": list(model_aliases),
        }
    }


class LLMServer(DirectServerHooks):
    """Ray's LLMServer as the ingress: vLLM's app plus what our ingress would add. It keeps
    Ray's class name, so the deployment is still `LLMServer:<model id>`, the name Serve
    config overrides and `nvfp4ctl` address."""

    def extend_app(self, app: FastAPI) -> FastAPI:
        # This process's root logger passes only warnings (the engine replica's logging is
        # set up for vLLM's logger); the key and readiness lines are INFO, as in the ingress.
        logging.getLogger("nvfp4_serve").setLevel(logging.INFO)
        options = self._llm_config.experimental_configs.get(OPTIONS, {})
        settings = get_settings()
        keys, enforce = replica_keys(
            (k.get_secret_value() for k in settings.serve_api_keys),
            options.get("api_key_file"),
            settings.env,
        )
        model = self._llm_config.model_id
        self._probe_prompt = options.get("readiness_prompt", "Hello")
        self.readiness = Readiness(self._generate_one_token)
        self.readiness.start()
        docs = {app.openapi_url, app.docs_url, app.redoc_url, app.swagger_ui_oauth2_redirect_url}
        kept = CLIENT_ROUTES | docs
        app.router.routes = [r for r in app.router.routes if getattr(r, "path", None) in kept]
        app.openapi_schema = None
        add_health_routes(app, self.readiness)
        add_error_handlers(app)
        # vLLM's build_app has built the middleware stack already; Starlette builds it
        # again, with ours, on the first request.
        app.middleware_stack = None
        aliases = {a: model for a in options.get("model_aliases", ()) if a != model}
        app.add_middleware(DirectRequests, aliases=aliases)
        app.add_middleware(OpenAIErrorBodies)
        add_key_check(app, keys, enforce, "direct streaming")
        return app

    async def _generate_one_token(self) -> str:
        body = CompletionRequest(
            model=self._llm_config.model_id,
            prompt=self._probe_prompt,
            max_tokens=1,
            stream=False,
        )
        async for response in await self.completions(body):
            return one_token_text(response)
        raise RuntimeError("engine returned nothing")
