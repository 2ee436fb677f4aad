"""Every validation error the engine reports, each naming node, class, input and values."""

import pytest

from nodeflow import WorkflowError, parse, validate


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
    assert body["error"]["type"] == "prompt_outputs_failed_validation"
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


def test_malformed_node_is_reported_with_others(registry):
    report = check(registry, {**GOOD, "7": "not a node", "8": {"class_type": 5, "inputs": {}}})
    ids = {e.node_id for e in report.errors if e.type == "invalid_prompt"}
    assert ids == {"7", "8"}
    assert report.outputs == ["3"]  # unrelated to the valid output


def test_long_chain_validates_without_recursion_limit(registry):
    n = 3000
    prompt = {"0": {"class_type": "Const", "inputs": {"value": 1}}}
    for i in range(1, n):
        prompt[str(i)] = {"class_type": "Add", "inputs": {"a": [str(i - 1), 0], "b": 1}}
    prompt["out"] = {"class_type": "Collect", "inputs": {"value": [str(n - 1), 0]}}
    assert check(registry, prompt).complete
