"""How prompts run: workers, and the backends that provide them.

    Dispatcher ──execute(item, observer)──► Worker ──► Executor (in this process, or in a Ray actor)

- A ``Worker`` runs one prompt at a time on its own executor (its own run context, model
  manager and output cache) and reports ComfyUI's events through ``observer(event, data)``
  (every ``data`` carries ``prompt_id``). It never sends the final ``executing`` with
  ``node: None`` (the dispatcher does, after the history is written). ``execute`` returns the
  ``Outcome``; it raises ``WorkerLost`` when the worker died under the prompt (the prompt has
  not failed: the dispatcher runs it again elsewhere), and may raise anything else (the
  prompt then fails).
- A ``Backend`` is a set of workers: ``LocalBackend`` runs them in this process (one by
  default, as ``nodeflow run`` does); ``nodeflow.queue.ray_backend.RayBackend`` runs them as
  Ray actors, one per GPU, on this machine or across several.

``run_prompt`` is what every worker does with a prompt, wherever it is: validate it (again,
unless this process validated it), run it, and give ``execution_cached`` ComfyUI's meaning.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from nodeflow import events
from nodeflow.queue.store import Outcome, QueueItem

log = logging.getLogger(__name__)

Observer = Callable[[str, dict], None]

#: Worker states: "starting" (not ready yet), "ready" (the dispatcher calls it idle or busy),
#: "dead" (gone; a backend may be starting another in its place).
STARTING, READY, DEAD = "starting", "ready", "dead"


class BackendError(RuntimeError):
    """A backend cannot start as configured (the message says why and what to do)."""


class WorkerLost(Exception):
    """The worker died or became unreachable while running a prompt."""

    def __init__(self, worker: str, reason: str) -> None:
        self.worker, self.reason = worker, reason
        super().__init__(f"worker {worker} was lost: {reason}")


@dataclass
class WorkerInfo:
    """What a worker is and holds (``GET /api/workers`` shows it)."""

    id: str
    host: str = ""
    pid: int | None = None
    device: str = ""
    state: str = STARTING
    #: Model files it holds ("checkpoints/sd15.safetensors"), the most recently used last.
    models: list[str] = field(default_factory=list)
    #: Prompts it has run to an end (success, error or interrupted).
    done: int = 0
    #: When it last ran a prompt (time.time(); 0: never).
    last_used: float = 0.0
    #: Why it is dead, or failed to start.
    error: str | None = None
    #: ComfyUI's /system_stats device entry ({"name", "type", "index", "vram_total", ...}), if known.
    device_stats: dict | None = None


class Worker(Protocol):
    id: str

    def info(self) -> WorkerInfo:
        """The worker as last known (cheap: no remote call)."""

    def execute(self, item: QueueItem, observer: Observer) -> Outcome: ...

    def interrupt(self, prompt_id: str | None = None) -> bool: ...

    def free(self, unload_models: bool = False, free_memory: bool = False) -> bool: ...

    def close(self) -> None: ...


class Backend(Protocol):
    """The workers prompts run on."""

    def start(self, notify: Callable[[], None]) -> None:
        """Start the workers (may return before they are ready); ``notify()`` is called
        whenever a worker becomes ready or dead, from any thread."""

    def workers(self) -> list[Worker]:
        """Every worker, in a stable order (dead ones too, until replaced)."""

    def close(self) -> None: ...


# -- what a worker does with a prompt -------------------------------------------------------------


def run_prompt(executor: Any, item: QueueItem, observer: Observer) -> tuple[Outcome, list[str]]:
    """Run ``item`` on ``executor``; returns the outcome and the models the run used
    (``"kind/name"`` of the model inputs of the nodes that ran or were cached).

    A prompt queued by this process runs on the graph its submitter validated
    (``item.prepared``); any other (from before a restart, or sent to another process) is
    validated again first: the installed nodes or the files it names may differ.
    ``execution_cached`` is sent with ComfyUI's meaning: every node of the prompt that did not
    run because of the cache (the executor names only the cached nodes it needed, not those
    upstream of them)."""
    from nodeflow.graph import Graph, ValidationReport, parse

    prepared = item.prepared
    if isinstance(prepared, tuple) and len(prepared) == 2 and isinstance(prepared[0], Graph) \
            and isinstance(prepared[1], ValidationReport):
        graph, report = prepared
    else:
        graph = parse(item.prompt)
        report = executor.validate(graph, item.outputs or None)
        if not report.ok:
            return invalid_outcome(item, report, observer), []
    extra = {**item.extra_data, **item.sensitive}
    rewritten: dict[int, dict] = {}  # id(the executor's data) -> what was sent instead

    def watch(event: str, data: dict) -> None:
        if event == "execution_cached" and data.get("nodes"):
            new = {**data, "nodes": all_cached(graph, report, data["nodes"])}
            rewritten[id(data)] = new
            data = new
        observer(event, data)

    result = executor.execute(graph, report, prompt_id=item.prompt_id, observer=watch, extra_data=extra)
    messages = [[event, rewritten.get(id(data), data)] for event, data in result.messages]
    error = next((data for event, data in messages if event == "execution_error"), result.error)
    used = models_of(graph, executor.registry, [*result.cached, *result.executed])
    return Outcome(result.status, dict(result.ui), messages, error), used


def models_of(graph: Any, registry: Any, node_ids: Iterable[str]) -> list[str]:
    """The model files (``"kind/name"``) that these nodes' literal model inputs name."""
    found: dict[str, None] = {}
    for n in node_ids:
        node = graph.nodes.get(n)
        cls = registry.get(node.class_type) if node is not None else None
        for name, kind in getattr(cls, "model_inputs", {}).items():
            value = node.inputs.get(name)
            if isinstance(value, str):
                found[f"{kind}/{value}"] = None
    return list(found)


