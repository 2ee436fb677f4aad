"""Prompts, the queue, interruption and the history (their jobs view: ``routes_jobs``).

POST /prompt validates before queueing: a prompt with some valid outputs is queued with
the others reported in ``node_errors`` (200); one with none is refused (400) in ComfyUI's
error shape. Validation that is large or may read the disk runs off the event loop, and so
does every database call that may take long (clearing, deleting, reading the history).
"""

from __future__ import annotations

import asyncio
import functools
import time
import uuid
from typing import Any

from aiohttp import web
from pydantic import ValidationError

from nodeflow.graph import Graph, ValidationReport, WorkflowError, parse, validate
from nodeflow.limits import apply_limits
from nodeflow.node import Node
from nodeflow.queue import SENSITIVE_EXTRA_DATA_KEYS, DuplicatePrompt, QueueError, StorageError
from nodeflow.registry import Registry
from nodeflow.server.common import (
    DISPATCHER,
    HUB,
    LIMITS,
    QUEUE,
    REGISTRY,
    Param,
    Route,
    bad_request,
    dumps,
    error_body,
    error_response,
    json_response,
    raw_json,
    storage_unavailable,
)
from nodeflow.server.schemas import (
    Deleted,
    Freed,
    FreeRequest,
    History,
    InterruptRequest,
    PromptRequest,
    PromptResponse,
    PromptStatus,
    QueueAction,
    QueueResponse,
    WorkersResponse,
)
from nodeflow.spec import Combo

#: Prompts with more nodes than this are validated in a worker thread, not on the event loop;
#: so are prompts with a node whose validation may read the disk (file-listing choices,
#: custom ``validate_inputs``). Small in-memory validations (tens of µs) run inline.
INLINE_VALIDATION_MAX_NODES = 64
#: The largest POST /prompt body (the workflow, and the editor's copy of it in extra_data).
MAX_PROMPT_BYTES = 32 * 1024 * 1024


# -- POST /prompt ---------------------------------------------------------------------------------


async def post_prompt(request: web.Request) -> web.Response:
    app = request.app
    body = await read_limited(request, MAX_PROMPT_BYTES)
    if body is None:
        return error_response(413, "too_large", f"The request exceeds the limit of {MAX_PROMPT_BYTES:,} bytes "
                              "for a prompt", node_errors=True)
    try:
        req = PromptRequest.model_validate_json(body)
    except ValidationError as exc:
        return bad_request(exc)
    if req.prompt is None:
        return error_response(400, "no_prompt", "No prompt provided", node_errors=True)

    targets = req.partial_execution_targets
    try:
        if _validate_in_thread(app[REGISTRY], req.prompt):
            graph, report = await asyncio.to_thread(_check, app, req.prompt, targets)
        else:
            graph, report = _check(app, req.prompt, targets)
    except WorkflowError as exc:
        return json_response({"error": error_body("invalid_prompt", "Invalid prompt", str(exc)),
                              "node_errors": {}}, 400)
    answer = report.to_comfy(graph)
    if not report.ok:
        return json_response(answer, 400)

    extra = dict(req.extra_data)
    if req.client_id:
        extra["client_id"] = req.client_id
    sensitive = {k: extra.pop(k) for k in SENSITIVE_EXTRA_DATA_KEYS if k in extra}
    extra["create_time"] = int(time.time() * 1000)
    prompt_id = req.prompt_id or str(uuid.uuid4())
    try:
        item = app[QUEUE].put(prompt_id, graph.prompt, extra, report.outputs, number=req.number, front=req.front,
                              sensitive=sensitive, prepared=(graph, report))
    except DuplicatePrompt as exc:
        return error_response(400, "duplicate_prompt_id", "Duplicate prompt id", str(exc), node_errors=True)
    except StorageError as exc:  # nothing was queued: the client may send it again later
        return storage_unavailable(exc)
    except QueueError as exc:  # e.g. a number out of range, from a caller that skipped the schema
        return error_response(400, "invalid_request", "Cannot queue the prompt", str(exc), node_errors=True)
    app[HUB].queue_changed()
    return json_response({"prompt_id": item.prompt_id, "number": item.number, "node_errors": answer["node_errors"]})


async def read_limited(request: web.Request, limit: int) -> bytes | None:
    """The request's body, or None when it is longer than ``limit`` bytes."""
    if request.content_length is not None and request.content_length > limit:
        return None
    chunks, size = [], 0
    while chunk := await request.content.read(1 << 20):
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _validate_in_thread(registry: Registry, prompt: dict) -> bool:
    if len(prompt) > INLINE_VALIDATION_MAX_NODES:
        return True
    for node in prompt.values():
        cls = registry.get(node.get("class_type")) if isinstance(node, dict) \
            and isinstance(node.get("class_type"), str) else None
        if cls is not None and _may_touch_disk(cls):
            return True
    return False


@functools.cache
def _may_touch_disk(cls: type[Node]) -> bool:
    if cls.validate_inputs.__func__ is not Node.validate_inputs.__func__:
        return True
    return any(isinstance(spec, Combo) and callable(spec.choices) for spec, _ in cls.all_inputs().values())


def _check(app: web.Application, prompt: dict, targets: list[str] | None) -> tuple[Graph, ValidationReport]:
    graph = parse(prompt)
    report = validate(graph, app[REGISTRY], targets)
    apply_limits(report, app[LIMITS].check(graph))
    return graph, report


async def get_prompt(request: web.Request) -> web.Response:
    return json_response({"exec_info": {"queue_remaining": request.app[QUEUE].remaining()}})


