"""Request bodies in direct streaming (model aliases, bodies that would crash vLLM), through
the real ASGI middleware (no Ray, no vLLM: a recording app stands in for vLLM's, which the
integration tests run for real)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from nvfp4_serve.direct_requests import DirectRequests

ALIASES = {"old-name": "served"}


def call(
    body: bytes,
    method: str = "POST",
    parts: int = 1,
    disconnect: bool = False,
    sent: list[dict[str, Any]] | None = None,
) -> dict[str, Any] | None:
    """What the app behind the middleware received: headers, body and the next message;
    what the middleware itself answered goes to `sent`."""
    size = max(1, len(body) // parts)
    chunks = [body[i : i + size] for i in range(0, len(body), size)] or [b""]
    messages = [
        {"type": "http.request", "body": c, "more_body": i < len(chunks) - 1}
        for i, c in enumerate(chunks)
    ]
    if disconnect:
        messages = messages[:1] + [{"type": "http.disconnect"}]
        messages[0]["more_body"] = True
    messages.append({"type": "http.disconnect"})
    seen: dict[str, Any] = {}

    async def receive() -> dict[str, Any]:
        return messages.pop(0)

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen["headers"] = dict(scope["headers"])
        seen["body"] = (await receive())["body"]
        seen["next"] = (await receive())["type"]  # the client's disconnect, passed through

    scope = {
        "type": "http",
        "method": method,
        "path": "/v1/completions",
        "headers": [(b"content-length", str(len(body)).encode())],
    }

    async def send(message: dict[str, Any]) -> None:
        if sent is not None:
            sent.append(message)

    asyncio.run(DirectRequests(app, ALIASES)(scope, receive, send))
    return seen or None


def test_an_alias_becomes_the_served_name_with_the_new_length() -> None:
    body = json.dumps({"model": "old-name", "prompt": "Hi", "max_tokens": 2}).encode()
    seen = call(body, parts=3)
    assert seen is not None
    assert json.loads(seen["body"]) == {"model": "served", "prompt": "Hi", "max_tokens": 2}
    assert seen["headers"][b"content-length"] == str(len(seen["body"])).encode()
    assert seen["next"] == "http.disconnect"


def test_other_bodies_pass_byte_for_byte() -> None:
    for body in (
        json.dumps({"model": "served", "prompt": "Hi"}).encode(),
        # Beam search's own range, and a penalty without beam search, are vLLM's to judge.
        json.dumps({"model": "served", "use_beam_search": True, "length_penalty": 50}).encode(),
        json.dumps({"model": "served", "length_penalty": 1e308}).encode(),
        json.dumps({"model": "served", "messages": [{"role": "user", "content": "Hi"}]}).encode(),
        b"{not json",
        b"[1, 2]",
        b"",
    ):
        seen = call(body)
        assert seen is not None
        assert seen["body"] == body
        assert seen["headers"][b"content-length"] == str(len(body)).encode()


def test_a_get_is_not_read() -> None:
    seen = call(b"", method="GET")
    assert seen is not None and seen["body"] == b""


def test_a_client_gone_before_its_body_ends_reaches_no_handler() -> None:
    body = json.dumps({"model": "old-name", "prompt": "x" * 100}).encode()
    assert call(body, parts=2, disconnect=True) is None


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"use_beam_search": True, "length_penalty": 1e308}, "length_penalty"),
        ({"use_beam_search": True, "length_penalty": -1e308}, "length_penalty"),
        ({"messages": [{"role": "user", "content": "Hi"}, {"content": "no role"}]}, "messages"),
    ],
)
def test_a_body_that_would_crash_vllm_is_a_400_naming_the_field(
    fields: dict[str, Any], param: str
) -> None:
    sent: list[dict[str, Any]] = []
    body = json.dumps({"model": "old-name", "max_tokens": 2, **fields}).encode()
    assert call(body, parts=2, sent=sent) is None  # vLLM's app never sees it
    start, answer = sent
    assert start["status"] == 400
    error = json.loads(answer["body"])["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error", error
    assert dict(start["headers"])[b"content-length"] == str(len(answer["body"])).encode()
