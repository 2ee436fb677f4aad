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
nothing in it is executed. Two harmless extras of training checkpoints are let through:
Lightning's ``ModelCheckpoint`` callback (unpickled as an inert stand-in) and numpy scalars
and dtypes (``"epoch"``). A file torch cannot read is reported as empty, truncated, not a
valid checkpoint, or refused, from its structure (read with ``pickletools``, which runs
nothing) and torch's message.

Every ``CheckpointError`` message starts with the file's path.
"""

from __future__ import annotations

import contextlib
import json
import math
import mmap
import os
import pickle
import pickletools
import re
import struct
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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


def _is_count(x) -> bool:
    """A JSON non-negative integer (not a bool, a float or a string)."""
    return type(x) is int and x >= 0


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
            except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
                raise CheckpointError(f"{self.path}: not a safetensors file (header is not JSON: {e})") from None
            self._start = 8 + n
            self._entries = self._parse_header(header, size)
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        self._shared = False                                              # zero-copy views handed out
        self.metadata = header.get("__metadata__") or {}
        self.shapes = {k: e[1] for k, e in self._entries.items()}
        self.dtypes = {k: e[0] for k, e in self._entries.items()}

    def _parse_header(self, header, size: int) -> dict[str, tuple[torch.dtype, tuple[int, ...], int, int]]:
        """Check every header entry: a known dtype, a shape of non-negative integers, and
        ``data_offsets`` [begin, end] inside the data that hold exactly that many bytes."""
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path}: not a safetensors file: the header is a JSON "
                                  f"{type(header).__name__}, expected an object {{name: tensor entry}}")
        metadata = header.get("__metadata__")
        if metadata is not None and not isinstance(metadata, dict):
            raise CheckpointError(f"{self.path}: bad safetensors header: __metadata__ is a "
                                  f"{type(metadata).__name__}, expected an object")
        data_size = size - self._start
        expected = (f"{{'dtype': one of {', '.join(SAFETENSORS_DTYPES)}, 'shape': [non-negative integers], "
                    "'data_offsets': [begin, end]}")
        entries = {}
        for key, e in header.items():
            if key == "__metadata__":
                continue
            ok = (isinstance(e, dict) and isinstance(e.get("dtype"), str) and e["dtype"] in SAFETENSORS_DTYPES
                  and isinstance(e.get("shape"), list) and all(_is_count(d) for d in e["shape"])
                  and isinstance(e.get("data_offsets"), list) and len(e["data_offsets"]) == 2
                  and all(_is_count(o) for o in e["data_offsets"]))
            if not ok:
                raise CheckpointError(f"{self.path}: bad safetensors header entry for {key!r}: {str(e)[:200]}; "
                                      f"expected {expected}")
            dtype, shape, (begin, end) = SAFETENSORS_DTYPES[e["dtype"]], tuple(e["shape"]), e["data_offsets"]
            if end > data_size:
                raise CheckpointError(f"{self.path}: file is truncated: tensor {key!r} needs bytes up to "
                                      f"{self._start + end}, the file has {size}")
            if end - begin != math.prod(shape) * dtype.itemsize:
                raise CheckpointError(f"{self.path}: bad safetensors header entry for {key!r}: data_offsets "
                                      f"[{begin}, {end}] hold {end - begin} bytes, shape {list(shape)} of "
                                      f"{e['dtype']} needs {math.prod(shape) * dtype.itemsize}")
            entries[key] = (dtype, shape, begin, end)
        return entries

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


class _ModelCheckpointStandIn:
    """What Lightning's ``ModelCheckpoint`` callback unpickles as: nothing but its attributes. Old
    Lightning checkpoints (the original SD 1.x ones among them) keep the callback class, or an
    instance, as a key of their ``"callbacks"`` entry; that entry is dropped anyway."""


def _harmless_globals() -> list[tuple[object, str]]:
    """Globals that ``torch.load(weights_only=True)`` may resolve for checkpoints, besides its own:
    Lightning's callback (as the inert stand-in above) and numpy scalars (``"epoch"``,
    ``"global_step"``), which are rebuilt from a dtype and raw bytes. None of them can call
    anything a pickle names: every other global is still refused."""
    found: list[tuple[object, str]] = [
        (_ModelCheckpointStandIn, f"{module}.ModelCheckpoint")
        for module in ("pytorch_lightning.callbacks.model_checkpoint", "lightning.pytorch.callbacks.model_checkpoint")]
    try:
        import numpy as np
    except ImportError:
        return found
    core = getattr(np, "_core", None) or np.core                     # numpy 2 renamed core to _core
    scalar = core.multiarray.scalar
    found += [(scalar, "numpy._core.multiarray.scalar"), (scalar, "numpy.core.multiarray.scalar"),
              (np.dtype, "numpy.dtype")]
    dtype_classes = getattr(np, "dtypes", None)                      # numpy >= 1.25: np.dtype('f8') is a Float64DType
    for name in dir(dtype_classes) if dtype_classes is not None else ():
        cls = getattr(dtype_classes, name)
        if isinstance(cls, type) and issubclass(cls, np.dtype):
            found.append((cls, f"numpy.dtypes.{name}"))
    return found


_load_lock = threading.Lock()                 # torch's safe_globals context edits a process-wide set
_ZIP_MAGIC = b"PK\x03\x04"
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C        # the first pickle of torch's legacy (non-zip) format
_UNSAFE = re.compile(  # torch's weights_only refusals (2.1 - 2.13), naming what the pickle wanted
    r"Unsupported global: GLOBAL (\S+)|unsupported GLOBAL (\S+) whose module|Unsupported class (\S+)"
    r"|reduce for unrecognized function (.+?)(?: which belongs|$)|Can only (?:build|create new object).*but got (.+)$",
    re.M)


def load_pickle(path: str | os.PathLike) -> Any:
    """The whole object of a pickled file, read as ``TorchFile`` reads checkpoints
    (``weights_only``; damage and refusals explained in a ``CheckpointError``)."""
    reader = TorchFile.__new__(TorchFile)
    reader.path = Path(path)
    return reader._load()


class TorchFile(TensorFile):
    """A pickled checkpoint loaded with ``torch.load(weights_only=True)`` (memory-mapped when the
    file is in the zip format). While the top level holds no tensor, the first of ``wrappers``
    found there is unwrapped (training frameworks nest the weights: LDM's ``"state_dict"``,
    BasicSR's ``"params_ema"``); non-tensors are dropped."""

    def __init__(self, path: str | os.PathLike, wrappers: tuple[str, ...] = ("state_dict",)):
        self.path = Path(path)
        obj = self._load()
        while isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
            inner = next((obj[k] for k in wrappers if isinstance(obj.get(k), dict)), None)
            if inner is None:
                break
            obj = inner
        if not isinstance(obj, dict):
            raise CheckpointError(f"{self.path}: expected a state dict, found a pickled {type(obj).__name__}")
        self._tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        self.shapes = {k: tuple(v.shape) for k, v in self._tensors.items()}
        self.dtypes = {k: v.dtype for k, v in self._tensors.items()}

    def _load(self):
        try:
            with open(self.path, "rb") as f:
                is_zip = f.read(4) == _ZIP_MAGIC             # the zip format can be memory-mapped, the legacy one not
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot read this file: {e.strerror or e}") from None
        allow = getattr(torch.serialization, "safe_globals", None)     # torch >= 2.5
        try:
            with _load_lock, (allow(_harmless_globals()) if allow else contextlib.nullcontext()):
                return torch.load(self.path, map_location="cpu", weights_only=True, mmap=is_zip)
        except MemoryError:
            raise
        except Exception as e:  # noqa: BLE001 - torch raises anything at all on damaged files
            raise self._error(e) from None

    def _error(self, e: Exception) -> CheckpointError:
        """Why ``torch.load`` failed, in words: an empty, truncated or foreign file, or a pickle that
        needs code (which was refused before running it)."""
        message = str(e)
        damage = _damage(self.path, message, isinstance(e, EOFError))
        if damage and damage[0] in ("empty", "truncated"):
            return CheckpointError(f"{self.path}: {damage[1]}")
        unsafe = _UNSAFE.search(message) if isinstance(e, pickle.UnpicklingError) else None
        if unsafe:
            what = next(g for g in unsafe.groups() if g)
            return CheckpointError(
                f"{self.path}: refused to load: this pickle needs more than tensors and plain containers "
                f"(it references {what}), and running it could execute arbitrary code. It was not executed. "
                "Convert the checkpoint to .safetensors with a tool you trust.")
        if damage:
            return CheckpointError(f"{self.path}: {damage[1]}")
        first = next((line.strip() for line in message.splitlines() if line.strip()), type(e).__name__)
        return CheckpointError(f"{self.path}: not a valid checkpoint (corrupt or not a PyTorch file): {first}")

    def get(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        t = self._tensors[key]
        return t.to(dtype) if _needs_conversion(t.dtype, dtype) else t

    def close(self) -> None:
        self._tensors = {}


def _damage(path: Path, message: str, eof: bool) -> tuple[str, str] | None:
    """("empty" | "truncated" | "foreign", explanation) for a pickled checkpoint torch could not read,
    found by reading its structure (nothing is unpickled), or None if it looks whole."""
    size = path.stat().st_size
    if size == 0:
        return "empty", "cannot read this checkpoint: the file is empty (0 bytes)"
    truncated = ("truncated", f"cannot read this checkpoint: the file is truncated ({size} bytes): it ends "
                              "before the checkpoint does")
    with open(path, "rb") as f:
        head = f.read(4)
        if head == _ZIP_MAGIC:
            try:
                zipfile.ZipFile(f).close()
            except zipfile.BadZipFile:
                return "truncated", (f"cannot read this checkpoint: the file is truncated or corrupt ({size} "
                                     "bytes): it starts as a zip archive (PyTorch's format) but has no zip "
                                     "directory at its end")
            return None
        if head[:1] != b"\x80":                        # every pickle torch writes starts with PROTO
            return "foreign", f"not a valid checkpoint (corrupt or not a PyTorch file): it starts with {head!r}"
        # The legacy format: pickles of the magic number, the protocol version, system info, the
        # object, the storage keys; then the raw storages.
        f.seek(0)
        for i in range(5):
            try:
                ops = list(pickletools.genops(f))
            except ValueError as err:
                if f.tell() >= size and "unknown" not in str(err):
                    return truncated
                return "foreign", f"not a valid checkpoint (corrupt or not a PyTorch file): {err}"
            if i == 0 and not any(op.name == "LONG1" and arg == _LEGACY_MAGIC for op, arg, _ in ops):
                return "foreign", ("not a valid checkpoint (corrupt or not a PyTorch file): a pickle, but not "
                                   "one torch.save wrote")
    if eof or "unexpected EOF" in message:
        return truncated
    return None


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
