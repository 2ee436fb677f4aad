"""Prompts, the queue, interruption, the history and the jobs view of them.

POST /prompt validates before queueing: a prompt with some valid outputs is queued with
the others reported in ``node_errors`` (200); one with none is refused (400) in ComfyUI's
error shape. Validation that is large or may read the disk runs off the event loop, and so
does every database call that may take long (clearing, deleting, reading the history).
The jobs view filters, sorts and pages the history in SQL and decodes only the page.
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
from nodeflow.queue import SENSITIVE_EXTRA_DATA_KEYS, DuplicatePrompt, QueueError, QueueItem, StorageError, workflow_id
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
    JobDetail,
    JobsResponse,
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
    request.app[DISPATCHER].interrupt(action.prompt_id or None)
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
    max_items = _int_query(query, "max_items", minimum=0)
    offset = _int_query(query, "offset")
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


def _int_query(query: Any, name: str, minimum: int | None = None) -> int | None:
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


# -- jobs (recent ComfyUI frontends read the queue and history this way) -----------------------------

JOB_STATUSES = ("pending", "in_progress", "completed", "failed", "cancelled")
#: How a finished job's status reads in the store (``PromptQueue.history_jobs``' outcomes).
_OUTCOMES = {"completed": "success", "failed": "error", "cancelled": "interrupted"}


async def get_jobs(request: web.Request) -> web.Response:
    query = request.query
    # Statuses this server does not know (a newer frontend's) match nothing.
    statuses = [s.strip().lower() for s in query.get("status", "").split(",") if s.strip()] or list(JOB_STATUSES)
    sort_by = query.get("sort_by", "created_at").lower()
    sort_order = query.get("sort_order", "desc").lower()
    if sort_by not in ("created_at", "execution_duration") or sort_order not in ("asc", "desc"):
        return error_response(400, "invalid_sort", "sort_by must be created_at or execution_duration, "
                              "sort_order asc or desc")
    limit = _int_query(query, "limit", minimum=1)
    offset = max(_int_query(query, "offset") or 0, 0)
    workflow = query.get("workflow_id") or None
    by_duration, descending = sort_by == "execution_duration", sort_order == "desc"

    # The queued jobs are in memory, the finished ones in SQLite: sort each by the same key,
    # take the first offset + limit of each, merge, and decode only the history rows shown.
    queue = request.app[QUEUE]
    queued = [(i, "in_progress") for i in queue.running()] if "in_progress" in statuses else []
    queued += [(i, "pending") for i in queue.pending()] if "pending" in statuses else []
    queued = [(i, s) for i, s in queued if workflow is None or workflow_id(i.extra_data) == workflow]
    keyed: list[tuple[tuple, str, Any]] = [(_queued_key(i, by_duration), i.prompt_id, (i, s)) for i, s in queued]
    total = len(keyed)
    done = [_OUTCOMES[s] for s in _OUTCOMES if s in statuses]
    if done:
        count, keys = await asyncio.to_thread(queue.history_jobs, outcomes=done, workflow=workflow,
                                              by_duration=by_duration, descending=descending,
                                              limit=None if limit is None else offset + limit)
        total += count
        keyed += [(key, pid, None) for key, pid in keys]
    keyed.sort(key=lambda k: k[0], reverse=descending)
    page = keyed[offset:offset + limit] if limit is not None else keyed[offset:]
    wanted = [pid for _, pid, queued_job in page if queued_job is None]
    rows = await asyncio.to_thread(queue.history_summaries, wanted) if wanted else {}
    jobs = []
    for _, pid, queued_job in page:
        if queued_job is not None:
            jobs.append(_queued_job(*queued_job))
        elif pid in rows:  # (deleted meanwhile otherwise)
            jobs.append(_history_job(pid, rows[pid]))
    return json_response({"jobs": jobs, "pagination": {"offset": offset, "limit": limit, "total": total,
                                                       "has_more": offset + len(page) < total}})


def _queued_key(item: QueueItem, by_duration: bool) -> tuple:
    """The sort key of a queued job, as ``PromptQueue.history_jobs`` makes them."""
    created = item.extra_data.get("create_time")
    created = created if isinstance(created, int) and not isinstance(created, bool) else 0
    key = (created, item.number, item.prompt_id)
    return (0, *key) if by_duration else key


async def get_job(request: web.Request) -> web.Response:
    pid = request.match_info["job_id"]
    queue = request.app[QUEUE]
    entry = (await asyncio.to_thread(queue.history, None, None, pid)).get(pid)
    if entry is not None:
        summary = (await asyncio.to_thread(queue.history_summaries, [pid])).get(pid)
        if summary is not None:
            _, _, prompt, extra, _ = entry["prompt"]
            return json_response({**_history_job(pid, summary), "outputs": entry.get("outputs") or {},
                                  "execution_status": entry.get("status") or {},
                                  "workflow": {"prompt": prompt, "extra_data": extra}})
    for item in queue.running():
        if item.prompt_id == pid:
            return json_response(_queued_job(item, "in_progress"))
    item = queue.get_pending(pid)
    if item is not None:
        return json_response(_queued_job(item, "pending"))
    return error_response(404, "not_found", "Job not found")


def _prune(job: dict) -> dict:
    return {k: v for k, v in job.items() if v is not None}


def _queued_job(item: QueueItem, status: str) -> dict:
    return _prune({"id": item.prompt_id, "status": status, "priority": item.number,
                   "create_time": item.extra_data.get("create_time"), "outputs_count": 0,
                   "workflow_id": workflow_id(item.extra_data)})


def _history_job(pid: str, row: dict) -> dict:
    """A finished job from ``PromptQueue.history_summaries``' row."""
    status = row["status"] if isinstance(row["status"], dict) else {}
    error, interrupted = None, False
    for message in status.get("messages", []):
        event, data = message if isinstance(message, list) and len(message) == 2 else (None, None)
        if event == "execution_error" and isinstance(data, dict):
            error = data
        interrupted = interrupted or event == "execution_interrupted"
    outputs = row["outputs"] if isinstance(row["outputs"], dict) else {}
    count, preview = _outputs_summary(outputs)
    state = "completed" if status.get("status_str") != "error" else "cancelled" if interrupted else "failed"
    return _prune({"id": pid, "status": state,
                   "priority": row["number"], "create_time": row["create_time"],
                   "execution_start_time": row["exec_start"], "execution_end_time": row["exec_end"],
                   "execution_error": error, "outputs_count": count, "preview_output": preview,
                   "workflow_id": row["workflow_id"]})