# -- the queue ----------------------------------------------------------------------------------------


async def get_queue(request: web.Request) -> web.Response:
    queue = request.app[QUEUE]
    pending = queue.pending()
    return json_response({"queue_running": [i.to_comfy() for i in queue.running()],
                          "queue_pending": [i.to_comfy() for i in pending]})


async def post_queue(request: web.Request) -> web.Response:
    action = await _action(request, QueueAction)
    queue, deleted = request.app[QUEUE], 0
    if action.clear:
        deleted += await asyncio.to_thread(queue.clear_pending)
    if action.delete:
        deleted += await asyncio.to_thread(queue.delete_pending, action.delete)
    if deleted:
        request.app[HUB].queue_changed()
    return json_response({"deleted": deleted})


async def get_workers(request: web.Request) -> web.Response:
    """The workers that run prompts: id, host, pid, device, state, current prompt, models, count."""
    return json_response({"workers": request.app[DISPATCHER].workers()})


async def post_interrupt(request: web.Request) -> web.Response:
    """ComfyUI's answer: an empty 200, whether or not something was running."""
    action = await _action(request, InterruptRequest, empty_ok=True)
    # A remote worker answers over the network: off the event loop.
    await asyncio.to_thread(request.app[DISPATCHER].interrupt, action.prompt_id or None)
    return web.Response(status=200)


async def post_free(request: web.Request) -> web.Response:
    action = await _action(request, FreeRequest, empty_ok=True)
    freed = await asyncio.to_thread(request.app[DISPATCHER].free, action.unload_models, action.free_memory)
    return json_response({"freed": freed})


async def _action(request: web.Request, model: Any, empty_ok: bool = False) -> Any:
    raw = await request.read()
    if empty_ok and not raw.strip():
        return model()
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        raise web.HTTPBadRequest(text=bad_request(exc).text, content_type="application/json") from None


# -- the history -----------------------------------------------------------------------------------


async def get_history(request: web.Request) -> web.Response:
    query = request.query
    max_items = int_query(query, "max_items", minimum=0)
    offset = int_query(query, "offset")
    text = await asyncio.to_thread(request.app[QUEUE].history_json, max_items, offset)
    return raw_json(text)


async def get_history_item(request: web.Request) -> web.Response:
    text = await asyncio.to_thread(request.app[QUEUE].history_json, None, None, request.match_info["prompt_id"])
    return raw_json(text)


async def post_history(request: web.Request) -> web.Response:
    action = await _action(request, QueueAction)
    queue, deleted = request.app[QUEUE], 0
    if action.clear:
        deleted += await asyncio.to_thread(queue.clear_history)
    if action.delete:
        deleted += await asyncio.to_thread(queue.delete_history, action.delete)
    return json_response({"deleted": deleted})


#: Integer query parameters beyond this are refused (the database holds 64-bit integers).
QUERY_INT_LIMIT = 2 ** 53


def int_query(query: Any, name: str, minimum: int | None = None) -> int | None:
    """An integer query parameter (None when absent or empty); 400 in ComfyUI's error shape
    when it is not one, is below ``minimum`` or beyond ±``QUERY_INT_LIMIT``."""
    if name not in query or query[name] == "":
        return None
    try:
        value = int(query[name]) if len(query[name]) <= 20 else None
    except ValueError:
        value = None
    if value is None or (minimum is not None and value < minimum) or abs(value) > QUERY_INT_LIMIT:
        low = -QUERY_INT_LIMIT if minimum is None else minimum
        expected = f"an integer from {low} to {QUERY_INT_LIMIT}"
        raise web.HTTPBadRequest(text=dumps({"error": error_body("invalid_query", f"{name} must be {expected}",
                                                                 f"{name}={query[name][:100]!r}")}),
                                 content_type="application/json")
    return value


_INTEGER = {"type": "integer", "minimum": -QUERY_INT_LIMIT, "maximum": QUERY_INT_LIMIT}

ROUTES = [
    Route("POST", "/prompt", post_prompt, "Validate and queue a prompt", PromptRequest, PromptResponse, "queue",
          errors=(503,)),
    Route("GET", "/prompt", get_prompt, "Queue status", response=PromptStatus, tag="queue"),
    Route("GET", "/queue", get_queue, "Running and pending prompts", response=QueueResponse, tag="queue"),
    Route("POST", "/queue", post_queue, "Clear the queue or delete pending prompts", QueueAction, Deleted, "queue",
          errors=(503,)),
    Route("GET", "/workers", get_workers, "The workers that run prompts", response=WorkersResponse, tag="queue"),
    Route("POST", "/interrupt", post_interrupt, "Interrupt the running prompt (or only prompt_id); an empty "
          "answer, as ComfyUI's", InterruptRequest, tag="queue", body_required=False, media=()),
    Route("POST", "/free", post_free, "Release cached models and memory", FreeRequest, Freed, "queue",
          body_required=False),
    Route("GET", "/history", get_history, "Finished prompts, oldest first", response=History, tag="history",
          query=(Param("max_items", "the newest N", {"type": "integer", "minimum": 0, "maximum": QUERY_INT_LIMIT}),
                 Param("offset", "skip this many", _INTEGER)), errors=(400,)),
    Route("GET", "/history/{prompt_id}", get_history_item, "One finished prompt, as {prompt_id: entry} ({} if "
          "unknown)", response=History, tag="history"),
    Route("POST", "/history", post_history, "Clear the history or delete entries", QueueAction, Deleted, "history",
          errors=(503,)),
]
