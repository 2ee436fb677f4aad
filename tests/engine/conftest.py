import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from toy_nodes import RUNS, Slow, make_registry

from nodeflow import Executor


@pytest.fixture
def registry():
    return make_registry()


@pytest.fixture
def executor(registry):
    RUNS.clear()
    Slow.GATE = None
    Slow.STARTED.clear()
    return Executor(registry)


@pytest.fixture
def runs():
    return RUNS
