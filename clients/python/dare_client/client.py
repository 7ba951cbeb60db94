"""A typed Python client for the DARE API, on httpx. The ``dare submit/status/watch/list/cancel/
download`` commands (``dare_client.cli``) are built on it; dashboards and scripts can use it
directly:

    from dare_client.client import DareClient

    with DareClient("http://127.0.0.1:8000", api_key="dare_...") as dare:
        job = dare.submit("model.onnx", "history.zip", dataset="digits")
        job = dare.wait(job.id, on_update=lambda j: print(j.status, j.progress))
        for art in dare.artifacts(job.id):
            dare.download(job.id, art.name, "out/", artifact=art)

Every method returns the pydantic models of ``dare_client.schemas`` (the API's own contract), so a
client and the server cannot drift apart silently. Errors are one small hierarchy: ``ApiError``
(the server answered with a problem), ``ServerUnreachable`` (it did not answer) and
``DownloadError`` (the bytes did not match the artifact list). Importing this module never
imports torch.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import httpx

from dare_client.schemas import (
    ArtifactRead,
    EventList,
    EventRead,
    JobList,
    JobRead,
    JobStatus,
)

DEFAULT_URL = "http://127.0.0.1:8000"
API_PREFIX = "/v1"

# (name, bytes done, bytes total): one callback shape for uploads (name = form field) and
# downloads (name = artifact), so one progress-bar adapter serves both.
ProgressFn = Callable[[str, int, int], None]
JobId = str | uuid.UUID


class ClientError(Exception):
    """Base of everything this client raises on purpose."""


class ApiError(ClientError):
    """The API answered with an error. ``code`` is the problem's stable code (``http_<status>``
    when the body was not problem+json, e.g. a proxy's HTML page); ``detail`` says how to fix it."""

    def __init__(self, status: int, code: str, detail: str, *, problem: Mapping[str, Any] | None = None,
                 retry_after: str | None = None) -> None:
        super().__init__(f"{status} {code}: {detail}")
        self.status = status
        self.code = code
        self.detail = detail
        self.problem = dict(problem or {})
        self.retry_after = retry_after

    @classmethod
    def from_response(cls, r: httpx.Response) -> ApiError:
        body: Any = None
        try:
            body = r.json()
        except (ValueError, UnicodeDecodeError):
            pass
        retry_after = r.headers.get("Retry-After")
        if isinstance(body, dict) and "code" in body:
            return cls(r.status_code, str(body["code"]), str(body.get("detail") or body.get("title")),
                       problem=body, retry_after=retry_after)
        text = " ".join(r.text.split())[:300] if r.content else ""
        return cls(r.status_code, f"http_{r.status_code}", text or r.reason_phrase or "error",
                   problem=body if isinstance(body, dict) else None, retry_after=retry_after)


class ServerUnreachable(ClientError):
    """No answer at all: connection refused, DNS failure, timeout."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"cannot reach the DARE API at {url}: {reason}")
        self.url = url
        self.reason = reason


class DownloadError(ClientError):
    """A downloaded artifact's size or sha256 differs from the artifact list (nothing was kept)."""


class _ProgressReader:
    """A binary file that reports how much of it has been read: httpx streams multipart file
    parts by calling ``read`` in 64 KiB chunks, so this is upload progress without buffering."""

    def __init__(self, raw: IO[bytes], name: str, callback: ProgressFn) -> None:
        self._raw = raw
        self.name = getattr(raw, "name", name)
        self._field = name
        self._cb = callback
        pos = raw.tell()
        self.total = raw.seek(0, os.SEEK_END)
        raw.seek(pos)
        self._pos = pos

    def read(self, n: int = -1) -> bytes:
        chunk = self._raw.read(n)
        if chunk:  # the closing empty read is not progress
            self._pos += len(chunk)
            self._cb(self._field, self._pos, self.total)
        return chunk

    # httpx measures the part's length with tell/seek (no fileno: it must not bypass read()).
    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        self._pos = self._raw.seek(offset, whence)
        return self._pos

    def tell(self) -> int:
        return self._raw.tell()


def _safe_name(name: str) -> str:
    # The name comes from the server: never let it pick a path outside the destination.
    if not name or name in (".", "..") or Path(name).name != name or "\\" in name:
        raise DownloadError(f"refusing artifact name {name!r}: not a plain file name")
    return name


