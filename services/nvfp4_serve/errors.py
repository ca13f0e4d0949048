"""Errors a client sees: OpenAI's shape, nothing of the server's insides.

Ray Serve LLM answers an exception raised in an engine replica with a 500 whose
message is the whole remote traceback (file paths, library versions, code). That
helps an attacker more than a client, so 5xx bodies are replaced by a short message
with the request id; the full text goes to the server log under the same id. Its 4xx
bodies (engine-side checks such as max_tokens < 1) name the exception class as `type`,
carry an integer `code` and wrap the reason in "Message: ..., Internal exception: ...";
they are rewritten into OpenAI's shape with the reason alone.

Requests that the engine would turn into such a 500 are refused up front with a 400
instead, where we can name the problem (see `chat_messages_problem`).
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Callable, Iterable
from typing import Any

from nvfp4_serve.auth import ASGIApp, Scope, error_body

logger = logging.getLogger(__name__)

_REQUEST_ID = re.compile(r"Request ID: ([0-9A-Za-z-]+)")
# Ray Serve LLM's wording of a client error (ray.llm ... server_utils.get_response_for_error).
_RAY_REASON = re.compile(
    r"^Message: (?P<reason>.*?)(?: \(Request ID: [^)]*\))?, Internal exception: ", re.S
)
_RAY_PARAM = re.compile(r"\(parameter=(?P<param>[\w.\[\]]+)")
OPENAI_ERROR_TYPES = frozenset(
    {"invalid_request_error", "authentication_error", "permission_error", "not_found_error",
     "rate_limit_error", "server_error", "api_error"}
)  # fmt: skip


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


# Beam search scores a sequence as logprob / length ** length_penalty. Past this bound
# the power overflows (a huge penalty) or underflows to 0 (a huge negative one) for
# sequences of a million tokens or fewer, and vLLM's engine fails with a 500.
MAX_LENGTH_PENALTY = 50.0


def beam_search_problem(use_beam_search: Any, penalty: Any) -> str | None:
    """Why vLLM's beam search would crash on these parameters, if it would."""
    # A raw JSON body may hold anything here; a non-number is the schema's to refuse.
    number = isinstance(penalty, (int, float)) and not isinstance(penalty, bool)
    if use_beam_search is not True or not number:
        return None
    if not math.isfinite(penalty) or abs(penalty) > MAX_LENGTH_PENALTY:
        return (
            f"length_penalty must be between -{MAX_LENGTH_PENALTY:g} and"
            f" {MAX_LENGTH_PENALTY:g} with use_beam_search, got {penalty:g}"
        )
    return None


def request_problem(field: Callable[[str], Any]) -> tuple[str, str] | None:
    """(param, why) when vLLM would fail on this request with a 500, else None. `field`
    reads one field of it: a parsed request's attribute (the ingress) or a raw JSON body's
    key (direct streaming)."""
    messages = field("messages")
    if isinstance(messages, list):
        problem = chat_messages_problem(messages)
        if problem:
            return "messages", problem
    problem = beam_search_problem(field("use_beam_search"), field("length_penalty"))
    if problem:
        return "length_penalty", problem
    return None


def validation_error_body(errors: list[dict[str, Any]]) -> bytes:
    """A request that fails the schema, as OpenAI words it: one line, `param` the field.

    Ray's own handler puts pydantic's error kind ("missing") in `type` and the offending
    input, possibly the whole request body, in `param`.
    """
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        reason = (first.get("ctx") or {}).get("error", "malformed JSON")
        return error_body(f"request body is not valid JSON: {reason}", "invalid_json")
    where = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(where) or None
    message = " ".join(str(first.get("msg", "invalid request")).split())
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    text = f"{param}: {message}{more}" if param else f"{message}{more}"
    return error_body(text, "invalid_value", param=param)


def server_error_body(status: int, request_id: str) -> bytes:
    """What a client sees of a 5xx: no traceback, the request id to find it in the log."""
    return error_body(
        f"internal server error (request id {request_id}); the server log has details",
        code=str(status),
        type_="server_error",
    )


def request_id(scope: Scope, text: str = "") -> str:
    for name, value in scope.get("headers", []):
        if name.lower() == b"x-request-id":
            return str(value.decode("latin-1"))
    found = _REQUEST_ID.search(text)
    return found.group(1) if found else "unknown"


def client_error_body(status: int, original: str, request_id: str) -> bytes | None:
    """Ray's 4xx body in OpenAI's shape, or None when it already has that shape."""
    try:
        error = json.loads(original)["error"]
    except (ValueError, KeyError, TypeError):
        return None
    if not isinstance(error, dict):
        return None
    if error.get("type") in OPENAI_ERROR_TYPES and not isinstance(error.get("code"), int):
        return None
    text = str(error.get("message", ""))
    found = _RAY_REASON.match(text)
    reason = " ".join((found.group("reason") if found else text).split()) or f"HTTP {status}"
    param = _RAY_PARAM.search(reason)
    code = {400: "invalid_value", 404: "not_found", 413: "too_large"}.get(status, str(status))
    return error_body(
        f"{reason} (request id {request_id})", code, param=param.group("param") if param else None
    )


class OpenAIErrorBodies:
    """Pure ASGI middleware: 5xx bodies scrubbed, Ray's 4xx bodies in OpenAI's shape.

    Buffers only responses with an error status; streams (200) pass untouched.
    """

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
            if message["type"] == "http.response.start" and message["status"] >= 400:
                start = message
                return
            if start is None or message["type"] != "http.response.body":
                await send(message)
                return
            chunks.append(message.get("body", b""))
            if message.get("more_body"):
                return
            raw = b"".join(chunks)
            original = raw.decode(errors="replace")
            rid = request_id(scope, original)
            if start["status"] < 500:
                cleaned = client_error_body(start["status"], original, rid)
                if cleaned is None:  # already OpenAI's shape, or not JSON: as it was
                    await send(start)
                    await send({"type": "http.response.body", "body": raw})
                    return
                body = cleaned
            else:
                logger.error("request %s answered %d: %s", rid, start["status"], original)
                body = server_error_body(start["status"], rid)
            headers = [(k, v) for k, v in start.get("headers", []) if k.lower() not in
                       (b"content-length", b"content-type")]  # fmt: skip
            headers += [(b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode())]  # fmt: skip
            await send({**start, "headers": headers})
            await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, send_scrubbed)
