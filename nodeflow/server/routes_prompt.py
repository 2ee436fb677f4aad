"""Prompts, the queue, interruption, the history and the jobs view of them.

POST /prompt validates before queueing: a prompt with some valid outputs is queued with
the others reported in ``node_errors`` (200); one with none is refused (400) in ComfyUI's
error shape. Validation that is large or may read the disk runs off the event loop.
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
from nodeflow.node import Node
from nodeflow.queue import SENSITIVE_EXTRA_DATA_KEYS, DuplicatePrompt, QueueItem
from nodeflow.registry import Registry
from nodeflow.server.common import (DISPATCHER, HUB, LIMITS, QUEUE, REGISTRY, Route, error_body, error_response,
                                    json_response, raw_json)
from nodeflow.server.schemas import (FreeRequest, History, HistoryEntry, InterruptRequest, JobsResponse,
                                     PromptRequest, PromptResponse, PromptStatus, QueueAction, QueueResponse)
from nodeflow.server.security import apply_limits
from nodeflow.spec import Combo

#: Prompts with more nodes than this are validated in a worker thread, not on the event loop;
#: so are prompts with a node whose validation may read the disk (file-listing choices,
#: custom ``validate_inputs``). Small in-memory validations (tens of µs) run inline.
INLINE_VALIDATION_MAX_NODES = 64


# -- POST /prompt ---------------------------------------------------------------------------------


async def post_prompt(request: web.Request) -> web.Response:
    app = request.app
    try:
        req = PromptRequest.model_validate_json(await request.read())
    except ValidationError as exc:
        return _bad_request(exc)
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
    app[HUB].queue_changed()
    return json_response({"prompt_id": item.prompt_id, "number": item.number, "node_errors": answer["node_errors"]})


def _validate_in_thread(registry: Registry, prompt: dict) -> bool:
    if len(prompt) > INLINE_VALIDATION_MAX_NODES:
        return True
    for node in prompt.values():
        cls = registry.get(node.get("class_type")) if isinstance(node, dict) \
            and isinstance(node.get("class_type"), str) else None
        if cls is not None and _may_touch_disk(cls):
            return True
    return False


@functools.lru_cache(maxsize=None)
def _may_touch_disk(cls: type[Node]) -> bool:
    if cls.validate_inputs.__func__ is not Node.validate_inputs.__func__:
        return True
    return any(isinstance(spec, Combo) and callable(spec.choices) for spec, _ in cls.all_inputs().values())


def _check(app: web.Application, prompt: dict, targets: list[str] | None) -> tuple[Graph, ValidationReport]:
    graph = parse(prompt)
    report = validate(graph, app[REGISTRY], targets)
    apply_limits(report, app[LIMITS].check(graph))
    return graph, report


def _bad_request(exc: ValidationError) -> web.Response:
    errors = exc.errors(include_url=False)
    if any(e["type"] == "json_invalid" for e in errors):
        first = errors[0]
        body = error_body("invalid_json", "The request body is not valid JSON", str(first.get("msg", "")))
    else:
        details = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in errors)
        body = error_body("invalid_request", "Invalid request body", details)
    return json_response({"error": body, "node_errors": {}}, 400)


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
        deleted += queue.clear_pending()
    if action.delete:
        deleted += queue.delete_pending(action.delete)
    if deleted:
        request.app[HUB].queue_changed()
    return json_response({"deleted": deleted})


async def post_interrupt(request: web.Request) -> web.Response:
    action = await _action(request, InterruptRequest, empty_ok=True)
    interrupted = request.app[DISPATCHER].interrupt(action.prompt_id or None)
    return json_response({"interrupted": interrupted})


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
        raise web.HTTPBadRequest(text=_bad_request(exc).text, content_type="application/json") from None


# -- the history -----------------------------------------------------------------------------------


async def get_history(request: web.Request) -> web.Response:
    query = request.query
    max_items = _int_query(query, "max_items")
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
        deleted += queue.clear_history()
    if action.delete:
        deleted += queue.delete_history(action.delete)
    return json_response({"deleted": deleted})


def _int_query(query: Any, name: str) -> int | None:
    if name not in query or query[name] == "":
        return None
    try:
        return int(query[name])
    except ValueError:
        raise web.HTTPBadRequest(text=f'{{"error": "{name} must be an integer"}}',
                                 content_type="application/json") from None


# -- jobs (recent ComfyUI frontends read the queue and history this way) -----------------------------

JOB_STATUSES = ("pending", "in_progress", "completed", "failed")


async def get_jobs(request: web.Request) -> web.Response:
    query = request.query
    statuses = [s.strip().lower() for s in query.get("status", "").split(",") if s.strip()] or list(JOB_STATUSES)
    bad = [s for s in statuses if s not in JOB_STATUSES]
    if bad:
        return error_response(400, "invalid_status", f"Invalid status value(s): {', '.join(bad)}",
                              f"valid values: {', '.join(JOB_STATUSES)}")
    sort_by = query.get("sort_by", "created_at").lower()
    sort_order = query.get("sort_order", "desc").lower()
    if sort_by not in ("created_at", "execution_duration") or sort_order not in ("asc", "desc"):
        return error_response(400, "invalid_sort", "sort_by must be created_at or execution_duration, "
                              "sort_order asc or desc")
    limit = _int_query(query, "limit")
    if limit is not None and limit <= 0:
        return error_response(400, "invalid_limit", "limit must be a positive integer")
    offset = max(_int_query(query, "offset") or 0, 0)
    workflow_id = query.get("workflow_id")

    queue = request.app[QUEUE]
    jobs: list[dict] = []
    if "in_progress" in statuses:
        jobs += [_queued_job(i, "in_progress") for i in queue.running()]
    if "pending" in statuses:
        jobs += [_queued_job(i, "pending") for i in queue.pending()]
    if "completed" in statuses or "failed" in statuses:
        for pid, entry in (await asyncio.to_thread(queue.history)).items():
            job = _history_job(pid, entry)
            if job["status"] in statuses:
                jobs.append(job)
    if workflow_id:
        jobs = [j for j in jobs if j.get("workflow_id") == workflow_id]
    if sort_by == "execution_duration":
        def key(j: dict) -> float:
            start, end = j.get("execution_start_time"), j.get("execution_end_time")
            return end - start if start and end else 0
    else:
        def key(j: dict) -> tuple:
            return j.get("create_time") or 0, j.get("priority") or 0
    jobs.sort(key=key, reverse=sort_order == "desc")
    total = len(jobs)
    page = jobs[offset:offset + limit] if limit is not None else jobs[offset:]
    return json_response({"jobs": page, "pagination": {"offset": offset, "limit": limit, "total": total,
                                                       "has_more": offset + len(page) < total}})


async def get_job(request: web.Request) -> web.Response:
    pid = request.match_info["job_id"]
    queue = request.app[QUEUE]
    entry = (await asyncio.to_thread(queue.history, None, None, pid)).get(pid)
    if entry is not None:
        return json_response(_history_job(pid, entry, full=True))
    for item in queue.running():
        if item.prompt_id == pid:
            return json_response(_queued_job(item, "in_progress"))
    item = queue.get_pending(pid)
    if item is not None:
        return json_response(_queued_job(item, "pending"))
    return error_response(404, "not_found", "Job not found")


def _workflow_id(extra: dict) -> str | None:
    info = extra.get("extra_pnginfo")
    workflow = info.get("workflow") if isinstance(info, dict) else None
    return workflow.get("id") if isinstance(workflow, dict) else None


def _prune(job: dict) -> dict:
    return {k: v for k, v in job.items() if v is not None}


def _queued_job(item: QueueItem, status: str) -> dict:
    return _prune({"id": item.prompt_id, "status": status, "priority": item.number,
                   "create_time": item.extra_data.get("create_time"), "outputs_count": 0,
                   "workflow_id": _workflow_id(item.extra_data)})


def _history_job(pid: str, entry: dict, full: bool = False) -> dict:
    number, _, prompt, extra, _ = entry["prompt"]
    status = entry.get("status") or {}
    start = end = error = None
    for event, data in status.get("messages", []):
        if not isinstance(data, dict):
            continue
        if event == "execution_start":
            start = data.get("timestamp")
        elif event in ("execution_success", "execution_error", "execution_interrupted"):
            end = data.get("timestamp")
            if event == "execution_error":
                error = data
    outputs = entry.get("outputs") or {}
    count, preview = _outputs_summary(outputs)
    job = _prune({"id": pid, "status": "completed" if status.get("status_str") != "error" else "failed",
                  "priority": number, "create_time": extra.get("create_time"), "execution_start_time": start,
                  "execution_end_time": end, "execution_error": error, "outputs_count": count,
                  "preview_output": preview, "workflow_id": _workflow_id(extra)})
    if full:
        job.update(outputs=outputs, execution_status=status, workflow={"prompt": prompt, "extra_data": extra})
    return job


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


ROUTES = [
    Route("POST", "/prompt", post_prompt, "Validate and queue a prompt", PromptRequest, PromptResponse, "queue"),
    Route("GET", "/prompt", get_prompt, "Queue status", response=PromptStatus, tag="queue"),
    Route("GET", "/queue", get_queue, "Running and pending prompts", response=QueueResponse, tag="queue"),
    Route("POST", "/queue", post_queue, "Clear the queue or delete pending prompts", QueueAction, tag="queue"),
    Route("POST", "/interrupt", post_interrupt, "Interrupt the running prompt", InterruptRequest, tag="queue"),
    Route("POST", "/free", post_free, "Release cached models and memory", FreeRequest, tag="queue"),
    Route("GET", "/history", get_history, "Finished prompts, oldest first", response=History, tag="history",
          query=(("max_items", "the newest N"), ("offset", "skip this many"))),
    Route("GET", "/history/{prompt_id}", get_history_item, "One finished prompt ({} if unknown)",
          response=HistoryEntry, tag="history"),
    Route("POST", "/history", post_history, "Clear the history or delete entries", QueueAction, tag="history"),
    Route("GET", "/jobs", get_jobs, "Queue and history as jobs", response=JobsResponse, tag="history",
          query=(("status", "pending,in_progress,completed,failed"), ("workflow_id", ""),
                 ("sort_by", "created_at | execution_duration"), ("sort_order", "asc | desc"),
                 ("limit", ""), ("offset", ""))),
    Route("GET", "/jobs/{job_id}", get_job, "One job with its outputs", tag="history"),
]
