"""MLflow: each succeeded job becomes a run on a real ``mlflow server`` (SQLite backend, local
artifact root) started here; a server that is down does not fail the job, it is retried and the
outcome is a job event."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from datetime import datetime
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from service.jobs import mlflow_log
from service.jobs.pipeline import Pipeline
from service.store.models import JobEvent

from . import fake_engine
from .conftest import free_port

import mlflow  # noqa: E402  (the dev extra includes dare-service[mlflow]; a missing one fails here)


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    exe = shutil.which("mlflow", path=str(Path(sys.executable).parent)) or "mlflow"
    log = (root / "server.log").open("wb")
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen([exe, "server", "--host", "127.0.0.1", "--port", str(port),
                             "--workers", "1",
                             "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
                             "--artifacts-destination", str(root / "artifacts")],
                            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail("mlflow server did not start:\n" + (root / "server.log").read_text()[-3000:])
        time.sleep(0.5)
    yield url
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


def _drive(pipeline: Pipeline, job_id: str) -> None:
    stage = "validate"
    while stage:
        stage = pipeline.run(job_id, stage, task_id=str(uuid.uuid4()))


def _events(client, job_id: str) -> list[JobEvent]:
    with client.app.state.ctx.factory() as s:
        return list(s.scalars(select(JobEvent).where(JobEvent.job_id == uuid.UUID(job_id))
                              .order_by(JobEvent.id)))


def _pipeline(client, **overrides) -> Pipeline:
    ctx = client.app.state.ctx
    return Pipeline(ctx.settings.model_copy(update=overrides), ctx.factory, ctx.store,
                    runner=fake_engine.run_stage)


def test_a_succeeded_job_is_a_run_with_its_config_figures_and_artifacts(client, submit,
                                                                         mlflow_server):
    config = {"seed": 11, "tune": {"epochs": 2}, "mlflow": {"experiment": "hardening-ci"}}
    job_id = submit(json.dumps(config))
    _drive(_pipeline(client, mlflow_tracking_uri=mlflow_server), job_id)
    job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "succeeded"
    logged = [e for e in _events(client, job_id) if e.kind.startswith("mlflow")]
    assert [e.kind for e in logged] == ["mlflow_logged"], [(e.kind, e.data) for e in logged]

    tracking = mlflow.MlflowClient(tracking_uri=mlflow_server)
    exp = tracking.get_experiment_by_name("hardening-ci")
    runs = tracking.search_runs([exp.experiment_id], f"tags.`dare.job_id` = '{job_id}'")
    assert len(runs) == 1 and runs[0].info.run_id == logged[0].data["run_id"]
    run = runs[0]
    assert run.info.status == "FINISHED"
    started, finished = (datetime.fromisoformat(job[k].replace("Z", "+00:00")).timestamp()
                         for k in ("started_at", "finished_at"))
    assert abs(run.info.start_time / 1000 - started) < 0.01  # the run spans the job
    assert abs(run.info.end_time / 1000 - finished) < 0.01
    assert run.data.tags["dare.tenant"] == "t1"
    assert run.data.params["seed"] == "11" and run.data.params["tune.epochs"] == "2"
    assert run.data.params["mlflow.experiment"] == "hardening-ci"
    m = run.data.metrics
    # the stand-in engine's report (fake_engine): 0.9 -> 0.88 clean, fgsm 0.2 / 0.5 / 0.3
    assert m["clean_accuracy.original"] == 0.9 and m["clean_accuracy.hardened"] == 0.88
    assert (m["attack.fgsm.original_accuracy"], m["attack.fgsm.transfer_er"],
            m["attack.fgsm.adaptive_accuracy"]) == (0.2, 0.5, 0.3)
    durations = job["result"]["stage_durations_s"]
    assert len(durations) == 6 and all(m[f"stage_seconds.{s}"] == v for s, v in durations.items())
    names = {a.path for a in tracking.list_artifacts(run.info.run_id)}
    assert names == {"report.html", "report.json", "hardened.onnx"}
    got = Path(tracking.download_artifacts(run.info.run_id, "report.json",
                                           str(Path(client.app.state.ctx.settings.home))))
    assert json.loads(got.read_text())["clean_accuracy"]["hardened"] == 0.88


def test_a_tracking_server_that_is_down_does_not_fail_the_job(client, submit):
    job_id = submit(json.dumps({"seed": 12}))
    pipeline = _pipeline(client, mlflow_tracking_uri=f"http://127.0.0.1:{free_port()}",
                         mlflow_attempts=3, mlflow_backoff_s=0.01, mlflow_timeout_s=2)
    _drive(pipeline, job_id)
    assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "succeeded"
    failed = [e for e in _events(client, job_id) if e.kind.startswith("mlflow")]
    assert [(e.kind, e.data["attempts"]) for e in failed] == [("mlflow_failed", 3)]
    assert "127.0.0.1" not in json.dumps(failed[0].data)  # the error's class, not its text


def test_retries_back_off_then_give_up(client, submit, monkeypatch):
    job_id = submit(json.dumps({"seed": 13}))
    _drive(_pipeline(client), job_id)  # no MLflow configured: nothing logged
    assert not [e for e in _events(client, job_id) if e.kind.startswith("mlflow")]
    calls, slept = [], []

    def boom(*a, **kw):
        calls.append(1)
        raise ConnectionError("server down")

    monkeypatch.setattr(mlflow_log, "_log_run", boom)
    ctx = client.app.state.ctx
    settings = ctx.settings.model_copy(update={"mlflow_tracking_uri": "http://x.invalid",
                                                "mlflow_attempts": 4, "mlflow_backoff_s": 1.5})
    mlflow_log.log_job(settings, ctx.factory, uuid.UUID(job_id), Path("/nonexistent"),
                       sleep=slept.append)
    assert len(calls) == 4 and slept == [1.5, 3.0, 6.0]
    kinds = [(e.kind, e.data) for e in _events(client, job_id) if e.kind.startswith("mlflow")]
    assert kinds == [("mlflow_failed", {"attempts": 4, "error": "ConnectionError"})]


def test_a_job_that_opts_out_is_not_logged(client, submit, monkeypatch):
    job_id = submit(json.dumps({"seed": 14, "mlflow": False}))
    monkeypatch.setattr(mlflow_log, "_log_run", lambda *a, **kw: pytest.fail("logged"))
    _drive(_pipeline(client, mlflow_tracking_uri="http://x.invalid"), job_id)
    assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "succeeded"
    assert not [e for e in _events(client, job_id) if e.kind.startswith("mlflow")]


def test_params_and_metrics_are_flattened_for_mlflow():
    assert mlflow_log.flatten({"a": {"b": 1, "c": [1, 2]}, "d": "x" * 600}) == {
        "a.b": "1", "a.c": "[1, 2]", "d": "x" * 497 + "..."}
    report = {"clean_accuracy": {"original": 0.9, "hardened": 0.8, "drop": 0.1, "budget": 0.1},
              "attacks": {"pgd": {"original_accuracy": 0.1, "transfer_er": 0.4,
                                  "adaptive_accuracy": None}}}
    assert mlflow_log.report_metrics(report, {"tune": 3.5}) == {
        "clean_accuracy.original": 0.9, "clean_accuracy.hardened": 0.8,
        "clean_accuracy.drop": 0.1, "attack.pgd.original_accuracy": 0.1,
        "attack.pgd.transfer_er": 0.4, "stage_seconds.tune": 3.5}