def prompt_models(prompt: dict, registry: Any) -> set[str]:
    """The model files an API-format prompt names (for routing; malformed nodes are skipped)."""
    found = set()
    for node in prompt.values():
        if not isinstance(node, dict) or not isinstance(node.get("class_type"), str):
            continue
        cls = registry.get(node["class_type"])
        inputs = node.get("inputs")
        if cls is None or not isinstance(inputs, dict):
            continue
        for name, kind in cls.model_inputs.items():
            if isinstance(inputs.get(name), str):
                found.add(f"{kind}/{inputs[name]}")
    return found


def all_cached(graph: Any, report: Any, cached: Iterable[str]) -> list[str]:
    """Every node the outputs depend on that will not run, given the cached nodes the
    executor needs (``cached``): those, and what lies upstream of them and nothing else
    needs. In run order. This is what ComfyUI's ``execution_cached`` lists."""
    cached = set(cached)

    def upstream(stop: set[str]) -> set[str]:
        seen: set[str] = set()
        stack = list(report.outputs)
        while stack:
            n = stack.pop()
            if n in seen or n not in graph.nodes:
                continue
            seen.add(n)
            if n not in stop:
                stack.extend(link.node for _, link in graph.nodes[n].links())
        return seen

    skipped = upstream(set()) - (upstream(cached) - cached)
    order = getattr(report, "order", None) or []  # validation's topological order, where it gives one
    if not skipped <= set(order):
        import networkx as nx

        order = list(nx.topological_sort(report.dag)) if report.dag is not None else list(graph.nodes)
    return [n for n in order if n in skipped]


def invalid_outcome(item: QueueItem, report: Any, observer: Observer) -> Outcome:
    """A queued prompt that no longer validates fails with every problem listed."""
    first = next((e for e in report.errors if e.node_id is not None), report.errors[0] if report.errors else None)
    start = events.execution_start(item.prompt_id)
    error = events.execution_error(item.prompt_id, "the prompt is no longer valid:\n" + report.summary(),
                                   node_id=first.node_id if first else None,
                                   node_type=first.class_type if first else None,
                                   exception_type="nodeflow.graph.ValidationError")
    observer("execution_start", start)
    observer("execution_error", error)
    return Outcome("error", {}, [["execution_start", start], ["execution_error", error]], error)


class ModelTracker:
    """The models a worker holds, the most recently used last (what the routing reads)."""

    def __init__(self) -> None:
        self._used: dict[str, float] = {}
        self._lock = threading.Lock()

    def touch(self, models: Iterable[str]) -> None:
        now = time.time()
        with self._lock:
            for m in models:
                self._used.pop(m, None)
                self._used[m] = now

    def clear(self) -> None:
        with self._lock:
            self._used.clear()

    def models(self) -> list[str]:
        with self._lock:
            return list(self._used)


