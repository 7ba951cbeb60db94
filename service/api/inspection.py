"""Submission-time inspection: load the uploaded files as the engine will, in a sandbox.

A job whose model, history or data cannot be used should be refused with a 422 when it is
submitted, not accepted and failed minutes later by the validate stage. Loading them needs torch
(which the API never imports) and means parsing hostile files, so it happens in a child process
(:func:`inspect_submission`, awaited by ``POST /v1/jobs`` after the cheap form checks and before
anything is stored):

- normally a child forked, once per inspection, from a fork server that has torch imported
  (``service.api.inspector_pool``, ``worker.engine.inspect_server``): a fraction of a second;
- with ``inspection_fork_server`` off, a fresh ``python -m worker.engine.inspect_inputs``
  (:func:`inspect_inputs`): a torch import each time, about 10 s.

Either way the child enters the same sandbox (``worker.engine.inspect_sandbox``) before it opens
an input: no network (its own network namespace), only the job's staging folder visible (a
mount namespace hiding the service's folders, home folders and /tmp), uid ``nobody``, and
RLIMIT_CPU (the wall-clock timeout ``inspection_timeout_s`` plus 5 s), RLIMIT_AS
(``inspection_memory_bytes``, default 8 GiB: torch's CUDA build maps ~3.5 GiB), RLIMIT_FSIZE
small and RLIMIT_CORE 0; its environment has no ``DARE_*``/``AWS_*`` variables and no GPUs.

At most ``inspection_max_concurrent`` run at once per API process. A submission waits for a slot
in async code (no thread held) for up to ``inspection_queue_timeout_s``, then gets a 503
``inspector_busy`` with Retry-After.

Whatever the child does, the answer is a 4xx: its ``{"ok": false, ...}`` becomes a 422 with its
code; a crash, a kill by a limit or a timeout becomes 422 ``input_unreadable``.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Protocol

from service.api.errors import ProblemError
from service.api.uploads import ReceivedForm
from service.settings import Settings
from worker.engine.errors import InputError

log = logging.getLogger("dare.api")

MiB = 1 << 20
# The inspector writes nothing; a few MiB leave room for Python's own bytecode caches.
MAX_WRITE_BYTES = 16 * MiB
_HINT = ("check that the files are the ones described in the README's formats; if they are, "
         "report this with the time of the request")


def _code_root() -> str:
    """Where the ``worker`` package lives, for the child's PYTHONPATH (its cwd is elsewhere)."""
    spec = importlib.util.find_spec("worker")
    assert spec is not None and spec.submodule_search_locations
    return str(Path(next(iter(spec.submodule_search_locations))).parent)


def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DARE_", "AWS_"))}
    env.update({"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
                "PYTHONPATH": _code_root() + os.pathsep + env.get("PYTHONPATH", "")})
    return env


def hidden_dirs(settings: Settings) -> list[str]:
    """The service's own folders, which an inspection must not see (other tenants' uploads,
    inputs and artifacts, the SQLite database)."""
    return [str(d) for d in (settings.home, settings.artifact_root, settings.work_dir,
                             settings.upload_tmp_dir) if d is not None]


class InspectorBusy(ProblemError):
    """Every inspector slot stayed taken for the whole bounded wait."""

    RETRY_AFTER_S = 5

    def __init__(self, detail: str) -> None:
        super().__init__(503, "inspector_busy", detail,
                         headers={"Retry-After": str(self.RETRY_AFTER_S)})


class Inspector(Protocol):
    async def inspect(self, staging: Path, config_json: str) -> dict: ...


async def inspect_submission(inspector: Inspector | None, form: ReceivedForm, config_json: str,
                             settings: Settings) -> dict | None:
    """The inspection (when on) of a form that passed the cheap checks
    (``service.api.submission.validate_form``, whose config ``config_json`` is). Raises InputError
    (422) or InspectorBusy (503); returns the inspector's summary."""
    if inspector is None or settings.submit_inspection == "off":
        return None
    return await inspector.inspect(form.staging, config_json)


