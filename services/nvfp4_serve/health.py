"""Liveness and readiness.

/v1/models answers as soon as the ingress is up, long before an engine replica can
generate, so readiness is a real 1-token generation through the same path as user
requests. After that, readiness follows the engine replicas: when none is running
(all died and Ray is replacing them) /readyz answers 503 until a new one has
generated a token again. A slow request never flips it: only the replica count, as
Ray's controller reports it, can take a ready pod out of its Service.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

logger = logging.getLogger(__name__)

Probe = Callable[[], Awaitable[str]]  # returns the generated text, raises on failure
# Returns (running, total) engine replicas; raises when the controller cannot be asked.
ReplicaCount = Callable[[], Awaitable[tuple[int, int]]]


class Readiness:
    """Probes until a generation succeeds, then watches the engine replicas."""

    def __init__(
        self,
        probe: Probe,
        replicas: ReplicaCount | None = None,
        retry_s: float = 2.0,
        probe_timeout_s: float = 120.0,
        watch_s: float = 2.0,
    ):
        self._probe = probe
        self._replicas = replicas
        self._retry_s = retry_s
        self._timeout_s = probe_timeout_s
        self._watch_s = watch_s
        self.ready = False
        self.last_error: str | None = "not probed yet"
        self.ready_after_s: float | None = None
        self.lost_engines = 0  # times every engine replica was gone at once
        self._started = time.monotonic()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start probing in the background (call from inside the event loop)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            await self._until_a_token()
            if self._replicas is None or not await self._while_an_engine_runs():
                return

    async def _until_a_token(self) -> None:
        attempt = 0
        while True:
            attempt += 1
            try:
                text = await asyncio.wait_for(self._probe(), self._timeout_s)
            except TimeoutError:
                self.last_error = f"no token within {self._timeout_s:.0f} s (engine loading?)"
            except Exception as e:  # any failure means "not yet"; keep the reason
                self.last_error = f"{type(e).__name__}: {e}"[:500]
            else:
                self.ready = True
                self.last_error = None
                if self.ready_after_s is None:
                    self.ready_after_s = round(time.monotonic() - self._started, 1)
                logger.info("ready after %.1f s (generated %r)", self.ready_after_s, text)
                return
            if attempt == 1 or attempt % 15 == 0:
                logger.info("readiness probe %d failed: %s", attempt, self.last_error)
            await asyncio.sleep(self._retry_s)

    async def _while_an_engine_runs(self) -> bool:
        """Watch until no engine replica runs (True) or the count cannot work (False)."""
        assert self._replicas is not None
        while True:
            await asyncio.sleep(self._watch_s)
            try:
                running, total = await self._replicas()
            except AttributeError as e:
                # A renamed Ray attribute, not a passing controller outage: retrying
                # cannot help, and readiness would silently stop following the engines.
                logger.error(
                    "replica watch stopped (a Ray attribute it reads is gone: %s);"
                    " /readyz no longer follows the engine replicas",
                    e,
                )
                return False
            except Exception as e:  # the controller restarting is not the engine failing
                logger.debug("replica count unavailable: %s", e)
                continue
            if running == 0:
                self.ready = False
                self.lost_engines += 1
                self.last_error = f"no engine replica running (0 of {total}); Ray is replacing it"
                logger.warning("not ready: %s", self.last_error)
                return True

    def status(self) -> tuple[int, dict[str, object]]:
        if self.ready:
            return 200, {"status": "ready", "ready_after_s": self.ready_after_s}
        return 503, {"status": "starting", "reason": self.last_error}


def one_token_text(response: Any) -> str:
    """The text of a 1-token, non-streamed completion as Ray's LLM server yields it;
    raises when it is an error or holds no token."""
    data = response.model_dump() if hasattr(response, "model_dump") else response
    if isinstance(data, list):  # batched stream chunks
        data = data[0].model_dump()
    if "error" in data and data["error"]:
        raise RuntimeError(str(data["error"]))
    usage = data.get("usage") or {}
    if usage.get("completion_tokens", 0) < 1:
        raise RuntimeError(f"engine returned no token: {data}")
    return str(data["choices"][0]["text"])


def add_health_routes(app: Any, readiness: Readiness) -> None:
    """/healthz (alive while the process serves) and /readyz (`readiness`) on a FastAPI app."""
    # Imported here: this module stays importable without the serving environment.
    from fastapi.responses import JSONResponse

    async def healthz() -> JSONResponse:
        return JSONResponse({"status": "alive"})

    async def readyz() -> JSONResponse:
        code, body = readiness.status()
        return JSONResponse(body, status_code=code)

    app.add_api_route("/healthz", healthz, methods=["GET"], include_in_schema=False)
    app.add_api_route("/readyz", readyz, methods=["GET"], include_in_schema=False)
