"""Execution: ordering, pruning, caching across runs, events, interruption, failures."""

import threading

import pytest
from toy_nodes import FileStamp, Slow, make_registry

import nodeflow
from nodeflow import Executor, OutputCache, ValidationFailed, Workflow


def diamond(value=3, factor=2.0):
    return {
        "1": {"class_type": "Const", "inputs": {"value": value}},
        "2": {"class_type": "Add", "inputs": {"a": ["1", 0], "b": 10}},
        "3": {"class_type": "Add", "inputs": {"a": ["1", 0], "b": 20}},
        "4": {"class_type": "Add", "inputs": {"a": ["2", 0], "b": ["3", 0]}},
        "5": {"class_type": "Scale", "inputs": {"x": ["4", 0], "factor": factor, "mode": "round"}},
        "6": {"class_type": "Collect", "inputs": {"value": ["5", 0]}},
        # Not needed by any output: must never run.
        "7": {"class_type": "Pair", "inputs": {"value": 1}},
    }


class Recorder:
    def __init__(self):
        self.events = []

    def __call__(self, event, data):
        self.events.append((event, data))

    def names(self):
        return [e for e, _ in self.events]

    def nodes(self, event):
        return [d["node"] for e, d in self.events if e == event]


def test_runs_in_topological_order_and_prunes_unneeded(executor, runs):
    rec = Recorder()
    result = executor.run(diamond(), observer=rec)
    assert result.ok
    order = rec.nodes("executing")
    assert set(order) == {"1", "2", "3", "4", "5", "6"}
    assert order.index("1") < order.index("2") < order.index("4") < order.index("5") < order.index("6")
    assert order.index("3") < order.index("4")
    assert runs["Pair"] == 0
    assert result.output("5") == (3 + 10 + 3 + 20) * 2.0
    assert result.ui["6"] == {"value": [72.0], "node": ["6"]}


def test_identical_rerun_executes_nothing(executor, runs):
    first = executor.run(diamond())
    total = sum(runs.values())
    rec = Recorder()
    second = executor.run(diamond(), observer=rec)
    assert sum(runs.values()) == total
    assert second.executed == [] and set(second.cached) == {"6"}
    assert rec.nodes("executing") == []
    # A cached output node replays its result.
    assert second.ui == first.ui
    assert rec.nodes("executed") == ["6"]


def test_changed_literal_reruns_only_descendants(executor, runs):
    executor.run(diamond())
    runs.clear()
    result = executor.run(diamond(factor=3.0))
    assert result.executed == ["5", "6"]
    assert runs == {"Scale": 1, "Collect": 1}
    runs.clear()
    result = executor.run(diamond(value=4, factor=3.0))
    assert set(result.executed) == {"1", "2", "3", "4", "5", "6"}


def test_cache_keys_ignore_node_ids(executor, runs):
    executor.run(diamond())
    renamed = {f"n{k}": {**v, "inputs": {ik: ([f"n{iv[0]}", iv[1]] if isinstance(iv, list) else iv)
                                         for ik, iv in v["inputs"].items()}}
               for k, v in diamond().items()}
    runs.clear()
    result = executor.run(renamed)
    # Only Collect runs again: it asks for its UNIQUE_ID, so its id is part of its key.
    assert result.executed == ["n6"] and runs == {"Collect": 1}
    assert result.ui["n6"]["node"] == ["n6"]


def test_fingerprint_change_reruns_node(executor, runs):
    wf = {"1": {"class_type": "FileStamp", "inputs": {"name": "a"}},
          "2": {"class_type": "Collect", "inputs": {"value": ["1", 0]}}}
    FileStamp.STAMPS.clear()
    executor.run(wf)
    executor.run(wf)
    assert runs["FileStamp"] == 1
    FileStamp.STAMPS["a"] = 7  # the "file" changed on disk
    result = executor.run(wf)
    assert runs["FileStamp"] == 2 and result.ui["2"]["value"] == ["a@7"]