def inspect_inputs(staging: Path, config_json: str, settings: Settings) -> dict:
    """The one-shot path: a fresh ``python -m worker.engine.inspect_inputs`` on ``staging``
    (holding ``inputs/``); return its summary or raise InputError. Blocking: run it in a worker
    thread; the caller limits how many run at once."""
    return _run(staging, config_json, settings)


def _run(staging: Path, config_json: str, settings: Settings) -> dict:
    timeout = settings.inspection_timeout_s
    argv = [sys.executable, "-P", "-m", "worker.engine.inspect_inputs", "--dir", str(staging),
            "--config", config_json, "--cpu-s", str(cpu_seconds(settings)),
            "--memory-bytes", str(settings.inspection_memory_bytes),
            "--max-write-bytes", str(MAX_WRITE_BYTES),
            "--max-uncompressed-bytes", str(settings.max_history_uncompressed_bytes),
            "--max-zip-ratio", str(settings.max_zip_ratio)]
    for d in hidden_dirs(settings):
        argv += ["--hide", d]
    # Its output goes to files in the staging dir (removed with it; RLIMIT_FSIZE bounds them),
    # so a flood of output cannot pile up in the API's memory or block on a full pipe.
    out_path, err_path = staging / "inspector.out", staging / "inspector.log"
    with out_path.open("wb") as out_file, err_path.open("wb") as err_file:
        proc = subprocess.Popen(argv, cwd=staging, env=child_env(), stdin=subprocess.DEVNULL,
                                stdout=out_file, stderr=err_file,
                                start_new_session=True)  # a group of its own: killed as a whole
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill(proc)
        raise timed_out(timeout) from None
    finally:
        _kill(proc)  # e.g. the thread was interrupted: never leave the child behind
    return interpret(_tail_bytes(out_path, 1 << 16), proc.returncode, _tail(err_path))


def cpu_seconds(settings: Settings) -> int:
    return int(settings.inspection_timeout_s) + 5


def timed_out(timeout: float) -> InputError:
    return InputError("input_unreadable",
                      f"the inputs made the inspector time out after {timeout:g} s while "
                      "loading them", "send smaller inputs, or have the operator raise "
                      "DARE_INSPECTION_TIMEOUT_S")


def interpret(out: bytes, returncode: int, err_tail: str) -> dict:
    """The child's answer: its summary, or InputError with its code, or (no result line: it
    crashed or was killed) 422 ``input_unreadable`` naming how it ended."""
    result = _last_json(out)
    if result is None:
        how = (f"was killed by signal {_signal_name(-returncode)}"
               if returncode < 0 else f"exited with status {returncode}")
        log.warning("input inspection crashed (%s): %s", how, err_tail)
        raise InputError("input_unreadable",
                         f"the inputs made the inspector crash: it {how} while loading them "
                         "(a memory, CPU or file-size limit, or a file that breaks its parser)",
                         _HINT)
    if not result.get("ok"):
        raise InputError(str(result.get("code") or "input_unreadable"),
                         str(result.get("message") or "the inputs cannot be used"),
                         str(result.get("hint") or ""))
    return result


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:  # it exited in between
            pass
        proc.wait()


def _signal_name(n: int) -> str:
    try:
        return signal.Signals(n).name
    except ValueError:
        return str(n)


def _tail_bytes(path: Path, n: int) -> bytes:
    try:
        with path.open("rb") as f:
            f.seek(max(0, path.stat().st_size - n))
            return f.read()
    except OSError:
        return b""


def _tail(path: Path) -> str:
    return last_line(_tail_bytes(path, 2000))


def last_line(out: bytes) -> str:
    lines = out[-2000:].decode("utf-8", "replace").strip().splitlines()
    return lines[-1][:300] if lines else ""


def _last_json(out: bytes) -> dict | None:
    for line in reversed(out.decode("utf-8", "replace").splitlines()):
        if line.startswith("{"):
            try:
                obj = json.loads(line)
            except ValueError:
                return None
            return obj if isinstance(obj, dict) else None
    return None
