"""List execution (ComfyUI's OUTPUT_IS_LIST / INPUT_IS_LIST) and lazy inputs (``lazy`` +
``check_lazy_status``), on small nodes that record their calls. Expected values are written
out by hand from ComfyUI's documented rules: one call per element, a shorter list repeats its
last element, list outputs are concatenated, a lazy input's upstream runs only when asked."""

from collections import Counter

import pytest

from nodeflow import Bool, Executor, Int, Node, Output, Registry, Result, Socket, String
from nodeflow.listexec import OutputList

CALLS: Counter = Counter()
MISSING = object()


class Numbers(Node):
    """Outputs the integers start, start+1, ... (count of them) as a list, and their count."""
    inputs = {"start": Int(default=0), "count": Int(default=3, min=0, max=100)}
    outputs = [Output("INT", "numbers", is_list=True), Output("INT", "count")]

    def run(self, start, count):
        CALLS["Numbers"] += 1
        return list(range(start, start + count)), count


class Add(Node):
    inputs = {"a": Int(default=0), "b": Int(default=0)}
    outputs = [Output("INT", "sum")]

    def run(self, a, b):
        CALLS["Add"] += 1
        return (a + b,)


class Fail(Node):
    inputs = {"a": Int(default=0)}
    outputs = [Output("INT")]

    def run(self, a):
        if a == 11:
            raise ValueError("eleven is not allowed")
        return (a,)


class Sum(Node):
    """Takes whole lists: the sum of its numbers, once."""
    inputs = {"values": Socket("INT"), "offset": Int(default=0)}
    outputs = [Output("INT", "total")]
    input_is_list = True

    def run(self, values, offset):
        CALLS["Sum"] += 1
        CALLS["Sum.offset_is_list"] += isinstance(offset, list)
        return (sum(values) + sum(offset),)


class Show(Node):
    inputs = {"value": Socket("*")}
    outputs = []
    output_node = True

    def run(self, value):
        CALLS["Show"] += 1
        return Result(ui={"text": [str(value)]})


class Text(Node):
    inputs = {"text": String(default="")}
    outputs = [Output("STRING")]

    def run(self, text):
        CALLS["Text:" + text] += 1
        return (text,)


class Switch(Node):
    """ComfyUI's switch protocol: asks for the chosen input only when it is not evaluated yet."""
    inputs = {"switch": Bool(default=False)}
    optional = {"on_false": Socket("*", lazy=True), "on_true": Socket("*", lazy=True)}
    outputs = [Output("*", "output")]

    def check_lazy_status(self, switch, on_false=MISSING, on_true=MISSING):
        CALLS["Switch.check"] += 1
        if switch and on_true is None:
            return ["on_true"]
        if not switch and on_false is None:
            return ["on_false"]
        return []

    def run(self, switch, on_false=MISSING, on_true=MISSING):
        CALLS["Switch"] += 1
        chosen = on_true if switch else on_false
        return (None if chosen is MISSING else chosen,)


class AskStranger(Node):
    """Asks for an input it does not have connected."""
    inputs = {"x": Int(default=0)}
    optional = {"maybe": Socket("*", lazy=True)}
    outputs = [Output("INT")]

    def check_lazy_status(self, x, maybe=None):
        return ["maybe"]

    def run(self, x, maybe=None):
        return (x,)


@pytest.fixture
def executor():
    CALLS.clear()
    return Executor(Registry([Numbers, Add, Fail, Sum, Show, Text, Switch, AskStranger]))


def shown(result, node="9"):
    return result.ui[node]["text"]


# -- lists -------------------------------------------------------------------------------------


def test_a_node_fed_a_list_runs_once_per_element_and_its_outputs_are_collected(executor):
    wf = {"1": {"class_type": "Numbers", "inputs": {"start": 10, "count": 3}},
          "2": {"class_type": "Add", "inputs": {"a": ["1", 0], "b": 100}},
          "9": {"class_type": "Show", "inputs": {"value": ["2", 0]}}}
    result = executor.run(wf)
    assert result.ok
    assert CALLS["Numbers"] == 1 and CALLS["Add"] == 3 and CALLS["Show"] == 3
    assert result.output("1", 0) == [10, 11, 12] and result.output("1", 1) == 3
    assert result.output("2") == [110, 111, 112] and type(result.output("2")) is OutputList
    # One executed event for the node; its UI lists what each call showed, in order.
    assert shown(result) == ["110", "111", "112"]


