"""API keys for the OpenAI routes: Bearer tokens checked in constant time.

Ray Serve LLM ignores vLLM's own VLLM_API_KEY (ray-project/ray#55369), so the
ingress checks keys itself. Keys come from settings (a list) and/or a mounted
secret file (one key per line, `#` comments allowed), re-read when the file changes
so a rotated Kubernetes secret takes effect without a restart.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from pathlib import Path
from typing import Any

from nvfp4_common.errors import Nvfp4Error

logger = logging.getLogger(__name__)

# Only the probes stay open: a kubelet has no API key. /docs and /openapi.json need one.
OPEN_PATHS = frozenset({"/healthz", "/readyz"})

Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]], Any]


class AuthConfigError(Nvfp4Error, RuntimeError):
    """Refuse to start: production without keys, or an unreadable key file."""


def _digest(key: str) -> bytes:
    # Comparing fixed-length digests keeps the time independent of key length too.
    return hashlib.sha256(key.encode()).digest()


def parse_key_file(text: str) -> list[str]:
    return [s for line in text.splitlines() if (s := line.strip()) and not s.startswith("#")]


class KeyStore:
    """The accepted keys; `check` costs the same whichever key (if any) matches."""

    def __init__(self, keys: Iterable[str] = (), key_file: Path | None = None) -> None:
        self._static = [_digest(k) for k in keys if k]
        self._file = key_file
        self._file_stamp: tuple[float, int] | None = None
        self._from_file: list[bytes] = []
        if key_file is not None:
            self._reload(required=True)

    @property
    def configured(self) -> bool:
        return bool(self._static) or self._file is not None

    def count(self) -> int:
        return len(self._static) + len(self._from_file)

    def _reload(self, required: bool = False) -> None:
        assert self._file is not None
        try:
            st = self._file.stat()
            stamp = (st.st_mtime, st.st_size)
            if stamp == self._file_stamp:
                return
            keys = parse_key_file(self._file.read_text())
        except OSError as e:
            if required:
                raise AuthConfigError(f"cannot read API key file {self._file}: {e}") from None
            # Keep the last good keys: a secret being re-mounted must not open the API.
            logger.error("cannot re-read API key file %s: %s", self._file, e)
            return
        self._file_stamp = stamp
        self._from_file = [_digest(k) for k in keys]

    def check(self, token: str) -> bool:
        if self._file is not None:
            self._reload()
        presented = _digest(token)
        ok = False
        for key in (*self._static, *self._from_file):
            ok |= hmac.compare_digest(key, presented)  # no early exit
        return ok


def require_keys(store: KeyStore, env: str) -> None:
    """Production refuses to serve without keys; development may run open."""
    if env == "production" and store.count() == 0:
        raise AuthConfigError(
            "no API keys: set NVFP4_SERVE_API_KEYS or NVFP4_SERVE_API_KEY_FILE"
            " (open serving is allowed only with NVFP4_ENV=development)"
        )
    if store.count() == 0 and not store.configured:
        logger.warning("serving WITHOUT API keys (development mode)")


def replica_keys(static: Iterable[str], key_file: str | None, env: str) -> tuple[KeyStore, bool]:
    """The keys of a serving replica and whether they are enforced. Called in the replica
    with the keys of its own settings and the file its mounts hold: keys passed as init
    args or app options would be stored in Ray's GCS and dashboard."""
    store = KeyStore(static, Path(key_file) if key_file else None)
    require_keys(store, env)
    return store, store.configured or env == "production"


def add_key_check(app: Any, store: KeyStore, enforce: bool, where: str) -> None:
    """Keys on a FastAPI app, as its outermost middleware (add it last): a request without a
    valid key reaches none of the app's handlers."""
    app.add_middleware(ApiKeyMiddleware, store=store, enforce=enforce)
    logger.info(
        "%s: %d API key(s), keys %s; /healthz and /readyz open",
        where,
        store.count(),
        "required" if enforce else "NOT required (development)",
    )


def error_body(
    message: str, code: str, type_: str = "invalid_request_error", param: str | None = None
) -> bytes:
    """OpenAI's error shape."""
    return json.dumps(
        {"error": {"message": message, "type": type_, "param": param, "code": code}}
    ).encode()


def bearer_token(headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    for name, value in headers:
        if name.lower() == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" and token.strip() else None
    return None


class ApiKeyMiddleware:
    """Pure ASGI middleware (no body buffering, so streaming is untouched)."""

    def __init__(self, app: ASGIApp, store: KeyStore, enforce: bool) -> None:
        self.app = app
        self.store = store
        self.enforce = enforce

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not self.enforce:
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root) :] or "/"
        if path in OPEN_PATHS or scope.get("method") == "OPTIONS":
            await self.app(scope, receive, send)
            return
        token = bearer_token(scope.get("headers", []))
        if token is not None and self.store.check(token):
            await self.app(scope, receive, send)
            return
        message = (
            "Missing API key: send 'Authorization: Bearer <key>'."
            if token is None
            else "Incorrect API key provided."
        )
        body = error_body(message, "invalid_api_key")
        await send(
            {
                "type": "http.response.start",
                "status": 401,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"www-authenticate", b"Bearer"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
