"""The inspector's sandbox, entered by the process that is about to load a submission's files.

Called once, first thing, in a process that will never do anything else (a child forked by
:mod:`worker.engine.inspect_server`, or the one-shot ``python -m worker.engine.inspect_inputs``):

1. **No network**: a new network namespace (``unshare(CLONE_NEWNET)``), whose only interface is
   a loopback that is down, so every ``connect`` fails, also to the host's loopback services
   (PostgreSQL, Redis, the API itself).
2. **Only the job's folder**: a new mount namespace in which the service's own directories (the
   ``hide`` list: DARE home, artifacts, work dirs, other tenants' staging) are covered by empty
   read-only tmpfs, ``/tmp`` is a fresh small tmpfs, and the job's staging folder is bind-mounted
   read-only at ``/tmp/job``, the process's working directory. The rest of the file system (the
   Python installation, the code) stays visible read-only as far as the uid below allows: hiding
   it would mean a full ``pivot_root`` image of the interpreter, which this does not attempt.
3. **Not root**: run as root, it drops to ``nobody`` (65534, no groups, ``no_new_privs``), so it
   cannot read root's files (``/proc/<api>/environ``, ``~/.aws``), signal the API or write any
   file that is not world-writable. Not run as root, it enters a user namespace first (which is
   what lets an unprivileged process make the other namespaces) and stays its own uid.
4. **Resource limits**: RLIMIT_CPU, RLIMIT_AS, RLIMIT_FSIZE, and RLIMIT_CORE 0.

Where the OS refuses a step (a container without CAP_SYS_ADMIN and without user namespaces),
the step is skipped and named in the returned :class:`Sandbox`, which the parent logs: the
inspection still runs with the resource limits and a credential-free environment.
"""
from __future__ import annotations

import ctypes
import os
import resource
import stat
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
PR_SET_NO_NEW_PRIVS = 38
NOBODY = 65534
JOB_DIR = Path("/tmp/job")  # where the staging folder appears inside the mount namespace
_SAFE = MS_NOSUID | MS_NODEV | MS_NOEXEC


@dataclass
class Sandbox:
    """What the sandbox achieved: the parent logs any ``missing`` step."""
    workdir: str
    network: bool = False
    mounts: bool = False
    uid: int = -1
    missing: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(libc: ctypes.CDLL, src: str | None, target: str, fstype: str | None, flags: int,
           data: str | None = None) -> None:
    enc = (lambda s: s.encode() if s is not None else None)  # noqa: E731
    _check(libc.mount(enc(src), enc(target), enc(fstype), flags, enc(data)), f"mount {target}")


def apply_limits(cpu_s: int | None, memory: int | None, max_write: int | None) -> None:
    """Cap this process: CPU seconds, address space, the size of any file it writes; no core
    dumps (a crash must not leave a file the size of its memory behind)."""
    for which, value in ((resource.RLIMIT_CPU, cpu_s), (resource.RLIMIT_AS, memory),
                         (resource.RLIMIT_FSIZE, max_write), (resource.RLIMIT_CORE, 0)):
        if value is not None:
            _, hard = resource.getrlimit(which)
            value = value if hard == resource.RLIM_INFINITY else min(value, hard)
            resource.setrlimit(which, (value, value))


def _unshare(libc: ctypes.CDLL, box: Sandbox) -> None:
    root = os.geteuid() == 0
    flags = CLONE_NEWNET | CLONE_NEWNS | (0 if root else CLONE_NEWUSER)
    uid, gid = os.geteuid(), os.getegid()
    try:
        _check(libc.unshare(flags), "unshare")
    except OSError as e:
        box.missing.append(f"network and mount namespaces ({e})")
        return
    if not root:  # map ourselves, so files keep their owners; setgroups must be denied first
        for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"),
                           ("gid_map", f"{gid} {gid} 1")):
            Path(f"/proc/self/{name}").write_text(text)
    box.network = True


def _open_to_nobody(staging: Path) -> None:
    """Let uid 65534 read the job's own files (the API writes them 0644 in 0755 folders, but a
    stricter umask would lock the sandboxed reader out)."""
    for p in (staging, *staging.rglob("*")):
        mode = p.lstat().st_mode
        if stat.S_ISDIR(mode):
            p.chmod(stat.S_IMODE(mode) | 0o005)
        elif stat.S_ISREG(mode):
            p.chmod(stat.S_IMODE(mode) | 0o004)


