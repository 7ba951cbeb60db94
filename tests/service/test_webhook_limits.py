"""A webhook send is bounded: a total deadline however slowly the receiver answers, a cap on the
answer read, and a pool of senders with a per-tenant limit so that one slow receiver holds one
sender and other tenants' deliveries go meanwhile. Real loopback receivers (raw sockets, so
they can misbehave)."""
from __future__ import annotations

import select
import socket
import threading
import time
import uuid
from datetime import timedelta

import pytest
from sqlalchemy import select as sql_select

from service.jobs.webhook_net import check_url, post
from service.jobs.webhooks import deliver_due
from service.states import utcnow
from service.store.models import Job, WebhookDelivery

from .conftest import make_key, tenant_id
from .test_webhook_ssrf import cancelled_job
from .test_webhooks import Receiver, deliveries

RESPONSE = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 2\r\n\r\nok"


def read_request(conn: socket.socket) -> None:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    while len(body) < length:
        chunk = conn.recv(65536)
        if not chunk:
            return
        body += chunk


class RawReceiver:
    """Accepts connections on 127.0.0.1 and hands each, after reading the request, to
    ``answer(conn, record)``; ``record`` holds the connection's opened/closed times."""

    def __init__(self, answer) -> None:
        self.answer = answer
        self.connections: list[dict] = []
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/hook"
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        self.sock.settimeout(0.1)
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            record = {"opened": time.monotonic(), "closed": None, "sent": 0}
            self.connections.append(record)
            threading.Thread(target=self._serve, args=(conn, record), daemon=True).start()

    def _serve(self, conn: socket.socket, record: dict) -> None:
        conn.settimeout(30)
        try:
            read_request(conn)
            self.answer(conn, record)
        except OSError:
            pass
        finally:
            record["closed"] = record["closed"] or time.monotonic()
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self.sock.close()


def drip(conn: socket.socket, record: dict, every_s: float = 0.5) -> None:
    """A byte of a valid answer every ``every_s``: never slow enough for a per-read timeout.
    Notes when the client hangs up (readable with nothing to read)."""
    for i in range(len(RESPONSE)):
        conn.sendall(RESPONSE[i:i + 1])
        ready, _, _ = select.select([conn], [], [], every_s)
        if ready and conn.recv(1) == b"":
            record["closed"] = time.monotonic()
            return


def flood(conn: socket.socket, record: dict) -> None:
    """A 200 that announces 256 MiB and sends it as fast as the client reads."""
    conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 268435456\r\n\r\n")
    chunk = b"\0" * 65536
    while record["sent"] < 268435456:
        conn.sendall(chunk)
        record["sent"] += len(chunk)


def endless_headers(conn: socket.socket, record: dict) -> None:
    conn.sendall(b"HTTP/1.1 200 OK\r\n")
    while True:
        conn.sendall(b"x-pad: " + b"a" * 1000 + b"\r\n")


@pytest.fixture
def raw_receiver():
    made: list[RawReceiver] = []

    def make(answer) -> RawReceiver:
        made.append(RawReceiver(answer))
        return made[-1]
    yield make
    for r in made:
        r.close()


def test_a_dripping_receiver_is_cut_at_the_total_deadline(raw_receiver):
    r = raw_receiver(drip)
    t0 = time.monotonic()
    result = post(check_url(r.url, allow_private=True), b"{}", {}, timeout_s=1.5,
                  max_response_bytes=65536)
    took = time.monotonic() - t0
    assert result.outcome == "timeout" and result.status_code is None, result
    assert 1.4 <= took < 2.5, took  # per-read timeouts alone would wait the whole drip (~38 s)
    (c,) = r.connections
    time.sleep(0.6)
    assert c["closed"] is not None and c["closed"] - t0 < 2.6  # the connection was dropped


def test_an_oversized_answer_is_not_read_past_the_cap(raw_receiver):
    r = raw_receiver(flood)
    t0 = time.monotonic()
    result = post(check_url(r.url, allow_private=True), b"{}", {}, timeout_s=10,
                  max_response_bytes=65536)
    took = time.monotonic() - t0
    # The status was read, so the answer counts; the body was read to the cap and dropped.
    assert result.outcome == "delivered" and result.status_code == 200, result
    assert 65536 - 4096 < result.bytes_read <= 65536, result.bytes_read
    assert took < 3, took  # not the deadline (10 s), not 256 MiB


def test_an_answer_whose_headers_exceed_the_cap_is_refused(raw_receiver):
    r = raw_receiver(endless_headers)
    result = post(check_url(r.url, allow_private=True), b"{}", {}, timeout_s=10,
                  max_response_bytes=4096)
    assert result.outcome == "response_too_large" and result.bytes_read == 4096, result


# --- the sender pool ----------------------------------------------------------------------------

@pytest.fixture
def settings(settings):  # the conftest's, with loopback receivers allowed
    return settings.model_copy(update={"webhook_allow_private": True, "webhook_poll_interval_s": 0,
                                       "webhook_timeout_s": 3.0, "webhook_max_attempts": 1,
                                       "webhook_senders": 4, "webhook_per_tenant": 1})


