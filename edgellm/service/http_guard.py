"""What every HTTP request passes before a route sees it: who it is (the bearer key, or the
address), and whether a web browser could have been made to send it.

A page any person on the plant network opens can POST to the service without a preflight
when the body is `text/plain`, and through DNS rebinding (its own name pointed at the
board) read the answers. So: POST bodies must be declared JSON (a cross-origin JSON POST
needs a preflight, which fails); a request carrying an `Origin` is refused unless that origin
is allowed (`--http-allow-origin`, which also answers its CORS preflights); and without an
API key, the `Host` must be an IP address or a name of this server (a rebinding page's Host is
its own domain). With keys, a page cannot send one it does not know, so Host is not checked.

The tenant a request belongs to goes into `scope["state"]["tenant"]`: the key's digest when
keys are set (one tenant per key), else the client's address. Cached prompts are reused only
within a tenant (the engine's `Job.tenant`).
"""
from __future__ import annotations

import hashlib
import hmac
import ipaddress
import socket
from typing import Any, Callable

from .http import HttpConfig, HttpError, shape_of

LOOPBACK_NAMES = ("localhost",)


def tenant_of_key(key: str) -> str:
    """A key's tenant: a digest, so the key itself never lands in logs or cache scopes."""
    return "key:" + hashlib.sha256(key.encode()).hexdigest()[:16]


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def host_names(config: HttpConfig) -> frozenset[str]:
    """The names a Host header may carry besides an IP address: localhost, this machine's
    name (and its mDNS `.local`), the bound host, and `--http-server-name`."""
    here = socket.gethostname().lower()
    names = {*LOOPBACK_NAMES, here, f"{here}.local", config.host.lower(), *(n.lower() for n in config.server_names)}
    return frozenset(n for n in names if n)


def _strip_port(host: str) -> str:
    if host.startswith("["):  # [v6]:port
        return host[1:host.find("]")] if "]" in host else host
    name, sep, port = host.rpartition(":")
    return name if sep and port.isdigit() and ":" not in name else host


def _is_json(content_type: str) -> bool:
    """application/json, with at most a UTF-8 charset (the only one the body is read as)."""
    media, *params = (part.strip().lower() for part in content_type.split(";"))
    for param in params:
        name, _, value = param.partition("=")
        if name.strip() == "charset" and value.strip().strip('"') not in ("utf-8", "utf8"):
            return False
    return media == "application/json"


class Guard:
    """ASGI middleware in front of the routes (and of starlette's CORS middleware, when origins
    are allowed): origin, host, key and content type, in that order."""

    def __init__(self, app: Any, config: HttpConfig) -> None:
        self.app = app
        self.keys = tuple((key.encode(), tenant_of_key(key)) for key in config.api_keys)
        self.origins = frozenset(config.allow_origins)
        self.names = host_names(config)

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        try:
            tenant = self._check(scope, headers)
        except HttpError as exc:
            await shape_of(scope["path"])(exc)(scope, receive, send)
            return
        scope.setdefault("state", {})["tenant"] = tenant
        await self.app(scope, receive, send)

    def _check(self, scope: dict, headers: dict[bytes, bytes]) -> str:
        origin = headers.get(b"origin")
        if origin is not None and "*" not in self.origins and origin.decode("latin-1") not in self.origins:
            raise HttpError(403, f"requests from web pages of origin {origin.decode('latin-1')[:100]!r} are not "
                                 "allowed: start the server with --http-allow-origin ORIGIN to allow them",
                            code="origin_not_allowed")
        if origin is not None and scope["method"] == "OPTIONS" and b"access-control-request-method" in headers:
            return ""  # an allowed origin's CORS preflight: answered by the CORS middleware
        if self.keys:
            tenant = self._tenant_of(headers.get(b"authorization", b""))
            if tenant is None and scope["path"] != "/health":
                raise HttpError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                                code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        else:
            self._check_host(headers.get(b"host"))
            tenant = f"addr:{scope['client'][0]}" if scope.get("client") else "addr:?"
        if scope["method"] == "POST" and not _is_json(headers.get(b"content-type", b"").decode("latin-1")):
            given = headers.get(b"content-type", b"").decode("latin-1")[:80] or "none"
            raise HttpError(415, f"the body must be JSON: send 'Content-Type: application/json' (got {given!r})",
                            code="unsupported_media_type")
        return tenant or ""

    def _tenant_of(self, authorization: bytes) -> str | None:
        """The tenant of the key sent as `Bearer KEY` (the scheme in any case), or None.
        Every key is compared, in constant time, so the time says nothing of which one matched."""
        scheme, _, token = authorization.strip().partition(b" ")
        found = None
        for key, tenant in self.keys:
            if hmac.compare_digest(token.strip(), key) and scheme.lower() == b"bearer":
                found = tenant
        return found

    def _check_host(self, host: bytes | None) -> None:
        if host is None:
            return  # HTTP/1.0 without Host: no browser sends that
        name = _strip_port(host.decode("latin-1").strip().lower()).rstrip(".")
        if not _is_ip(name) and name not in self.names:
            raise HttpError(403, f"Host {name[:100]!r} is not a name of this server (a guard against DNS "
                                 "rebinding without an API key): use its IP address, add --http-server-name "
                                 f"{name[:100]}, or set --api-key-file", code="host_not_allowed")

