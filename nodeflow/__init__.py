"""nodeflow: typed node graphs for Stable Diffusion, compatible with ComfyUI's API format.

From Python::

    import nodeflow
    result = nodeflow.run("workflows/txt2img.json")    # a path, a dict, or a Workflow
    result.ui                                            # {node_id: {"images": [...]}}
    result.output("9", 0)                                # a node's output value

The engine half of this package (graph, registry, cache, executor, queue) does not
import torch; the nodes and ``nodeflow.models`` / ``nodeflow.sampling`` do.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from nodeflow.cache import OutputCache
from nodeflow.executor import ExecutionResult, Executor, ValidationFailed
from nodeflow.graph import Graph, Link, ValidationReport, WorkflowError, parse, validate
from nodeflow.node import Interrupted, Node, Result
from nodeflow.registry import Registry, default_registry
from nodeflow.spec import Bool, Combo, Float, Hidden, Int, Output, Socket, String
from nodeflow.workflow import Workflow

__version__ = "0.1.0"

__all__ = [
    "Bool", "Combo", "ExecutionResult", "Executor", "Float", "Graph", "Hidden", "Int", "Interrupted", "Link",
    "Node", "Output", "OutputCache", "Registry", "Result", "Socket", "String", "ValidationFailed",
    "ValidationReport", "Workflow", "WorkflowError", "default_registry", "load_workflow", "parse", "run",
    "validate",
]

_executor: Executor | None = None


def load_workflow(source: Any, registry: Registry | None = None) -> dict[str, Any]:
    """A workflow as an API-format dict, from a dict, a ``Workflow``, a JSON string or a file path.
    ComfyUI's UI-format workflows (as its editor saves them) are converted with ``registry``'s
    schemas (the default registry's when none is given)."""
    if isinstance(source, Workflow):
        return source.to_api()
    if isinstance(source, dict):
        return _from_ui(source, registry)
    if isinstance(source, (str, os.PathLike)):
        text = str(source)
        if isinstance(source, str) and text.lstrip().startswith("{"):
            from nodeflow.graph import load_json
            return _from_ui(load_json(text), registry)
        from nodeflow.loader import read_workflow_file
        return read_workflow_file(Path(source))
    raise WorkflowError(f"cannot read a workflow from {type(source).__name__}")


def _from_ui(data: Any, registry: Registry | None) -> Any:
    from nodeflow.graph import is_ui_format

    if is_ui_format(data):
        from nodeflow.uiformat import ui_to_api
        return ui_to_api(data, registry)
    return data


def run(workflow: Any, *, registry: Registry | None = None, executor: Executor | None = None,
        observer=None, outputs=None, extra_data: dict | None = None) -> ExecutionResult:
    """Validate and run a workflow; raises ``ValidationFailed`` if no output can run.

    The default executor (and so its cache) is shared by calls in this process, so running
    the same workflow twice executes nothing the second time.
    """
    global _executor
    if executor is None:
        if registry is None:
            if _executor is None:
                _executor = Executor(default_registry())
            executor = _executor
        else:
            executor = Executor(registry)
    return executor.run(load_workflow(workflow, executor.registry), outputs=outputs, observer=observer,
                        extra_data=extra_data)
