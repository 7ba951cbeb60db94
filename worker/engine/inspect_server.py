"""The inspector's fork server: ``python -m worker.engine.inspect_server``.

Importing torch and the engine takes seconds; inspecting a digits subject takes a fraction of
one. So the API (service.api.inspector_pool) starts this process once, with a credential-free
environment; it imports everything an inspection needs and then waits for requests, one JSON
line each on stdin. For each it forks a child which is used once: it enters the sandbox
(:mod:`worker.engine.inspect_sandbox`: no network, only the job's folder, not root, resource
limits), inspects, writes its one result line and exits. Nothing of one tenant's inspection can
reach the next one: every child starts from the server's pristine memory, and the server itself
never opens an input.

Protocol (one JSON object per line):

- server -> API at start-up: ``{"ready": true, "sandbox": {...}}``: what a trial child achieved.
- API -> server: ``{"id", "dir", "config", "dataset", "timeout_s", "cpu_s", "memory_bytes",
  "max_write_bytes", "max_uncompressed_bytes", "max_zip_ratio", "hide": [...]}``.
- API -> server: ``{"kill": id}``: the API gave up on that inspection; its child is killed.
- server -> API: ``{"id", "out": <the last 64 KiB the child wrote>, "status": <exit status, or
  minus the signal>, "timed_out": bool}``; the API reads the child's result from ``out``.

The server enforces each request's wall-clock ``timeout_s`` (killing the child's process group);
on end of input (the API went away) it kills its children and exits.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import selectors
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

TAIL = 1 << 16
EXIT_GRACE_S = 2.0  # a child that closed its output but lingers is killed after this


@dataclass
class Child:
    rid: object
    pid: int
    fd: int
    deadline: float
    out: bytearray = field(default_factory=bytearray)
    eof_at: float | None = None
    timed_out: bool = False


def _preload() -> None:
    """Everything the inspection imports, so a child never pays for an import."""
    import torch

    torch.set_num_threads(1)  # and no computation here: fork a single-threaded process
    from . import archive_safety, inspect_inputs, inspect_sandbox, stages  # noqa: F401
    for name in ("onnx", "onnx2torch", "safetensors.torch", "numpy", "sklearn.datasets"):
        try:
            importlib.import_module(name)
        except ImportError:
            pass


def _child(req: dict, fd: int, target) -> None:  # noqa: ANN001
    """In the forked child: never returns."""
    try:
        os.setsid()  # a process group of its own: the server kills it as a whole
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.closerange(3, 65536)  # the API's pipe and every other tenant's child's output
        sys.stdout = os.fdopen(1, "w", buffering=1)
        sys.stderr = os.fdopen(2, "w", buffering=1)
        sys.dont_write_bytecode = True
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        from .archive_safety import configure
        from .inspect_inputs import run
        from .inspect_sandbox import enter

        box = enter(Path(req["dir"]), hide=req.get("hide", []), cpu_s=req.get("cpu_s"),
                    memory=req.get("memory_bytes"), max_write=req.get("max_write_bytes"))
        if box.missing:
            print(f"inspector sandbox incomplete: {'; '.join(box.missing)}", file=sys.stderr)
        configure(req.get("max_uncompressed_bytes"), req.get("max_zip_ratio"))
        result = run(Path(box.workdir), req.get("config") or "{}", req.get("dataset"), target)
        print(json.dumps(result), flush=True)
        os._exit(0)
    except BaseException as e:  # noqa: BLE001 - the parent reports a crash; no traceback leaks
        try:
            print(f"inspector child failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        finally:
            os._exit(70)


def _sandbox_probe(scratch: Path) -> dict:
    """Fork one child that enters the sandbox on an empty folder and reports what it got."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            from .inspect_sandbox import enter

            box = enter(scratch)
            os.write(w, json.dumps(box.to_dict()).encode())
        finally:
            os._exit(0)
    os.close(w)
    data = b""
    while chunk := os.read(r, 4096):
        data += chunk
    os.close(r)
    os.waitpid(pid, 0)
    try:
        return json.loads(data)
    except ValueError:
        return {"missing": ["the sandbox probe crashed"]}


