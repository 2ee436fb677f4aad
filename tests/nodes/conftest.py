"""Shared fixtures for the node tests: a temporary base folder (input/, output/, temp/)
configured as the process-wide folders for the test, restored afterwards."""

from __future__ import annotations

import pytest

import nodeflow.folders as folders_mod


@pytest.fixture
def base(tmp_path, monkeypatch):
    for var in ("NODEFLOW_HOME", "NODEFLOW_INPUT_DIR", "NODEFLOW_OUTPUT_DIR", "NODEFLOW_TEMP_DIR",
                "NODEFLOW_DISABLE_METADATA"):
        monkeypatch.delenv(var, raising=False)
    saved = folders_mod._current
    configured = folders_mod.configure(tmp_path)
    for name in ("input", "output", "temp"):
        (tmp_path / name).mkdir()
    yield configured
    folders_mod._current = saved
