"""Who may drive the server: the Host, API key, Origin and Content-Type checks every request passes first.

A web page the user visits must not be able to generate through the user's browser, and a server open to the
network must ask for a key. `AccessGuard` refuses, in this order, before the app sees the request:
    Host          not a name this server answers to (DNS rebinding: evil.example resolving to 127.0.0.1)
                  -> 403 bad_host, on every route
    Authorization no `Bearer <key>` when the server has a key -> 401 unauthorized with WWW-Authenticate: Bearer;
                  the page (GET /, /static/...) and GET /v1/health stay open: the page must load to ask for
                  the key, and supervisors probe health
    Origin        (state-changing methods) a page of another site -> 403 bad_origin
    Content-Type  (state-changing methods) not application/json, so no HTML form can send the body without a
                  CORS preflight, which this server never grants -> 415 unsupported_media_type
Each refusal is the API's JSON error (`RequestError.body()`).
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import re
import socket
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from ldm.serve.errors import RequestError

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")
WILDCARD_BINDS = ("0.0.0.0", "::", "")
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
OPEN_PATHS = ("/", "/v1/health")  # and everything under /static/: what the page needs to load

ASGIApp = Callable[[dict, Callable[[], Awaitable[dict]], Callable[[dict], Awaitable[None]]], Awaitable[None]]


def is_loopback(host: str) -> bool:
    """Whether listening on `host` (as `--host` names it) reaches this machine only."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a name: it may resolve anywhere
        return False


def bound_names(host: str) -> tuple[str, ...]:
    """The Host names a server listening on `host` answers to, besides IP addresses (always accepted)."""
    if is_loopback(host):
        return LOOPBACK_NAMES
    if host in WILDCARD_BINDS:  # every address of the machine: its own name too
        return (*LOOPBACK_NAMES, socket.gethostname().lower())
    return (normal_host(host),)


HOST_NAME = re.compile(r"[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?)*")
HOST_HEADER = re.compile(r"(?P<name>\[[0-9a-f:.]+\]|[a-z0-9_.-]+)(:\d{1,5})?")


def normal_host(name: str) -> str:
    """A host name as Host headers are compared: lower case, no trailing dot, IPv6 bracketed and canonical;
    ValueError for anything else (a scheme, port, path, zone id)."""
    value = name.strip().lower()
    bare = value[1:-1] if value.startswith("[") and value.endswith("]") else value
    if ":" in bare:
        try:
            return f"[{ipaddress.IPv6Address(bare)}]" if "%" not in bare else ""
        except ValueError:
            pass
    elif HOST_NAME.fullmatch(bare.rstrip(".")) and bare == value:
        return bare.rstrip(".")
    raise ValueError(f"{name!r} is not a host name: give the name alone, no scheme, port or path")


def normal_origin(origin: str) -> str:
    """An origin as browsers send it, `scheme://host[:port]` in lower case; ValueError for anything else."""
    parts = urlsplit(origin.strip().lower().rstrip("/"))
    problem = ValueError(f"{origin!r} is not an origin: give scheme://host[:port], e.g. https://studio.example")
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.path or parts.query or parts.fragment:
        raise problem
    try:
        netloc = normal_netloc(parts.netloc)
    except ValueError:
        raise problem from None
    default_port = {"http": ":80", "https": ":443"}[parts.scheme]  # browsers leave it out
    return f"{parts.scheme}://{netloc.removesuffix(default_port)}"


def host_name(host_header: str) -> str:
    """The normal name of a Host header value (`[::1]:8000` -> `[::1]`, `Example.LAN.:80` -> `example.lan`);
    "" for anything that is not a name or address with an optional port (it is refused)."""
    match = HOST_HEADER.fullmatch(host_header.strip().lower())
    if match is None:
        return ""
    try:
        return normal_host(match["name"])
    except ValueError:
        return ""


def is_ip_address(name: str) -> bool:
    """Whether a normal name (`host_name`) is an IPv4 address or a bracketed IPv6 one."""
    bare = name[1:-1] if name.startswith("[") and name.endswith("]") else name
    try:
        address = ipaddress.ip_address(bare)
    except ValueError:
        return False
    return (address.version == 6) == (bare != name)


def normal_netloc(netloc: str) -> str:
    """host[:port] of an origin, compared as browsers send it: the normal name, the scheme's default port
    left out by the caller (`normal_origin`)."""
    match = HOST_HEADER.fullmatch(netloc)
    if match is None:
        raise ValueError(netloc)
    return normal_host(match["name"]) + (match.group(2) or "")


