"""The Celery application: one ``gpu`` queue, late acks, one task at a time per worker.

``celery -A worker.celery_app worker -Q gpu -c 1`` runs a worker (``dare worker`` is the same with
the thread settings applied). Settings come from ``DARE_*`` variables (``service.settings``).
"""
from __future__ import annotations

import os

# Before anything can load a user's file: every torch.load in the worker is weights-only, even
# where a library asks for weights_only=False (importing worker.engine sets this too; it is
# repeated here so the worker never depends on import order). See worker/engine/__init__.py.
os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)

from celery import Celery  # noqa: E402
from celery.signals import celeryd_init, setup_logging, worker_init, worker_process_init  # noqa: E402

from service.settings import Settings, get_settings  # noqa: E402

STAGE_TASK_PREFIX = "dare.stage."


def stage_task_name(stage: str) -> str:
    return STAGE_TASK_PREFIX + stage


def stage_message(job_id: str, name: str) -> tuple[str, list[str]]:
    """``(task name, args)`` of the message for run ``name``: a stage (``[job_id]``) or one
    method of a fanned-out stage, ``compare:<method>`` (``[job_id, method]`` to the stage's task)."""
    stage, _, method = name.partition(":")
    return stage_task_name(stage), [job_id, method] if method else [job_id]


def broker_transport_options(settings: Settings) -> dict:
    if settings.broker_is_filesystem:
        d = settings.broker_dir
        return {"data_folder_in": str(d / "queue"), "data_folder_out": str(d / "queue"),
                "processed_folder": str(d / "processed"), "control_folder": str(d / "control"),
                "store_processed": False, "polling_interval": settings.broker_poll_interval_s}
    # Redis re-delivers an unacked message after visibility_timeout: it must outlast the longest
    # stage (the hard time limit), or a second worker would start a stage that is still running.
    # So a stage whose whole worker died would wait hours: service.jobs.reconciler re-sends it as soon
    # as its lease (stage_runs.heartbeat_at) expires; the late redelivery is then dropped.
    return {"visibility_timeout": settings.broker_visibility_timeout_s}


def create_celery(settings: Settings) -> Celery:
    """Pure configuration: touches neither the network nor the filesystem."""
    app = Celery("dare", broker=settings.broker_url, include=["worker.tasks"])
    app.conf.update(
        broker_transport_options=broker_transport_options(settings),
        broker_connection_retry_on_startup=True,
        task_default_queue=settings.queue,
        task_routes={f"{STAGE_TASK_PREFIX}*": {"queue": settings.queue}},
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,   # the database holds every outcome
        result_backend=None,
        task_acks_late=True,       # a stage lost with its worker is delivered again
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_soft_time_limit=settings.stage_soft_time_limit_s,
        task_time_limit=settings.stage_hard_time_limit_s,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        enable_utc=True,
    )
    return app


@setup_logging.connect
def _setup_logging(loglevel: int | str | None = None, **_: object) -> None:
    """Connecting this signal makes Celery leave logging to us: the worker's lines (and its pool
    children's, which inherit the handlers) follow DARE_LOG_FORMAT, JSON by default, and carry
    the job id and stage that ``Pipeline.run`` puts in the log context."""
    from service.logs import configure_logging

    configure_logging(get_settings().log_format, loglevel or "INFO")


@celeryd_init.connect
def _early_logging(instance: object | None = None, options: dict | None = None,
                   **_: object) -> None:
    """The same, sooner: Celery warns (running as root, ...) before it sets up logging, and
    those warnings should be log lines too. In JSON mode the ASCII-art banner, which is not a
    log line, is left out (the same facts are in the lines that follow)."""
    _setup_logging((options or {}).get("loglevel"))
    if instance is not None and get_settings().log_format == "json":
        instance.quiet = True


@worker_init.connect
def _init_worker(**_: object) -> None:
    get_settings().ensure_dirs()  # the filesystem transport's folders, the work directory


@worker_process_init.connect
def _init_child(**_: object) -> None:
    """In each pool child, before any task: few CPU threads (two PyTorch processes with many
    threads on a small machine slow each other down badly); CUDA is left alone until a task;
    database connections inherited from the parent are dropped, not shared."""
    from service.store.db import dispose_engines

    dispose_engines(close=False)
    threads = str(get_settings().torch_threads)
    os.environ.setdefault("OMP_NUM_THREADS", threads)
    os.environ.setdefault("MKL_NUM_THREADS", threads)
    try:
        import torch

        torch.set_num_threads(int(threads))
        import worker.engine.stages  # noqa: F401  (warm imports so the first stage starts fast)
    except ImportError:  # pragma: no cover
        pass
    from worker.tasks import warm

    warm()


app = create_celery(get_settings())
