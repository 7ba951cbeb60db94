"""RFC 9457 problem details: every error the API sends is ``application/problem+json`` with a
stable ``code`` that clients switch on and a ``detail`` that says how to fix it. No traceback ever
reaches a client; unexpected errors are logged and answered with ``internal_error``.
"""
from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("dare.api")

PROBLEM_MEDIA_TYPE = "application/problem+json"


class ProblemError(Exception):
    """Raise from anywhere under a route to answer with a problem document."""

    def __init__(self, status: int, code: str, detail: str, *, title: str | None = None,
                 headers: dict[str, str] | None = None, **extra: Any) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.title = title or HTTPStatus(status).phrase
        self.headers = headers
        self.extra = extra


def problem_response(status: int, code: str, detail: str, *, title: str | None = None,
                     instance: str | None = None, headers: dict[str, str] | None = None,
                     **extra: Any) -> JSONResponse:
    body = {"type": f"urn:dare:problem:{code}", "title": title or HTTPStatus(status).phrase,
            "status": status, "code": code, "detail": detail}
    if instance:
        body["instance"] = instance
    body.update(extra)
    return JSONResponse(body, status_code=status, media_type=PROBLEM_MEDIA_TYPE, headers=headers)


_HTTP_CODES = {
    404: ("not_found", "no such route: see /docs for the API"),
    405: ("method_not_allowed", "this route does not take that method: see /docs"),
}


def install(app: FastAPI) -> None:
    @app.exception_handler(ProblemError)
    async def _problem(request: Request, exc: ProblemError) -> JSONResponse:
        return problem_response(exc.status, exc.code, exc.detail, title=exc.title,
                                instance=request.url.path, headers=exc.headers, **exc.extra)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"loc": [str(x) for x in e.get("loc", ())], "msg": e.get("msg", "")}
                  for e in exc.errors()]
        first = errors[0] if errors else {"loc": [], "msg": "invalid request"}
        where = ".".join(first["loc"])
        return problem_response(422, "invalid_request", f"{where}: {first['msg']}",
                                instance=request.url.path, errors=errors)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code, detail = _HTTP_CODES.get(exc.status_code, ("http_error", str(exc.detail)))
        return problem_response(exc.status_code, code, detail, instance=request.url.path,
                                headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return problem_response(500, "internal_error",
                                "the server failed unexpectedly; it has been logged. Retry, and "
                                "report it with the time of the request if it persists.",
                                instance=request.url.path)


PROBLEM_SCHEMA = {
    "type": "object",
    "required": ["type", "title", "status", "code", "detail"],
    "properties": {
        "type": {"type": "string", "example": "urn:dare:problem:invalid_config"},
        "title": {"type": "string", "example": "Unprocessable Entity"},
        "status": {"type": "integer", "example": 422},
        "code": {"type": "string", "example": "invalid_config"},
        "detail": {"type": "string",
                   "example": "config field 'q': Input should be less than or equal to 1. "
                              "Fix: see the configuration table in the README"},
        "instance": {"type": "string", "example": "/v1/jobs"},
    },
}


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses=`` entries for the problem statuses a route can answer."""
    return {s: {"description": HTTPStatus(s).phrase,
                "content": {PROBLEM_MEDIA_TYPE: {"schema": PROBLEM_SCHEMA}}} for s in statuses}
