"""A pytest fork server for the mutation runs (bench/mutation.py), engine and service modules.

Every mutant's test run used to be a fresh ``python -m pytest``: on the shared two-core machine
importing torch, sklearn and the rest took 20-50 s of each run, more than the tests. The
server imports those third-party packages once, then forks one child per request; the child runs
``pytest.main`` in the scratch copy and imports the project's own modules (the mutated one among
them) afresh from disk, so it sees the mutant cosmic-ray has just written.

    python pytest_fork.py serve SOCKET            # started and stopped by bench/mutation.py
    python -S pytest_fork.py run SOCKET ARGS...   # cosmic-ray's test command: exit status of pytest

The client uses only the standard library (``-S``: not even site-packages), so it starts in
milliseconds. When the client goes away (cosmic-ray's timeout kills it), the child is killed too.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import sys

# third-party packages the tests import; never the project's own (those must be re-read)
PRELOAD = ("numpy", "torch", "torch.fx", "torch.export", "torch.nn.functional", "torch.optim",
           "sklearn.datasets", "hypothesis", "pydantic", "pytest", "onnx",
           "onnxruntime", "onnx2torch", "pytest_timeout", "anyio.pytest_plugin",
           "_hypothesis_pytestplugin", "pytest_subtests.plugin",
           # and the service tests': the web stack, the database, the broker, the HTTP clients
           "fastapi", "starlette.testclient", "uvicorn", "sqlalchemy", "sqlalchemy.orm", "psycopg",
           "alembic.command", "celery", "kombu", "redis", "httpx", "multipart",
           "pydantic_settings", "safetensors.torch", "schemathesis")


def serve(path: str) -> None:
    import importlib

    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    _warm_up()
    # pytest ends a session with five full collections; what is loaded by now lives until the
    # end, so it is moved out of the collector's sight (and the children's pages stay shared)
    import gc

    gc.collect()
    gc.freeze()
    if os.path.exists(path):
        os.unlink(path)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)
    while True:
        conn, _ = srv.accept()
        with conn:
            req = json.loads(_read_line(conn))
            pid = os.fork()
            if pid == 0:  # the child: one pytest run, then out without running the parent's exit
                srv.close()
                conn.close()
                os.setsid()
                os.chdir(req["cwd"])
                null = os.open(os.devnull, os.O_WRONLY)
                os.dup2(null, 1)
                os.dup2(null, 2)
                import pytest

                try:
                    rc = int(pytest.main(req["args"]))
                except BaseException:  # noqa: BLE001 - any crash is a failed run
                    rc = 3
                os._exit(rc)
            conn.sendall(f"{_wait(pid, conn)}\n".encode())


def _warm_up() -> None:
    """The first ``torch.export`` of a process spends seconds importing and setting up its
    tracer (ten times the later ones); done once here, every child starts past it."""
    import torch

    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2), torch.nn.ReLU(),
                              torch.nn.Flatten(), torch.nn.Linear(8, 2)).eval()
    x = torch.zeros(2, 1, 4, 4)
    torch.export.export(net, (x,), dynamic_shapes=({0: torch.export.Dim("b")},)).module()(x)


def _read_line(conn: socket.socket) -> str:
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = conn.recv(65536)
        if not chunk:
            break
        buf += chunk
    return buf.decode()


def _wait(pid: int, conn: socket.socket) -> int:
    """The child's exit status; kills it (and its process group) if the client hangs up."""
    import select

    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        readable, _, _ = select.select([conn], [], [], 0.2)
        if readable and not conn.recv(1, socket.MSG_PEEK):
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            os.waitpid(pid, 0)
            return 124


def run(path: str, args: list[str]) -> int:
    """The exit status of ``pytest ARGS``; without an answer from the server (not started, or
    gone) pytest runs in a fresh interpreter instead: slower, but never a mutant counted as
    killed because the server failed."""
    try:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.connect(path)
        conn.sendall((json.dumps({"cwd": os.getcwd(), "args": args}) + "\n").encode())
        reply = _read_line(conn).strip()
    except OSError:
        reply = ""
    if reply:
        return int(reply)
    os.execv(sys.executable, [sys.executable, "-m", "pytest", *args])


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(sys.argv[2])
    else:
        sys.exit(run(sys.argv[2], sys.argv[3:]))
