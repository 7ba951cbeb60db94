"""Signed webhooks from the outbox, received by a real HTTP server on a free port and verified
with an implementation of the Standard Webhooks signature written here, independently of
``service.jobs.webhooks``. Jobs run in-process with the stand-in engine (as in test_pipeline)."""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from sqlalchemy import select

from service.jobs.pipeline import Pipeline
from service.jobs.webhooks import deliver_due
from service.store.models import DeliveryStatus, WebhookDelivery
from worker.engine.config import HardenConfig, stage_names

from . import fake_engine
from .conftest import make_key, submit_files


class Receiver:
    """Answers each POST with the next status of ``statuses`` (then 200) and keeps what came."""

    def __init__(self, statuses: list[int] | None = None, host: str = "127.0.0.1",
                 port: int = 0) -> None:
        self.statuses = list(statuses or [])
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.times: list[float] = []  # time.monotonic() of each request
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                outer.requests.append(({k.lower(): v for k, v in self.headers.items()}, body))
                outer.times.append(time.monotonic())
                status = outer.statuses.pop(0) if outer.statuses else 200
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://{host}:{self.port}/hooks/dare"

    def bodies(self) -> list[dict]:
        return [json.loads(b) for _, b in self.requests]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def verify(secret: str, headers: dict[str, str], body: bytes, tolerance_s: int = 300) -> bool:
    """Standard Webhooks, from the spec: HMAC-SHA256 keyed with base64-decoded secret (after
    'whsec_') over '{id}.{timestamp}.{body}', sent base64 after 'v1,'."""
    assert secret.startswith("whsec_")
    key = base64.b64decode(secret[len("whsec_"):])
    msg_id, ts = headers["webhook-id"], headers["webhook-timestamp"]
    if abs(time.time() - int(ts)) > tolerance_s:
        return False
    mac = hmac.new(key, msg_id.encode() + b"." + ts.encode() + b"." + body, hashlib.sha256)
    expected = base64.b64encode(mac.digest())
    return any(hmac.compare_digest(expected, sig.split(",", 1)[1].encode())
               for sig in headers["webhook-signature"].split(" ") if sig.startswith("v1,"))


def test_signature_matches_the_standard_webhooks_test_vector():
    """The vector in the Standard Webhooks reference libraries' tests (also Svix's)."""
    from service.jobs.webhooks import sign

    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    msg_id, ts = "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330
    body = b'{"test": 2432232314}'
    assert sign(secret, msg_id, ts, body) == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
    headers = {"webhook-id": msg_id, "webhook-timestamp": str(ts),
               "webhook-signature": "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="}
    assert verify(secret, headers, body, tolerance_s=10**10)  # the test's own verifier agrees


def test_backoff_doubles_with_jitter_up_to_the_cap():
    from service.jobs.webhooks import backoff_s
    from service.settings import Settings

    s = Settings(webhook_backoff_s=5, webhook_backoff_max_s=300)
    for attempt in range(1, 12):
        nominal = min(300, 5 * 2 ** (attempt - 1))
        delays = [backoff_s(attempt, s) for _ in range(50)]
        assert all(nominal / 2 <= d <= nominal for d in delays), (attempt, delays)
        assert len(set(delays)) > 1  # jittered
    assert backoff_s(10**6, s) <= 300


def test_url_check_refuses_non_public_addresses():
    from service.jobs.webhooks import UnsafeWebhookUrl, check_url

    check_url("https://93.184.216.34/hook", allow_private=False)  # a public address
    check_url("http://127.0.0.1:9/x", allow_private=True)
    for url in ("http://127.0.0.1/", "http://10.0.0.8/", "http://172.16.3.4/",
                "http://192.168.1.1/",
                "http://169.254.169.254/", "http://[fe80::1]/", "http://[fd00::1]/",
                "http://0.0.0.0/", "http://100.64.0.1/", "gopher://93.184.216.34/",
                "http:///nohost"):
        with pytest.raises(UnsafeWebhookUrl):
            check_url(url, allow_private=False)


@pytest.fixture
def settings(settings):  # the conftest's, with a loopback receiver allowed and quick retries
    return settings.model_copy(update={"webhook_allow_private": True, "webhook_backoff_s": 0.05,
                                       "webhook_poll_interval_s": 0})


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


@pytest.fixture
def ctx(client):
    return client.app.state.ctx


@pytest.fixture
def pipeline(ctx):
    return Pipeline(ctx.settings, ctx.factory, ctx.store, runner=fake_engine.run_stage)


@pytest.fixture
def submit(client, subject_bytes):
    def _submit(config: dict) -> str:
        files, data = submit_files(subject_bytes, config=json.dumps(config))
        r = client.post("/v1/jobs", files=files, data=data)
        assert r.status_code == 202, r.text
        return r.json()["id"]
    return _submit


