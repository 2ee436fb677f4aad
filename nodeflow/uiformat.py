"""ComfyUI's UI-format workflows, converted to the API format.

ComfyUI's editor saves (and embeds in the PNGs it writes as the ``workflow`` chunk) a
format of its own::

    {"nodes": [{"id": 3, "type": "KSampler", "mode": 0, "title": "...",
                "inputs": [{"name": "model", "type": "MODEL", "link": 1}, ...],
                "outputs": [...], "widgets_values": [42, "randomize", 20, 8, ...]}, ...],
     "links": [[link_id, from_node, from_slot, to_node, to_slot, "MODEL"], ...],
     "definitions": {"subgraphs": [...]}, "extra": {"groupNodes": {...}}, ...}

``ui_to_api`` turns it into the API format the engine runs, the way the editor's own
``graphToPrompt`` does, using the node schemas of a registry for what the file leaves implicit:

- ``widgets_values`` is a list in the order of the node type's widget inputs (required,
  then optional; inputs marked ``force_input`` are sockets, not widgets). After an INT
  input with ``control_after_generate`` (and, as the editor does, after any ``seed`` or
  ``noise_seed``) the editor stores an extra value (``"fixed"``, ``"randomize"``, ...; in
  files from 2023 a boolean): the value after such a widget is always skipped, as the
  editor restores values by position. Widgets the list does not reach (a shorter
  list, or none at all) take their defaults, as the editor sends them. A dict
  ``widgets_values`` (some custom nodes) maps by name. Values after the schema's widgets
  go to the editor's own widgets where the node type names them (``editor_widget_values``:
  a custom combo's index and options); a widget the editor keeps out of ``widgets_values``
  (``saved=False``: the image-compare slider) is sent with its ``editor_value``.
- A widget converted to an input has an ``inputs`` entry with a ``widget`` key; when it is
  linked, the link replaces the widget's value.
- Links come from ``links`` entries (lists as above, or the newer objects with
  ``origin_id``/``origin_slot``/``target_id``/``target_slot``/``type``).
- Muted nodes (mode 2) are left out, and so are links from them. Bypassed nodes (mode 4)
  are left out and pass their inputs through: a link from output *k* is taken from input
  *k* when its type fits, else from the first input of exactly the link's type, else from
  the first input whose type fits (the editor's rule).
- Editor-only nodes are dropped: ``Note``/``MarkdownNote``; ``Reroute`` (links through
  them are followed to the real source); ``PrimitiveNode`` (a link from one becomes the
  primitive's value).
- **Subgraphs** (``definitions.subgraphs``): a node whose type is a definition's id is an
  instance of it. Its inner nodes run under the execution ids ``"<instance id>:<inner id>"``
  (one more segment per level of nesting), each instance with its own ids, so the events
  and the history name the nodes as the editor expects. As the editor does on load, an
  inner node whose id a root node or an earlier definition's node already has gets a new
  one first (see ``_renumber_inner_nodes``). Inside a definition, links from the
  input node (id -10) come from the instance's input of that name: its link in the outer
  graph, else the instance's *promoted widget* value (``widgets_values``, one value per
  input of the definition that feeds a widget, in order, no control slots; as the editor,
  ``widgets_values_named`` is not read), else the inner node's own widget value. A link
  from an instance's output comes from whatever feeds that output inside the definition
  (output node, id -20). Muted instances run nothing; bypassed ones pass their inputs
  through, as any node.
- **Group nodes** (the older ``extra.groupNodes``; type ``workflow>NAME`` or
  ``workflow/NAME``): the editor turns each into a subgraph when it loads the workflow, so
  its inner nodes run as ``"<new instance id>:<new inner id>"``, numbered after the highest
  id so far (see ``_number_group_nodes``); the group node's widget values, inputs and
  outputs map to the inner nodes in the order the editor builds them (see ``_GroupNode``).
- Node ids become strings; a node's ``title`` becomes ``_meta.title`` (its type's display
  name when the file has none).
- A node type the registry does not know is kept, with what can be recovered of its inputs
  (linked inputs, and widget values named by its ``inputs`` entries or a dict), so that
  validation reports it by name.

Groups (boxes around nodes) are ignored. A document whose structure is broken (``links``
that is not a list, a node whose ``inputs`` is not a list, a subgraph instance whose
definition is missing, a subgraph that contains itself, a promoted widget that names no
inner input, ...) raises ``WorkflowError`` naming the node and what it held; entries inside
those lists that make no sense are skipped, as the editor skips them.

This module imports no torch: it needs only the registry's schemas.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from nodeflow.graph import WorkflowError, is_ui_format
from nodeflow.registry import Registry, display_name
from nodeflow.spec import DynamicCombo

#: Node types that exist only in ComfyUI's editor.
EDITOR_ONLY = frozenset({"Note", "MarkdownNote", "PrimitiveNode", "Reroute"})
MODE_MUTED = 2
MODE_BYPASSED = 4
#: Input names the editor gives that widget even when the schema does not ask for it.
SEED_NAMES = frozenset({"seed", "noise_seed"})
#: The ids of a subgraph definition's input and output nodes in its links.
SUBGRAPH_INPUT_ID = "-10"
SUBGRAPH_OUTPUT_ID = "-20"
#: How the editor names subgraph definitions (a UUID): a node of such a type whose
#: definition is missing is a broken instance, not an unknown node type.
_UUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
_GROUP_PREFIXES = ("workflow>", "workflow/")


@dataclass(frozen=True)
class _Link:
    origin: str
    slot: int
    type: str
    target: str = ""
    target_slot: int = -1


@dataclass(frozen=True)
class _Value:
    """A literal that replaces a link (a primitive's or a promoted widget's value)."""

    value: Any


def ui_to_api(data: Any, registry: Registry | None = None) -> dict[str, Any]:
    """Convert a UI-format workflow to an API-format prompt (see the module docs)."""
    if not is_ui_format(data):
        raise WorkflowError("not a UI-format workflow: expected an object with 'nodes' and 'links'")
    if registry is None:
        from nodeflow.registry import default_registry

        registry = default_registry()
    return _Converter(data, registry).convert()


class _Graph:
    """One level of a document: the root graph, or a subgraph definition."""

    def __init__(self, data: dict[str, Any], where: str) -> None:
        self.where = where
        self.nodes: dict[str, dict[str, Any]] = {}
        nodes = data.get("nodes")
        if not isinstance(nodes, list):
            raise WorkflowError(f"{where}: 'nodes' must be a list, got {_json_type(nodes)}")
        for index, raw in enumerate(nodes):
            if not isinstance(raw, dict) or "id" not in raw or not isinstance(raw.get("type"), str):
                raise WorkflowError(f"{where}: entry {index} of 'nodes' is not a node "
                                    "(an object with 'id' and 'type')")
            node_id = str(raw["id"])
            for key in ("inputs", "outputs"):
                if raw.get(key) is not None and not isinstance(raw[key], list):
                    raise WorkflowError(f"{where}: node {node_id} ({raw['type']}): '{key}' must be "
                                        f"a list, got {_json_type(raw[key])}")
            self.nodes[node_id] = raw
        links = data.get("links")
        if links is not None and not isinstance(links, list):
            raise WorkflowError(f"{where}: 'links' must be a list, got {_json_type(links)}")
        self.links = dict(_read_links(links or []))
        # A definition's own inputs and outputs (empty for the root graph).
        self.inputs = [s for s in _list(data.get("inputs")) if isinstance(s, dict)]
        self.outputs = [s for s in _list(data.get("outputs")) if isinstance(s, dict)]
        self.id = str(data.get("id", ""))
        self.name = data.get("name") if isinstance(data.get("name"), str) else ""
        self._widget_inputs: list[int] | None = None

    def output_link(self, slot: int) -> _Link | None:
        """The link inside a definition that feeds its output ``slot``."""
        if 0 <= slot < len(self.outputs):
            for link_id in _list(self.outputs[slot].get("linkIds")):
                link = self.links.get(_hashable(link_id))
                if link is not None:
                    return link
        return next((link for link in self.links.values()
                     if link.target == SUBGRAPH_OUTPUT_ID and link.target_slot == slot), None)

    def input_links(self, slot: int) -> list[_Link]:
        """The links inside a definition from its input ``slot`` to inner nodes."""
        found = [self.links.get(_hashable(i)) for i in _list(self.inputs[slot].get("linkIds"))]
        found = [link for link in found if link is not None]
        return found or [link for link in self.links.values()
                         if link.origin == SUBGRAPH_INPUT_ID and link.slot == slot]

    def label(self) -> str:
        return f"'{self.name}' ({self.id})" if self.name else f"'{self.id}'"


@dataclass
class _Scope:
    """Where a node lives: a graph, and the chain of instances that leads there."""

    graph: _Graph
    path: tuple[str, ...] = ()
    instance: dict[str, Any] | None = None
    parent: _Scope | None = None
    children: dict[str, _Scope] = field(default_factory=dict)

    def exec_id(self, node_id: str) -> str:
        return ":".join((*self.path, node_id))

    def where(self) -> str:
        return f"subgraph instance {':'.join(self.path)}" if self.path else "the workflow"


class _Converter:
    def __init__(self, data: dict[str, Any], registry: Registry) -> None:
        self.registry = registry
        self.definitions = _read_definitions(data)
        # Inner nodes by their ids as saved (promotions name those, before any renumbering).
        self.saved_nodes = {key: {str(n["id"]): n for n in _list(d.get("nodes")) if isinstance(n, dict) and "id" in n}
                            for key, d in self.definitions.items()}
        self.groups = _read_group_nodes(data)
        last, taken = _renumber_inner_nodes(data, self.definitions)
        self.group_ids = _number_group_nodes(data, self.groups, last, taken)
        self.root = _Scope(_Graph(data, "UI-format workflow"))

    def convert(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        self._emit(self.root, out)
        # As the editor does: a link to a node that was not emitted is dropped, so that
        # validation reports the input as missing rather than a link to nowhere.
        for node in out.values():
            inputs = node["inputs"]
            for name in [k for k, v in inputs.items() if isinstance(v, list) and v[0] not in out]:
                del inputs[name]
        return out

    # -- walking the graphs ----------------------------------------------------------------

    def _emit(self, scope: _Scope, out: dict[str, Any]) -> None:
        """Add the API nodes of a graph, subgraph instances expanded in place."""
        items = list(scope.graph.nodes.items())
        if scope.parent is None:  # the root graph runs in the editor's execution order
            items.sort(key=lambda item: _order_key(item[0], item[1]))
        for node_id, raw in items:
            kind = raw["type"]
            mode = raw.get("mode")
            if mode in (MODE_MUTED, MODE_BYPASSED) or kind in EDITOR_ONLY:
                continue
            if kind in self.definitions or _UUID.match(kind):
                self._emit(self._child(scope, node_id, raw), out)
                continue
            group = self._group(scope, node_id, raw)
            if group is not None:
                group.emit(out)
                continue
            cls = self.registry.get(kind)
            if cls is not None and getattr(cls, "editor_only", False):
                continue
            inputs = self._widget_values(raw, cls)
            for index, entry in enumerate(raw.get("inputs") or []):
                name = _input_name(entry)
                if name is None or entry.get("link") is None:
                    continue
                resolved = self._input_source(scope, raw, index, entry.get("type"), set())
                if resolved is not None:
                    inputs[name] = _literal(resolved.value) if isinstance(resolved, _Value) else resolved
            title = raw.get("title")
            if not isinstance(title, str) or not title:
                title = display_name(cls, kind) if cls is not None else kind
            out[scope.exec_id(node_id)] = {"inputs": inputs, "class_type": kind, "_meta": {"title": title}}

    def _child(self, scope: _Scope, node_id: str, raw: dict[str, Any]) -> _Scope:
        """The scope of a subgraph instance's inner nodes (made once per instance)."""
        child = scope.children.get(node_id)
        if child is not None:
            return child
        kind = raw["type"]
        path = (*scope.path, node_id)
        instance = ":".join(path)
        definition = self.definitions.get(kind)
        if definition is None:
            raise WorkflowError(f"subgraph instance {instance} (in {scope.where()}) uses the subgraph definition "
                                f"'{kind}', which the workflow does not define (definitions.subgraphs lists "
                                f"{len(self.definitions)} definition(s)); save the workflow again from the editor")
        outer = scope
        while outer is not None:
            if outer.graph.id == kind:
                raise WorkflowError(f"subgraph instance {instance} contains itself: it is an instance of the "
                                    f"subgraph {self._graph(kind).label()}, and it sits inside that same "
                                    f"subgraph (path {' > '.join(path)}); a subgraph cannot contain itself")
            outer = outer.parent
        child = scope.children[node_id] = _Scope(self._graph(kind), path, raw, scope)
        self._check_promotions(child)
        return child

    def _graph(self, definition_id: str) -> _Graph:
        graph = self.definitions[definition_id]
        if isinstance(graph, dict):
            graph = self.definitions[definition_id] = _Graph(graph, f"subgraph '{definition_id}'")
        return graph

    def _group(self, scope: _Scope, node_id: str, raw: dict[str, Any]) -> _GroupNode | None:
        kind = raw["type"]
        if not kind.startswith(_GROUP_PREFIXES) or kind[len("workflow>"):] not in self.groups:
            return None
        if scope.path:
            raise WorkflowError(f"node {scope.exec_id(node_id)} is a group node ({kind}) inside a subgraph, which "
                                "the editor cannot run either; convert it to a subgraph")
        return _GroupNode(self, scope, node_id, raw, self.groups[kind[len("workflow>"):]])

    # -- links -------------------------------------------------------------------------------

    def _input_source(self, scope: _Scope, node: dict[str, Any], index: int, want: Any,
                      seen: set) -> list | _Value | None:
        """What feeds input ``index`` of ``node``: ``[exec_id, slot]`` of the real source, a
        value, or ``None`` when nothing does (the node's own widget value then stands)."""
        entries = node.get("inputs") or []
        if not 0 <= index < len(entries) or not isinstance(entries[index], dict):
            return None
        entry = entries[index]
        link = scope.graph.links.get(_hashable(entry.get("link")))
        if link is None:
            return None
        if not isinstance(want, str) or not want:
            want = entry.get("type") if isinstance(entry.get("type"), str) else link.type
        if link.origin == SUBGRAPH_INPUT_ID:
            return self._through_instance(scope, link.slot, want, seen) if scope.instance is not None else None
        source = scope.graph.nodes.get(link.origin)
        if source is None:
            return None
        return self._output_source(scope, link.origin, source, link.slot, want, seen)

    def _through_instance(self, scope: _Scope, slot: int, want: str, seen: set) -> list | _Value | None:
        """What feeds input ``slot`` of the definition ``scope`` is an instance of: the
        instance's link outside, else its promoted widget's value. A link from a legacy
        primitive node gives nothing (the editor's primitive finds no widget on an instance
        to fill): the inner widget's own value stands."""
        instance = scope.instance
        assert instance is not None and scope.parent is not None
        index = _instance_input(instance, scope.graph, slot)
        if index is not None:
            entry = instance["inputs"][index]
            link = scope.parent.graph.links.get(_hashable(entry.get("link")))
            if link is not None:
                if (scope.parent.graph.nodes.get(link.origin) or {}).get("type") == "PrimitiveNode":
                    return None
                found = self._input_source(scope.parent, instance, index, want, seen)
                if found is not None or link.origin != SUBGRAPH_INPUT_ID:
                    return found
        return self._promoted_value(scope, slot)

    def _output_source(self, scope: _Scope, node_id: str, node: dict[str, Any], slot: int, want: str,
                       seen: set) -> list | _Value | None:
        key = (scope.path, node_id, slot)
        if key in seen:
            return None  # a loop of reroutes or bypassed nodes leads nowhere
        seen.add(key)
        kind = node["type"]
        mode = node.get("mode")
        if mode == MODE_BYPASSED:
            index = _bypass_input(node, slot, want)
            return None if index is None else self._input_source(scope, node, index, want, seen)
        if mode == MODE_MUTED:
            return None
        if kind in self.definitions or _UUID.match(kind):
            child = self._child(scope, node_id, node)
            link = child.graph.output_link(slot)
            if link is None:
                return None
            if link.origin == SUBGRAPH_INPUT_ID:  # an output wired straight from an input
                return self._through_instance(child, link.slot, want, seen)
            inner = child.graph.nodes.get(link.origin)
            return None if inner is None else self._output_source(child, link.origin, inner, link.slot, want, seen)
        group = self._group(scope, node_id, node)
        if group is not None:
            return group.output(slot, want, seen)
        if kind == "PrimitiveNode":
            values = node.get("widgets_values")
            return _Value(values[0]) if isinstance(values, list) and values else None
        cls = self.registry.get(kind)
        if kind == "Reroute" or (cls is not None and getattr(cls, "editor_only", False) and cls.outputs):
            entries = node.get("inputs") or []
            index = slot if slot < len(entries) else _first_linked(entries)
            return None if index is None else self._input_source(scope, node, index, want, seen)
        if kind in EDITOR_ONLY:
            return None
        return [scope.exec_id(node_id), slot]

    # -- subgraph inputs and promoted widgets ------------------------------------------------

    def _promoted_value(self, scope: _Scope, slot: int) -> _Value | None:
        """The value an instance gives its definition's input ``slot`` through a promoted
        widget, or ``None`` when it gives none (the inner widget's own value then stands).

        As the editor restores them (its default settings): ``widgets_values`` is read in
        order, one value per input of the definition that feeds a widget, with no slot for a
        seed's "control after generate" value; ``widgets_values_named`` is not read (the
        editor restores by name only under an experimental setting, off by default)."""
        values = (scope.instance or {}).get("widgets_values")
        if not isinstance(values, list) or not values:
            return None
        capable = self._widget_inputs(scope.graph)
        if slot not in capable:
            return None
        position = capable.index(slot)
        if position >= len(values) or values[position] is None:
            return None
        return _Value(values[position])

    def _widget_inputs(self, graph: _Graph, depth: int = 0) -> list[int]:
        """The definition's inputs that feed a widget (in order): those an instance promotes."""
        if graph._widget_inputs is None:
            graph._widget_inputs = [slot for slot in range(len(graph.inputs))
                                    if any(self._feeds_widget(graph, link, depth) for link in graph.input_links(slot))]
        return graph._widget_inputs

    def _feeds_widget(self, graph: _Graph, link: _Link, depth: int) -> bool:
        target = graph.nodes.get(link.target)
        entries = (target or {}).get("inputs") or []
        entry = entries[link.target_slot] if 0 <= link.target_slot < len(entries) else None
        if target is None or not isinstance(entry, dict):
            return False
        if isinstance(entry.get("widget"), dict):
            return True
        kind = target["type"]
        if kind in self.definitions and depth < 32:  # a nested instance's promoted input
            inner = self._graph(kind)
            slot = next((i for i, s in enumerate(inner.inputs) if s.get("name") == entry.get("name")), None)
            return slot is not None and slot in self._widget_inputs(inner, depth + 1)
        cls = self.registry.get(kind)
        spec = cls.all_inputs().get(entry.get("name")) if cls is not None else None
        return spec is not None and spec[0].is_widget and not getattr(spec[0], "force_input", False)

    def _check_promotions(self, scope: _Scope) -> None:
        """A promoted widget must name an input of the definition (``widgets_values_named``)
        or an inner node and one of its inputs (the editor's ``proxyWidgets``)."""
        instance = scope.instance or {}
        graph = scope.graph
        names = {s.get("name") for s in graph.inputs}
        where = f"subgraph instance {':'.join(scope.path)} ({instance.get('type')})"
        named = instance.get("widgets_values_named")
        if isinstance(named, dict):
            for key in named:
                if key not in names:
                    raise WorkflowError(f"{where} promotes a widget '{key}' (widgets_values_named), but its "
                                        f"subgraph {graph.label()} has no input of that name; its inputs are "
                                        f"{sorted(n for n in names if isinstance(n, str))}")
        properties = instance.get("properties") if isinstance(instance.get("properties"), dict) else {}
        for entry in _list(properties.get("proxyWidgets")):
            if not (isinstance(entry, list) and len(entry) >= 2 and isinstance(entry[1], str)):
                continue
            inner_id, widget = str(entry[0]), entry[1]
            if widget.startswith("$$") or widget.endswith("control_after_generate"):
                continue  # the editor's own widgets: previews, a seed's "control after generate"
            if inner_id == "-1":
                ok = widget in names
            else:
                inner = self.saved_nodes.get(graph.id, {}).get(inner_id, graph.nodes.get(inner_id))
                if inner is None:
                    raise WorkflowError(f"{where} promotes the widget '{widget}' of inner node {inner_id} "
                                        f"(proxyWidgets), but its subgraph {graph.label()} has no node {inner_id}")
                ok = self._has_input(inner, widget)
            if not ok:
                raise WorkflowError(f"{where} promotes the widget '{widget}' of inner node {inner_id} "
                                    f"({inner['type'] if inner_id != '-1' else 'input'}) "
                                    "(proxyWidgets), but that node has no input of that name")

    def _has_input(self, node: dict[str, Any], name: str) -> bool:
        if any(_input_name(e) == name or (isinstance(e, dict) and e.get("name") == name)
               for e in node.get("inputs") or []):
            return True
        kind = node["type"]
        if kind in self.definitions:
            return any(s.get("name") == name for s in self._graph(kind).inputs)
        cls = self.registry.get(kind)
        # An unknown type is reported by validation; its widgets cannot be checked here.
        if cls is None or name in cls.all_inputs():
            return True
        # The editor adds widgets of its own to some nodes (a text preview, an upload
        # button); a node saved with more values than its schema's widgets has such widgets.
        values = node.get("widgets_values")
        return isinstance(values, list) and len(values) > len(_widget_specs(cls))

    # -- widgets -----------------------------------------------------------------------------

    def _widget_values(self, raw: dict[str, Any], cls) -> dict[str, Any]:
        values = raw.get("widgets_values")
        if cls is None:
            return self._unknown_widgets(raw, values)
        all_inputs = cls.all_inputs()
        # Widgets the editor keeps out of widgets_values, with the value it sends for them.
        unsaved = {name: _literal(spec.editor_value) for name, (spec, _) in all_inputs.items()
                   if not getattr(spec, "saved", True) and getattr(spec, "editor_value", None) is not None}
        if isinstance(values, dict):
            given = {k: _literal(v) for k, v in values.items() if k in all_inputs and all_inputs[k][0].is_widget}
            return {**_with_defaults(_widget_specs(cls), given), **unsaved}
        values = values if isinstance(values, list) else []
        specs = _expand_dynamic(_widget_specs(cls), values)
        given, used = _zip_widgets([(name, spec.type_name, getattr(spec, "control_after_generate", False))
                                    for name, spec in specs], values)
        extra = getattr(cls, "editor_widget_values", None)
        if extra is not None and used < len(values):
            # The editor's own widgets after the schema's (a custom combo's options).
            given.update({k: _literal(v) for k, v in extra(values[used:], given).items() if k not in given})
        return {**_with_defaults(specs, given), **given, **unsaved}

    def _unknown_widgets(self, raw: dict[str, Any], values: Any) -> dict[str, Any]:
        if isinstance(values, dict):
            return {k: _literal(v) for k, v in values.items()}
        if not isinstance(values, list):
            return {}
        # Newer editors list every widget among the inputs, in widget order.
        names = []
        for entry in raw.get("inputs") or []:
            widget = entry.get("widget") if isinstance(entry, dict) else None
            if isinstance(widget, dict) and isinstance(widget.get("name"), str):
                names.append((widget["name"], entry.get("type", ""), False))
        return _zip_widgets(names, values)[0]


