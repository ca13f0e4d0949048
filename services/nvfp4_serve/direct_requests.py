"""Request bodies in direct streaming, before vLLM's own app sees them: pure ASGI, no Ray
import, so it is unit-tested without a cluster; nvfp4_serve.direct adds it to the app."""

from __future__ import annotations

import json
from typing import Any

from nvfp4_serve.auth import Scope, error_body
from nvfp4_serve.errors import request_problem


class DirectRequests:
    """Pure ASGI middleware: a POST's JSON body is read once, refused with a 400 in OpenAI's
    shape when vLLM would fail on it (`errors.request_problem`, the ingress's check too),
    and passed on naming the served model when it names an alias (what NVFP4Ingress does
    to the parsed body; here vLLM parses it, so the raw body is rewritten)."""

    def __init__(self, app: Any, aliases: dict[str, str]) -> None:
        self.app = app
        self.aliases = aliases

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        parts, more = [], True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client left before sending it all
                return
            parts.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(parts)
        try:
            data = json.loads(body)
        except ValueError:
            data = None  # vLLM answers the bad JSON
        if isinstance(data, dict):
            problem = request_problem(data.get)
            if problem:
                await self._refuse(send, *problem)
                return
            if data.get("model") in self.aliases:
                body = json.dumps({**data, "model": self.aliases[data["model"]]}).encode()
                # The length changed with the name.
                headers = [(k, v) for k, v in scope["headers"] if k != b"content-length"]
                headers.append((b"content-length", str(len(body)).encode()))
                scope = {**scope, "headers": headers}
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if replayed:
                return await receive()  # vLLM watches for the client disconnecting
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    @staticmethod
    async def _refuse(send: Any, param: str, problem: str) -> None:
        body = error_body(problem, "invalid_value", param=param)
        headers = [(b"content-type", b"application/json"),
                   (b"content-length", str(len(body)).encode())]  # fmt: skip
        await send({"type": "http.response.start", "status": 400, "headers": headers})
        await send({"type": "http.response.body", "body": body})
