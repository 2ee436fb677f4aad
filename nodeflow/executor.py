"""Running a validated workflow: pruning, ordering, caching, events and interruption.

``Executor.execute`` runs only what the requested output nodes need, in a topological
order, skipping every node whose signature is in the cache (and everything only a cached
node needs). It reports through one observer, a callable ``observer(event, data)``, with
ComfyUI's event names and payloads, so the CLI, the server and tests share one stream:

``execution_start``, ``execution_cached`` (nodes), ``executing`` (node), ``progress``
(value, max, node), ``preview`` (node, image — not a ComfyUI message: the server turns it
into a binary frame when previews are on), ``executed`` (node, output), then one of
``execution_success``, ``execution_error`` (node_id, node_type, exception_message,
exception_type, traceback, ...) or ``execution_interrupted``.

The closing ``executing`` with ``node: None`` is left to the caller: a server must write
the history entry before sending it.

An executor runs in a run context (``nodeflow.context``: the worker's folders, device and
precision), activated for the length of each run, and offers three hooks, each called in the
executor's thread with the node id, its class and its resolved inputs:

- ``before_node(node_id, cls, inputs)`` just before ``run`` (e.g. the server's resource limits:
  raise to fail the node, with the exception's message in its ``execution_error``);
- ``after_node(node_id, cls, values, ui)`` once ``run`` returned, before the node's outputs are
  cached and its ``executed`` event sent (raising fails the node too);
- ``on_node_error(node_id, cls, inputs, exc)`` when the node (or a hook) raised; what this
  hook raises is logged, never passed on.
"""

from __future__ import annotations

import functools
import logging
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from nodeflow import context as run_context
from nodeflow import events
from nodeflow.cache import CacheEntry, OutputCache, signature
from nodeflow.graph import Graph, Link, ValidationReport, WorkflowError, parse, validate
from nodeflow.node import Interrupted, Node, Result
from nodeflow.registry import Registry

if TYPE_CHECKING:
    from nodeflow.context import RunContext
    from nodeflow.folders import Folders

log = logging.getLogger(__name__)

Observer = Callable[[str, dict], None]
BeforeNode = Callable[[str, "type[Node]", dict], None]
AfterNode = Callable[[str, "type[Node]", tuple, "dict | None"], None]
OnNodeError = Callable[[str, "type[Node]", dict, BaseException], None]


def _no_observer(event: str, data: dict) -> None:
    pass


class ValidationFailed(WorkflowError):
    """The workflow has errors that leave no output runnable."""

    def __init__(self, report: ValidationReport) -> None:
        self.report = report
        super().__init__("workflow is invalid:\n" + report.summary())


@dataclass
class ExecutionResult:
    prompt_id: str
    status: str  # "success" | "error" | "interrupted"
    #: The UI output of each output node that ran or was replayed from the cache.
    ui: dict[str, dict] = field(default_factory=dict)
    #: Every value produced or fetched in this run: node id -> tuple of outputs.
    values: dict[str, tuple] = field(default_factory=dict)
    executed: list[str] = field(default_factory=list)
    cached: list[str] = field(default_factory=list)
    error: dict | None = None
    #: Status messages in ComfyUI's history format: [event, data] pairs.
    messages: list[list] = field(default_factory=list)
    #: Finds a node's outputs in the executor's cache (set by the executor).
    _lookup: Callable[[str], tuple] | None = field(default=None, repr=False, compare=False)

    @property
    def ok(self) -> bool:
        return self.status == "success"

    def output(self, node_id: str, index: int = 0) -> Any:
        """The value of output ``index`` of node ``node_id``.

        Any node of the workflow whose outputs were computed in this run or are in the
        cache works, also one that a cached output made unnecessary to fetch (``values``
        holds only what the run needed). Raises ``KeyError`` naming the node when it has
        no outputs to give (it did not run, or is not in the workflow)."""
        node_id = str(node_id)
        values = self.values.get(node_id)
        if values is None:
            if self._lookup is None:
                raise KeyError(f"node {node_id} has no outputs in this run")
            values = self._lookup(node_id)
        if not -len(values) <= index < len(values):
            raise IndexError(f"node {node_id} has {len(values)} output(s); there is no output {index}")
        return values[index]


