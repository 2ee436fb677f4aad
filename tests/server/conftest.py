import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from server_nodes import Hold


@pytest.fixture(autouse=True)
def reset_nodes():
    Hold.GATE = None
    Hold.STARTED.clear()
    Hold.RUNS = 0
    yield
    if Hold.GATE is not None:
        Hold.GATE.set()
