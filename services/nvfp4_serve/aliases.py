"""Model aliases for vLLM's own app (direct streaming): pure ASGI, no Ray import, so it is
unit-tested without a cluster; nvfp4_serve.direct adds it to the app."""

from __future__ import annotations

import json
from typing import Any

from nvfp4_serve.auth import Scope


class ModelAliases:
    """Pure ASGI middleware: a POST whose JSON body names an alias is passed on naming the
    served model (what NVFP4Ingress does to the parsed body; here vLLM parses
    it, so the raw body is rewritten)."""

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
        resolved = self.resolved(body)
        if resolved is not body:  # the length changed with the name
            headers = [(k, v) for k, v in scope["headers"] if k != b"content-length"]
            headers.append((b"content-length", str(len(resolved)).encode()))
            scope = {**scope, "headers": headers}
        body = resolved
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if replayed:
                return await receive()  # vLLM watches for the client disconnecting
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    def resolved(self, body: bytes) -> bytes:
        try:
            data = json.loads(body)
        except ValueError:
            return body  # vLLM answers the bad JSON
        if not isinstance(data, dict) or data.get("model") not in self.aliases:
            return body
        return json.dumps({**data, "model": self.aliases[data["model"]]}).encode()
