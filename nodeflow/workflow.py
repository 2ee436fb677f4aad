"""Building workflows in Python.

    wf = Workflow()
    ckpt = wf.add("LoadModel", ckpt_name="sd15.safetensors")
    pos = wf.add("EncodeText", text="a cat", clip=ckpt[1])
    ...
    wf.to_api()          # the API-format dict, as a ComfyUI client would send it
    nodeflow.run(wf)     # run it

``wf.add`` returns a handle whose items are links to its outputs (``ckpt[1]``, or by name
``ckpt["CLIP"]`` when the registry knows the node type).
"""

from __future__ import annotations

import json
from typing import Any

from nodeflow.graph import Link
from nodeflow.registry import Registry


class NodeRef:
    """A node added to a ``Workflow``; indexing gives links to its outputs."""

    def __init__(self, workflow: Workflow, node_id: str, class_type: str) -> None:
        self.workflow, self.id, self.class_type = workflow, node_id, class_type

    def __getitem__(self, key: int | str) -> Link:
        if isinstance(key, str):
            cls = self.workflow.registry.get(self.class_type) if self.workflow.registry else None
            names = [o.name for o in cls.outputs] if cls else []
            if key not in names:
                raise KeyError(f"{self.class_type} has no output named {key!r} (outputs: {names})")
            key = names.index(key)
        return Link(self.id, key)

    def __repr__(self) -> str:
        return f"NodeRef({self.id!r}, {self.class_type!r})"


class Workflow:
    """An API-format workflow under construction."""

    def __init__(self, registry: Registry | None = None) -> None:
        self.registry = registry
        self.nodes: dict[str, dict[str, Any]] = {}
        self._next = 1

    def add(self, class_type: str, *, node_id: str | None = None, title: str | None = None,
            **inputs: Any) -> NodeRef:
        node_id = str(node_id) if node_id is not None else self._new_id()
        if node_id in self.nodes:
            raise ValueError(f"node id {node_id!r} is already used")
        encoded = {k: _encode(v) for k, v in inputs.items()}
        node: dict[str, Any] = {"class_type": class_type, "inputs": encoded}
        if title:
            node["_meta"] = {"title": title}
        self.nodes[node_id] = node
        return NodeRef(self, node_id, class_type)

    def set(self, node: NodeRef | str, **inputs: Any) -> None:
        node_id = node.id if isinstance(node, NodeRef) else str(node)
        self.nodes[node_id]["inputs"].update({k: _encode(v) for k, v in inputs.items()})

    def to_api(self) -> dict[str, Any]:
        return json.loads(json.dumps(self.nodes))

    def to_json(self, **kw: Any) -> str:
        return json.dumps(self.nodes, **kw)

    def _new_id(self) -> str:
        while str(self._next) in self.nodes:
            self._next += 1
        return str(self._next)


def _encode(value: Any) -> Any:
    if isinstance(value, Link):
        return value.to_json()
    if isinstance(value, NodeRef):
        return [value.id, 0]
    if isinstance(value, (list, tuple)):
        return {"__value__": list(value)}
    return value
