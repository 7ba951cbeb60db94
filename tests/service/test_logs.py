"""JSON log lines that carry the job id and stage: the formatter and context in-process, then a
real `dare api` (uvicorn) and a real Celery worker, whose output is parsed line by line."""
from __future__ import annotations

import io
import json
import logging
import time
import uuid

import httpx
import pytest

from service.cli.main import worker_argv
from service.jobs.pipeline import Pipeline
from service.logs import JsonFormatter, RequestContextMiddleware, log_context

from . import fake_engine
from .conftest import (
    REDIS_URL,
    Proc,
    dare_cmd,
    free_port,
    make_key,
    service_env,
    submit_files,
    wait_http,
)


@pytest.fixture
def captured():
    """JSON lines of every ``dare.*`` logger, as the services write them."""
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("dare")
    old = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield lambda: [json.loads(line) for line in buf.getvalue().splitlines()]
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)


def test_json_line_has_context_and_exception(captured):
    log = logging.getLogger("dare.test")
    log.info("outside")
    with log_context(job_id="j-1", stage="mine"):
        try:
            raise ValueError("bad \"quote\"\nnewline")
        except ValueError:
            log.exception("failed: %s", 42)
    log.warning("after")
    outside, failed, after = captured()
    assert outside["msg"] == "outside" and "job_id" not in outside and outside["level"] == "INFO"
    assert failed["msg"] == "failed: 42" and failed["job_id"] == "j-1" and failed["stage"] == "mine"
    assert failed["logger"] == "dare.test" and failed["level"] == "ERROR"
    assert "ValueError: bad" in failed["exc"] and failed["ts"].endswith("+00:00")
    assert "job_id" not in after and "stage" not in after  # the context was reset


def test_pipeline_lines_carry_job_id_and_stage(client, subject_bytes, captured):
    ctx = client.app.state.ctx
    config = json.dumps({"seed": fake_engine.FAIL_BUG_SEED})
    files, data = submit_files(subject_bytes, config=config)
    r = client.post("/v1/jobs", files=files, data=data)
    jid = r.json()["id"]
    pipeline = Pipeline(ctx.settings, ctx.factory, ctx.store, runner=fake_engine.run_stage)
    stage = "validate"
    while stage:
        stage = pipeline.run(jid, stage, task_id=str(uuid.uuid4()))
    lines = [x for x in captured() if x.get("job_id") == jid]
    assert {(x["stage"], x["logger"]) for x in lines} >= {("validate", "dare.pipeline"),
                                                          ("slice", "dare.pipeline")}
    crash = [x for x in lines if "exc" in x]  # slice raised a bug: its traceback is in one line
    assert crash and crash[0]["stage"] == "slice" and fake_engine.SECRET in crash[0]["exc"]


def test_api_request_context(client, subject_bytes, captured):
    """The middleware's request id is on the response and on lines logged while serving it."""
    files, data = submit_files(subject_bytes)
    jid = client.post("/v1/jobs", files=files, data=data).json()["id"]
    seen: list[dict] = []

    async def app(scope, receive, send):  # noqa: ANN001
        logging.getLogger("dare.api").info("inside")
        seen.extend(captured())
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    from starlette.testclient import TestClient

    c = TestClient(RequestContextMiddleware(app))
    r = c.get(f"/v1/jobs/{jid}/events", headers={"X-Request-ID": "req-123"})
    assert r.headers["x-request-id"] == "req-123"
    assert seen[-1]["request_id"] == "req-123" and seen[-1]["job_id"] == jid
    r = c.get("/healthz", headers={"X-Request-ID": "bad id with spaces"})
    assert len(r.headers["x-request-id"]) == 32  # made up instead
    assert "job_id" not in seen[-1]
    assert client.get(f"/v1/jobs/{jid}").headers["x-request-id"]  # the real app has it too


def test_unhandled_error_is_logged_with_the_request_id(settings, dispatcher, captured):
    from fastapi.testclient import TestClient

    from service.api.app import create_app

    app = create_app(settings, dispatcher=dispatcher)

    @app.get("/boom")
    def boom() -> None:
        raise RuntimeError("kaboom")

    try:
        with TestClient(app, raise_server_exceptions=False) as c:
            r = c.get("/boom", headers={"X-Request-ID": "req-boom"})
    finally:
        app.state.ctx.engine.dispose()
    assert r.status_code == 500 and "kaboom" not in r.text
    (line,) = [x for x in captured() if "unhandled error" in x["msg"]]
    assert line["request_id"] == "req-boom" and "RuntimeError: kaboom" in line["exc"]


def test_api_and_worker_processes_write_json_lines(pg_url, clean_db, tmp_path, subject_bytes):
    import redis

    redis.Redis.from_url(REDIS_URL).flushdb()
    port = free_port()
    env = service_env(DARE_HOME=str(tmp_path), DARE_DATABASE_URL=clean_db,
                      DARE_BROKER_URL=REDIS_URL,
                      DARE_STAGE_RUNNER="tests.service.fake_engine:run_stage",
                      DARE_SUBMIT_INSPECTION="off", DARE_LOG_FORMAT="json",
                      DARE_RECONCILE_INTERVAL_S="0", DARE_WEBHOOK_POLL_INTERVAL_S="0")
    from sqlalchemy.orm import sessionmaker

    from service.store.db import engine_for

    key = make_key(sessionmaker(engine_for(clean_db)), "t1")
    api = Proc("api", dare_cmd("api", "--port", str(port)), env, tmp_path)
    worker = Proc("worker", worker_argv(loglevel="INFO"), env, tmp_path)
    base = f"http://127.0.0.1:{port}"
    auth = {"Authorization": f"Bearer {key}"}
    try:
        wait_http(f"{base}/healthz", api)
        files, data = submit_files(subject_bytes)
        r = httpx.post(f"{base}/v1/jobs", files=files, data=data, headers=auth, timeout=30)
        assert r.status_code == 202, r.text
        jid = r.json()["id"]
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            job = httpx.get(f"{base}/v1/jobs/{jid}", headers={**auth, "X-Request-ID": "poll-1"},
                            timeout=10).json()
            if job["status"] in ("succeeded", "failed"):
                break
            time.sleep(0.3)
        assert job["status"] == "succeeded", (job, worker.tail())
    finally:
        worker.stop()
        api.stop()

    def json_lines(proc: Proc) -> list[dict]:
        out = []
        for line in proc.log.read_text().splitlines():
            # Celery's signal handlers print "worker: Warm shutdown (MainProcess)" to the
            # console themselves (not through logging, so no format applies to it).
            if line.strip() and not line.startswith("worker: "):
                try:
                    out.append(json.loads(line))
                except ValueError:
                    pytest.fail(f"{proc.name} wrote a line that is not JSON: {line!r}")
        return out

    wlines = json_lines(worker)
    stages = {x.get("stage") for x in wlines
              if x.get("job_id") == jid and x["logger"] == "dare.pipeline"}
    assert stages == {"validate", "slice", "mine", "tune", "export", "evaluate"}, wlines[-20:]
    alines = json_lines(api)
    access = [x for x in alines
              if x["logger"] == "uvicorn.access" and x.get("request_id") == "poll-1"]
    assert access and all(x["job_id"] == jid for x in access), alines[-20:]
    assert all({"ts", "level", "logger", "msg"} <= set(x) for x in wlines + alines)