def test_a_shorter_list_repeats_its_last_element(executor):
    wf = {"1": {"class_type": "Numbers", "inputs": {"start": 0, "count": 4}},
          "2": {"class_type": "Numbers", "inputs": {"start": 100, "count": 2}},
          "3": {"class_type": "Add", "inputs": {"a": ["1", 0], "b": ["2", 0]}},
          "9": {"class_type": "Show", "inputs": {"value": ["3", 0]}}}
    result = executor.run(wf)
    # a = 0 1 2 3, b = 100 101 101 101
    assert result.output("3") == [100, 102, 103, 104]


def test_a_node_that_takes_whole_lists_runs_once(executor):
    wf = {"1": {"class_type": "Numbers", "inputs": {"start": 1, "count": 4}},
          "2": {"class_type": "Sum", "inputs": {"values": ["1", 0], "offset": 5}},
          "9": {"class_type": "Show", "inputs": {"value": ["2", 0]}}}
    result = executor.run(wf)
    assert CALLS["Sum"] == 1 and CALLS["Sum.offset_is_list"] == 1
    assert result.output("2") == 1 + 2 + 3 + 4 + 5  # a plain value: it ran once
    assert shown(result) == ["15"]


def test_a_list_of_one_element_and_a_plain_value_give_the_same_single_run(executor):
    wf = {"1": {"class_type": "Numbers", "inputs": {"start": 7, "count": 1}},
          "2": {"class_type": "Add", "inputs": {"a": ["1", 0], "b": 1}},
          "9": {"class_type": "Show", "inputs": {"value": ["2", 0]}}}
    result = executor.run(wf)
    assert CALLS["Add"] == 1 and result.output("2") == 8


def test_an_empty_list_makes_no_call_downstream(executor):
    wf = {"1": {"class_type": "Numbers", "inputs": {"start": 0, "count": 0}},
          "2": {"class_type": "Add", "inputs": {"a": ["1", 0], "b": 1}},
          "9": {"class_type": "Show", "inputs": {"value": ["2", 0]}}}
    result = executor.run(wf)
    assert result.ok and CALLS["Add"] == 0 and CALLS["Show"] == 0
    assert result.output("2") == [] and "9" not in result.ui


def test_lists_are_cached_and_a_changed_source_reruns_its_downstream(executor):
    wf = {"1": {"class_type": "Numbers", "inputs": {"start": 0, "count": 3}},
          "2": {"class_type": "Add", "inputs": {"a": ["1", 0], "b": 1}},
          "9": {"class_type": "Show", "inputs": {"value": ["2", 0]}}}
    executor.run(wf)
    CALLS.clear()
    again = executor.run(wf)
    assert again.executed == [] and sum(CALLS.values()) == 0
    assert shown(again) == ["1", "2", "3"]  # the cached UI replays whole
    wf["1"]["inputs"]["count"] = 2
    changed = executor.run(wf)
    assert changed.executed == ["1", "2", "9"] and changed.output("2") == [1, 2]


def test_hooks_are_called_once_per_element():
    seen = []
    executor = Executor(Registry([Numbers, Add, Show]),
                        before_node=lambda n, cls, inputs: seen.append((n, dict(inputs))),
                        after_node=lambda n, cls, values, ui: seen.append((n, values)))
    wf = {"1": {"class_type": "Numbers", "inputs": {"start": 0, "count": 2}},
          "2": {"class_type": "Add", "inputs": {"a": ["1", 0], "b": 5}},
          "9": {"class_type": "Show", "inputs": {"value": ["2", 0]}}}
    assert executor.run(wf).ok
    adds = [entry for n, entry in seen if n == "2"]
    assert adds == [{"a": 0, "b": 5}, (5,), {"a": 1, "b": 5}, (6,)]


def test_a_failing_element_reports_every_input_as_comfyui_does(executor):
    wf = {"1": {"class_type": "Numbers", "inputs": {"start": 10, "count": 3}},
          "2": {"class_type": "Fail", "inputs": {"a": ["1", 0]}},
          "9": {"class_type": "Show", "inputs": {"value": ["2", 0]}}}
    result = executor.run(wf)
    assert result.status == "error" and result.error["node_id"] == "2"
    assert result.error["exception_message"] == "eleven is not allowed"
    assert result.error["current_inputs"] == {"a": [10, 11, 12]}


