"""The node definition API.

A node type is a small class::

    class Add(Node):
        '''Adds two integers.'''
        category = "math"
        inputs = {"a": Int(default=0), "b": Int(default=0, min=0, max=100)}
        outputs = [Output("INT", "sum")]

        def run(self, a: int, b: int):
            return (a + b,)

``run`` receives every required input and the optional ones that were given, by name,
and returns a tuple with one value per output (a bare value is accepted when there is one
output). An output node may return ``Result(*values, ui={...})``: the ``ui`` part is what
clients see (e.g. ``{"images": [{"filename", "subfolder", "type"}]}``).

While running, ``self.context`` reports progress and checks for interruption; nodes keep
no other state between runs.

Lists (ComfyUI's ``OUTPUT_IS_LIST``/``INPUT_IS_LIST``, see ``nodeflow.listexec``): an output
declared ``Output(..., is_list=True)`` takes a list of values from ``run``; a node fed such a
list runs once per element (the outputs of the calls are collected into lists), unless it
sets ``input_is_list = True``, when it runs once and gets every input as a list.

Lazy inputs (ComfyUI's ``lazy``): an input declared ``lazy=True`` is evaluated only when the
node asks for it. Before ``run``, the engine calls ``check_lazy_status`` with what it has: the
evaluated inputs, ``None`` for each linked lazy input not evaluated yet; an input that is not
connected is left out, as for ``run``. It returns the names of the lazy inputs it needs; the
engine runs what feeds them and asks again, until it needs nothing more. What feeds a lazy
input that is never asked for does not run::

    class Switch(Node):
        inputs = {"switch": Bool()}
        optional = {"on_false": Socket("*", lazy=True), "on_true": Socket("*", lazy=True)}
        outputs = [Output("*", "output")]

        def check_lazy_status(self, switch, on_false=MISSING, on_true=MISSING):
            wanted = "on_true" if switch else "on_false"
            return [wanted] if {"on_true": on_true, "on_false": on_false}[wanted] is None else []
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from nodeflow import context
from nodeflow.spec import Hidden, InputSpec, Output

if TYPE_CHECKING:
    from nodeflow.context import RunContext
    from nodeflow.folders import Folders


class Interrupted(Exception):
    """Raised inside a run when the user asked to stop it."""


class Context(Protocol):
    """What a running node may ask of the engine."""

    prompt_id: str
    node_id: str
    #: The run context of the worker running the node: its folders, device and precision.
    run: RunContext

    @property
    def folders(self) -> Folders:
        """The worker's folders (models, input, output, temp)."""

    def progress(self, value: int, total: int, preview: Any = None) -> None:
        """Report ``value`` of ``total`` steps done (and optionally a preview image);
        raises ``Interrupted`` if the run was interrupted."""

    def check_interrupted(self) -> None:
        """Raise ``Interrupted`` if the run was interrupted."""


class NullContext:
    """The context of a node run outside any executor (direct calls, unit tests)."""

    prompt_id = ""
    node_id = ""

    @property
    def run(self) -> RunContext:
        return context.current()

    @property
    def folders(self) -> Folders:
        return context.current().folders

    def progress(self, value: int, total: int, preview: Any = None) -> None:
        pass

    def check_interrupted(self) -> None:
        pass


class Result:
    """Outputs of a node plus what its UI should show (output nodes)."""

    __slots__ = ("ui", "values")

    def __init__(self, *values: Any, ui: Mapping[str, Any] | None = None) -> None:
        self.values = values
        self.ui = dict(ui) if ui else None


