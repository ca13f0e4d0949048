"""What clients see of server errors, through the real ASGI middleware."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from nvfp4_serve.errors import ScrubServerErrors, chat_messages_problem

TRACEBACK = (
    '{"error": {"message": "Internal Server Error (Request ID: 5f1c-aa), original exception: '
    'Traceback (most recent call last):\\n  File \\"/opt/venv/lib/python3.11/site-packages/'
    'vllm/renderers/chat_utils.py\\", line 2081\\nKeyError: \'role\'", "code": 500}}'
)


def run(app: Any, headers: list[tuple[bytes, bytes]] | None = None) -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "path": "/v1/chat/completions", "headers": headers or []}
    asyncio.run(ScrubServerErrors(app)(scope, receive, send))
    return sent


def replying(status: int, *parts: bytes) -> Any:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        head = [(b"content-type", b"application/json"), (b"content-length", b"999")]
        await send({"type": "http.response.start", "status": status, "headers": head})
        for i, part in enumerate(parts):
            await send({"type": "http.response.body", "body": part,
                        "more_body": i < len(parts) - 1})  # fmt: skip

    return app


def test_a_500_loses_its_traceback_but_keeps_the_request_id() -> None:
    half = len(TRACEBACK) // 2
    sent = run(replying(500, TRACEBACK[:half].encode(), TRACEBACK[half:].encode()))
    start, body = sent
    assert start["status"] == 500
    error = json.loads(body["body"])["error"]
    assert error["message"].startswith("internal server error (request id 5f1c-aa)")
    assert "Traceback" not in body["body"].decode() and "site-packages" not in body["body"].decode()
    assert error["type"] == "server_error"
    assert dict(start["headers"])[b"content-length"] == str(len(body["body"])).encode()


def test_the_proxy_request_id_header_wins() -> None:
    sent = run(replying(503, b"overloaded"), headers=[(b"x-request-id", b"abc-123")])
    assert "request id abc-123" in json.loads(sent[1]["body"])["error"]["message"]


def test_other_responses_stream_through_untouched() -> None:
    sent = run(replying(200, b"data: 1\n\n", b"data: 2\n\n"))
    assert [m.get("body") for m in sent] == [None, b"data: 1\n\n", b"data: 2\n\n"]
    assert sent[0]["status"] == 200
    sent = run(replying(400, b'{"error": {"message": "max_tokens too large"}}'))
    assert b"max_tokens too large" in sent[1]["body"]


def test_chat_messages_need_a_role() -> None:
    assert chat_messages_problem([{"role": "user", "content": "hi"}]) is None
    assert "messages[1] has no 'role'" in str(
        chat_messages_problem([{"role": "user"}, {"author": {"role": "user"}}])
    )
    assert chat_messages_problem([{"role": 3}]) is not None
