"""Artifact store: where inputs and results live. The database keeps URIs, never blobs.

``LocalArtifactStore`` keeps files under one root directory (a volume that the API and the
workers share in production); its URIs are ``file://`` URLs. Another backend (S3, GCS) implements
the same methods.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Protocol
from urllib.parse import unquote, urlparse


class ArtifactNotFound(FileNotFoundError):
    pass


class ArtifactStore(Protocol):
    def put(self, key: str, src: Path, *, move: bool = False) -> str:
        """Store the local file ``src`` under ``key``; return its URI."""

    def open(self, uri: str) -> BinaryIO:
        """Open a stored object for reading (binary)."""

    def uri(self, key: str) -> str:
        """The URI ``key`` has (or would have) in this store."""

    def exists(self, uri: str) -> bool: ...

    def local_path(self, uri: str) -> Path | None:
        """A local file holding the object, when the store has one (lets the API send it
        with sendfile); ``None`` for remote stores."""

    def fetch(self, uri: str, dest: Path) -> None:
        """Make ``dest`` a local copy of the object (a hard link where possible)."""


def _check_key(key: str) -> PurePosixPath:
    p = PurePosixPath(key)
    if p.is_absolute() or not p.parts or any(part in ("..", ".", "") for part in p.parts):
        raise ValueError(f"bad artifact key {key!r}")
    return p


class LocalArtifactStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*_check_key(key).parts)

    def _path_of_uri(self, uri: str) -> Path:
        u = urlparse(uri)
        if u.scheme != "file":
            raise ValueError(f"not a local artifact URI: {uri!r}")
        path = Path(unquote(u.path)).resolve()
        if not path.is_relative_to(self.root):
            raise ValueError(f"URI outside the artifact root: {uri!r}")
        return path

    def uri(self, key: str) -> str:
        return self._path(key).as_uri()

    def put(self, key: str, src: Path, *, move: bool = False) -> str:
        dest = self._path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
        if move:
            shutil.move(os.fspath(src), tmp)
        else:
            shutil.copyfile(src, tmp)
        os.replace(tmp, dest)  # readers never see a half-written file
        return dest.as_uri()

    def open(self, uri: str) -> BinaryIO:
        path = self._path_of_uri(uri)
        try:
            return path.open("rb")
        except FileNotFoundError:
            raise ArtifactNotFound(uri) from None

    def exists(self, uri: str) -> bool:
        try:
            return self._path_of_uri(uri).is_file()
        except ValueError:
            return False

    def local_path(self, uri: str) -> Path | None:
        return self._path_of_uri(uri)

    def fetch(self, uri: str, dest: Path) -> None:
        src = self._path_of_uri(uri)
        if not src.is_file():
            raise ArtifactNotFound(uri)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.tmp")
        tmp.unlink(missing_ok=True)
        try:
            os.link(src, tmp)
        except OSError:  # another filesystem
            shutil.copyfile(src, tmp)
        os.replace(tmp, dest)


def store_from_settings(settings) -> ArtifactStore:  # noqa: ANN001
    return LocalArtifactStore(settings.artifact_root)


def input_key(job_id: object, filename: str) -> str:
    return f"jobs/{job_id}/inputs/{filename}"


def artifact_key(job_id: object, name: str) -> str:
    return f"jobs/{job_id}/artifacts/{name}"
