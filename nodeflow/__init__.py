"""nodeflow: typed node graphs for Stable Diffusion, compatible with ComfyUI's API format.

From Python::

    import nodeflow
    result = nodeflow.run("workflows/txt2img.json")    # a path, a dict, or a Workflow
    result.ui                                            # {node_id: {"images": [...]}}
    result.output("8")                                   # node 8's first output: the decoded IMAGE

The engine half of this package (graph, registry, cache, executor, queue) does not
import torch; the nodes and ``nodeflow.models`` / ``nodeflow.sampling`` do.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from nodeflow import context
from nodeflow.cache import OutputCache
from nodeflow.context import RunContext
from nodeflow.executor import ExecutionResult, Executor, ValidationFailed
from nodeflow.graph import Graph, Link, ValidationReport, WorkflowError, parse, validate
from nodeflow.node import Interrupted, Node, Result
from nodeflow.registry import Registry, default_registry
from nodeflow.spec import Bool, Combo, Float, Hidden, Int, Output, Socket, String
from nodeflow.workflow import Workflow

__version__ = "0.1.0"

__all__ = [
    "Bool",
    "Combo",
    "ExecutionResult",
    "Executor",
    "Float",
    "Graph",
    "Hidden",
    "Int",
    "Interrupted",
    "Link",
    "Node",
    "Output",
    "OutputCache",
    "Registry",
    "Result",
    "Socket",
    "String",
    "ValidationFailed",
    "ValidationReport",
    "Workflow",
    "WorkflowError",
    "configure_devices",
    "default_registry",
    "load_workflow",
    "parse",
    "run",
    "shared_executor",
    "validate",
]

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
        from nodeflow.workflow_files import read_workflow_file
        return read_workflow_file(Path(source), registry)
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

    Without ``executor``, calls in this process share one executor (and so its cache) per
    registry (the default registry when none is given), so running the same workflow twice
    executes nothing the second time.
    """
    if executor is None:
        executor = shared_executor(registry if registry is not None else default_registry())
    prompt = load_workflow(workflow, executor.registry)
    editor = _editor_workflow(workflow)
    if editor is not None:          # saved images reopen in the editor with their layout
        extra_data = dict(extra_data or {})
        info = dict(extra_data.get("extra_pnginfo") or {})
        info.setdefault("workflow", editor)
        extra_data["extra_pnginfo"] = info
    return executor.run(prompt, outputs=outputs, observer=observer, extra_data=extra_data)


def _editor_workflow(source: Any) -> dict[str, Any] | None:
    """The UI-format workflow that ``source`` is or carries, if any."""
    from nodeflow.graph import WorkflowError, is_ui_format, load_json

    if isinstance(source, dict):
        return source if is_ui_format(source) else None
    if isinstance(source, str) and source.lstrip().startswith("{"):
        try:
            data = load_json(source)
        except WorkflowError:
            return None
        return data if is_ui_format(data) else None
    if isinstance(source, (str, os.PathLike)):
        from nodeflow.workflow_files import editor_workflow
        return editor_workflow(Path(source))
    return None


def shared_executor(registry: Registry) -> Executor:
    """The executor ``run`` uses for ``registry`` in the current run context: one per registry
    and context, made on first use, which lives as long as the registry does."""
    return context.current().executor(registry)


def configure_devices(device: str | None = None, precision: str | None = None, *, compile: str | None = None,
                      cuda_graphs: bool = False, run_context: RunContext | None = None) -> None:
    """Choose where models run (``"cuda"``, ``"cuda:1"``, ``"mps"``, ``"cpu"``), in which
    precision (``"fp32"``, ``"fp16"``, ``"bf16"``) and whether through the fast path (``compile``:
    a torch.compile backend such as ``"inductor"``; ``cuda_graphs``) — what ``--device``,
    ``--precision``, ``--compile`` and ``--cuda-graphs`` do — for ``run_context`` (default: the
    process's default context). Imports the model stack (torch) only when something is given;
    raises ``ValueError`` naming the option when the device is not there, the fast path cannot
    work here, or the stack cannot load."""
    target = run_context or context.default()
    if device is None and precision is None and not compile and not cuda_graphs:
        return
    try:
        from nodeflow.models import devices
    except ImportError as exc:
        options = ", ".join(name for name, given in (("--device", device), ("--precision", precision),
                                                     ("--compile", compile), ("--cuda-graphs", cuda_graphs)) if given)
        raise ValueError(f"{options} need the model stack (torch): {exc}") from None
    try:
        if device:
            target.device = devices.check_device(device)
        if precision:
            target.precision = devices.check_precision(precision)
    except (ValueError, RuntimeError) as exc:
        raise ValueError(f"--device {device}: {exc}" if device else f"--precision {precision}: {exc}") from None
    if compile or cuda_graphs:
        from nodeflow.models import compiled

        with context.activate(target):
            where = devices.get_device()
        if compile:
            compiled.check_compile(compile, where)
            if where.type == "cpu":
                logging.getLogger("nodeflow.models.compiled").warning(
                    "--compile on the CPU: measured no faster than eager for SD 1.5 in fp32 on a small CPU "
                    "(README, Speed); it pays on GPUs")
        if cuda_graphs:
            compiled.check_cuda_graphs(where)
        target.compile, target.cuda_graphs = compile or None, bool(cuda_graphs)
