"""The run context: the folders, device and precision a worker runs nodes with.

A worker — the one in-process worker of ``nodeflow run`` and of the server, one of several
in-process workers (one per GPU), or a Ray actor on another machine — runs nodes with its own

- ``folders``: where models are found and images are read and written;
- ``device`` and ``precision``: ``"cuda:1"``, ``"fp16"``, … (None: chosen automatically);
- ``compile`` and ``cuda_graphs``: the fast model path (``--compile``: the torch.compile backend
  the UNet and the VAE decoder are compiled with, None: off; ``--cuda-graphs``: UNet steps of
  fixed shapes replayed as CUDA graphs); the compiled graphs themselves are per-worker state;
- per-worker state that the model stack keeps (``state(key, make)``: e.g. the manager that
  knows which models sit on this worker's GPU), and the executors made for it (each with its
  own output cache).

The executor activates its context for the length of a run, so everything below a node —
``folders()``, ``devices.get_device()``, the model manager — reads *this worker's* settings
and never another's, even with several workers in one process (each run keeps its context in
a ``contextvars.ContextVar``, which threads do not share). Outside any run, ``current()`` is
the process's default context, which the CLI and the server configure at start-up
(``nodeflow.folders.configure``, ``nodeflow.configure_devices``).

Nothing here imports torch.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from nodeflow.executor import Executor
    from nodeflow.folders import Folders
    from nodeflow.registry import Registry

T = TypeVar("T")


class RunContext:
    """Where one worker runs nodes. Contexts share nothing mutable with each other."""

    def __init__(self, folders: Folders | None = None, *, device: str | None = None, precision: str | None = None,
                 compile: str | None = None, cuda_graphs: bool = False, name: str = "local") -> None:
        self._folders = folders          # None: made from the environment on first use
        self.device = device             # "cuda", "cuda:1", "mps", "cpu"; None: the best available
        self.precision = precision       # "fp32", "fp16", "bf16"; None: fp16 on GPUs, fp32 on the CPU
        self.compile = compile           # torch.compile backend of the model path ("inductor"); None: eager
        self.cuda_graphs = cuda_graphs   # replay UNet steps of fixed shapes as CUDA graphs
        self.name = name                 # the worker's id, for logs and errors
        self._state: dict[str, Any] = {}
        self._lock = threading.RLock()

    def __repr__(self) -> str:
        speed = f", compile={self.compile!r}" if self.compile else ""
        speed += ", cuda_graphs=True" if self.cuda_graphs else ""
        return f"RunContext({self.name!r}, device={self.device!r}, precision={self.precision!r}{speed})"

    @property
    def folders(self) -> Folders:
        if self._folders is None:
            from nodeflow.folders import Folders

            with self._lock:
                if self._folders is None:
                    self._folders = Folders.from_base()
        return self._folders

    @folders.setter
    def folders(self, value: Folders) -> None:
        self._folders = value

    def state(self, key: str, make: Callable[[], T]) -> T:
        """This context's own instance of something (made by ``make()`` on first use)."""
        value = self._state.get(key)
        if value is None:
            with self._lock:
                value = self._state.get(key)
                if value is None:
                    value = self._state[key] = make()
        return value

    def peek(self, key: str) -> Any:
        """This context's instance of something, if it made one (else None)."""
        return self._state.get(key)

    def executor(self, registry: Registry) -> Executor:
        """The executor this context runs ``registry``'s workflows on (made on first use, kept
        as long as the registry lives): ``nodeflow.run`` calls share it, and its cache."""
        with self._lock:
            # Kept on the registry: a registry -> executor -> registry cycle that the garbage
            # collector frees with the registry (a mapping here would keep it alive).
            executors = registry.__dict__.setdefault("_executors", {})
            executor = executors.get(self)
            if executor is None:
                from nodeflow.executor import Executor

                executor = executors[self] = Executor(registry, context=self)
            return executor


_default = RunContext()
_active: contextvars.ContextVar[RunContext | None] = contextvars.ContextVar("nodeflow_run_context", default=None)


def default() -> RunContext:
    """The process's default context: what runs outside any worker use (the CLI, the Python API)."""
    return _default


def current() -> RunContext:
    """The context of the run in progress in this thread, else the default one."""
    return _active.get() or _default


@contextlib.contextmanager
def activate(context: RunContext) -> Iterator[RunContext]:
    """Make ``context`` the current one for the length of the ``with`` (in this thread)."""
    token = _active.set(context)
    try:
        yield context
    finally:
        _active.reset(token)