def test_lru_bound_and_clear(registry, runs):
    executor = Executor(registry, OutputCache(max_entries=3))
    executor.run(diamond())
    assert len(executor.cache) == 3
    executor.cache.clear()
    runs.clear()
    executor.run(diamond())
    assert runs["Const"] == 1


def test_event_sequence(executor):
    rec = Recorder()
    executor.run(diamond(), observer=rec, prompt_id="p1")
    names = rec.names()
    assert names[0] == "execution_start" and names[1] == "execution_cached"
    assert names[-1] == "execution_success"
    assert all(d["prompt_id"] == "p1" for _, d in rec.events)


def test_progress_events_from_long_node(executor):
    rec = Recorder()
    wf = {"1": {"class_type": "Const", "inputs": {"value": 1}},
          "2": {"class_type": "Slow", "inputs": {"x": ["1", 0], "steps": 4}},
          "3": {"class_type": "Collect", "inputs": {"value": ["2", 0]}}}
    executor.run(wf, observer=rec)
    progress = [(d["value"], d["max"], d["node"]) for e, d in rec.events if e == "progress"]
    assert progress == [(1, 4, "2"), (2, 4, "2"), (3, 4, "2"), (4, 4, "2")]


def test_failing_node_gives_structured_error_and_consistent_cache(executor, runs):
    wf = {"1": {"class_type": "Const", "inputs": {"value": 5}},
          "2": {"class_type": "Fail", "inputs": {"x": ["1", 0]}},
          "3": {"class_type": "Collect", "inputs": {"value": ["2", 0]}}}
    rec = Recorder()
    result = executor.run(wf, observer=rec)
    assert result.status == "error"
    err = result.error
    assert err["node_id"] == "2" and err["node_type"] == "Fail"
    assert err["exception_message"] == "boom at 5" and err["exception_type"].endswith("RuntimeError")
    assert any("boom at 5" in line for line in err["traceback"])
    assert err["executed"] == ["1"]
    assert rec.names()[-1] == "execution_error"
    # The successful node stays cached; the failed one is retried next time.
    again = executor.run(wf)
    assert again.status == "error" and again.executed == [] and runs["Const"] == 1 and runs["Fail"] == 2


def test_interrupt_inside_long_node(executor, runs):
    wf = {"1": {"class_type": "Const", "inputs": {"value": 1}},
          "2": {"class_type": "Slow", "inputs": {"x": ["1", 0], "steps": 50}},
          "3": {"class_type": "Collect", "inputs": {"value": ["2", 0]}}}
    Slow.GATE = threading.Event()
    box = {}
    worker = threading.Thread(target=lambda: box.setdefault("r", executor.run(wf, prompt_id="p")))
    worker.start()
    assert Slow.STARTED.wait(5)
    assert executor.interrupt("someone-else") is False
    assert executor.interrupt("p") is True
    Slow.GATE.set()
    worker.join(5)
    result = box["r"]
    assert result.status == "interrupted"
    assert result.messages[-1][0] == "execution_interrupted"
    assert result.messages[-1][1]["node_id"] == "2"
    # Nothing half-done was cached: the interrupted node runs again, its input does not.
    Slow.GATE = None
    runs.clear()
    result = executor.run(wf)
    assert result.ok and runs == {"Slow": 1, "Collect": 1}


def test_invalid_workflow_raises_with_report(executor):
    with pytest.raises(ValidationFailed) as info:
        executor.run({"1": {"class_type": "Const", "inputs": {"value": 1}}})
    assert info.value.report.errors[0].type == "prompt_no_outputs"


def test_only_valid_outputs_run(executor, runs):
    wf = {**diamond(), "8": {"class_type": "Const", "inputs": {"value": "bad"}},
          "9": {"class_type": "Collect", "inputs": {"value": ["8", 0]}}}
    result = executor.run(wf)
    assert result.ok and set(result.ui) == {"6"}


