"""Reading state-dict files: ``.safetensors`` (memory-mapped) and ``.ckpt`` / ``.pt`` / ``.bin``.

``open_state_dict(path)`` returns a ``TensorFile``: its ``shapes`` are known at once (the
safetensors header; nothing is read for detection), and ``get(key, dtype)`` gives one
tensor in the dtype wanted, without double copies:

- a tensor already stored in that dtype is a view of the memory-mapped file (a private,
  copy-on-write mapping): its pages are read on first use and shared with the OS page
  cache, so loading costs no more memory than the weights themselves;
- a tensor stored in another dtype is converted once, and the mapped pages it was read
  from are handed back to the OS at once.

A file must not be rewritten in place while models loaded from it are in use (replacing or
deleting it is fine).

Pickled checkpoints are read with ``torch.load(weights_only=True)``: a pickle that needs
anything beyond tensors and plain containers is refused with ``CheckpointError``, and
nothing in it is executed.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import pickle
import re
import struct
from pathlib import Path
from typing import Iterator

import torch


class CheckpointError(ValueError):
    """A weights file that cannot be used: unreadable, truncated, unsafe, or of an unknown layout."""


SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin"}


class TensorFile:
    """A state dict on disk: ``shapes`` (key -> shape), ``dtypes``, and ``get(key, dtype)``."""

    path: Path
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, torch.dtype]

    def get(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """One tensor on the CPU (a view of the file where possible); floating ones converted to ``dtype``."""
        raise NotImplementedError

    def keys(self) -> Iterator[str]:
        return iter(self.shapes)

    def __contains__(self, key: str) -> bool:
        return key in self.shapes

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _needs_conversion(t_dtype: torch.dtype, dtype: torch.dtype | None) -> bool:
    return dtype is not None and t_dtype.is_floating_point and t_dtype != dtype


class SafetensorsFile(TensorFile):
    """A memory-mapped ``.safetensors`` file. Layout: an 8-byte little-endian header length, a JSON
    header ``{key: {"dtype", "shape", "data_offsets": [begin, end]}}``, then the raw data."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{self.path}: not a safetensors file ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise CheckpointError(f"{self.path}: truncated or not a safetensors file: the header says "
                                      f"{n} header bytes but the file has {size} bytes")
            try:
                header = json.loads(f.read(n))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise CheckpointError(f"{self.path}: not a safetensors file (header is not JSON: {e})") from None
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size > 0 else None
        self._shared = False                                              # zero-copy views handed out
        self.metadata = header.pop("__metadata__", None) or {}
        self._start = 8 + n
        self._entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        data_size = size - self._start
        for key, e in header.items():
            try:
                dtype = SAFETENSORS_DTYPES[e["dtype"]]
                shape, (begin, end) = tuple(e["shape"]), e["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{self.path}: bad header entry for {key!r}: {e}") from None
            if end > data_size:
                raise CheckpointError(f"{self.path}: file is truncated: tensor {key!r} needs bytes up to "
                                      f"{self._start + end}, the file has {size}")
            if end - begin != math.prod(shape) * dtype.itemsize:
                raise CheckpointError(f"{self.path}: tensor {key!r} has {end - begin} bytes for shape {shape}")
            self._entries[key] = (dtype, shape, begin, end)
        self.shapes = {k: e[1] for k, e in self._entries.items()}
        self.dtypes = {k: e[0] for k, e in self._entries.items()}

    def get(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        file_dtype, shape, begin, end = self._entries[key]
        convert = _needs_conversion(file_dtype, dtype)
        if end == begin:
            return torch.empty(shape, dtype=dtype if convert else file_dtype)
        offset = self._start + begin
        view = torch.frombuffer(self._mm, dtype=file_dtype, count=(end - begin) // file_dtype.itemsize,
                                offset=offset).reshape(shape)
        if not convert and offset % file_dtype.itemsize == 0:
            self._shared = True
            return view                                                   # zero-copy (holds a reference to the map)
        out = view.to(dtype or file_dtype, copy=True)
        del view
        self._release(offset, self._start + end)
        return out

    def _release(self, begin: int, end: int) -> None:
        """Hand the mapped pages of a copied tensor back to the OS (they are re-read if needed again)."""
        if not hasattr(self._mm, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
            return
        page = mmap.PAGESIZE
        first, last = -(-begin // page) * page, end // page * page
        if last > first:
            self._mm.madvise(mmap.MADV_DONTNEED, first, last - first)

    def close(self) -> None:
        """Unmap the file, unless tensors view it: then it is unmapped when the last of them goes."""
        if self._mm is not None and not self._shared:
            self._mm.close()
        self._mm = None


class TorchFile(TensorFile):
    """A pickled checkpoint loaded with ``torch.load(weights_only=True)`` (memory-mapped when the
    file is in the zip format). A top-level ``"state_dict"`` entry is unwrapped; non-tensors dropped."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        obj = self._load()
        if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict):
            raise CheckpointError(f"{self.path}: expected a state dict, found a pickled {type(obj).__name__}")
        self._tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        self.shapes = {k: tuple(v.shape) for k, v in self._tensors.items()}
        self.dtypes = {k: v.dtype for k, v in self._tensors.items()}

    def _load(self):
        try:
            try:
                return torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e) and "zip" not in str(e):
                    raise
                return torch.load(self.path, map_location="cpu", weights_only=True)   # legacy, non-zip format
        except pickle.UnpicklingError as e:
            found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
            what = f" (it references {found.group(1)})" if found else ""
            raise CheckpointError(
                f"{self.path}: refused to load: this pickle needs more than tensors and plain containers"
                f"{what}, and running it could execute arbitrary code. It was not executed. Convert the "
                f"checkpoint to .safetensors with a tool you trust.") from None
        except (RuntimeError, EOFError, OSError) as e:
            raise CheckpointError(f"{self.path}: cannot read this checkpoint (truncated or not a torch "
                                  f"checkpoint): {str(e).splitlines()[0]}") from None

    def get(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        t = self._tensors[key]
        return t.to(dtype) if _needs_conversion(t.dtype, dtype) else t

    def close(self) -> None:
        self._tensors = {}


class DictFile(TensorFile):
    """An in-memory state dict behind the ``TensorFile`` interface (tests, converted layouts)."""

    def __init__(self, tensors: dict[str, torch.Tensor], path: str = "<memory>"):
        self.path = Path(path)
        self._tensors = tensors
        self.shapes = {k: tuple(v.shape) for k, v in tensors.items()}
        self.dtypes = {k: v.dtype for k, v in tensors.items()}

    def get(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        t = self._tensors[key]
        return t.to(dtype) if _needs_conversion(t.dtype, dtype) else t


def open_state_dict(path: str | os.PathLike) -> TensorFile:
    """Open a weights file by its suffix (``.safetensors``/``.sft``, ``.ckpt``/``.pt``/``.pth``/``.bin``),
    else by its first bytes."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix in (".safetensors", ".sft"):
        return SafetensorsFile(path)
    if suffix in PICKLE_SUFFIXES:
        return TorchFile(path)
    with open(path, "rb") as f:
        head = f.read(9)
    if head[:2] == b"PK" or head[:1] == b"\x80":
        return TorchFile(path)
    if len(head) == 9 and head[8:9] == b"{":
        return SafetensorsFile(path)
    raise CheckpointError(f"{path}: unknown weights format (expected .safetensors, .ckpt, .pt, .pth or .bin)")


def read_all(path: str | os.PathLike, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of a weights file, floating ones in ``dtype``."""
    with open_state_dict(path) as f:
        return {k: f.get(k, dtype) for k in list(f.keys())}


def assign_weights(module: torch.nn.Module, sd: dict[str, torch.Tensor], what: str) -> torch.nn.Module:
    """Make ``sd``'s tensors the parameters of ``module`` (built on the meta device): no copy, strict.
    Missing, unexpected or misshapen keys raise ``CheckpointError`` naming ``what`` and examples."""
    expected = dict(module.state_dict(keep_vars=True))
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    wrong = [f"{k} {tuple(sd[k].shape)} (expected {tuple(expected[k].shape)})"
             for k in expected if k in sd and tuple(sd[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong:
        problems = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("with the wrong shape", wrong)):
            if items:
                problems.append(f"{len(items)} {label}, e.g. {', '.join(items[:3])}")
        raise CheckpointError(f"the {what} does not match its architecture: {'; '.join(problems)}. "
                              "Is the file truncated or a different kind of model?")
    module.load_state_dict(sd, strict=True, assign=True)
    return module.eval().requires_grad_(False)