@dataclass(frozen=True)
class ServeAccess:
    """What the server accepts: `api_key` (None: no key asked), the Host names it answers to (the port is not
    compared: DNS cannot rebind it, and a proxy in front may forward its own) and, besides its own origin, the
    origins whose pages may post to it. The default is a loopback server without a key."""

    api_key: str | None = field(default=None, repr=False)  # never in a log line or traceback
    allowed_hosts: tuple[str, ...] = LOOPBACK_NAMES
    allowed_origins: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.api_key is not None and (not self.api_key or self.api_key != self.api_key.strip()):
            raise ValueError("api_key: must be non-empty, without surrounding whitespace")
        object.__setattr__(self, "allowed_hosts", tuple(normal_host(name) for name in self.allowed_hosts))
        object.__setattr__(self, "allowed_origins", tuple(normal_origin(origin) for origin in self.allowed_origins))

    @classmethod
    def for_bind(
        cls,
        host: str,
        api_key: str | None = None,
        allow_hosts: tuple[str, ...] = (),
        allow_origins: tuple[str, ...] = (),
    ) -> ServeAccess:
        """The access of a server listening on `host` (`ldm serve --host`): its own names plus `allow_hosts`."""
        return cls(api_key, (*bound_names(host), *allow_hosts), allow_origins)

    def refusal(self, method: str, path: str, headers: Mapping[str, str]) -> RequestError | None:
        """Why this request is refused, or None; `headers` by lower-case name."""
        host = headers.get("host", "")
        if not self.host_allowed(host):
            return RequestError(
                403,
                "bad_host",
                None,
                f"Host {host!r} is not a name this server answers to; if it should, start it with "
                f"--allow-host {host_name(host) or 'NAME'}",
            )
        if self.api_key is not None and not self.open_without_key(method, path):
            authorization = headers.get("authorization")
            if authorization is None or not self.key_matches(authorization):
                message = "this server needs its API key" if authorization is None else "the API key is wrong"
                return RequestError(
                    401,
                    "unauthorized",
                    None,
                    f"{message}: send `Authorization: Bearer <key>`",
                    headers={"WWW-Authenticate": "Bearer"},
                )
        if method in SAFE_METHODS:
            return None
        origin = headers.get("origin")
        if origin is not None and not self.origin_allowed(origin, host):
            return RequestError(
                403,
                "bad_origin",
                None,
                f"Origin {origin!r} is not this server's: a page of another site cannot use it "
                "(start the server with --allow-origin ORIGIN to let one)",
            )
        media_type = headers.get("content-type", "").partition(";")[0].strip().lower()
        if media_type != "application/json":
            return RequestError(
                415,
                "unsupported_media_type",
                None,
                f"the body must be JSON sent with `Content-Type: application/json`, got {media_type or 'none'}",
            )
        return None

    def host_allowed(self, host_header: str) -> bool:
        name = host_name(host_header)
        # DNS rebinding needs a name the attacker controls; an IP address names this machine (or its proxy)
        return bool(name) and (name in self.allowed_hosts or is_ip_address(name))

    def key_matches(self, authorization: str) -> bool:
        scheme, _, token = authorization.strip().partition(" ")
        # headers arrive as latin-1 text: encoding back gives the bytes the client sent, UTF-8 for a UTF-8 key
        sent = token.strip().encode("latin-1")
        return scheme.lower() == "bearer" and hmac.compare_digest(sent, self.api_key.encode())

    def origin_allowed(self, origin: str, host_header: str) -> bool:
        """The server's own origin (the Host the request came to; http or https, for a TLS proxy in front) or an
        allowed one. `null` (a sandboxed or file: page) is neither."""
        try:
            origin = normal_origin(origin)
        except ValueError:
            return False
        if origin in self.allowed_origins:
            return True
        try:  # the server's own: the Host it was reached at, under either scheme
            return origin in (normal_origin(f"{scheme}://{host_header.strip()}") for scheme in ("http", "https"))
        except ValueError:
            return False

    @staticmethod
    def open_without_key(method: str, path: str) -> bool:
        return method in ("GET", "HEAD") and (path in OPEN_PATHS or path.startswith("/static/"))


class AccessGuard:
    """ASGI middleware refusing what `access` refuses before the app runs. Pure ASGI, not BaseHTTPMiddleware:
    it passes the app's messages straight through, so streamed answers are not buffered."""

    def __init__(self, app: ASGIApp, access: ServeAccess) -> None:
        self.app, self.access = app, access

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "websocket":  # the API has no websocket route: refuse before anything reads it
            await receive()  # websocket.connect
            await send({"type": "websocket.close", "code": 1008})
            return
        if scope["type"] == "http":
            headers: dict[str, str] = {}
            for name, value in scope["headers"]:
                headers.setdefault(name.decode("latin-1").lower(), value.decode("latin-1"))
            error = self.access.refusal(scope["method"], scope["path"], headers)
            if error is not None:
                await send_error(send, error)
                return
        await self.app(scope, receive, send)


async def send_error(send: Callable, error: RequestError) -> None:
    """Answer `error` as the API's JSON error; this runs outside FastAPI's exception handlers."""
    body = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in error.headers.items()]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