class DareClient:
    """One HTTP connection pool to one DARE API. Use as a context manager, or call ``close()``.

    ``timeout`` (seconds) applies to every request except the upload of ``submit`` and the body of
    ``download``, which may take as long as the transfer needs (``transfer_timeout``, per read or
    write, not in total)."""

    def __init__(self, base_url: str = DEFAULT_URL, api_key: str | None = None, *,
                 timeout: float = 30.0, transfer_timeout: float = 600.0,
                 transport: httpx.BaseTransport | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        headers = {"Accept": "application/json, application/problem+json"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self.timeout = timeout
        self.transfer_timeout = transfer_timeout
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout,
                                  transport=transport)

    def __enter__(self) -> DareClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # --- plumbing ----------------------------------------------------------------------------

    def _send(self, method: str, path: str, **kw: Any) -> httpx.Response:
        try:
            r = self._http.request(method, path, **kw)
        except httpx.TransportError as e:
            raise _unreachable(self.base_url, e) from None
        if r.status_code >= 400:
            raise ApiError.from_response(r)
        return r

    @staticmethod
    def _job_path(job_id: JobId, *rest: str) -> str:
        return "/".join([f"{API_PREFIX}/jobs/{job_id}", *rest])

    # --- the API -----------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        """``/readyz``: the server's readiness checks (an ``ApiError`` 503 when not ready)."""
        return self._send("GET", "/readyz").json()

    def submit(self, model: str | os.PathLike[str], history: str | os.PathLike[str],
               data: str | os.PathLike[str] | None = None, dataset: str | None = None,
               config: Mapping[str, Any] | str | None = None, idempotency_key: str | None = None,
               on_upload_progress: ProgressFn | None = None) -> JobRead:
        """``POST /v1/jobs``: stream the files (never loaded into memory) and return the job.
        Give ``data`` (an .npz) or ``dataset`` (an embedded one), not both."""
        if (data is None) == (dataset is None):
            raise ValueError("give exactly one of data (an .npz file) or dataset (e.g. 'digits')")
        paths = {"model": Path(model), "history": Path(history)}
        if data is not None:
            paths["data"] = Path(data)
        form: dict[str, str] = {}
        if dataset is not None:
            form["dataset"] = dataset
        if config is not None:
            form["config"] = config if isinstance(config, str) else json.dumps(dict(config))
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        handles: list[IO[bytes]] = []
        try:
            files: dict[str, tuple[str, Any, str]] = {}
            for field, p in paths.items():
                fh: Any = p.open("rb")
                handles.append(fh)
                if on_upload_progress is not None:
                    fh = _ProgressReader(fh, field, on_upload_progress)
                files[field] = (p.name, fh, "application/octet-stream")
            t = httpx.Timeout(self.timeout, read=self.transfer_timeout, write=self.transfer_timeout)
            r = self._send("POST", f"{API_PREFIX}/jobs", files=files, data=form, headers=headers,
                           timeout=t)
        finally:
            for fh in handles:
                fh.close()
        return JobRead.model_validate(r.json())

    def get(self, job_id: JobId) -> JobRead:
        return JobRead.model_validate(self._send("GET", self._job_path(job_id)).json())

    def list(self, status: Sequence[JobStatus | str] = (), limit: int = 20,
             cursor: str | None = None) -> JobList:
        """One page, newest first; pass ``next_cursor`` back as ``cursor`` for the next one."""
        params: list[tuple[str, str | int]] = [("status", JobStatus(s).value) for s in status]
        params.append(("limit", limit))
        if cursor:
            params.append(("cursor", cursor))
        return JobList.model_validate(self._send("GET", f"{API_PREFIX}/jobs", params=params).json())

    def iter_jobs(self, status: Sequence[JobStatus | str] = (), page_size: int = 50,
                  max_items: int | None = None) -> Iterator[JobRead]:
        """Every job (newest first), page by page, fetching lazily; stops after ``max_items``."""
        seen, cursor = 0, None
        while True:
            size = page_size if max_items is None else min(page_size, max_items - seen)
            if size <= 0:
                return
            page = self.list(status, limit=size, cursor=cursor)
            for job in page.items:
                yield job
                seen += 1
            if not page.next_cursor or not page.items:
                return
            cursor = page.next_cursor

    def events(self, job_id: JobId, after: int | None = None, limit: int = 200) -> EventList:
        params: dict[str, int] = {"limit": limit}
        if after is not None:
            params["after"] = after
        return EventList.model_validate(
            self._send("GET", self._job_path(job_id, "events"), params=params).json())

    def cancel(self, job_id: JobId) -> JobRead:
        """Cancelled at once when queued, ``cancelling`` when running; a finished job is a 409."""
        return JobRead.model_validate(self._send("POST", self._job_path(job_id, "cancel")).json())

    def artifacts(self, job_id: JobId) -> list[ArtifactRead]:
        return [ArtifactRead.model_validate(a)
                for a in self._send("GET", self._job_path(job_id, "artifacts")).json()]

    def download(self, job_id: JobId, name: str, dest: str | os.PathLike[str], *,
                 artifact: ArtifactRead | None = None,
                 on_progress: ProgressFn | None = None) -> Path:
        """Stream one artifact to ``dest`` (a directory, which gets the artifact's name, or a file
        path) and return the path. The bytes go to a temporary file beside it that is renamed into
        place only once its size and sha256 match the artifact list, so ``dest`` never holds a
        partial or corrupt file. ``artifact`` saves a round trip when the caller has the list."""
        name = _safe_name(name)
        if artifact is None:
            arts = self.artifacts(job_id)
            found = [a for a in arts if a.name == name]
            if not found:
                have = ", ".join(a.name for a in arts) or "none yet"
                raise ApiError(404, "artifact_not_found",
                               f"job {job_id} has no artifact {name!r}; it has: {have}")
            artifact = found[0]
        target = Path(dest)
        if target.is_dir() or str(dest).endswith(("/", os.sep)):
            target = target / name
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.part")
        digest, done = hashlib.sha256(), 0
        t = httpx.Timeout(self.timeout, read=self.transfer_timeout)
        try:
            with self._http.stream("GET", self._job_path(job_id, "artifacts", name), timeout=t) as r:
                if r.status_code >= 400:
                    r.read()
                    raise ApiError.from_response(r)
                with tmp.open("wb") as fh:
                    for chunk in r.iter_bytes(1 << 20):
                        fh.write(chunk)
                        digest.update(chunk)
                        done += len(chunk)
                        if on_progress is not None:
                            on_progress(name, done, artifact.size)
            if done != artifact.size or digest.hexdigest() != artifact.sha256:
                raise DownloadError(
                    f"{name}: got {done} bytes with sha256 {digest.hexdigest()[:16]}..., the "
                    f"artifact list says {artifact.size} bytes with sha256 {artifact.sha256[:16]}...; "
                    "nothing was kept. Download it again; if it persists the artifact store is damaged.")
            os.replace(tmp, target)
        except httpx.TransportError as e:
            raise _unreachable(self.base_url, e) from None
        finally:
            tmp.unlink(missing_ok=True)
        return target

    def download_all(self, job_id: JobId, dest_dir: str | os.PathLike[str],
                     names: Sequence[str] = (), on_progress: ProgressFn | None = None) -> list[Path]:
        """Download the named artifacts (all of them when ``names`` is empty) into ``dest_dir``."""
        arts = {a.name: a for a in self.artifacts(job_id)}
        missing = [n for n in names if n not in arts]
        if missing:
            have = ", ".join(arts) or "none yet"
            raise ApiError(404, "artifact_not_found",
                           f"job {job_id} has no artifact {', '.join(map(repr, missing))}; it has: {have}")
        Path(dest_dir).mkdir(parents=True, exist_ok=True)
        return [self.download(job_id, n, dest_dir, artifact=arts[n], on_progress=on_progress)
                for n in (names or list(arts))]

    def _drain_events(self, job_id: JobId, after: int | None,
                      on_event: Callable[[EventRead], None] | None, page: int = 200) -> int | None:
        """Deliver every event after ``after``; return the last id seen."""
        while True:
            got = self.events(job_id, after=after, limit=page)
            for e in got.items:
                if on_event is not None:
                    on_event(e)
            after = got.next_after
            if len(got.items) < page:
                return after

    def wait(self, job_id: JobId, *, on_update: Callable[[JobRead], None] | None = None,
             on_event: Callable[[EventRead], None] | None = None, interval: float = 1.0,
             timeout: float | None = None, after: int | None = None,
             unreachable_grace: float = 30.0) -> JobRead:
        """Follow a job until it is succeeded, failed or cancelled, and return it.

        Each round reads the new events, calling ``on_event`` for each, then the job, calling
        ``on_update`` with it (so the job is never older than the events shown); once the job is
        terminal its last events are read too, so the terminal event is always delivered. A server
        that stops answering for less than ``unreachable_grace`` seconds (a restart) is waited
        out. ``timeout`` raises ``TimeoutError``; the job itself keeps running."""
        deadline = None if timeout is None else time.monotonic() + timeout
        down_since: float | None = None
        while True:
            try:
                after = self._drain_events(job_id, after, on_event)
                job = self.get(job_id)
                if job.status.is_terminal():
                    after = self._drain_events(job_id, after, on_event)
                down_since = None
            except ServerUnreachable:
                now = time.monotonic()
                down_since = down_since or now
                if now - down_since > unreachable_grace:
                    raise
                time.sleep(interval)
                continue
            if on_update is not None:
                on_update(job)
            if job.status.is_terminal():
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} is still {job.status.value} after {timeout} s")
            time.sleep(interval)


def _unreachable(base_url: str, e: httpx.TransportError) -> ServerUnreachable:
    if isinstance(e, httpx.ConnectError):
        reason = "connection refused (is the server running? start one with `dare serve`, or " \
                 "point --url / DARE_URL at it)"
    elif isinstance(e, httpx.TimeoutException):
        reason = "it did not answer in time (retry, or raise the timeout)"
    else:
        reason = f"{type(e).__name__}: {e}"
    return ServerUnreachable(base_url, reason)


def wait_ready(base_url: str, procs: Sequence[Any] = (), timeout: float = 120,
               what: str = "the service") -> None:
    """Until ``GET /readyz`` answers 200. ``procs`` are server processes the caller started
    (``subprocess.Popen``): if one exits first, waiting is pointless. SystemExit either way, with
    ``what`` (e.g. "dare serve; see its log") in the message."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in procs:
            if p.poll() is not None:
                raise SystemExit(f"{what} exited with {p.returncode}")
        try:
            if httpx.get(f"{base_url.rstrip('/')}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise SystemExit(f"{what} did not become ready in {timeout:.0f} s")
