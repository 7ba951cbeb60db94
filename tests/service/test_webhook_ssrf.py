"""Webhook SSRF: every resolved address is checked, through the IPv6 forms that wrap an IPv4
address, and the POST connects to the address that was checked, not to whatever a second DNS
answer says (rebinding). Real loopback receivers; the resolver (``socket.getaddrinfo``, which
our code and httpcore both use) is replaced for made-up names only, and every TCP connect
httpcore makes is recorded."""
from __future__ import annotations

import datetime as dt
import ipaddress
import json
import socket
import ssl
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpcore
import pytest

from service.jobs import webhook_net
from service.jobs.webhook_net import UnsafeWebhookUrl, check_url, refusal_reason
from service.jobs.webhooks import deliver_due

from .conftest import submit_files
from .test_webhooks import Receiver, api_client, deliveries

PUBLIC_V4 = "93.184.216.34"
# 127.0.0.1 and 10.1.2.3 as IPv6 addresses a relay, a tunnel or the kernel delivers to them.
WRAPPED_INTERNAL = {
    "::ffff:127.0.0.1": ("IPv4-mapped", "loopback"), "::ffff:10.1.2.3": ("IPv4-mapped", "private"),
    "2002:7f00:1::": ("6to4", "loopback"), "2002:7f00:1:1::99": ("6to4", "loopback"),
    "2002:a01:203::1": ("6to4", "private"),
    # Teredo: server 65.54.227.120 (public), client = the last 32 bits inverted
    "2001:0:4136:e378:8000:63bf:80ff:fffe": ("Teredo", "loopback"),
    "2001:0:4136:e378:8000:63bf:f5fe:fdfc": ("Teredo", "private"),
    "64:ff9b::7f00:1": ("NAT64", "loopback"), "64:ff9b::a01:203": ("NAT64", "private"),
    "::7f00:1": ("IPv4-compatible", "loopback"), "::a01:203": ("IPv4-compatible", "private"),
}


def test_wrapped_loopback_and_private_addresses_are_refused():
    for address, (how, kind) in WRAPPED_INTERNAL.items():
        assert refusal_reason(ipaddress.ip_address(address)) == f"{kind}, wrapped in {how}", \
            address
    # The Teredo client above really is 127.0.0.1 / 10.1.2.3, as Python's own decoding says.
    assert ipaddress.ip_address("2001:0:4136:e378:8000:63bf:80ff:fffe").teredo[1] == \
        ipaddress.ip_address("127.0.0.1")
    assert ipaddress.ip_address("2001:0:4136:e378:8000:63bf:f5fe:fdfc").teredo[1] == \
        ipaddress.ip_address("10.1.2.3")


def test_other_non_public_addresses_are_refused_and_public_ones_pass():
    for address in ("0.0.0.0", "::", "::1", "127.8.9.10", "10.0.0.1", "172.16.0.1", "192.168.1.1",
                    "169.254.169.254", "100.64.0.1", "192.0.0.8", "192.0.2.1", "198.18.0.1",
                    "198.51.100.7", "203.0.113.9", "224.0.0.1", "239.255.255.250",
                    "240.0.0.1", "255.255.255.255", "192.88.99.1", "fe80::1", "fd00::1",
                    "fec0::1", "ff02::1", "ff0e::1", "2001:db8::1", "100::1", "64:ff9b:1::1"):
        assert refusal_reason(ipaddress.ip_address(address)) is not None, address
    for address in (PUBLIC_V4, "1.1.1.1", "2606:4700:4700::1111", "::ffff:93.184.216.34",
                    "64:ff9b::5db8:d822", "2002:5db8:d822::1"):  # public inside a wrapper too
        assert refusal_reason(ipaddress.ip_address(address)) is None, address


@pytest.fixture
def dns(monkeypatch):
    """Made-up names answered from a table of callables (called with the lookup's number,
    0 first); other names resolve as usual. Counts lookups per name."""
    answers: dict[str, Callable[[int], list[str]]] = {}
    calls: dict[str, int] = {}
    real = socket.getaddrinfo

    def fake(host, port, family=0, type=0, proto=0, flags=0):
        name = host.decode() if isinstance(host, bytes) else host
        if name not in answers:
            return real(host, port, family, type, proto, flags)
        n = calls.get(name, 0)
        calls[name] = n + 1
        out = []
        for ip in answers[name](n):
            if ":" in ip:
                out.append((socket.AF_INET6, socket.SOCK_STREAM, 6, "", (ip, int(port), 0, 0)))
            else:
                out.append((socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, int(port))))
        return out

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    fake.answers, fake.calls = answers, calls  # type: ignore[attr-defined]
    return fake


@pytest.fixture
def connects(monkeypatch):
    """Every TCP connect httpcore makes, as (host, port); hosts in ``.down`` fail to connect
    (a public address we must not actually reach from a test)."""
    seen: list[tuple[str, int]] = []
    down: set[str] = set()
    real = httpcore.SyncBackend.connect_tcp

    def record(self, host, port, *args, **kw):
        seen.append((host, port))
        if host in down:
            raise httpcore.ConnectError(f"{host} is unreachable (test)")
        return real(self, host, port, *args, **kw)

    monkeypatch.setattr(httpcore.SyncBackend, "connect_tcp", record)
    return type("Connects", (), {"seen": seen, "down": down})


