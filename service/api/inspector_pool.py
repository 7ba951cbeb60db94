"""The API's side of the submit-time inspector: a bounded async queue in front of a fork server.

``Inspector.inspect`` is awaited by ``POST /v1/jobs``. It first takes one of
``inspection_max_concurrent`` slots of an asyncio semaphore, waiting at most
``inspection_queue_timeout_s`` (then 503 ``inspector_busy``): a waiting submission holds no
thread, so a burst of uploads cannot starve the thread pool that serves the reads.

With a slot it asks the fork server (``worker.engine.inspect_server``, one long-lived process
per API process, started at app start-up with a credential-free environment) to fork a
sandboxed child for this one inspection, and awaits the answer; a reader thread turns the
server's answer lines into futures. If the server dies, the pending inspections get a 503 and
the next one starts a new server. With ``inspection_fork_server`` off, the slot runs the
one-shot ``python -m worker.engine.inspect_inputs`` in a worker thread instead (slow: a torch
import per inspection).
"""
from __future__ import annotations

import asyncio
import itertools
import json
import logging
import subprocess
import sys
import threading
from concurrent.futures import Future
from pathlib import Path

from starlette.concurrency import run_in_threadpool

from service.api.inspection import (
    MAX_WRITE_BYTES,
    InspectorBusy,
    child_env,
    cpu_seconds,
    hidden_dirs,
    inspect_inputs,
    interpret,
    last_line,
    timed_out,
)
from service.settings import Settings

log = logging.getLogger("dare.api")

# The server enforces each inspection's timeout; this margin only catches a server that hangs.
SERVER_MARGIN_S = 30.0
READY_TIMEOUT_S = 300.0  # importing torch on a loaded machine


class ServerGone(Exception):
    """The fork server exited (or never became ready) with this inspection pending."""


class ForkServer:
    """One ``python -m worker.engine.inspect_server`` and the futures of its pending requests."""

    def __init__(self, target: str | None = None) -> None:
        self.target = target
        self.proc: subprocess.Popen | None = None
        self.sandbox: dict | None = None
        self.ready = threading.Event()
        self._pending: dict[int, Future] = {}
        self._ids = itertools.count()
        self._lock = threading.Lock()

    def start(self) -> None:
        """Start the server; returns at once (it imports torch in the background: a request sent
        meanwhile waits in its pipe)."""
        with self._lock:
            if self.proc is not None and self.proc.poll() is None:
                return
            argv = [sys.executable, "-P", "-m", "worker.engine.inspect_server"]
            if self.target:
                argv += ["--target", self.target]
            self.ready.clear()
            # cwd "/": nothing of the API's working directory; its own session so that a
            # terminal's Ctrl-C reaches the API, which then stops it in order.
            self.proc = subprocess.Popen(argv, cwd="/", env=child_env(), stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, start_new_session=True)
            threading.Thread(target=self._read, args=(self.proc,), name="inspector-reader",
                             daemon=True).start()

    def _read(self, proc: subprocess.Popen) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if msg.get("ready"):
                self.sandbox = msg.get("sandbox") or {}
                missing = self.sandbox.get("missing")
                if missing:
                    log.warning("inspector sandbox is incomplete on this host: %s",
                                "; ".join(missing))
                else:
                    log.info("inspector ready: %s", self.sandbox)
                self.ready.set()
                continue
            with self._lock:
                fut = self._pending.pop(msg.get("id"), None)
            if fut is not None and not fut.done():
                fut.set_result(msg)
        code = proc.wait()
        with self._lock:
            pending, self._pending = self._pending, {}
            if self.proc is proc:
                self.proc = None
        if pending:
            log.error("the inspector's fork server exited (status %s) with %d inspections "
                      "pending", code, len(pending))
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(ServerGone(f"the inspector exited with status {code}"))

    def request(self, req: dict) -> tuple[int, Future]:
        self.start()  # again after a crash
        rid = next(self._ids)
        fut: Future = Future()
        with self._lock:
            proc = self.proc
            assert proc is not None and proc.stdin is not None
            self._pending[rid] = fut
            try:
                proc.stdin.write((json.dumps({**req, "id": rid}) + "\n").encode())
                proc.stdin.flush()
            except (BrokenPipeError, ValueError) as e:  # it died; the reader fails the rest
                self._pending.pop(rid, None)
                fut.set_exception(ServerGone(str(e)))
        return rid, fut

    def cancel(self, rid: int) -> None:
        """Kill the child of an inspection nobody waits for any more."""
        with self._lock:
            self._pending.pop(rid, None)
            if self.proc is not None and self.proc.stdin is not None:
                try:
                    self.proc.stdin.write((json.dumps({"kill": rid}) + "\n").encode())
                    self.proc.stdin.flush()
                except (BrokenPipeError, ValueError):
                    pass

    def stop(self, timeout: float = 10.0) -> None:
        with self._lock:
            proc, self.proc = self.proc, None
        if proc is None:
            return
        try:
            assert proc.stdin is not None
            proc.stdin.close()  # end of input: it kills its children and exits
            proc.wait(timeout)
        except (subprocess.TimeoutExpired, BrokenPipeError):
            proc.kill()
            proc.wait()


