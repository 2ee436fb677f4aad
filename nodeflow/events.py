"""ComfyUI's event payloads about a prompt, built in one place.

Every front end (the CLI's progress, the server's WebSocket, a history entry's status
messages) and every worker (in this process or a Ray actor) sends these same shapes:

    execution_start        {prompt_id, timestamp}
    execution_cached       {nodes, prompt_id, timestamp}
    executing              {node, display_node, prompt_id}      (node None: the prompt is over)
    progress               {value, max, prompt_id, node}
    executed               {node, display_node, output, prompt_id}
    execution_success      {prompt_id, timestamp}
    execution_error        {prompt_id, node_id, node_type, executed, exception_message,
                            exception_type, traceback, current_inputs, current_outputs, timestamp}
    execution_interrupted  {prompt_id, node_id, node_type, executed, timestamp}
    progress_state         {prompt_id, nodes: {id: {value, max, state, node_id, prompt_id,
                            display_node_id, parent_node_id, real_node_id}}}

``progress_state`` is derived from the others by ``ProgressState``, wherever a prompt's events
pass (the server's dispatcher, for every worker): ComfyUI's frontends know the running node
only from it.

``current_inputs`` is ComfyUI's: each input's value in a one-element list, made JSON-safe
(``render_inputs``: a tensor shows as ``"Tensor[1, 4, 64, 64]"``). Nothing here imports torch.
"""

from __future__ import annotations

import json
import math
import time
import traceback
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from nodeflow.listexec import is_output_list

#: Events that belong in a history entry's ``status.messages``.
STATUS_EVENTS = frozenset({"execution_start", "execution_cached", "execution_success", "execution_error",
                           "execution_interrupted"})
#: Strings, lists and dicts in ``current_inputs`` are cut to these sizes.
MAX_TEXT, MAX_ITEMS = 2000, 32


def now_ms() -> int:
    return int(time.time() * 1000)


def execution_start(prompt_id: str) -> dict:
    return {"prompt_id": prompt_id, "timestamp": now_ms()}


def executing(prompt_id: str, node: str | None) -> dict:
    return {"node": node, "display_node": node, "prompt_id": prompt_id}


def executed(prompt_id: str, node: str, output: dict) -> dict:
    return {"node": node, "display_node": node, "output": output, "prompt_id": prompt_id}


def execution_error(prompt_id: str, message: str, *, node_id: str | None = None, node_type: str | None = None,
                    executed: Iterable[str] = (), exception_type: str = "Exception",
                    traceback_lines: list[str] | None = None, current_inputs: dict | None = None,
                    current_outputs: Iterable[str] = ()) -> dict:
    return {"prompt_id": prompt_id, "node_id": node_id, "node_type": node_type, "executed": list(executed),
            "exception_message": message, "exception_type": exception_type, "traceback": traceback_lines or [],
            "current_inputs": current_inputs or {}, "current_outputs": list(current_outputs),
            "timestamp": now_ms()}


def error_from_exception(prompt_id: str, exc: BaseException, **where: Any) -> dict:
    """``execution_error`` for an exception (its type, message and traceback)."""
    return execution_error(prompt_id, str(exc) or type(exc).__name__, exception_type=exception_name(exc),
                           traceback_lines=traceback.format_exception(exc), **where)


def execution_interrupted(prompt_id: str, *, node_id: str | None = None, node_type: str | None = None,
                          executed: Iterable[str] = ()) -> dict:
    return {"prompt_id": prompt_id, "node_id": node_id, "node_type": node_type, "executed": list(executed),
            "timestamp": now_ms()}


def exception_name(exc: BaseException) -> str:
    return f"{type(exc).__module__}.{type(exc).__qualname__}"


# -- JSON ------------------------------------------------------------------------------------------


def dumps(value: Any) -> str:
    """Compact JSON of an event, a history entry or a response; an odd value (a tensor, a set)
    becomes a list or its repr rather than losing the whole message."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=_fallback)


def _fallback(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    return repr(value)


# -- progress_state ---------------------------------------------------------------------------------

PENDING, RUNNING, FINISHED, ERROR = "pending", "running", "finished", "error"


@dataclass
class NodeProgress:
    state: str = PENDING
    value: float = 0.0
    max: float = 1.0


def progress_state(prompt_id: str, nodes: Mapping[str, NodeProgress]) -> dict:
    """ComfyUI's ``progress_state``: every node that has started (not the pending ones)."""
    return {"prompt_id": prompt_id, "nodes": {
        n: {"value": p.value, "max": p.max, "state": p.state, "node_id": n, "prompt_id": prompt_id,
            "display_node_id": n, "parent_node_id": None, "real_node_id": n}
        for n, p in nodes.items() if p.state != PENDING}}


