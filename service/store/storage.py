"""Artifact store: where inputs and results live. The database keeps URIs, never blobs.

``LocalArtifactStore`` keeps files under one root directory (a volume that the API and the
workers share in production); its URIs are ``file://`` URLs. ``S3ArtifactStore`` keeps them in
one bucket of S3 or an S3-compatible server (MinIO, Ceph, moto) under an optional prefix; its
URIs are ``s3://bucket/prefix/key``. With it, the API and workers on other machines share
nothing but the bucket, the broker and the database: the worker fetches a job's inputs into its
own work directory and uploads what the stage wrote. Selected by ``DARE_ARTIFACT_STORE``.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, BinaryIO, Protocol
from urllib.parse import unquote, urlparse

if TYPE_CHECKING:
    from service.settings import Settings


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

    def delete(self, uri: str) -> None:
        """Remove the object; a missing one is not an error (deleting twice is safe)."""


def _check_key(key: str) -> PurePosixPath:
    # Split by hand: PurePosixPath would quietly fold "a//b" and "a/./b", which name other
    # objects than they seem to in S3, where a key is just a string.
    if not key or any(part in ("..", ".", "") for part in key.split("/")) or "\\" in key:
        raise ValueError(f"bad artifact key {key!r}")
    return PurePosixPath(key)


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

    def delete(self, uri: str) -> None:
        self._path_of_uri(uri).unlink(missing_ok=True)


MiB = 1024 * 1024


class S3ArtifactStore:
    """Objects in ``bucket`` under ``prefix``; boto3 does the transfers.

    Uploads go through boto3's managed transfer, which switches to a multipart upload above
    ``multipart_threshold`` (S3 takes at most 5 GiB in one PUT) and sends the parts in parallel.
    An object becomes visible only once its upload completes, so a reader never sees half of
    one, as with the local store's rename. Credentials come from boto3's usual chain
    (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``, an instance role).
    """

    def __init__(self, bucket: str, prefix: str = "", *, endpoint_url: str | None = None,
                 region: str | None = None, client: Any = None,
                 multipart_threshold: int = 8 * MiB, multipart_chunksize: int = 8 * MiB) -> None:
        # Imported here so that a process on the local store never pays for boto3.
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        if not bucket or "/" in bucket:
            raise ValueError(f"bad S3 bucket name {bucket!r}")
        self.bucket = bucket
        try:
            self.prefix = str(_check_key(prefix.strip("/"))) if prefix.strip("/") else ""
        except ValueError:
            raise ValueError(f"bad S3 prefix {prefix!r} (DARE_S3_PREFIX): use '/'-separated "
                             "names without '.', '..' or empty parts, e.g. 'dare/prod'") from None
        if client is None:
            # S3-compatible servers (MinIO, moto) are reached by path, not by a bucket subdomain.
            config = Config(s3={"addressing_style": "path"} if endpoint_url else {},
                            retries={"max_attempts": 5, "mode": "standard"})
            client = boto3.session.Session().client("s3", endpoint_url=endpoint_url or None,
                                                    region_name=region or None, config=config)
        self.client = client
        self.transfer = TransferConfig(multipart_threshold=multipart_threshold,
                                       multipart_chunksize=multipart_chunksize)

    def _object_key(self, key: str) -> str:
        rel = str(_check_key(key))
        return f"{self.prefix}/{rel}" if self.prefix else rel

    def _key_of_uri(self, uri: str) -> str:
        """The object key a URI names; refuses any URI outside this bucket and prefix."""
        if not uri.startswith("s3://"):
            raise ValueError(f"not an S3 artifact URI: {uri!r}")
        bucket, _, key = uri[len("s3://"):].partition("/")
        head = f"{self.prefix}/" if self.prefix else ""
        if bucket != self.bucket or not key.startswith(head):
            raise ValueError(f"URI outside the artifact store s3://{self.bucket}/{head}: {uri!r}")
        _check_key(key[len(head):])  # no "..", "." or empty segments
        return key

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._object_key(key)}"

    def put(self, key: str, src: Path, *, move: bool = False) -> str:
        obj = self._object_key(key)
        self.client.upload_file(os.fspath(src), self.bucket, obj, Config=self.transfer)
        if move:  # the local copy goes once the object is safely stored
            Path(src).unlink(missing_ok=True)
        return f"s3://{self.bucket}/{obj}"

    def open(self, uri: str) -> BinaryIO:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key_of_uri(uri))["Body"]
        except self.client.exceptions.NoSuchKey:
            raise ArtifactNotFound(uri) from None

    def exists(self, uri: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key_of_uri(uri))
        except ValueError:
            return False
        except Exception as e:
            if _is_not_found(e):
                return False
            raise
        return True

    def local_path(self, uri: str) -> Path | None:
        return None

    def fetch(self, uri: str, dest: Path) -> None:
        key = self._key_of_uri(uri)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
        try:
            self.client.download_file(self.bucket, key, os.fspath(tmp), Config=self.transfer)
        except Exception as e:
            tmp.unlink(missing_ok=True)
            if _is_not_found(e):
                raise ArtifactNotFound(uri) from None
            raise
        os.replace(tmp, dest)  # dest is either absent or whole, never partly downloaded

    def delete(self, uri: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._key_of_uri(uri))

    def ping(self) -> None:
        """Raise unless the bucket answers (for the readiness probe)."""
        self.client.head_bucket(Bucket=self.bucket)


def _is_not_found(e: Exception) -> bool:
    from botocore.exceptions import ClientError

    if not isinstance(e, ClientError):
        return False
    err = e.response.get("Error", {})
    return err.get("Code") in ("404", "NoSuchKey", "NotFound") or \
        e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404


def store_from_settings(settings: Settings) -> ArtifactStore:
    if settings.artifact_store == "s3":
        return S3ArtifactStore(settings.s3_bucket, settings.s3_prefix,
                               endpoint_url=settings.s3_endpoint_url, region=settings.s3_region)
    return LocalArtifactStore(settings.artifact_root)


def input_key(job_id: object, filename: str) -> str:
    return f"jobs/{job_id}/inputs/{filename}"


def artifact_key(job_id: object, name: str) -> str:
    return f"jobs/{job_id}/artifacts/{name}"
