"""The output cache: node results kept across runs under content signatures.

A node's signature is a digest of its class, its literal inputs, the signatures of the
nodes feeding it (with the output index used) and its fingerprint hook's value: never its
id, so the same sub-graph is recognised in any workflow. Changing one literal changes the
signature of that node and of everything downstream, and nothing else.
"""

from __future__ import annotations

import hashlib
import marshal
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class CacheEntry:
    values: tuple
    #: What an output node showed (replayed as is when it is cached).
    ui: dict | None = None


#: Enough that an identical rerun of a workflow of a few thousand nodes executes nothing.
DEFAULT_MAX_ENTRIES = 4096


class OutputCache:
    """A bounded LRU map from signature to ``CacheEntry``. Thread-safe.

    The bound is a number of entries, not of bytes. The default (4,096) lets an identical
    rerun of a workflow of a few thousand nodes execute nothing (each node is one entry, and
    a rerun needs the output nodes' entries, or failing those their inputs'). Most entries
    are small or share what is alive anyway: numbers, conditioning, latents, handles to
    models the model manager holds. Each IMAGE entry keeps its pixels, though (about 3 MB for
    a 512² image), so a long-lived process that makes many different images should pass a
    smaller ``max_entries`` or call ``clear()`` now and then; 0 turns caching off.
    """

    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
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

    def get_many(self, keys: Mapping[str, bytes]) -> dict[str, CacheEntry]:
        """The entries found for a map of names (node ids) to keys, under one lock."""
        found: dict[str, CacheEntry] = {}
        with self._lock:
            entries = self._entries
            for name, key in keys.items():
                entry = entries.get(key)
                if entry is not None:
                    entries.move_to_end(key)
                    found[name] = entry
        return found

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


#: Literal types written as they are; anything else goes through ``_canonical``.
_PLAIN = frozenset({str, int, float, bool, type(None), bytes})


def signature(class_type: str, literals: list[tuple[str, Any]], links: list[tuple[str, bytes, int]],
              fingerprint: Any, unique_id: str | None = None) -> bytes:
    """The content signature of one node. ``literals`` and ``links`` are sorted by input name.
    ``unique_id`` is the node's id, for the nodes that are given it (the UNIQUE_ID hidden
    input): their output may depend on it, so it must be part of their key."""
    parts: list[Any] = [class_type]
    for name, value in literals:
        parts.append(name)
        # A list or dict literal (or an object) is marked as a tuple of two strings, which
        # no plain literal and no link (a tuple of bytes and int) can be.
        parts.append(value if type(value) in _PLAIN else ("~", _canonical(value)))
    for name, upstream, index in links:
        parts.append(name)
        parts.append((upstream, index))
    extra = (None if fingerprint is None else _canonical(fingerprint), unique_id)
    # marshal is fast, exact (1, 1.0 and True, or 0.0 and -0.0, differ) and, at version 2,
    # writes no back-references, so equal values give equal bytes whatever their identity.
    return hashlib.blake2b(marshal.dumps((tuple(parts), extra), 2), digest_size=16).digest()


def _canonical(value: Any) -> str:
    """A text form that is equal for equal JSON-like values (dict order ignored) and differs
    between types that compare equal (1, 1.0, True)."""
    kind = type(value)
    if kind is str:
        return "s" + repr(value)  # quoted and escaped: no value can mimic a separator
    if kind is int or kind is float or kind is bool or value is None:
        return kind.__name__[0] + repr(value)
    if kind is list or kind is tuple:
        return "[" + ",".join(_canonical(v) for v in value) + "]"
    if kind is dict:
        items = sorted(value.items(), key=lambda kv: str(kv[0]))
        return "{" + ",".join(f"{_canonical(k)}:{_canonical(v)}" for k, v in items) + "}"
    return kind.__name__ + ":" + repr(value)
