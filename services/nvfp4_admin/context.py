"""The object every command receives: settings, and clients built on first use.

Commands get it with `@pass_app`. Clients are created lazily so `--help`, `estimate` and
`doctor` never need Redis or Ray to be up.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from nvfp4_common.errors import Nvfp4Error
from nvfp4_common.settings import Settings, build_settings, mask_url

if TYPE_CHECKING:
    from nvfp4_admin.ray_client import RayClient
    from nvfp4_common.queue import JobQueue
    from nvfp4_common.serve_history import ServeHistory

F = TypeVar("F", bound=Callable[..., Any])


@dataclass
class AppContext:
    """Settings for this invocation plus the clients commands share."""

    settings: Settings
    debug: bool = False
    _queue: JobQueue | None = field(default=None, repr=False)
    _ray: RayClient | None = field(default=None, repr=False)

    @property
    def queue(self) -> JobQueue:
        if self._queue is None:
            from nvfp4_common.queue import JobQueue

            self._queue = JobQueue(self.settings)
        return self._queue

    @property
    def serve_history(self) -> ServeHistory:
        """Serve configs remembered for `serve rollback`, in the job queue's Redis."""
        from nvfp4_common.serve_history import ServeHistory

        return ServeHistory(self.queue.redis)

    @property
    def ray(self) -> RayClient:
        if self._ray is None:
            from nvfp4_admin.ray_client import RayClient

            s = self.settings
            self._ray = RayClient(s.ray_address, s.serve_url, s.ray_auth_token)
        return self._ray

    def close(self) -> None:
        if self._ray is not None:
            self._ray.close()
        if self._queue is not None:
            self._queue.redis.close()


pass_app = click.make_pass_decorator(AppContext)


def load_settings(config: Path | None, overrides: dict[str, Any]) -> Settings:
    """Settings from NVFP4_* variables and a .env-style file, then command-line overrides.

    Built directly rather than through the cached get_settings(): each invocation may pass
    different overrides, and a cached object would leak them between invocations.
    """
    return build_settings(_env_file=config if config else ".env", **overrides)


def json_option(func: F) -> F:
    """Add --json: print machine-readable JSON instead of a table."""
    return click.option(
        "--json", "as_json", is_flag=True, help="Print JSON instead of a table (for scripts)."
    )(func)


def format_option(help: str) -> Callable[[F], F]:
    """Add --format (the job formats, NVFP4 by default) with this help text."""
    from nvfp4_common.jobs import QuantFormat

    return click.option(
        "--format",
        "fmt",
        type=click.Choice([f.value for f in QuantFormat]),
        default=QuantFormat.NVFP4.value,
        show_default=True,
        help=help,
    )


def describe_error(e: BaseException, settings: Settings | None) -> str | None:
    """One line for errors a user can cause or fix; None for bugs (they keep a traceback).

    Our own errors (`Nvfp4Error`) already say what to do; the rest are the few foreign
    errors a user causes: an unreachable or password-protected Redis, an unreachable
    server, arguments that are not UTF-8.
    """
    if isinstance(e, Nvfp4Error):
        return str(e)
    import httpx
    import redis

    redis_url = mask_url(settings.redis_url) if settings else "Redis"
    # AuthenticationError is a ConnectionError in redis-py: check it first.
    refused = isinstance(e, redis.exceptions.AuthenticationError) or (
        isinstance(e, redis.exceptions.ResponseError) and "NOAUTH" in str(e)
    )
    if refused:
        return f"Redis at {redis_url} refused the password: {e} (check NVFP4_REDIS_URL)"
    if isinstance(e, redis.exceptions.ConnectionError | redis.exceptions.TimeoutError):
        return f"cannot reach Redis at {redis_url}: {e}"
    if isinstance(e, UnicodeEncodeError):  # argv bytes that are not UTF-8 reach Redis keys
        bad = e.object[e.start : e.end]
        return f"an argument is not UTF-8 text (it holds {bad!r}); check the terminal's encoding"
    if isinstance(e, httpx.TransportError):
        where = str(e.request.url) if _has_request(e) else "the server"
        return f"cannot reach {where}: {e or type(e).__name__}"
    return None


def _has_request(e: Any) -> bool:
    try:
        e.request  # noqa: B018 - httpx raises RuntimeError when no request is attached
    except RuntimeError:
        return False
    return True
