"""The error handlers of the app that answers clients (our ingress, or vLLM's own app in
direct streaming): HTTP errors, schema errors and bodies that crash vLLM's validators in
OpenAI's error shape, and no traceback in an unexpected exception's answer."""

from __future__ import annotations

import inspect
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException

from nvfp4_serve.auth import error_body
from nvfp4_serve.errors import request_id, server_error_body, validation_error_body

logger = logging.getLogger(__name__)

Handler = Callable[[Request, Exception], Awaitable[Response] | Response]


def add_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(HTTPException, _openai_http_error)
    app.add_exception_handler(RequestValidationError, _openai_validation_error)
    for error in (AttributeError, TypeError):
        app.add_exception_handler(error, _body_validator_crash(app.exception_handlers.get(error)))
    # Starlette answers Exception from its outermost layer, past every middleware (and so
    # past OpenAIErrorBodies): the body is scrubbed here. vLLM's app has its own handler,
    # which still decides the status.
    app.add_exception_handler(Exception, _scrubbed(app.exception_handlers.get(Exception)))


async def _openai_http_error(request: Request, exc: Exception) -> Response:
    """HTTPExceptions (unknown model, unknown route) in OpenAI's error shape.

    Ray's handlers already answer engine errors this way (validation errors:
    `_openai_validation_error`); FastAPI's default would answer {"detail": ...}, which
    OpenAI clients do not parse.
    """
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    response = error_response(exc.status_code, str(exc.detail), code or str(exc.status_code))
    response.headers.update(exc.headers or {})
    return response


async def _openai_validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    body = validation_error_body(list(exc.errors()))
    return Response(body, status_code=400, media_type="application/json")


def _body_validator_crash(previous: Handler | None) -> Handler:
    """A request body that crashes vLLM's own validators (they call `.get` on a field the
    client sent as a number: `"structured_outputs": 3`) is the client's error: 400, not a
    500. Only errors raised while FastAPI validates the body are answered so; others go
    to the handler the app had, if any."""

    async def handler(request: Request, exc: Exception) -> Response:
        tb = exc.__traceback__
        while tb is not None and tb.tb_frame.f_code.co_name != "request_body_to_args":
            tb = tb.tb_next
        if tb is not None:
            return error_response(400, f"invalid request body: {exc}", "invalid_request_error")
        if previous is None:
            raise exc
        return await _answer(previous, request, exc)

    return handler


def _scrubbed(previous: Handler | None) -> Handler:
    async def handler(request: Request, exc: Exception) -> Response:
        status = 500
        if previous is not None:
            response = await _answer(previous, request, exc)
            if response.status_code < 500:
                return response
            status = response.status_code
        rid = request_id(request.scope)
        if rid == "unknown":
            rid = uuid.uuid4().hex[:16]
        logger.error("request %s failed: %s: %s", rid, type(exc).__name__, exc)
        return Response(server_error_body(status, rid), status, media_type="application/json")

    return handler


async def _answer(handler: Handler, request: Request, exc: Exception) -> Response:
    response: Any = handler(request, exc)
    return await response if inspect.isawaitable(response) else response


def error_response(status: int, message: str, code: str, param: str | None = None) -> Response:
    body = error_body(message, code, param=param)
    return Response(body, status_code=status, media_type="application/json")
