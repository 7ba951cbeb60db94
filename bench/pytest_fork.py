"""A pytest fork server for the mutation runs of the engine modules (bench/mutation.py).

Every mutant's test run used to be a fresh ``python -m pytest``: on the shared two-core machine
importing torch, sklearn and torchattacks took 20-50 s of each run, more than the tests. The
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

# third-party packages the engine tests import; never the project's own (those must be re-read)
PRELOAD = ("numpy", "torch", "torch.fx", "torch.export", "torch.nn.functional", "torch.optim",
           "sklearn.datasets", "torchattacks", "hypothesis", "pydantic", "pytest", "onnx",
           "onnxruntime", "onnx2torch")


def serve(path: str) -> None:
    import importlib

    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError:
            pass
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
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(path)
    conn.sendall((json.dumps({"cwd": os.getcwd(), "args": args}) + "\n").encode())
    reply = _read_line(conn).strip()
    return int(reply) if reply else 3


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(sys.argv[2])
    else:
        sys.exit(run(sys.argv[2], sys.argv[3:]))