def test_a_name_with_one_internal_address_among_public_ones_is_refused(dns):
    dns.answers["mixed.test"] = lambda n: [PUBLIC_V4, "2002:7f00:1::"]
    with pytest.raises(UnsafeWebhookUrl) as e:
        check_url("https://mixed.test/hook", allow_private=False)
    assert e.value.code == "refused_address" and "loopback, wrapped in 6to4" in str(e.value)
    assert "7f00" not in str(e.value) and PUBLIC_V4 not in str(e.value)  # no addresses told


def test_a_slow_name_server_does_not_stretch_the_deadline(dns):
    """The lookup counts against the send's time: a name server that takes 3 s to answer
    (the URL's owner may run it) is given up on after the 0.5 s allowed."""
    def slow(n: int) -> list[str]:
        time.sleep(3)
        return [PUBLIC_V4]
    dns.answers["slow.test"] = slow
    t0 = time.monotonic()
    with pytest.raises(UnsafeWebhookUrl) as e:
        check_url("https://slow.test/hook", allow_private=False, timeout_s=0.5)
    assert e.value.code == "unresolvable" and time.monotonic() - t0 < 1.5


@pytest.fixture
def settings(settings):  # the conftest's, with loopback receivers allowed at submission
    return settings.model_copy(update={"webhook_allow_private": True, "webhook_backoff_s": 0.05,
                                       "webhook_poll_interval_s": 0, "webhook_timeout_s": 3.0})


@pytest.fixture
def ctx(client):
    return client.app.state.ctx


def cancelled_job(client, subject_bytes, url: str) -> str:
    """A job with ``url`` as its webhook, cancelled at once: one job.cancelled delivery due."""
    files, data = submit_files(subject_bytes, config=json.dumps({"webhook_url": url}))
    r = client.post("/v1/jobs", files=files, data=data)
    assert r.status_code == 202, r.text
    jid = r.json()["id"]
    assert client.post(f"/v1/jobs/{jid}/cancel").status_code == 202
    return jid


def test_rebinding_cannot_send_the_post_to_loopback(client, ctx, subject_bytes, dns, connects):
    """The name resolves to a public address when checked and to the loopback receiver on every
    later lookup. The POST goes to the checked address (down, here), never to the receiver."""
    receiver = Receiver()
    try:
        dns.answers["rebind.test"] = lambda n: ["127.0.0.1"]
        jid = cancelled_job(client, subject_bytes, f"http://rebind.test:{receiver.port}/hook")
        dns.calls.clear()
        dns.answers["rebind.test"] = lambda n: [PUBLIC_V4] if n == 0 else ["127.0.0.1"]
        connects.down.add(PUBLIC_V4)
        strict = ctx.settings.model_copy(update={"webhook_allow_private": False,
                                                 "webhook_max_attempts": 1})
        assert deliver_due(strict, ctx.factory) == 1
    finally:
        receiver.close()
    assert receiver.requests == []
    assert connects.seen == [(PUBLIC_V4, receiver.port)]  # the checked address, and only it
    assert dns.calls == {"rebind.test": 1}  # resolved once
    (d,) = deliveries(client, jid)
    assert d["result"] == "failed" and d["error"] == "connect_error", d
    assert PUBLIC_V4 not in json.dumps(d) and "127.0.0.1" not in json.dumps(d)


def test_with_private_addresses_allowed_the_post_still_goes_to_the_checked_one(
        client, ctx, subject_bytes, dns, connects):
    """DARE_WEBHOOK_ALLOW_PRIVATE skips the address check, not the pinning: checked as
    127.0.0.1, connected to 127.0.0.1, though every later answer says 127.0.0.2."""
    first = Receiver()
    second = Receiver(host="127.0.0.2", port=first.port)
    try:
        dns.answers["pin.test"] = lambda n: ["127.0.0.1"]
        cancelled_job(client, subject_bytes, f"http://pin.test:{first.port}/hook")
        dns.calls.clear()
        dns.answers["pin.test"] = lambda n: ["127.0.0.1"] if n == 0 else ["127.0.0.2"]
        assert deliver_due(ctx.settings, ctx.factory) == 1
    finally:
        first.close()
        second.close()
    assert len(first.requests) == 1 and second.requests == []
    headers, _ = first.requests[0]
    assert headers["host"] == f"pin.test:{first.port}"  # the URL's host, not the address
    assert connects.seen == [("127.0.0.1", first.port)] and dns.calls == {"pin.test": 1}


@pytest.mark.parametrize("address", ["2002:7f00:1::", "::ffff:127.0.0.1", "::ffff:10.1.2.3",
                                     "2001:0:4136:e378:8000:63bf:80ff:fffe", "64:ff9b::7f00:1"])
