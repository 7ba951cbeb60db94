"""A real HTTP server for one app (uvicorn in a thread of the test process) and a raw-socket
client that sends a request's body as slowly, or as partly, as a test wants."""
from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from .conftest import free_port

BOUNDARY = "rawboundary7f3a"


@contextmanager
def serve(app) -> Iterator[int]:  # noqa: ANN001 (FastAPI)
    """Run ``app`` (lifespan included) on a free loopback port; yield the port."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="on",
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise AssertionError("uvicorn did not start")
        time.sleep(0.05)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(15)


def part_header(name: str, filename: str) -> bytes:
    return (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{name}\"; "
            f"filename=\"{filename}\"\r\nContent-Type: application/octet-stream\r\n\r\n").encode()


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: dict


class RawUpload:
    """``POST /v1/jobs`` over a plain socket: headers now, the body piece by piece (chunked
    transfer encoding unless a Content-Length is given)."""

    def __init__(self, port: int, key: str | None, content_length: int | None = None) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.chunked = content_length is None
        head = ["POST /v1/jobs HTTP/1.1", "Host: 127.0.0.1",
                f"Content-Type: multipart/form-data; boundary={BOUNDARY}"]
        if key:
            head.append(f"Authorization: Bearer {key}")
        head.append("Transfer-Encoding: chunked" if self.chunked
                    else f"Content-Length: {content_length}")
        self.sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
        self._buf = b""

    def send(self, data: bytes) -> bool:
        """Send a piece; False when the server has closed the connection."""
        frame = b"%x\r\n%s\r\n" % (len(data), data) if self.chunked else data
        try:
            self.sock.sendall(frame)
            return True
        except (BrokenPipeError, ConnectionResetError):
            return False

    def answered(self, wait_s: float) -> bool:
        """Whether response bytes are waiting (after up to ``wait_s`` seconds)."""
        import select

        return bool(select.select([self.sock], [], [], wait_s)[0])

    def read_answer(self, timeout: float = 30) -> Answer:
        self.sock.settimeout(timeout)
        while b"\r\n\r\n" not in self._buf:
            got = self.sock.recv(65536)
            if not got:
                raise AssertionError(f"connection closed before an answer: {self._buf!r}")
            self._buf += got
        head, _, rest = self._buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
        length = int(headers.get("content-length", "0"))
        while len(rest) < length:
            got = self.sock.recv(65536)
            if not got:
                break
            rest += got
        return Answer(status, headers, json.loads(rest[:length]) if length else {})

    def close(self) -> None:
        self.sock.close()
