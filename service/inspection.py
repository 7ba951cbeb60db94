"""Submission-time inspection: load the uploaded files as the engine will, in a child process.

A job whose model, history or data cannot be used should be refused with a 422 when it is
submitted, not accepted and failed minutes later by the validate stage. Loading them needs torch
(which the API never imports) and means parsing hostile files, so it happens in
``python -m worker.engine.inspect_inputs``, a child process with:

- a wall-clock timeout (``inspection_timeout_s``) and RLIMIT_CPU just above it, killing its
  whole process group;
- RLIMIT_AS (``inspection_memory_bytes``, default 8 GiB: torch's CUDA build maps ~3.5 GiB of
  address space just by being imported, and the inputs come on top);
- RLIMIT_FSIZE small, so whatever a payload tries cannot write a sizeable file, and
  RLIMIT_CORE 0, so a crash leaves no core dump;
- cwd = the staging directory; an environment without ``DARE_*`` (database and broker URLs,
  secrets) and without GPUs.

The child sets the rlimits on itself first thing, before it imports torch or opens a file
(``--cpu-s``, ``--memory-bytes``, ``--max-write-bytes``), rather than in a ``preexec_fn``: the
API is multi-threaded, and Python documents preexec_fn as unsafe (it can deadlock) there.

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
import threading
from pathlib import Path

from worker.engine.errors import InputError

from .settings import Settings

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


def _child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DARE_", "AWS_"))}
    env.update({"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
                "PYTHONPATH": _code_root() + os.pathsep + env.get("PYTHONPATH", "")})
    return env


_slots: dict[int, threading.BoundedSemaphore] = {}
_slots_lock = threading.Lock()


def _slot(n: int) -> threading.BoundedSemaphore:
    with _slots_lock:
        return _slots.setdefault(n, threading.BoundedSemaphore(n))


def inspect_inputs(staging: Path, config_json: str, settings: Settings) -> dict:
    """Run the inspector on ``staging`` (holding ``inputs/``); return its summary or raise
    InputError. Blocking: call it from a worker thread. At most ``inspection_max_concurrent``
    run at once (each is a torch process), so a burst of uploads cannot exhaust the host."""
    with _slot(settings.inspection_max_concurrent):
        return _run(staging, config_json, settings)


def _run(staging: Path, config_json: str, settings: Settings) -> dict:
    timeout = settings.inspection_timeout_s
    argv = [sys.executable, "-P", "-m", "worker.engine.inspect_inputs", "--dir", str(staging),
            "--config", config_json, "--cpu-s", str(int(timeout) + 5),
            "--memory-bytes", str(settings.inspection_memory_bytes),
            "--max-write-bytes", str(MAX_WRITE_BYTES),
            "--max-uncompressed-bytes", str(settings.max_history_uncompressed_bytes),
            "--max-zip-ratio", str(settings.max_zip_ratio)]
    # Its output goes to files in the staging dir (removed with it; RLIMIT_FSIZE bounds them),
    # so a flood of output cannot pile up in the API's memory or block on a full pipe.
    out_path, err_path = staging / "inspector.out", staging / "inspector.log"
    with out_path.open("wb") as out_file, err_path.open("wb") as err_file:
        proc = subprocess.Popen(argv, cwd=staging, env=_child_env(), stdin=subprocess.DEVNULL,
                                stdout=out_file, stderr=err_file,
                                start_new_session=True)  # a group of its own: killed as a whole
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill(proc)
        raise InputError("input_unreadable",
                         f"the inputs made the inspector time out after {timeout:g} s while "
                         "loading them", "send smaller inputs, or have the operator raise "
                         "DARE_INSPECTION_TIMEOUT_S") from None
    finally:
        _kill(proc)  # e.g. the thread was interrupted: never leave the child behind
    result = _last_json(_tail_bytes(out_path, 1 << 16))
    if result is None:
        how = (f"was killed by signal {_signal_name(-proc.returncode)}"
               if proc.returncode < 0 else f"exited with status {proc.returncode}")
        log.warning("input inspection crashed (%s): %s", how, _tail(err_path))
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
    lines = _tail_bytes(path, 2000).decode("utf-8", "replace").strip().splitlines()
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
