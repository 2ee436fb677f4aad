"""Run-time folders: where models are found and images are read and written.

Everything lives under one base directory — ``--base-dir`` on the CLI and the server,
else ``$NODEFLOW_HOME``, else the current directory::

    models/checkpoints  models/vae  models/loras  models/embeddings  ...
    input/   output/   temp/

Each folder can be moved on its own (``configure(output_dir=...)``, the environment
variables ``NODEFLOW_OUTPUT_DIR``, ``NODEFLOW_INPUT_DIR``, ``NODEFLOW_TEMP_DIR``, or a
``nodeflow.json`` in the base directory with ``{"output_dir": ..., "models": {"checkpoints":
["/more/checkpoints"]}}``: extra model folders are searched after the base one).

A file name from a workflow or a request never escapes its folder: absolute names and
``..`` are refused, and for the writable folders (input, output, temp) the resolved path,
symlinks followed, must stay inside the folder too (``confined_path``), and must name a
file, not the folder itself (``InvalidFileName``). Model folders may hold symlinks that
the user made on purpose (to a big disk, say); names there are checked lexically.
``Folders.clear_temp`` empties temp/ (the server does at start-up) without following links.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from nodeflow import context

log = logging.getLogger(__name__)

MODEL_EXTENSIONS = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".sft")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")

#: Model kinds and the folder names under models/.
MODEL_KINDS = ("checkpoints", "vae", "loras", "embeddings", "upscale_models", "clip", "unet",
               "diffusion_models", "controlnet", "clip_vision", "diffusers", "configs",
               "text_encoders", "t2i_adapter", "gligen", "style_models")

IO_KINDS = ("input", "output", "temp")


class UnsafePath(ValueError):
    """A file name that would leave its folder."""


class InvalidFileName(UnsafePath):
    """A name that cannot be a file in the folder: empty, ``.``, ``..``, a folder's own name
    (``sub/.``), a NUL byte, or a part longer than the file system allows (255 bytes)."""


#: The longest file or folder name (one path part, UTF-8 bytes) on common file systems.
MAX_NAME_BYTES = 255


@dataclass
class Folders:
    base: Path
    input: Path
    output: Path
    temp: Path
    models: dict[str, list[Path]] = field(default_factory=dict)

    @classmethod
    def from_base(cls, base: str | os.PathLike | None = None, *, input_dir=None, output_dir=None,
                  temp_dir=None, extra_models: dict[str, list[str]] | None = None) -> Folders:
        base_path = Path(base or os.environ.get("NODEFLOW_HOME") or os.getcwd()).expanduser().absolute()
        config = _read_config(base_path)
        extra = {**config.get("models", {}), **(extra_models or {})}

        def pick(given, env, key, default):
            chosen = given or os.environ.get(env) or config.get(key)
            return (base_path / chosen if chosen and not Path(chosen).is_absolute() else Path(chosen)) \
                if chosen else base_path / default

        models = {}
        for kind in MODEL_KINDS:
            paths = [base_path / "models" / kind]
            paths += [Path(p).expanduser() if Path(p).expanduser().is_absolute() else base_path / p
                      for p in extra.get(kind, [])]
            models[kind] = paths
        return cls(base_path, pick(input_dir, "NODEFLOW_INPUT_DIR", "input_dir", "input"),
                   pick(output_dir, "NODEFLOW_OUTPUT_DIR", "output_dir", "output"),
                   pick(temp_dir, "NODEFLOW_TEMP_DIR", "temp_dir", "temp"), models)

    # -- models -------------------------------------------------------------------------

    def model_dirs(self, kind: str) -> list[Path]:
        if kind not in self.models:
            raise KeyError(f"unknown model folder {kind!r}; known: {', '.join(self.models)}")
        return self.models[kind]

    def list_models(self, kind: str, extensions: tuple[str, ...] = MODEL_EXTENSIONS) -> list[str]:
        """Model files of a kind, as relative POSIX names (subfolders included), sorted."""
        names: set[str] = set()
        for root in self.model_dirs(kind):
            names.update(_walk(root, extensions))
        return sorted(names, key=str.lower)

    def list_models_by_dir(self, kind: str, extensions: tuple[str, ...] = MODEL_EXTENSIONS) -> list[tuple[str, int]]:
        """``(name, index)`` of each model file of a kind, ``index`` being the position in
        ``model_dirs(kind)`` of the folder it is found in first (as ``model_path`` finds it)."""
        seen: dict[str, int] = {}
        for index, root in enumerate(self.model_dirs(kind)):
            for name in _walk(root, extensions):
                seen.setdefault(name, index)
        return sorted(seen.items(), key=lambda item: item[0].lower())

    def model_path(self, kind: str, name: str) -> Path:
        """The file ``name`` in the first folder of ``kind`` that has it.
        Raises FileNotFoundError naming what exists."""
        rel = safe_relative(name)
        for root in self.model_dirs(kind):
            candidate = root / rel
            if candidate.is_file():
                return candidate
        available = self.list_models(kind)
        shown = ", ".join(available[:20]) + (" ..." if len(available) > 20 else "") if available else "none"
        raise FileNotFoundError(f"{kind[:-1] if kind.endswith('s') else kind} file {name!r} not found in "
                                f"{', '.join(str(d) for d in self.model_dirs(kind))}; available: {shown}")

    # -- input / output / temp ------------------------------------------------------------

    def io_dir(self, kind: str) -> Path:
        if kind not in IO_KINDS:
            raise UnsafePath(f"unknown folder type {kind!r}; expected one of {', '.join(IO_KINDS)}")
        return getattr(self, kind)

    def io_path(self, kind: str, name: str, subfolder: str = "") -> Path:
        """A file's path inside input/, output/ or temp/, resolved and confined (symlinks
        followed). ``name`` must name a file, never the folder itself (``"."``, ``"sub/."``):
        ``InvalidFileName`` then; ``UnsafePath`` for a name that leaves the folder."""
        return confined_path(self.io_dir(kind), name, subfolder, what=f"the {kind} folder")

    def list_images(self, kind: str = "input") -> list[str]:
        return sorted(_walk(self.io_dir(kind), IMAGE_EXTENSIONS), key=str.lower)

    def clear_temp(self, keep: tuple[str | os.PathLike, ...] = ()) -> int:
        """Delete what temp/ holds (ComfyUI does so at start-up); returns how many entries
        went. Symlinks are removed, never followed. Nothing happens when temp/ is itself a
        symlink, a shared folder (``/tmp``, the home folder, ...), or when it holds (or is)
        the base, input, output or a model folder, or any path in ``keep`` (e.g. the queue
        database): a misconfigured temp folder must not wipe anything else."""
        temp = Path(self.temp)
        if not temp.is_dir():
            return 0
        real = temp.resolve()
        shared = {Path("/"), Path("/tmp"), Path("/var/tmp"), Path.home(), Path(tempfile.gettempdir())}
        precious = [self.base, self.input, self.output, *keep, *(p for ps in self.models.values() for p in ps)]
        if temp.is_symlink() or real in {p.resolve() for p in shared} or any(
                Path(p).resolve() == real or real in Path(p).resolve().parents for p in precious):
            log.warning("not emptying the temp folder %s: it is a link, a shared folder, or holds other folders",
                        temp)
            return 0
        removed = 0
        for entry in os.scandir(real):
            try:
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path)
                else:
                    os.unlink(entry.path)
                removed += 1
            except OSError:
                pass  # in use or not ours: leave it
        return removed


def confined_path(root: Path, name: str, subfolder: str = "", what: str = "its folder") -> Path:
    """The file ``subfolder/name`` in ``root``, resolved (symlinks followed) and confined to
    it: ``UnsafePath`` for a name that leaves ``root``, ``InvalidFileName`` for one that does
    not name a file (``""``, ``"."``, ``"sub/."``, a part over 255 bytes)."""
    rel = safe_relative(subfolder, allow_empty=True) / safe_relative(name)
    check_file_name(name.replace("\\", "/").rsplit("/", 1)[-1])
    for part in rel.parts:
        _check_part_length(part)
    real_root = root.resolve()
    target = (root / rel).resolve()
    if real_root not in target.parents:
        if target == real_root:
            raise InvalidFileName(f"{name!r} names {what} itself, not a file")
        raise UnsafePath(f"{name!r} leaves {what}")
    return target


def check_file_name(name: str) -> str:
    """``name`` if it is a plain file name (one path part), else ``InvalidFileName``: empty,
    ``.``, ``..``, a path separator, a NUL byte or over 255 bytes are refused."""
    if not isinstance(name, str):
        raise InvalidFileName(f"a file name must be a string, not {type(name).__name__}")
    if name in ("", ".", ".."):
        raise InvalidFileName(f"{name!r} is not a file name" if name else "empty file name")
    if "/" in name or "\\" in name:
        raise InvalidFileName(f"{name!r} is not a plain file name (it holds a path separator)")
    if "\0" in name:
        raise InvalidFileName("NUL byte in file name")
    _check_part_length(name)
    return name


def _check_part_length(part: str) -> None:
    size = len(part.encode("utf-8", "surrogatepass"))
    if size > MAX_NAME_BYTES:
        raise InvalidFileName(f"the name {part[:40]!r}... is {size} bytes long; at most {MAX_NAME_BYTES} bytes "
                              "per file or folder name")


def safe_relative(name: str, allow_empty: bool = False) -> PurePosixPath:
    """A relative path without ``..``, absolute roots, drive letters or NUL bytes."""
    if not isinstance(name, str):
        raise UnsafePath(f"a file name must be a string, not {type(name).__name__}")
    if not name:
        if allow_empty:
            return PurePosixPath()
        raise UnsafePath("empty file name")
    if "\0" in name:
        raise UnsafePath("NUL byte in file name")
    text = name.replace("\\", "/")
    path = PurePosixPath(text)
    if path.is_absolute() or (len(text) > 1 and text[1] == ":") or any(p == ".." for p in path.parts):
        raise UnsafePath(f"{name!r} is not a plain relative file name")
    return path


def _walk(root: Path, extensions: tuple[str, ...]) -> list[str]:
    """Files under ``root`` with one of ``extensions``, as relative POSIX names. Links to
    folders are followed (a models folder often links to a big disk), each real folder once,
    so a link cycle cannot make the walk endless."""
    if not root.is_dir():
        return []
    found, seen = [], set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        try:
            st = os.stat(dirpath)
        except OSError:
            dirnames[:] = []
            continue
        if (st.st_dev, st.st_ino) in seen:
            dirnames[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for f in filenames:
            if f.lower().endswith(extensions) and not f.startswith("."):
                found.append(Path(dirpath, f).relative_to(root).as_posix())
    return found


CONFIG_KEYS = ("input_dir", "output_dir", "temp_dir", "models")


def _read_config(base: Path) -> dict:
    """``BASE/nodeflow.json``, checked: known keys only, folder names as strings, ``models``
    mapping known model kinds to a folder or a list of folders. Raises ``ValueError`` naming
    the file and what is wrong."""
    path = base / "nodeflow.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, like "
                         '{"output_dir": "/data/out", "models": {"checkpoints": ["/mnt/big"]}}')
    _check_known(path, "key", data, CONFIG_KEYS)
    for key in ("input_dir", "output_dir", "temp_dir"):
        if key in data and not (isinstance(data[key], str) and data[key]):
            raise ValueError(f"{path}: {key!r} must be a folder name (a string), got {json.dumps(data[key])}")
    models = data.get("models", {})
    if not isinstance(models, dict):
        raise ValueError(f"{path}: 'models' must be an object mapping a model kind to folders, "
                         f'like {{"checkpoints": ["/mnt/big/checkpoints"]}}; got {json.dumps(models)[:80]}')
    _check_known(path, "model kind", models, MODEL_KINDS)
    checked = {}
    for kind, dirs in models.items():
        if isinstance(dirs, str):
            dirs = [dirs]
        if not isinstance(dirs, list) or not all(isinstance(d, str) and d for d in dirs):
            raise ValueError(f"{path}: models.{kind} must be a folder or a list of folders (strings), "
                             f"got {json.dumps(dirs)[:80]}")
        checked[kind] = dirs
    return {**data, "models": checked}


def _check_known(path: Path, what: str, given: dict, known: tuple[str, ...]) -> None:
    for key in given:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f"; known: {', '.join(known)}"
            raise ValueError(f"{path}: unknown {what} {key!r}{hint}")


def configure(base_dir=None, **kw) -> Folders:
    """Set the folders of the default run context (the CLI and the server call this at start-up)."""
    made = Folders.from_base(base_dir, **kw)
    context.default().folders = made
    return made


def folders() -> Folders:
    """The folders of the current run context: the worker's that runs this node, or the
    default context's outside any run (configured from the environment on first use)."""
    return context.current().folders
