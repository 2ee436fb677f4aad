"""Which node types exist: built-ins from the ``nodes`` package, third-party packages
(Python entry points in the group ``nodeflow.nodes``) and ComfyUI class-name aliases.

An entry point may name a module (every ``Node`` subclass defined in it is registered),
a ``Node`` subclass, or a callable returning an iterable of them.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import logging
import pkgutil
import threading
from importlib.metadata import entry_points
from types import ModuleType
from typing import Any, Iterable

from nodeflow.node import Node

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "nodeflow.nodes"


class Registry:
    """Maps class names (ours and aliases) to node classes."""

    def __init__(self, nodes: Iterable[type[Node]] = ()) -> None:
        self._nodes: dict[str, type[Node]] = {}
        self._aliases: dict[str, str] = {}
        self.load_errors: dict[str, str] = {}
        for cls in nodes:
            self.register(cls)

    # -- registration -------------------------------------------------------------

    def register(self, cls: type[Node], aliases: Iterable[str] = ()) -> type[Node]:
        if not (isinstance(cls, type) and issubclass(cls, Node)):
            raise TypeError(f"{cls!r} is not a Node subclass")
        name = cls.type_name
        if name in self._nodes and self._nodes[name] is not cls:
            raise ValueError(f"node type {name!r} is already registered by {self._nodes[name].__module__}")
        self._nodes[name] = cls
        for alias in (*cls.aliases, *aliases):
            if alias != name:
                self._aliases[alias] = name
        return cls

    def register_module(self, module: ModuleType) -> int:
        found = [obj for obj in vars(module).values()
                 if inspect.isclass(obj) and issubclass(obj, Node) and obj is not Node
                 and obj.__module__ == module.__name__ and not inspect.isabstract(obj)
                 and obj.__dict__.get("run") is not None]
        for cls in found:
            self.register(cls)
        return len(found)

    def load_package(self, package: str) -> None:
        """Register the nodes of every module of a package (e.g. the built-in ``nodes``)."""
        pkg = importlib.import_module(package)
        self.register_module(pkg)
        for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
            if info.name.startswith("_"):
                continue
            self._load_guarded(f"{package}.{info.name}",
                               lambda n=info.name: self.register_module(importlib.import_module(f"{package}.{n}")))

    def load_entry_points(self) -> None:
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            self._load_guarded(f"entry point {ep.name}", lambda ep=ep: self._register_object(ep.load()))

    def _register_object(self, obj: Any) -> None:
        if isinstance(obj, ModuleType):
            self.register_module(obj)
        elif isinstance(obj, type):
            self.register(obj)
        elif callable(obj):
            for cls in obj():
                self.register(cls)
        else:
            raise TypeError(f"cannot register {obj!r}")

    def _load_guarded(self, what: str, load) -> None:
        # One broken node package must not take the others down: remember why and go on.
        try:
            load()
        except Exception as exc:  # noqa: BLE001
            self.load_errors[what] = f"{type(exc).__name__}: {exc}"
            log.warning("could not load nodes from %s: %s", what, exc)

    # -- lookup ---------------------------------------------------------------------

    def get(self, name: str) -> type[Node] | None:
        cls = self._nodes.get(name)
        if cls is None and name in self._aliases:
            cls = self._nodes.get(self._aliases[name])
        return cls

    def __contains__(self, name: str) -> bool:
        return self.get(name) is not None

    def names(self, include_aliases: bool = True) -> list[str]:
        names = list(self._nodes)
        if include_aliases:
            names += list(self._aliases)
        return sorted(names)

    def classes(self) -> list[type[Node]]:
        return [self._nodes[n] for n in sorted(self._nodes)]

    def suggest(self, name: str, n: int = 3) -> list[str]:
        """The closest known names, for 'did you mean' messages."""
        names = self.names()
        by_lower = {x.lower(): x for x in names}
        close = difflib.get_close_matches(name.lower(), list(by_lower), n=n, cutoff=0.6)
        return [by_lower[c] for c in close]

    # -- schemas ----------------------------------------------------------------------

    def object_info(self, name: str | None = None) -> dict[str, dict]:
        """Schemas in the shape of ComfyUI's ``/object_info`` (every name, aliases too)."""
        if name is not None:
            cls = self.get(name)
            return {name: node_info(cls, name)} if cls else {}
        info = {n: node_info(self._nodes[n], n) for n in sorted(self._nodes)}
        for alias, target in sorted(self._aliases.items()):
            info[alias] = node_info(self._nodes[target], alias)
        return info


def node_info(cls: type[Node], name: str) -> dict[str, Any]:
    """One node's schema in ComfyUI's ``/object_info`` shape."""
    return {
        "input": {
            "required": {k: v.object_info() for k, v in cls.inputs.items()},
            "optional": {k: v.object_info() for k, v in cls.optional.items()},
            "hidden": {k: v.kind for k, v in cls.hidden.items()},
        },
        "input_order": {"required": list(cls.inputs), "optional": list(cls.optional)},
        "output": [o.kind for o in cls.outputs],
        "output_is_list": [o.is_list for o in cls.outputs],
        "output_name": [o.name for o in cls.outputs],
        "output_tooltips": [o.tooltip for o in cls.outputs],
        "name": name,
        "display_name": cls.display_name if name == cls.type_name else name,
        "description": cls.description,
        "python_module": cls.__module__,
        "category": cls.category,
        "output_node": cls.output_node,
        "deprecated": cls.deprecated,
    }


_default: Registry | None = None
_default_lock = threading.Lock()


def default_registry() -> Registry:
    """The registry of the built-in nodes and installed node packages, loaded once."""
    global _default
    with _default_lock:
        if _default is None:
            reg = Registry()
            reg.load_package("nodes")
            reg.load_entry_points()
            _default = reg
        return _default
