"""Latents on disk: SaveLatent writes ``.latent`` files to output/, LoadLatent reads them from
input/, in ComfyUI's format — a safetensors file holding the raw latent as ``latent_tensor``
and an empty ``latent_format_version_0`` tensor as the format marker (files without the
marker are ComfyUI's first format, which stored latents × 0.18215), with the workflow in the
file's metadata (``prompt`` and the ``extra_pnginfo`` keys, as JSON strings) unless
``NODEFLOW_DISABLE_METADATA=1`` is set. Names never leave their folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

from nodeflow import Combo, Hidden, Node, Output, Result, Socket, String
from nodeflow.folders import UnsafePath, folders
from nodeflow.spec import LiteralError

EXTENSION = ".latent"
_ANNOTATED = re.compile(r"^(?P<name>.*) \[(?P<kind>input|output|temp)\]$")
#: The first format's scale: LATENTs were stored multiplied by SD's latent scale factor.
OLD_FORMAT_SCALE = 0.18215


def latent_path(name: str) -> Path:
    """The ``.latent`` file a LoadLatent value names: in input/ (subfolders allowed), or
    ``"name [output]"`` style. Raises ``UnsafePath`` or ``FileNotFoundError``."""
    kind = "input"
    match = _ANNOTATED.match(name)
    if match:
        name, kind = match["name"], match["kind"]
    path = folders().io_path(kind, name)
    if not path.is_file():
        raise FileNotFoundError(f"latent file {name!r} not found in the {kind} folder ({folders().io_dir(kind)})")
    return path


def _latent_choices() -> list[str]:
    root = folders().io_dir("input")
    found = []
    if root.is_dir():
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            found += [Path(dirpath, f).relative_to(root).as_posix() for f in filenames
                      if f.endswith(EXTENSION) and not f.startswith(".")]
    return sorted(found, key=str.lower)


class LatentFile(Combo):
    """A ``.latent`` file in input/: one of those listed, or any existing one named as
    ``latent_path`` accepts (annotated names, files written since the list was made)."""

    def check(self, value: Any) -> LiteralError | None:
        if isinstance(value, str):
            try:
                latent_path(value)
                return None
            except UnsafePath as exc:
                return LiteralError(type="value_not_in_list", message=str(exc),
                                    expected="a file name inside the input folder")
            except (FileNotFoundError, OSError):
                pass
        return super().check(value)


class SaveLatent(Node):
    """Saves latents to the output folder as ``prefix_00001_.latent`` (safetensors; never
    overwriting; the prefix may name a subfolder and use SaveImage's tokens), with the
    workflow in the file's metadata."""

    category = "_for_testing"
    display_name = "Save Latent"
    inputs = {"samples": Socket("LATENT"), "filename_prefix": String(default="latents/ComfyUI")}
    hidden = {"prompt": Hidden("PROMPT"), "extra_pnginfo": Hidden("EXTRA_PNGINFO")}
    outputs = []
    output_node = True

    @classmethod
    def validate_inputs(cls, filename_prefix=None, **_):
        from nodes.io import _validate_prefix

        return _validate_prefix(filename_prefix)

    def run(self, samples, filename_prefix="latents/ComfyUI", prompt=None, extra_pnginfo=None):
        import torch
        from safetensors.torch import save

        from nodes.io import _next_counter, _split_prefix, expand_prefix, metadata_disabled

        latent = samples["samples"]
        height, width = int(latent.shape[-2]) * 8, int(latent.shape[-1]) * 8
        subfolder, stem = _split_prefix(expand_prefix(filename_prefix, width, height, prompt))
        metadata = None
        if not metadata_disabled():
            metadata = {"prompt": json.dumps(prompt, default=str) if prompt is not None else ""}
            for key, value in (extra_pnginfo or {}).items():
                metadata[str(key)] = json.dumps(value, default=str)
        data = save({"latent_tensor": latent.detach().cpu().contiguous(),
                     "latent_format_version_0": torch.tensor([])}, metadata=metadata)
        store = folders()
        directory = store.io_path("output", stem, subfolder).parent
        directory.mkdir(parents=True, exist_ok=True)
        counter = _next_counter(directory, stem)
        while True:
            filename = f"{stem}_{counter:05}_{EXTENSION}"
            path = store.io_path("output", filename, subfolder)
            try:
                handle = open(path, "xb")  # noqa: SIM115 - never overwrite, even with another writer racing us
            except FileExistsError:
                counter += 1
                continue
            break
        try:
            with handle:
                handle.write(data)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return Result(ui={"latents": [{"filename": filename, "subfolder": subfolder, "type": "output"}]})


class LoadLatent(Node):
    """Loads a ``.latent`` file from the input folder (ComfyUI's format; files of its first
    format, without the version marker, are divided by 0.18215)."""

    category = "_for_testing"
    display_name = "Load Latent"
    inputs = {"latent": LatentFile(choices=_latent_choices, tooltip="a .latent file in the input folder")}
    outputs = [Output("LATENT")]

    @classmethod
    def fingerprint(cls, latent=None, **_):
        try:
            path = latent_path(latent)
        except (OSError, ValueError, TypeError):
            return None
        return hashlib.sha256(path.read_bytes()).hexdigest()

    def run(self, latent):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = latent_path(latent)
        try:
            tensors = load_file(path, device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise ValueError(f"{latent!r} is not a latent file (safetensors) that can be read: {exc}") from None
        if "latent_tensor" not in tensors:
            raise ValueError(f"{latent!r} holds no 'latent_tensor'; found {', '.join(sorted(tensors)) or 'nothing'}")
        multiplier = 1.0 if "latent_format_version_0" in tensors else 1.0 / OLD_FORMAT_SCALE
        return ({"samples": tensors["latent_tensor"].float() * multiplier},)
