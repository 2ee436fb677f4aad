"""Running a validated workflow: pruning, ordering, caching, events and interruption.

``Executor.execute`` runs only what the requested output nodes need, in a topological
order, skipping every node whose signature is in the cache (and everything only a cached
node needs). What feeds a lazy input runs only when its node asks for it
(``Node.check_lazy_status``); such a node gets a second ``executing`` event when it runs after
the inputs it asked for, as in ComfyUI. A node fed a list runs once per element
(``nodeflow.listexec``). It reports through one observer, a callable ``observer(event, data)``, with
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
executor's thread with the node id, its class and its resolved inputs. They are called once
per call of ``run``: a node that runs once per list element calls them per element, with that
element's inputs and outputs (a node that takes whole lists gets lists):

- ``before_node(node_id, cls, inputs)`` just before ``run`` (e.g. the server's resource limits:
  raise to fail the node, with the exception's message in its ``execution_error``);
- ``after_node(node_id, cls, values, ui)`` once ``run`` returned, before the node's outputs are
  cached and its ``executed`` event sent (raising fails the node too);
- ``on_node_error(node_id, cls, inputs, exc)`` when the node (or a hook) raised; what this
  hook raises is logged, never passed on.
"""

from __future__ import annotations

import functools
import heapq
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
from nodeflow.listexec import OutputList, call_inputs, collect, collect_ui
from nodeflow.node import Interrupted, Node, Result
from nodeflow.registry import Registry
from nodeflow.spec import DynamicCombo

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


class _NodeFailed(Exception):
    """A node's call (or a hook around it) raised its ``__cause__``: ``inputs`` are that call's,
    ``shown`` every input of the node (lists whole), for ``current_inputs``."""

    def __init__(self, inputs: dict, shown: dict) -> None:
        super().__init__("node failed")
        self.inputs, self.shown = inputs, shown


