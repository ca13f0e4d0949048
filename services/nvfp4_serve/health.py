"""Liveness and readiness.

/v1/models answers as soon as the ingress is up, long before an engine replica can
generate, so readiness is a real 1-token generation through the same path as user
requests. Once one succeeds it is cached: a later slow request must not flap the
pod out of its Service.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

logger = logging.getLogger(__name__)

Probe = Callable[[], Awaitable[str]]  # returns the generated text, raises on failure


class Readiness:
    """Runs `probe` until it first succeeds, then stays ready."""

    def __init__(self, probe: Probe, retry_s: float = 2.0, probe_timeout_s: float = 120.0):
        self._probe = probe
        self._retry_s = retry_s
        self._timeout_s = probe_timeout_s
        self.ready = False
        self.last_error: str | None = "not probed yet"
        self.ready_after_s: float | None = None
        self._started = time.monotonic()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start probing in the background (call from inside the event loop)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        attempt = 0
        while not self.ready:
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
                self.ready_after_s = round(time.monotonic() - self._started, 1)
                logger.info("ready after %.1f s (generated %r)", self.ready_after_s, text)
                return
            if attempt == 1 or attempt % 15 == 0:
                logger.info("readiness probe %d failed: %s", attempt, self.last_error)
            await asyncio.sleep(self._retry_s)

    def status(self) -> tuple[int, dict[str, object]]:
        if self.ready:
            return 200, {"status": "ready", "ready_after_s": self.ready_after_s}
        return 503, {"status": "starting", "reason": self.last_error}