class _GroupNode:
    """One instance of an older "group node" (``extra.groupNodes[NAME]``).

    The editor builds the group node's schema from its inner nodes in index order: for
    each, its widget inputs not converted to sockets become widgets of the group node (in
    the inner node's schema order), and its socket inputs not linked inside the group become
    inputs of the group node; converted widgets not linked inside come after all of those.
    Outputs: every inner output not linked inside the group (or listed in ``external``).
    A Reroute linked on both sides inside, and an unlinked primitive, take no part."""

    def __init__(self, converter: _Converter, scope: _Scope, node_id: str, raw: dict[str, Any],
                 data: dict[str, Any]) -> None:
        self.c, self.scope, self.id, self.raw = converter, scope, node_id, raw
        self.nodes = [n for n in _list(data.get("nodes")) if isinstance(n, dict) and isinstance(n.get("type"), str)]
        self.links_to: dict[tuple[int, int], tuple[int, int]] = {}
        linked_from: set[tuple[int, int]] = set()
        for link in _list(data.get("links")):
            if isinstance(link, list) and len(link) >= 4 and all(_is_int(v) for v in link[:4]):
                self.links_to[(link[2], link[3])] = (link[0], link[1])
                linked_from.add((link[0], link[1]))
        external = {(e[0], e[1]) for e in _list(data.get("external")) if isinstance(e, list) and len(e) >= 2}
        self.widgets: list[tuple[int, str, bool]] = []  # (inner index, input name, seed-like)
        self.inputs: list[tuple[int, int]] = []  # group input slot -> (inner index, inner input slot)
        self.outputs: list[tuple[int, int]] = []  # group output slot -> (inner index, inner output slot)
        converted: list[tuple[int, int]] = []
        for index, node in enumerate(self.nodes):
            cls = converter.registry.get(node["type"])
            if cls is None:
                continue
            entries = [e for e in node.get("inputs") or [] if isinstance(e, dict)]
            converted_names = {e.get("name") for e in entries if isinstance(e.get("widget"), dict)}
            sockets = []
            for name, (spec, _) in cls.all_inputs().items():
                if spec.is_widget and not getattr(spec, "force_input", False):
                    if name in converted_names:
                        continue
                    self.widgets.append((index, name, name in SEED_NAMES
                                         or getattr(spec, "control_after_generate", False)))
                else:
                    sockets.append(name)
            for slot in range(len(sockets)):
                if (index, slot) not in self.links_to:
                    self.inputs.append((index, slot))
            for slot in range(len(sockets), len(entries)):
                if (index, slot) not in self.links_to:
                    converted.append((index, slot))
            for slot in range(len(cls.outputs)):
                if (index, slot) not in linked_from or (index, slot) in external:
                    self.outputs.append((index, slot))
        self.inputs += converted

    def exec_id(self, index: int) -> str:
        instance, inner = self.c.group_ids.get(self.id, (self.id, []))
        return f"{self.scope.exec_id(instance)}:{inner[index] if index < len(inner) else index}"

    def emit(self, out: dict[str, Any]) -> None:
        values = self.raw.get("widgets_values")
        given, _ = _zip_widgets([(f"{i}\0{name}", "INT" if seed else "", seed) for i, name, seed in self.widgets],
                                values if isinstance(values, list) else [])
        for index, node in enumerate(self.nodes):
            cls = self.c.registry.get(node["type"])
            if node.get("mode") in (MODE_MUTED, MODE_BYPASSED) or node["type"] in EDITOR_ONLY:
                continue
            inputs = self.c._widget_values(node, cls) if cls is not None else {}
            for key, value in given.items():
                owner, _, name = key.partition("\0")
                if owner == str(index):
                    inputs[name] = value
            for slot, entry in enumerate(node.get("inputs") or []):
                name = _input_name(entry)
                if name is None:
                    continue
                resolved = self._inner_input(index, slot, entry.get("type"), set())
                if resolved is not None:
                    inputs[name] = _literal(resolved.value) if isinstance(resolved, _Value) else resolved
            title = node.get("title") if isinstance(node.get("title"), str) and node.get("title") else \
                (display_name(cls, node["type"]) if cls is not None else node["type"])
            out[self.exec_id(index)] = {"inputs": inputs, "class_type": node["type"], "_meta": {"title": title}}

    def _inner_input(self, index: int, slot: int, want: Any, seen: set) -> list | _Value | None:
        if (index, slot) in self.links_to:
            source, source_slot = self.links_to[(index, slot)]
            return self._inner_output(source, source_slot, want, seen)
        if (index, slot) in self.inputs:
            return self.c._input_source(self.scope, self.raw, self.inputs.index((index, slot)), want, seen)
        return None

    def _inner_output(self, index: int, slot: int, want: Any, seen: set) -> list | _Value | None:
        if not 0 <= index < len(self.nodes) or (self.id, index, slot) in seen:
            return None
        seen.add((self.id, index, slot))
        node = self.nodes[index]
        if node["type"] == "PrimitiveNode":
            values = node.get("widgets_values")
            return _Value(values[0]) if isinstance(values, list) and values else None
        if node["type"] == "Reroute":
            return self._inner_input(index, 0, want, seen)
        if node.get("mode") == MODE_MUTED:
            return None
        if node.get("mode") == MODE_BYPASSED:
            chosen = _bypass_input(node, slot, want if isinstance(want, str) else "")
            return None if chosen is None else self._inner_input(index, chosen, want, seen)
        return [self.exec_id(index), slot]

    def output(self, slot: int, want: str, seen: set) -> list | _Value | None:
        if not 0 <= slot < len(self.outputs):
            return None
        index, inner_slot = self.outputs[slot]
        return self._inner_output(index, inner_slot, want, seen)


