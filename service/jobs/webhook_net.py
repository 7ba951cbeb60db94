"""Where a webhook may go, and one POST that goes exactly there and ends on time.

SSRF, in three parts:

1. :func:`check_url` resolves the host **once** and refuses it unless every address is public
   (:func:`refusal_reason`), looking through the IPv6 forms that carry an IPv4 address
   (IPv4-mapped, IPv4-compatible, NAT64, 6to4, Teredo): ``2002:7f00:1::`` is 127.0.0.1 to a
   6to4 relay or the kernel's sit tunnel.
2. :func:`post` connects only to the addresses that were checked (:class:`_PinnedBackend`).
   Left to itself httpx would resolve the name again, and a DNS answer with a zero TTL can then
   say 127.0.0.1 (rebinding). The URL is left as it is, so the Host header, TLS SNI and the
   certificate check are still for the hostname.
3. No redirects and no proxy from the environment.

And a slow receiver: httpx's timeouts are per socket operation, so a receiver that drips one
byte per second holds a sender for ever. :func:`post` has a **total** deadline, enforced by a
watchdog that shuts the socket down whatever phase the exchange is in (TLS handshake included),
and reads at most ``max_response_bytes`` of the answer.

No database, FastAPI or Celery here.
"""
from __future__ import annotations

import ipaddress
import socket
import ssl
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import httpcore
import httpx

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Not reachable from the internet, or not unicast. Python's is_global misses some of these (and
# changed between 3.11 releases), so they are listed rather than trusted to the version at hand.
_V4_DENY = tuple(ipaddress.IPv4Network(n) for n in (
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16",
    "172.16.0.0/12", "192.0.0.0/24", "192.0.2.0/24", "192.88.99.0/24", "192.168.0.0/16",
    "198.18.0.0/15", "198.51.100.0/24", "203.0.113.0/24", "224.0.0.0/4", "240.0.0.0/4"))
_V6_DENY = tuple(ipaddress.IPv6Network(n) for n in (
    "::/8",  # unspecified, loopback, IPv4-compatible and -mapped (unwrapped before this)
    "64:ff9b:1::/48", "100::/64", "2001::/23", "2001:db8::/32", "3fff::/20", "5f00::/16",
    "fc00::/7", "fe80::/10", "fec0::/10", "ff00::/8"))
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")  # RFC 6052: the last 32 bits are the IPv4 host
_V4_COMPATIBLE = ipaddress.IPv6Network("::/96")
_SHARED = ipaddress.IPv4Network("100.64.0.0/10")


