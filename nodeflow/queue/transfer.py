"""Files between the server and workers that share no file system with it.

- **Inputs go with the prompt.** ``input_files`` finds the files a prompt names in the
  server's input/, output/ or temp/ folder — any string literal that is an existing file name
  there (``"cat.png"``, ``"sub/cat.png"``, ComfyUI's ``"cat.png [output]"``), whatever node
  reads it — and reads them, skipping those the worker already has (same size and mtime).
  ``store_inputs`` writes them into the worker's own folders with the server's mtime, so
  the loaders' cache fingerprints match across prompts.
- **Outputs come back as bytes.** On the worker, ``OutputCollector`` notices the files each
  node wrote in output/ or temp/ (the executor's ``after_node`` hook) and hands them over
  before the node's ``executed`` event; at the end of the prompt it empties them (a file of
  zero bytes keeps its name taken, so the worker never uses a name twice). On the server,
  ``OutputLander`` writes them into the server's folders, under a free name (the next
  counter of ``prefix_00001_.png``) when another worker took that one meanwhile, and rewrites
  the image entries of the events and the history to the names it used, for cached replays
  too.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from nodeflow.folders import IO_KINDS, Folders, UnsafePath

log = logging.getLogger(__name__)

#: ComfyUI's clients may name a file in another folder: ``"x.png [output]"``.
_ANNOTATED = re.compile(r"^(?P<name>.*) \[(?P<kind>input|output|temp)\]$")
#: SaveImage's numbered names: ``prefix_00001_.png``.
_COUNTED = re.compile(r"^(?P<prefix>.*_)(?P<counter>\d+)(?P<suffix>_\.[^./]+)$")
#: Inputs over this size are not sent (a worker reports the file as missing).
MAX_INPUT_BYTES = 1 << 30
#: Names remembered per server for cached replays of remote outputs.
MAX_REMEMBERED = 100_000


@dataclass(frozen=True)
class FileRecord:
    """A file travelling between the server and a worker: ``name`` is relative to its folder."""

    kind: str        # "input" | "output" | "temp"
    name: str        # POSIX, subfolders allowed
    data: bytes
    mtime_ns: int = 0


# -- inputs: server -> worker --------------------------------------------------------------------


def input_files(prompt: dict, folders: Folders, have: dict[tuple[str, str], tuple[int, int]] | None = None
                ) -> list[FileRecord]:
    """The files in ``folders``' input/output/temp that ``prompt``'s string literals name,
    except those in ``have`` with the same ``(size, mtime_ns)``."""
    have = have or {}
    found: dict[tuple[str, str], FileRecord] = {}
    for node in prompt.values():
        inputs = node.get("inputs") if isinstance(node, dict) else None
        if not isinstance(inputs, dict):
            continue
        for value in inputs.values():
            if not isinstance(value, str) or not value or len(value) > 1024:
                continue
            match = _ANNOTATED.match(value)
            kind, name = (match["kind"], match["name"]) if match else ("input", value)
            if (kind, name) in found:
                continue
            try:
                path = folders.io_path(kind, name)
                st = path.stat()
            except (UnsafePath, OSError, ValueError):
                continue
            if not path.is_file() or st.st_size > MAX_INPUT_BYTES or have.get((kind, name)) == (st.st_size,
                                                                                              st.st_mtime_ns):
                continue
            try:
                found[(kind, name)] = FileRecord(kind, name, path.read_bytes(), st.st_mtime_ns)
            except OSError as exc:
                log.warning("cannot send %s/%s to a worker: %s", kind, name, exc)
    return list(found.values())


def store_inputs(folders: Folders, records: list[FileRecord]) -> list[Path]:
    """Write files from the server into the worker's folders (confined to them), with the
    server's mtime; returns their paths."""
    written = []
    for rec in records:
        if rec.kind not in IO_KINDS:
            continue
        path = folders.io_path(rec.kind, rec.name)
        path.parent.mkdir(parents=True, exist_ok=True)
        part = path.with_name(f".{path.name}.part")
        part.write_bytes(rec.data)
        os.replace(part, path)
        if rec.mtime_ns:
            os.utime(path, ns=(rec.mtime_ns, rec.mtime_ns))
        written.append(path)
    return written


# -- outputs: worker -> server -------------------------------------------------------------------


