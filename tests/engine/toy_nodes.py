"""Small node types for engine tests: they count their runs so tests can see what executed."""

from __future__ import annotations

import threading
from collections import Counter

from nodeflow import Bool, Combo, Float, Hidden, Int, Node, Output, Registry, Result, Socket, String

RUNS: Counter = Counter()


class Const(Node):
    """Emits an integer."""
    category = "test"
    inputs = {"value": Int(default=0, min=-1000, max=1000)}
    outputs = [Output("INT", "value")]

    def run(self, value):
        RUNS["Const"] += 1
        return (value,)


class Add(Node):
    category = "test"
    inputs = {"a": Int(default=0), "b": Int(default=0)}
    outputs = [Output("INT", "sum")]

    def run(self, a, b):
        RUNS["Add"] += 1
        return (a + b,)


class Pair(Node):
    category = "test"
    inputs = {"value": Int(default=0)}
    outputs = [Output("INT", "value"), Output("STRING", "text")]

    def run(self, value):
        RUNS["Pair"] += 1
        return value, str(value)


class Scale(Node):
    category = "test"
    inputs = {"x": Socket("INT"), "factor": Float(default=1.0, min=0.0, max=10.0),
              "mode": Combo(choices=["floor", "round"])}
    optional = {"flag": Bool(default=False)}
    outputs = [Output("FLOAT")]

    def run(self, x, factor, mode, flag=False):
        RUNS["Scale"] += 1
        return (x * factor,)


class Collect(Node):
    """An output node: shows its input."""
    category = "test"
    inputs = {"value": Socket("*")}
    optional = {"label": String(default="")}
    hidden = {"prompt": Hidden("PROMPT"), "node_id": Hidden("UNIQUE_ID")}
    outputs = []
    output_node = True
    aliases = ("ShowValue",)

    def run(self, value, prompt, node_id, label=""):
        RUNS["Collect"] += 1
        return Result(ui={"value": [value], "node": [node_id]})


class Slow(Node):
    """Takes `steps` steps, reporting progress; a test can hold it at a step with GATE."""
    category = "test"
    inputs = {"x": Socket("INT"), "steps": Int(default=5, min=1, max=100)}
    outputs = [Output("INT")]
    GATE: threading.Event | None = None
    STARTED = threading.Event()

    def run(self, x, steps):
        RUNS["Slow"] += 1
        for i in range(steps):
            if i == 1:
                Slow.STARTED.set()
                if Slow.GATE is not None:
                    Slow.GATE.wait(5)
            self.context.progress(i + 1, steps)
        return (x,)


class Fail(Node):
    category = "test"
    inputs = {"x": Socket("INT")}
    outputs = [Output("INT")]

    def run(self, x):
        RUNS["Fail"] += 1
        raise RuntimeError(f"boom at {x}")


class Image(Node):
    """Outputs a type no INT input accepts."""
    category = "test"
    inputs = {}
    outputs = [Output("IMAGE")]

    def run(self):
        return ("pixels",)


class Checked(Node):
    category = "test"
    inputs = {"low": Int(default=0), "high": Int(default=1)}
    outputs = [Output("INT")]

    @classmethod
    def validate_inputs(cls, low, high):
        return [f"low ({low}) must be below high ({high})"] if low >= high else None

    def run(self, low, high):
        return (high - low,)


class FileStamp(Node):
    """Fingerprints its input the way a loader fingerprints a file."""
    category = "test"
    inputs = {"name": String(default="a")}
    outputs = [Output("STRING")]
    STAMPS: dict = {}

    @classmethod
    def fingerprint(cls, name):
        return cls.STAMPS.get(name, 0)

    def run(self, name):
        RUNS["FileStamp"] += 1
        return (f"{name}@{self.STAMPS.get(name, 0)}",)


ALL = [Const, Add, Pair, Scale, Collect, Slow, Fail, Image, Checked, FileStamp]


def make_registry() -> Registry:
    return Registry(ALL)
