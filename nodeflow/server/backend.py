"""The server's backend: the engine's ``LocalBackend`` with the server's run-time guard and
ComfyUI's error details.

- **Guard.** Validation sees literals only; a value that arrives through a link (a
  primitive node's 100000 steps, a latent upscaled eight times) is known only when the
  node is about to run. The executor offers no hook before a node runs, so the backend
  runs prompts on a registry of *guarded* node classes: a subclass of each node class,
  with the same type name (so cache keys are unchanged), whose ``run`` first hands the
  resolved inputs to ``ResourceLimits.check_inputs``. A violation raises inside the node,
  and the prompt fails with an ``execution_error`` naming the node, the input and the limit.
- **current_inputs.** ComfyUI's ``execution_error`` carries the failing node's inputs as
  lists of values (``{"ckpt_name": ["bad.safetensors"]}``); the guarded ``run`` keeps the
  inputs of a node that raised, and the error is sent with them made JSON-safe (a tensor
  becomes ``"Tensor[1, 4, 64, 64]"``, other objects a short repr).
- **Devices.** ``--device`` and ``--precision`` are applied with ``apply_devices`` when the
  worker starts (importing the model stack, and torch, only then and only if given).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from nodeflow import configure_devices
from nodeflow.node import Node
from nodeflow.queue import LocalBackend
from nodeflow.registry import Registry
from nodeflow.server.security import ResourceLimits

#: Strings, lists and dicts in ``current_inputs`` are cut to these sizes.
MAX_TEXT, MAX_ITEMS = 2000, 32


class ServerBackend(LocalBackend):
    """Runs prompts in this process, each node's resolved inputs checked against ``limits``
    before it runs."""

    def __init__(self, registry: Registry, limits: ResourceLimits, cache: Any = None) -> None:
        self.limits = limits
        #: (node id, JSON-safe inputs) of the last node whose run raised.
        self._failed: tuple[str, dict[str, list]] | None = None
        super().__init__(guarded_registry(registry, self), cache)

    def execute(self, item, observer):
        self._failed = None
        try:
            return super().execute(item, observer)
        finally:
            self._failed = None

    def before_run(self, node: Node, cls: type[Node], inputs: dict[str, Any]) -> None:
        """Called by a guarded node with its resolved inputs; raises ``LimitExceeded``."""
        kinds = {name: spec.kind for name, (spec, _) in cls.all_inputs().items()}
        self.limits.check_inputs(node.context.node_id, cls.type_name, kinds, inputs)

    def run_failed(self, node: Node, cls: type[Node], inputs: dict[str, Any]) -> None:
        """Called by a guarded node whose run raised: keep its inputs for the error event."""
        shown = {name: [json_safe(value)] for name, value in inputs.items() if name not in cls.hidden}
        self._failed = (node.context.node_id, shown)

    def rewrite_event(self, event: str, data: dict, graph: Any, report: Any) -> dict:
        data = super().rewrite_event(event, data, graph, report)
        if event == "execution_error":
            failed = self._failed
            if failed is not None and failed[0] == data.get("node_id"):
                inputs = failed[1]
            else:  # failed before the node ran: what the executor described, as lists
                inputs = {k: [v] for k, v in (data.get("current_inputs") or {}).items()}
            return {**data, "current_inputs": inputs}
        return data


# -- guarded node classes -----------------------------------------------------------------------


def guarded_registry(registry: Registry, backend: ServerBackend) -> Registry:
    """A registry with the same names and aliases as ``registry`` whose classes call
    ``backend.before_run`` before they run (and ``backend.run_failed`` when they raise)."""
    guarded = Registry()
    wrapped: dict[type[Node], type[Node]] = {}
    for cls in registry.classes():
        wrapped[cls] = guarded.register(_guarded(cls, backend))
    for name in registry.names():
        target = registry.get(name)
        if target is not None and target in wrapped and name != target.type_name:
            guarded.register(wrapped[target], aliases=[name])
    guarded.load_errors.update(registry.load_errors)
    return guarded


def _guarded(cls: type[Node], backend: ServerBackend) -> type[Node]:
    run_original: Callable[..., Any] = cls.run

    def run(self: Node, **inputs: Any) -> Any:
        try:
            backend.before_run(self, cls, inputs)
            return run_original(self, **inputs)
        except BaseException:
            backend.run_failed(self, cls, inputs)
            raise

    # The same type name, display name and description: cache keys and schemas are unchanged.
    return type(cls.__name__, (cls,), {
        "type_name": cls.type_name, "display_name": cls.display_name, "description": cls.description,
        "__doc__": cls.__doc__, "__module__": cls.__module__, "__qualname__": cls.__qualname__, "run": run,
    })


# -- JSON-safe values -----------------------------------------------------------------------------


def json_safe(value: Any, depth: int = 0) -> Any:
    """A node input as ComfyUI's ``current_inputs`` shows it: JSON values as they are (long
    strings, lists and dicts cut short), a tensor as ``"Tensor[shape]"``, anything else as a
    short repr."""
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
        return items + ["…"] if len(value) > MAX_ITEMS else items
    if depth < 3 and isinstance(value, dict):
        return {str(k): json_safe(v, depth + 1) for k, v in list(value.items())[:MAX_ITEMS]}
    text = repr(value)
    return text if len(text) <= 200 else text[:200] + "…"


#: ``--device`` / ``--precision``, applied when the worker starts.
apply_devices = configure_devices
