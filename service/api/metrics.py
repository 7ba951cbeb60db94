"""Prometheus metrics, served as text at ``GET /metrics``.

Job, stage and webhook figures are read from the database at scrape time by
:class:`DatabaseCollector`, so every API replica answers the same numbers whoever did the work
(workers expose nothing themselves). Upload counters are per API process (they count what this
process received); with several ``dare api --workers`` processes each scrape sees one of them.

Labels are bounded: statuses, stage names, upload fields and rejection codes come from fixed
lists ("other" catches the rest); never job ids or tenant names.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator
from datetime import datetime

from prometheus_client import CollectorRegistry, Counter, disable_created_metrics
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from sqlalchemy import case, func, select
from sqlalchemy.orm import Session, sessionmaker

from service.states import JobStatus, StageStatus, utcnow
from service.store.models import DeliveryStatus, Job, StageRun
from worker.engine.config import STAGES  # no torch: the config module is pydantic only

log = logging.getLogger("dare.metrics")

# Stages run from seconds (validate on a toy model) to hours (compare on a GPU).
STAGE_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400)
UPLOAD_FIELDS = ("model", "history", "data")
# The codes POST /v1/jobs answers with most (README's list and the submission-time inspection's
# commonest); any other code counts as "other", so the label set stays fixed.
REJECTION_CODES = (
    "upload_too_large", "unsupported_media_type", "invalid_multipart", "incomplete_upload",
    "missing_field", "duplicate_field", "unknown_field", "invalid_field", "unsupported_file_type",
    "invalid_config", "conflicting_data", "conflicting_dataset", "unknown_dataset",
    "invalid_model", "invalid_history", "invalid_data", "invalid_webhook_url",
    "input_unreadable", "unsafe_archive", "zip_bomb", "unsafe_model", "unsafe_checkpoint",
    "unsupported_model", "model_not_finite", "history_mismatch", "data_model_mismatch",
    "data_empty_split", "too_many_active_jobs", "idempotency_key_reused",
    "too_many_submissions_in_flight", "upload_too_slow", "staging_full", "other")

# No "_created" series next to every counter: they double the output and no dashboard reads them.
disable_created_metrics()

UPLOAD_BYTES = Counter("dare_upload_bytes", "Bytes of uploaded files received, by form field",
                       ["field"], registry=None)
UPLOAD_REJECTIONS = Counter("dare_upload_rejections",
                            "Submissions refused with a 4xx, by problem code", ["code"],
                            registry=None)
for _f in UPLOAD_FIELDS:
    UPLOAD_BYTES.labels(_f)
for _c in REJECTION_CODES:
    UPLOAD_REJECTIONS.labels(_c)


def count_upload_bytes(field: str, n: int) -> None:
    if field in UPLOAD_FIELDS:
        UPLOAD_BYTES.labels(field).inc(n)


def count_rejection(code: str) -> None:
    UPLOAD_REJECTIONS.labels(code if code in REJECTION_CODES else "other").inc()


class DatabaseCollector(Collector):
    """Reads jobs, stage runs and the webhook outbox at each scrape (a handful of aggregate
    queries; the stage histogram is computed in SQL, not by loading rows)."""

    def __init__(self, factory: sessionmaker[Session]) -> None:
        self.factory = factory

    def describe(self) -> list[Metric]:
        return []  # nothing to query at registration

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("dare_database_up", "1 if this scrape could read the database")
        try:
            with self.factory() as s:
                families = [*self._jobs(s), self._stages(s), *self._webhooks(s)]
        except Exception:
            log.warning("metrics: cannot read the database", exc_info=True)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from families

    def _jobs(self, s: Session) -> list[Metric]:
        counts = {JobStatus(st).value: n for st, n in
                  s.execute(select(Job.status, func.count()).group_by(Job.status)).all()}
        jobs = GaugeMetricFamily("dare_jobs", "Jobs by status", labels=["status"])
        for st in JobStatus:
            jobs.add_metric([st.value], counts.get(st.value, 0))
        oldest: datetime | None = s.scalar(select(func.min(Job.created_at))
                                           .where(Job.status == JobStatus.queued))
        age = GaugeMetricFamily("dare_oldest_queued_job_age_seconds",
                                "Age of the oldest job still queued (0 when none is)")
        age.add_metric([], max(0.0, (utcnow() - oldest).total_seconds()) if oldest else 0.0)
        return [jobs, age]

    def _stages(self, s: Session) -> Metric:
        d = StageRun.duration_s
        cols = [func.sum(case((d <= b, 1), else_=0)) for b in STAGE_BUCKETS]
        rows = s.execute(select(StageRun.name, func.count(), func.coalesce(func.sum(d), 0.0), *cols)
                         .where(StageRun.status == StageStatus.succeeded, d.is_not(None),
                                StageRun.name.in_(STAGES))
                         .group_by(StageRun.name)).all()
        h = HistogramMetricFamily("dare_stage_duration_seconds",
                                  "Duration of finished (succeeded) stage runs", labels=["stage"])
        for name, count, total, *le in rows:
            buckets = [(str(float(b)), int(n or 0)) for b, n in zip(STAGE_BUCKETS, le)]
            h.add_metric([name], buckets + [("+Inf", int(count))], float(total))
        return h

    def _webhooks(self, s: Session) -> list[Metric]:
        from service.jobs.webhooks import delivery_counts

        counts = delivery_counts(s)
        total = CounterMetricFamily("dare_webhook_deliveries",
                                    "Webhook messages that reached an end, by result",
                                    labels=["result"])
        for st in (DeliveryStatus.delivered, DeliveryStatus.failed):
            total.add_metric([st.value], counts.get(st.value, 0))
        pending = GaugeMetricFamily("dare_webhook_deliveries_pending",
                                    "Webhook messages waiting to be sent or retried")
        pending.add_metric([], counts.get(DeliveryStatus.pending.value, 0))
        return [total, pending]


def registry_for(factory: sessionmaker[Session]) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DatabaseCollector(factory))
    registry.register(UPLOAD_BYTES)
    registry.register(UPLOAD_REJECTIONS)
    return registry
