"""Which node types exist: built-ins from the ``nodes`` package, third-party packages
(Python entry points in the group ``nodeflow.nodes``) and ComfyUI class-name aliases.

A ComfyUI class name must offer exactly ComfyUI's widgets (editor files store widget values
by position). Where a native node's schema is ComfyUI's, the ComfyUI name is a plain alias
(``aliases = ("KSampler",)``). Where it is not (nodeflow adds or orders inputs its own way),
the ComfyUI name gets its own class: a subclass with ComfyUI's schema and ``type_name`` set
to the ComfyUI name. A registered class always wins over an alias of the same name, in
lookups and in ``/object_info``, and its cache key carries its own ``type_name``.

An entry point may name a module or package (the node classes it offers are registered:
see ``node_classes``), a ``Node`` subclass, or a callable returning an iterable of them. One
that yields no node at all is reported in ``load_errors``, as is one that fails to load.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import inspect
import logging
import os
import pkgutil
import sys
import threading
from collections.abc import Iterable, Sequence
from importlib.metadata import entry_points
from pathlib import Path
from types import ModuleType
from typing import Any

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
        """Register the node classes ``module`` offers (``node_classes``); returns how many."""
        found = node_classes(module)
        for cls in found:
            self.register(cls)
        return len(found)

    def load_package(self, package: str) -> None:
        """Register the nodes of every module of a package (e.g. the built-in ``nodes``)."""
        pkg = importlib.import_module(package)
        before = len(self._nodes)
        self.register_module(pkg)
        for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
            if info.name.startswith("_"):
                continue
            self._load_guarded(f"{package}.{info.name}",
                               lambda n=info.name: self.register_module(importlib.import_module(f"{package}.{n}")))
        if len(self._nodes) == before and not any(k.startswith(f"{package}.") for k in self.load_errors):
            self._warn(package, f"no node classes found in package {package}")

    def load_entry_points(self) -> None:
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            self._load_guarded(f"entry point {ep.name}", lambda ep=ep: self._register_entry_point(ep))

    def _register_entry_point(self, ep: Any) -> None:
        if not self._register_object(ep.load()):
            self._warn(f"entry point {ep.name}",
                       f"{ep.value} has no node classes (a node class subclasses nodeflow.Node, has a run "
                       "method and declares inputs or outputs; see Registry docs)")

    def _register_object(self, obj: Any) -> int:
        if isinstance(obj, ModuleType):
            return self.register_module(obj)
        if isinstance(obj, type):
            self.register(obj)
            return 1
        if callable(obj):
            count = 0
            for cls in obj():
                self.register(cls)
                count += 1
            return count
        raise TypeError(f"cannot register {obj!r}")

    def _load_guarded(self, what: str, load) -> None:
        # One broken node package must not take the others down: remember why and go on.
        try:
            load()
        except Exception as exc:  # noqa: BLE001
            self._warn(what, f"{type(exc).__name__}: {exc}")

    def _warn(self, what: str, why: str) -> None:
        self.load_errors[what] = why
        log.warning("could not load nodes from %s: %s", what, why)

    # -- lookup ---------------------------------------------------------------------

    def get(self, name: str) -> type[Node] | None:
        cls = self._nodes.get(name)
        if cls is None and name in self._aliases:
            cls = self._nodes.get(self._aliases[name])
        return cls

    def __contains__(self, name: str) -> bool:
        return self.get(name) is not None

    def names(self, include_aliases: bool = True) -> list[str]:
        names = set(self._nodes)
        if include_aliases:
            names |= set(self._aliases)
        return sorted(names)

    def classes(self) -> list[type[Node]]:
        return [self._nodes[n] for n in sorted(self._nodes)]

    def suggest(self, name: str, n: int = 3) -> list[str]:
        """The closest known names, for 'did you mean' messages."""
        if len(name) > 200:
            return []  # no type name is that long, and matching costs its length squared
        names = self.names()
        by_lower = {x.lower(): x for x in names}
        close = difflib.get_close_matches(name.lower(), list(by_lower), n=n, cutoff=0.6)
        return [by_lower[c] for c in close]

    # -- schemas ----------------------------------------------------------------------

    def object_info(self, name: str | None = None) -> dict[str, dict]:
        """Schemas in the shape of ComfyUI's ``/object_info`` (every name, aliases too), less
        the editor-only nodes (notes, reroutes): ComfyUI's frontend brings its own, and a
        backend definition would replace them."""
        if name is not None:
            cls = self.get(name)  # a class registered under the name before an alias
            return {name: node_info(cls, name)} if cls and not cls.editor_only else {}
        info = {n: node_info(cls, n) for n, cls in sorted(self._nodes.items()) if not cls.editor_only}
        for alias, target in sorted(self._aliases.items()):
            # A class registered under the alias's name (its own schema) shadows the alias.
            if alias not in self._nodes and not self._nodes[target].editor_only:
                info[alias] = node_info(self._nodes[target], alias)
        return info


def node_classes(module: ModuleType) -> list[type[Node]]:
    """The node types a module offers: each concrete ``Node`` subclass in its namespace,
    whether defined there or imported from elsewhere in the same top-level package (so a
    package's ``__init__`` may re-export the nodes of its modules), once each, in order.

    Concrete means: it has a ``run`` (its own or a base class's, not ``Node``'s), declares
    inputs or outputs or is an output node, is not an abstract class (``abc``), and does not
    set ``abstract = True`` in its own body, which is how a shared base class stays out.
    Classes imported from other packages (``from nodeflow import Node``, another package's
    nodes) are left to their own package."""
    top = module.__name__.partition(".")[0]
    found: list[type[Node]] = []
    for obj in list(vars(module).values()):
        if not (inspect.isclass(obj) and issubclass(obj, Node)) or obj in found:
            continue
        if str(getattr(obj, "__module__", "")).partition(".")[0] == top and is_concrete(obj):
            found.append(obj)
    return found


def is_concrete(cls: type[Node]) -> bool:
    """Whether a ``Node`` subclass is a node type that can be registered (see ``node_classes``)."""
    return (cls is not Node and cls.run is not Node.run and not inspect.isabstract(cls)
            and not cls.__dict__.get("abstract", False)
            and bool(cls.inputs or cls.optional or cls.outputs or cls.output_node))


def display_name(cls: type[Node], name: str) -> str:
    """What the editor shows for node type ``name`` (``cls``'s own name or one of its aliases)."""
    return cls.display_name if name == cls.type_name else cls.alias_display_names.get(name, name)


def node_info(cls: type[Node], name: str) -> dict[str, Any]:
    """One node's schema in ComfyUI's ``/object_info`` shape."""
    return {
        "input": {
            "required": {k: v.object_info() for k, v in cls.inputs.items()},
            "optional": {k: v.object_info() for k, v in cls.optional.items()},
            "hidden": {k: v.kind for k, v in cls.hidden.items()},
        },
        "input_order": {"required": list(cls.inputs), "optional": list(cls.optional), "hidden": list(cls.hidden)},
        # ComfyUI's name for INPUT_IS_LIST in /object_info.
        "is_input_list": cls.input_is_list,
        "output": [o.kind for o in cls.outputs],
        "output_is_list": [o.is_list for o in cls.outputs],
        "output_name": [o.name for o in cls.outputs],
        "output_tooltips": [o.tooltip for o in cls.outputs],
        "name": name,
        "display_name": display_name(cls, name),
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


def build_registry(extra: Sequence[str] = (), builtin: bool = True) -> Registry:
    """The built-in nodes and installed node packages (unless ``builtin`` is False), plus
    ``extra`` modules or ``.py`` files of nodes (for node packages in development): what the
    server and each of its workers run. ``ValueError`` names an extra that cannot be loaded."""
    reg = Registry()
    if builtin:
        try:
            reg.load_package("nodes")
        except Exception as exc:  # noqa: BLE001 - e.g. no torch: serve what can be served
            reg.load_errors["nodes"] = f"{type(exc).__name__}: {exc}"
            log.warning("could not load the built-in nodes: %s", exc)
        reg.load_entry_points()
    for spec in extra:
        reg.register_module(_import_nodes(spec))
    return reg


def _import_nodes(spec: str) -> ModuleType:
    if spec.endswith(".py") or os.sep in spec or "/" in spec:
        path = Path(spec).resolve()
        if not path.is_file():
            raise ValueError(f"--extra-nodes {spec}: no such file")
        name = "nodeflow_extra_" + path.stem
        loaded = sys.modules.get(name)
        if loaded is not None and Path(getattr(loaded, "__file__", "") or "").resolve() == path:
            return loaded
        module_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module
        try:
            module_spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
        return module
    try:
        return importlib.import_module(spec)
    except ImportError as exc:
        raise ValueError(f"--extra-nodes {spec}: {exc}") from exc