class Server:
    def __init__(self, target, channel: int) -> None:  # noqa: ANN001
        self.target = target
        self.channel = channel  # the API's end; fd 1 is stderr, for libraries that print
        self.sel = selectors.DefaultSelector()
        self.children: dict[int, Child] = {}  # by output fd
        self.inbuf = b""

    def send(self, obj: dict) -> None:
        data = (json.dumps(obj) + "\n").encode()
        while data:
            data = data[os.write(self.channel, data):]

    def start(self, req: dict) -> None:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            _child(req, w, self.target)
        os.close(w)
        os.set_blocking(r, False)
        deadline = time.monotonic() + float(req.get("timeout_s") or 120)
        self.children[r] = Child(req.get("id"), pid, r, deadline)
        self.sel.register(r, selectors.EVENT_READ)

    def read_child(self, c: Child) -> None:
        try:
            chunk = os.read(c.fd, TAIL)
        except BlockingIOError:
            return
        if chunk:
            c.out += chunk
            del c.out[:-TAIL]  # a flood of output keeps only its tail
        else:  # it closed its output: it is exiting (tick() reaps it)
            c.eof_at = time.monotonic()
            self.sel.unregister(c.fd)

    def read_requests(self) -> bool:
        chunk = os.read(0, 1 << 16)
        if not chunk:
            return False
        self.inbuf += chunk
        while b"\n" in self.inbuf:
            line, self.inbuf = self.inbuf.split(b"\n", 1)
            if not line.strip():
                continue
            req = json.loads(line)
            if "kill" in req:  # nobody waits for that one any more
                for c in list(self.children.values()):
                    if c.rid == req["kill"]:
                        self.report(c, self.kill(c))
            else:
                self.start(req)
        return True

    def tick(self) -> None:
        now = time.monotonic()
        for c in list(self.children.values()):
            if c.eof_at is not None:
                pid, status = os.waitpid(c.pid, os.WNOHANG)
                if pid:
                    self.report(c, status)
                elif now - c.eof_at > EXIT_GRACE_S or now > c.deadline:
                    self.report(c, self.kill(c))
            elif now > c.deadline:
                c.timed_out = True
                self.report(c, self.kill(c))

    @staticmethod
    def kill(c: Child) -> int:
        try:
            os.killpg(c.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return os.waitpid(c.pid, 0)[1]

    def report(self, c: Child, status: int) -> None:
        try:  # whatever the child left running in its group goes with it
            os.killpg(c.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if c.eof_at is None:
            self.sel.unregister(c.fd)
        os.close(c.fd)
        del self.children[c.fd]
        self.send({"id": c.rid, "out": bytes(c.out[-TAIL:]).decode("utf-8", "replace"),
                   "status": os.waitstatus_to_exitcode(status), "timed_out": c.timed_out})

    def serve(self) -> None:
        self.sel.register(0, selectors.EVENT_READ)
        while True:
            waits = [c.deadline for c in self.children.values()]
            # A child that closed its output is polled until it has exited.
            waits += [time.monotonic() + 0.005 for c in self.children.values()
                      if c.eof_at is not None]
            timeout = max(0.0, min(waits) - time.monotonic()) if waits else None
            for key, _ in self.sel.select(timeout):
                if key.fd == 0:
                    if not self.read_requests():
                        return
                else:
                    self.read_child(self.children[key.fd])
            self.tick()

    def shutdown(self) -> None:
        for c in list(self.children.values()):
            self.kill(c)


def _load_target(spec: str | None):  # noqa: ANN202
    if not spec:
        return None
    module, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module), attr)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m worker.engine.inspect_server", description=__doc__)
    ap.add_argument("--target", default=None,
                    help="module:function to run instead of inspect_inputs.inspect (tests)")
    args = ap.parse_args(argv)
    channel = os.dup(1)  # the API's channel; stray prints from libraries go to stderr instead
    os.dup2(2, 1)
    _preload()
    target = _load_target(args.target)
    scratch = Path(tempfile.mkdtemp(prefix="dare-inspect-probe-"))
    try:
        probe = _sandbox_probe(scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    server = Server(target, channel)
    server.send({"ready": True, "sandbox": probe})
    try:
        server.serve()
    finally:
        server.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
