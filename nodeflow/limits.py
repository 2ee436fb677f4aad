"""Resource limits: how much one prompt may ask for (the server's ``--max-pixels``,
``--max-steps`` and ``--max-literal-size``), checked in two places.

- At validation, ``ResourceLimits.check`` refuses literal inputs named ``width``/``height``/
  ``batch_size`` whose product exceeds ``max_pixels``, ``steps`` above ``max_steps``
  (ComfyUI's input names; the check knows no node type), and literals longer than
  ``max_literal`` characters (a string, or a list's JSON), in ComfyUI's ``node_errors`` shape;
  ``apply_limits`` adds them to a validation report.
- At run time, ``ResourceLimits.before_node`` is an executor hook: it sees each node's resolved
  inputs just before the node runs (values that came through links too): the same ints, the
  size of LATENT (``{"samples": [B, C, h, w]}``: B·h·w·64 pixels), IMAGE (``[B, H, W, C]``) and
  MASK values, and the size that ``amount``, ``scale_by``, ``megapixels`` or padding would make
  of them. A violation raises ``LimitExceeded``, which fails the prompt with an
  ``execution_error`` naming the node, the input and the limit. The hook runs wherever the
  node runs: in the server's process or on a remote worker.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from nodeflow.graph import Graph, Link, NodeError, ValidationReport, id_order, reachable
from nodeflow.node import Node


@dataclass(frozen=True)
class ResourceLimits:
    """Limits on what one node may make or take; 0 disables one."""

    max_pixels: int = 4096 * 4096
    max_steps: int = 1000
    #: Characters in one literal input: a string, or a list or object as JSON.
    max_literal: int = 1_000_000

    def check(self, graph: Graph) -> list[NodeError]:
        errors: list[NodeError] = []
        for node in graph.nodes.values():
            inputs = node.inputs
            if self.max_literal:
                errors.extend(self._literal_sizes(node))
            if self.max_pixels and "width" in inputs and "height" in inputs:
                w, h = _int(inputs["width"]), _int(inputs["height"])
                b = _int(inputs.get("batch_size", 1))
                if w is not None and h is not None and b is not None and w * h * b > self.max_pixels:
                    shown = f"{w} × {h}" + (f" × {b}" if "batch_size" in inputs else "")
                    errors.append(NodeError(
                        node.id, node.class_type, "value_bigger_than_max", "Image size over the server's limit",
                        "width", w, f"width × height × batch_size of at most {self.max_pixels:,} pixels",
                        f"{shown} = {w * h * b:,} pixels; lower width, height or batch_size "
                        f"(the server's --max-pixels is {self.max_pixels:,})"))
            if self.max_steps and "steps" in inputs:
                steps = _int(inputs["steps"])
                if steps is not None and steps > self.max_steps:
                    errors.append(NodeError(
                        node.id, node.class_type, "value_bigger_than_max", "Steps over the server's limit",
                        "steps", steps, f"at most {self.max_steps} steps",
                        f"the server's --max-steps is {self.max_steps}"))
        return errors


    def _literal_sizes(self, node: Any) -> list[NodeError]:
        errors = []
        for name, value in node.inputs.items():
            size = _literal_size(value, self.max_literal)
            if size > self.max_literal:
                # The value itself is not echoed back: a description of it is.
                shown = f"a string of {size:,} characters" if isinstance(value, str) else \
                    f"a {type(value).__name__} of more than {self.max_literal:,} characters as JSON"
                errors.append(NodeError(
                    node.id, node.class_type, "value_bigger_than_max", "Literal over the server's size limit",
                    name, shown, f"at most {self.max_literal:,} characters",
                    f"the server's --max-literal-size is {self.max_literal:,}"))
        return errors

    # -- at run time ------------------------------------------------------------------------------

    def before_node(self, node_id: str, cls: type[Node], inputs: Mapping[str, Any]) -> None:
        """The executor hook: ``check_inputs`` with the node's declared input types, and the
        pixels of the files it is about to decode (``Node.file_pixels``, from their headers)."""
        kinds = {name: spec.kind for name, (spec, _) in cls.all_inputs().items()}
        self.check_inputs(node_id, cls.type_name, kinds, inputs)
        if self.max_pixels:
            try:
                size = cls.file_pixels(**inputs)
            except Exception:  # noqa: BLE001 - an unreadable file: the node itself says what is wrong
                size = None
            if size is not None:
                self._pixels(f"node {node_id} ({cls.type_name})", f"its file holds {_shown('', size)}", size)

    def check_inputs(self, node_id: str, class_type: str, kinds: Mapping[str, str], inputs: Mapping[str, Any]) -> None:
        """Check a node's resolved inputs just before it runs; raises ``LimitExceeded``.
        ``kinds`` gives each input's declared type (``LATENT``, ``IMAGE``, ``INT``, ...)."""
        where = f"node {node_id} ({class_type})"
        steps = _number(inputs.get("steps"))
        if self.max_steps and steps is not None and steps > self.max_steps:
            raise LimitExceeded(f"{where}: input 'steps' is {steps:g}, over the server's limit of {self.max_steps} "
                                f"steps (--max-steps)")
        if not self.max_pixels:
            return
        sizes: list[tuple[str, tuple[int, int, int]]] = []  # (input, (batch, height, width)) of pictures
        for name, value in inputs.items():
            size = picture_size(kinds.get(name, ""), value)
            if size is not None:
                sizes.append((name, size))
                kind = kinds.get(name) if kinds.get(name) in ("IMAGE", "MASK") else "LATENT"
                self._pixels(where, f"input '{name}' is {_shown(kind, size)}", size)
        for message, size in _made_sizes(inputs, sizes):
            self._pixels(where, message, size)

    def _pixels(self, where: str, what: str, size: tuple[int, int, int]) -> None:
        total = size[0] * size[1] * size[2]
        if total > self.max_pixels:
            raise LimitExceeded(f"{where}: {what} = {total:,} pixels, over the server's limit of "
                                f"{self.max_pixels:,} pixels (--max-pixels)")


