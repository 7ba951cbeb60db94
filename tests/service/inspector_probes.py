"""Stand-ins for ``worker.engine.inspect_inputs.inspect`` that the inspector's fork server runs
in its sandboxed children (``--target``), to show from the inside what a payload in an uploaded
file could and could not do there. Each takes (workdir, config_json, dataset) and returns the
one result dict, as the real inspection does."""
from __future__ import annotations

import json
import os
import resource
import socket
import time
from pathlib import Path

_touched: list[int] = []  # module state: a fresh child must never see an earlier one's


def connect(workdir: Path, config_json: str, dataset: str | None) -> dict:
    """Try to reach the test's TCP server on the host's loopback."""
    port = json.loads(config_json)["port"]
    try:
        socket.create_connection(("127.0.0.1", port), timeout=3).close()
        return {"ok": True, "connected": True}
    except OSError as e:
        return {"ok": True, "connected": False, "error": f"{type(e).__name__}: {e}"}


def look(workdir: Path, config_json: str, dataset: str | None) -> dict:
    """What is visible and allowed: uid, folders, other files, environment, limits."""
    paths = json.loads(config_json)["paths"]
    try:
        Path("written").write_text("x")
        wrote = True
    except OSError:
        wrote = False
    _touched.append(os.getpid())
    return {"ok": True, "uid": os.getuid(), "cwd": os.getcwd(), "workdir": str(workdir),
            "here": sorted(os.listdir(".")), "inputs": sorted(os.listdir("inputs")),
            "visible": {p: os.path.exists(p) for p in paths}, "wrote": wrote,
            "secrets_in_env": sorted(k for k in os.environ if k.startswith(("DARE_", "AWS_"))),
            "rlimit_as": resource.getrlimit(resource.RLIMIT_AS)[0],
            "rlimit_core": resource.getrlimit(resource.RLIMIT_CORE)[0],
            "earlier_children": len(_touched) - 1, "pid": os.getpid()}


def slow(workdir: Path, config_json: str, dataset: str | None) -> dict:
    """An inspection that takes 4 s: holds its slot (tests of the bounded wait and timeouts)."""
    time.sleep(4)
    return {"ok": True}


def dispatch(workdir: Path, config_json: str, dataset: str | None) -> dict:
    """The probe named by the config's ``probe``: one fork server serves several tests."""
    return globals()[json.loads(config_json)["probe"]](workdir, config_json, dataset)
