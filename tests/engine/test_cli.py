"""The command line: good runs, and every kind of bad input gives a message, not a traceback."""

import json
import subprocess
import sys

import pytest

from nodeflow import cli
from toy_nodes import make_registry

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