class LimitExceeded(ValueError):
    """A node's inputs ask for more than the server's ``--max-pixels`` or ``--max-steps``."""


def picture_size(kind: str, value: Any) -> tuple[int, int, int] | None:
    """``(batch, height, width)`` in pixels of a LATENT (``{"samples": [B, C, h, w]}``, a
    pixel per 1/8 latent cell, also ``[B, C, T, h, w]``), an IMAGE (``[B, H, W, C]``) or a
    MASK (``[B, H, W]`` or ``[H, W]``); None for anything else. A dict with ``samples`` is
    taken for a LATENT whatever its declared type (``*`` inputs)."""
    if isinstance(value, dict) and (kind == "LATENT" or "samples" in value):
        shape = _shape(value.get("samples"))
        if shape is not None and len(shape) == 4:
            return shape[0], shape[2] * 8, shape[3] * 8
        if shape is not None and len(shape) == 5:
            return shape[0] * shape[2], shape[3] * 8, shape[4] * 8
        return None
    shape = _shape(value)
    if shape is None:
        return None
    if kind == "IMAGE" and len(shape) == 4:
        return shape[0], shape[1], shape[2]
    if kind == "MASK" and len(shape) in (2, 3):
        return (shape[0] if len(shape) == 3 else 1), shape[-2], shape[-1]
    return None


def _made_sizes(inputs: Mapping[str, Any], sizes: list[tuple[str, tuple[int, int, int]]]):
    """What a node will make, where its inputs tell: ``(description, (batch, h, w))``."""
    first = sizes[0][1] if sizes else None
    batch, height, width = first if first is not None else (1, 0, 0)
    w, h, b = _number(inputs.get("width")), _number(inputs.get("height")), _number(inputs.get("batch_size"))
    if w is not None and h is not None:
        if first is not None and height and width and (w == 0) != (h == 0):  # 0: keep the aspect ratio
            w, h = (w, w * height / width) if h == 0 else (h * width / height, h)
        given = f"width {w:g}, height {h:g}" + (f", batch_size {b:g}" if b is not None else "")
        b = b if b is not None else batch
        yield f"inputs {given} make {_shown('', (b, h, w))}", (b, h, w)
    if first is None:
        return
    amount = _number(inputs.get("amount"))
    if amount is not None:
        yield f"input 'amount' = {amount:g} makes {_shown('', (batch * amount, height, width))}", \
            (batch * amount, height, width)
    scale = _number(inputs.get("scale_by"))
    if scale is not None:
        size = (batch, height * scale, width * scale)
        yield f"input 'scale_by' = {scale:g} makes {_shown('', size)}", size
    megapixels = _number(inputs.get("megapixels"))
    if megapixels is not None:
        side = math.sqrt(megapixels * 1024 * 1024)
        yield f"input 'megapixels' = {megapixels:g} makes {batch} × {megapixels:g} megapixels", (batch, side, side)
    pads = [_number(inputs.get(k)) for k in ("left", "top", "right", "bottom")]
    if all(p is not None for p in pads):
        size = (batch, height + pads[1] + pads[3], width + pads[0] + pads[2])
        yield f"padding makes {_shown('', size)}", size


def _shown(kind: str, size: tuple) -> str:
    b, h, w = (f"{x:,.0f}" for x in size)
    return f"{'a ' + kind + ' of ' if kind else ''}{b} × {h} × {w}"


def _shape(value: Any) -> tuple[int, ...] | None:
    shape = getattr(value, "shape", None)
    if shape is None:
        return None
    try:
        return tuple(int(x) for x in shape)
    except (TypeError, ValueError):
        return None


def _number(value: Any) -> float | None:
    """An int or float input's value (not a bool, not NaN); None for anything else."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        return None
    return value


def _literal_size(value: Any, limit: int) -> int:
    """A literal's length in characters: a string's own, a list's or an object's as JSON (at
    most ``limit + 1``: enough to know it is too long)."""
    if isinstance(value, str):
        return len(value)
    if type(value) is Link or not isinstance(value, (list, dict)):
        return 0
    size = 0
    for chunk in json.JSONEncoder(ensure_ascii=False, default=repr).iterencode(value):
        size += len(chunk)
        if size > limit:
            return limit + 1
    return size


def _int(value: Any) -> int | None:
    if type(value) is Link or isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value):
        return None  # a link, or a wrong type that validation reports itself
    return int(value)


def apply_limits(report: ValidationReport, errors: list[NodeError]) -> None:
    """Add limit errors to a validation report: the outputs they feed no longer run."""
    if not errors:
        return
    report.errors.extend(errors)
    runnable = set(report.outputs)
    broken: set[str] = set()
    for node_id in sorted({e.node_id for e in errors}, key=id_order):
        reach = {node_id} | reachable(report.successors, [node_id])
        hit = reach & runnable
        if hit:
            known = set(report.failed_outputs.get(node_id, []))
            report.failed_outputs[node_id] = sorted(known | hit, key=id_order)
        broken |= hit
    report.outputs = [o for o in report.outputs if o not in broken]