class Node:
    """Base class of every node type. Subclasses set the class attributes below."""

    #: The class name used in workflows; defaults to the Python class name.
    type_name: ClassVar[str] = ""
    display_name: ClassVar[str] = ""
    category: ClassVar[str] = ""
    #: Defaults to the class docstring.
    description: ClassVar[str] = ""
    inputs: ClassVar[dict[str, InputSpec]] = {}
    optional: ClassVar[dict[str, InputSpec]] = {}
    hidden: ClassVar[dict[str, Hidden]] = {}
    outputs: ClassVar[list[Output]] = []
    #: Output nodes are the roots of execution: only their ancestors run.
    output_node: ClassVar[bool] = False
    #: Other class names this node answers to (ComfyUI's names).
    aliases: ClassVar[tuple[str, ...]] = ()
    #: The display name shown for an alias in ``/object_info`` (ComfyUI's, e.g.
    #: ``{"CheckpointLoaderSimple": "Load Checkpoint"}``); the alias itself when not given.
    alias_display_names: ClassVar[dict[str, str]] = {}
    #: Editor-only nodes (notes, reroutes) are known to the UI-format converter and accepted in
    #: workflows, but left out of ``/object_info``: ComfyUI's frontend has its own.
    editor_only: ClassVar[bool] = False
    deprecated: ClassVar[bool] = False
    #: Inputs that name a model file, with the model folder it is in (``{"ckpt_name":
    #: "checkpoints"}``). With several workers, a prompt goes to one that already holds its
    #: models, and ``/api/workers`` lists what each holds.
    model_inputs: ClassVar[dict[str, str]] = {}
    #: ComfyUI's ``INPUT_IS_LIST``: the node runs once with every input as a list (a single
    #: value as a one-element list; hidden inputs stay plain), instead of once per element of
    #: the lists it is fed.
    input_is_list: ClassVar[bool] = False
    #: ComfyUI's ``accept_all_inputs``: literal inputs the node does not declare (widgets the
    #: editor adds by itself) are passed to ``run`` too, unchecked; ``run`` takes ``**kwargs``.
    accept_all_inputs: ClassVar[bool] = False
    #: Set ``abstract = True`` in a shared base class's own body to keep it out of the
    #: registry (its subclasses are not affected; see ``nodeflow.registry.node_classes``).
    abstract: ClassVar[bool] = False

    context: Context

    def __init__(self, context: Context | None = None) -> None:
        self.context = context or NullContext()

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        if "type_name" not in cls.__dict__:
            cls.type_name = cls.__name__
        if not cls.__dict__.get("description"):
            cls.description = (cls.__doc__ or "").strip()
        if not cls.__dict__.get("display_name"):
            cls.display_name = cls.type_name
        _check_declaration(cls)

    def run(self, **inputs: Any) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__}.run")

    def check_lazy_status(self, **inputs: Any) -> list[str] | None:
        """The lazy inputs this node needs, given what it has (see the module docs): called
        before each attempt to run, with ``run``'s inputs (hidden ones left out), ``None`` for
        a linked lazy input not evaluated yet. Names of inputs already evaluated or given as
        literals are ignored; a name that is no linked input of the node fails it. Called per
        list element, as ``run`` (the names are gathered over the calls)."""
        return None

    @classmethod
    def fingerprint(cls, **literals: Any) -> Any:
        """Extra cache-key material computed before each run from the literal inputs
        (e.g. a file's mtime and size). Return a new value to force a re-run."""
        return None

    @classmethod
    def validate_inputs(cls, **literals: Any) -> list[str] | None:
        """Checks across inputs that the specs cannot express, run at validation, before
        anything runs. Return error messages (a list, or one string), keyed implicitly to
        the node; ``None``, ``True`` or an empty list when valid.

        It is called only when the node's inputs passed their own checks, and receives only
        literal values, of the inputs it names as parameters (every literal when it takes
        ``**kwargs``), as ComfyUI's ``VALIDATE_INPUTS`` does. An input fed by a link is
        known only at run time and is not passed, nor is an optional input left out: give
        such parameters a default (``low=None``) to be called anyway. When a parameter
        without a default has no literal, the hook is not called (``run`` sees the value).
        An exception raised here is reported as the node's validation error."""
        return None

    @classmethod
    def file_pixels(cls, **inputs: Any) -> tuple[int, int, int] | None:
        """The pixels this node will decode from the files its inputs name, as ``(frames,
        height, width)`` read from the files' headers only (None: it reads none, or cannot
        tell). The server's ``--max-pixels`` is checked against it before the node runs, so
        that a small file that decodes to a huge picture is refused without decoding it."""
        return None

    @classmethod
    def all_inputs(cls) -> dict[str, tuple[InputSpec, bool]]:
        """Every non-hidden input: name -> (spec, required)."""
        out = {name: (spec, True) for name, spec in cls.inputs.items()}
        out.update({name: (spec, False) for name, spec in cls.optional.items()})
        return out


class NodeDeclarationError(TypeError):
    """A node class whose declarations and ``run`` disagree (raised when the class is defined)."""


def _check_declaration(cls: type[Node]) -> None:
    """``run`` must take every declared input by name (or ``**kwargs``), optional ones with a
    default (they may be left out), and nothing else without a default;
    ``model_inputs`` must name declared inputs."""
    where = f"node {cls.__module__}.{cls.__qualname__}"
    declared = {**cls.inputs, **cls.optional, **cls.hidden}
    for name in cls.model_inputs:
        if name not in declared:
            raise NodeDeclarationError(f"{where}: model_inputs names {name!r}, which is not one of its inputs")
    if cls.run is Node.run:
        return
    params = list(inspect.signature(cls.run).parameters.values())[1:]  # after self
    by_name = {p.name: p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params)
    for group, names in (("input", cls.inputs), ("optional input", cls.optional), ("hidden input", cls.hidden)):
        for name in names:
            param = by_name.get(name)
            if param is None and not takes_any:
                raise NodeDeclarationError(f"{where}: run() has no parameter for its {group} {name!r}")
            if param is not None and group == "optional input" and param.default is param.empty:
                raise NodeDeclarationError(f"{where}: run() parameter {name!r} needs a default: the {group} "
                                           "may be left out")
    for param in params:
        if param.kind is param.POSITIONAL_ONLY or (param.name not in declared and param.default is param.empty
                                                    and param.kind in (param.POSITIONAL_OR_KEYWORD,
                                                                       param.KEYWORD_ONLY)):
            raise NodeDeclarationError(f"{where}: run() parameter {param.name!r} is not a declared input")