def test_hidden_inputs_receive_prompt_and_id(registry):
    wf = Workflow(registry)
    c = wf.add("Const", value=2)
    out = wf.add("Collect", value=c["value"], node_id="out")
    result = nodeflow.run(wf, registry=registry)
    assert result.ui["out"]["node"] == ["out"] and out.id == "out"


def test_workflow_builder_round_trip(registry):
    wf = Workflow(registry)
    a = wf.add("Const", value=2)
    b = wf.add("Add", a=a[0], b=5)
    wf.add("Collect", value=b["sum"], label="x")
    api = wf.to_api()
    assert api["2"] == {"class_type": "Add", "inputs": {"a": ["1", 0], "b": 5}}
    assert nodeflow.run(api, registry=registry).output("2") == 7
    with pytest.raises(KeyError, match="no output named"):
        b["nope"]


# -- partly valid workflows, outputs of cached nodes, shared executors ----------------------------


def with_cycle():
    """A valid output (3) beside an invalid part that holds a cycle (4 <-> 5, feeding 6)."""
    return {
        "1": {"class_type": "Const", "inputs": {"value": 3}},
        "2": {"class_type": "Add", "inputs": {"a": ["1", 0], "b": 4}},
        "3": {"class_type": "Collect", "inputs": {"value": ["2", 0]}},
        "4": {"class_type": "Add", "inputs": {"a": ["5", 0], "b": ["1", 0]}},
        "5": {"class_type": "Add", "inputs": {"a": ["4", 0], "b": 1}},
        "6": {"class_type": "Collect", "inputs": {"value": ["5", 0]}},
    }


def test_cycle_in_the_invalid_part_does_not_stop_the_valid_outputs(executor, runs, registry):
    graph, report = executor.prepare(with_cycle())
    assert report.outputs == ["3"] and {e.node_id for e in report.errors} == {"4", "5"}
    result = executor.execute(graph, report)
    assert result.ok and set(result.ui) == {"3"} and result.ui["3"]["value"] == [7]
    assert runs["Add"] == 1  # only node 2
    assert nodeflow.run(with_cycle(), registry=registry).ui["3"]["value"] == [7]


def test_output_of_a_node_served_from_the_cache(executor):
    first = executor.run(diamond())
    assert first.output("4") == 36
    again = executor.run(diamond())
    assert again.executed == [] and "4" not in again.values  # only the cached output was needed
    assert again.output("4") == 36 and again.output(5) == 72.0 and again.output("1") == 3
    with pytest.raises(KeyError, match=r"node 7 \(Pair\) has no outputs: it did not run"):
        again.output("7")
    with pytest.raises(KeyError, match="node 99 is not in this workflow"):
        again.output("99")
    with pytest.raises(IndexError, match="node 4 has 1 output"):
        again.output("4", 3)


def test_output_of_a_node_that_is_cached_from_another_workflow(executor):
    executor.run({"1": {"class_type": "Pair", "inputs": {"value": 1}},
                  "2": {"class_type": "Collect", "inputs": {"value": ["1", 1]}}})
    result = executor.run(diamond())
    assert result.output("7", 1) == "1"  # node 7 was not needed, but the same Pair ran before


def test_unique_id_is_part_of_the_key_of_nodes_that_ask_for_it(executor, runs):
    def collect(node_id):
        return {"1": {"class_type": "Const", "inputs": {"value": 3}},
                node_id: {"class_type": "Collect", "inputs": {"value": ["1", 0]}}}

    assert executor.run(collect("a")).ui["a"]["node"] == ["a"]
    second = executor.run(collect("b"))
    assert second.executed == ["b"] and second.ui["b"]["node"] == ["b"]  # not a's replayed output
    assert runs == {"Const": 1, "Collect": 2}
    assert executor.run(collect("a")).executed == []


def test_run_shares_one_executor_per_registry(registry, runs):
    runs.clear()
    first = nodeflow.run(diamond(), registry=registry)
    assert first.ok and runs["Const"] == 1
    second = nodeflow.run(diamond(), registry=registry)
    assert second.executed == [] and runs["Const"] == 1
    assert nodeflow.shared_executor(registry) is nodeflow.shared_executor(registry)
    other = make_registry()
    assert nodeflow.shared_executor(other) is not nodeflow.shared_executor(registry)
    assert nodeflow.run(diamond(), registry=other).executed != []


