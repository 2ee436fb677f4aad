"""Cheap node types for the server tests. A real server process loads this file too
(``--extra-nodes tests/server/server_nodes.py``)."""

from __future__ import annotations

import os
import re
import threading
import time
from types import SimpleNamespace

from PIL import Image

from nodeflow import Bool, Float, Int, Node, Output, Result, Socket, String
from nodeflow.folders import folders


class Const(Node):
    """Emits an integer."""
    category = "test"
    inputs = {"value": Int(default=0, min=-10**9, max=10**9)}
    outputs = [Output("INT", "value")]

    def run(self, value):
        return (value,)


class Add(Node):
    category = "test"
    inputs = {"a": Int(default=0), "b": Int(default=0)}
    outputs = [Output("INT", "sum")]

    def run(self, a, b):
        return (a + b,)


class Hold(Node):
    """Takes `steps` steps with progress. Tests can hold it at step 1 with GATE; `seconds`
    sleeps that long per step (interruptible), for a real server process."""
    category = "test"
    inputs = {"x": Socket("INT"), "steps": Int(default=3, min=1, max=100000)}
    optional = {"seconds": Float(default=0.0, min=0.0, max=600.0), "preview": Bool(default=False)}
    outputs = [Output("INT")]
    GATE: threading.Event | None = None
    STARTED = threading.Event()
    RUNS = 0

    def run(self, x, steps, seconds=0.0, preview=False):
        Hold.RUNS += 1
        for i in range(steps):
            if i == 1:
                Hold.STARTED.set()
                gate = Hold.GATE
                if gate is not None:
                    deadline = time.monotonic() + 10
                    while not gate.wait(0.005) and time.monotonic() < deadline:
                        self.context.check_interrupted()
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                self.context.check_interrupted()
                time.sleep(min(0.01, max(end - time.monotonic(), 0)))
            image = Image.new("RGB", (16, 16), (i * 40 % 256, 80, 160)) if preview else None
            self.context.progress(i + 1, steps, image)
        return (x,)


class Fail(Node):
    category = "test"
    inputs = {"x": Socket("INT")}
    outputs = [Output("INT")]

    def run(self, x):
        raise RuntimeError(f"boom at {x}")


class Exit(Node):
    """Raises SystemExit: the worker thread must survive even that."""
    category = "test"
    inputs = {"x": Socket("INT")}
    outputs = [Output("INT")]

    def run(self, x):
        raise SystemExit(3)


class Canvas(Node):
    category = "test"
    inputs = {"width": Int(default=512, min=1, max=1 << 20), "height": Int(default=512, min=1, max=1 << 20),
              "batch_size": Int(default=1, min=1, max=4096)}
    outputs = [Output("INT")]

    def run(self, width, height, batch_size):
        return (width * height * batch_size,)


class Steps(Node):
    category = "test"
    inputs = {"x": Socket("INT"), "steps": Int(default=20, min=1, max=100000)}
    outputs = [Output("INT")]

    def run(self, x, steps):
        return (x + steps,)


class Show(Node):
    """An output node without files."""
    category = "test"
    inputs = {"value": Socket("*")}
    outputs = []
    output_node = True

    def run(self, value):
        return Result(ui={"text": [str(value)]})