def _keep_paths() -> list[Path]:
    """What a sandboxed process still needs to read: the interpreter, the virtualenv, the code
    (a lazy import, even of a codec, reads them)."""
    paths = [sys.prefix, sys.base_prefix, str(Path(__file__).resolve().parents[2]), *sys.path]
    return sorted({Path(p).resolve() for p in paths if p and Path(p).is_dir()})


def _cover(libc: ctypes.CDLL, d: Path, keep: list[Path], box: Sandbox, *,
           scratch: bool = False) -> None:
    """Cover ``d`` with an empty tmpfs (read-only, or a small writable ``scratch`` for /tmp),
    then bind back read-only the ``keep`` paths below it (e.g. a pyenv interpreter under
    /root)."""
    inside = [k for k in keep if k != d and k.is_relative_to(d)]
    fds = [os.open(k, os.O_PATH | os.O_DIRECTORY) for k in inside]
    try:
        opts = "size=64m,mode=1777" if scratch else "size=64k,mode=0755"
        _mount(libc, "tmpfs", str(d), "tmpfs", _SAFE, opts)
        for k, fd in zip(inside, fds):
            k.mkdir(parents=True, exist_ok=True)
            _mount(libc, f"/proc/self/fd/{fd}", str(k), None, MS_BIND | MS_REC)
            try:
                _mount(libc, None, str(k), None, MS_BIND | MS_REMOUNT | MS_RDONLY)
            except OSError as e:  # a user namespace may lock the flags: still read-only by mode
                box.missing.append(f"read-only {k} ({e})")
        if not scratch:
            _mount(libc, None, str(d), None, MS_REMOUNT | MS_RDONLY | _SAFE, opts)
    finally:
        for fd in fds:
            os.close(fd)


def _hide(libc: ctypes.CDLL, staging: Path, hide: list[str], box: Sandbox) -> Path:
    keep = _keep_paths()
    held = os.open(staging, os.O_PATH | os.O_DIRECTORY)  # survives the staging dir being covered
    try:
        _mount(libc, None, "/", None, MS_REC | MS_PRIVATE)  # nothing below leaks to the host
        for d in sorted({Path(h).resolve() for h in hide if h}):
            if d.is_dir() and d != Path("/") and d not in keep:
                _cover(libc, d, keep, box)
        _cover(libc, Path("/tmp"), keep, box, scratch=True)
        JOB_DIR.mkdir()
        _mount(libc, f"/proc/self/fd/{held}", str(JOB_DIR), None, MS_BIND | MS_REC)
        try:
            _mount(libc, None, str(JOB_DIR), None, MS_BIND | MS_REMOUNT | MS_RDONLY | _SAFE)
        except OSError as e:
            box.missing.append(f"read-only job folder ({e})")
    finally:
        os.close(held)
    box.mounts = True
    return JOB_DIR


def _drop_root(libc: ctypes.CDLL, box: Sandbox) -> None:
    if os.geteuid() == 0:
        try:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
        except OSError as e:
            box.missing.append(f"dropping root ({e})")
    libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    box.uid = os.getuid()


def enter(staging: Path, *, hide: Sequence[str] = (), cpu_s: int | None = None,
          memory: int | None = None, max_write: int | None = None) -> Sandbox:
    """Confine this process to reading ``staging``; chdir there and return what was achieved
    (``workdir`` is the staging folder's path as this process now sees it)."""
    libc = _libc()
    box = Sandbox(workdir=str(staging))
    # Credentials live in home folders (~/.aws, ~/.ssh, ~/.docker): those go too.
    hide = [*hide, os.path.expanduser("~"), "/root", "/home"]
    staging = staging.resolve()
    if os.geteuid() == 0:
        _open_to_nobody(staging)
    _unshare(libc, box)
    workdir = staging
    if box.network:
        try:
            workdir = _hide(libc, staging, list(hide), box)
        except OSError as e:
            box.missing.append(f"hiding the file system ({e})")
    else:
        box.missing.append("hiding the file system (needs a mount namespace)")
    if box.mounts:
        _drop_root(libc, box)
    else:  # nobody could not reach a staging folder below root-only parents (0700 tmp dirs)
        box.missing.append("dropping root (needs the mount namespace to show the job folder)")
        box.uid = os.getuid()
    os.chdir(workdir)
    box.workdir = str(workdir)
    apply_limits(cpu_s, memory, max_write)
    return box
