"""Every validation error the engine reports, each naming node, class, input and values."""

import copy
import time

import pytest
from toy_nodes import ALL

from nodeflow import Combo, Executor, Int, Node, Output, Registry, WorkflowError, parse, validate
from nodeflow.graph import load_json


def check(registry, prompt):
    return validate(parse(prompt), registry)


def only(report, type_):
    found = [e for e in report.errors if e.type == type_]
    assert found, f"no {type_} in {[str(e) for e in report.errors]}"
    return found


GOOD = {
    "1": {"class_type": "Const", "inputs": {"value": 3}},
    "2": {"class_type": "Scale", "inputs": {"x": ["1", 0], "factor": 2.0, "mode": "round"}},
    "3": {"class_type": "Collect", "inputs": {"value": ["2", 0]}},
}


def test_valid_workflow_has_no_errors(registry):
    report = check(registry, GOOD)
    assert report.complete and report.outputs == ["3"]


def test_wrapped_prompt_and_metadata_are_accepted(registry):
    report = check(registry, {"prompt": GOOD})
    assert report.complete
    report = check(registry, {**GOOD, "_meta": {"note": "x"}})
    assert report.complete


def test_unknown_class_suggests_closest_names(registry):
    report = check(registry, {**GOOD, "1": {"class_type": "Cnst", "inputs": {"value": 3}}})
    (err,) = only(report, "invalid_prompt")
    assert err.node_id == "1" and "Cnst" in str(err) and "Const" in err.details
    assert not report.ok  # the only output depends on it


def test_alias_resolves(registry):
    report = check(registry, {**GOOD, "3": {"class_type": "ShowValue", "inputs": {"value": ["2", 0]}}})
    assert report.complete


def test_missing_required_input(registry):
    report = check(registry, {**GOOD, "2": {"class_type": "Scale", "inputs": {"x": ["1", 0], "mode": "round"}}})
    (err,) = only(report, "required_input_missing")
    assert (err.node_id, err.class_type, err.input_name) == ("2", "Scale", "factor")
    assert "FLOAT" in err.expected


def test_link_to_missing_node_and_bad_index(registry):
    report = check(registry, {
        **GOOD,
        "2": {"class_type": "Scale", "inputs": {"x": ["9", 0], "factor": 1.0, "mode": "round"}},
        "4": {"class_type": "Collect", "inputs": {"value": ["1", 5]}},
    })
    errs = only(report, "invalid_link")
    by_node = {e.node_id: e for e in errs}
    assert "missing node '9'" in by_node["2"].message
    assert "index 5 out of range" in by_node["4"].message and "0..0" in by_node["4"].expected


def test_link_type_mismatch_names_both_types(registry):
    report = check(registry, {
        "1": {"class_type": "Image", "inputs": {}},
        "2": {"class_type": "Scale", "inputs": {"x": ["1", 0], "factor": 1.0, "mode": "round"}},
        "3": {"class_type": "Collect", "inputs": {"value": ["2", 0]}},
    })
    (err,) = only(report, "return_type_mismatch")
    assert err.input_name == "x" and "INT" in err.expected and "IMAGE" in err.expected


def test_widget_accepts_link_of_its_type(registry):
    report = check(registry, {
        "1": {"class_type": "Const", "inputs": {"value": 1}},
        "2": {"class_type": "Add", "inputs": {"a": ["1", 0], "b": 2}},
        "3": {"class_type": "Collect", "inputs": {"value": ["2", 0]}},
    })
    assert report.complete


@pytest.mark.parametrize("inputs, type_, name", [
    ({"value": "three"}, "invalid_input_type", "value"),
    ({"value": 2.5}, "invalid_input_type", "value"),
    ({"value": True}, "invalid_input_type", "value"),
    ({"value": 5000}, "value_bigger_than_max", "value"),
    ({"value": -5000}, "value_smaller_than_min", "value"),
])
def test_bad_int_literals(registry, inputs, type_, name):
    report = check(registry, {**GOOD, "1": {"class_type": "Const", "inputs": inputs}})
    (err,) = only(report, type_)
    assert err.input_name == name and err.received == inputs[name]


def test_float_range_and_combo_choices(registry):
    report = check(registry, {**GOOD, "2": {"class_type": "Scale",
                                            "inputs": {"x": ["1", 0], "factor": 11.0, "mode": "ceil"}}})
    assert only(report, "value_bigger_than_max")[0].input_name == "factor"
    err = only(report, "value_not_in_list")[0]
    assert err.input_name == "mode" and "'floor'" in err.expected and err.received == "ceil"