class SaveValue(Node):
    """Writes a small PNG whose colour encodes the value, numbered like ComfyUI's SaveImage
    (an existing file is never overwritten)."""
    category = "test"
    inputs = {"value": Socket("INT")}
    optional = {"filename_prefix": String(default="test")}
    outputs = []
    output_node = True

    def run(self, value, filename_prefix="test"):
        out = folders().output
        out.mkdir(parents=True, exist_ok=True)
        pattern = re.compile(re.escape(filename_prefix) + r"_(\d{5})_\.png$")
        taken = [int(m.group(1)) for p in out.iterdir() if (m := pattern.match(p.name))]
        counter = max(taken, default=0) + 1
        while True:
            name = f"{filename_prefix}_{counter:05}_.png"
            try:
                with open(out / name, "xb") as f:
                    Image.new("RGB", (8, 8), (value % 256, (value // 256) % 256, 7)).save(f, format="PNG")
                break
            except FileExistsError:
                counter += 1
        return Result(ui={"images": [{"filename": name, "subfolder": "", "type": "output"}]})


# -- pictures by their shapes only (ComfyUI's LATENT and IMAGE conventions), nothing allocated --


def _latent(batch, height, width):
    return {"samples": SimpleNamespace(shape=(batch, 4, height // 8, width // 8))}


class EmptyLat(Node):
    category = "test"
    inputs = {"width": Int(default=64, min=8, max=1 << 20), "height": Int(default=64, min=8, max=1 << 20),
              "batch_size": Int(default=1, min=1, max=4096)}
    outputs = [Output("LATENT")]

    def run(self, width, height, batch_size):
        return (_latent(batch_size, height, width),)


class LatScaleBy(Node):
    category = "test"
    inputs = {"samples": Socket("LATENT"), "scale_by": Float(default=1.5, min=0.01, max=8.0)}
    outputs = [Output("LATENT")]

    def run(self, samples, scale_by):
        b, c, h, w = samples["samples"].shape
        return (_latent(b, int(h * 8 * scale_by), int(w * 8 * scale_by)),)


class LatRepeat(Node):
    category = "test"
    inputs = {"samples": Socket("LATENT"), "amount": Int(default=1, min=1, max=64)}
    outputs = [Output("LATENT")]

    def run(self, samples, amount):
        b, c, h, w = samples["samples"].shape
        return (_latent(b * amount, h * 8, w * 8),)


class LatTimes4(Node):
    """Makes a latent 4× as wide and high, by no input the guard can read."""
    category = "test"
    inputs = {"samples": Socket("LATENT")}
    outputs = [Output("LATENT")]

    def run(self, samples):
        b, c, h, w = samples["samples"].shape
        return (_latent(b, h * 32, w * 32),)


class LatToImage(Node):
    category = "test"
    inputs = {"samples": Socket("LATENT")}
    outputs = [Output("IMAGE")]

    def run(self, samples):
        b, c, h, w = samples["samples"].shape
        return (SimpleNamespace(shape=(b, h * 8, w * 8, 3)),)


class ImgToTotal(Node):
    category = "test"
    inputs = {"image": Socket("IMAGE"), "megapixels": Float(default=1.0, min=0.01, max=16.0)}
    outputs = [Output("IMAGE")]

    def run(self, image, megapixels):
        side = int((megapixels * 1024 * 1024) ** 0.5)
        return (SimpleNamespace(shape=(image.shape[0], side, side, 3)),)


class ShowSize(Node):
    """An output node that reports a latent's or an image's shape."""
    category = "test"
    inputs = {"value": Socket("*")}
    outputs = []
    output_node = True

    def run(self, value):
        shape = value["samples"].shape if isinstance(value, dict) else value.shape
        return Result(ui={"text": [str(list(shape))]})


# -- workers: which process ran a node, models, meeting points ------------------------------------


class FakeLoad(Node):
    """A 'model loader' for routing tests: any name; counts its loads per process."""
    category = "test"
    model_inputs = {"ckpt_name": "checkpoints"}
    inputs = {"ckpt_name": String(default="a.safetensors")}
    outputs = [Output("MODEL")]
    LOADS = 0

    def run(self, ckpt_name):
        FakeLoad.LOADS += 1
        return ((ckpt_name, os.getpid(), FakeLoad.LOADS),)


class UseModel(Node):
    """Shows the model it got, the process it ran in and its worker's name."""
    category = "test"
    inputs = {"model": Socket("MODEL"), "seed": Int(default=0, min=0, max=10**9)}
    outputs = []
    output_node = True

    def run(self, model, seed):
        name, pid, loads = model
        return Result(ui={"text": [name, str(os.getpid()), self.context.run.name, str(loads)]})


class Meet(Node):
    """Waits (up to `timeout` s) until `parties` runs of it are under way at once in this process."""
    category = "test"
    inputs = {"x": Socket("INT"), "parties": Int(default=2, min=1, max=8)}
    optional = {"timeout": Float(default=5.0, min=0.0, max=60.0)}
    outputs = [Output("INT")]
    BARRIERS: dict = {}
    LOCK = threading.Lock()

    def run(self, x, parties, timeout=5.0):
        with Meet.LOCK:
            barrier = Meet.BARRIERS.setdefault(parties, threading.Barrier(parties))
        try:
            barrier.wait(timeout)
        except threading.BrokenBarrierError:
            with Meet.LOCK:  # a broken barrier stays broken: the next meeting gets a new one
                if Meet.BARRIERS.get(parties) is barrier:
                    Meet.BARRIERS[parties] = threading.Barrier(parties)
            raise
        return (x,)


class WhereAmI(Node):
    """Shows the folders and device name the run context gives this node."""
    category = "test"
    inputs = {"x": Socket("INT")}
    outputs = []
    output_node = True

    def run(self, x):
        from nodeflow import context

        ctx = context.current()
        return Result(ui={"text": [str(folders().output), str(ctx.device), ctx.name, str(self.context.folders.base)]})


class ReadFile(Node):
    """Shows the size and SHA-256 of a file in input/ (or "name [output]")."""
    category = "test"
    inputs = {"name": String(default="")}
    outputs = []
    output_node = True

    def run(self, name):
        import hashlib

        kind, _, rest = name.rpartition(" [")
        path = folders().io_path(rest[:-1], kind) if kind and rest.endswith("]") else folders().io_path("input", name)
        data = path.read_bytes()
        return Result(ui={"text": [str(len(data)), hashlib.sha256(data).hexdigest()]})


ALL = [Const, Add, Hold, Fail, Exit, Canvas, Steps, Show, SaveValue, EmptyLat, LatScaleBy, LatRepeat, LatTimes4,
       LatToImage, ImgToTotal, ShowSize, FakeLoad, UseModel, Meet, WhereAmI, ReadFile]
