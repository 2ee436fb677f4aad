"""The demo checkpoint that ships with nodeflow.

It was made by ``nodeflow.train.demo`` (``nodeflow demo --train`` makes it again from
scratch); it is small enough (float16, under 20 MB) to ship, so a first run needs neither a
download nor minutes of training.
"""

from __future__ import annotations

import shutil
from pathlib import Path

DEMO_CHECKPOINT = "nodeflow-demo.safetensors"
SHIPPED = Path(__file__).parent / "assets" / DEMO_CHECKPOINT


def install_shipped(target: Path) -> bool:
    """Copy the shipped demo checkpoint to ``target``; False if this install has none."""
    if not SHIPPED.is_file():
        return False
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".part")
    shutil.copyfile(SHIPPED, tmp)
    tmp.replace(target)
    return True