class ProgressState:
    """The state of each node of one prompt, followed through the prompt's events, as ComfyUI
    tracks it: a node is ``running`` from its ``executing`` (value 0 of 1) through its
    ``progress`` events, ``finished`` (value = max) once it is done or when it was cached, and
    ``error`` when it failed.

    ``update(event, data)`` returns ``(changed, before)``: whether a ``progress_state`` message
    is due, and whether it goes before the event (``executing``, ``progress``, the end of the
    prompt: the frontend sees the state first) or after it (``execution_cached``,
    ``executed``); ``message()`` builds it."""

    def __init__(self, prompt_id: str) -> None:
        self.prompt_id = prompt_id
        self.nodes: dict[str, NodeProgress] = {}
        self._running: str | None = None

    def message(self) -> dict:
        return progress_state(self.prompt_id, self.nodes)

    def update(self, event: str, data: Mapping[str, Any]) -> tuple[bool, bool]:
        if event == "execution_cached":
            cached = [n for n in data.get("nodes") or () if isinstance(n, str)]
            for n in cached:
                self.nodes[n] = NodeProgress(FINISHED, 1.0, 1.0)
            return bool(cached), False
        if event == "executing":
            node = data.get("node")
            if not isinstance(node, str):
                return False, True
            self._finish_running()
            self.nodes[node] = NodeProgress(RUNNING, 0.0, 1.0)
            self._running = node
            return True, True
        if event == "progress":
            node = data.get("node")
            value, total = data.get("value"), data.get("max")
            if not isinstance(node, str) or not _number(value) or not _number(total):
                return False, True
            self.nodes[node] = NodeProgress(RUNNING, float(value), float(total))
            return True, True
        if event == "executed":
            return data.get("node") == self._running and self._finish_running(), False
        if event == "execution_success":
            return self._finish_running(), True
        if event == "execution_error":
            node = data.get("node_id")
            if isinstance(node, str):
                entry = self.nodes.setdefault(node, NodeProgress())
                entry.state = ERROR
                self._running = None if node == self._running else self._running
                return True, True
        return False, True

    def _finish_running(self) -> bool:
        node, self._running = self._running, None
        if node is None:
            return False
        entry = self.nodes[node]
        entry.state, entry.value = FINISHED, entry.max
        return True


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# -- JSON-safe values -----------------------------------------------------------------------------


def render_inputs(inputs: Mapping[str, Any], hidden: Iterable[str] = ()) -> dict[str, list]:
    """A node's inputs as ComfyUI's ``current_inputs`` shows them: ``{name: [value]}``, JSON-safe;
    an input fed a list (``nodeflow.listexec.OutputList``) shows its values, as ComfyUI does."""
    skip = set(hidden)
    return {name: [json_safe(v, 1) for v in value[:MAX_ITEMS]] if is_output_list(value) else [json_safe(value)]
            for name, value in inputs.items() if name not in skip}


def json_safe(value: Any, depth: int = 0) -> Any:
    """A value for an event: JSON values as they are (long strings, lists and dicts cut short),
    a tensor as ``"Tensor[shape]"``, anything else as a short repr."""
    if value is None or isinstance(value, (bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, str):
        return value if len(value) <= MAX_TEXT else value[:MAX_TEXT] + "…"
    shape = getattr(value, "shape", None)
    if shape is not None:
        try:
            return f"{type(value).__name__}{[int(x) for x in shape]}"
        except (TypeError, ValueError):
            pass
    if depth < 3 and isinstance(value, (list, tuple)):
        items = [json_safe(v, depth + 1) for v in value[:MAX_ITEMS]]
        return [*items, "…"] if len(value) > MAX_ITEMS else items
    if depth < 3 and isinstance(value, dict):
        return {str(k): json_safe(v, depth + 1) for k, v in list(value.items())[:MAX_ITEMS]}
    text = repr(value)
    return text if len(text) <= 200 else text[:200] + "…"
