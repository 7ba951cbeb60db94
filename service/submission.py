"""Turning a received upload into a queued job: check, store, record, then enqueue.

The first stage's message is sent only after the job's row is committed, so a worker never sees a
job id the database does not know.
"""
from __future__ import annotations

import logging
import uuid

from sqlalchemy.orm import Session, sessionmaker

from worker.engine.config import EMBEDDED, stage_names
from worker.engine.errors import InputError

from . import jobs
from .dispatch import BrokerUnavailable, Dispatcher
from .db import session_scope
from .models import Job
from .states import JobStatus, transition
from .storage import ArtifactStore, input_key
from .uploads import ReceivedForm, check_data, check_history, check_model, parse_config_field

log = logging.getLogger("dare.api")


def embedded_datasets() -> tuple[str, ...]:
    return EMBEDDED


def validate_form(form: ReceivedForm):  # noqa: ANN201 -> (HardenConfig, model_format)
    """Cheap checks, most specific first; raise InputError naming the field and the fix."""
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
    model_format = check_model(form.files["model"])
    check_history(form.files["history"])
    if has_data:
        check_data(form.files["data"])
    return config, model_format


def submit(form: ReceivedForm, *, job_id: uuid.UUID, factory: sessionmaker[Session],
           store: ArtifactStore, dispatcher: Dispatcher) -> Job:
    config, model_format = validate_form(form)
    stored = []
    for f in form.files.values():
        canonical = f"{f.field}{f.suffix}"  # the engine's layout: model.onnx, history.zip, data.npz
        uri = store.put(input_key(job_id, canonical), f.path, move=True)
        stored.append(jobs.StoredInput(field=f.field, filename=f.filename, uri=uri, size=f.size,
                                       sha256=f.sha256))
    names = stage_names(config)
    with session_scope(factory) as s:
        job = jobs.create_job(s, job_id=job_id, config=config.model_dump(mode="json"), stages=names,
                              model_format=model_format, inputs=stored)
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
        return job