def test_socket_input_refuses_literal(registry):
    report = check(registry, {**GOOD, "2": {"class_type": "Scale", "inputs": {"x": 4, "factor": 1.0, "mode": "round"}}})
    (err,) = only(report, "invalid_input_type")
    assert err.input_name == "x" and "link" in err.expected


def test_bad_list_literal_is_an_error_but_wrapped_list_is_a_value(registry):
    report = check(registry, {**GOOD, "3": {"class_type": "Collect",
                                            "inputs": {"value": ["2", 0], "label": [1, 2, 3]}}})
    assert only(report, "bad_linked_input")[0].input_name == "label"
    graph = parse({**GOOD, "3": {"class_type": "Collect",
                                 "inputs": {"value": ["2", 0], "label": {"__value__": [1, 2]}}}})
    assert graph.nodes["3"].inputs["label"] == [1, 2]


def test_custom_validation_hook(registry):
    report = check(registry, {
        "1": {"class_type": "Checked", "inputs": {"low": 5, "high": 2}},
        "2": {"class_type": "Collect", "inputs": {"value": ["1", 0]}},
    })
    assert "low (5) must be below high (2)" in only(report, "custom_validation_failed")[0].message


def test_cycle_names_every_node_on_it(registry):
    report = check(registry, {
        "1": {"class_type": "Add", "inputs": {"a": ["3", 0], "b": 1}},
        "2": {"class_type": "Add", "inputs": {"a": ["1", 0], "b": 1}},
        "3": {"class_type": "Add", "inputs": {"a": ["2", 0], "b": 1}},
        "4": {"class_type": "Collect", "inputs": {"value": ["3", 0]}},
    })
    errs = only(report, "dependency_cycle")
    assert {e.node_id for e in errs} == {"1", "2", "3"}
    assert all(f"{n} (Add)" in errs[0].details for n in "123")
    assert not report.ok


def test_self_loop_is_a_cycle(registry):
    report = check(registry, {"1": {"class_type": "Add", "inputs": {"a": ["1", 0], "b": 1}},
                              "2": {"class_type": "Collect", "inputs": {"value": ["1", 0]}}})
    assert only(report, "dependency_cycle")[0].node_id == "1"


def test_no_output_node(registry):
    report = check(registry, {"1": {"class_type": "Const", "inputs": {"value": 1}}})
    assert only(report, "prompt_no_outputs")[0].node_id is None
    body = report.to_comfy()
    assert body["error"]["type"] == "prompt_no_outputs"


def test_all_problems_reported_at_once(registry):
    report = check(registry, {
        "1": {"class_type": "Const", "inputs": {"value": "x"}},
        "2": {"class_type": "Scale", "inputs": {"x": ["1", 0], "factor": -1.0, "mode": "nope"}},
        "3": {"class_type": "Nope", "inputs": {}},
        "4": {"class_type": "Collect", "inputs": {"value": ["2", 0]}},
    })
    assert {e.type for e in report.errors} >= {"invalid_input_type", "value_smaller_than_min",
                                                "value_not_in_list", "invalid_prompt"}


def test_partly_valid_workflow_runs_valid_outputs(registry):
    report = check(registry, {
        **GOOD,
        "5": {"class_type": "Const", "inputs": {"value": "bad"}},
        "6": {"class_type": "Collect", "inputs": {"value": ["5", 0]}},
    })
    assert report.ok and not report.complete
    assert report.outputs == ["3"] and report.failed_outputs == {"5": ["6"]}
    body = report.to_comfy()
    assert body["error"] is None
    assert body["node_errors"]["5"]["dependent_outputs"] == ["6"]
    assert body["node_errors"]["5"]["class_type"] == "Const"
    assert body["node_errors"]["5"]["errors"][0]["extra_info"]["input_name"] == "value"


def test_comfy_error_shape_when_nothing_runs(registry):
    report = check(registry, {**GOOD, "1": {"class_type": "Const", "inputs": {"value": 9999}}})
    body = report.to_comfy()
    assert body["error"]["type"] == "prompt_outputs_failed_validation" and body["error"]["details"] == ""
    err = body["node_errors"]["1"]["errors"][0]
    assert set(err) == {"type", "message", "details", "extra_info"}
    assert err["extra_info"]["received_value"] == 9999


