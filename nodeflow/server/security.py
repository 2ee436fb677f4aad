"""Who may talk to the server, and how much one prompt may ask for.

- **Auth** (``--auth-token`` or ``$NODEFLOW_AUTH_TOKEN``): every route and the WebSocket
  need ``Authorization: Bearer <token>``. Browsers cannot set headers on a WebSocket or an
  ``<img>``, so ``?token=<token>`` is accepted too; it also sets an HttpOnly, SameSite=Strict
  cookie, so a web frontend opened once as ``/?token=...`` keeps working.
- **Origin** (CSRF, cross-site WebSocket hijacking): a browser request that changes state
  (any method but GET/HEAD/OPTIONS) or opens the WebSocket is refused (403) when its
  ``Origin`` is not the server's own: scheme, host and port compared with the request's
  own scheme and ``Host``, unless ``--allow-origin`` lists it; listed origins also get CORS
  headers. ``X-Forwarded-*`` headers are not trusted: behind a reverse proxy that
  terminates TLS (so the page is https while the server sees http), list the public origin
  with ``--allow-origin https://name``.
- **Host** (DNS rebinding): while the server listens on loopback only, a request whose
  ``Host`` is not a loopback name is refused, unless ``--allow-host`` lists it.
- **Limits** on what one prompt may ask for (``--max-pixels``, ``--max-steps``) are checked
  by ``nodeflow.limits`` at validation and, as an executor hook, just before each node runs.
- **Logs**: ``AccessLogger`` writes the access log (``--access-log``) with ``token``
  query parameters redacted, in the URL and in the Referer.
- Upload size (``--max-upload-size``) and file-name confinement are enforced where files
  are read and written (``routes_files``, ``routes_uploads``, ``nodeflow.folders``).
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
from urllib.parse import unquote_plus, urlsplit

from aiohttp import hdrs, web
from aiohttp.abc import AbstractAccessLogger

from nodeflow.server.common import ServerConfig, error_response

log = logging.getLogger(__name__)

TOKEN_COOKIE = "nodeflow_token"
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


# -- auth -----------------------------------------------------------------------------------------


def auth_middleware(token: str):
    expected = token.encode()

    @web.middleware
    async def auth(request: web.Request, handler):
        if request.method == "OPTIONS" and hdrs.ACCESS_CONTROL_REQUEST_METHOD in request.headers:
            return await handler(request)  # CORS preflights carry no credentials
        given, from_query = _request_token(request)
        # Bytes that are not UTF-8 arrive as surrogates: compared as they came, never a failure.
        if given is None or not hmac.compare_digest(given.encode("utf-8", "surrogatepass"), expected):
            return error_response(401, "unauthorized",
                                  "Missing or wrong token" if given else "Authentication required",
                                  "send 'Authorization: Bearer <token>' (or ?token=<token>)",
                                  headers={"WWW-Authenticate": 'Bearer realm="nodeflow"'})
        response = await handler(request)
        if from_query and not response.prepared:
            response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="Strict", path="/",
                                secure=request.secure)
        return response

    return auth


def _request_token(request: web.Request) -> tuple[str | None, bool]:
    header = request.headers.get(hdrs.AUTHORIZATION, "")
    if header[:7].lower() == "bearer ":
        return header[7:].strip(), False
    if "token" in request.query:
        return request.query["token"], True
    cookie = request.cookies.get(TOKEN_COOKIE)
    return (cookie, False) if cookie else (None, False)


class AccessLogger(AbstractAccessLogger):
    """The access log (``--access-log``): address, time taken, request line, status, size,
    referer and user agent, with ``token`` query parameters redacted."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        version = request.version
        self.logger.info('%s "%s %s HTTP/%d.%d" %d %s "%s" "%s" %.3fs', request.remote or "-", request.method,
                         redact_token(request.raw_path), version.major, version.minor, response.status,
                         response.body_length, redact_token(request.headers.get(hdrs.REFERER, "-")),
                         request.headers.get(hdrs.USER_AGENT, "-"), time)


