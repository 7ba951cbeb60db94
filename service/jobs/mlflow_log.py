"""Each succeeded job as an MLflow run, where ML teams keep their experiments.

With ``DARE_MLFLOW_TRACKING_URI`` set (and MLflow installed: the extra ``dare-service[mlflow]``,
see the README), the worker that finishes a job logs one run: the job's config as
params (flattened, ``tune.lr``), clean and robust accuracies (per attack: the original's, the
hardened model's transfer and adaptive) and stage times as metrics, ``report.html``,
``report.json`` and ``hardened.onnx`` as artifacts, tagged with the job id and tenant. A job's
config picks the experiment and run name (``"mlflow": {"experiment": ...}``) or opts out
(``"mlflow": false``).

The job has already succeeded when this runs, and nothing here can undo that: a tracking server
that is down or refuses is retried ``DARE_MLFLOW_ATTEMPTS`` times with a doubling delay, and the
outcome is a job event, ``mlflow_logged`` (run id, experiment) or ``mlflow_failed`` (attempts and
the error's class, not its text, which may hold the server's URL or credentials).
"""
from __future__ import annotations

import json
import logging
import os
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from service.jobs import records as jobs
from service.settings import Settings
from service.store.db import session_scope
from service.store.models import Tenant

log = logging.getLogger(__name__)

ARTIFACTS = ("report.html", "report.json", "hardened.onnx")
MAX_PARAM_VALUE = 500  # MLflow's limit on one param's value (characters)


