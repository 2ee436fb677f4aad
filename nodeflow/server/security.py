"""Who may talk to the server, and how much one prompt may ask for.

- **Auth** (``--auth-token`` or ``$NODEFLOW_AUTH_TOKEN``): every route and the WebSocket
  need ``Authorization: Bearer <token>``. Browsers cannot set headers on a WebSocket or an
  ``<img>``, so ``?token=<token>`` is accepted too; it also sets an HttpOnly, SameSite=Strict
  cookie, so a web frontend opened once as ``/?token=...`` keeps working.
- **Origin** (CSRF, cross-site WebSocket hijacking): a browser request that changes state
  (any method but GET/HEAD/OPTIONS) or opens the WebSocket is refused (403) when its
  ``Origin`` is not the server's own (compared with ``Host``), unless ``--allow-origin``
  lists it; listed origins also get CORS headers.
- **Host** (DNS rebinding): while the server listens on loopback only, a request whose
  ``Host`` is not a loopback name is refused, unless ``--allow-host`` lists it.
- **Limits**: ``check_limits`` refuses literal inputs named ``width``/``height``/``batch_size``
  whose product exceeds ``--max-pixels``, and ``steps`` above ``--max-steps`` (ComfyUI's input
  names; the check knows no node type). Errors come in ComfyUI's ``node_errors`` shape.
- Upload size (``--max-upload-size``) and file-name confinement are enforced where files
  are read and written (``routes_files``, ``nodeflow.folders``).
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import networkx as nx
from aiohttp import hdrs, web

from nodeflow.graph import Graph, Link, NodeError, ValidationReport
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
        if given is None or not hmac.compare_digest(given.encode(), expected):
            return error_response(401, "unauthorized",
                                  "Missing or wrong token" if given else "Authentication required",
                                  "send 'Authorization: Bearer <token>' (or ?token=<token>)",
                                  headers={"WWW-Authenticate": 'Bearer realm="nodeflow"'})
        response = await handler(request)
        if from_query and not response.prepared:
            response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="Strict", path="/")
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


def same_origin(origin: str, host: str | None, scheme: str) -> bool:
    """Whether a browser ``Origin`` names the server the request was sent to (``Host``)."""
    parsed = urlsplit(origin)
    if parsed.scheme not in ("http", "https") or not host:
        return False
    a = _host_port(parsed.netloc, parsed.scheme)
    b = _host_port(host, scheme)
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


# -- resource limits --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ResourceLimits:
    """Limits on a prompt's literal inputs; 0 disables one."""

    max_pixels: int = 4096 * 4096
    max_steps: int = 1000

    def check(self, graph: Graph) -> list[NodeError]:
        errors: list[NodeError] = []
        for node in graph.nodes.values():
            inputs = node.inputs
            if self.max_pixels and "width" in inputs and "height" in inputs:
                w, h = _int(inputs["width"]), _int(inputs["height"])
                b = _int(inputs.get("batch_size", 1))
                if w is not None and h is not None and b is not None and w * h * b > self.max_pixels:
                    shown = f"{w} × {h}" + (f" × {b}" if "batch_size" in inputs else "")
                    errors.append(NodeError(
                        node.id, node.class_type, "value_bigger_than_max", "Image size over the server's limit",
                        "width", w, f"width × height × batch_size of at most {self.max_pixels:,} pixels",
                        f"{shown} = {w * h * b:,} pixels; lower width, height or batch_size "
                        f"(the server's --max-pixels is {self.max_pixels:,})"))
            if self.max_steps and "steps" in inputs:
                steps = _int(inputs["steps"])
                if steps is not None and steps > self.max_steps:
                    errors.append(NodeError(
                        node.id, node.class_type, "value_bigger_than_max", "Steps over the server's limit",
                        "steps", steps, f"at most {self.max_steps} steps",
                        f"the server's --max-steps is {self.max_steps}"))
        return errors


def _int(value: Any) -> int | None:
    if type(value) is Link or isinstance(value, bool) or not isinstance(value, (int, float)):
        return None  # a link, or a wrong type that validation reports itself
    return int(value)


def apply_limits(report: ValidationReport, errors: list[NodeError]) -> None:
    """Add limit errors to a validation report: the outputs they feed no longer run."""
    if not errors:
        return
    report.errors.extend(errors)
    runnable = set(report.outputs)
    broken: set[str] = set()
    for node_id in sorted({e.node_id for e in errors}, key=_id_order):
        reach = {node_id}
        if report.dag is not None and node_id in report.dag:
            reach |= nx.descendants(report.dag, node_id)
        hit = reach & runnable
        if hit:
            known = set(report.failed_outputs.get(node_id, []))
            report.failed_outputs[node_id] = sorted(known | hit, key=_id_order)
        broken |= hit
    report.outputs = [o for o in report.outputs if o not in broken]


def _id_order(node_id: str) -> tuple:
    return (0, int(node_id), "") if node_id.isdigit() else (1, 0, node_id)
