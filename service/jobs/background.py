"""Periodic work inside a long-running process (the API): each registered function runs every
``interval_s`` seconds in its own daemon thread until :meth:`Background.stop`.

A failing run is logged and the next one happens on schedule: housekeeping such as the
reconciler must never take the process down with it. Register more work with one line::

    background.add("webhooks", settings.webhook_poll_interval_s, deliver)
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger("dare.background")


@dataclass
class _Task:
    name: str
    interval_s: float
    fn: Callable[[], object]
    thread: threading.Thread | None = field(default=None, repr=False)


class Background:
    def __init__(self) -> None:
        self._tasks: dict[str, _Task] = {}
        self._stop = threading.Event()
        self._started = False
        self._lock = threading.Lock()

    @property
    def names(self) -> list[str]:
        return list(self._tasks)

    def add(self, name: str, interval_s: float, fn: Callable[[], object]) -> None:
        """Run ``fn()`` every ``interval_s`` seconds (first run one interval after start);
        an interval of 0 or less leaves it off. Works before or after :meth:`start`."""
        if interval_s <= 0:
            log.info("background task %s is disabled (interval %s)", name, interval_s)
            return
        with self._lock:
            if name in self._tasks:
                raise ValueError(f"a background task named {name!r} is registered already")
            task = self._tasks[name] = _Task(name, float(interval_s), fn)
            if self._started:
                self._launch(task)

    def start(self) -> None:
        with self._lock:
            if self._started:
                return
            self._started = True
            self._stop.clear()
            for task in self._tasks.values():
                self._launch(task)

    def stop(self, timeout: float = 10.0) -> None:
        """Ask every loop to end and wait for the runs in progress (up to ``timeout`` each)."""
        self._stop.set()
        with self._lock:
            self._started = False
            threads = [t.thread for t in self._tasks.values() if t.thread is not None]
            for t in self._tasks.values():
                t.thread = None
        for th in threads:
            th.join(timeout)

    def run_now(self, name: str) -> object:
        """Run one task once in the caller's thread (for tests and the CLI)."""
        return self._tasks[name].fn()

    def _launch(self, task: _Task) -> None:
        task.thread = threading.Thread(target=self._loop, args=(task,), daemon=True,
                                       name=f"background-{task.name}")
        task.thread.start()

    def _loop(self, task: _Task) -> None:
        while not self._stop.wait(task.interval_s):
            try:
                task.fn()
            except Exception:  # logged, and tried again next interval
                log.exception("background task %s failed", task.name)