@pytest.fixture(params=["postgresql", "sqlite"])
def two_tenants(request, settings, dispatcher, tmp_path):
    """Clients for tenants t1 and t2 of one API, on each database backend."""
    from fastapi.testclient import TestClient

    from service.api.app import create_app
    from service.store.db import upgrade

    s = settings
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'senders.db'}"
        upgrade(url)
        s = settings.model_copy(update={"database_url": url})
    app = create_app(s, dispatcher=dispatcher)
    try:
        with TestClient(app, raise_server_exceptions=False) as c1:
            c2 = TestClient(app, raise_server_exceptions=False)
            for c, tenant in ((c1, "t1"), (c2, "t2")):
                c.headers["Authorization"] = f"Bearer {make_key(app.state.ctx.factory, tenant)}"
            yield c1, c2
    finally:
        app.state.ctx.engine.dispose()


def test_a_slow_receiver_holds_one_sender_while_other_tenants_are_served(
        two_tenants, subject_bytes, raw_receiver):
    """Tenant 1 has two deliveries to a receiver that drips; tenant 2 has one due now and one
    that falls due while the first drip is in flight. With one send per tenant at a time,
    tenant 1's two are sent one after the other, each cut at the 3 s deadline, and exactly
    once; tenant 2's both arrive while tenant 1's first is still dripping."""
    client, client_t2 = two_tenants
    ctx = client.app.state.ctx
    slow = raw_receiver(drip)
    fast = Receiver()
    try:
        slow_jobs = [cancelled_job(client, subject_bytes, slow.url) for _ in range(2)]
        fast_jobs = [cancelled_job(client_t2, subject_bytes, fast.url) for _ in range(2)]
        t_due = time.monotonic() + 0.8
        with ctx.factory.begin() as s:  # tenant 2's second falls due in 0.8 s
            row = s.scalars(sql_select(WebhookDelivery).join(Job)
                            .where(Job.id == uuid.UUID(fast_jobs[1]))).one()
            row.next_attempt_at = utcnow() + timedelta(seconds=0.8)
        t0 = time.monotonic()
        assert deliver_due(ctx.settings, ctx.factory) == 4
        took = time.monotonic() - t0
        time.sleep(0.6)  # the drip notices the last hang-up within its 0.5 s step
    finally:
        fast.close()
    first, second = slow.connections  # one connection per delivery: no double send
    for c in (first, second):  # cut at the 3 s deadline (the drip would take 35 s); the
        # receiver notes the opening late when this machine is busy, hence the low bound's slack
        assert c["closed"] is not None and 2.0 <= c["closed"] - c["opened"] < 4.0, c
    assert second["opened"] >= first["closed"] - 0.1  # tenant 1: one at a time
    assert len(fast.times) == 2
    assert fast.times[0] - t0 < 1.0
    assert t_due <= fast.times[1] < first["closed"]  # claimed while the drip ran
    assert 5.6 <= took < 9.0, took
    for jid in slow_jobs:
        assert [(d["result"], d["error"]) for d in deliveries(client, jid)] == \
            [("failed", "timeout")]
    for jid in fast_jobs:
        assert [d["result"] for d in deliveries(client_t2, jid)] == ["delivered"]


def test_a_claimed_row_stays_claimed_past_the_send_deadline(client, subject_bytes, raw_receiver):
    """The lease: while a send is in flight its row is not due, however long the send may
    take (up to the deadline), so a second sender cannot send it again meanwhile."""
    ctx = client.app.state.ctx
    slow = raw_receiver(drip)
    cancelled_job(client, subject_bytes, slow.url)
    runner = threading.Thread(target=deliver_due, args=(ctx.settings, ctx.factory))
    runner.start()
    try:
        deadline = time.monotonic() + 5
        while not slow.connections and time.monotonic() < deadline:
            time.sleep(0.05)
        assert slow.connections
        with ctx.factory() as s:
            row = s.scalars(sql_select(WebhookDelivery)).one()
            assert row.next_attempt_at > utcnow() + timedelta(
                seconds=ctx.settings.webhook_timeout_s)
        assert deliver_due(ctx.settings, ctx.factory) == 0  # another sender finds nothing due
    finally:
        runner.join(10)
    assert len(slow.connections) == 1


def test_a_tenant_with_many_due_rows_does_not_crowd_out_another(client, client_t2,
                                                                 subject_bytes):
    """Three of tenant 1's rows are due before tenant 2's one; two free senders, one send per
    tenant: the claim takes one of each (and leaves tenant 1's others due)."""
    from collections import Counter

    from service.jobs.webhooks import _claim

    ctx = client.app.state.ctx
    url = "http://127.0.0.1:9/hook"  # never sent to here
    for _ in range(3):
        cancelled_job(client, subject_bytes, url)
    cancelled_job(client_t2, subject_bytes, url)
    settings = ctx.settings.model_copy(update={"webhook_senders": 2})
    claimed = _claim(settings, ctx.factory, 2, Counter())
    assert len({c.tenant_id for c in claimed}) == 2
    busy = Counter({tenant_id(ctx.factory, "t1"): 1})  # tenant 1 still sending: nothing more for it, and t2's is taken
    assert _claim(settings, ctx.factory, 2, busy) == []
