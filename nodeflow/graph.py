"""Workflows: parsing the API format and validating it against the node registry.

The API format (ComfyUI's) maps node ids to ``{"class_type", "inputs", "_meta"?}``; an
input is a literal or a link ``[source_id, output_index]``; a list literal is wrapped as
``{"__value__": [...]}``. A file may also wrap the whole thing as ``{"prompt": {...}}``.

``validate`` checks everything before anything runs and reports every problem at once.
It is iterative throughout, so graphs of many thousands of linked nodes validate without
recursion limits.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import networkx as nx

from nodeflow.registry import Registry
from nodeflow.spec import types_match


class WorkflowError(ValueError):
    """The document is not a workflow at all (not JSON, not an object of nodes)."""


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
    parse_errors: list["NodeError"] = field(default_factory=list)

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
    received: Any = None
    expected: str = ""
    details: str = ""

    def __str__(self) -> str:
        where = f"node {self.node_id}" if self.node_id is not None else "workflow"
        if self.class_type:
            where += f" ({self.class_type})"
        if self.input_name:
            where += f", input '{self.input_name}'"
        text = f"{where}: {self.message}"
        if self.expected:
            text += f" — expected {self.expected}"
            if self.received is not None:
                text += f", got {_short(self.received)}"
        if self.details:
            text += f". {self.details}"
        return text

    def to_comfy(self) -> dict[str, Any]:
        extra: dict[str, Any] = {}
        if self.input_name is not None:
            extra["input_name"] = self.input_name
        if self.received is not None:
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
    #: The link graph (edges source -> target), reused by the executor.
    dag: nx.DiGraph | None = None

    @property
    def ok(self) -> bool:
        """True when at least one output can run (the others are reported, not run)."""
        return bool(self.outputs)

    @property
    def complete(self) -> bool:
        """True when there is no error at all."""
        return not self.errors and bool(self.outputs)

    def to_comfy(self, graph: Graph | None = None) -> dict[str, Any]:
        """ComfyUI's error body: ``{"error": {...}, "node_errors": {...}}``."""
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
                     "details": "; ".join(str(e) for e in self.errors[:20]), "extra_info": {}}
        else:
            error = None
        return {"error": error, "node_errors": node_errors}

    def summary(self) -> str:
        return "\n".join(str(e) for e in self.errors)


def load_json(text: str | bytes) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise WorkflowError(f"not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}") from None


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
        if not isinstance(raw, dict) or "class_type" not in raw:
            errors.append(NodeError(node_id, "", "invalid_prompt", "Node is not an object with a 'class_type'",
                                    received=raw if not isinstance(raw, dict) else None,
                                    expected='{"class_type": ..., "inputs": {...}}'))
            continue
        looks_like_nodes += 1
        class_type = raw["class_type"]
        inputs_raw = raw.get("inputs", {})
        if not isinstance(class_type, str) or not isinstance(inputs_raw, dict):
            errors.append(NodeError(node_id, str(class_type), "invalid_prompt",
                                    "'class_type' must be a string and 'inputs' an object"))
            continue
        inputs: dict[str, Any] = {}
        for name, value in inputs_raw.items():
            inputs[name] = _parse_input(value, node_id, class_type, name, errors)
        meta = raw.get("_meta")
        title = meta.get("title", "") if isinstance(meta, dict) else ""
        nodes[node_id] = NodeEntry(node_id, class_type, inputs, title if isinstance(title, str) else "")
    if not looks_like_nodes:
        raise WorkflowError("no nodes found: a workflow maps node ids to {\"class_type\", \"inputs\"}")
    return Graph(nodes, prompt, errors)


_BAD = object()


def _parse_input(value: Any, node_id: str, class_type: str, name: str, errors: list[NodeError]) -> Any:
    if isinstance(value, list):
        if len(value) == 2 and isinstance(value[0], (str, int)) and not isinstance(value[0], bool) \
                and isinstance(value[1], int) and not isinstance(value[1], bool):
            return Link(str(value[0]), value[1])
        errors.append(NodeError(node_id, class_type, "bad_linked_input",
                                "Bad link or unwrapped list literal", name, value,
                                'a link ["node_id", output_index], or a list literal wrapped as {"__value__": [...]}'))
        return _BAD
    if isinstance(value, dict) and set(value) == {"__value__"}:
        return value["__value__"]
    return value