@pytest.mark.parametrize("doc, fragment", [
    ([1, 2], "not list"),
    ("text", "not str"),
    ({}, "no nodes"),
    ({"a": 1, "b": "x"}, "no nodes found"),
    ({"nodes": [], "links": []}, "UI-format"),
])
def test_documents_that_are_not_workflows(doc, fragment):
    with pytest.raises(WorkflowError, match=fragment):
        parse(doc)


def test_malformed_node_is_reported_with_others_and_refuses_the_prompt(registry):
    report = check(registry, {**GOOD, "7": "not a node", "8": {"class_type": 5, "inputs": {}}})
    ids = {e.node_id for e in report.errors if e.type == "invalid_prompt"}
    assert ids == {"7", "8"}
    # As ComfyUI: a node without a class_type stops the whole prompt, valid outputs too.
    assert report.outputs == [] and not report.ok
    assert report.to_comfy() == {"error": {
        "type": "invalid_prompt", "message": "Cannot execute because a node is missing the class_type property.",
        "details": "Node ID '#7'", "extra_info": {}}, "node_errors": {}}


def test_a_node_without_class_type_refuses_the_prompt_as_comfyui(registry):
    # What the editor sends for a node type the server does not know: no class_type at all.
    report = check(registry, {**GOOD, "8": {"inputs": {"x": ["1", 0]}, "_meta": {"title": "Mystery"}}})
    assert not report.ok
    assert report.to_comfy()["error"]["message"] == "Cannot execute because a node is missing the class_type property."
    assert report.to_comfy()["error"]["details"] == "Node ID '#8'"
    assert parse({"8": {"inputs": {}}}).parse_errors[0].prompt_error  # a lone such node is a prompt too


def test_an_unknown_node_type_refuses_the_prompt_as_comfyui(registry):
    report = check(registry, {**GOOD, "8": {"class_type": "Colect", "inputs": {}}})
    assert not report.ok and report.outputs == []
    assert report.to_comfy() == {"error": {
        "type": "invalid_prompt", "message": "Cannot execute because node Colect does not exist.",
        "details": "Node ID '#8'", "extra_info": {}}, "node_errors": {}}
    (err,) = report.errors
    assert "did you mean 'Collect'" in str(err)  # the CLI still says more


def test_long_chain_validates_without_recursion_limit(registry):
    n = 3000
    prompt = {"0": {"class_type": "Const", "inputs": {"value": 1}}}
    for i in range(1, n):
        prompt[str(i)] = {"class_type": "Add", "inputs": {"a": [str(i - 1), 0], "b": 1}}
    prompt["out"] = {"class_type": "Collect", "inputs": {"value": [str(n - 1), 0]}}
    assert check(registry, prompt).complete


# -- hooks and choices that fail, linked inputs of validate_inputs ---------------------------------


class RaisingHook(Node):
    inputs = {"a": Int(default=0)}
    outputs = [Output("INT")]

    @classmethod
    def validate_inputs(cls, a):
        raise ValueError(f"cannot judge {a}")

    def run(self, a):
        return (a,)


class LooseHook(Node):
    """validate_inputs taking **kwargs, answering in ComfyUI's style (True or a message)."""
    inputs = {"a": Int(default=0), "b": Int(default=0)}
    outputs = [Output("INT")]
    SEEN = []

    @classmethod
    def validate_inputs(cls, **given):
        cls.SEEN.append(given)
        return True if given.get("a", 0) >= 0 else "a must not be negative"

    def run(self, a, b):
        return (a + b,)


def _denied():
    raise PermissionError("models folder is not readable")


class BrokenChoices(Node):
    inputs = {"name": Combo(choices=_denied)}
    outputs = [Output("STRING")]

    def run(self, name):
        return (name,)


def hook_registry():
    return Registry([*ALL, RaisingHook, LooseHook, BrokenChoices])


def test_validate_inputs_gets_literals_only_and_is_skipped_when_one_it_needs_is_linked(registry):
    wf = {"1": {"class_type": "Const", "inputs": {"value": 7}},
          "2": {"class_type": "Checked", "inputs": {"low": ["1", 0], "high": 2}},
          "3": {"class_type": "Collect", "inputs": {"value": ["2", 0]}}}
    report = check(registry, wf)
    assert report.complete, report.summary()  # low is known only at run time: checked then
    wf["2"]["inputs"]["low"] = 5
    assert "low (5) must be below high (2)" in only(check(registry, wf), "custom_validation_failed")[0].message


