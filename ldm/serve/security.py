"""Who may drive the server: the Host, API key, Origin and Content-Type checks every request passes first.

A web page the user visits must not be able to generate through the user's browser, and a server open to the
network must ask for a key. `AccessGuard` refuses, in this order, before the app sees the request:
    Host          malformed (anything but `name`, IPv4 or `[IPv6]`, then `:digits`), or not a name this server
                  answers to (DNS rebinding: evil.example resolving to 127.0.0.1) -> 403 bad_host, on every route
    Authorization no `Bearer <key>` when the server has a key -> 401 unauthorized with WWW-Authenticate: Bearer;
                  the page (GET /, /static/...) and GET /v1/health stay open: the page must load to ask for
                  the key, and supervisors probe health
    Origin        (state-changing methods) a page of another site -> 403 bad_origin
    Content-Type  (state-changing methods) not application/json, so no HTML form can send the body without a
                  CORS preflight, which this server never grants -> 415 unsupported_media_type
Each refusal is the API's JSON error (`RequestError.body()`). Websocket handshakes are refused, all of them: no
route takes one.
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

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")  # in normal_host form
WILDCARD_BINDS = ("0.0.0.0", "::", "")
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
OPEN_PATHS = ("/", "/v1/health")  # and everything under /static/: what the page needs to load
DEFAULT_PORTS = {"http": 80, "https": 443}
HOST_NAME = re.compile(r"[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?)*")  # punycode
HOST_AND_PORT = re.compile(r"(?P<host>\[[^\[\]]*\]|[^\[\]:]*)(?::(?P<port>[0-9]+))?")

ASGIApp = Callable[[dict, Callable[[], Awaitable[dict]], Callable[[dict], Awaitable[None]]], Awaitable[None]]


def is_loopback(host: str) -> bool:
    """Whether listening on `host` (as `--host` names it) reaches this machine only."""
    try:
        host = normal_host(host)
    except ValueError:  # "" (every address) or not a host at all
        return False
    address = ip_address_of(host)
    return host == "localhost" or (address is not None and address.is_loopback)  # a name may resolve anywhere


def bound_names(host: str) -> tuple[str, ...]:
    """The Host names a server listening on `host` answers to, besides IP addresses (always accepted)."""
    if is_loopback(host):
        return LOOPBACK_NAMES
    if host in WILDCARD_BINDS:  # every address of the machine: its own name too
        return (*LOOPBACK_NAMES, socket.gethostname().lower())
    return (normal_host(host),)


def normal_host(name: str) -> str:
    """A host as Host headers are compared, the one form for allowed names and requests alike: a name in lower case
    without its trailing dot, an IPv4 address, or an IPv6 address (bare or in brackets) canonical and in brackets;
    ValueError for anything else (a scheme, port, path, zone id)."""
    host = name.strip().lower()
    if not host.startswith("["):
        host = host.removesuffix(".")  # `localhost.` is `localhost`, fully qualified
    address = ip_address_of(host)
    if address is not None:
        return f"[{address}]" if address.version == 6 else str(address)
    if not HOST_NAME.fullmatch(host):
        raise ValueError(f"{name!r} is not a host name: give the name alone, no scheme, port or path")
    return host


def ip_address_of(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address `host` is (`127.0.0.1`, `::1`, `[::1]`), or None: a name, an IPv4 address in brackets, an IPv6
    address with a zone id (which names an interface of the client, not this server) or junk."""
    bracketed = host.startswith("[") and host.endswith("]")
    try:
        address = ipaddress.ip_address(host[1:-1] if bracketed else host)
    except ValueError:
        return None
    if (bracketed and address.version == 4) or getattr(address, "scope_id", None) is not None:
        return None
    return address


def is_ip_address(host: str) -> bool:
    return ip_address_of(host) is not None


def host_and_port(value: str) -> tuple[str, int | None]:
    """`host[:port]` as a Host header or an origin's netloc says it: `[IPv6]` or a name or IPv4 address, then an
    optional port of digits, the host through `normal_host`; ValueError for anything else, such as junk after `]`
    or in the port (`[::1]evil.example`, `127.0.0.1:evil`)."""
    match = HOST_AND_PORT.fullmatch(value.strip())
    if match is None or (match["port"] is not None and int(match["port"]) > 65535):
        raise ValueError(f"{value!r} is not host[:port]")
    return normal_host(match["host"]), (None if match["port"] is None else int(match["port"]))


def host_of_header(host_header: str) -> str | None:
    """The host of a Host header value in `normal_host` form (`[::1]:8000` -> `[::1]`, `Example.LAN.:80` ->
    `example.lan`), or None when it is malformed."""
    try:
        return host_and_port(host_header)[0]
    except ValueError:
        return None


def normal_origin(origin: str) -> str:
    """An origin as browsers send it, `scheme://host[:port]`, the host through `normal_host` and without the
    scheme's default port (browsers omit it); ValueError for anything else."""
    try:
        parts = urlsplit(origin.strip().lower().rstrip("/"))
        if parts.scheme not in DEFAULT_PORTS or parts.path or parts.query or parts.fragment:
            raise ValueError(origin)  # to the one message below
        host, port = host_and_port(parts.netloc)
    except ValueError:
        raise ValueError(
            f"{origin!r} is not an origin: give scheme://host[:port], e.g. https://studio.example"
        ) from None
    default = port is None or port == DEFAULT_PORTS[parts.scheme]
    return f"{parts.scheme}://{host}" + ("" if default else f":{port}")


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
        """Why this request is refused, or None; `headers` by lower-case name, decoded as latin-1 (as
        AccessGuard does: every byte one character)."""
        host = headers.get("host", "")
        if not self.host_allowed(host):
            return RequestError(
                403,
                "bad_host",
                None,
                f"Host {host!r} is not a name this server answers to; if it should, start it with "
                f"--allow-host {host_of_header(host) or 'NAME'}",
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
        host = host_of_header(host_header)
        # DNS rebinding needs a name the attacker controls; an IP address names this machine (or its proxy)
        return host is not None and (host in self.allowed_hosts or is_ip_address(host))

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
