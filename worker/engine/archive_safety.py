"""Zip archives from users (history, .npz data, .pt2 models): refuse hostile member names and
zip bombs.

Torch-free on purpose: the API runs these checks in its own process on every upload, before
anything heavier looks at the file, and the engine runs the same ones again when it reads
members (the engine may be handed archives the API never saw, e.g. by ``dare harden``).

Nothing is ever extracted to disk, so a '../x' member could not escape anyway; such a name is
refused because an archive carrying one is either broken or built to attack other tools.
"""
from __future__ import annotations

import re
import stat
import zipfile
from pathlib import PurePosixPath

from .errors import InputError

GiB = 1 << 30
# Defaults of the service settings max_history_uncompressed_bytes and max_zip_ratio.
MAX_UNCOMPRESSED_BYTES = 8 * GiB
MAX_RATIO = 200.0
# A member this small cannot hurt whatever its ratio (a zeroed bias tensor deflates 1000:1).
RATIO_MIN_BYTES = 1 << 20
_DRIVE = re.compile(r"^[A-Za-z]:")
_READ_CHUNK = 1 << 20


def unsafe_name_reason(info: zipfile.ZipInfo) -> str | None:
    """Why this member's name or type is unsafe, or None."""
    name = info.filename
    if "\\" in name:
        return "has a backslash in its path"
    if name.startswith("/"):
        return "is an absolute path"
    if _DRIVE.match(name):
        return "names a drive letter"
    if ".." in PurePosixPath(name).parts:
        return "has '..' in its path, which leaves the archive"
    if stat.S_ISLNK(info.external_attr >> 16):
        return "is a symbolic link"
    return None


def is_torchscript(names: list[str]) -> bool:
    """A torch.jit.save archive: ``<name>/code/__torch__/...`` beside ``<name>/data.pkl``.
    Loading one runs the code it carries, so it is never a model or a checkpoint here."""
    return any("/code/__torch__" in f"/{n}" for n in names) and any(
        n == "data.pkl" or n.endswith("/data.pkl") for n in names)


def check_members(zf: zipfile.ZipFile, what: str, *, max_total: int = MAX_UNCOMPRESSED_BYTES,
                  max_ratio: float = MAX_RATIO, hint: str = "") -> int:
    """Refuse unsafe names (``unsafe_archive``) and bombs by declared sizes (``zip_bomb``).

    ``what`` names the archive in messages ("history 'h.zip'"). Returns the declared total
    uncompressed size. Declared sizes can lie: :meth:`ReadBudget.read_member` enforces the caps on the
    bytes actually produced.
    """
    total = 0
    for info in zf.infolist():
        why = unsafe_name_reason(info)
        if why:
            raise InputError("unsafe_archive", f"{what} has the member {info.filename!r}, which {why}",
                             hint or "zip plain files under relative paths, without links")
        check_ratio(info, info.file_size, what, max_ratio)
        total += info.file_size
        if total > max_total:
            raise InputError(
                "zip_bomb",
                f"{what} declares more than {max_total} bytes uncompressed (the limit)",
                "send a smaller archive, or have the operator raise "
                "DARE_MAX_HISTORY_UNCOMPRESSED_BYTES")
    return total


def check_ratio(info: zipfile.ZipInfo, size: int, what: str, max_ratio: float) -> None:
    if size > RATIO_MIN_BYTES and size > max_ratio * max(info.compress_size, 1):
        raise InputError(
            "zip_bomb",
            f"{what}: the member {info.filename!r} expands {size / max(info.compress_size, 1):.0f}"
            f" times ({info.compress_size} -> {size} bytes); the limit is {max_ratio:g}",
            "real checkpoints and images compress far less; rebuild the archive, or have the "
            "operator raise DARE_MAX_ZIP_RATIO")


class _Caps:
    """The caps the engine applies (``configure`` sets them from the service's settings)."""

    max_total: int = MAX_UNCOMPRESSED_BYTES
    max_ratio: float = MAX_RATIO


CAPS = _Caps()


def configure(max_total: int | None = None, max_ratio: float | None = None) -> None:
    """Use the operator's caps (DARE_MAX_HISTORY_UNCOMPRESSED_BYTES, DARE_MAX_ZIP_RATIO) in this
    process, so the engine refuses exactly what the API would."""
    if max_total is not None:
        CAPS.max_total = int(max_total)
    if max_ratio is not None:
        CAPS.max_ratio = float(max_ratio)


class ReadBudget:
    """Bytes an archive may still produce when read, shared by all its members."""

    def __init__(self, what: str, max_total: int = MAX_UNCOMPRESSED_BYTES,
                 max_ratio: float = MAX_RATIO) -> None:
        self.what = what
        self.left = max_total
        self.max_total = max_total
        self.max_ratio = max_ratio

    def read_member(self, zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> bytes:
        """The member's bytes, stopping as soon as the total or the member's ratio is exceeded
        by what decompression actually produced."""
        parts: list[bytes] = []
        got = 0
        with zf.open(info) as fh:
            while chunk := fh.read(_READ_CHUNK):
                got += len(chunk)
                self.left -= len(chunk)
                if self.left < 0:
                    raise InputError(
                        "zip_bomb",
                        f"{self.what} unpacks to more than {self.max_total} bytes (the limit)",
                        "send a smaller archive, or have the operator raise "
                        "DARE_MAX_HISTORY_UNCOMPRESSED_BYTES")
                check_ratio(info, got, self.what, self.max_ratio)
                parts.append(chunk)
        return b"".join(parts)
