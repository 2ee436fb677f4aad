"""The code passes the project's ruff configuration (pyproject.toml)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_ruff_passes():
    ruff = shutil.which("ruff")
    if ruff is None:
        try:
            import ruff as _ruff  # noqa: F401 - the wheel ships the binary beside the module
        except ImportError:
            pytest.skip("ruff is not installed (pip install -e '.[test]' installs it)")
        cmd = [sys.executable, "-m", "ruff"]
    else:
        cmd = [ruff]
    proc = subprocess.run([*cmd, "check", "--no-cache", "--quiet", str(ROOT)], capture_output=True, text=True,
                          check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