def test_a_list_output_must_be_a_list():
    class Bad(Node):
        inputs = {"x": Int()}
        outputs = [Output("INT", is_list=True)]

        def run(self, x):
            return (x,)

    result = Executor(Registry([Bad, Show])).run({"1": {"class_type": "Bad", "inputs": {"x": 1}},
                                                   "9": {"class_type": "Show", "inputs": {"value": ["1", 0]}}})
    assert result.status == "error"
    assert "Bad.run must return a list for its list output 'INT', not int" in result.error["exception_message"]


# -- lazy inputs ------------------------------------------------------------------------------------


def switch_workflow(switch: bool) -> dict:
    return {"1": {"class_type": "Text", "inputs": {"text": "no"}},
            "2": {"class_type": "Text", "inputs": {"text": "yes"}},
            "3": {"class_type": "Switch", "inputs": {"switch": switch, "on_false": ["1", 0], "on_true": ["2", 0]}},
            "9": {"class_type": "Show", "inputs": {"value": ["3", 0]}}}


def test_the_branch_a_lazy_input_does_not_ask_for_never_runs(executor):
    events = []
    result = executor.run(switch_workflow(True), observer=lambda e, d: events.append((e, d.get("node"))))
    assert result.ok and shown(result) == ["yes"]
    assert CALLS["Text:yes"] == 1 and CALLS["Text:no"] == 0
    assert result.executed == ["2", "3", "9"]
    # As in ComfyUI: the switch is announced, then what it asked for, then the switch again.
    assert [n for e, n in events if e == "executing"] == ["3", "2", "3", "9"]
    assert CALLS["Switch.check"] == 2 and CALLS["Switch"] == 1


def test_flipping_the_switch_runs_only_the_other_branch(executor):
    executor.run(switch_workflow(True))
    CALLS.clear()
    result = executor.run(switch_workflow(False))
    assert shown(result) == ["no"]
    assert CALLS["Text:no"] == 1 and CALLS["Text:yes"] == 0
    assert result.executed == ["1", "3", "9"]


def test_a_lazy_input_whose_source_is_cached_is_given_at_once(executor):
    executor.run({"2": {"class_type": "Text", "inputs": {"text": "yes"}},
                  "9": {"class_type": "Show", "inputs": {"value": ["2", 0]}}})  # caches "yes"
    CALLS.clear()
    events = []
    result = executor.run(switch_workflow(True), observer=lambda e, d: events.append((e, d.get("node"))))
    assert shown(result) == ["yes"]
    assert CALLS["Switch.check"] == 1 and CALLS["Text:yes"] == 0  # no second pass: it had the value
    assert [n for e, n in events if e == "executing"] == ["3", "9"]


def test_a_lazy_input_given_as_a_literal_or_left_out_is_never_waited_for(executor):
    wf = {"3": {"class_type": "Switch", "inputs": {"switch": False, "on_true": ["2", 0]}},
          "2": {"class_type": "Text", "inputs": {"text": "yes"}},
          "9": {"class_type": "Show", "inputs": {"value": ["3", 0]}}}
    result = executor.run(wf)
    assert result.ok and shown(result) == ["None"] and CALLS["Text:yes"] == 0


def test_asking_for_an_input_that_is_not_connected_fails_the_node_by_name(executor):
    wf = {"1": {"class_type": "AskStranger", "inputs": {"x": 3}},
          "9": {"class_type": "Show", "inputs": {"value": ["1", 0]}}}
    result = executor.run(wf)
    assert result.status == "error" and result.error["node_id"] == "1"
    assert result.error["exception_message"] == ("node 1 (AskStranger) asks for its input 'maybe' "
                                                 "(check_lazy_status), but that input is not connected")


def test_the_switch_key_covers_both_branches(executor):
    """Changing the unused branch changes the switch's cache key (ComfyUI's signatures include
    every input's ancestors), so nothing stale is served; the used branch stays cached."""
    executor.run(switch_workflow(True))
    CALLS.clear()
    wf = switch_workflow(True)
    wf["1"]["inputs"]["text"] = "nope"
    result = executor.run(wf)
    assert CALLS["Text:yes"] == 0 and CALLS["Text:nope"] == 0 and CALLS["Switch"] == 1
    assert shown(result) == ["yes"]


def test_lazy_and_list_flags_in_object_info():
    reg = Registry([Numbers, Sum, Switch])
    info = reg.object_info()
    assert info["Switch"]["input"]["optional"]["on_true"] == ["*", {"lazy": True}]
    assert info["Sum"]["is_input_list"] is True and info["Switch"]["is_input_list"] is False
    assert info["Numbers"]["output_is_list"] == [True, False]