# -- reading the document ------------------------------------------------------------------------


def _read_definitions(data: dict[str, Any]) -> dict[str, Any]:
    definitions = data.get("definitions") if isinstance(data.get("definitions"), dict) else {}
    listed = definitions.get("subgraphs")
    if listed is not None and not isinstance(listed, list):
        raise WorkflowError(f"UI-format workflow: 'definitions.subgraphs' must be a list, "
                            f"got {_json_type(listed)}")
    found: dict[str, Any] = {}
    for index, entry in enumerate(listed or []):
        if not isinstance(entry, dict) or not isinstance(entry.get("id"), str):
            raise WorkflowError(f"UI-format workflow: entry {index} of 'definitions.subgraphs' is not a subgraph "
                                "definition (an object with an 'id' string, 'nodes' and 'links')")
        found.setdefault(entry["id"], entry)  # the editor keeps the first of a repeated id
    return found


def _renumber_inner_nodes(data: dict[str, Any], definitions: dict[str, Any]) -> tuple[int, set[int]]:
    """Give inner nodes whose ids repeat a root node's or an earlier definition's node's a new
    id, as the editor does when it loads a workflow (so the execution ids it sends are
    ``"<instance>:<new id>"``). Definitions are taken in order; in each, nodes in order; an id
    seen before becomes the next free number after the highest node id so far (starting
    from the document's ``state.lastNodeId``, or ``last_node_id``). The definitions that
    change are replaced by copies (the document is left as it came). Returns the highest id
    given so far and the numeric ids taken (the group nodes are numbered after them)."""
    last = 0
    state = data.get("state")
    if data.get("version") != 0.4 and isinstance(state, dict) and _is_int(state.get("lastNodeId")):
        last = max(last, state["lastNodeId"])
    if _is_int(data.get("last_node_id")):
        last = data["last_node_id"]
    reserved = {str(n["id"]) for n in _list(data.get("nodes")) if isinstance(n, dict) and "id" in n}
    numbers = {int(i) for i in reserved if _numeric_id(i)}
    for definition_id, definition in list(definitions.items()):
        nodes = [n for n in _list(definition.get("nodes")) if isinstance(n, dict) and "id" in n]
        # Within one definition a repeated id keeps its first node only.
        kept, own = [], set()
        for node in nodes:
            if str(node["id"]) not in own:
                own.add(str(node["id"]))
                kept.append(node)
        new_ids: dict[str, int] = {}
        for node in kept:
            node_id = str(node["id"])
            if node_id in reserved:
                last += 1
                while last in numbers:
                    last += 1
                new_ids[node_id] = last
                numbers.add(last)
                reserved.add(str(last))
                continue
            reserved.add(node_id)
            if _numeric_id(node_id):
                numbers.add(int(node_id))
                last = max(last, int(node_id))
        if new_ids or len(kept) != len(nodes):
            definitions[definition_id] = _with_new_ids(definition, kept, new_ids)
    return max([last, *numbers]), numbers


