"""Typed input and output declarations for nodes.

An input is one of the widget kinds (``Int``, ``Float``, ``String``, ``Bool``, ``Combo``),
which take a literal in the workflow or a link of the same type, or a ``Socket`` of any
type name (``"MODEL"``, ``"LATENT"``, a custom string), which takes only a link.

Each spec knows how to check a literal (``check`` returns an error or ``None``; it never
coerces a value silently) and how to describe itself in ComfyUI's ``/object_info`` shape.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

log = logging.getLogger(__name__)

ANY = "*"
#: ComfyUI's "match type" sockets (a switch's inputs and output): any type, matched in the
#: editor; validation lets them connect to anything, as ComfyUI's does.
MATCH_TYPE = "COMFY_MATCHTYPE_V3"
#: ComfyUI's combo whose chosen option brings its own inputs (see ``DynamicCombo``).
DYNAMIC_COMBO = "COMFY_DYNAMICCOMBO_V3"

# ComfyUI's seed widgets accept any unsigned 64-bit value.
MAX_SEED = 0xFFFFFFFFFFFFFFFF


class LiteralError(BaseModel):
    """Why a literal does not fit its input: one of ComfyUI's error type codes."""

    type: str
    message: str
    expected: str


class InputSpec(BaseModel):
    """Common fields of every input."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    tooltip: str = ""
    #: Socket types take links only; widget types also take literals.
    kind: str = ANY
    #: Evaluated only when the node asks for it (ComfyUI's ``lazy``): the nodes feeding a lazy
    #: input run only if ``Node.check_lazy_status`` names it.
    lazy: bool = False

    @property
    def type_name(self) -> str:
        return self.kind

    @property
    def is_widget(self) -> bool:
        return False

    @property
    def takes_literal(self) -> bool:
        """Whether a literal value may stand for a link (widgets; ComfyUI's match type)."""
        return self.is_widget

    def default_value(self) -> Any:
        return None

    def check(self, value: Any) -> LiteralError | None:
        return LiteralError(type="invalid_input_type", message="Expected a link",
                            expected=f"a link [node_id, output_index] of type {self.type_name}")

    def options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {"tooltip": self.tooltip} if self.tooltip else {}
        if self.lazy:
            opts["lazy"] = True
        return opts

    def object_info(self) -> list:
        opts = self.options()
        return [self.type_name, opts] if opts else [self.type_name]


class Socket(InputSpec):
    """A connection of some data type (MODEL, CLIP, LATENT, IMAGE, ..., or a custom name)."""

    def __init__(self, kind: str, **kw: Any) -> None:
        super().__init__(kind=kind, **kw)


class Widget(InputSpec):
    default: Any = None
    #: Accepting a link as well as a literal ("converted widget" in ComfyUI's editor).
    force_input: bool = False

    @property
    def is_widget(self) -> bool:
        return True

    def default_value(self) -> Any:
        return self.default

    def options(self) -> dict[str, Any]:
        opts = super().options()
        if self.default is not None:
            opts["default"] = self.default
        if self.force_input:
            opts["forceInput"] = True
        return opts


class Int(Widget):
    kind: str = "INT"
    default: int = 0
    min: int = -(2**63)
    max: int = 2**63 - 1
    step: int = 1
    #: Seed widgets get ComfyUI's extra "control_after_generate" widget in UI-format files;
    #: a string names the editor's initial choice ("fixed", "randomize", ...).
    control_after_generate: bool | str = False

    def check(self, value: Any) -> LiteralError | None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            isinstance(value, float) and not value.is_integer()
        ):
            return LiteralError(type="invalid_input_type", message="Expected an integer",
                                expected=f"an integer in [{self.min}, {self.max}]")
        return _check_range(value, self.min, self.max)

    def options(self) -> dict[str, Any]:
        opts = super().options() | {"min": self.min, "max": self.max, "step": self.step}
        if self.control_after_generate:
            opts["control_after_generate"] = self.control_after_generate
        return opts


