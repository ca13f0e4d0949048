"""Ray Serve LLM's OpenAI ingress, plus API keys, health routes, model aliases and clean
errors.

Ray builds the FastAPI app with the OpenAI routes (models, completions, chat,
streaming) and hands it to the replica wrapper before its lifespan starts; we add our
routes, the key check and the 5xx scrubbing to that app then (`add_to_app`). Ray 2.60's
ingress builder routes only its fixed endpoint map, so that is where extra routes can go
without rebuilding the app. The response stream is wrapped (`responses`) to resolve
model aliases and to end a broken stream with an error. Both are private hooks of Ray,
overridden in nvfp4_serve.ray_hooks, the one module that touches Ray's private names.
Everything else is Ray's own code.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response
from ray.serve.llm.openai_api_models import (
    ChatCompletionRequest,
    CompletionRequest,
    ErrorResponse,
)

from nvfp4_common.settings import get_settings
from nvfp4_serve.auth import add_key_check, replica_keys
from nvfp4_serve.error_handlers import add_error_handlers, error_response
from nvfp4_serve.errors import OpenAIErrorBodies, request_problem
from nvfp4_serve.health import Readiness, ReplicaCount, add_health_routes, one_token_text
from nvfp4_serve.ray_hooks import IngressHooks, serve_details

logger = logging.getLogger(__name__)


def _refused(body: Any) -> Response | None:
    """The client's 400 for a request vLLM would fail on with a 500 (errors.request_problem)."""
    problem = request_problem(lambda name: getattr(body, name, None))
    if problem is None:
        return None
    param, why = problem
    return error_response(400, why, "invalid_value", param=param)


class NVFP4Ingress(IngressHooks):
    # Ray Serve awaits async constructors; one is needed to start the readiness task.
    async def __init__(  # type: ignore[misc]
        self,
        llm_deployments: dict[str, Any],
        model_cards: dict[str, Any],
        *,
        lora_paths: dict[str, str] | None = None,
        api_key_file: str | None = None,
        readiness_prompt: str = "Hello",
        model_aliases: list[str] | None = None,
    ) -> None:
        super().__init__(llm_deployments, model_cards, lora_paths=lora_paths)
        settings = get_settings()
        self._keys, self._enforce_keys = replica_keys(
            (k.get_secret_value() for k in settings.serve_api_keys), api_key_file, settings.env
        )
        self._probe_model = next(iter(model_cards))
        # A client that read the old model's name just before a `serve deploy` switched
        # the route sends it to this app; answering keeps the switch free of 404s.
        self._aliases = {a: self._probe_model for a in model_aliases or () if a not in model_cards}
        self._probe_prompt = readiness_prompt
        replicas: ReplicaCount | None = None
        if self.engine_handles_ok:  # else ray_hooks logged why /readyz cannot follow them
            self._engine = self.engine_handle(self._probe_model)
            replicas = self._engine_replicas
        self.readiness = Readiness(self._generate_one_token, replicas)
        self.readiness.start()

    async def responses(
        self, body: Any, call_method: str, raw_request: Request | None = None
    ) -> AsyncIterator[Any]:
        """Ray's response stream for `body` (a model alias resolved first), closed with an
        OpenAI error chunk when the engine replica dies mid-stream. Without that chunk the
        client sees a 200 stream that just stops (no error, no [DONE] from the engine),
        which reads as a complete answer.
        """
        if getattr(body, "model", None) in self._aliases:
            body = body.model_copy(update={"model": self._aliases[body.model]})
        started = False
        try:
            async for response in self.ray_responses(body, call_method, raw_request):
                started = True
                yield response
        except Exception as e:
            if not started:
                raise  # Ray's handlers answer it with an HTTP error status
            logger.error("engine failed mid-stream (%s): %s", call_method, e)
            message = f"the engine stopped in the middle of this response ({type(e).__name__})"
            yield ErrorResponse.model_validate(
                {"error": {"message": message, "type": "server_error", "code": 503}}
            )

    async def _generate_one_token(self) -> str:
        body = CompletionRequest(
            model=self._probe_model, prompt=self._probe_prompt, max_tokens=1, stream=False
        )
        async for response in self.responses(body, "completions"):
            return one_token_text(response)
        raise RuntimeError("engine returned nothing")

    async def _engine_replicas(self) -> tuple[int, int]:
        """(running, total) replicas of the probed model's engine deployment."""
        # The controller call blocks; keep it off the event loop.
        details = await asyncio.to_thread(serve_details)
        try:
            app = details["applications"][self._engine.app_name]
            replicas = app["deployments"][self._engine.deployment_name]["replicas"]
            states = [str(getattr(r["state"], "value", r["state"])) for r in replicas]
        except (KeyError, TypeError) as e:
            # This app's own deployment is always listed: a missing key is a Ray whose
            # details changed shape, which Readiness stops on instead of retrying.
            raise AttributeError(f"Serve's details have no {e} where expected") from None
        return states.count("RUNNING"), len(states)

    async def completions(self, body: CompletionRequest, request: Request) -> Response:
        refused = _refused(body)
        if refused is not None:
            return refused
        return await super().completions(body, request)

    async def chat(self, body: ChatCompletionRequest, request: Request) -> Response:
        refused = _refused(body)
        if refused is not None:
            return refused
        try:
            return await super().chat(body, request)
        except ValueError as exc:
            # Ray's request sanitizer refuses message contents our check let through
            # ("Validating message `content` raised an error"): the client's error.
            return error_response(400, str(exc), "invalid_value", param="messages")

    # The served checkpoints are text generators: Ray's ingress would forward these to
    # the engine, which fails with a 500 and a traceback. Say so instead.
    async def embeddings(self, request: Request) -> Response:
        return self._not_served("/v1/embeddings")

    async def transcriptions(self, request: Request) -> Response:
        return self._not_served("/v1/audio/transcriptions")

    async def score(self, request: Request) -> Response:
        return self._not_served("/v1/score")

    def _not_served(self, route: str) -> Response:
        message = f"{route} is not served: this deployment generates text"
        return error_response(404, message, "not_found")

    def add_to_app(self, app: Any) -> None:
        if isinstance(app, FastAPI):
            add_health_routes(app, self.readiness)
            add_error_handlers(app)
            app.add_middleware(OpenAIErrorBodies)
            add_key_check(app, self._keys, self._enforce_keys, "ingress")