def redact_token(url: str) -> str:
    """``url`` with the value of each ``token`` query parameter replaced by ``[redacted]``."""
    head, sep, rest = url.partition("?")
    if not sep:
        return url
    query, hash_, fragment = rest.partition("#")
    parts = []
    for part in query.split("&"):
        key = part.split("=", 1)[0]
        parts.append(f"{key}=[redacted]" if unquote_plus(key) == "token" else part)
    return f"{head}?{'&'.join(parts)}{hash_}{fragment}"


# -- origin, CORS and host ------------------------------------------------------------------------


def is_loopback_host(host: str | None) -> bool:
    if not host:
        return False
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _host_port(netloc: str, scheme: str) -> tuple[str, int | None] | None:
    try:
        parts = urlsplit("//" + netloc)
        port = parts.port
    except ValueError:
        return None
    if not parts.hostname:
        return None
    return parts.hostname.lower(), port or {"http": 80, "https": 443, "ws": 80, "wss": 443}.get(scheme)


_WEB_SCHEMES = {"http": "http", "https": "https", "ws": "http", "wss": "https"}


def same_origin(origin: str, host: str | None, scheme: str) -> bool:
    """Whether a browser ``Origin`` names the server the request was sent to: the same
    scheme (``scheme``, the request's: http or https), host (``Host``) and port."""
    parsed = urlsplit(origin)
    own_scheme = _WEB_SCHEMES.get(scheme.lower())
    if parsed.scheme not in ("http", "https") or not host or parsed.scheme != own_scheme:
        return False
    a = _host_port(parsed.netloc, parsed.scheme)
    b = _host_port(host, own_scheme)
    return a is not None and a == b


def origin_middleware(config: ServerConfig):
    allowed = {o.rstrip("/").lower() for o in config.allow_origins if o != "*"}
    allow_all = "*" in config.allow_origins
    guard_host = all(is_loopback_host(h) for h in config.hosts)
    extra_hosts = {h.lower() for h in config.allow_hosts}

    @web.middleware
    async def origin_guard(request: web.Request, handler):
        if guard_host:
            host = request.host
            name = (urlsplit("//" + host).hostname or "") if host else ""
            if host and not (is_loopback_host(name) or name in extra_hosts):
                log.warning("refused a request for host %r (the server listens on loopback only)", host)
                return error_response(403, "forbidden_host", f"Host {host!r} is not served here",
                                      "the server listens on loopback; add --allow-host to accept this name")
        origin = request.headers.get(hdrs.ORIGIN)
        listed = origin is not None and (allow_all or origin.rstrip("/").lower() in allowed)
        if origin is not None and not listed:
            websocket = request.headers.get(hdrs.UPGRADE, "").lower() == "websocket"
            if (request.method not in _SAFE_METHODS or websocket) and \
                    not same_origin(origin, request.host, request.scheme):
                log.warning("refused a cross-origin %s %s from %s", request.method, request.path, origin)
                return error_response(403, "forbidden_origin", f"Cross-origin request from {origin} refused",
                                      "start the server with --allow-origin to accept this origin")
        if listed and request.method == "OPTIONS" and hdrs.ACCESS_CONTROL_REQUEST_METHOD in request.headers:
            response: web.StreamResponse = web.Response(status=204)
        else:
            response = await handler(request)
        if listed and not response.prepared:
            response.headers[hdrs.ACCESS_CONTROL_ALLOW_ORIGIN] = origin
            response.headers[hdrs.ACCESS_CONTROL_ALLOW_METHODS] = "GET, POST, PUT, DELETE, OPTIONS"
            response.headers[hdrs.ACCESS_CONTROL_ALLOW_HEADERS] = "Content-Type, Authorization"
            response.headers[hdrs.ACCESS_CONTROL_ALLOW_CREDENTIALS] = "true"
            response.headers[hdrs.VARY] = "Origin"
        return response

    return origin_guard