def test_wrapped_internal_addresses_are_refused_at_send(client, ctx, subject_bytes, dns,
                                                        connects, address):
    dns.answers["wrapped.test"] = lambda n: [PUBLIC_V4]
    jid = cancelled_job(client, subject_bytes, "http://wrapped.test:8080/hook")
    dns.answers["wrapped.test"] = lambda n: [address]  # the name moved
    strict = ctx.settings.model_copy(update={"webhook_allow_private": False})
    assert deliver_due(strict, ctx.factory) == 1
    assert connects.seen == []
    (d,) = deliveries(client, jid)
    assert d["result"] == "refused" and d["error"] == "refused_address", d
    assert deliver_due(strict, ctx.factory) == 0  # refused is final


def test_wrapped_internal_addresses_are_refused_at_submission(settings, dispatcher,
                                                              subject_bytes, dns):
    dns.answers["internal.test"] = lambda n: ["10.9.8.7"]
    strict = settings.model_copy(update={"webhook_allow_private": False})
    with api_client(strict, dispatcher) as client:
        urls = [f"http://[{a}]:8080/x" for a in WRAPPED_INTERNAL] + ["http://internal.test/x"]
        for url in urls:
            files, data = submit_files(subject_bytes, config=json.dumps({"webhook_url": url}))
            r = client.post("/v1/jobs", files=files, data=data)
            assert r.status_code == 422, (url, r.text)
            body = r.json()
            assert body["code"] == "invalid_webhook_url" and "webhook_url" in body["detail"]
            assert "may not reach" in body["detail"], body
        assert "10.9.8.7" not in body["detail"]  # an internal name's address is not told
    assert dispatcher.sent == []


# --- TLS: SNI and the certificate are for the hostname, the connection for the address --------

def _ca_and_leaf(hostname: str) -> tuple[bytes, bytes, bytes]:
    """(CA certificate, leaf certificate, leaf key) in PEM, the leaf for ``hostname``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.UTC)

    def cert(subject: str, key, issuer: str, issuer_key, *, ca: bool, san: str | None = None):
        b = (x509.CertificateBuilder()
             .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
             .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
             .public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - dt.timedelta(hours=1))
             .not_valid_after(now + dt.timedelta(hours=1))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if ca:
            b = b.add_extension(x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            b = b.add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                                critical=False)
        else:
            b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName(san)]), critical=False)
            b = b.add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                issuer_key.public_key()), critical=False)
        return b.sign(issuer_key, hashes.SHA256())

    ca_key, leaf_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(2))
    ca = cert("test CA", ca_key, "test CA", ca_key, ca=True)
    leaf = cert(hostname, leaf_key, "test CA", ca_key, ca=False, san=hostname)
    pem = serialization.Encoding.PEM
    return (ca.public_bytes(pem), leaf.public_bytes(pem),
            leaf_key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption()))


class TlsReceiver:
    """An HTTPS receiver on 127.0.0.1 that records the SNI names and Host headers it sees."""

    def __init__(self, cert_pem: bytes, key_pem: bytes, tmp_path) -> None:
        (tmp_path / "c.pem").write_bytes(cert_pem)
        (tmp_path / "k.pem").write_bytes(key_pem)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(tmp_path / "c.pem", tmp_path / "k.pem")
        self.sni: list[str | None] = []
        self.hosts: list[str] = []
        ctx.sni_callback = lambda sock, name, c: self.sni.append(name)
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("content-length", 0)))
                outer.hosts.append(self.headers["host"])
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        class Server(ThreadingHTTPServer):
            def handle_error(self, request, client_address) -> None:
                pass  # a refused handshake is expected in one test

        self.server = Server(("127.0.0.1", 0), Handler)
        self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True,
                                             do_handshake_on_connect=False)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("cert_for, outcome", [("hooks.test", "delivered"),
                                               ("other.test", "tls_error")])
def test_tls_goes_to_the_pinned_address_with_the_hostname_for_sni_and_certificate(
        tmp_path, monkeypatch, dns, connects, cert_for, outcome):
    ca, leaf, key = _ca_and_leaf(cert_for)
    monkeypatch.setattr(webhook_net, "_ssl_context",
                        lambda: ssl.create_default_context(cadata=ca.decode()))
    receiver = TlsReceiver(leaf, key, tmp_path)
    try:
        dns.answers["hooks.test"] = lambda n: ["127.0.0.1"] if n == 0 else ["127.0.0.2"]
        target = check_url(f"https://hooks.test:{receiver.port}/h", allow_private=True)
        r = webhook_net.post(target, b"{}", {"content-type": "application/json"}, timeout_s=5,
                             max_response_bytes=65536)
    finally:
        receiver.close()
    assert r.outcome == outcome, r
    assert connects.seen == [("127.0.0.1", receiver.port)]
    assert receiver.sni == ["hooks.test"]
    assert receiver.hosts == ([f"hooks.test:{receiver.port}"] if outcome == "delivered" else [])