def run_chain(pipeline: Pipeline, job_id: str) -> None:
    stage = "validate"
    while stage:
        stage = pipeline.run(job_id, stage, task_id=str(uuid.uuid4()))


def deliveries(client, job_id: str) -> list[dict]:
    events = client.get(f"/v1/jobs/{job_id}/events", params={"limit": 1000}).json()["items"]
    return [e["data"] for e in events if e["kind"] == "webhook_delivery"]


def secret_of(client) -> str:
    r = client.get("/v1/webhooks/secret")
    assert r.status_code == 200, r.text
    return r.json()["secret"]


def test_succeeded_job_is_delivered_once_signed_and_recorded(client, client_t2, ctx, submit,
                                                              pipeline, receiver):
    jid = submit({"webhook_url": receiver.url})
    run_chain(pipeline, jid)
    assert deliver_due(ctx.settings, ctx.factory) == 1
    assert deliver_due(ctx.settings, ctx.factory) == 0  # delivered: never sent again

    (headers, body), = receiver.requests
    secret = secret_of(client)
    assert verify(secret, headers, body)
    assert headers["webhook-id"].startswith("msg_")
    assert headers["content-type"] == "application/json"
    # Tampering with the body, the id or the timestamp breaks the signature.
    assert not verify(secret, headers, body.replace(b'"succeeded"', b'"failed"'))
    assert not verify(secret, {**headers, "webhook-id": "msg_other"}, body)
    later = str(int(headers["webhook-timestamp"]) + 1)
    assert not verify(secret, {**headers, "webhook-timestamp": later}, body)
    assert not verify("whsec_" + base64.b64encode(b"k" * 32).decode(), headers, body)

    payload = json.loads(body)
    assert payload["type"] == "job.succeeded"
    assert payload["data"]["id"] == jid and payload["data"]["status"] == "succeeded"
    assert payload["data"]["error"] is None
    assert payload["data"]["urls"]["self"] == f"/v1/jobs/{jid}"
    assert payload["timestamp"]
    assert deliveries(client, jid) == [{"msg_id": headers["webhook-id"], "type": "job.succeeded",
                                        "attempt": 1, "result": "delivered", "status_code": 200}]
    # The secret is the tenant's: stable, 32 random bytes; another tenant's does not verify it.
    assert secret_of(client) == secret and len(base64.b64decode(secret[6:])) == 32
    other = secret_of(client_t2)
    assert other != secret and not verify(other, headers, body)
    assert client.get("/v1/webhooks/secret", headers={"Authorization": "Bearer dare_nope"}
                      ).status_code == 401


def test_receiver_failing_twice_is_retried_with_backoff_until_delivered(client, ctx, submit,
                                                                        pipeline):
    receiver = Receiver([500, 503])
    try:
        jid = submit({"webhook_url": receiver.url})
        run_chain(pipeline, jid)
        deadline = time.monotonic() + 10
        while len(receiver.requests) < 3 and time.monotonic() < deadline:
            deliver_due(ctx.settings, ctx.factory)
            time.sleep(0.05)
    finally:
        receiver.close()
    assert len(receiver.requests) == 3
    ids = {h["webhook-id"] for h, _ in receiver.requests}
    assert len(ids) == 1  # the same message each time: receivers deduplicate on it
    secret = secret_of(client)
    assert all(verify(secret, h, b) for h, b in receiver.requests)
    seen = deliveries(client, jid)
    assert [(d["attempt"], d["result"], d.get("status_code"), d.get("error")) for d in seen] == \
        [(1, "retrying", 500, "http_5xx"), (2, "retrying", 503, "http_5xx"),
         (3, "delivered", 200, None)]
    assert "next_attempt_at" in seen[0] and "next_attempt_at" not in seen[2]
    with ctx.factory() as s:
        row = s.scalars(select(WebhookDelivery)).one()
        assert row.status is DeliveryStatus.delivered and row.attempts == 3
        assert row.last_status_code == 200 and row.delivered_at is not None


def test_delivery_gives_up_after_max_attempts(client, ctx, submit, pipeline):
    receiver = Receiver([500] * 10)
    settings = ctx.settings.model_copy(update={"webhook_max_attempts": 2})
    try:
        jid = submit({"webhook_url": receiver.url})
        run_chain(pipeline, jid)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            deliver_due(settings, ctx.factory)
            with ctx.factory() as s:
                if s.scalars(select(WebhookDelivery)).one().status is not DeliveryStatus.pending:
                    break
            time.sleep(0.05)
    finally:
        receiver.close()
    assert len(receiver.requests) == 2
    assert [d["result"] for d in deliveries(client, jid)] == ["retrying", "failed"]
    assert deliver_due(settings, ctx.factory) == 0