class Float(Widget):
    kind: str = "FLOAT"
    default: float = 0.0
    # An int limit stays an int in /object_info (ComfyUI writes some FLOAT limits as ints).
    min: float | int = -math.inf
    max: float | int = math.inf
    step: float = 0.01
    round: float | None = None

    def check(self, value: Any) -> LiteralError | None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return LiteralError(type="invalid_input_type", message="Expected a number",
                                expected=f"a finite number in [{self.min}, {self.max}]")
        return _check_range(value, self.min, self.max)

    def options(self) -> dict[str, Any]:
        opts = super().options() | {"step": self.step}
        # JSON has no infinity: leave unbounded limits out, as ComfyUI's schemas do.
        if math.isfinite(self.min):
            opts["min"] = self.min
        if math.isfinite(self.max):
            opts["max"] = self.max
        if self.round is not None:
            opts["round"] = self.round
        return opts


class String(Widget):
    kind: str = "STRING"
    default: str = ""
    multiline: bool = False
    max_length: int | None = None

    def check(self, value: Any) -> LiteralError | None:
        if not isinstance(value, str):
            return LiteralError(type="invalid_input_type", message="Expected a string",
                                expected="a string")
        if self.max_length is not None and len(value) > self.max_length:
            return LiteralError(type="value_bigger_than_max", message="String too long",
                                expected=f"at most {self.max_length} characters")
        return None

    def options(self) -> dict[str, Any]:
        opts = super().options()
        if self.multiline:
            opts["multiline"] = True
        return opts


class Bool(Widget):
    kind: str = "BOOLEAN"
    default: bool = False

    def check(self, value: Any) -> LiteralError | None:
        if not isinstance(value, bool):
            return LiteralError(type="invalid_input_type", message="Expected a boolean",
                                expected="true or false")
        return None


class Combo(Widget):
    """A choice among strings; ``choices`` may be a callable evaluated on each use
    (e.g. the checkpoint files found on disk)."""

    kind: str = "COMBO"
    choices: Sequence[str] | Callable[[], Sequence[str]] = Field(default_factory=list)
    default: Any = None

    def options_list(self) -> list[str]:
        return list(self.choices() if callable(self.choices) else self.choices)

    def default_value(self) -> Any:
        if self.default is not None:
            return self.default
        choices = self.options_list()
        return choices[0] if choices else None

    def check(self, value: Any) -> LiteralError | None:
        choices = self.options_list()
        if value not in choices:
            shown = ", ".join(repr(c) for c in choices[:20]) + (" ..." if len(choices) > 20 else "")
            return LiteralError(type="value_not_in_list", message="Value not in list",
                                expected=f"one of [{shown}]" if choices else "a value, but none are available")
        return None

    def object_info(self) -> list:
        opts = self.options()
        if self.default is None:
            opts.pop("default", None)
        try:
            choices = self.options_list()
        except Exception as exc:  # noqa: BLE001 - one broken choices function must not hide every schema
            log.warning("the choices of a %s input could not be listed: %s: %s", self.kind, type(exc).__name__, exc)
            choices = []
        return [choices, opts]


class EditorWidget(Widget):
    """A widget the editor draws and fills by itself (ComfyUI's image-compare slider): any
    value is accepted, and none is needed."""

    needs_value: bool = False
    #: Whether the editor keeps the widget's value in a saved workflow's ``widgets_values``.
    #: The image-compare slider's it does not: it takes no place there, and every prompt the
    #: editor makes of a workflow carries the slider's initial value, ``editor_value``.
    saved: bool = True
    editor_value: Any = None

    def check(self, value: Any) -> LiteralError | None:
        return None


class FreeCombo(Combo):
    """A combo whose choices the editor's user writes (ComfyUI's ``CustomCombo``): shown with
    the given choices (often none), any string accepted."""

    def check(self, value: Any) -> LiteralError | None:
        if not isinstance(value, str):
            return LiteralError(type="invalid_input_type", message="Expected a string", expected="a string")
        return None


