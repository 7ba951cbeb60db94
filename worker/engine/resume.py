"""Checkpoints that let a training loop killed mid-stage resume from its last completed epoch.

A worker that dies inside a long stage (kill -9, OOM, a lost machine) gets the stage re-sent by
the reconciler, and ``run_stage`` runs it again in the same work directory. Without this module
the stage would start over; with it, every training loop saves, at the end of each epoch, all it
needs to continue bit for bit: weights, optimiser state, the random generators it draws from, the
epoch index and its accumulators. The re-run loads that and carries on, so at most one epoch of
work is redone and the result equals an uninterrupted run with the same seed.

A :class:`Resume` is a directory plus a key. The key is a hash of everything that decides the
loop's result (its config, seed, starting weights, data), chained from the parent's key, so a
checkpoint left by a different config or input is recognised, deleted and ignored. Children
(``child``) give nested work its own place: a method's grid selection keeps its finished
combinations in its own checkpoint and hands each combination a child for that run's epochs. A caller that collects results
while a loop trains (the selection scores each epoch's snapshot in ``on_epoch``) attaches its own
state with ``with_state``: every epoch checkpoint below it then holds that state as it was after
the epoch's ``on_epoch``, and a resumed loop puts it back, so nothing the caller saw is lost or
seen twice. Files are written atomically (temp file in the same directory, fsync,
``os.replace``) and loaded weights-only, so a checkpoint can hold tensors, numbers, strings,
lists and dicts, and nothing that could run code.

The stage runner removes the whole tree once the stage is recorded as done.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

FILE = "checkpoint.pt"
log = logging.getLogger("dare.resume")


def fingerprint(*parts: Any) -> str:
    """A hex digest of ``parts``: tensors by dtype, shape and bytes; modules by their state dict;
    pydantic models by their JSON dump; dicts (sorted by key), lists and tuples element-wise;
    anything else by its JSON form (or ``repr``)."""
    h = hashlib.blake2b(digest_size=16)
    for p in parts:
        _feed(h, p)
    return h.hexdigest()


def _feed(h, obj: Any) -> None:  # h: a hashlib object
    if isinstance(obj, torch.Tensor):
        t = obj.detach().to("cpu").contiguous().reshape(-1)
        h.update(f"T{t.dtype}{tuple(obj.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(obj, torch.nn.Module):
        h.update(b"M")
        _feed(h, obj.state_dict())
    elif hasattr(obj, "model_dump"):
        h.update(b"P" + json.dumps(obj.model_dump(mode="json"), sort_keys=True).encode())
    elif isinstance(obj, dict):
        h.update(b"D%d" % len(obj))
        for k in sorted(obj, key=str):
            _feed(h, str(k))
            _feed(h, obj[k])
    elif isinstance(obj, (list, tuple)):
        h.update(b"L%d" % len(obj))
        for v in obj:
            _feed(h, v)
    else:
        try:
            h.update(b"J" + json.dumps(obj).encode())
        except (TypeError, ValueError):
            h.update(b"R" + repr(obj).encode())


def rng_state(device: torch.device | str) -> dict:
    """The global generators a loop may draw from (the CPU's, and the device's GPU)."""
    dev = torch.device(device)
    state = {"cpu": torch.get_rng_state()}
    if dev.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(dev)
    return state


def set_rng_state(state: dict, device: torch.device | str) -> None:
    dev = torch.device(device)
    torch.set_rng_state(state["cpu"])
    if dev.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], dev)


class Resume:
    """Where one piece of training keeps its checkpoint: ``root/checkpoint.pt``, valid for ``key``.

    ``caller``: ``(get, put)`` of the state of the code that drives the loop (``with_state``),
    handed down to children."""

    def __init__(self, root: str | Path, key: str = "",
                 caller: tuple[Callable[[], dict], Callable[[dict], None]] | None = None) -> None:
        self.root = Path(root)
        self.key = key
        self.caller = caller

    def __repr__(self) -> str:
        return f"Resume({str(self.root)!r}, key={self.key[:8]!r})"

    @property
    def path(self) -> Path:
        return self.root / FILE

    def child(self, name: str, *inputs: Any) -> Resume:
        """The checkpoint place of a part of this work: ``root/name``, keyed by this key, the name
        and ``inputs`` (what decides that part's result beyond what this key covers)."""
        return Resume(self.root / name, fingerprint(self.key, name, *inputs), self.caller)

    def with_state(self, get: Callable[[], dict], put: Callable[[dict], None]) -> Resume:
        """This place, with the caller's state saved in (``get()``) and restored from (``put``)
        every epoch checkpoint of the loops below it."""
        return Resume(self.root, self.key, (get, put))

    def load(self) -> dict | None:
        """The saved state, or None when there is none. A checkpoint written for another key (a
        different config or input) or unreadable (a disk error) is deleted, with everything under
        it, and None returned."""
        if not self.path.exists():
            return None
        try:
            saved = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 (a torn or foreign file: start over, not crash)
            log.warning("unreadable checkpoint %s discarded (%s)", self.path, e)
            saved = None
        if isinstance(saved, dict) and saved.get("key") == self.key and "state" in saved:
            return saved["state"]
        if saved is not None:
            log.info("checkpoint %s belongs to another config or input: discarded", self.path)
        self.clear()
        return None

    def save(self, state: dict) -> None:
        """Write ``state`` atomically: a reader sees the previous checkpoint or this one, never
        half of one, even if the process dies in between."""
        self.root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".checkpoint-", suffix=".tmp", dir=self.root)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save({"key": self.key, "state": state}, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _fsync_dir(self.root)  # the rename itself survives a crash of the machine

    def clear(self) -> None:
        """Remove this checkpoint and its children's."""
        shutil.rmtree(self.root, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_epoch(resume: Resume | None, epoch: int, *, model: torch.nn.Module,
               optimizer: torch.optim.Optimizer, generator: torch.Generator,
               device: torch.device | str, acc: dict) -> None:
    """Checkpoint a loop after ``epoch`` epochs: weights, optimiser, its shuffling generator, the
    global generators (attacks with a random start may draw from them) and ``acc``, the loop's
    accumulators (losses, step counts, seconds: numbers, strings, lists, dicts), and the caller's
    state (``Resume.with_state``), taken now: call this after the epoch's ``on_epoch``."""
    if resume is None:
        return
    state = {"epoch": epoch, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "generator": generator.get_state(), "rng": rng_state(device), "acc": acc}
    if resume.caller is not None:
        state["caller"] = resume.caller[0]()
    resume.save(state)


def load_epoch(resume: Resume | None, *, model: torch.nn.Module,
               optimizer: torch.optim.Optimizer, generator: torch.Generator,
               device: torch.device | str) -> tuple[int, dict | None]:
    """Restore what :func:`save_epoch` saved into ``model`` (in place, so an optimiser or a
    sub-graph sharing its parameters follows), ``optimizer``, ``generator`` and the global
    generators, and the caller's state into the caller. Returns ``(epochs completed, acc)``, or
    ``(0, None)`` with nothing to resume."""
    state = resume.load() if resume is not None else None
    if state is None:
        return 0, None
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    generator.set_state(state["generator"])
    set_rng_state(state["rng"], device)
    if resume.caller is not None and "caller" in state:
        resume.caller[1](state["caller"])
    return int(state["epoch"]), state["acc"]
