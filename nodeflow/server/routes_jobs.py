"""The jobs view of the queue and the history: what recent ComfyUI frontends read.

``GET /jobs`` filters, sorts and pages the finished jobs in SQL (``PromptQueue.history_jobs``)
and decodes only the page; the queued ones come from memory, sorted by the same keys. A job is
``pending``, ``in_progress``, ``completed``, ``failed`` or ``cancelled`` (an interrupted prompt);
statuses this server does not know match nothing, so a newer frontend's query still answers.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from nodeflow.queue import QueueItem, workflow_id
from nodeflow.server.common import QUEUE, Param, Route, error_response, json_response
from nodeflow.server.routes_prompt import QUERY_INT_LIMIT, int_query
from nodeflow.server.schemas import JobDetail, JobsResponse

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
    limit = int_query(query, "limit", minimum=1)
    offset = max(int_query(query, "offset") or 0, 0)
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