class DynamicCombo(Combo):
    """ComfyUI's dynamic combo: each choice brings inputs of its own, which appear after the
    combo in the editor (its ``widgets_values`` hold the chosen option's widgets right after
    the combo's value) and are named ``"<combo>.<input>"`` in API prompts. ``choice_inputs``
    maps each choice to its inputs (all required), in the editor's order."""

    kind: str = DYNAMIC_COMBO
    choice_inputs: dict[str, dict[str, InputSpec]] = Field(default_factory=dict)

    def options_list(self) -> list[str]:
        return list(self.choice_inputs)

    def sub_inputs(self, choice: Any) -> dict[str, InputSpec]:
        """The inputs ``choice`` brings, by their own names (``"width"``)."""
        return dict(self.choice_inputs.get(choice, {})) if isinstance(choice, str) else {}

    def object_info(self) -> list:
        opts = self.options()
        if self.default is None:
            opts.pop("default", None)
        opts["options"] = [{"key": key, "inputs": {"required": {n: spec.object_info() for n, spec in inputs.items()}}}
                           for key, inputs in self.choice_inputs.items()]
        return [self.kind, opts]


class MatchType(InputSpec):
    """ComfyUI's match-type socket: takes a link of any of ``allowed`` types (the editor makes
    the node's sockets of one template agree)."""

    kind: str = MATCH_TYPE
    template_id: str = "T"
    allowed: str = ANY

    @property
    def takes_literal(self) -> bool:
        return True  # ComfyUI checks no literal of a match type (a primitive's text, say)

    def check(self, value: Any) -> LiteralError | None:
        return None

    def options(self) -> dict[str, Any]:
        return super().options() | {"template": {"template_id": self.template_id, "allowed_types": self.allowed}}


class Hidden(InputSpec):
    """Values the executor supplies: ``PROMPT`` (the whole workflow), ``EXTRA_PNGINFO``
    (``extra_data["extra_pnginfo"]``), ``UNIQUE_ID`` (the node's id), ``DYNPROMPT`` (the
    workflow too: nodeflow does not expand graphs at run time, so it is the prompt as run)."""

    def __init__(self, kind: Literal["PROMPT", "EXTRA_PNGINFO", "UNIQUE_ID", "DYNPROMPT"], **kw: Any) -> None:
        super().__init__(kind=kind, **kw)


class Output(BaseModel):
    """One output socket: its type and display name."""

    model_config = ConfigDict(frozen=True)

    kind: str
    name: str = ""
    tooltip: str = ""
    #: ComfyUI's OUTPUT_IS_LIST: ``run`` returns a list of values for this output; a node it
    #: feeds runs once per element, unless it takes whole lists (``Node.input_is_list``).
    is_list: bool = False

    def __init__(self, kind: str, name: str = "", **kw: Any) -> None:
        super().__init__(kind=kind, name=name or kind, **kw)


def _check_range(value: float, lo: float, hi: float) -> LiteralError | None:
    if value < lo:
        return LiteralError(type="value_smaller_than_min", message=f"Value {value} smaller than min of {lo}",
                            expected=f">= {lo}")
    if value > hi:
        return LiteralError(type="value_bigger_than_max", message=f"Value {value} bigger than max of {hi}",
                            expected=f"<= {hi}")
    return None


def types_match(output_type: str, input_type: str) -> bool:
    """Whether a link from an output of ``output_type`` may feed an input of ``input_type``.

    ``*`` and ComfyUI's match type match anything; comma-separated names ("IMAGE,MASK") match any of them.
    A COMBO input accepts a STRING or COMBO link (primitive nodes in the editor send strings).
    """
    if output_type == input_type or ANY in (output_type, input_type) or MATCH_TYPE in (output_type, input_type):
        return True
    outs, ins = set(output_type.split(",")), set(input_type.split(","))
    if input_type == "COMBO" or isinstance(input_type, list):
        return bool(outs & {"COMBO", "STRING"})
    return bool(outs & ins)