class Inspector:
    """What ``POST /v1/jobs`` awaits: a bounded wait for a slot, then one sandboxed inspection."""

    def __init__(self, settings: Settings, *, target: str | None = None) -> None:
        self.settings = settings
        self.server = ForkServer(target) if settings.inspection_fork_server else None
        self._slots: asyncio.Semaphore | None = None

    def start(self) -> None:
        """At app start-up (in its event loop): the limiter, and the fork server."""
        self._slots = asyncio.Semaphore(self.settings.inspection_max_concurrent)
        if self.server is not None:
            self.server.start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()

    async def inspect(self, staging: Path, config_json: str) -> dict:
        if self._slots is None:  # used without the app's lifespan (a bare ASGI call)
            self.start()
        assert self._slots is not None
        wait = self.settings.inspection_queue_timeout_s
        try:
            async with asyncio.timeout(wait):
                await self._slots.acquire()
        except TimeoutError:
            raise InspectorBusy(
                f"all {self.settings.inspection_max_concurrent} input inspectors stayed busy for "
                f"{wait:g} s. Fix: retry after the Retry-After seconds; an operator can raise "
                "DARE_INSPECTION_MAX_CONCURRENT or DARE_INSPECTION_QUEUE_TIMEOUT_S") from None
        try:
            if self.server is None:
                return await run_in_threadpool(inspect_inputs, staging, config_json,
                                               self.settings)
            return await self._forked(staging, config_json)
        finally:
            self._slots.release()

    async def _forked(self, staging: Path, config_json: str) -> dict:
        s = self.settings
        assert self.server is not None
        rid, fut = self.server.request({
            "dir": str(staging), "config": config_json, "timeout_s": s.inspection_timeout_s,
            "cpu_s": cpu_seconds(s), "memory_bytes": s.inspection_memory_bytes,
            "max_write_bytes": MAX_WRITE_BYTES,
            "max_uncompressed_bytes": s.max_history_uncompressed_bytes,
            "max_zip_ratio": s.max_zip_ratio, "hide": hidden_dirs(s)})
        # The first request after start-up also waits for the server's torch import.
        limit = s.inspection_timeout_s + SERVER_MARGIN_S + (
            0 if self.server.ready.is_set() else READY_TIMEOUT_S)
        try:
            msg = await asyncio.wait_for(asyncio.wrap_future(fut), limit)
        except asyncio.CancelledError:
            self.server.cancel(rid)  # the client went away: its child goes too
            raise
        except TimeoutError:
            self.server.cancel(rid)
            log.error("the inspector's fork server did not answer within %.0f s", limit)
            raise InspectorBusy("the input inspector did not answer. Fix: retry after the "
                                "Retry-After seconds") from None
        except ServerGone as e:
            raise InspectorBusy(f"the input inspector restarted ({e}). Fix: retry after the "
                                "Retry-After seconds") from None
        if msg.get("timed_out"):
            raise timed_out(s.inspection_timeout_s)
        out = str(msg.get("out") or "").encode()
        return interpret(out, int(msg.get("status") or 0), last_line(out))


def inspector_for(settings: Settings) -> Inspector | None:
    """The app's inspector, or None when submit-time inspection is off (nothing starts)."""
    return None if settings.submit_inspection == "off" else Inspector(settings)