class UnsafeWebhookUrl(ValueError):
    """The URL cannot be used. ``code`` is coarse (``invalid_url``, ``unresolvable``,
    ``refused_address``) and the message never names a resolved address: an internal host's
    address is nobody's business outside."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def _kind(ip: IPAddress) -> str:
    """What a refused address is, in words, for the message."""
    if ip.is_unspecified:
        return "unspecified"
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link-local"
    if ip.is_multicast:
        return "multicast"
    if isinstance(ip, ipaddress.IPv4Address) and ip in _SHARED:
        return "shared (carrier-grade NAT)"
    if ip.is_private:
        return "private"
    if ip.is_reserved:
        return "reserved"
    return "non-public"


def _plain_reason(ip: IPAddress) -> str | None:
    deny = _V4_DENY if isinstance(ip, ipaddress.IPv4Address) else _V6_DENY
    if not ip.is_global or ip.is_multicast or any(ip in net for net in deny):
        return _kind(ip)
    return None


def _wrapped_ipv4(ip: ipaddress.IPv6Address) -> list[tuple[str, ipaddress.IPv4Address]]:
    """The IPv4 addresses an IPv6 address carries, each with the name of the wrapping."""
    out: list[tuple[str, ipaddress.IPv4Address]] = []
    if ip.ipv4_mapped is not None:
        out.append(("IPv4-mapped", ip.ipv4_mapped))
    elif ip in _NAT64:
        out.append(("NAT64", ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)))
    elif ip in _V4_COMPATIBLE and int(ip) > 1:
        out.append(("IPv4-compatible", ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)))
    if ip.sixtofour is not None:
        out.append(("6to4", ip.sixtofour))
    if ip.teredo is not None:
        server, client = ip.teredo
        out += [("Teredo", server), ("Teredo", client)]
    return out


def refusal_reason(ip: IPAddress) -> str | None:
    """``None`` when a webhook may reach ``ip`` (public unicast); otherwise what it is, e.g.
    ``'loopback'`` or ``'private, wrapped in 6to4'``.

    An IPv6 address that carries an IPv4 one is judged by that too. IPv4-mapped and NAT64 are
    only other spellings of the IPv4 address, so a public one inside is enough; the others
    (6to4, Teredo, IPv4-compatible) must also pass as IPv6 addresses themselves.
    """
    if isinstance(ip, ipaddress.IPv6Address):
        wrapped = _wrapped_ipv4(ip)
        for how, v4 in wrapped:
            if (reason := _plain_reason(v4)) is not None:
                return f"{reason}, wrapped in {how}"
        if wrapped and wrapped[0][0] in ("IPv4-mapped", "NAT64"):
            return None
    return _plain_reason(ip)


def resolve(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to, once, in the resolver's order (IPv6 scope ids kept,
    so a link-local address an operator allowed can be connected to)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def _resolve_within(host: str, port: int, timeout_s: float | None) -> list[str]:
    """:func:`resolve`, given up after ``timeout_s``: getaddrinfo cannot be interrupted, and a
    slow name server (the URL's owner may run it) must not stretch a send past its deadline.
    The lookup goes on in a daemon thread until the system resolver's own timeout ends it."""
    if timeout_s is None:
        return resolve(host, port)
    result: list[list[str]] = []
    error: list[BaseException] = []

    def run() -> None:
        try:
            result.append(resolve(host, port))
        except (OSError, UnicodeError) as e:  # handed to the caller
            error.append(e)

    t = threading.Thread(target=run, daemon=True, name="webhook-resolve")
    t.start()
    t.join(timeout_s)
    if error:
        raise error[0]
    if not result:
        raise TimeoutError(f"no answer within {timeout_s:g} s")
    return result[0]


@dataclass(frozen=True)
class Target:
    """A checked URL and the only addresses a POST to it may connect to."""
    url: httpx.URL
    host: str  # as httpcore will pass it to the network backend (IDNA, IPv6 without brackets)
    port: int
    addresses: tuple[str, ...]


def check_url(url: str, *, allow_private: bool, timeout_s: float | None = None) -> Target:
    """Parse, resolve once (within ``timeout_s``) and check ``url``; the :class:`Target` is what
    :func:`post` sends to. ``allow_private`` (DARE_WEBHOOK_ALLOW_PRIVATE) skips the address
    check but not the resolution, so even then the connection goes to the address resolved
    here."""
    try:
        u = httpx.URL(url)
        scheme, host, port = u.scheme, u.raw_host.decode("ascii"), u.port
    except (httpx.InvalidURL, ValueError, TypeError, UnicodeError) as e:
        raise UnsafeWebhookUrl("invalid_url", f"not a valid URL ({e})") from None
    if scheme not in ("http", "https") or not host:
        raise UnsafeWebhookUrl("invalid_url", "not an absolute http:// or https:// URL")
    port = port or (443 if scheme == "https" else 80)
    try:
        addresses = _resolve_within(host, port, timeout_s)
    except TimeoutError as e:
        raise UnsafeWebhookUrl("unresolvable", f"the host {u.host!r} did not resolve ({e})"
                               ) from None
    except (OSError, UnicodeError):
        addresses = []
    if not addresses:
        raise UnsafeWebhookUrl("unresolvable", f"the host {u.host!r} does not resolve")
    if not allow_private:
        for a in addresses:
            reason = refusal_reason(ipaddress.ip_address(a.split("%", 1)[0]))
            if reason is not None:
                raise UnsafeWebhookUrl(
                    "refused_address", f"the host {u.host!r} resolves to an address webhooks "
                    f"may not reach ({reason})")
    return Target(url=u, host=host, port=port, addresses=tuple(addresses))


# --- one POST -----------------------------------------------------------------------------------

class _Deadline:
    """Shuts down every socket it watches when the time is up. ``shutdown`` (not ``close``)
    because it wakes a thread blocked in ``recv``/``send`` on Linux; it is done on a ``dup`` of
    the socket, which stays valid after TLS wraps (and takes over) the original."""

    def __init__(self, seconds: float) -> None:
        self.at = time.monotonic() + seconds
        self.expired = False
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def remaining(self) -> float:
        return max(0.0, self.at - time.monotonic())

    def watch(self, sock: socket.socket) -> None:
        with self._lock:
            self._socks.append(sock.dup())
            if self.expired:
                self._shutdown(self._socks[-1])

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            for s in self._socks:
                self._shutdown(s)

    @staticmethod
    def _shutdown(s: socket.socket) -> None:
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # already closed by the peer or by us

    def close(self) -> None:
        self._timer.cancel()
        with self._lock:
            for s in self._socks:
                s.close()
            self._socks.clear()


@dataclass
class _Budget:
    left: int
    used: int = 0
    exceeded: bool = False


class _CappedStream(httpcore.NetworkStream):
    """Reads no more than the budget, in all, from the connection (after TLS, so it counts the
    HTTP answer: status line, headers and body)."""

    def __init__(self, inner: httpcore.NetworkStream, budget: _Budget) -> None:
        self._inner, self._budget = inner, budget

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        if self._budget.left <= 0:
            self._budget.exceeded = True
            raise httpcore.ReadError("the webhook receiver's answer is larger than the cap")
        data = self._inner.read(min(max_bytes, self._budget.left), timeout)
        self._budget.left -= len(data)
        self._budget.used += len(data)
        return data

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, timeout)

    def close(self) -> None:
        self._inner.close()

    def start_tls(self, ssl_context: ssl.SSLContext, server_hostname: str | None = None,
                  timeout: float | None = None) -> httpcore.NetworkStream:
        return _CappedStream(self._inner.start_tls(ssl_context, server_hostname, timeout),
                             self._budget)

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class _PinnedBackend(httpcore.SyncBackend):
    """httpcore's own socket backend, told to connect to the checked addresses in place of
    resolving the hostname again."""

    def __init__(self, target: Target, deadline: _Deadline, budget: _Budget) -> None:
        self._target, self._deadline, self._budget = target, deadline, budget
        self.connected_to: str | None = None

    def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                    local_address: str | None = None,
                    socket_options: Iterable[Any] | None = None) -> httpcore.NetworkStream:
        if (host, port) != (self._target.host, self._target.port):  # never: no redirects
            raise httpcore.ConnectError("only the checked host may be connected to")
        error: Exception = httpcore.ConnectError("no address to connect to")
        for address in self._target.addresses:  # in the resolver's order, like a browser
            left = self._deadline.remaining()
            if left <= 0:
                raise httpcore.ConnectTimeout("the webhook's deadline passed while connecting")
            try:
                stream = super().connect_tcp(address, port, min(timeout or left, left),
                                             local_address, socket_options)
            except (httpcore.ConnectTimeout, httpcore.ConnectError) as e:
                error = e  # try the next address, if any
                continue
            self.connected_to = address
            self._deadline.watch(stream.get_extra_info("socket"))
            return _CappedStream(stream, self._budget)
        raise error