class _NodeContext:
    """The ``Context`` a node sees while it runs."""

    __slots__ = ("_emit", "_flag", "node_id", "prompt_id", "run")

    def __init__(self, prompt_id: str, node_id: str, emit: Observer, flag: threading.Event, run: RunContext) -> None:
        self.prompt_id, self.node_id, self._emit, self._flag, self.run = prompt_id, node_id, emit, flag, run

    @property
    def folders(self) -> Folders:
        """The folders of the worker running this node."""
        return self.run.folders

    def check_interrupted(self) -> None:
        if self._flag.is_set():
            raise Interrupted(f"interrupted in node {self.node_id}")

    def progress(self, value: int, total: int, preview: Any = None) -> None:
        self._emit("progress", {"value": value, "max": total, "prompt_id": self.prompt_id, "node": self.node_id})
        if preview is not None:
            self._emit("preview", {"image": preview, "prompt_id": self.prompt_id, "node": self.node_id})
        self.check_interrupted()


class Executor:
    """Runs workflows against a registry, keeping an output cache between runs.

    One workflow runs at a time per executor; ``interrupt()`` may be called from any thread.
    ``context``: the run context its runs use (default: the caller's current one, at each run).
    """

    def __init__(self, registry: Registry, cache: OutputCache | None = None, *, context: RunContext | None = None,
                 before_node: BeforeNode | None = None, after_node: AfterNode | None = None,
                 on_node_error: OnNodeError | None = None) -> None:
        self.registry = registry
        self.cache = cache if cache is not None else OutputCache()
        self.context = context
        self.before_node, self.after_node, self.on_node_error = before_node, after_node, on_node_error
        self._interrupt = threading.Event()
        self._lock = threading.Lock()
        self.running_prompt_id: str | None = None

    def interrupt(self, prompt_id: str | None = None) -> bool:
        """Ask the running workflow (or only ``prompt_id``) to stop at the next check."""
        running = self.running_prompt_id
        if running is None or (prompt_id is not None and prompt_id != running):
            return False
        self._interrupt.set()
        return True

    def validate(self, graph: Graph, outputs: Iterable[str] | None = None) -> ValidationReport:
        """Validate ``graph`` in this executor's run context (choices such as model names are
        this worker's)."""
        with run_context.activate(self.context or run_context.current()):
            return validate(graph, self.registry, outputs)

    def prepare(self, workflow: Any, outputs: Iterable[str] | None = None) -> tuple[Graph, ValidationReport]:
        """Parse and validate; raises ``WorkflowError`` / ``ValidationFailed`` when nothing can run."""
        graph = workflow if isinstance(workflow, Graph) else parse(workflow)
        report = self.validate(graph, outputs)
        if not report.ok:
            raise ValidationFailed(report)
        return graph, report

    def execute(self, graph: Graph, report: ValidationReport, *, prompt_id: str | None = None,
                observer: Observer | None = None, extra_data: dict | None = None) -> ExecutionResult:
        """Run the runnable outputs of a validated graph."""
        with self._lock:
            self._interrupt.clear()
            prompt_id = prompt_id or str(uuid.uuid4())
            self.running_prompt_id = prompt_id
            try:
                with run_context.activate(self.context or run_context.current()) as ctx:
                    return self._execute(graph, report, prompt_id, observer or _no_observer, extra_data or {}, ctx)
            finally:
                self.running_prompt_id = None
                self._interrupt.clear()

    def run(self, workflow: Any, **kw: Any) -> ExecutionResult:
        """Parse, validate and execute in one call."""
        graph, report = self.prepare(workflow, kw.pop("outputs", None))
        return self.execute(graph, report, **kw)

    # -- internals ------------------------------------------------------------------------

    def _execute(self, graph: Graph, report: ValidationReport, prompt_id: str, observer: Observer,
                 extra_data: dict, ctx: RunContext) -> ExecutionResult:
        result = ExecutionResult(prompt_id, "success")

        def status(event: str, data: dict) -> None:
            data = {"prompt_id": prompt_id, "timestamp": events.now_ms(), **data}
            result.messages.append([event, data])
            observer(event, data)

        status("execution_start", {})
        order, keys = self._plan(graph, report)
        result._lookup = functools.partial(self._lookup, graph, keys)
        # Pin what the cache holds now, then walk back from the outputs: a cached node's
        # upstream is not needed at all.
        hits = self.cache.get_many(keys)
        needed: set[str] = set()
        stack = list(report.outputs)
        while stack:
            n = stack.pop()
            if n in needed:
                continue
            needed.add(n)
            if n not in hits:
                stack.extend(link.node for _, link in graph.nodes[n].links())
        cached = [n for n in order if n in needed and n in hits]
        to_run = [n for n in order if n in needed and n not in hits]
        result.cached = cached
        status("execution_cached", {"nodes": cached})

        values = result.values
        for n in cached:
            entry = hits[n]
            values[n] = entry.values
            if entry.ui is not None:
                result.ui[n] = entry.ui
                observer("executed", events.executed(prompt_id, n, entry.ui))

        before, after = self.before_node, self.after_node
        for n in to_run:
            node = graph.nodes[n]
            cls = self.registry.get(node.class_type)
            inputs: dict[str, Any] = {}
            try:
                if self._interrupt.is_set():
                    raise Interrupted("interrupted before node " + n)
                observer("executing", events.executing(prompt_id, n))
                inputs = self._gather(node, cls, graph, values, extra_data)
                if before is not None:
                    before(n, cls, inputs)
                instance = cls(_NodeContext(prompt_id, n, observer, self._interrupt, ctx))
                entry = _normalise(instance.run(**inputs), cls)
                if after is not None:
                    after(n, cls, entry.values, entry.ui)
            except Interrupted:
                result.status = "interrupted"
                status("execution_interrupted", {"node_id": n, "node_type": node.class_type,
                                                 "executed": result.executed})
                return result
            except Exception as exc:  # noqa: BLE001 - a node's failure fails its prompt, not the engine
                self._node_failed(n, cls, inputs, exc)
                result.status = "error"
                result.error = {k: v for k, v in events.error_from_exception(
                    prompt_id, exc, node_id=n, node_type=node.class_type, executed=result.executed,
                    current_inputs=events.render_inputs(inputs, cls.hidden if cls is not None else ()),
                    current_outputs=values).items() if k not in ("prompt_id", "timestamp")}
                status("execution_error", result.error)
                return result
            finally:
                inputs = {}  # do not keep large inputs alive in this frame
            values[n] = entry.values
            self.cache.put(keys[n], entry)
            result.executed.append(n)
            if entry.ui is not None:
                result.ui[n] = entry.ui
                observer("executed", events.executed(prompt_id, n, entry.ui))

        status("execution_success", {})
        return result

    def _node_failed(self, node_id: str, cls: type[Node], inputs: dict, exc: BaseException) -> None:
        if self.on_node_error is not None:
            try:
                self.on_node_error(node_id, cls, inputs, exc)
            except Exception:  # a failing hook must not hide the node's own error
                log.exception("on_node_error hook failed for node %s", node_id)

    def _plan(self, graph: Graph, report: ValidationReport) -> tuple[list[str], dict[str, bytes]]:
        """The topological order of everything upstream of the runnable outputs, and each
        node's signature. Only that part of the graph is walked: the rest may hold cycles
        or other errors (validation has left those outputs out)."""
        keys: dict[str, bytes] = {}
        upstream = _upstream(graph, report.outputs)
        # Validation sorted the graph already; a report made otherwise gets sorted here.
        order = [n for n in report.order if n in upstream]
        if len(order) != len(upstream):
            order = _upstream_order(graph, report.outputs)
        classes: dict[str, tuple] = {}
        for n in order:
            keys[n] = self._signature(graph.nodes[n], keys, classes)
        return order, keys

    def _signature(self, node, keys: dict[str, bytes], classes: dict[str, tuple]) -> bytes:
        """A node's cache key; the keys of the nodes feeding it must be in ``keys``."""
        known = classes.get(node.class_type)
        if known is None:
            cls = self.registry.get(node.class_type)
            if cls is None:
                raise KeyError(f"unknown node type {node.class_type!r}")
            # A node that asks for its own id may act on it: its id is part of its key.
            wants_id = any(h.kind == "UNIQUE_ID" for h in cls.hidden.values())
            known = classes[node.class_type] = (cls, wants_id, _has_fingerprint(cls))
        cls, wants_id, fingerprinted = known
        literals, links = [], []
        inputs = node.inputs
        for name in sorted(inputs):
            value = inputs[name]
            if type(value) is Link:
                links.append((name, keys[value.node], value.index))
            else:
                literals.append((name, value))
        return signature(cls.type_name, literals, links, _fingerprint(cls, literals) if fingerprinted else None,
                         node.id if wants_id else None)

    def _lookup(self, graph: Graph, keys: dict[str, bytes], node_id: str) -> tuple:
        """A node's outputs from the cache, by signature (``ExecutionResult.output``)."""
        node = graph.nodes.get(node_id)
        if node is None:
            raise KeyError(f"node {node_id} is not in this workflow")
        key = keys.get(node_id)
        if key is None:
            key = self._signature_of(graph, keys, node_id)
        entry = self.cache.get(key) if key is not None else None
        if entry is None:
            raise KeyError(f"node {node_id} ({node.class_type}) has no outputs: it did not run, and they are not "
                           "in the cache (only nodes that some valid output needs run)")
        return entry.values

    def _signature_of(self, graph: Graph, keys: dict[str, bytes], node_id: str) -> bytes | None:
        """The key of any node whose upstream is well formed, or None."""
        try:
            order = _upstream_order(graph, [node_id], lambda n: n not in keys)
            extra = dict(keys)
            classes: dict[str, tuple] = {}
            for n in order:
                if n not in extra:
                    extra[n] = self._signature(graph.nodes[n], extra, classes)
        except (KeyError, ValueError):  # a link to a missing node, an unknown type, a cycle
            return None
        return extra[node_id]

    def _gather(self, node, cls: type[Node], graph: Graph, values: dict[str, tuple],
                extra_data: dict) -> dict[str, Any]:
        inputs: dict[str, Any] = {}
        for name in (*cls.inputs, *cls.optional):
            if name not in node.inputs:
                continue
            value = node.inputs[name]
            inputs[name] = values[value.node][value.index] if type(value) is Link else value
        for name, spec in cls.hidden.items():
            inputs[name] = {"PROMPT": graph.prompt, "EXTRA_PNGINFO": extra_data.get("extra_pnginfo"),
                            "UNIQUE_ID": node.id}.get(spec.kind)
        return inputs