def _number_group_nodes(data: dict[str, Any], groups: dict[str, Any], last: int,
                        taken: set[int]) -> dict[str, tuple[str, list[str]]]:
    """The ids the editor gives group nodes' parts: on load it turns each group node (in the
    order of ``nodes``) into a subgraph, numbering its inner nodes (all of them, in order)
    and then the new subgraph instance with the next free ids after the highest so far.
    By group node id: (the instance's new id, its inner nodes' new ids)."""
    numbers = set(taken)

    def next_id() -> str:
        nonlocal last
        last += 1
        while last in numbers:
            last += 1
        numbers.add(last)
        return str(last)

    found: dict[str, tuple[str, list[str]]] = {}
    for raw in _list(data.get("nodes")):
        kind = raw.get("type") if isinstance(raw, dict) else None
        if not isinstance(kind, str) or not kind.startswith(_GROUP_PREFIXES) or "id" not in raw:
            continue
        group = groups.get(kind[len("workflow>"):])
        if group is None:
            continue
        inner = [next_id() for n in _list(group.get("nodes")) if isinstance(n, dict) and isinstance(n.get("type"), str)]
        found[str(raw["id"])] = (next_id(), inner)
    return found


def _with_new_ids(definition: dict[str, Any], nodes: list[dict[str, Any]], new_ids: dict[str, int]) -> dict[str, Any]:
    """A copy of ``definition`` with its nodes renumbered and its links' ends following them."""
    copy = dict(definition)
    copy["nodes"] = [{**n, "id": new_ids[str(n["id"])]} if str(n["id"]) in new_ids else n for n in nodes]
    links = []
    for link in _list(definition.get("links")):
        if isinstance(link, list) and len(link) >= 5:
            link = list(link)
            for at in (1, 3):
                link[at] = new_ids.get(str(link[at]), link[at])
        elif isinstance(link, dict):
            link = dict(link)
            for key in ("origin_id", "target_id"):
                if key in link:
                    link[key] = new_ids.get(str(link[key]), link[key])
        links.append(link)
    copy["links"] = links
    return copy


