"""Errors as OpenAI-style bodies: {"error": {"message", "type", "param", "code"}}. A client mistake is a
4xx naming the parameter; only our own bugs are 500s."""

from __future__ import annotations

import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("mili.server")


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code

    def body(self) -> dict[str, dict[str, str | int | None]]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def bad_request(exc: Exception, default_param: str | None = None) -> APIError:
    """A 400 for a request that cannot run; its param is the field the message names first ('like_this')."""
    named = re.search(r"'(\w+)'", str(exc))
    return APIError(400, str(exc), param=named.group(1) if named else default_param)


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), error.status)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"msg": "invalid request", "loc": ()}
        if first.get("type") == "json_invalid":
            return error_response(APIError(400, "the request body is not valid JSON"))
        location = [str(part) for part in first.get("loc", ()) if part != "body"]
        if not location and first.get("type") in ("model_attributes_type", "dict_type", "missing"):
            return error_response(APIError(400, "the request body must be a JSON object, sent with "
                                                "'Content-Type: application/json'"))
        where = ".".join(location)
        message = first.get("msg", "invalid value").removeprefix("Value error, ")
        if not where:  # a check of the whole body: the field its message names first
            return error_response(bad_request(ValueError(message)))
        return error_response(APIError(400, f"{where}: {message}", location[0]))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_response(APIError(exc.status_code, str(exc.detail), kind=kind))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:  # a bug of ours, never the client's
        log.exception("unexpected error")
        return error_response(APIError(500, f"internal error: {exc}", kind="server_error"))
