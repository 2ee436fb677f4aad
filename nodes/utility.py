"""Utility nodes: ComfyUI's primitive value nodes, and the editor-only nodes that a UI-format
workflow may contain.

``Note``, ``MarkdownNote``, ``Reroute`` and ``PrimitiveNode`` live only in ComfyUI's editor:
its "save (API)" leaves them out, and ``nodeflow.uiformat`` drops them too (resolving links
through reroutes and replacing links from primitive nodes by their values). The notes and
the reroute are registered anyway, marked ``editor_only``, so that an API-format workflow
that still holds one (converted by some other tool) validates and runs: a note is never
executed (nothing needs it), a reroute passes its input through. ``PrimitiveNode`` has no
fixed output type, so it exists only in the converter.
"""

from __future__ import annotations

from nodeflow import Bool, Float, Int, Node, Output, Socket, String
from nodeflow.spec import ANY


class Note(Node):
    """A text note in the editor; never executed."""

    category = "utils"
    editor_only = True
    optional = {"text": String(default="", multiline=True)}
    outputs = []

    def run(self, text=""):
        return ()


class MarkdownNote(Node):
    """A Markdown note in the editor; never executed."""

    category = "utils"
    display_name = "Markdown Note"
    editor_only = True
    optional = {"text": String(default="", multiline=True)}
    outputs = []

    def run(self, text=""):
        return ()


class Reroute(Node):
    """Passes its input through unchanged (a link waypoint in the editor)."""

    category = "utils"
    editor_only = True
    inputs = {"value": Socket(ANY)}
    outputs = [Output(ANY, "value")]

    def run(self, value):
        return (value,)


class PrimitiveInt(Node):
    """An integer value."""

    category = "utils/primitive"
    display_name = "Int"
    inputs = {"value": Int(default=0, min=-(2**63 - 1), max=2**63 - 1, control_after_generate=True)}
    outputs = [Output("INT")]

    def run(self, value):
        return (value,)


class PrimitiveFloat(Node):
    """A number."""

    category = "utils/primitive"
    display_name = "Float"
    # ComfyUI's limits are the ints ±sys.maxsize.
    inputs = {"value": Float(default=0.0, min=-(2**63 - 1), max=2**63 - 1, step=0.1)}
    outputs = [Output("FLOAT")]

    def run(self, value):
        return (value,)


class PrimitiveString(Node):
    """A line of text."""

    category = "utils/primitive"
    display_name = "String"
    inputs = {"value": String(default="")}
    outputs = [Output("STRING")]

    def run(self, value):
        return (value,)


class PrimitiveStringMultiline(Node):
    """A text of several lines."""

    category = "utils/primitive"
    display_name = "String (Multiline)"
    inputs = {"value": String(default="", multiline=True)}
    outputs = [Output("STRING")]

    def run(self, value):
        return (value,)


class PrimitiveBoolean(Node):
    """True or false."""

    category = "utils/primitive"
    display_name = "Boolean"
    inputs = {"value": Bool(default=False)}
    outputs = [Output("BOOLEAN")]

    def run(self, value):
        return (value,)