def validate(graph: Graph, registry: Registry, outputs: Iterable[str] | None = None) -> ValidationReport:
    """Check the whole graph; ``outputs`` limits which output nodes are wanted."""
    errors: list[NodeError] = list(graph.parse_errors)
    bad_nodes: set[str] = {e.node_id for e in errors if e.node_id is not None}
    dag = nx.DiGraph()
    dag.add_nodes_from(graph.nodes)

    for node in graph.nodes.values():
        node_errors = _validate_node(node, graph, registry, dag)
        if node_errors:
            bad_nodes.add(node.id)
            errors.extend(node_errors)

    # Cycles: each strongly connected component of more than one node (or a self-link).
    for component in nx.strongly_connected_components(dag):
        if len(component) == 1:
            (only,) = component
            if not dag.has_edge(only, only):
                continue
        cycle = [edge[0] for edge in nx.find_cycle(dag.subgraph(component))]
        path = " -> ".join(f"{n} ({graph.nodes[n].class_type})" for n in cycle + cycle[:1])
        for n in sorted(component, key=_id_order):
            bad_nodes.add(n)
            errors.append(NodeError(n, graph.nodes[n].class_type, "dependency_cycle",
                                    "Dependency cycle detected", details=f"cycle: {path}"))

    # Which output nodes can run: those with no error anywhere upstream.
    wanted = set(outputs) if outputs is not None else None
    output_ids = []
    for node in graph.nodes.values():
        cls = registry.get(node.class_type)
        if cls is not None and cls.output_node and (wanted is None or node.id in wanted):
            output_ids.append(node.id)
    if wanted:
        for missing in sorted(wanted - set(output_ids), key=_id_order):
            errors.append(NodeError(missing, graph.nodes[missing].class_type if missing in graph.nodes else "",
                                    "invalid_output", "Not an output node of this workflow",
                                    expected="the id of an output node (e.g. SaveImage)"))
    if not output_ids:
        errors.append(NodeError(None, "", "prompt_no_outputs", "Prompt has no outputs",
                                details="add an output node such as SaveImage or PreviewImage"))

    # An output fails if any node upstream of it is bad: walk forward from the bad nodes.
    output_set = set(output_ids)
    failed: dict[str, list[str]] = {}
    tainted: set[str] = set()
    for bad in bad_nodes:
        if bad not in dag:
            continue
        reach = nx.descendants(dag, bad) | {bad}
        tainted |= reach
        hit = sorted(reach & output_set, key=_id_order)
        if hit:
            failed[bad] = hit
    good = sorted(output_set - tainted, key=_id_order)
    return ValidationReport(errors, good, failed, dag)


def _validate_node(node: NodeEntry, graph: Graph, registry: Registry, dag: nx.DiGraph) -> list[NodeError]:
    cls = registry.get(node.class_type)
    if cls is None:
        hint = registry.suggest(node.class_type)
        return [NodeError(node.id, node.class_type, "invalid_prompt", f"Unknown node type '{node.class_type}'",
                          details=f"did you mean {' or '.join(repr(h) for h in hint)}?" if hint else
                          "see `nodeflow nodes` for the node types installed")]
    errors: list[NodeError] = []
    literals: dict[str, Any] = {}
    for name, (spec, required) in cls.all_inputs().items():
        if name not in node.inputs:
            if required:
                errors.append(NodeError(node.id, node.class_type, "required_input_missing",
                                        "Required input is missing", name,
                                        expected=f"a link of type {spec.type_name}" if not spec.is_widget
                                        else f"a {spec.type_name} value or link"))
            continue
        value = node.inputs[name]
        if value is _BAD:
            continue
        if type(value) is Link:
            err = _check_link(node, name, spec.type_name, value, graph, registry)
            if err:
                errors.append(err)
            else:
                dag.add_edge(value.node, node.id)
            continue
        if not spec.is_widget:
            errors.append(NodeError(node.id, node.class_type, "invalid_input_type",
                                    f"Input takes a {spec.type_name} link, not a literal", name, value,
                                    f"a link [node_id, output_index] to a {spec.type_name} output"))
            continue
        err = spec.check(value)
        if err:
            errors.append(NodeError(node.id, node.class_type, err.type, err.message, name, value, err.expected))
        else:
            if spec.type_name == "INT" and isinstance(value, float):
                # JSON has one number type: 512.0 for an INT input is 512 (ComfyUI converts too).
                value = node.inputs[name] = int(value)
            literals[name] = value
    if not errors:
        for message in cls.validate_inputs(**literals) or ():
            errors.append(NodeError(node.id, node.class_type, "custom_validation_failed", message))
    return errors


def _check_link(node: NodeEntry, name: str, want: str, link: Link, graph: Graph,
                registry: Registry) -> NodeError | None:
    source = graph.nodes.get(link.node)
    if source is None:
        return NodeError(node.id, node.class_type, "invalid_link", f"Link to missing node '{link.node}'", name,
                         link, "the id of a node in this workflow")
    source_cls = registry.get(source.class_type)
    if source_cls is None:
        return None  # reported on the source node itself
    outs = source_cls.outputs
    if not 0 <= link.index < len(outs):
        return NodeError(node.id, node.class_type, "invalid_link",
                         f"Output index {link.index} out of range for node {link.node} ({source.class_type})",
                         name, link, f"an index in 0..{len(outs) - 1}" if outs else "a node with outputs")
    got = outs[link.index].kind
    if not types_match(got, want):
        return NodeError(node.id, node.class_type, "return_type_mismatch", "Return type mismatch between linked nodes",
                         name, link, f"{want}, but output {link.index} of node {link.node} "
                         f"({source.class_type}) is {got}")
    return None


def _id_order(node_id: str) -> tuple:
    return (0, int(node_id), "") if node_id.isdigit() else (1, 0, node_id)


def _short(value: Any, limit: int = 80) -> str:
    text = json.dumps(value.to_json() if isinstance(value, Link) else value, default=repr)
    return text if len(text) <= limit else text[: limit - 3] + "..."
