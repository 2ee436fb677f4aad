"""ComfyUI's UI-format workflows, converted to the API format.

ComfyUI's editor saves (and embeds in the PNGs it writes as the ``workflow`` chunk) a
format of its own::

    {"nodes": [{"id": 3, "type": "KSampler", "mode": 0, "title": "...",
                "inputs": [{"name": "model", "type": "MODEL", "link": 1}, ...],
                "outputs": [...], "widgets_values": [42, "randomize", 20, 8, ...]}, ...],
     "links": [[link_id, from_node, from_slot, to_node, to_slot, "MODEL"], ...], ...}

``ui_to_api`` turns it into the API format the engine runs, the way the editor's own
"save (API)" does, using the node schemas of a registry for what the file leaves implicit:

- ``widgets_values`` is a list in the order of the node type's widget inputs (required,
  then optional; inputs marked ``force_input`` are sockets, not widgets). After an INT
  input with ``control_after_generate`` (and, as the editor does, after any ``seed`` or
  ``noise_seed``) the editor stores an extra value (``"fixed"``, ``"randomize"``, ...),
  which is skipped. A dict ``widgets_values`` (some custom nodes) maps by name.
- A widget converted to an input has an ``inputs`` entry with a ``widget`` key; when it is
  linked, the link replaces the widget's value.
- Links come from ``links`` entries (lists as above, or the newer objects with
  ``origin_id``/``origin_slot``/``target_id``/``target_slot``/``type``).
- Muted nodes (mode 2) are left out, and so are links from them. Bypassed nodes (mode 4)
  are left out and pass their inputs through: a link from one of their outputs is taken
  from their input at the same slot if it has the link's type, else from their first input
  of that type (as ComfyUI's editor does).
- Editor-only nodes are dropped: ``Note``/``MarkdownNote``; ``Reroute`` (links through
  them are followed to the real source); ``PrimitiveNode`` (a link from one becomes the
  primitive's value).
- Node ids become strings; a node's ``title`` becomes ``_meta.title`` (its type's display
  name when the file has none).
- A node type the registry does not know is kept, with what can be recovered of its inputs
  (linked inputs, and widget values named by its ``inputs`` entries or a dict), so that
  validation reports it by name.

Not handled: subgraphs (the newer editor's ``definitions.subgraphs``) and the older "group
nodes" (``extra.groupNodes``) raise ``WorkflowError`` asking to unpack them in the editor
first; groups (boxes around nodes) are ignored.

A document whose structure is broken (``links`` that is not a list, a node whose ``inputs``
is not a list, ...) raises ``WorkflowError`` naming the field and what it held; entries
inside those lists that make no sense are skipped, as the editor skips them.

This module imports no torch: it needs only the registry's schemas.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from nodeflow.graph import WorkflowError, is_ui_format
from nodeflow.registry import Registry

#: Node types that exist only in ComfyUI's editor.
EDITOR_ONLY = frozenset({"Note", "MarkdownNote", "PrimitiveNode", "Reroute"})
MODE_MUTED = 2
MODE_BYPASSED = 4
#: The values of the editor's "control after generate" widget.
CONTROL_VALUES = frozenset({"fixed", "increment", "decrement", "randomize"})
#: Input names the editor gives that widget even when the schema does not ask for it.
SEED_NAMES = frozenset({"seed", "noise_seed"})


@dataclass(frozen=True)
class _Link:
    origin: str
    slot: int
    type: str


def ui_to_api(data: Any, registry: Registry | None = None) -> dict[str, Any]:
    """Convert a UI-format workflow to an API-format prompt (see the module docs)."""
    if not is_ui_format(data):
        raise WorkflowError("not a UI-format workflow: expected an object with 'nodes' and 'links'")
    if registry is None:
        from nodeflow.registry import default_registry

        registry = default_registry()
    return _Converter(data, registry).convert()


class _Converter:
    def __init__(self, data: dict[str, Any], registry: Registry) -> None:
        self.registry = registry
        self.nodes: dict[str, dict[str, Any]] = {}
        for index, raw in enumerate(data["nodes"]):
            if not isinstance(raw, dict) or "id" not in raw or not isinstance(raw.get("type"), str):
                raise WorkflowError(f"UI-format workflow: entry {index} of 'nodes' is not a node "
                                    "(an object with 'id' and 'type')")
            node_id = str(raw["id"])
            for key in ("inputs", "outputs"):
                if raw.get(key) is not None and not isinstance(raw[key], list):
                    raise WorkflowError(f"UI-format workflow: node {node_id} ({raw['type']}): '{key}' must be "
                                        f"a list, got {_json_type(raw[key])}")
            self.nodes[node_id] = raw
        links = data.get("links")
        if links is not None and not isinstance(links, list):
            raise WorkflowError(f"UI-format workflow: 'links' must be a list, got {_json_type(links)}")
        self.links = dict(_read_links(links or []))
        self._refuse_unsupported(data)

    def _refuse_unsupported(self, data: dict[str, Any]) -> None:
        definitions = data.get("definitions") if isinstance(data.get("definitions"), dict) else {}
        listed = definitions.get("subgraphs")
        if listed is not None and not isinstance(listed, list):
            raise WorkflowError(f"UI-format workflow: 'definitions.subgraphs' must be a list, "
                                f"got {_json_type(listed)}")
        subgraphs = {str(s.get("id")) for s in listed or [] if isinstance(s, dict)}
        extra = data.get("extra") if isinstance(data.get("extra"), dict) else {}
        groups = extra.get("groupNodes") if isinstance(extra.get("groupNodes"), dict) else {}
        for node_id, raw in self.nodes.items():
            kind = raw["type"]
            if kind in subgraphs:
                raise WorkflowError(f"node {node_id} is a subgraph ({kind}); subgraphs are not supported yet: "
                                    "unpack it in ComfyUI's editor (right click > Unpack Subgraph) and save again")
            if kind.startswith(("workflow>", "workflow/")) and kind.split(">" if ">" in kind else "/", 1)[1] in groups:
                raise WorkflowError(f"node {node_id} is a group node ({kind}); group nodes are not supported: "
                                    "convert it back to nodes in ComfyUI's editor and save again")

    def convert(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for node_id, raw in sorted(self.nodes.items(), key=lambda item: _order_key(item[0], item[1])):
            kind = raw["type"]
            if kind in EDITOR_ONLY or raw.get("mode") in (MODE_MUTED, MODE_BYPASSED):
                continue
            cls = self.registry.get(kind)
            if cls is not None and getattr(cls, "editor_only", False):
                continue
            inputs = self._widget_values(raw, cls)
            for entry in raw.get("inputs") or []:
                if not isinstance(entry, dict) or entry.get("link") is None:
                    continue
                widget = entry.get("widget")
                name = widget.get("name") if isinstance(widget, dict) and widget.get("name") else entry.get("name")
                if not isinstance(name, str):
                    continue
                resolved = self._resolve(entry["link"], entry.get("type"))
                if resolved is not None:
                    inputs[name] = resolved
            title = raw.get("title")
            if not isinstance(title, str) or not title:
                title = cls.display_name if cls is not None else kind
            out[node_id] = {"inputs": inputs, "class_type": kind, "_meta": {"title": title}}
        return out

    # -- widgets -------------------------------------------------------------------------

    def _widget_values(self, raw: dict[str, Any], cls) -> dict[str, Any]:
        values = raw.get("widgets_values")
        if cls is None:
            return self._unknown_widgets(raw, values)
        all_inputs = cls.all_inputs()
        if isinstance(values, dict):
            return {k: v for k, v in values.items() if k in all_inputs and all_inputs[k][0].is_widget}
        if not isinstance(values, list):
            return {}
        specs = [(name, spec) for name, (spec, _) in all_inputs.items()
                 if spec.is_widget and not getattr(spec, "force_input", False)]
        return _zip_widgets([(name, spec.type_name, getattr(spec, "control_after_generate", False))
                             for name, spec in specs], values)

    def _unknown_widgets(self, raw: dict[str, Any], values: Any) -> dict[str, Any]:
        if isinstance(values, dict):
            return dict(values)
        if not isinstance(values, list):
            return {}
        # Newer editors list every widget among the inputs, in widget order.
        names = []
        for entry in raw.get("inputs") or []:
            widget = entry.get("widget") if isinstance(entry, dict) else None
            if isinstance(widget, dict) and isinstance(widget.get("name"), str):
                names.append((widget["name"], entry.get("type", ""), False))
        return _zip_widgets(names, values)

    # -- links ---------------------------------------------------------------------------

    def _resolve(self, link_id: Any, want_type: Any) -> Any:
        """What a link delivers: ``[node_id, slot]`` of the real source, a primitive's value,
        or ``None`` when it leads nowhere (a muted node, a loose reroute, a missing node)."""
        seen: set = set()
        while link_id is not None and _hashable(link_id) not in seen:
            seen.add(_hashable(link_id))
            link = self.links.get(_hashable(link_id))
            if link is None:
                return None
            if not isinstance(want_type, str) or not want_type:
                want_type = link.type
            source = self.nodes.get(link.origin)
            if source is None:
                return None
            kind = source["type"]
            if kind == "PrimitiveNode":
                values = source.get("widgets_values")
                if isinstance(values, list) and values:
                    return _literal(values[0])
                return None
            cls = self.registry.get(kind)
            if kind == "Reroute" or (cls is not None and getattr(cls, "editor_only", False) and cls.outputs):
                link_id = _first_link(source.get("inputs") or [], range(len(source.get("inputs") or [])))
                continue
            if kind in EDITOR_ONLY:
                return None
            mode = source.get("mode")
            if mode == MODE_BYPASSED:
                slots = source.get("inputs") or []
                order = [link.slot, *range(len(slots))]
                match = next((i for i in order if 0 <= i < len(slots) and isinstance(slots[i], dict)
                              and slots[i].get("type") == want_type), None)
                if match is None:
                    return None
                link_id = slots[match].get("link")
                continue
            if mode == MODE_MUTED:
                return None
            return [link.origin, link.slot]
        return None


def _read_links(raw_links: Iterable[Any]):
    for entry in raw_links:
        if isinstance(entry, list) and len(entry) >= 5:
            link_id, origin, slot = entry[0], entry[1], entry[2]
            kind = entry[5] if len(entry) > 5 else ""
        elif isinstance(entry, dict) and "origin_id" in entry:
            link_id, origin, slot, kind = entry.get("id"), entry["origin_id"], entry.get("origin_slot"), \
                entry.get("type", "")
        else:
            continue
        if link_id is None or origin is None or not isinstance(slot, int) or isinstance(slot, bool):
            continue
        yield _hashable(link_id), _Link(str(origin), slot, kind if isinstance(kind, str) else "")


def _zip_widgets(widgets: list[tuple[str, str, bool]], values: list[Any]) -> dict[str, Any]:
    """Pair widget names with ``widgets_values``, skipping the control values the editor
    stores after seed-like INT widgets."""
    out: dict[str, Any] = {}
    i = 0
    for name, kind, control in widgets:
        if i >= len(values):
            break
        out[name] = _literal(values[i])
        i += 1
        if kind == "INT" and (control or name in SEED_NAMES) and i < len(values) \
                and isinstance(values[i], str) and values[i] in CONTROL_VALUES:
            i += 1
    return out


def _literal(value: Any) -> Any:
    # A list literal must be wrapped, or it reads as a link (DESIGN §10).
    return {"__value__": value} if isinstance(value, list) else value


def _first_link(entries: list[Any], order: Iterable[int]) -> Any:
    for i in order:
        entry = entries[i]
        if isinstance(entry, dict) and entry.get("link") is not None:
            return entry["link"]
    return None


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
