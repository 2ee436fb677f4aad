"""The command line: good runs, and every kind of bad input gives a message, not a traceback."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from toy_nodes import make_registry

from nodeflow import cli
from nodeflow import context as run_context
from nodeflow import folders as folders_mod

GOOD = {
    "1": {"class_type": "Const", "inputs": {"value": 3}},
    "2": {"class_type": "Add", "inputs": {"a": ["1", 0], "b": 4}},
    "3": {"class_type": "Collect", "inputs": {"value": ["2", 0]}},
}


@pytest.fixture(autouse=True)
def toy_registry(monkeypatch, tmp_path):
    monkeypatch.setattr(cli, "_registry", make_registry)
    monkeypatch.chdir(tmp_path)


def write(tmp_path, doc, name="wf.json"):
    path = tmp_path / name
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return str(path)


def test_run_prints_outputs_as_json(tmp_path, capsys):
    assert cli.main(["run", write(tmp_path, GOOD), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["status"] == "success" and out["outputs"]["3"]["value"] == [7]


def test_run_with_set_override(tmp_path, capsys):
    assert cli.main(["run", write(tmp_path, {"prompt": GOOD}), "--json", "--set", "2.b=10"]) == 0
    assert json.loads(capsys.readouterr().out)["outputs"]["3"]["value"] == [13]


@pytest.mark.parametrize("arg, message", [
    ("9.b=1", "no node '9'"),
    ("2b=1", "expected NODE_ID.INPUT=VALUE"),
])
def test_bad_override(tmp_path, capsys, arg, message):
    assert cli.main(["run", write(tmp_path, GOOD), "--set", arg]) == 2
    assert message in capsys.readouterr().err


def test_override_that_breaks_validation(tmp_path, capsys):
    assert cli.main(["run", write(tmp_path, GOOD), "--set", "1.value=\"x\""]) == 1
    err = capsys.readouterr().err
    assert "node 1 (Const), input 'value'" in err and "expected an integer" in err


def test_validate_ok_and_errors(tmp_path, capsys):
    assert cli.main(["validate", write(tmp_path, GOOD)]) == 0
    assert "valid" in capsys.readouterr().out
    bad = {**GOOD, "1": {"class_type": "Const", "inputs": {"value": 5000}}}
    assert cli.main(["validate", write(tmp_path, bad)]) == 1
    assert "bigger than max of 1000" in capsys.readouterr().err


@pytest.mark.parametrize("content, code, message", [
    ("{not json", 2, "not valid JSON"),
    ("[1, 2, 3]", 2, "not a workflow object"),
    ('{"a": 1}', 2, "no nodes found"),
    ('{"1": {"class_type": "Nope", "inputs": {}}, "2": {"class_type": "Collect", "inputs": {"value": ["1", 0]}}}',
     1, "Unknown node type 'Nope'"),
])
def test_bad_files(tmp_path, capsys, content, code, message):
    assert cli.main(["run", write(tmp_path, content)]) == code
    captured = capsys.readouterr()
    assert message in captured.err and "Traceback" not in captured.err


def test_cycle_via_cli(tmp_path, capsys):
    wf = {"1": {"class_type": "Add", "inputs": {"a": ["2", 0], "b": 1}},
          "2": {"class_type": "Add", "inputs": {"a": ["1", 0], "b": 1}},
          "3": {"class_type": "Collect", "inputs": {"value": ["2", 0]}}}
    assert cli.main(["validate", write(tmp_path, wf)]) == 1
    assert "Dependency cycle" in capsys.readouterr().err


def test_missing_file_and_folder(tmp_path, capsys):
    assert cli.main(["run", str(tmp_path / "nope.json")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert cli.main(["run", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err


def test_failing_node_exit_code(tmp_path, capsys):
    wf = {"1": {"class_type": "Const", "inputs": {"value": 1}},
          "2": {"class_type": "Fail", "inputs": {"x": ["1", 0]}},
          "3": {"class_type": "Collect", "inputs": {"value": ["2", 0]}}}
    assert cli.main(["run", write(tmp_path, wf)]) == 1
    err = capsys.readouterr().err
    assert "node 2 (Fail) failed: boom at 1" in err and "Traceback" not in err


def test_nodes_listing_and_schema(capsys):
    assert cli.main(["nodes"]) == 0
    out = capsys.readouterr().out
    assert "Collect  (also: ShowValue)" in out
    assert cli.main(["nodes", "Scale", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)["Scale"]
    assert info["input"]["required"]["mode"] == [["floor", "round"], {}]
    assert info["input"]["required"]["factor"][1]["max"] == 10.0
    assert cli.main(["nodes", "Scal"]) == 1
    assert "did you mean Scale" in capsys.readouterr().err


def test_console_entry_point_runs_in_subprocess(tmp_path):
    # The real registry (built-in nodes): an unknown node is a clean error, exit 1.
    path = write(tmp_path, {"1": {"class_type": "DoesNotExist", "inputs": {}}})
    proc = subprocess.run([sys.executable, "-m", "nodeflow.cli", "validate", path],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert "Unknown node type 'DoesNotExist'" in proc.stderr and "Traceback" not in proc.stderr


# -- Ctrl-C, broken pipes, warnings ---------------------------------------------------------------

SLOW_RUN = '''
import sys, time
sys.path.insert(0, {tests!r})
from nodeflow import Node, Output, Registry, Socket, cli
from toy_nodes import Collect, Const


class Sleepy(Node):
    inputs = {{"x": Socket("INT")}}
    outputs = [Output("INT")]

    def run(self, x):
        print("started", flush=True)
        for i in range(400):
            time.sleep(0.01)
            if {checks}:
                self.context.progress(i + 1, 400)
        return (x,)


cli._registry = lambda: Registry([Const, Collect, Sleepy])
sys.exit(cli.main(["run", sys.argv[1]]))
'''

SLOW_WF = {"1": {"class_type": "Const", "inputs": {"value": 1}},
           "2": {"class_type": "Sleepy", "inputs": {"x": ["1", 0]}},
           "3": {"class_type": "Collect", "inputs": {"value": ["2", 0]}}}


def interrupt_run(tmp_path, checks: bool, signals: int):
    script = tmp_path / "slow_run.py"
    script.write_text(SLOW_RUN.format(tests=str(Path(__file__).parent), checks=checks))
    proc = subprocess.Popen([sys.executable, str(script), write(tmp_path, SLOW_WF)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "started\n"
        started = time.monotonic()
        proc.send_signal(signal.SIGINT)
        seen = ""
        if signals == 2:
            seen = proc.stderr.readline() + proc.stderr.readline()  # "", then "interrupting: ..."
            assert "interrupting" in seen
            proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=10)
    finally:
        proc.kill()
    return proc.returncode, seen + err, time.monotonic() - started


def test_ctrl_c_stops_the_run_at_the_next_step(tmp_path):
    code, err, took = interrupt_run(tmp_path, checks=True, signals=1)
    assert code == 130, err
    assert "Traceback" not in err and "KeyError" not in err
    assert "interrupted in node 2 (Sleepy)" in err
    assert took < 3  # long before the node's 4 s were up


def test_second_ctrl_c_quits_a_node_that_never_checks(tmp_path):
    code, err, took = interrupt_run(tmp_path, checks=False, signals=2)
    assert code == 130, err
    assert "Traceback" not in err and took < 3


def test_closed_pipe_ends_quietly(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "nodeflow.cli", "nodes", "--json"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.readline()  # like `| head -1`: the listing (130 kB) is far more than the pipe holds
    proc.stdout.close()
    err = proc.stderr.read().decode()
    proc.wait(timeout=60)
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
    assert proc.returncode == cli.EXIT_BROKEN_PIPE


def test_a_broken_node_package_is_reported_once(tmp_path):
    dist = tmp_path / "brokennodes-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: brokennodes\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[nodeflow.nodes]\nbroken = brokennodes_missing_module\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "nodeflow.cli", "nodes"], capture_output=True, text=True,
                          env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "brokennodes_missing_module" in line]
    assert len(lines) == 1 and lines[0].startswith("warning: could not load nodes from entry point broken")


# -- bad input of every kind: a message and an exit code, never a traceback ------------------------


@pytest.mark.parametrize("content, code, message", [
    pytest.param("[" * 100_000, 2, "nested too deeply", id="deep"),
    pytest.param('{"1": {"class_type": "Const", "inputs": {"value": ' + "7" * 5000 + "}}}", 2,
                 "integer string conversion", id="long-int"),
    ('{"nodes": [], "links": 5}', 2, "'links' must be a list, got the number 5"),
    ('{"nodes": [{"id": 1, "type": "Reroute", "inputs": {"a": 1}}], "links": []}', 2,
     "node 1 (Reroute): 'inputs' must be a list, got an object"),
    ('{"nodes": [], "links": [], "definitions": {"subgraphs": 5}}', 2, "'definitions.subgraphs' must be a list"),
    ('{"nodes": [{"id": 1, "type": "Const", "inputs": 5}], "links": []}', 2, "'inputs' must be a list"),
    ('{"1": {"class_type": "Const", "inputs": {"value": null}}, '
     '"2": {"class_type": "Collect", "inputs": {"value": ["1", 0]}}}', 1, "got null"),
])
def test_unusable_files(tmp_path, capsys, content, code, message):
    assert cli.main(["run", write(tmp_path, content)]) == code
    captured = capsys.readouterr()
    assert message in captured.err and "Traceback" not in captured.err


def test_set_on_a_node_whose_inputs_are_not_an_object(tmp_path, capsys):
    wf = {**GOOD, "1": {"class_type": "Const", "inputs": [3]}}
    assert cli.main(["run", write(tmp_path, wf), "--set", "1.value=3"]) == 1
    assert "node 1's 'inputs' is a list" in capsys.readouterr().err


def test_set_rewires_a_link_input_and_keeps_lists_literal_on_widgets(tmp_path, capsys):
    wf = {**GOOD, "4": {"class_type": "Const", "inputs": {"value": 40}}}
    assert cli.main(["run", write(tmp_path, wf), "--json", "--set", '3.value=["4", 0]']) == 0
    assert json.loads(capsys.readouterr().out)["outputs"]["3"]["value"] == [40]
    assert cli.main(["validate", write(tmp_path, wf), "--set", '2.b=["4", 0]']) == 1
    assert "input 'b': Expected an integer" in capsys.readouterr().err  # a widget: a literal list


def test_partly_valid_workflow_with_a_cycle_runs_its_valid_output(tmp_path, capsys):
    wf = {**GOOD, "4": {"class_type": "Add", "inputs": {"a": ["5", 0], "b": 1}},
          "5": {"class_type": "Add", "inputs": {"a": ["4", 0], "b": 1}},
          "6": {"class_type": "Collect", "inputs": {"value": ["5", 0]}}}
    assert cli.main(["run", write(tmp_path, wf), "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["outputs"] == {"3": {"value": [7], "node": ["3"]}}
    assert "Dependency cycle" in captured.err and "Traceback" not in captured.err


def test_relative_output_dir_is_taken_from_the_current_directory(tmp_path, monkeypatch):
    seen = {}
    real = folders_mod.configure

    def spy(base=None, **kw):
        seen.update(base=base, **kw)
        return real(base, **kw)

    monkeypatch.setattr(folders_mod, "configure", spy)
    saved = run_context.default()._folders
    try:
        assert cli.main(["run", write(tmp_path, GOOD), "--base-dir", "base", "--output-dir", "out", "-q"]) == 0
        assert seen == {"base": str(tmp_path / "base"), "output_dir": str(tmp_path / "out")}
        assert folders_mod.folders().output == tmp_path / "out"
    finally:
        run_context.default()._folders = saved


def test_run_fast_path_options(tmp_path, capsys, monkeypatch):
    """--compile / --cuda-graphs: checked before anything runs, errors naming the option."""
    torch = pytest.importorskip("torch")
    from nodeflow import context

    for name, value in (("compile", None), ("cuda_graphs", False), ("device", None)):
        monkeypatch.setattr(context.default(), name, value)
    assert cli.main(["run", write(tmp_path, GOOD), "--compile", "--compile-backend", "bogus"]) == 2
    assert "error: --compile: 'bogus' is not a torch.compile backend" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert cli.main(["run", write(tmp_path, GOOD), "--cuda-graphs"]) == 2
        err = capsys.readouterr().err
        assert "error: --cuda-graphs needs a CUDA device, and the models run on cpu" in err
        assert "Traceback" not in err
    assert cli.main(["run", write(tmp_path, GOOD), "--compile", "--compile-backend", "eager"]) == 0
    assert (context.default().compile, context.default().cuda_graphs) == ("eager", False)
