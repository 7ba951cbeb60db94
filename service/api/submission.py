"""Turning a received upload into a queued job: check, store, record, then enqueue.

The first stage's message is sent only after the job's row is committed, so a worker never sees a
job id the database does not know. The tenant's quota check, the Idempotency-Key check, storing
the inputs and inserting the job happen in one transaction holding the tenant's row lock
(``service.api.quotas``), so a refused or replayed submission stores nothing.
"""
from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from service.api import idempotency, quotas
from service.api.uploads import (
    ReceivedForm,
    ZipLimits,
    check_data,
    check_history,
    check_model,
    parse_config_field,
)
from service.jobs import records as jobs
from service.jobs import webhooks
from service.jobs.dispatch import BrokerUnavailable, Dispatcher
from service.settings import Settings
from service.states import JobStatus, transition
from service.store.db import session_scope
from service.store.models import Job
from service.store.storage import ArtifactStore, input_key
from worker.engine.config import EMBEDDED, stage_names
from worker.engine.errors import InputError

log = logging.getLogger("dare.api")


def embedded_datasets() -> tuple[str, ...]:
    return EMBEDDED


def validate_form(form: ReceivedForm, settings: Settings | None = None):  # noqa: ANN201
    """Cheap checks, most specific first; raise InputError naming the field and the fix.
    Returns (HardenConfig, model_format)."""
    for name in ("model", "history"):
        if name not in form.files:
            raise InputError("missing_field", f"the form field {name!r} (a file) is missing",
                             "send model (.onnx or .pt2), history (.zip) and data (.npz) or dataset")
    config = parse_config_field(form)
    has_data = "data" in form.files
    if has_data and config.dataset:
        raise InputError("conflicting_data", "both a data file and a dataset name were sent",
                         "send either data (.npz) or dataset, not both")
    if not has_data and not config.dataset:
        raise InputError("missing_field", "neither a data file nor a dataset name was sent",
                         f"send data (.npz) or dataset={'|'.join(embedded_datasets())}")
    if config.dataset and config.dataset not in embedded_datasets():
        raise InputError("unknown_dataset", f"no embedded dataset named {config.dataset!r}",
                         f"use one of: {', '.join(embedded_datasets())}, or upload data (.npz)")
    if config.webhook_url:  # SSRF: refused now, and checked again before every delivery
        webhooks.check_submitted_url(config.webhook_url, allow_private=bool(
            settings is not None and settings.webhook_allow_private))
    limits = ZipLimits.of(settings)
    model_format = check_model(form.files["model"], limits)
    check_history(form.files["history"], limits)
    if has_data:
        check_data(form.files["data"], limits)
    return config, model_format


@dataclass
class Submitted:
    job: Job
    replayed: bool = False  # an Idempotency-Key repeat: the job an earlier request created


def submit(form: ReceivedForm, *, job_id: uuid.UUID, tenant_id: uuid.UUID,
           factory: sessionmaker[Session], store: ArtifactStore, dispatcher: Dispatcher,
           max_active_jobs: int, idempotency_key: str | None = None,
           settings: Settings | None = None, validated=None) -> Submitted:  # noqa: ANN001
    """Queue the job, or answer with the one this Idempotency-Key created before. The staged
    files are moved into the store only for a new job; the caller removes the staging dir.
    ``validated``: what :func:`validate_form` returned for this form, when the caller ran it
    already (the route does, before the inspection)."""
    digest = idempotency.request_hash(form) if idempotency_key else None
    with session_scope(factory) as s:  # cheap early answers, before any validation work
        if idempotency_key:
            prior = idempotency.find(s, tenant_id, idempotency_key)
            if prior is not None:
                return Submitted(idempotency.replay(prior, idempotency_key, digest), replayed=True)
        quotas.precheck(s, tenant_id, max_active_jobs)  # checked again below, under the lock
    # The deep checks (service.api.inspection) ran before this, awaited by the route.
    config, model_format = validated or validate_form(form, settings)
    names = stage_names(config)
    stored: list[jobs.StoredInput] = []
    try:
        with session_scope(factory) as s:
            tenant = quotas.lock_tenant(s, tenant_id)
            if idempotency_key:  # re-read under the lock: a concurrent twin may have committed
                prior = idempotency.find(s, tenant_id, idempotency_key)
                if prior is not None:
                    return Submitted(idempotency.replay(prior, idempotency_key, digest),
                                     replayed=True)
            quotas.check_quota(s, tenant, max_active_jobs)
            stored = _store_inputs(form, job_id, store)
            job = jobs.create_job(s, job_id=job_id, tenant_id=tenant_id,
                                  config=config.model_dump(mode="json"), stages=names,
                                  model_format=model_format, inputs=stored,
                                  idempotency_key=idempotency_key, request_hash=digest)
            s.flush()
    except IntegrityError:
        # A twin with the same key won the unique constraint (where the lock did not serialise
        # us, e.g. SQLite): answer with its job, keep nothing of ours.
        _discard(store, stored)
        if not idempotency_key:
            raise
        with session_scope(factory) as s:
            prior = idempotency.find(s, tenant_id, idempotency_key)
            if prior is None:
                raise
            return Submitted(idempotency.replay(prior, idempotency_key, digest), replayed=True)
    except BaseException:
        _discard(store, stored)
        raise
    try:
        dispatcher.enqueue(str(job_id), names[0])
    except Exception as e:
        log.error("cannot enqueue job %s: %s", job_id, e)
        with session_scope(factory) as s:
            job = jobs.get_job(s, job_id, for_update=True)
            if job.status is JobStatus.queued:
                transition(job, JobStatus.failed)
                job.error_code = "broker_unavailable"
                job.error_message = "the job could not be queued: the message broker did not answer"
                jobs.add_event(s, job_id, "failed", data={"code": job.error_code})
        raise BrokerUnavailable(str(e)) from None
    with session_scope(factory) as s:
        job = jobs.get_job(s, job_id)
        job.inputs  # load for the response  # noqa: B018
        return Submitted(job)


def _store_inputs(form: ReceivedForm, job_id: uuid.UUID,
                  store: ArtifactStore) -> list[jobs.StoredInput]:
    stored = []
    for f in form.files.values():
        canonical = f"{f.field}{f.suffix}"  # the engine's layout: model.onnx, history.zip, data.npz
        uri = store.put(input_key(job_id, canonical), f.path, move=True)
        stored.append(jobs.StoredInput(field=f.field, filename=f.filename, uri=uri, size=f.size,
                                       sha256=f.sha256))
    return stored


def _discard(store: ArtifactStore, stored: list[jobs.StoredInput]) -> None:
    for i in stored:
        try:
            store.delete(i.uri)
        except Exception as e:  # an orphan file is no reason to hide the real error
            log.warning("could not remove %s: %s", i.uri, e)