def _upstream(graph: Graph, roots: Iterable[str]) -> set[str]:
    """``roots`` and every node feeding them, directly or not."""
    seen: set[str] = set()
    stack = list(roots)
    nodes = graph.nodes
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            for v in nodes[n].inputs.values():
                if type(v) is Link:
                    stack.append(v.node)
    return seen


def _upstream_order(graph: Graph, roots: Iterable[str], enter: Callable[[str], bool] = lambda n: True) -> list[str]:
    """``roots`` and everything feeding them, each node after its inputs (a depth-first
    post-order), not descending into nodes for which ``enter`` is false. Raises
    ``ValueError`` on a cycle and ``KeyError`` on a link to a missing node."""
    order: list[str] = []
    state: dict[str, bool] = {}  # False while on the path, True when done
    nodes = graph.nodes
    for root in roots:
        if root in state:
            continue
        state[root] = False
        stack = [(root, _sources(nodes[root]) if enter(root) else iter(()))]
        while stack:
            node_id, sources = stack[-1]
            for source in sources:
                seen = state.get(source)
                if seen is None:
                    state[source] = False
                    stack.append((source, _sources(nodes[source]) if enter(source) else iter(())))
                    break
                if seen is False:
                    raise ValueError(f"dependency cycle through node {source}")
            else:
                stack.pop()
                state[node_id] = True
                order.append(node_id)
    return order


def _sources(node) -> Iterator[str]:
    return (v.node for v in node.inputs.values() if type(v) is Link)


def _has_fingerprint(cls: type[Node]) -> bool:
    return cls.fingerprint.__func__ is not Node.fingerprint.__func__


def _fingerprint(cls: type[Node], literals: list[tuple[str, Any]]) -> Any:
    try:
        return cls.fingerprint(**dict(literals))
    except Exception:  # noqa: BLE001 - let the run itself fail with its own, clearer error
        return uuid.uuid4().hex


def _normalise(out: Any, cls: type[Node]) -> CacheEntry:
    if isinstance(out, Result):
        values, ui = out.values, out.ui
    elif isinstance(out, tuple):
        values, ui = out, None
    elif out is None and not cls.outputs:
        values, ui = (), None
    else:
        values, ui = (out,), None
    if len(values) != len(cls.outputs):
        raise TypeError(f"{cls.type_name}.run returned {len(values)} values for {len(cls.outputs)} outputs")
    return CacheEntry(tuple(values), ui)