class _Run:
    """The state of one ``execute``: the nodes needed so far and the queue of those to run.

    The queue holds positions in the topological order of everything upstream of the
    outputs (a heap), so the next node always has the nodes it needs done; a node that asks
    for lazy inputs goes back into the queue and comes out again after them."""

    def __init__(self, executor: Executor, graph: Graph, report: ValidationReport, prompt_id: str,
                 observer: Observer, extra_data: dict, ctx: RunContext, result: ExecutionResult,
                 order: list[str], keys: dict[str, bytes], hits: dict[str, CacheEntry]) -> None:
        self.executor, self.graph, self.prompt_id, self.observer = executor, graph, prompt_id, observer
        self.extra_data, self.ctx, self.result, self.hits = extra_data, ctx, result, hits
        self.position = {n: i for i, n in enumerate(order)}
        self.needed: set[str] = set()
        self.queue: list[int] = []
        self._lazy: dict[type, frozenset[str]] = {}

    def lazy_inputs(self, cls: type[Node]) -> frozenset[str]:
        names = self._lazy.get(cls)
        if names is None:
            names = self._lazy[cls] = frozenset(n for n, (spec, _) in cls.all_inputs().items() if spec.lazy)
        return names

    def need(self, roots: Iterable[str]) -> set[str]:
        """Mark ``roots`` and what they need as needed, not descending into cached nodes nor
        through lazy inputs; queue those that must run. Returns the nodes newly needed."""
        new: set[str] = set()
        stack = list(roots)
        nodes, registry = self.graph.nodes, self.executor.registry
        while stack:
            n = stack.pop()
            if n in self.needed:
                continue
            self.needed.add(n)
            new.add(n)
            if n in self.hits:
                continue
            heapq.heappush(self.queue, self.position[n])
            node = nodes[n]
            lazy = self.lazy_inputs(registry.get(node.class_type))
            stack.extend(link.node for name, link in node.links() if name not in lazy)
        return new

    def replay(self, n: str) -> None:
        """Use a cached node's outputs, and show again what it showed."""
        entry = self.hits[n]
        self.result.values[n] = entry.values
        if entry.ui is not None:
            self.result.ui[n] = entry.ui
            self.observer("executed", events.executed(self.prompt_id, n, entry.ui))

    def attempt(self, n: str, node, cls: type[Node]) -> CacheEntry | None:
        """Run a node (once per list element); ``None`` when it asked for lazy inputs first."""
        executor = self.executor
        if executor._interrupt.is_set():
            raise Interrupted("interrupted before node " + n)
        self.observer("executing", events.executing(self.prompt_id, n))
        inputs = self.gather(node, cls)
        hidden = self.hidden(node, cls)
        if _has_lazy_check(cls) and self.ask_lazy(n, node, cls, inputs, hidden):
            heapq.heappush(self.queue, self.position[n])
            return None
        results: list[tuple] = []
        uis: list[dict | None] = []
        before, after = executor.before_node, executor.after_node
        for call in call_inputs(inputs, cls.input_is_list):
            call.update(hidden)
            try:
                executor._check_interrupt(n)
                if before is not None:
                    before(n, cls, call)
                instance = cls(_NodeContext(self.prompt_id, n, self.observer, executor._interrupt, self.ctx))
                entry = _normalise(instance.run(**call), cls)
                if after is not None:
                    after(n, cls, entry.values, entry.ui)
            except Interrupted:
                raise
            except Exception as exc:  # a node's failure fails its prompt, not the engine
                raise _NodeFailed(call, {**inputs, **hidden}) from exc
            results.append(entry.values)
            uis.append(entry.ui)
        if not results:  # an empty list: no call, and empty lists downstream
            return CacheEntry(tuple(OutputList() for _ in cls.outputs), None)
        return CacheEntry(collect(results, [o.is_list for o in cls.outputs]), collect_ui(uis))

    def ask_lazy(self, n: str, node, cls: type[Node], inputs: dict, hidden: dict) -> bool:
        """Ask the node which lazy inputs it needs; queue what feeds those not evaluated yet.
        True when it must wait for them."""
        asked: list[str] = []
        instance = cls(_NodeContext(self.prompt_id, n, self.observer, self.executor._interrupt, self.ctx))
        for call in call_inputs(inputs, cls.input_is_list):
            try:
                names = instance.check_lazy_status(**call)
            except Exception as exc:  # the node's own failure, reported as the node's error
                raise _NodeFailed(call, {**inputs, **hidden}) from exc
            for name in names or ():
                if isinstance(name, str) and name not in asked:
                    asked.append(name)
        sources = []
        for name in asked:
            value = node.inputs.get(name)
            if type(value) is Link:
                if value.node not in self.result.values and value.node not in self.hits:
                    sources.append(value.node)
            elif name not in node.inputs or name not in cls.all_inputs():
                error = ValueError(f"node {n} ({node.class_type}) asks for its input '{name}' (check_lazy_status), "
                                   f"but that input is not connected" if name in cls.all_inputs() else
                                   f"node {n} ({node.class_type}) asks for an input '{name}' (check_lazy_status), "
                                   f"but it has no input of that name")
                raise _NodeFailed(inputs, {**inputs, **hidden}) from error
        if not sources:
            return False
        for m in sorted(self.need(sources), key=self.position.__getitem__):
            if m in self.hits:
                self.result.cached.append(m)
                self.replay(m)
        return True

    def gather(self, node, cls: type[Node]) -> dict[str, Any]:
        """The node's inputs: literals, and the values its links point to (an ``OutputList``
        for a list); ``None`` for a lazy input whose source has not run."""
        inputs: dict[str, Any] = {}
        values, hits = self.result.values, self.hits
        for name in _input_names(cls, node):
            if name not in node.inputs:
                continue
            value = node.inputs[name]
            if type(value) is Link:
                got = values.get(value.node)
                if got is None:
                    entry = hits.get(value.node)
                    if entry is None and name in self.lazy_inputs(cls):
                        inputs[name] = None
                        continue
                    got = entry.values if entry is not None else values[value.node]
                value = got[value.index]
            inputs[name] = value
        if cls.accept_all_inputs:
            inputs.update((k, v) for k, v in node.inputs.items() if k not in inputs and type(v) is not Link)
        return inputs

    def hidden(self, node, cls: type[Node]) -> dict[str, Any]:
        found = {"PROMPT": self.graph.prompt, "EXTRA_PNGINFO": self.extra_data.get("extra_pnginfo"),
                 "UNIQUE_ID": node.id}
        return {name: found.get(spec.kind) for name, spec in cls.hidden.items()}


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
        # upstream is not needed at all, nor is what feeds a lazy input (until asked for).
        hits = self.cache.get_many(keys)
        run = _Run(self, graph, report, prompt_id, observer, extra_data, ctx, result, order, keys, hits)
        needed = run.need(report.outputs)
        cached = [n for n in order if n in needed and n in hits]
        result.cached = cached
        status("execution_cached", {"nodes": cached})
        for n in cached:
            run.replay(n)

        while run.queue:
            n = order[heapq.heappop(run.queue)]
            if n in result.values:
                continue
            node = graph.nodes[n]
            cls = self.registry.get(node.class_type)
            try:
                entry = run.attempt(n, node, cls)
            except Interrupted:
                result.status = "interrupted"
                status("execution_interrupted", {"node_id": n, "node_type": node.class_type,
                                                 "executed": result.executed})
                return result
            except _NodeFailed as failed:
                exc = failed.__cause__ or failed
                self._node_failed(n, cls, failed.inputs, exc)
                result.status = "error"
                result.error = {k: v for k, v in events.error_from_exception(
                    prompt_id, exc, node_id=n, node_type=node.class_type, executed=result.executed,
                    current_inputs=events.render_inputs(failed.shown, cls.hidden if cls is not None else ()),
                    current_outputs=result.values).items() if k not in ("prompt_id", "timestamp")}
                status("execution_error", result.error)
                return result
            if entry is None:
                continue  # waiting for lazy inputs it asked for: it comes back after them
            result.values[n] = entry.values
            self.cache.put(keys[n], entry)
            result.executed.append(n)
            if entry.ui is not None:
                result.ui[n] = entry.ui
                observer("executed", events.executed(prompt_id, n, entry.ui))

        status("execution_success", {})
        return result

    def _check_interrupt(self, node_id: str) -> None:
        if self._interrupt.is_set():
            raise Interrupted(f"interrupted in node {node_id}")

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


def _input_names(cls: type[Node], node) -> list[str]:
    """The names of a node's inputs: its declared ones, and the inputs its dynamic combos'
    chosen options bring (``"<combo>.<input>"``)."""
    names = [*cls.inputs, *cls.optional]
    for name, (spec, _) in cls.all_inputs().items():
        if isinstance(spec, DynamicCombo):
            choice = node.inputs.get(name)
            if type(choice) is Link:  # chosen at run time: whatever the prompt gives for it
                names.extend(k for k in node.inputs if k.startswith(name + "."))
            else:
                names.extend(f"{name}.{sub}" for sub in spec.sub_inputs(choice))
    return names


def _has_lazy_check(cls: type[Node]) -> bool:
    return cls.check_lazy_status is not Node.check_lazy_status


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
    for value, output in zip(values, cls.outputs, strict=True):
        if output.is_list and not isinstance(value, (list, tuple)):
            raise TypeError(f"{cls.type_name}.run must return a list for its list output '{output.name}', "
                            f"not {type(value).__name__}")
    return CacheEntry(tuple(values), ui)
