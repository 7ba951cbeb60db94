"""Structured logs: one JSON object per line, carrying the job id and stage the line is about.

The context comes from :mod:`contextvars`, set by ``Pipeline.run`` (job_id, stage) in the worker
and by :class:`RequestContextMiddleware` (request_id, job_id when the path names one) in the API,
so any logger anywhere below them (SQLAlchemy, httpx, our own) gets the fields without passing
them along. ``DARE_LOG_FORMAT=json|text`` picks the format; ``dare api``, ``dare serve`` and the
Celery worker all call :func:`configure_logging` (uvicorn gets :func:`uvicorn_log_config`, so its
own access and error lines are JSON too, also in ``--workers`` child processes).
"""
from __future__ import annotations

import itertools
import json
import logging
import logging.config
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import datetime, timezone
from typing import Any

job_id_var: ContextVar[str | None] = ContextVar("dare_job_id", default=None)
stage_var: ContextVar[str | None] = ContextVar("dare_stage", default=None)
request_id_var: ContextVar[str | None] = ContextVar("dare_request_id", default=None)

_CONTEXT = (("job_id", job_id_var), ("stage", stage_var), ("request_id", request_id_var))
_JOB_PATH = re.compile(r"^/v1/jobs/([0-9a-fA-F-]{32,36})(?:/|$)")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
# A made-up request id is 32 hex digits like a uuid4's: 16 random per process (drawn again in
# a forked child, so --workers processes differ), then a counter: unique without a random draw
# and a UUID object per request.
_rid_prefix = os.urandom(8).hex()
_rid_counter = itertools.count()


def _new_rid_prefix() -> None:
    global _rid_prefix
    _rid_prefix = os.urandom(8).hex()


os.register_at_fork(after_in_child=_new_rid_prefix)
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s%(dare_context)s %(message)s"


@contextmanager
def log_context(*, job_id: object = None, stage: str | None = None) -> Iterator[None]:
    """Tag every log line inside the block (and in threads started with a copied context)."""
    tokens = []
    if job_id is not None:
        tokens.append((job_id_var, job_id_var.set(str(job_id))))
    if stage is not None:
        tokens.append((stage_var, stage_var.set(stage)))
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)


def current_context() -> dict[str, str]:
    return {name: v for name, var in _CONTEXT if (v := var.get()) is not None}


class JsonFormatter(logging.Formatter):
    """``{"ts", "level", "logger", "msg", "job_id"?, "stage"?, "request_id"?, "exc"?}``."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc)
                          .isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        out.update(current_context())
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exc"] = record.exc_text
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """The plain format for people at a terminal, with the same context in brackets."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        ctx = " ".join(f"{k}={v}" for k, v in current_context().items())
        record.dare_context = f" [{ctx}]" if ctx else ""
        return super().format(record)


def _formatter_ref(fmt: str) -> dict[str, str]:
    cls = JsonFormatter if fmt == "json" else TextFormatter
    return {"()": f"{cls.__module__}.{cls.__qualname__}"}


def logging_dict(fmt: str = "json", level: str | int = "INFO") -> dict[str, Any]:
    """A ``logging.config.dictConfig`` for the root logger and uvicorn's loggers, all on stderr."""
    level = logging.getLevelName(level.upper()) if isinstance(level, str) else level
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"dare": _formatter_ref(fmt)},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "dare",
                                "stream": "ext://sys.stderr"}},
        "root": {"handlers": ["stderr"], "level": level},
        # uvicorn's loggers propagate to the root handler instead of keeping their own.
        "loggers": {name: {"handlers": [], "level": level, "propagate": True}
                    for name in ("uvicorn", "uvicorn.error", "uvicorn.access")},
    }


def configure_logging(fmt: str = "json", level: str | int = "INFO") -> None:
    logging.config.dictConfig(logging_dict(fmt, level))
    logging.captureWarnings(True)


def uvicorn_log_config(fmt: str = "json", level: str | int = "INFO") -> dict[str, Any]:
    """For ``uvicorn.run(log_config=...)``: uvicorn applies it in every worker process it starts."""
    return logging_dict(fmt, level)


def new_request_id() -> str:
    return f"{_rid_prefix}{next(_rid_counter) & 0xFFFFFFFFFFFFFFFF:016x}"


class RequestContextMiddleware:
    """Pure ASGI (streams pass through untouched): a request id per request, taken from a sane
    ``X-Request-ID`` header or made up, echoed back, and the job id when the path names one."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = None
        for k, v in scope.get("headers") or ():
            if k == b"x-request-id":
                candidate = v.decode("latin-1")
                rid = candidate if _REQUEST_ID.match(candidate) else None
                break
        rid = rid or new_request_id()
        m = _JOB_PATH.match(scope.get("path", ""))
        t_req = request_id_var.set(rid)
        t_job = job_id_var.set(m.group(1).lower()) if m else None

        async def send_with_id(message: dict) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", rid.encode())]
            await send(message)

        await self.app(scope, receive, send_with_id)
        # Reset on success only: an unhandled error is logged by Starlette's outermost
        # middleware, outside this one, and its line should still name the request. Nothing
        # leaks either way: every request runs in a task of its own, with its own context.
        if t_job is not None:
            job_id_var.reset(t_job)
        request_id_var.reset(t_req)
