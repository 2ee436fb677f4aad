"""API-format workflows laid out as ComfyUI's UI format, for the graph editor to open.

``api_to_ui(prompt, registry)`` is the reverse of ``nodeflow.uiformat.ui_to_api``: each node
becomes an editor node with its sockets, its links and its ``widgets_values`` in the order of
its type's widgets (after a seed-like INT widget, the editor's "control after generate" value),
placed in columns by how far it is from the graph's sources. Converting the result back gives
the same prompt (``ui_to_api(api_to_ui(p)) == p``, titles aside), which is how the server's
templates are made from nodeflow's example workflows.

Literal ids that are not integers (the UI format's node ids are) are numbered in order. This
module imports no torch: it needs only the registry's schemas.
"""

from __future__ import annotations

from typing import Any

from nodeflow.graph import Link, parse
from nodeflow.registry import Registry, display_name
from nodeflow.uiformat import SEED_NAMES

#: Layout, in canvas units: a column's width and the gaps around nodes.
NODE_WIDTH = 320
COLUMN_GAP = 60
ROW_GAP = 40
MARGIN = 40
#: Heights the editor gives a node's title, a socket row and a widget row; big widgets.
TITLE_HEIGHT, SLOT_HEIGHT, WIDGET_HEIGHT = 30, 22, 26
MULTILINE_HEIGHT, IMAGE_PREVIEW_HEIGHT = 100, 240
#: The value written after seed-like widgets: a new picture each run, as the editor's own
#: templates do.
CONTROL_AFTER_GENERATE = "randomize"


def api_to_ui(prompt: dict[str, Any], registry: Registry, *, control: str = CONTROL_AFTER_GENERATE) -> dict[str, Any]:
    """The UI-format document of an API-format ``prompt`` (every node type must be known)."""
    graph = parse(prompt)
    unknown = sorted({n.class_type for n in graph.nodes.values() if registry.get(n.class_type) is None})
    if unknown:
        raise ValueError(f"unknown node type(s): {', '.join(unknown)}")
    ids = _numeric_ids(list(graph.nodes))
    order = _order(graph)
    depth = _depths(graph, order)

    nodes: dict[str, dict[str, Any]] = {}
    for n in order:
        node = graph.nodes[n]
        cls = registry.get(node.class_type)
        entry: dict[str, Any] = {
            "id": ids[n], "type": node.class_type, "pos": [0, 0], "size": [NODE_WIDTH, 0], "flags": {},
            "order": len(nodes), "mode": 0, "inputs": [], "outputs": [],
            "properties": {"Node name for S&R": node.class_type}, "widgets_values": [],
        }
        if node.title and node.title != display_name(cls, node.class_type):
            entry["title"] = node.title
        for name, (spec, _) in cls.all_inputs().items():
            value = node.inputs.get(name)
            widget = spec.is_widget and not getattr(spec, "force_input", False)
            if widget and not getattr(spec, "saved", True):
                continue  # the editor keeps no value of it (ImageCompare's slider)
            if not widget or type(value) is Link:
                slot: dict[str, Any] = {"name": name, "type": spec.type_name, "link": None}
                if widget:
                    slot["widget"] = {"name": name}
                entry["inputs"].append(slot)
            if widget:
                shown = spec.default_value() if name not in node.inputs or type(value) is Link else value
                entry["widgets_values"].append(shown)
                if spec.type_name == "INT" and (name in SEED_NAMES or getattr(spec, "control_after_generate", False)):
                    entry["widgets_values"].append(control)
        entry["outputs"] = [{"name": out.name, "type": out.kind, "links": [], "slot_index": i}
                            for i, out in enumerate(cls.outputs)]
        entry["size"][1] = _height(cls, entry)
        nodes[n] = entry

    links: list[list[Any]] = []
    for n in order:
        target = nodes[n]
        for slot_index, slot in enumerate(target["inputs"]):
            value = graph.nodes[n].inputs.get(slot["name"])
            if type(value) is not Link or value.node not in nodes:
                continue
            link_id = len(links) + 1
            source = nodes[value.node]
            links.append([link_id, source["id"], value.index, target["id"], slot_index, slot["type"]])
            slot["link"] = link_id
            if value.index < len(source["outputs"]):
                source["outputs"][value.index]["links"].append(link_id)

    _place(nodes, order, depth)
    return {
        "last_node_id": max(ids.values(), default=0), "last_link_id": len(links),
        "nodes": [nodes[n] for n in order], "links": links, "groups": [], "config": {},
        "extra": {"ds": {"scale": 1.0, "offset": [0, 0]}}, "version": 0.4,
    }


def _numeric_ids(node_ids: list[str]) -> dict[str, int]:
    if all(n.isdigit() and len(n) < 10 for n in node_ids):
        return {n: int(n) for n in node_ids}
    return {n: i + 1 for i, n in enumerate(node_ids)}


def _order(graph: Any) -> list[str]:
    """Every node after the nodes feeding it, otherwise in id order (a cycle is broken
    where it is met)."""
    def key(n: str) -> tuple:
        return (0, int(n), "") if n.isdigit() else (1, 0, n)

    order: list[str] = []
    state: dict[str, int] = {}
    for root in sorted(graph.nodes, key=key):
        stack = [(root, iter(sorted(_sources(graph, root), key=key)))]
        state.setdefault(root, 1)
        while stack:
            n, sources = stack[-1]
            nxt = next((s for s in sources if s not in state), None)
            if nxt is not None:
                state[nxt] = 1
                stack.append((nxt, iter(sorted(_sources(graph, nxt), key=key))))
                continue
            stack.pop()
            if state.get(n) != 2:
                state[n] = 2
                order.append(n)
    return order


def _sources(graph: Any, n: str) -> list[str]:
    return [v.node for v in graph.nodes[n].inputs.values() if type(v) is Link and v.node in graph.nodes]


def _depths(graph: Any, order: list[str]) -> dict[str, int]:
    depth: dict[str, int] = {}
    for n in order:
        depth[n] = max((depth.get(s, -1) + 1 for s in _sources(graph, n)), default=0)
    return depth


def _height(cls: Any, entry: dict[str, Any]) -> int:
    sockets = max(len(entry["inputs"]), len(entry["outputs"]))
    height = TITLE_HEIGHT + SLOT_HEIGHT * sockets + WIDGET_HEIGHT * len(entry["widgets_values"])
    if any(getattr(spec, "multiline", False) for spec, _ in cls.all_inputs().values()):
        height += MULTILINE_HEIGHT
    if cls.output_node and not cls.outputs:
        height += IMAGE_PREVIEW_HEIGHT
    return height


def _place(nodes: dict[str, dict[str, Any]], order: list[str], depth: dict[str, int]) -> None:
    """Columns by depth, each stacked top-down in run order."""
    tops: dict[int, int] = {}
    for n in order:
        column = depth[n]
        y = tops.get(column, MARGIN)
        nodes[n]["pos"] = [MARGIN + column * (NODE_WIDTH + COLUMN_GAP), y]
        tops[column] = y + nodes[n]["size"][1] + ROW_GAP