def test_default_cache_keeps_a_rerun_of_thousands_of_nodes(registry, runs):
    wf = {"src": {"class_type": "Const", "inputs": {"value": 1}}}
    for i in range(3000):
        wf[str(i)] = {"class_type": "Collect", "inputs": {"value": ["src", 0], "label": f"sink {i}"}}
    executor = Executor(registry)
    assert len(executor.run(wf).executed) == 3001
    assert executor.run(wf).executed == []


# -- hooks and the run context ----------------------------------------------------------------------


def test_hooks_see_each_node_with_its_inputs_and_can_fail_it():
    seen = []

    def before(node_id, cls, inputs):
        seen.append(("before", node_id, cls.type_name, dict(inputs)))
        if cls.type_name == "Scale" and inputs["x"] > 100:
            raise ValueError(f"node {node_id}: x is {inputs['x']}, over 100")

    def after(node_id, cls, values, ui):
        seen.append(("after", node_id, values, ui))

    failed = []
    executor = Executor(make_registry(), before_node=before, after_node=after,
                        on_node_error=lambda n, cls, inputs, exc: failed.append((n, type(exc).__name__)))
    result = executor.run(diamond(3))
    assert result.ok
    assert [s[1] for s in seen if s[0] == "before"] == result.executed
    assert ("before", "2", "Add", {"a": 3, "b": 10}) in seen
    assert ("after", "4", (36,), None) in seen
    assert ("after", "6", (), {"value": [72.0], "node": ["6"]}) in seen
    # A hook that raises fails the node like the node itself would, before it runs.
    result = executor.run(diamond(50))
    assert result.status == "error" and result.error["node_id"] == "5"
    assert result.error["exception_message"] == "node 5: x is 130, over 100"
    assert result.error["current_inputs"] == {"x": [130], "factor": [2.0], "mode": ["round"]}
    assert failed == [("5", "ValueError")] and "6" not in result.executed


def test_failing_node_reports_its_inputs_in_comfyui_shape():
    result = Executor(make_registry()).run({
        "1": {"class_type": "Const", "inputs": {"value": 4}},
        "2": {"class_type": "Fail", "inputs": {"x": ["1", 0]}},
        "3": {"class_type": "Collect", "inputs": {"value": ["2", 0]}}})
    assert result.status == "error"
    assert result.error["current_inputs"] == {"x": [4]}
    assert result.error["current_outputs"] == ["1"] and result.error["executed"] == ["1"]


def test_a_run_sees_its_executors_context_and_nothing_else(tmp_path):
    from nodeflow import context
    from nodeflow.folders import Folders
    from nodeflow.node import Node
    from nodeflow.registry import Registry
    from nodeflow.spec import Output, Socket

    class Where(Node):
        inputs = {"x": Socket("INT")}
        outputs = [Output("STRING")]

        def run(self, x):
            from nodeflow.folders import folders

            return (f"{context.current().name} {folders().base.name} {self.context.folders.base.name}",)

    registry = Registry([*make_registry().classes(), Where])
    mine = context.RunContext(Folders.from_base(tmp_path / "mine"), name="mine")
    wf = {"1": {"class_type": "Const", "inputs": {"value": 1}},
          "2": {"class_type": "Where", "inputs": {"x": ["1", 0]}},
          "3": {"class_type": "Collect", "inputs": {"value": ["2", 0]}}}
    assert Executor(registry, context=mine).run(wf).output("2") == "mine mine mine"
    assert context.current() is context.default()
    # Without a context of its own, an executor runs in its caller's.
    with context.activate(mine):
        assert Executor(registry, OutputCache()).run(wf).output("2") == "mine mine mine"
    assert nodeflow.shared_executor(registry) is context.default().executor(registry)
    assert mine.executor(registry) is not context.default().executor(registry)
