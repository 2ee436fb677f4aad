"""The output cache: node results kept across runs under content signatures.

A node's signature is a digest of its class, its literal inputs, the signatures of the
nodes feeding it (with the output index used) and its fingerprint hook's value: never its
id, so the same sub-graph is recognised in any workflow. Changing one literal changes the
signature of that node and of everything downstream, and nothing else.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class CacheEntry:
    values: tuple
    #: What an output node showed (replayed as is when it is cached).
    ui: dict | None = None


class OutputCache:
    """A bounded LRU map from signature to ``CacheEntry``. Thread-safe."""

    def __init__(self, max_entries: int = 256) -> None:
        if max_entries < 0:
            raise ValueError("max_entries must be >= 0")
        self.max_entries = max_entries
        self._entries: OrderedDict[bytes, CacheEntry] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: bytes) -> CacheEntry | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
            return entry

    def __contains__(self, key: bytes) -> bool:
        return key in self._entries

    def put(self, key: bytes, entry: CacheEntry) -> None:
        with self._lock:
            self._entries[key] = entry
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        """Drop every entry (e.g. to free memory, or after changing model files in place)."""
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


def signature(class_type: str, literals: list[tuple[str, Any]], links: list[tuple[str, bytes, int]],
              fingerprint: Any) -> bytes:
    """The content signature of one node. ``literals`` and ``links`` are sorted by input name."""
    h = hashlib.blake2b(digest_size=16)
    h.update(class_type.encode())
    h.update(b"\0")
    for name, value in literals:
        h.update(name.encode())
        h.update(b"=")
        h.update(_canonical(value).encode())
        h.update(b"\0")
    for name, upstream, index in links:
        h.update(name.encode())
        h.update(b"<")
        h.update(upstream)
        h.update(index.to_bytes(4, "little", signed=True))
    if fingerprint is not None:
        h.update(b"\1")
        h.update(_canonical(fingerprint).encode())
    return h.digest()


def _canonical(value: Any) -> str:
    """A text form that is equal for equal JSON-like values (dict order ignored) and differs
    between types that compare equal (1, 1.0, True)."""
    kind = type(value)
    if kind is str:
        return "s" + value
    if kind is int or kind is float or kind is bool or value is None:
        return kind.__name__[0] + repr(value)
    if kind is list or kind is tuple:
        return "[" + ",".join(_canonical(v) for v in value) + "]"
    if kind is dict:
        return "{" + ",".join(f"{_canonical(k)}:{_canonical(v)}" for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))) + "}"
    return kind.__name__ + ":" + repr(value)