def _outputs_summary(outputs: dict) -> tuple[int, dict | None]:
    count, preview, fallback = 0, None, None
    for node_id, node_out in outputs.items():
        if not isinstance(node_out, dict):
            continue
        for media, items in node_out.items():
            if media == "animated" or not isinstance(items, list):
                continue
            for item in items:
                if not isinstance(item, dict):
                    continue
                count += 1
                if media in ("images", "video", "audio") and preview is None:
                    enriched = {**item, "nodeId": node_id, "mediaType": media}
                    if item.get("type") == "output":
                        preview = enriched
                    elif fallback is None:
                        fallback = enriched
    return count, preview or fallback


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
    Route("GET", "/jobs", get_jobs, "Queue and history as jobs", response=JobsResponse, tag="history",
          query=(Param("status", "comma-separated: pending, in_progress, completed, failed, cancelled (others "
                       "match nothing); all by default"), Param("workflow_id", "the editor workflow's id"),
                 Param("sort_by", "", {"type": "string", "enum": ["created_at", "execution_duration"]}),
                 Param("sort_order", "", {"type": "string", "enum": ["asc", "desc"]}),
                 Param("limit", "", {"type": "integer", "minimum": 1, "maximum": QUERY_INT_LIMIT}),
                 Param("offset", "", _INTEGER)),
          errors=(400,)),
    Route("GET", "/jobs/{job_id}", get_job, "One job with its outputs", response=JobDetail, tag="history",
          errors=(404,)),
]