def test_failed_job_sends_job_failed_with_its_error(client, ctx, submit, pipeline, receiver):
    jid = submit({"webhook_url": receiver.url, "seed": fake_engine.FAIL_INPUT_SEED})
    run_chain(pipeline, jid)
    deliver_due(ctx.settings, ctx.factory)
    (payload,) = receiver.bodies()
    assert payload["type"] == "job.failed"
    assert payload["data"]["status"] == "failed"
    assert payload["data"]["error"]["code"] == "no_oracles"
    assert payload["data"]["error"]["stage"] == "mine"


def test_cancelled_job_sends_job_cancelled(client, ctx, submit, receiver):
    jid = submit({"webhook_url": receiver.url})
    assert client.post(f"/v1/jobs/{jid}/cancel").status_code == 202
    deliver_due(ctx.settings, ctx.factory)
    assert [p["type"] for p in receiver.bodies()] == ["job.cancelled"]


def test_stage_events_only_when_asked(client, ctx, submit, pipeline, receiver):
    quiet = submit({"webhook_url": receiver.url})
    loud = submit({"webhook_url": receiver.url, "webhook_stage_events": True})
    plain = submit({})  # no webhook_url: nothing at all
    for jid in (quiet, loud, plain):
        run_chain(pipeline, jid)
    deliver_due(ctx.settings, ctx.factory)
    by_job: dict[str, list[tuple[str, str | None]]] = {}
    for p in receiver.bodies():
        by_job.setdefault(p["data"]["id"], []).append((p["type"], p["data"]["stage"]["name"]))
    assert by_job[quiet] == [("job.succeeded", "evaluate")]
    assert plain not in by_job
    stages = stage_names(HardenConfig())
    expected = [x for s in stages for x in (("job.stage_started", s), ("job.stage_finished", s))]
    assert sorted(by_job[loud]) == sorted(expected + [("job.succeeded", "evaluate")])
    assert len(by_job[loud]) == 2 * len(stages) + 1


def test_private_webhook_urls_are_refused_at_submission(settings, dispatcher, subject_bytes):
    strict = settings.model_copy(update={"webhook_allow_private": False})
    with api_client(strict, dispatcher) as client:
        for url in ("http://127.0.0.1:8080/hook", "http://169.254.169.254/latest/meta-data",
                    "http://10.1.2.3/x", "http://[::1]/x", "http://localhost/x",
                    "http://[::ffff:127.0.0.1]/x"):
            files, data = submit_files(subject_bytes, config=json.dumps({"webhook_url": url}))
            r = client.post("/v1/jobs", files=files, data=data)
            assert r.status_code == 422, (url, r.text)
            assert r.headers["content-type"].startswith("application/problem+json")
            body = r.json()
            assert body["code"] == "invalid_webhook_url" and "webhook_url" in body["detail"], body
        config = json.dumps({"webhook_url": "ftp://x.org/"})
        files, data = submit_files(subject_bytes, config=config)
        r = client.post("/v1/jobs", files=files, data=data)
        assert r.status_code == 422 and "webhook_url" in r.json()["detail"]
        assert dispatcher.sent == []  # nothing was queued


def test_private_address_is_refused_again_at_delivery(client, ctx, submit, pipeline, receiver):
    jid = submit({"webhook_url": receiver.url})  # allowed when submitted ...
    run_chain(pipeline, jid)
    strict = ctx.settings.model_copy(update={"webhook_allow_private": False})
    deliver_due(strict, ctx.factory)  # ... but not by the time it is sent
    assert receiver.requests == []
    (d,) = deliveries(client, jid)
    assert d["result"] == "refused" and d["error"] == "refused_address"  # no address shown


def test_background_runner_in_the_api_delivers(settings, dispatcher, subject_bytes, receiver):
    polling = settings.model_copy(update={"webhook_poll_interval_s": 0.2})
    with api_client(polling, dispatcher) as c:
        files, data = submit_files(subject_bytes, config=json.dumps({"webhook_url": receiver.url}))
        r = c.post("/v1/jobs", files=files, data=data)
        assert r.status_code == 202, r.text
        ctx = c.app.state.ctx
        run_chain(Pipeline(ctx.settings, ctx.factory, ctx.store, runner=fake_engine.run_stage),
                  r.json()["id"])
        deadline = time.monotonic() + 10
        while not receiver.requests and time.monotonic() < deadline:
            time.sleep(0.1)
    assert [p["type"] for p in receiver.bodies()] == ["job.succeeded"]


@contextmanager
def api_client(settings, dispatcher) -> Iterator:  # noqa: ANN001
    """An API of its own (lifespan and background runner included), sending a key for tenant
    t1 like the conftest's client."""
    from fastapi.testclient import TestClient

    from service.api.app import create_app

    app = create_app(settings, dispatcher=dispatcher)
    try:
        with TestClient(app, raise_server_exceptions=False) as c:
            c.headers["Authorization"] = f"Bearer {make_key(app.state.ctx.factory, 't1')}"
            yield c
    finally:
        app.state.ctx.engine.dispose()
