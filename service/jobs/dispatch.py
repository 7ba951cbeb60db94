"""Sending stage messages. The API and the worker both enqueue through a :class:`Dispatcher`;
messages carry the job id only (the database is the source of truth)."""
from __future__ import annotations

from typing import Protocol

from service.settings import Settings


class BrokerUnavailable(RuntimeError):
    pass


class Dispatcher(Protocol):
    def enqueue(self, job_id: str, stage: str) -> None: ...

    def ping(self) -> None:
        """Raise if the broker cannot be reached."""


class CeleryDispatcher:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._app = None

    @property
    def app(self):  # noqa: ANN201 (celery.Celery)
        if self._app is None:
            from worker.celery_app import create_celery

            if self.settings.broker_is_filesystem:
                self.settings.ensure_dirs()
            self._app = create_celery(self.settings)
        return self._app

    def enqueue(self, job_id: str, stage: str) -> None:
        """``stage``: a stage, or one method of a fanned-out one (``compare:<method>``)."""
        from worker.celery_app import stage_message

        task, args = stage_message(job_id, stage)
        # A few quick retries: a down broker fails the request in about a second, not a hang.
        self.app.send_task(task, args=args, queue=self.settings.queue,
                           retry=True, retry_policy={"max_retries": 2, "interval_start": 0.2,
                                                     "interval_step": 0.5, "interval_max": 1.0})

    def ping(self) -> None:
        with self.app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)