class _PinnedTransport(httpx.HTTPTransport):
    def __init__(self, backend: _PinnedBackend) -> None:
        super().__init__(verify=_ssl_context(), trust_env=False, retries=0)
        # httpx offers no way to pass a network backend to the httpcore pool it builds, so the
        # pool is replaced by one like it (same TLS context) that has ours. One connection: the
        # transport lives for one POST.
        self._pool.close()
        self._pool = httpcore.ConnectionPool(ssl_context=_ssl_context(), max_connections=1,
                                             network_backend=backend)


@lru_cache(maxsize=1)
def _ssl_context() -> ssl.SSLContext:
    """httpx's default verification (certifi), built once: loading the CA file takes a while
    and a context is safe to share between threads."""
    return httpx.create_ssl_context(trust_env=False)


@dataclass
class PostResult:
    """What a POST came to. ``outcome`` is coarse and safe to show a tenant: ``delivered`` (2xx),
    ``http_3xx`` / ``http_4xx`` / ``http_5xx``, ``timeout`` (the total deadline),
    ``connect_error``, ``tls_error``, ``network_error`` or ``response_too_large`` (before the
    status line and headers were complete). ``detail`` is for the operator's log only."""
    outcome: str
    status_code: int | None = None
    connected_to: str | None = field(default=None, repr=False)
    bytes_read: int = 0
    detail: str = ""


def _status_outcome(status: int) -> str:
    return "delivered" if 200 <= status < 300 else f"http_{status // 100}xx"


def _failure_outcome(e: Exception, deadline: _Deadline, budget: _Budget) -> str:
    if deadline.expired or isinstance(e, httpx.TimeoutException):
        return "timeout"
    if budget.exceeded:
        return "response_too_large"
    if isinstance(e, httpx.ConnectError):
        cause: BaseException | None = e
        while cause is not None:
            if isinstance(cause, ssl.SSLError):
                return "tls_error"
            cause = cause.__cause__ or cause.__context__
        return "connect_error"
    return "network_error"


def post(target: Target, body: bytes, headers: Mapping[str, str], *, timeout_s: float,
         max_response_bytes: int) -> PostResult:
    """POST ``body`` to ``target`` (connecting only to its checked addresses), taking at most
    ``timeout_s`` in all and reading at most ``max_response_bytes`` of the answer. The body of
    the answer is read (to the cap) only so the receiver can finish writing; the status decides."""
    deadline = _Deadline(timeout_s)
    budget = _Budget(max_response_bytes)
    backend = _PinnedBackend(target, deadline, budget)
    status: int | None = None
    try:
        with httpx.Client(transport=_PinnedTransport(backend), follow_redirects=False,
                          trust_env=False, timeout=timeout_s) as client, \
                client.stream("POST", target.url, content=body, headers=dict(headers)) as r:
            status = r.status_code
            try:
                for _ in r.iter_raw():
                    pass
            except httpx.HTTPError:
                pass  # cut at the cap or the deadline: the status is what counts
    except httpx.HTTPError as e:
        if status is None:
            return PostResult(_failure_outcome(e, deadline, budget), None, backend.connected_to,
                              budget.used, f"{type(e).__name__}: {e}"[:300])
    finally:
        deadline.close()
    assert status is not None
    return PostResult(_status_outcome(status), status, backend.connected_to, budget.used)