def _numeric_id(node_id: str) -> bool:
    return node_id.isdigit() and str(int(node_id)) == node_id


def _read_group_nodes(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    extra = data.get("extra") if isinstance(data.get("extra"), dict) else {}
    groups = extra.get("groupNodes") if isinstance(extra.get("groupNodes"), dict) else {}
    return {name: g for name, g in groups.items() if isinstance(g, dict)}


def _read_links(raw_links: Iterable[Any]):
    for entry in raw_links:
        if isinstance(entry, list) and len(entry) >= 5:
            link_id, origin, slot, target, target_slot = entry[:5]
            kind = entry[5] if len(entry) > 5 else ""
        elif isinstance(entry, dict) and "origin_id" in entry:
            link_id, origin, slot, kind = entry.get("id"), entry["origin_id"], entry.get("origin_slot"), \
                entry.get("type", "")
            target, target_slot = entry.get("target_id"), entry.get("target_slot")
        else:
            continue
        if link_id is None or origin is None or not _is_int(slot):
            continue
        yield _hashable(link_id), _Link(str(origin), slot, kind if isinstance(kind, str) else "",
                                        str(target), target_slot if _is_int(target_slot) else -1)


def _instance_input(instance: dict[str, Any], graph: _Graph, slot: int) -> int | None:
    """The index of the instance's input entry for the definition's input ``slot``: by
    name (saved instances may list only some inputs), else at the same position."""
    entries = instance.get("inputs") or []
    name = graph.inputs[slot].get("name") if 0 <= slot < len(graph.inputs) else None
    for index, entry in enumerate(entries):
        if isinstance(entry, dict) and entry.get("name") == name and name is not None:
            return index
    if 0 <= slot < len(entries) and isinstance(entries[slot], dict) and name is None:
        return slot
    return None


def _bypass_input(node: dict[str, Any], slot: int, want: str) -> int | None:
    """Which input a bypassed node passes to its output ``slot`` (the editor's rule): the
    input at the same slot when its type fits both the output and the link, else the first
    input of exactly the link's type, else the first whose type fits both."""
    entries = [e if isinstance(e, dict) else {} for e in node.get("inputs") or []]
    if not entries:
        return None
    if want in ("*", ""):
        return slot if slot < len(entries) else 0
    outputs = node.get("outputs") or []
    out_type = outputs[slot].get("type", "*") if slot < len(outputs) and isinstance(outputs[slot], dict) else want
    if slot < len(entries) and _fits(entries[slot].get("type"), out_type) and _fits(entries[slot].get("type"), want):
        return slot
    exact = next((i for i, e in enumerate(entries) if e.get("type") == want), None)
    if exact is not None:
        return exact
    return next((i for i, e in enumerate(entries) if _fits(e.get("type"), out_type) and _fits(e.get("type"), want)),
                None)


def _fits(a: Any, b: Any) -> bool:
    """The editor's type check for a connection: ``*``, empty and equal types fit, and so do
    comma-separated lists that share a type (case-insensitively)."""
    if not isinstance(a, str) or not isinstance(b, str):
        return False
    if a in ("*", "") or b in ("*", "") or a.lower() == b.lower():
        return True
    return bool({t.strip().lower() for t in a.split(",")} & {t.strip().lower() for t in b.split(",")})


def _widget_specs(cls) -> list[tuple[str, Any]]:
    """The node type's widgets that take a place in ``widgets_values``, in order."""
    return [(name, spec) for name, (spec, _) in cls.all_inputs().items()
            if spec.is_widget and not getattr(spec, "force_input", False) and getattr(spec, "saved", True)]


def _expand_dynamic(specs: list[tuple[str, Any]], values: list[Any]) -> list[tuple[str, Any]]:
    """The widgets in the editor's order when a dynamic combo is among them: the chosen
    option's widgets (``"<combo>.<input>"``) come right after the combo, as the editor lays
    them out and stores their values."""
    if not any(isinstance(spec, DynamicCombo) for _, spec in specs):
        return specs
    out: list[tuple[str, Any]] = []
    position = 0  # where each widget's value sits in ``values``
    for name, spec in specs:
        out.append((name, spec))
        if isinstance(spec, DynamicCombo):
            choice = values[position] if position < len(values) else spec.default_value()
            chosen = [(f"{name}.{sub}", sub_spec) for sub, sub_spec in spec.sub_inputs(choice).items()
                      if sub_spec.is_widget and not getattr(sub_spec, "force_input", False)]
            out.extend(chosen)
            position += 1 + len(chosen)
            continue
        position += 2 if getattr(spec, "control_after_generate", False) or name in SEED_NAMES else 1
    return out


def _with_defaults(specs: list[tuple[str, Any]], given: dict[str, Any]) -> dict[str, Any]:
    """Every widget's value as the editor sends it: the saved one, else the default."""
    out: dict[str, Any] = {}
    for name, spec in specs:
        if name in given:
            out[name] = given[name]
            continue
        try:
            default = spec.default_value()
        except Exception:  # noqa: BLE001 - e.g. a failing choices function: validation says so
            default = None
        if default is not None:
            out[name] = _literal(default)
    return out


def _zip_widgets(widgets: list[tuple[str, str, bool]], values: list[Any]) -> tuple[dict[str, Any], int]:
    """Pair widget names with ``widgets_values`` by position, as the editor restores them:
    after a seed-like INT widget the next value belongs to its "control after generate"
    widget and is skipped, whatever it holds (``"randomize"``, a 2023 file's boolean, or, in
    a list saved without it, the next widget's value: the editor shifts those too). Also
    how many values the widgets took."""
    out: dict[str, Any] = {}
    i = 0
    for name, kind, control in widgets:
        if i >= len(values):
            break
        out[name] = _literal(values[i])
        i += 1
        if kind == "INT" and (control or name.rpartition("\0")[2] in SEED_NAMES):
            i += 1
    return out, min(i, len(values))


def _input_name(entry: Any) -> str | None:
    if not isinstance(entry, dict):
        return None
    widget = entry.get("widget")
    name = widget.get("name") if isinstance(widget, dict) and widget.get("name") else entry.get("name")
    return name if isinstance(name, str) else None


def _literal(value: Any) -> Any:
    # A list literal must be wrapped, or it reads as a link (DESIGN §10).
    return {"__value__": value} if isinstance(value, list) else value


def _first_linked(entries: list[Any]) -> int | None:
    return next((i for i, e in enumerate(entries) if isinstance(e, dict) and e.get("link") is not None), None)


def _list(value: Any) -> list:
    return value if isinstance(value, list) else []


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _json_type(value: Any) -> str:
    """A value's JSON type, for messages ("got object")."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return f"the number {value!r}"
    if isinstance(value, str):
        return "a string"
    return "an object" if isinstance(value, dict) else "a list" if isinstance(value, list) else type(value).__name__


def _hashable(value: Any) -> Any:
    return value if isinstance(value, (int, str)) else repr(value)


def _order_key(node_id: str, raw: dict[str, Any]) -> tuple:
    order = raw.get("order")
    order = order if isinstance(order, int) and not isinstance(order, bool) else 1 << 30
    return (order, (0, int(node_id), "") if node_id.isdigit() else (1, 0, node_id))
