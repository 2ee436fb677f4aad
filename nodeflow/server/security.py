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
- **Limits**, in two places. At validation, ``ResourceLimits.check`` refuses literal inputs
  named ``width``/``height``/``batch_size`` whose product exceeds ``--max-pixels``, and
  ``steps`` above ``--max-steps`` (ComfyUI's input names; the check knows no node type), in
  ComfyUI's ``node_errors`` shape. At run time, ``ResourceLimits.check_inputs`` sees each
  node's resolved inputs just before it runs (values that came through links too): the same
  ints, the size of LATENT (``{"samples": [B, C, h, w]}``: B·h·w·64 pixels), IMAGE
  (``[B, H, W, C]``) and MASK values, and the size that ``amount``, ``scale_by``,
  ``megapixels`` or padding would make of them; a violation fails the prompt with an
  ``execution_error`` naming the node, the input and the limit.
- **Logs**: ``AccessLogger`` writes the access log (``--access-log``) with ``token``
  query parameters redacted, in the URL and in the Referer.
- Upload size (``--max-upload-size``) and file-name confinement are enforced where files
  are read and written (``routes_files``, ``nodeflow.folders``).
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote_plus, urlsplit

from aiohttp import hdrs, web
from aiohttp.abc import AbstractAccessLogger

from nodeflow.graph import Graph, Link, NodeError, ValidationReport, id_order, reachable
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


    # -- at run time ------------------------------------------------------------------------------

    def check_inputs(self, node_id: str, class_type: str, kinds: Mapping[str, str], inputs: Mapping[str, Any]) -> None:
        """Check a node's resolved inputs just before it runs; raises ``LimitExceeded``.
        ``kinds`` gives each input's declared type (``LATENT``, ``IMAGE``, ``INT``, ...)."""
        where = f"node {node_id} ({class_type})"
        steps = _number(inputs.get("steps"))
        if self.max_steps and steps is not None and steps > self.max_steps:
            raise LimitExceeded(f"{where}: input 'steps' is {steps:g}, over the server's limit of {self.max_steps} "
                                f"steps (--max-steps)")
        if not self.max_pixels:
            return
        sizes: list[tuple[str, tuple[int, int, int]]] = []  # (input, (batch, height, width)) of pictures
        for name, value in inputs.items():
            size = picture_size(kinds.get(name, ""), value)
            if size is not None:
                sizes.append((name, size))
                kind = kinds.get(name) if kinds.get(name) in ("IMAGE", "MASK") else "LATENT"
                self._pixels(where, f"input '{name}' is {_shown(kind, size)}", size)
        for message, size in _made_sizes(inputs, sizes):
            self._pixels(where, message, size)

    def _pixels(self, where: str, what: str, size: tuple[int, int, int]) -> None:
        total = size[0] * size[1] * size[2]
        if total > self.max_pixels:
            raise LimitExceeded(f"{where}: {what} = {total:,} pixels, over the server's limit of "
                                f"{self.max_pixels:,} pixels (--max-pixels)")


class LimitExceeded(ValueError):
    """A node's inputs ask for more than the server's ``--max-pixels`` or ``--max-steps``."""


def picture_size(kind: str, value: Any) -> tuple[int, int, int] | None:
    """``(batch, height, width)`` in pixels of a LATENT (``{"samples": [B, C, h, w]}``, a
    pixel per 1/8 latent cell, also ``[B, C, T, h, w]``), an IMAGE (``[B, H, W, C]``) or a
    MASK (``[B, H, W]`` or ``[H, W]``); None for anything else. A dict with ``samples`` is
    taken for a LATENT whatever its declared type (``*`` inputs)."""
    if isinstance(value, dict) and (kind == "LATENT" or "samples" in value):
        shape = _shape(value.get("samples"))
        if shape is not None and len(shape) == 4:
            return shape[0], shape[2] * 8, shape[3] * 8
        if shape is not None and len(shape) == 5:
            return shape[0] * shape[2], shape[3] * 8, shape[4] * 8
        return None
    shape = _shape(value)
    if shape is None:
        return None
    if kind == "IMAGE" and len(shape) == 4:
        return shape[0], shape[1], shape[2]
    if kind == "MASK" and len(shape) in (2, 3):
        return (shape[0] if len(shape) == 3 else 1), shape[-2], shape[-1]
    return None


def _made_sizes(inputs: Mapping[str, Any], sizes: list[tuple[str, tuple[int, int, int]]]):
    """What a node will make, where its inputs tell: ``(description, (batch, h, w))``."""
    first = sizes[0][1] if sizes else None
    batch, height, width = first if first is not None else (1, 0, 0)
    w, h, b = _number(inputs.get("width")), _number(inputs.get("height")), _number(inputs.get("batch_size"))
    if w is not None and h is not None:
        if first is not None and height and width and (w == 0) != (h == 0):  # 0: keep the aspect ratio
            w, h = (w, w * height / width) if h == 0 else (h * width / height, h)
        given = f"width {w:g}, height {h:g}" + (f", batch_size {b:g}" if b is not None else "")
        b = b if b is not None else batch
        yield f"inputs {given} make {_shown('', (b, h, w))}", (b, h, w)
    if first is None:
        return
    amount = _number(inputs.get("amount"))
    if amount is not None:
        yield f"input 'amount' = {amount:g} makes {_shown('', (batch * amount, height, width))}", \
            (batch * amount, height, width)
    scale = _number(inputs.get("scale_by"))
    if scale is not None:
        size = (batch, height * scale, width * scale)
        yield f"input 'scale_by' = {scale:g} makes {_shown('', size)}", size
    megapixels = _number(inputs.get("megapixels"))
    if megapixels is not None:
        side = math.sqrt(megapixels * 1024 * 1024)
        yield f"input 'megapixels' = {megapixels:g} makes {batch} × {megapixels:g} megapixels", (batch, side, side)
    pads = [_number(inputs.get(k)) for k in ("left", "top", "right", "bottom")]
    if all(p is not None for p in pads):
        size = (batch, height + pads[1] + pads[3], width + pads[0] + pads[2])
        yield f"padding makes {_shown('', size)}", size


def _shown(kind: str, size: tuple) -> str:
    b, h, w = (f"{x:,.0f}" for x in size)
    return f"{'a ' + kind + ' of ' if kind else ''}{b} × {h} × {w}"


def _shape(value: Any) -> tuple[int, ...] | None:
    shape = getattr(value, "shape", None)
    if shape is None:
        return None
    try:
        return tuple(int(x) for x in shape)
    except (TypeError, ValueError):
        return None


def _number(value: Any) -> float | None:
    """An int or float input's value (not a bool, not NaN); None for anything else."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        return None
    return value


def _int(value: Any) -> int | None:
    if type(value) is Link or isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value):
        return None  # a link, or a wrong type that validation reports itself
    return int(value)


def apply_limits(report: ValidationReport, errors: list[NodeError]) -> None:
    """Add limit errors to a validation report: the outputs they feed no longer run."""
    if not errors:
        return
    report.errors.extend(errors)
    runnable = set(report.outputs)
    broken: set[str] = set()
    for node_id in sorted({e.node_id for e in errors}, key=id_order):
        reach = {node_id} | reachable(report.successors, [node_id])
        hit = reach & runnable
        if hit:
            known = set(report.failed_outputs.get(node_id, []))
            report.failed_outputs[node_id] = sorted(known | hit, key=id_order)
        broken |= hit
    report.outputs = [o for o in report.outputs if o not in broken]


