"""API keys: constant-time check, key file rotation, the production rule and the
401 body, driven through the real ASGI middleware."""

from __future__ import annotations

import asyncio
import hmac
import json
import os
from pathlib import Path
from typing import Any

import pytest

from nvfp4_serve import auth
from nvfp4_serve.auth import ApiKeyMiddleware, AuthConfigError, KeyStore, require_keys


def test_check_accepts_only_configured_keys() -> None:
    store = KeyStore(["alpha", "beta"])
    assert store.check("alpha") and store.check("beta")
    assert not store.check("alph") and not store.check("") and not store.check("alpha ")


def test_check_compares_every_key_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    store = KeyStore(["k1", "k2", "k3"])
    assert store.check("k1")
    # No early exit on a match, and digests of equal length whatever the key length.
    assert len(calls) == 3
    assert {len(a) for a, _ in calls} == {len(b) for _, b in calls} == {32}


def test_key_file_is_read_and_rotated(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text("# team A\nkey-one\n\n  key-two  \n")
    store = KeyStore([], path)
    assert store.count() == 2 and store.check("key-two")
    path.write_text("key-three\n")
    os.utime(path, (1, 1))  # a new mtime, as a re-mounted secret gets
    assert store.check("key-three") and not store.check("key-one")


def test_missing_key_file_refuses_to_start(tmp_path: Path) -> None:
    with pytest.raises(AuthConfigError, match="cannot read API key file"):
        KeyStore([], tmp_path / "absent")


def test_key_file_that_vanishes_keeps_the_last_keys(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text("k\n")
    store = KeyStore([], path)
    path.unlink()
    assert store.check("k")


def test_production_requires_keys(tmp_path: Path) -> None:
    with pytest.raises(AuthConfigError, match="NVFP4_SERVE_API_KEYS"):
        require_keys(KeyStore([]), "production")
    empty = tmp_path / "keys"
    empty.write_text("# none yet\n")
    with pytest.raises(AuthConfigError):
        require_keys(KeyStore([], empty), "production")
    require_keys(KeyStore([]), "development")  # allowed, with a warning
    require_keys(KeyStore(["k"]), "production")


def call(mw: ApiKeyMiddleware, path: str, headers: dict[str, str]) -> tuple[int, Any]:
    """Drive the middleware with one HTTP request; return (status, body or 'inner')."""
    sent: list[dict[str, Any]] = []

    async def inner(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"inner"})

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    mw.app = inner
    scope = {
        "type": "http",
        "method": "GET",
        "path": path,
        "root_path": "",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
    }
    asyncio.run(mw(scope, receive, send))
    body = sent[1]["body"]
    return sent[0]["status"], body.decode() if body == b"inner" else json.loads(body)


def test_middleware_401_bodies_are_openai_errors() -> None:
    mw = ApiKeyMiddleware(None, KeyStore(["secret"]), enforce=True)  # type: ignore[arg-type]
    status, body = call(mw, "/v1/models", {})
    assert status == 401
    assert body["error"]["code"] == "invalid_api_key"
    assert body["error"]["type"] == "invalid_request_error"
    assert "Missing API key" in body["error"]["message"]
    status, body = call(mw, "/v1/models", {"Authorization": "Bearer wrong"})
    assert (status, body["error"]["message"]) == (401, "Incorrect API key provided.")
    assert call(mw, "/v1/models", {"Authorization": "Basic secret"})[0] == 401
    assert call(mw, "/v1/models", {"Authorization": "Bearer secret"}) == (200, "inner")
    assert call(mw, "/v1/models", {"authorization": "bearer  secret"}) == (200, "inner")


def test_probes_stay_open_and_development_runs_open() -> None:
    mw = ApiKeyMiddleware(None, KeyStore(["secret"]), enforce=True)  # type: ignore[arg-type]
    assert call(mw, "/healthz", {}) == (200, "inner")
    assert call(mw, "/readyz", {}) == (200, "inner")
    assert call(mw, "/readyz/../v1/models", {})[0] == 401
    open_mw = ApiKeyMiddleware(None, KeyStore([]), enforce=False)  # type: ignore[arg-type]
    assert call(open_mw, "/v1/models", {}) == (200, "inner")
