"""Open mode (``DARE_AUTH=open``, what ``dare serve`` uses on loopback) has no key to steal, so a
web page is the attacker: any site the developer visits can POST a multipart form to
``http://127.0.0.1:8000`` (a "simple" cross-site request needs no CORS preflight), and a site
whose DNS name is rebound to 127.0.0.1 can even read the answers. This ASGI middleware, installed
only in open mode, closes both:

- the ``Host`` must be a loopback name (``127.0.0.1``, ``localhost``, ``[::1]``, any port); a
  rebound name arrives with the attacker's host name -> 403 ``forbidden_host``;
- a request with an ``Origin`` header (browsers send one on every cross-site POST, and on
  same-origin ones too) must come from a loopback origin; ``Origin: null`` (sandboxed frames,
  ``file:`` pages) is refused as well -> 403 ``forbidden_origin``.

curl, scripts and the ``dare`` client send no ``Origin`` and address the server by the loopback
name they were given, so they work as before, without a token.
"""
from __future__ import annotations

import ipaddress
import logging
from typing import Any
from urllib.parse import urlsplit

from service.api.errors import problem_response

log = logging.getLogger("dare.api")

_SHOWN = 200  # characters of a refused header echoed back


def is_loopback_name(name: str) -> bool:
    """``localhost`` or a loopback IP literal (an IP literal cannot be rebound)."""
    name = name.lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def host_name(host: str) -> str | None:
    """The name in a ``Host`` header value (``name``, ``name:port``, ``[v6]:port``); None when
    the value is malformed."""
    if host.startswith("["):
        name, sep, rest = host[1:].partition("]")
        if not sep or (rest and not (rest.startswith(":") and rest[1:].isdigit())):
            return None
        return name
    name, sep, port = host.partition(":")
    if sep and not port.isdigit():
        return None  # a bare IPv6 address or garbage
    return name


def is_loopback_origin(origin: str) -> bool:
    """``http(s)://`` + a loopback name + an optional port, and nothing else."""
    try:
        parts = urlsplit(origin)
        parts.port  # noqa: B018 (raises ValueError on a bad port)
    except ValueError:
        return False
    if parts.scheme not in ("http", "https") or parts.username or parts.password or \
            parts.path or parts.query or parts.fragment or not parts.hostname:
        return False
    return is_loopback_name(parts.hostname)


def _forbidden_host(host: str) -> tuple[str, str]:
    return ("forbidden_host",
            f"this server runs without authentication (DARE_AUTH=open) and answers only requests "
            f"addressed to a loopback name, not Host {host[:_SHOWN]!r}, so that a web site whose "
            "name points at this machine cannot use it. Fix: use http://127.0.0.1:PORT or "
            "http://localhost:PORT; to serve other names, run with DARE_AUTH=required and an API "
            "key from `dare keys create --tenant NAME`")


def _forbidden_origin(origin: str) -> tuple[str, str]:
    return ("forbidden_origin",
            f"this server runs without authentication (DARE_AUTH=open) and refuses requests that "
            f"a web page from another origin ({origin[:_SHOWN]!r}) makes, which any site you visit "
            "could make. Fix: call the API from curl, a script or the dare client (they send no "
            "Origin header), from a page served on 127.0.0.1 or localhost, or run with "
            "DARE_AUTH=required and an API key from `dare keys create --tenant NAME`")


class OpenModeGuard:
    """Pure ASGI (bodies stream through untouched); refuses before the app reads anything."""

    def __init__(self, app: Any) -> None:
        self.app = app

    def refusal(self, scope: dict) -> tuple[str, str] | None:
        host = origin = None
        for k, v in scope.get("headers") or ():
            if k == b"host":
                host = v.decode("latin-1")
            elif k == b"origin":
                origin = v.decode("latin-1")
        # No Host at all is an HTTP/1.0 client talking to the socket directly, never a browser.
        if host is not None:
            name = host_name(host)
            if name is None or not is_loopback_name(name):
                return _forbidden_host(host)
        if origin is not None and not is_loopback_origin(origin):
            return _forbidden_origin(origin)
        return None

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        refused = self.refusal(scope)
        if refused is None:
            await self.app(scope, receive, send)
            return
        code, detail = refused
        log.warning("open mode: refused %s %s: %s", scope.get("method", "WEBSOCKET"),
                    scope.get("path"), code)
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})  # policy violation
            return
        response = problem_response(403, code, detail, instance=scope.get("path"))
        await response(scope, receive, send)