def test_validate_inputs_with_kwargs_gets_every_literal_and_may_answer_like_comfyui():
    LooseHook.SEEN.clear()
    wf = {"1": {"class_type": "Const", "inputs": {"value": 7}},
          "2": {"class_type": "LooseHook", "inputs": {"a": 1, "b": ["1", 0]}},
          "3": {"class_type": "Collect", "inputs": {"value": ["2", 0]}}}
    assert check(hook_registry(), wf).complete
    assert LooseHook.SEEN == [{"a": 1}]
    wf["2"]["inputs"]["a"] = -1
    (err,) = only(check(hook_registry(), wf), "custom_validation_failed")
    assert err.message == "a must not be negative" and err.node_id == "2"


def test_a_failing_validate_inputs_is_a_node_error():
    wf = {"1": {"class_type": "RaisingHook", "inputs": {"a": 4}},
          "2": {"class_type": "Collect", "inputs": {"value": ["1", 0]}}}
    report = check(hook_registry(), wf)
    (err,) = only(report, "exception_during_validation")
    assert err.node_id == "1" and err.class_type == "RaisingHook"
    assert "validate_inputs failed: ValueError: cannot judge 4" in str(err)
    assert not report.ok


def test_a_failing_choices_function_is_an_error_on_its_input():
    wf = {"1": {"class_type": "BrokenChoices", "inputs": {"name": "x.safetensors"}},
          "2": {"class_type": "Collect", "inputs": {"value": ["1", 0]}},
          "3": {"class_type": "Const", "inputs": {"value": 1}},
          "4": {"class_type": "Collect", "inputs": {"value": ["3", 0]}}}
    report = check(hook_registry(), wf)
    (err,) = only(report, "exception_during_validation")
    assert (err.node_id, err.input_name) == ("1", "name")
    assert "PermissionError: models folder is not readable" in str(err)
    assert report.outputs == ["4"]
    # The schema still lists, with no choices, instead of failing every /object_info.
    assert hook_registry().object_info("BrokenChoices")["BrokenChoices"]["input"]["required"]["name"][0] == []


# -- cycles and many bad nodes, at scale ----------------------------------------------------------


def test_a_long_cycle_is_reported_once_briefly_and_from_its_smallest_id(registry):
    n = 3000
    prompt = {str(i): {"class_type": "Add", "inputs": {"a": [str((i - 1) % n), 0], "b": 1}} for i in range(n)}
    prompt["out"] = {"class_type": "Collect", "inputs": {"value": ["5", 0]}}
    t0 = time.perf_counter()
    report = check(registry, prompt)
    elapsed = time.perf_counter() - t0
    errs = only(report, "dependency_cycle")
    assert len(errs) == n and errs[0].node_id == "0"
    assert errs[0].details.startswith("cycle: 0 (Add) -> 1 (Add) -> 2 (Add)")
    assert "… 2,980 more …" in errs[0].details and errs[0].details.endswith("-> 0 (Add) (3,000 nodes)")
    assert errs[1].details == "on the cycle reported for node 0"
    assert sum(len(str(e)) for e in report.errors) < 300_000
    assert report.failed_outputs["0"] == ["out"] and not report.ok
    # About 0.05 s; quadratic work took 7.5 s. The bound leaves room for a busy machine.
    assert elapsed < 2.5, f"validating a {n}-node cycle took {elapsed:.2f} s"


def test_cycle_path_does_not_depend_on_the_order_of_the_file(registry):
    nodes = {"7": ["3", 0], "3": ["12", 0], "12": ["7", 0]}
    forward = {k: {"class_type": "Add", "inputs": {"a": v, "b": 1}} for k, v in nodes.items()}
    backward = dict(reversed(list(forward.items())))
    texts = [only(check(registry, {**wf, "o": {"class_type": "Collect", "inputs": {"value": ["3", 0]}}}),
                  "dependency_cycle")[0].details for wf in (forward, backward)]
    assert texts[0] == texts[1] == "cycle: 3 (Add) -> 7 (Add) -> 12 (Add) -> 3 (Add)"  # as data flows


def test_many_bad_nodes_validate_in_linear_time(registry):
    n = 6000
    prompt = {"0": {"class_type": "Const", "inputs": {"value": 1}}}
    for i in range(1, n):
        prompt[str(i)] = {"class_type": "Add", "inputs": {"a": [str(i - 1), 0], "b": "bad"}}
    prompt["out"] = {"class_type": "Collect", "inputs": {"value": [str(n - 1), 0]}}
    t0 = time.perf_counter()
    report = check(registry, prompt)
    elapsed = time.perf_counter() - t0
    assert len(report.errors) == n - 1 and report.failed_outputs["1"] == ["out"]
    # About 0.1 s; one walk per bad node took 18.6 s. The bound leaves room for a busy machine.
    assert elapsed < 2.5, f"validating {n} bad nodes took {elapsed:.2f} s"


