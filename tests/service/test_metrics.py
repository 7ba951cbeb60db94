"""``GET /metrics``: scraped after real jobs ran through the pipeline (stand-in engine), parsed
with prometheus_client's own parser, figures checked against what happened."""
from __future__ import annotations

import json
import re
import uuid
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select, update

from service.jobs.pipeline import Pipeline
from service.jobs.webhooks import deliver_due
from service.states import utcnow
from service.store.models import Job, StageRun

from . import fake_engine
from .conftest import submit_files
from .test_webhooks import Receiver

UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
ALLOWED_LABELS = {"status", "stage", "result", "field", "code", "le"}


@pytest.fixture
def settings(settings):
    return settings.model_copy(update={"webhook_allow_private": True, "webhook_poll_interval_s": 0})


def scrape(app) -> dict[str, dict[tuple, float]]:  # noqa: ANN001
    """{sample name: {sorted label items: value}}, scraped without any credentials."""
    r = TestClient(app).get("/metrics")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    out: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            assert set(s.labels) <= ALLOWED_LABELS, s
            assert not any(UUID_RE.search(v) for v in s.labels.values()), s
            assert "t1" not in s.labels.values()
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def value(m: dict, name: str, **labels: str) -> float:
    return m[name][tuple(sorted(labels.items()))]


def test_metrics_after_some_jobs(client, subject_bytes):
    ctx = client.app.state.ctx
    before = scrape(client.app)
    pipeline = Pipeline(ctx.settings, ctx.factory, ctx.store, runner=fake_engine.run_stage)
    receiver = Receiver()

    def submit(config: dict) -> str:
        files, data = submit_files(subject_bytes, config=json.dumps(config))
        r = client.post("/v1/jobs", files=files, data=data)
        assert r.status_code == 202, r.text
        return r.json()["id"]

    def run(jid: str) -> None:
        stage = "validate"
        while stage:
            stage = pipeline.run(jid, stage, task_id=str(uuid.uuid4()))

    try:
        ok = submit({"webhook_url": receiver.url})
        bad = submit({"seed": fake_engine.FAIL_INPUT_SEED})  # fails in mine
        queued = submit({})
        run(ok)
        run(bad)
        deliver_due(ctx.settings, ctx.factory)
    finally:
        receiver.close()
    assert len(receiver.requests) == 1
    # Two refused uploads: the wrong media type, and a form without its history.
    assert client.post("/v1/jobs", content=b"{}", headers={"content-type": "application/json"}
                       ).status_code == 415
    files, data = submit_files(subject_bytes)
    del files["history"]
    assert client.post("/v1/jobs", files=files, data=data).json()["code"] == "missing_field"
    with ctx.factory.begin() as s:  # make the queued job two minutes old
        s.execute(update(Job).where(Job.id == uuid.UUID(queued))
                  .values(created_at=utcnow() - timedelta(seconds=120)))

    m = scrape(client.app)
    assert value(m, "dare_database_up") == 1
    jobs = {dict(k)["status"]: v for k, v in m["dare_jobs"].items()}
    assert jobs == {"queued": 1, "running": 0, "cancelling": 0, "succeeded": 1, "failed": 1,
                    "cancelled": 0}
    assert 119 <= value(m, "dare_oldest_queued_job_age_seconds") < 180

    with ctx.factory() as s:
        runs = s.execute(select(StageRun.name, StageRun.duration_s)
                         .where(StageRun.duration_s.is_not(None))).all()
    counts = {dict(k)["stage"]: v for k, v in m["dare_stage_duration_seconds_count"].items()}
    assert counts == {"validate": 2, "slice": 2, "mine": 1, "tune": 1, "export": 1, "evaluate": 1}
    sums = {dict(k)["stage"]: v for k, v in m["dare_stage_duration_seconds_sum"].items()}
    for stage in counts:
        assert sums[stage] == pytest.approx(sum(d for n, d in runs if n == stage), abs=1e-6)
        buckets = sorted((float(dict(k)["le"]), v)
                         for k, v in m["dare_stage_duration_seconds_bucket"].items()
                         if dict(k)["stage"] == stage)
        assert [v for _, v in buckets] == sorted(v for _, v in buckets)  # cumulative
        assert buckets[-1] == (float("inf"), counts[stage])
        assert dict(buckets)[1.0] == counts[stage]  # the stand-in's stages take well under 1 s

    assert value(m, "dare_webhook_deliveries_total", result="delivered") == 1
    assert value(m, "dare_webhook_deliveries_total", result="failed") == 0
    assert value(m, "dare_webhook_deliveries_pending") == 0

    def delta(name: str, **labels: str) -> float:
        return value(m, name, **labels) - value(before, name, **labels)

    # Three accepted submissions and one refused (the one without history) sent a model.
    assert delta("dare_upload_bytes_total", field="model") == 4 * len(subject_bytes["model"])
    assert delta("dare_upload_bytes_total", field="history") == 3 * len(subject_bytes["history"])
    assert delta("dare_upload_bytes_total", field="data") == 0  # the embedded dataset was used
    assert delta("dare_upload_rejections_total", code="unsupported_media_type") == 1
    assert delta("dare_upload_rejections_total", code="missing_field") == 1
    assert delta("dare_upload_rejections_total", code="other") == 0


def test_metrics_can_be_switched_off(settings, dispatcher):
    from service.api.app import create_app

    app = create_app(settings.model_copy(update={"metrics_enabled": False}), dispatcher=dispatcher)
    try:
        r = TestClient(app).get("/metrics")
        assert r.status_code == 404 and r.json()["code"] == "not_found"
    finally:
        app.state.ctx.engine.dispose()


def test_database_down_is_a_metric_not_an_error(settings, dispatcher):
    from service.api.app import create_app

    down = settings.model_copy(update={"database_url": "postgresql+psycopg://nobody@127.0.0.1:1/x"})
    app = create_app(down, dispatcher=dispatcher, check_db_schema=False)
    try:
        r = TestClient(app).get("/metrics")
        assert r.status_code == 200
        fams = {f.name: f for f in text_string_to_metric_families(r.text)}
        assert fams["dare_database_up"].samples[0].value == 0
        assert "dare_upload_bytes" in fams  # the process's own counters still answer
    finally:
        app.state.ctx.engine.dispose()
