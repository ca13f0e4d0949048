"""What clients see of server errors, through the real ASGI middleware."""

from __future__ import annotations

import asyncio
import json
import math
from typing import Any

from pydantic import BaseModel, ValidationError

from nvfp4_serve.errors import (
    OpenAIErrorBodies,
    beam_search_problem,
    chat_messages_problem,
    validation_error_body,
)

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
    asyncio.run(OpenAIErrorBodies(app)(scope, receive, send))
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


def _schema_errors(body: Any) -> list[dict[str, Any]]:
    """Real pydantic errors, located under "body" as FastAPI reports a request body's."""

    class Request(BaseModel):
        model: str
        messages: list[dict[str, Any]]
        max_tokens: int = 16

    try:
        if isinstance(body, str):
            Request.model_validate_json(body)
        else:
            Request.model_validate(body)
    except ValidationError as e:
        return [{**err, "loc": ("body", *err["loc"])} for err in e.errors()]
    raise AssertionError("the body was valid")


def test_schema_errors_name_the_field_in_one_line() -> None:
    error = json.loads(validation_error_body(_schema_errors({"model": "m"})))["error"]
    assert error == {
        "message": "messages: Field required",
        "type": "invalid_request_error",
        "param": "messages",
        "code": "invalid_value",
    }
    many = _schema_errors({"messages": "x", "max_tokens": "lots"})
    error = json.loads(validation_error_body(many))["error"]
    assert error["param"] == "model" and error["message"].endswith("(and 2 more problems)")


def test_malformed_json_is_said_to_be_malformed_json() -> None:
    error = json.loads(validation_error_body(_schema_errors('{"model": "m", ')))["error"]
    assert error["message"].startswith("request body is not valid JSON: EOF while parsing")
    assert error["param"] is None and error["code"] == "invalid_json"
    assert "\n" not in error["message"]


# Ray Serve LLM's body for a client error the engine found (captured from a request with
# max_tokens=0 against Ray 2.60 + vLLM CPU 0.32).
RAY_400 = json.dumps(
    {
        "error": {
            "message": "Message: max_tokens must be at least 1, got 0. (parameter=max_tokens,"
            " value=0) (Request ID: 2a9f9bc6-a361), Internal exception: max_tokens must be at"
            " least 1, got 0. (parameter=max_tokens, value=0) (Request ID: 2a9f9bc6-a361),"
            " original exception: ",
            "type": "OpenAIHTTPException",
            "param": None,
            "code": 400,
        }
    }
).encode()


def test_rays_client_errors_are_rewritten_in_openais_shape() -> None:
    sent = run(replying(400, RAY_400[:50], RAY_400[50:]))
    assert sent[0]["status"] == 400
    error = json.loads(sent[1]["body"])["error"]
    assert error == {
        "message": "max_tokens must be at least 1, got 0. (parameter=max_tokens, value=0)"
        " (request id 2a9f9bc6-a361)",
        "type": "invalid_request_error",
        "param": "max_tokens",
        "code": "invalid_value",
    }
    assert dict(sent[0]["headers"])[b"content-length"] == str(len(sent[1]["body"])).encode()


def test_client_errors_already_in_openais_shape_pass_untouched() -> None:
    ours = (
        b'{"error": {"message": "m", "type": "invalid_request_error", "param": null, "code": "x"}}'
    )
    for body in (ours, b"plain text"):
        sent = run(replying(404, body))
        assert sent[1]["body"] == body
        assert dict(sent[0]["headers"])[b"content-length"] == b"999"  # headers as they were


def test_beam_search_problem_bounds_the_length_penalty() -> None:
    assert beam_search_problem(False, 1e308) is None
    assert beam_search_problem(True, 1.0) is None
    assert beam_search_problem(True, -50.0) is None
    for bad in (50.5, -1e308, float("inf"), float("nan")):
        problem = beam_search_problem(True, bad)
        assert problem is not None and problem.startswith("length_penalty must be between -50")
    # 1M tokens ** 50 is 1e300: no overflow at the bound
    assert math.isfinite(1e6**50) and 1e6**-50 > 0
