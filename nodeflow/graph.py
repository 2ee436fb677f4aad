"""Workflows: parsing the API format and validating it against the node registry.

The API format (ComfyUI's) maps node ids to ``{"class_type", "inputs", "_meta"?}``; an
input is a literal or a link ``[source_id, output_index]``; a list literal is wrapped as
``{"__value__": [...]}``. A file may also wrap the whole thing as ``{"prompt": {...}}``.

``validate`` checks everything before anything runs and reports every problem at once.
It is iterative throughout, so graphs of many thousands of linked nodes validate without
recursion limits.
"""

from __future__ import annotations

import functools
import inspect
import json
import reprlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import networkx as nx

from nodeflow.node import Node
from nodeflow.registry import Registry
from nodeflow.spec import DynamicCombo, types_match


class WorkflowError(ValueError):
    """The document is not a workflow at all (not JSON, not an object of nodes)."""


class _Nothing:
    """The ``received`` of an error that is about no value in particular (``None`` is a value:
    JSON's null)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "NOTHING"


NOTHING: Any = _Nothing()


@dataclass(frozen=True, slots=True)
class Link:
    """A connection to output ``index`` of node ``node``."""

    node: str
    index: int

    def to_json(self) -> list:
        return [self.node, self.index]


@dataclass(slots=True)
class NodeEntry:
    id: str
    class_type: str
    inputs: dict[str, Any]  # literal values, or Link
    title: str = ""

    def links(self) -> Iterable[tuple[str, Link]]:
        return ((k, v) for k, v in self.inputs.items() if type(v) is Link)


@dataclass
class Graph:
    """A parsed workflow. ``prompt`` is the API-format dict it came from."""

    nodes: dict[str, NodeEntry]
    prompt: dict[str, Any]
    #: Per-node problems found while parsing (a node that is not an object, ...).
    parse_errors: list[NodeError] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.nodes)


@dataclass
class NodeError:
    """One validation problem, naming where it is and what was expected."""

    node_id: str | None
    class_type: str
    type: str
    message: str
    input_name: str | None = None
    #: The value given; ``NOTHING`` when the error is not about a value.
    received: Any = NOTHING
    expected: str = ""
    details: str = ""
    #: Set when this problem refuses the whole prompt, as ComfyUI does (a node without a
    #: ``class_type``, a node type that does not exist): ComfyUI's message for it.
    prompt_error: str = ""

    def __str__(self) -> str:
        where = f"node {self.node_id}" if self.node_id is not None else "workflow"
        if self.class_type:
            where += f" ({self.class_type})"
        if self.input_name:
            where += f", input '{self.input_name}'"
        text = f"{where}: {self.message}"
        if self.expected:
            text += f" — expected {self.expected}"
            if self.received is not NOTHING:
                text += f", got {_short(self.received)}"
        if self.details:
            text += f". {self.details}"
        return text

    def to_comfy(self) -> dict[str, Any]:
        extra: dict[str, Any] = {}
        if self.input_name is not None:
            extra["input_name"] = self.input_name
        if self.received is not NOTHING:
            extra["received_value"] = self.received.to_json() if isinstance(self.received, Link) else self.received
        if self.expected:
            extra["expected"] = self.expected
        return {"type": self.type, "message": self.message, "details": self.details or str(self),
                "extra_info": extra}


@dataclass
class ValidationReport:
    """The outcome of ``validate``: every error, and which output nodes can run."""

    errors: list[NodeError]
    outputs: list[str]  # output nodes whose whole upstream is valid
    failed_outputs: dict[str, list[str]]  # erroneous node id -> output nodes it breaks
    #: The valid links as successor lists: node id -> ids of the nodes it feeds.
    successors: dict[str, list[str]] = field(default_factory=dict, repr=False)
    #: Every node not on or behind a cycle, each after the nodes feeding it.
    order: list[str] = field(default_factory=list, repr=False)
    _dag: nx.DiGraph | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def dag(self) -> nx.DiGraph:
        """The link graph as a networkx ``DiGraph`` (edges source -> target), built on first
        use: validation itself works on plain successor lists, which is much cheaper."""
        if self._dag is None:
            dag = nx.DiGraph()
            dag.add_nodes_from(self.successors)
            dag.add_edges_from((a, b) for a, targets in self.successors.items() for b in targets)
            self._dag = dag
        return self._dag

    @property
    def ok(self) -> bool:
        """True when at least one output can run (the others are reported, not run)."""
        return bool(self.outputs)

    @property
    def complete(self) -> bool:
        """True when there is no error at all."""
        return not self.errors and bool(self.outputs)

    @property
    def refused(self) -> NodeError | None:
        """The first problem that refuses the whole prompt (see ``NodeError.prompt_error``)."""
        return next((e for e in self.errors if e.prompt_error), None)

    def to_comfy(self, graph: Graph | None = None) -> dict[str, Any]:
        """ComfyUI's error body: ``{"error": {...}, "node_errors": {...}}``. A prompt refused
        whole has ComfyUI's ``invalid_prompt`` error naming the node, and no node errors; when
        no output can run, ``prompt_outputs_failed_validation`` with the reasons in
        ``node_errors`` only (its ``details`` empty, as ComfyUI's)."""
        refused = self.refused
        if refused is not None:
            return {"error": {"type": "invalid_prompt", "message": refused.prompt_error,
                              "details": f"Node ID '#{refused.node_id}'", "extra_info": {}}, "node_errors": {}}
        node_errors: dict[str, Any] = {}
        global_errors = []
        for err in self.errors:
            if err.node_id is None:
                global_errors.append(err)
                continue
            entry = node_errors.setdefault(err.node_id, {
                "errors": [], "dependent_outputs": self.failed_outputs.get(err.node_id, []),
                "class_type": err.class_type})
            entry["errors"].append(err.to_comfy())
        if global_errors:
            first = global_errors[0]
            error = {"type": first.type, "message": first.message, "details": first.details or str(first),
                     "extra_info": {}}
        elif not self.outputs:
            error = {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed validation",
                     "details": "", "extra_info": {}}
        else:
            error = None
        return {"error": error, "node_errors": node_errors}

    def summary(self) -> str:
        return "\n".join(str(e) for e in self.errors)


def load_json(text: str | bytes) -> Any:
    """Parse JSON text; any document Python's parser refuses is a ``WorkflowError``."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise WorkflowError(f"not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}") from None
    except RecursionError:
        raise WorkflowError("not a usable workflow: its JSON is nested too deeply") from None
    except ValueError as exc:  # e.g. an integer literal longer than Python's int max str digits
        raise WorkflowError(f"not a usable workflow: {exc}") from None


def is_ui_format(data: Any) -> bool:
    """ComfyUI's editor format: ``{"nodes": [...], "links": [...], ...}``."""
    return isinstance(data, dict) and isinstance(data.get("nodes"), list) and "links" in data


def unwrap(data: Any) -> dict[str, Any]:
    """The API-format prompt inside ``data`` (plain, or wrapped as ``{"prompt": ...}``)."""
    if not isinstance(data, dict):
        raise WorkflowError(f"a workflow is a JSON object of nodes, not {type(data).__name__}")
    if "prompt" in data and isinstance(data["prompt"], dict) and "class_type" not in data["prompt"]:
        data = data["prompt"]
    if is_ui_format(data):
        raise WorkflowError("this is a UI-format workflow (nodes/links); convert it to the API format first")
    if not data:
        raise WorkflowError("the workflow has no nodes")
    return data


def parse(data: Any) -> Graph:
    """Parse an API-format workflow. Raises ``WorkflowError`` if it is not a workflow at all;
    per-node problems are kept in ``parse_errors`` for ``validate`` to report with the rest."""
    prompt = unwrap(data)
    nodes: dict[str, NodeEntry] = {}
    errors: list[NodeError] = []
    looks_like_nodes = 0
    for raw_id, raw in prompt.items():
        node_id = str(raw_id)
        if node_id.startswith("_") and not (isinstance(raw, dict) and "class_type" in raw):
            continue  # top-level metadata such as "_meta"
        looks_like_nodes += isinstance(raw, dict)
        if not isinstance(raw, dict) or "class_type" not in raw:
            # What ComfyUI's editor sends for a node type the server does not know.
            errors.append(NodeError(node_id, "", "invalid_prompt", "Node is not an object with a 'class_type'",
                                    received=raw if not isinstance(raw, dict) else NOTHING,
                                    expected='{"class_type": ..., "inputs": {...}}', prompt_error=MISSING_CLASS_TYPE))
            continue
        class_type = raw["class_type"]
        inputs_raw = raw.get("inputs", {})
        if type(class_type) is not str:
            errors.append(NodeError(node_id, "", "invalid_prompt", "'class_type' must be a string",
                                    received=class_type, expected='a node type name such as "SaveImage"',
                                    prompt_error=MISSING_CLASS_TYPE))
            continue
        if type(inputs_raw) is not dict:
            errors.append(NodeError(node_id, class_type, "invalid_prompt", "'inputs' must be an object",
                                    received=inputs_raw, expected='an object of inputs, {"name": value or link}'))
            continue
        inputs: dict[str, Any] = {}
        for name, value in inputs_raw.items():
            kind = type(value)
            # Most inputs are plain literals: only lists (links) and dicts need a closer look.
            inputs[name] = _parse_input(value, node_id, class_type, name, errors) \
                if kind is list or kind is dict else value
        meta = raw.get("_meta")
        title = meta.get("title", "") if type(meta) is dict else ""
        nodes[node_id] = NodeEntry(node_id, class_type, inputs, title if type(title) is str else "")
    if not looks_like_nodes:
        raise WorkflowError("no nodes found: a workflow maps node ids to {\"class_type\", \"inputs\"}")
    return Graph(nodes, prompt, errors)


_BAD = object()
#: ComfyUI's messages for a prompt it refuses whole.
MISSING_CLASS_TYPE = "Cannot execute because a node is missing the class_type property."
NO_SUCH_NODE = "Cannot execute because node {} does not exist."


def _parse_input(value: Any, node_id: str, class_type: str, name: str, errors: list[NodeError]) -> Any:
    kind = type(value)
    if kind is list:
        if len(value) == 2 and type(value[1]) is int and (type(value[0]) is str or is_link(value)):
            return Link(str(value[0]), value[1])
        errors.append(NodeError(node_id, class_type, "bad_linked_input",
                                "Bad link or unwrapped list literal", name, value,
                                'a link ["node_id", output_index], or a list literal wrapped as {"__value__": [...]}'))
        return _BAD
    if kind is dict and len(value) == 1 and "__value__" in value:
        return value["__value__"]
    return value


def is_link(value: Any) -> bool:
    """Whether a JSON value has the shape of a link: ``[source_id, output_index]`` (the id a
    string or an integer)."""
    return (isinstance(value, list) and len(value) == 2 and isinstance(value[0], (str, int))
            and not isinstance(value[0], bool) and isinstance(value[1], int) and not isinstance(value[1], bool))


# -- validation ----------------------------------------------------------------------------------

#: Longest cycle written out in full; longer ones show their first and last nodes.
CYCLE_SHOWN = 20


def validate(graph: Graph, registry: Registry, outputs: Iterable[str] | None = None) -> ValidationReport:
    """Check the whole graph; ``outputs`` limits which output nodes are wanted.

    Linear in the size of the graph (plus the size of the report), however many nodes are
    bad: per-node checks, then one pass for cycles and one walk from the bad nodes."""
    errors: list[NodeError] = list(graph.parse_errors)
    bad_nodes: set[str] = {e.node_id for e in errors if e.node_id is not None}
    check = _Check(graph, registry, {n: [] for n in graph.nodes})
    # Malformed nodes are in the link graph too, so that what they feed is known to fail
    # (they are reported once, on themselves).
    for n in bad_nodes - graph.nodes.keys():
        check.successors[n] = []
    for node in graph.nodes.values():
        node_errors = _validate_node(node, check)
        if node_errors:
            bad_nodes.add(node.id)
            errors.extend(node_errors)
    successors = check.successors

    order, cyclic = _topological_order(successors)
    for err in _cycle_errors(graph, successors, cyclic):
        bad_nodes.add(err.node_id)
        errors.append(err)

    # Which output nodes are wanted.
    wanted = set(outputs) if outputs is not None else None
    output_ids = []
    for node in graph.nodes.values():
        cls = registry.get(node.class_type)
        if cls is not None and cls.output_node and (wanted is None or node.id in wanted):
            output_ids.append(node.id)
    if wanted:
        for missing in sorted(wanted - set(output_ids), key=id_order):
            errors.append(NodeError(missing, graph.nodes[missing].class_type if missing in graph.nodes else "",
                                    "invalid_output", "Not an output node of this workflow",
                                    expected="the id of an output node (e.g. SaveImage)"))
    if not output_ids:
        errors.append(NodeError(None, "", "prompt_no_outputs", "Prompt has no outputs",
                                details="add an output node such as SaveImage or PreviewImage"))

    tainted = reachable(successors, bad_nodes)
    if any(e.prompt_error for e in errors):  # ComfyUI refuses such a prompt whole
        tainted |= set(output_ids)
    good = sorted((o for o in output_ids if o not in tainted), key=id_order)
    failed = _failed_outputs(successors, bad_nodes, tainted, [o for o in output_ids if o in tainted])
    return ValidationReport(errors, good, failed, successors, order)


def reachable(successors: Mapping[str, list[str]], starts: Iterable[str]) -> set[str]:
    """Every node reachable from ``starts`` (themselves included) along the links."""
    seen = {s for s in starts if s in successors}
    stack = list(seen)
    while stack:
        for nxt in successors[stack.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    return seen


def _failed_outputs(successors: Mapping[str, list[str]], bad: set[str], tainted: set[str],
                    failed: list[str]) -> dict[str, list[str]]:
    """Bad node -> the output nodes it breaks. One walk back from each failed output, over
    tainted nodes only: the work is the size of the answer, not bad nodes × graph."""
    if not failed:
        return {}
    predecessors: dict[str, list[str]] = {}
    for source, targets in successors.items():
        if source in tainted:
            for target in targets:
                predecessors.setdefault(target, []).append(source)
    result: dict[str, list[str]] = {}
    for out in sorted(failed, key=id_order):
        seen = {out}
        stack = [out]
        while stack:
            n = stack.pop()
            if n in bad:
                result.setdefault(n, []).append(out)
            for prev in predecessors.get(n, ()):
                if prev not in seen:
                    seen.add(prev)
                    stack.append(prev)
    return result


def _topological_order(successors: Mapping[str, list[str]]) -> tuple[list[str], set[str]]:
    """Kahn's algorithm: the nodes in an order where each comes after those feeding it, and
    the nodes left over, which are on a cycle or downstream of one."""
    indegree = dict.fromkeys(successors, 0)
    for targets in successors.values():
        for t in targets:
            indegree[t] += 1
    ready = [n for n, d in indegree.items() if d == 0]
    order = []
    while ready:
        n = ready.pop()
        order.append(n)
        for t in successors[n]:
            indegree[t] -= 1
            if indegree[t] == 0:
                ready.append(t)
    return order, ({n for n, d in indegree.items() if d > 0} if len(order) < len(indegree) else set())


def _cycle_errors(graph: Graph, successors: Mapping[str, list[str]], left: set[str]) -> list[NodeError]:
    """One error per node on a dependency cycle, among the nodes ``left`` by a topological
    sort. Each cycle's path is written once, on its smallest node id; the others refer to
    it, so a long cycle costs a short report."""
    if not left:
        return []
    sub = nx.DiGraph()
    sub.add_edges_from((a, b) for a in left for b in successors[a] if b in left)
    errors = []
    components = [c for c in nx.strongly_connected_components(sub) if len(c) > 1 or _self_linked(c, sub)]
    for component in sorted(components, key=lambda c: id_order(min(c, key=id_order))):
        members = sorted(component, key=id_order)
        first = members[0]
        cycle = _cycle_through(first, successors, component)
        path = _cycle_text(graph, cycle)
        details = f"cycle: {path}"
        if len(component) > len(cycle):
            details += f"; {len(component):,} nodes in all depend on each other"
        errors.append(NodeError(first, _class_of(graph, first), "dependency_cycle", "Dependency cycle detected",
                                details=details))
        for n in members[1:]:
            errors.append(NodeError(n, _class_of(graph, n), "dependency_cycle", "Dependency cycle detected",
                                    details=f"on the cycle reported for node {first}"))
    return errors


def _self_linked(component: set[str], sub: nx.DiGraph) -> bool:
    (only,) = component
    return sub.has_edge(only, only)


def _cycle_through(start: str, successors: Mapping[str, list[str]], component: set[str]) -> list[str]:
    """The shortest cycle from ``start`` back to itself inside ``component``, visiting
    successors in id order so the same graph always gives the same path."""
    parent: dict[str, str | None] = {start: None}
    frontier = [start]
    while frontier:
        following = []
        for n in frontier:
            for nxt in sorted(set(successors[n]), key=id_order):
                if nxt == start:
                    path = [n]
                    while parent[path[-1]] is not None:
                        path.append(parent[path[-1]])
                    return path[::-1]
                if nxt in component and nxt not in parent:
                    parent[nxt] = n
                    following.append(nxt)
        frontier = following
    return [start]  # unreachable for a strongly connected component


def _cycle_text(graph: Graph, cycle: list[str]) -> str:
    def label(n: str) -> str:
        return f"{n} ({_class_of(graph, n)})"

    if len(cycle) <= CYCLE_SHOWN:
        shown = [label(n) for n in cycle]
    else:
        half = CYCLE_SHOWN // 2
        shown = [label(n) for n in cycle[:half]] + [f"… {len(cycle) - 2 * half:,} more …"] + \
                [label(n) for n in cycle[-half:]]
    text = " -> ".join(shown + [label(cycle[0])])
    return text if len(cycle) <= CYCLE_SHOWN else f"{text} ({len(cycle):,} nodes)"


def _class_of(graph: Graph, node_id: str) -> str:
    node = graph.nodes.get(node_id)
    return node.class_type if node is not None else ""


@dataclass(slots=True)
class _Schema:
    """What validation needs of a node class, worked out once per class and call."""

    inputs: list[tuple[str, Any, bool, bool, str]]  # name, spec, required, is_widget, type name
    hook: Any  # the class's validate_inputs, or None when it has none
    #: The class's dynamic combos (name, spec): their chosen option's inputs are checked too.
    dynamic: list[tuple[str, Any]] = field(default_factory=list)


@dataclass(slots=True)
class _Check:
    """The state of one ``validate`` call."""

    graph: Graph
    registry: Registry
    #: The valid links so far: node id -> ids of the nodes it feeds.
    successors: dict[str, list[str]]
    schemas: dict[type, _Schema] = field(default_factory=dict)

    def schema(self, cls: Any) -> _Schema:
        schema = self.schemas.get(cls)
        if schema is None:
            inputs = [(name, spec, required, spec.is_widget, spec.type_name)
                      for name, (spec, required) in cls.all_inputs().items()]
            own = getattr(cls.validate_inputs, "__func__", None) is not _BASE_VALIDATE_INPUTS
            dynamic = [(name, spec) for name, (spec, _) in cls.all_inputs().items() if isinstance(spec, DynamicCombo)]
            schema = self.schemas[cls] = _Schema(inputs, cls.validate_inputs if own else None, dynamic)
        return schema


def _validate_node(node: NodeEntry, check: _Check) -> list[NodeError]:
    cls = check.registry.get(node.class_type)
    if cls is None:
        hint = check.registry.suggest(node.class_type)
        return [NodeError(node.id, node.class_type, "invalid_prompt", f"Unknown node type '{node.class_type}'",
                          details=f"did you mean {' or '.join(repr(h) for h in hint)}?" if hint else
                          "see `nodeflow nodes` for the node types installed",
                          prompt_error=NO_SUCH_NODE.format(node.class_type))]
    schema = check.schema(cls)
    errors: list[NodeError] = []
    # Only a validate_inputs hook needs the literals gathered.
    literals: dict[str, Any] | None = {} if schema.hook is not None else None
    given = node.inputs
    inputs = schema.inputs if not schema.dynamic else [*schema.inputs, *_chosen_inputs(node, schema.dynamic)]
    for name, spec, required, is_widget, type_name in inputs:
        if name not in given:
            if required and getattr(spec, "needs_value", True):
                errors.append(NodeError(node.id, node.class_type, "required_input_missing",
                                        "Required input is missing", name,
                                        expected=f"{_a(type_name)} {type_name} link" if not is_widget
                                        else f"{_a(type_name)} {type_name} value or link"))
            continue
        value = given[name]
        if value is _BAD:
            continue
        if type(value) is Link:
            err = _check_link(node, name, type_name, value, check)
            if err is not None:
                errors.append(err)
            else:
                check.successors[value.node].append(node.id)
            continue
        if not is_widget and not spec.takes_literal:
            errors.append(NodeError(node.id, node.class_type, "invalid_input_type",
                                    f"Input takes {_a(type_name)} {type_name} link, not a literal", name, value,
                                    f"a link [node_id, output_index] to {_a(type_name)} {type_name} output"))
            continue
        try:
            err = spec.check(value)
        except Exception as exc:  # noqa: BLE001 - e.g. a Combo whose choices function fails
            errors.append(NodeError(node.id, node.class_type, "exception_during_validation",
                                    f"Could not check the value: {_exc_text(exc)}", name, value,
                                    f"a valid {type_name} value"))
            continue
        if err:
            errors.append(NodeError(node.id, node.class_type, err.type, err.message, name, value, err.expected))
        else:
            if type_name == "INT" and isinstance(value, float):
                # JSON has one number type: 512.0 for an INT input is 512 (ComfyUI converts too).
                value = given[name] = int(value)
            if literals is not None:
                literals[name] = value
    if not errors and literals is not None:
        errors.extend(_run_hook(node, schema.hook, literals))
    return errors


_BASE_VALIDATE_INPUTS = Node.validate_inputs.__func__


def _chosen_inputs(node: NodeEntry, dynamic: list[tuple[str, Any]]) -> list[tuple[str, Any, bool, bool, str]]:
    """The inputs that the chosen options of a node's dynamic combos bring, as
    ``"<combo>.<input>"`` (a combo fed by a link brings none: its choice is known at run time)."""
    found = []
    for name, spec in dynamic:
        choice = node.inputs.get(name, spec.default_value())
        for sub, sub_spec in spec.sub_inputs(choice).items():
            found.append((f"{name}.{sub}", sub_spec, True, sub_spec.is_widget, sub_spec.type_name))
    return found


def _run_hook(node: NodeEntry, hook: Any, literals: dict[str, Any]) -> list[NodeError]:
    """Call a node's ``validate_inputs`` with the literals it declares (see
    ``Node.validate_inputs`` for the rule); its failures are the node's validation errors."""
    args = _hook_arguments(hook, literals)
    if args is None:
        return []  # a parameter it needs comes through a link: known only at run time
    try:
        verdict = hook(**args)
    except Exception as exc:  # noqa: BLE001 - a broken check is the node's error, not the engine's
        return [NodeError(node.id, node.class_type, "exception_during_validation",
                          f"validate_inputs failed: {_exc_text(exc)}")]
    if verdict is None or verdict is True:
        return []
    if verdict is False:
        messages = ["validate_inputs refused the inputs"]
    elif isinstance(verdict, str):
        messages = [verdict]  # ComfyUI's VALIDATE_INPUTS returns one message string
    else:
        try:
            messages = [str(m) for m in verdict]
        except TypeError:
            messages = [str(verdict)]
    return [NodeError(node.id, node.class_type, "custom_validation_failed", m) for m in messages]


def _hook_arguments(hook: Any, literals: dict[str, Any]) -> dict[str, Any] | None:
    names, required, takes_all = _hook_parameters(hook)
    if any(name not in literals for name in required):
        return None
    if takes_all:
        return dict(literals)
    return {name: literals[name] for name in names if name in literals}


@functools.lru_cache(maxsize=1024)
def _hook_parameters(hook: Any) -> tuple[tuple[str, ...], tuple[str, ...], bool]:
    """(parameter names, those without a default, whether it takes ``**kwargs``) of a bound
    classmethod or a static function."""
    try:
        params = list(inspect.signature(hook).parameters.values())
    except (TypeError, ValueError):  # no signature to read: give it everything
        return (), (), True
    named = [p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    return (tuple(p.name for p in named), tuple(p.name for p in named if p.default is p.empty),
            any(p.kind is p.VAR_KEYWORD for p in params))


def _check_link(node: NodeEntry, name: str, want: str, link: Link, check: _Check) -> NodeError | None:
    source = check.graph.nodes.get(link.node)
    if source is None:
        if link.node in check.successors:
            return None  # a malformed node: reported on itself, and it breaks what it feeds
        return NodeError(node.id, node.class_type, "invalid_link", f"Link to missing node '{link.node}'", name,
                         link, "the id of a node in this workflow")
    source_cls = check.registry.get(source.class_type)
    if source_cls is None:
        return None  # reported on the source node itself
    outs = source_cls.outputs
    if not 0 <= link.index < len(outs):
        return NodeError(node.id, node.class_type, "invalid_link",
                         f"Output index {link.index} out of range for node {link.node} ({source.class_type})",
                         name, link, f"an index in 0..{len(outs) - 1}" if outs else "a node with outputs")
    got = outs[link.index].kind
    if got != want and not types_match(got, want):
        return NodeError(node.id, node.class_type, "return_type_mismatch", "Return type mismatch between linked nodes",
                         name, link, f"{want}, but output {link.index} of node {link.node} "
                         f"({source.class_type}) is {got}")
    return None


def id_order(node_id: str) -> tuple:
    """Numeric ids in numeric order, then the others; never converts (ids may be long)."""
    if node_id.isascii() and node_id.isdigit():
        digits = node_id.lstrip("0")
        return (0, len(digits), digits, node_id)
    return (1, 0, node_id, node_id)


def _a(word: str) -> str:
    """The article for a type name: "an IMAGE", "a LATENT"."""
    return "an" if word[:1] and word[0] in "AEIOUaeiou" else "a"


def _exc_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _short(value: Any, limit: int = 80) -> str:
    try:
        text = json.dumps(value.to_json() if isinstance(value, Link) else value, default=repr)
    except (ValueError, TypeError, RecursionError):  # circular or too deeply nested
        text = reprlib.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