class OutputCollector:
    """On a worker: the files nodes write in its output/ and temp/ folders."""

    def __init__(self, folders: Folders) -> None:
        self.folders = folders
        self._seen: dict[Path, tuple[int, int]] = {}    # path -> (size, mtime_ns) as last seen
        self._sent: list[Path] = []                     # handed over in this prompt: emptied at its end

    def know(self, paths: list[Path]) -> None:
        """Files that are not outputs (inputs the server sent)."""
        for path in paths:
            st = path.stat()
            self._seen[path] = (st.st_size, st.st_mtime_ns)

    def collect(self) -> list[FileRecord]:
        """The files written or changed since the last call."""
        records = []
        for kind in ("output", "temp"):
            root = self.folders.io_dir(kind)
            if not root.is_dir():
                continue
            for dirpath, dirnames, filenames in os.walk(root):
                dirnames[:] = [d for d in dirnames if not d.startswith(".")]
                for filename in filenames:
                    path = Path(dirpath) / filename
                    if filename.startswith("."):
                        continue
                    try:
                        st = path.stat()
                    except OSError:
                        continue
                    if st.st_size == 0 or self._seen.get(path) == (st.st_size, st.st_mtime_ns):
                        continue
                    self._seen[path] = (st.st_size, st.st_mtime_ns)
                    name = path.relative_to(root).as_posix()
                    records.append(FileRecord(kind, name, path.read_bytes(), st.st_mtime_ns))
                    self._sent.append(path)
        return records

    def release(self) -> None:
        """At the end of a prompt: empty the files handed over (their names stay taken)."""
        for path in self._sent:
            try:
                with open(path, "wb"):
                    pass
                st = path.stat()
                self._seen[path] = (st.st_size, st.st_mtime_ns)
            except OSError:
                self._seen.pop(path, None)
        self._sent.clear()


class OutputLander:
    """On the server: files from workers into its folders, and the names they got there."""

    def __init__(self, folders: Folders) -> None:
        self.folders = folders
        self._names: OrderedDict[tuple[str, str, str], str] = OrderedDict()  # (worker, kind, name) -> name
        self._lock = threading.Lock()

    def land(self, worker: str, records: list[FileRecord]) -> None:
        for rec in records:
            if rec.kind not in ("output", "temp"):
                continue
            try:
                final = _write_free(self.folders, rec.kind, rec.name, rec.data)
            except (OSError, UnsafePath) as exc:
                log.error("cannot save %s/%s from worker %s: %s", rec.kind, rec.name, worker, exc)
                continue
            with self._lock:
                self._names[(worker, rec.kind, rec.name)] = final
                while len(self._names) > MAX_REMEMBERED:
                    self._names.popitem(last=False)

    def rewrite(self, worker: str, ui: Any) -> Any:
        """``ui`` (a node's ``{"images": [{"filename", "subfolder", "type"}], ...}``) with the
        names files from ``worker`` got here; ``ui`` itself when nothing changes."""
        if not isinstance(ui, dict):
            return ui
        changed = False
        out: dict[str, Any] = {}
        for key, items in ui.items():
            if isinstance(items, list):
                new_items = [self._entry(worker, item) for item in items]
                changed = changed or any(a is not b for a, b in zip(items, new_items))
                out[key] = new_items
            else:
                out[key] = items
        return out if changed else ui

    def _entry(self, worker: str, item: Any) -> Any:
        if not (isinstance(item, dict) and isinstance(item.get("filename"), str)
                and item.get("type") in ("output", "temp")):
            return item
        sub = item.get("subfolder") or ""
        name = str(PurePosixPath(sub) / item["filename"]) if sub else item["filename"]
        with self._lock:
            final = self._names.get((worker, item["type"], name))
            if final is not None:
                self._names.move_to_end((worker, item["type"], name))
        if final is None or final == name:
            return item
        path = PurePosixPath(final)
        return {**item, "filename": path.name, "subfolder": "" if str(path.parent) == "." else str(path.parent)}


def _write_free(folders: Folders, kind: str, name: str, data: bytes) -> str:
    """Write ``data`` as ``name`` in the ``kind`` folder, or under the next free name (never
    overwriting); returns the name used."""
    target = folders.io_path(kind, name)
    target.parent.mkdir(parents=True, exist_ok=True)
    candidate = target
    for attempt in range(10_000):
        try:
            with open(candidate, "xb") as f:
                f.write(data)
            return candidate.relative_to(folders.io_dir(kind).resolve()).as_posix()
        except FileExistsError:
            candidate = target.with_name(_next_name(target.parent, target.name, attempt))
    raise OSError(f"no free name for {name!r} in the {kind} folder")


def _next_name(folder: Path, name: str, attempt: int) -> str:
    """A name after ``name`` that may be free: the next counter after the highest one there
    (``prefix_00007_.png``), else ``stem_1.ext``, ``stem_2.ext``, …"""
    match = _COUNTED.match(name)
    if match:
        prefix, width = match["prefix"], len(match["counter"])
        pattern = re.compile(re.escape(prefix) + r"(\d+)" + re.escape(match["suffix"]) + "$")
        highest = max((int(m.group(1)) for entry in os.listdir(folder) if (m := pattern.match(entry))), default=0)
        return f"{prefix}{highest + 1 + attempt:0{width}d}{match['suffix']}"
    stem, dot, ext = name.rpartition(".")
    return f"{stem}_{attempt + 1}.{ext}" if dot else f"{name}_{attempt + 1}"
