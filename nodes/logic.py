"""ComfyUI's logic nodes: the if/else switch (which evaluates only the branch it takes, through
lazy inputs) and the custom combo (a drop-down whose choices the editor's user writes).

Names and inputs are ComfyUI's (``comfy_extras/nodes_logic.py``).
"""

from __future__ import annotations

from nodeflow import Bool, Node, Output
from nodeflow.spec import MATCH_TYPE, FreeCombo, MatchType

#: An input that is not connected (``None`` is a connected input not evaluated yet).
MISSING = object()


class ComfySwitchNode(Node):
    """Passes on ``on_true`` when ``switch`` is true, else ``on_false``. Only the chosen branch
    runs: both inputs are lazy, and the switch asks for the one it needs. A branch that is not
    connected gives nothing (``None``)."""

    category = "utilities/logic"
    display_name = "If/Else Switch"
    inputs = {"switch": Bool(default=False)}
    optional = {"on_false": MatchType(template_id="switch", lazy=True),
                "on_true": MatchType(template_id="switch", lazy=True)}
    outputs = [Output(MATCH_TYPE, "output")]

    def check_lazy_status(self, switch, on_false=MISSING, on_true=MISSING):
        chosen = on_true if switch else on_false
        return ["on_true" if switch else "on_false"] if chosen is None else []

    def run(self, switch, on_false=MISSING, on_true=MISSING):
        chosen = on_true if switch else on_false
        return (None if chosen is MISSING else chosen,)


class CustomCombo(Node):
    """A drop-down of choices written in the editor: outputs the chosen text and its index.
    The editor keeps the choices and the index in widgets of its own, which it sends in API
    prompts as extra inputs (``index``, ``option1``, ...); the index is 0 when not given."""

    category = "utilities"
    display_name = "Custom Combo"
    inputs = {"choice": FreeCombo(choices=[])}
    outputs = [Output("STRING", "STRING"), Output("INT", "INDEX")]
    accept_all_inputs = True

    @staticmethod
    def editor_widget_values(rest: list, widgets: dict) -> dict:
        """The editor's own widgets, saved in ``widgets_values`` after ``choice``: the index,
        then each option. Prompts carry them as ``index``, ``option1``, ...; the editor sends
        as the index the position of the choice among the options (-1 when none is it),
        whatever index was saved (frontend 1.58.1's graphToPrompt)."""
        options = rest[1:]
        choice = widgets.get("choice")
        index = next((i for i, o in enumerate(options) if type(o) is type(choice) and o == choice), -1)
        return {"index": index, **{f"option{i}": value for i, value in enumerate(options, 1)}}

    def run(self, choice, index=0, **options):
        if isinstance(index, bool) or not isinstance(index, int):
            raise ValueError(f"Custom Combo: 'index' must be an integer, got {index!r}")
        return choice, index
