"""Errors a client sees: OpenAI's shape, nothing of the server's insides.

Ray Serve LLM answers an exception raised in an engine replica with a 500 whose
message is the whole remote traceback (file paths, library versions, code). That
helps an attacker more than a client, so 5xx bodies are replaced by a short message
with the request id; the full text goes to the server log under the same id.

Requests that the engine would turn into such a 500 are refused up front with a 400
instead, where we can name the problem (see `chat_messages_problem`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from typing import Any

from nvfp4_serve.auth import ASGIApp, Scope, error_body

logger = logging.getLogger(__name__)

_REQUEST_ID = re.compile(r"Request ID: ([0-9A-Za-z-]+)")


def chat_messages_problem(messages: Iterable[Any]) -> str | None:
    """Why vLLM's chat template renderer would crash on these messages, if it would.

    The request schema lets any object through as a message; vLLM reads
    `message["role"]` and raises KeyError (a 500) when it is missing.
    """
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else getattr(message, "role", None)
        if not isinstance(role, str) or not role:
            return f"messages[{i}] has no 'role' (one of system, user, assistant, tool, developer)"
    return None


def _request_id(scope: Scope, text: str) -> str:
    for name, value in scope.get("headers", []):
        if name.lower() == b"x-request-id":
            return str(value.decode("latin-1"))
    found = _REQUEST_ID.search(text)
    return found.group(1) if found else "unknown"


class ScrubServerErrors:
    """Pure ASGI middleware: buffers only responses with a 5xx status."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start: dict[str, Any] | None = None
        chunks: list[bytes] = []

        async def send_scrubbed(message: dict[str, Any]) -> None:
            nonlocal start
            if message["type"] == "http.response.start" and message["status"] >= 500:
                start = message
                return
            if start is None or message["type"] != "http.response.body":
                await send(message)
                return
            chunks.append(message.get("body", b""))
            if message.get("more_body"):
                return
            original = b"".join(chunks).decode(errors="replace")
            request_id = _request_id(scope, original)
            logger.error("request %s answered %d: %s", request_id, start["status"], original)
            body = error_body(
                f"internal server error (request id {request_id}); the server log has details",
                code=str(start["status"]),
                type_="server_error",
            )
            headers = [(k, v) for k, v in start.get("headers", []) if k.lower() not in
                       (b"content-length", b"content-type")]  # fmt: skip
            headers += [(b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode())]  # fmt: skip
            await send({**start, "headers": headers})
            await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, send_scrubbed)