# -- in this process --------------------------------------------------------------------------------


class LocalWorker:
    """A worker in this process: an ``Executor`` with its own run context and output cache.

    ``run_context``: its folders, device and precision (default: the process's default
    context, as ``nodeflow run`` uses). The hooks go to its executor (the server's resource
    limits, say)."""

    def __init__(self, registry: Any, *, worker_id: str = "local", run_context: Any = None, cache: Any = None,
                 before_node: Any = None, after_node: Any = None) -> None:
        from nodeflow.context import default
        from nodeflow.executor import Executor

        self.id = worker_id
        self.registry = registry
        self.run_context = run_context or default()
        self.executor = Executor(registry, cache, context=self.run_context, before_node=before_node,
                                 after_node=after_node)
        self._models = ModelTracker()
        self._info = WorkerInfo(worker_id, socket.gethostname(), os.getpid(), self.run_context.device or "auto",
                                READY)

    def info(self) -> WorkerInfo:
        info = self._info
        info.models = self._models.models()
        return info

    def execute(self, item: QueueItem, observer: Observer) -> Outcome:
        try:
            outcome, used = run_prompt(self.executor, item, observer)
        finally:
            self._info.last_used = time.time()
        self._models.touch(used)
        self._info.done += 1
        return outcome

    def interrupt(self, prompt_id: str | None = None) -> bool:
        return self.executor.interrupt(prompt_id)

    def free(self, unload_models: bool = False, free_memory: bool = False) -> bool:
        """Drop the cached node outputs (and with them the models they hold), and take the
        models off the GPU."""
        if unload_models or free_memory:
            self.executor.cache.clear()
            self._models.clear()
            manager = self.run_context.peek("model_manager")
            if manager is not None:
                manager.offload_all()
            return True
        return False

    def close(self) -> None:
        pass


class WorkerSet:
    """A fixed set of workers (a backend whose workers never change)."""

    def __init__(self, workers: Iterable[Worker]) -> None:
        self._workers = list(workers)
        if not self._workers:
            raise ValueError("a backend needs at least one worker")

    def start(self, notify: Callable[[], None]) -> None:
        notify()

    def workers(self) -> list[Worker]:
        return list(self._workers)

    def close(self) -> None:
        for worker in self._workers:
            worker.close()


class LocalBackend(WorkerSet):
    """``workers`` in-process workers (one by default, in the process's default run context).

    With more than one, each has its own run context on ``devices[i]`` (default: the CUDA
    devices in turn, else the default context's device), with the default context's folders,
    precision and fast-path settings (``--compile``, ``--cuda-graphs``), and its own output
    cache of ``cache_size`` entries. In-process workers share the GIL: they suit GPUs, where
    the work is on the device; Ray workers are separate processes."""

    def __init__(self, registry: Any, *, workers: int = 1, cache_size: int | None = None,
                 devices: list[str] | None = None, before_node: Any = None) -> None:
        from nodeflow import context
        from nodeflow.cache import OutputCache

        if workers < 1:
            raise ValueError(f"workers must be at least 1, not {workers}")
        self.registry = registry
        made: list[Worker] = []
        for i in range(workers):
            cache = OutputCache(cache_size) if cache_size is not None else None
            if workers == 1 and not devices:
                made.append(LocalWorker(registry, cache=cache, before_node=before_node))
                continue
            base = context.default()
            device = devices[i % len(devices)] if devices else _nth_device(i, base.device)
            ctx = context.RunContext(base.folders, device=device, precision=base.precision, compile=base.compile,
                                     cuda_graphs=base.cuda_graphs, name=f"local-{i + 1}")
            made.append(LocalWorker(registry, worker_id=f"local-{i + 1}", run_context=ctx, cache=cache,
                                    before_node=before_node))
        super().__init__(made)


def _nth_device(i: int, fallback: str | None) -> str | None:
    """The i-th CUDA device in turn when there are several (and none was chosen), else ``fallback``."""
    if fallback is not None:
        return fallback
    try:
        import torch
    except ImportError:
        return None
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return f"cuda:{i % count}" if count > 1 else None