def flatten(obj: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"tune": {"lr": 0.01}}`` -> ``{"tune.lr": "0.01"}``; lists as JSON, long values cut."""
    out: dict[str, str] = {}
    for k, v in obj.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
            continue
        text = json.dumps(v) if isinstance(v, (list, tuple)) else str(v)
        out[key] = text if len(text) <= MAX_PARAM_VALUE else text[:MAX_PARAM_VALUE - 3] + "..."
    return out


def report_metrics(report: Mapping[str, Any], stage_durations: Mapping[str, float]
                   ) -> dict[str, float]:
    """The figures a dashboard plots, named ``clean_accuracy.hardened``,
    ``attack.pgd.adaptive_accuracy``, ``stage_seconds.tune`` and so on."""
    out: dict[str, float] = {}
    clean = report.get("clean_accuracy") or {}
    for k in ("original", "hardened", "drop"):
        if isinstance(clean.get(k), (int, float)):
            out[f"clean_accuracy.{k}"] = float(clean[k])
    for attack, r in (report.get("attacks") or {}).items():
        for k in ("original_accuracy", "transfer_er", "adaptive_accuracy"):
            if isinstance(r, Mapping) and isinstance(r.get(k), (int, float)):
                out[f"attack.{attack}.{k}"] = float(r[k])
    for stage, seconds in stage_durations.items():
        if isinstance(seconds, (int, float)):
            out[f"stage_seconds.{stage}"] = float(seconds)
    return out


def wanted(settings: Settings, config: Mapping[str, Any]) -> bool:
    return bool(settings.mlflow_tracking_uri) and config.get("mlflow", True) is not False


def log_job(settings: Settings, factory: sessionmaker[Session], job_id: uuid.UUID,
            artifacts_dir: Path, *, sleep: Callable[[float], None] = time.sleep) -> None:
    """Log the succeeded job ``job_id`` (its artifacts are in ``artifacts_dir``); never raises."""
    if not settings.mlflow_tracking_uri:  # off: not even a read of the job (every job ends here)
        return
    try:
        with session_scope(factory) as s:
            job = jobs.get_job(s, job_id)
            config = dict(job.config or {})
            if not wanted(settings, config):
                return
            tenant = s.scalar(select(Tenant.name).where(Tenant.id == job.tenant_id))
            durations = dict((job.result or {}).get("stage_durations_s") or {})
            # the run spans the job, not the seconds it takes to log it
            span = tuple(int(t.timestamp() * 1000) if t else None
                         for t in (job.started_at, job.finished_at))
    except Exception:  # the job row itself: nothing to record the outcome on
        log.exception("job %s: MLflow logging skipped", job_id)
        return
    options = config.get("mlflow") if isinstance(config.get("mlflow"), dict) else {}
    experiment = options.get("experiment") or settings.mlflow_experiment
    run_name = options.get("run_name") or f"dare-{str(job_id)[:8]}"
    error = None
    for attempt in range(1, settings.mlflow_attempts + 1):
        try:
            run_id = _log_run(settings, job_id, tenant, config, durations, artifacts_dir,
                              experiment, run_name, span)
        except Exception as e:  # noqa: BLE001 (any failure of a third-party server is retried)
            error = e
            log.warning("job %s: MLflow attempt %d/%d failed: %s", job_id, attempt,
                        settings.mlflow_attempts, e)
            if attempt < settings.mlflow_attempts:
                sleep(settings.mlflow_backoff_s * 2 ** (attempt - 1))
            continue
        _event(factory, job_id, "mlflow_logged",
               {"run_id": run_id, "experiment": experiment, "attempts": attempt})
        return
    _event(factory, job_id, "mlflow_failed",
           {"attempts": settings.mlflow_attempts, "error": type(error).__name__})


def _event(factory: sessionmaker[Session], job_id: uuid.UUID, kind: str, data: dict) -> None:
    try:
        with session_scope(factory) as s:
            jobs.add_event(s, job_id, kind, None, data)
    except Exception:
        log.exception("job %s: could not record %s", job_id, kind)


def _client(settings: Settings):  # noqa: ANN202 (mlflow.MlflowClient)
    # MLflow's own HTTP retries (7, with backoff: minutes against a dead server) would hold the
    # worker; our attempts above are the retries. Set before mlflow reads them.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(int(settings.mlflow_timeout_s)))
    try:
        from mlflow import MlflowClient
    except ImportError as e:
        raise MlflowMissing("mlflow is not installed: pip install 'dare-service[mlflow]'") from e
    return MlflowClient(tracking_uri=settings.mlflow_tracking_uri)


class MlflowMissing(RuntimeError):
    pass


def _log_run(settings: Settings, job_id: uuid.UUID, tenant: str | None, config: dict,
             durations: dict, artifacts_dir: Path, experiment: str, run_name: str,
             span: tuple[int | None, int | None] = (None, None)) -> str:
    from mlflow.entities import Metric, Param, RunTag

    client = _client(settings)
    found = client.get_experiment_by_name(experiment)
    exp_id = found.experiment_id if found is not None else client.create_experiment(experiment)
    report_path = artifacts_dir / "report.json"
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    tags = {"dare.job_id": str(job_id), "dare.tenant": tenant or "",
            "dare.method": str(config.get("method", "dare")),
            "dare.dataset": str(config.get("dataset") or "upload")}
    run = client.create_run(exp_id, start_time=span[0], run_name=run_name, tags=tags)
    run_id = run.info.run_id
    try:
        now = int(time.time() * 1000)
        params = [Param(k, v) for k, v in sorted(flatten(config).items())]
        metrics = [Metric(k, v, now, 0) for k, v in sorted(report_metrics(report, durations).items())]
        for i in range(0, max(len(params), len(metrics)), 100):  # log_batch's per-call limits
            client.log_batch(run_id, metrics=metrics[i:i + 100], params=params[i:i + 100],
                             tags=[RunTag("dare.schema_version", str(report.get("schema_version")))]
                             if i == 0 else [])
        for name in ARTIFACTS:
            if (artifacts_dir / name).is_file():
                client.log_artifact(run_id, str(artifacts_dir / name))
        client.set_terminated(run_id, "FINISHED", end_time=span[1])
    except Exception:
        # A half-logged run would look like a result on the dashboard: remove it before retrying.
        try:
            client.delete_run(run_id)
        except Exception:  # noqa: BLE001 (the server is probably the reason we are here)
            pass
        raise
    return run_id