# -- messages -------------------------------------------------------------------------------------


def test_link_to_a_malformed_node_is_not_called_missing(registry):
    report = check(registry, {**GOOD, "1": {"class_type": "Const", "inputs": [3]}})
    assert [(e.node_id, e.type) for e in report.errors] == [("1", "invalid_prompt")]
    assert report.failed_outputs == {"1": ["3"]} and not report.ok


@pytest.mark.parametrize("node, text", [
    ({"class_type": 5, "inputs": {}}, "'class_type' must be a string — expected a node type name such as "
                                      '"SaveImage", got 5'),
    ({"class_type": "Const", "inputs": [3]}, "node 1 (Const): 'inputs' must be an object — expected an object of "
                                             'inputs, {"name": value or link}, got [3]'),
])
def test_malformed_node_messages_say_what_is_wrong(registry, node, text):
    report = check(registry, {**GOOD, "1": node})
    assert text in str(report.errors[0])


def test_null_literal_says_got_null_and_articles_fit(registry):
    report = check(registry, {**GOOD, "1": {"class_type": "Const", "inputs": {"value": None}}})
    assert str(only(report, "invalid_input_type")[0]).endswith("got null")
    assert only(report, "invalid_input_type")[0].to_comfy()["extra_info"]["received_value"] is None
    report = check(registry, {"1": {"class_type": "Scale", "inputs": {"x": "pixels", "factor": 1.0, "mode": "round"}},
                              "2": {"class_type": "Collect", "inputs": {"value": ["1", 0]}}})
    assert "Input takes an INT link, not a literal" in str(report.errors[0])
    report = check(registry, {"1": {"class_type": "Scale", "inputs": {"factor": 1.0, "mode": "round"}},
                              "2": {"class_type": "Collect", "inputs": {}}})
    assert {e.expected for e in report.errors} == {"an INT link", "a * link"}


@pytest.mark.parametrize("text, fragment", [
    pytest.param("[" * 100_000, "nested too deeply", id="deep"),
    pytest.param('{"1": {"class_type": "Const", "inputs": {"value": ' + "7" * 5000 + "}}}",
                 "integer string conversion", id="long-int"),
    pytest.param("{oops", "not valid JSON", id="syntax"),
])
def test_unreadable_json_is_a_workflow_error(text, fragment):
    with pytest.raises(WorkflowError, match=fragment):
        load_json(text)


def test_odd_node_ids_sort_without_converting(registry):
    long_id = "9" * 5000
    report = check(registry, {"²": {"class_type": "Const", "inputs": {"value": "x"}},
                              long_id: {"class_type": "Collect", "inputs": {"value": ["²", 0]}},
                              "007": {"class_type": "Collect", "inputs": {"value": ["8", 0]}}})
    assert [e.node_id for e in report.errors] == ["²", "007"] and set(report.failed_outputs) == {"²", "007"}


def test_no_input_makes_validation_crash(registry):
    """Every kind of junk in every place of a workflow is reported, never raised."""
    base = {
        "1": {"class_type": "Const", "inputs": {"value": 3}},
        "2": {"class_type": "Checked", "inputs": {"low": ["1", 0], "high": 9}},
        "3": {"class_type": "Scale", "inputs": {"x": ["2", 0], "factor": 2.0, "mode": "round"},
              "_meta": {"title": "t"}},
        "4": {"class_type": "Collect", "inputs": {"value": ["3", 0], "label": "x"}},
    }
    junk = [5, 1.5, "x", None, True, [], {}, [1], ["1", 0], ["9", 0], ["2", 5], [2, 0], ["4", 0], ["3", 0],
            {"__value__": [1]}, {"a": 1}, float("nan"), [True, 0], "7" * 50]
    places = [(k,) for k in base] + [(k, f) for k in base for f in base[k]] + \
             [(k, "inputs", i) for k in base for i in base[k]["inputs"]]
    executor = Executor(registry)
    for place in places:
        for value in junk:
            prompt = copy.deepcopy(base)
            target = prompt
            for key in place[:-1]:
                target = target[key]
            target[place[-1]] = copy.deepcopy(value)
            try:
                graph = parse(prompt)
            except WorkflowError:
                continue
            report = validate(graph, registry)
            report.summary(), report.to_comfy(graph), report.dag
            if report.ok:
                result = executor.execute(graph, report)
                assert result.status in ("success", "error"), (place, value)
