"""The fast model path: the UNet and the VAE decoder compiled with ``torch.compile`` in
channels-last memory format, their graphs cached per input shape, and UNet steps of fixed
shapes replayed as CUDA graphs (``nodeflow.models.cuda_graphs``).

Who asks for it: a MODEL handle made by the ``CompileModel`` node (its ``compile_options``),
else the run context (``--compile``, ``--cuda-graphs``; a Ray worker gets them through its
``WorkerSpec``). Without either nothing here runs and the eager path is as before. The
compiled graphs are the worker's own (``context.current().state``), as are its models.

A compiled region is keyed on what changes the graph, and on nothing else:

    (shapes of x, context and y: batch, latent size, tokens; dtype; device;
     the ControlNet residuals' shapes; the model patches' compile keys; DeepCache's phase)

The prompt text, seed, cfg, steps, sampler and scheduler change only tensor values, so they
never compile again (a cfg of exactly 1 runs without the negative half of the batch: another
batch size, compiled once). Neither do LoRAs: ``patching.sync`` writes them into the weights in
place, and compiled graphs read the weights as inputs (inductor's freezing stays off). Each
key is a region of its own (a fresh code object, and ``isolate_recompiles``), so many sizes
never exhaust Dynamo's per-function recompile limit and each region holds exactly one graph.

Model patches inside the UNet are compiled into its graph when they declare a
``compile_key`` (FreeU does; DeepCache's full and reuse steps are two keys). Any other patch
(PAG's and SAG's attention replacements, GLIGEN, third-party functions) makes its call run
eagerly, as does a model the manager streams layer by layer. A backend that fails to compile
a key logs a warning and that key runs eagerly: a failed compile never fails a prompt.

On CUDA, compiled calls run with cuDNN's autotuner on (each key's shapes are fixed, so its
choice is made once per shape; torch's process-wide flag, on while compiled calls run and
restored when the last one of any worker ends). The first compiled fp32 call on a GPU with TF32
(compute capability 8.0 on) turns TF32 matmuls on for the process, unless it chose a matmul
precision itself.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
import threading
import types
import weakref
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache as memoize

import torch
from torch import Tensor, nn

from nodeflow import context
from nodeflow.models import cuda_graphs, devices

log = logging.getLogger(__name__)

_INDUCTOR_GRAPH_MODES = {"reduce-overhead": "mode=None", "max-autotune": "'max-autotune-no-cudagraphs'"}


@dataclass(frozen=True)
class CompileOptions:
    backend: str | Callable | None = "inductor"   # torch.compile backend; None: eager (CUDA graphs alone)
    mode: str | None = None                       # torch.compile mode ("max-autotune-no-cudagraphs"; inductor)
    cuda_graphs: bool = False                     # replay UNet steps of fixed shapes as CUDA graphs
    channels_last: bool | None = None             # None: on CUDA; on the CPU where measured faster (see runners)
    max_graphs: int = 4                           # CUDA graphs kept per model (each holds its activations)

    def __post_init__(self) -> None:
        if self.mode in _INDUCTOR_GRAPH_MODES:        # inductor's own CUDA graphs would nest in ours
            raise ValueError(f"torch.compile mode {self.mode!r} replays CUDA graphs of its own: use "
                             f"{_INDUCTOR_GRAPH_MODES[self.mode]} (and cuda_graphs=True for nodeflow's)")

    def channels_last_on(self, device: torch.device, on_cpu: bool) -> bool:
        if self.channels_last is not None:
            return self.channels_last
        return device.type == "cuda" or (device.type == "cpu" and on_cpu)


def options_for(handle) -> CompileOptions | None:
    """The fast-path options of a MODEL handle: its own (``CompileModel``), with the run
    context's ``--cuda-graphs`` added, else the run context's; None: the eager path."""
    own = getattr(handle, "compile_options", None)
    run = context.current()
    if own is None:
        if not (run.compile or run.cuda_graphs):
            return None
        return CompileOptions(backend=run.compile, cuda_graphs=run.cuda_graphs)
    return dataclasses.replace(own, cuda_graphs=True) if run.cuda_graphs and not own.cuda_graphs else own


def decoder_options(vae) -> CompileOptions | None:
    """The fast-path options of a VAE handle's decoder: its own, else ``--compile``'s (no CUDA
    graphs: a decode is one call per image, not bound by launches)."""
    own = getattr(vae, "compile_options", None)
    if own is not None:
        return own
    backend = context.current().compile
    return CompileOptions(backend=backend) if backend else None


# -- checks (what --compile and --cuda-graphs say before anything runs) -------------------------------

def check_compile(backend: str, device: torch.device, option: str = "--compile") -> None:
    """``ValueError`` naming ``option`` when ``backend`` cannot compile for ``device`` here."""
    dynamo = getattr(torch, "_dynamo", None)
    if not hasattr(torch, "compile") or dynamo is None or not dynamo.is_dynamo_supported():
        raise ValueError(f"{option}: torch.compile is not supported by torch {torch.__version__} on this Python")
    known = dynamo.list_backends(None)
    if backend not in known:
        raise ValueError(f"{option}: {backend!r} is not a torch.compile backend; expected one of "
                         f"{', '.join(b for b in ('inductor', 'aot_eager', 'eager') if b in known)}")
    if backend != "inductor":
        return
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            raise ValueError(f"{option}: inductor compiles for CUDA with Triton, which is not installed "
                             "(pip install triton)")
    elif device.type == "cpu":
        try:
            from torch._inductor.cpp_builder import get_cpp_compiler

            get_cpp_compiler()
        except Exception as exc:  # noqa: BLE001 - any failure here means: no usable compiler
            raise ValueError(f"{option}: inductor compiles for the CPU with a C++ compiler (g++ or clang++, "
                             f"or $CXX), and none works here ({exc})") from None


def check_cuda_graphs(device: torch.device, option: str = "--cuda-graphs") -> None:
    if device.type != "cuda":
        raise ValueError(f"{option} needs a CUDA device, and the models run on {device.type}")


# -- the cache ----------------------------------------------------------------------------------------

class CompileCache:
    """One worker's fast paths: per module and options, the runner that holds its graphs."""

    def __init__(self) -> None:
        self._runners: weakref.WeakKeyDictionary[nn.Module, dict] = weakref.WeakKeyDictionary()
        self._channels_last: weakref.WeakSet[nn.Module] = weakref.WeakSet()
        self.compiled = 0          # regions compiled so far (one per key)
        self.captured = 0          # CUDA graphs captured so far
        self.graphs = cuda_graphs.CudaGraphs()
        self.graphs_off = False    # a capture failed: CUDA's state is suspect, no more captures here

    def runner(self, module: nn.Module, options: CompileOptions, kind: type):
        per_module = self._runners.setdefault(module, {})
        found = per_module.get((kind, options))
        if found is None:
            found = per_module[(kind, options)] = kind(module, options, self)
        return found

    def _unet_runners(self) -> list[CompiledUNet]:
        return [runner for per_module in list(self._runners.values()) for runner in per_module.values()
                if isinstance(runner, CompiledUNet)]

    def graph_bytes(self, device: torch.device) -> int:
        """The memory the CUDA graphs on ``device`` hold in their pools."""
        return sum(runner.graph_bytes(device) for runner in self._unet_runners())

    def release_graphs(self, device: torch.device) -> int:
        """Drop the CUDA graphs of every model on ``device`` (each holds a step's activations in a
        memory pool of its own); a later step records them again. How many were dropped."""
        return sum(runner.release_graphs(device) for runner in self._unet_runners())

    def channels_last(self, module: nn.Module) -> None:
        """Put ``module``'s 4-D weights in channels-last format (once). The weights are shared
        by every handle on the module; the eager path computes the same function on them."""
        if module not in self._channels_last:
            module.to(memory_format=torch.channels_last)
            self._channels_last.add(module)


def compile_cache() -> CompileCache:
    """The current worker's compiled models."""
    return context.current().state("compiled_models", CompileCache)


def unet_forward(handle) -> Callable:
    """What runs ``handle``'s UNet: the UNet itself, or its fast path under its options."""
    options = options_for(handle)
    if options is None:
        return handle.unet
    return compile_cache().runner(handle.unet, options, CompiledUNet)


def vae_decode(vae) -> Callable[[Tensor], Tensor]:
    """What decodes latents for the VAE handle ``vae``: ``vae.model.decode``, or its fast path."""
    options = decoder_options(vae)
    if options is None:
        return vae.model.decode
    return compile_cache().runner(vae.model, options, CompiledDecoder)


# -- runners --------------------------------------------------------------------------------------------

def _unet_step(unet, x, timesteps, context, y, control, patches, info, deep):
    return unet(x, timesteps, context, y, control=control, patches=patches, info=info, deep=deep)


def _decode(model, z):
    return model.decode(z)


@memoize
def _isolates_recompiles() -> bool:
    return "isolate_recompiles" in inspect.signature(torch.compile).parameters


def compile_region(fn: Callable, options: CompileOptions, name: str) -> Callable:
    """``fn`` compiled as a region of its own: Dynamo keeps graphs per code object, so a copy of
    the code object keeps this key's graph apart from every other key's."""
    fresh = types.FunctionType(fn.__code__.replace(co_name=name), fn.__globals__, name)
    kwargs = {"isolate_recompiles": True} if _isolates_recompiles() else {}
    return torch.compile(fresh, backend=options.backend, mode=options.mode, dynamic=False, **kwargs)


def _shape(t: Tensor | None) -> tuple | None:
    return None if t is None else tuple(t.shape)


class _Regions:
    """Compiled regions of one module under one set of options, one per key."""

    def __init__(self, module: nn.Module, options: CompileOptions, owner: CompileCache):
        self._module = weakref.ref(module)           # the cache holds runners weakly keyed by the module
        self.options, self.owner = options, owner
        self._regions: dict[tuple, Callable] = {}
        self._tried: set[tuple] = set()              # keys whose first call went through

    def _call(self, fn: Callable, key: tuple, args: tuple):
        region = self._regions.get(key)
        if region is None:
            if self.options.backend is None:
                region = fn
            else:
                region = compile_region(fn, self.options, f"{fn.__name__.strip('_')}_{len(self._regions)}")
                self.owner.compiled += 1
            self._regions[key] = region
        if key in self._tried:
            return region(*args)
        try:
            out = region(*args)                      # the first call compiles
        except torch._dynamo.exc.TorchDynamoException as exc:   # the compiler failed, not the model
            cause = getattr(exc, "inner_exception", None) or exc.__cause__ or exc
            backend = getattr(self.options.backend, "__name__", self.options.backend)
            log.warning("torch.compile (backend %s) failed for the %s at %s, which runs eagerly: %s: %s",
                        backend, type(args[0]).__name__, key[0], type(cause).__name__,
                        (str(cause).strip().splitlines() or [""])[0])
            self._regions[key] = fn
            out = fn(*args)
        self._tried.add(key)
        return out


class CompiledUNet(_Regions):
    """One UNet's fast path: compiled regions per key and, with ``cuda_graphs``, captured steps
    for plain calls (no ControlNet, no patches, no DeepCache) from a key's second call on."""

    #: Full-size SD 1.5 at 256² on a 2-core EPYC, fp32 (bench/gpu_speed.py --device cpu): the UNet
    #: in channels-last is 4 % slower with 1 thread and level with 2, so on the CPU it stays contiguous.
    CPU_CHANNELS_LAST = False

    #: Weights that moved this many times within the last MOVE_WINDOW steps (a model offloaded
    #: between steps to make room for others) are not captured until they stay put: each capture
    #: costs a synchronisation and two warm-up steps.
    MAX_MOVES, MOVE_WINDOW = 3, 20

    def __init__(self, module: nn.Module, options: CompileOptions, owner: CompileCache):
        super().__init__(module, options, owner)
        self._graphs: dict[tuple, cuda_graphs.CapturedStep] = {}
        self._calls: Counter[tuple] = Counter()
        self._pool = None
        self._weights: cuda_graphs.Weights | None = None   # the UNet's weights, collected on first use
        self._seen: tuple[int, ...] | None = None    # their addresses at the last step
        self._moves: deque[int] = deque()            # the steps at which they had moved (within the window)
        self._steps = 0

    def __call__(self, x: Tensor, timesteps: Tensor, context: Tensor, y: Tensor | None = None,
                 control: dict | None = None, patches=None, info: dict | None = None, deep=None) -> Tensor:
        unet = self._module()
        patch_key = _patch_key(patches)
        if patch_key is None or devices.model_manager().is_streamed(unet):    # eager, as it is laid out
            return _unet_step(unet, x, timesteps, context, y, control, patches, info, deep)
        if self.options.channels_last_on(x.device, self.CPU_CHANNELS_LAST):
            self.owner.channels_last(unet)
            x = x.contiguous(memory_format=torch.channels_last)
        args = (unet, x, timesteps, context, y, control, patches, info, deep)
        key = (tuple(x.shape), _shape(context), _shape(y), x.dtype, x.device, _control_key(control), patch_key,
               None if deep is None else (deep.depth, deep.reuse))
        with backend_flags(x.device, x.dtype):
            if self.options.cuda_graphs and control is None and patches is None and deep is None \
                    and not self.owner.graphs_off and self.owner.graphs.supports(x.device):
                out = self._replay(unet, key, (x, timesteps, context, y))
                if out is not None:
                    return out.contiguous()
            return self._call(_unet_step, key, args).contiguous()

    def graph_bytes(self, device: torch.device) -> int:
        return sum(step.pool_bytes for step in self._graphs.values() if _same_device(step.device, device))

    def release_graphs(self, device: torch.device) -> int:
        on_device = [key for key, step in self._graphs.items() if _same_device(step.device, device)]
        for key in on_device:
            del self._graphs[key]
        if not self._graphs:
            self._pool = None
        return len(on_device)

    def _replay(self, unet: nn.Module, key: tuple, inputs: tuple) -> Tensor | None:
        """The step replayed from its graph (captured on the key's second call), or None."""
        if self._weights is None:
            self._weights = cuda_graphs.Weights(unet)
        weights = self._weights.addresses()
        self._steps += 1
        if weights != self._seen:
            if self._seen is not None:                          # the model moved: every graph is stale
                self._graphs.clear()
                self._pool = None                               # its memory goes with the old graphs
                self._moves.append(self._steps)
            self._seen = weights
        while self._moves and self._moves[0] <= self._steps - self.MOVE_WINDOW:
            self._moves.popleft()
        if len(self._moves) >= self.MAX_MOVES:                  # moving all the time: not worth a capture
            return None
        step = self._graphs.get(key)
        if step is None:
            self._calls[key] += 1
            if self._calls[key] < 2 or len(self._graphs) >= self.options.max_graphs:
                return None
            step = self._capture(key, inputs)
            if step is None:
                return None
        return step(*inputs)

    def _capture(self, key: tuple, inputs: tuple) -> cuda_graphs.CapturedStep | None:
        device = inputs[0].device

        def run(x, timesteps, context, y):
            return self._call(_unet_step, key, (self._module(), x, timesteps, context, y, None, None, None, None))

        if self._pool is None:
            self._pool = self.owner.graphs.pool(device)
        try:
            step = cuda_graphs.CapturedStep(run, inputs, device, self._pool, self.owner.graphs)
        except RuntimeError as exc:
            # A capture that failed inside CUDA can leave its allocator routing memory to the
            # graph's pool: no more captures in this worker, and no further risk to its steps
            log.warning("could not capture the UNet step %s as a CUDA graph (%s): this worker's steps run "
                        "without CUDA graphs from now on", key[0], (str(exc).strip().splitlines() or [""])[0])
            self.owner.graphs_off = True
            return None
        self._graphs[key] = step
        self.owner.captured += 1
        return step


class CompiledDecoder(_Regions):
    """One VAE decoder's fast path: a compiled region per latent shape and dtype."""

    #: The same measurement: the decoder in channels-last is 6 % (1 thread) to 10 % (2) faster.
    CPU_CHANNELS_LAST = True

    def __call__(self, z: Tensor) -> Tensor:
        model = self._module()
        if devices.model_manager().is_streamed(model):          # eager, as it is laid out (pinned weights stay)
            return model.decode(z)
        if self.options.channels_last_on(z.device, self.CPU_CHANNELS_LAST):
            self.owner.channels_last(model)
            z = z.contiguous(memory_format=torch.channels_last)
        with backend_flags(z.device, z.dtype):
            return self._call(_decode, (tuple(z.shape), z.dtype, z.device), (model, z)).contiguous()


def _same_device(a: torch.device, b: torch.device) -> bool:
    """``cuda`` is the current CUDA device (captures record ``cuda:0``, a manager may say ``cuda``)."""
    def index(d):
        return d.index if d.index is not None or d.type != "cuda" else torch.cuda.current_device()
    return a.type == b.type and index(a) == index(b)


def _patch_key(patches) -> tuple | None:
    """The compile keys of the patches inside the UNet, in order; None when one has none."""
    if patches is None:
        return ()
    keys = []
    for where, fn in patches.unet_functions():
        key = getattr(fn, "compile_key", None)
        if key is None:
            return None
        keys.append((where, key))
    return tuple(keys)


def _control_key(control: dict | None) -> tuple:
    if control is None:
        return ()
    return tuple((where, tuple(None if r is None else (tuple(r.shape), r.dtype) for r in residuals))
                 for where, residuals in sorted(control.items()))


class _Benchmark:
    """cuDNN's autotuner (a process-wide flag) on while any compiled call runs, in any worker's
    thread, and back as it was when the last one ends."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users = 0
        self._saved = False

    def enter(self) -> None:
        with self._lock:
            if self._users == 0:
                self._saved = torch.backends.cudnn.benchmark
                torch.backends.cudnn.benchmark = True
            self._users += 1

    def leave(self) -> None:
        with self._lock:
            self._users -= 1
            if self._users == 0:
                torch.backends.cudnn.benchmark = self._saved


_benchmark = _Benchmark()
_tf32_lock = threading.Lock()
_tf32_decided = False


def _tf32_for_fp32(device: torch.device) -> None:
    """TF32 cuBLAS matmuls for fp32 from the first compiled fp32 call on a GPU that has them,
    unless the process chose a matmul precision itself; set once and left so, not per call:
    Dynamo's guards include the flag, and flipping it would recompile other workers' graphs."""
    global _tf32_decided
    if _tf32_decided or not devices.has_tf32(device):
        return
    with _tf32_lock:
        if _tf32_decided:
            return
        _tf32_decided = True
        matmul = torch.backends.cuda.matmul
        try:
            chosen = getattr(matmul, "fp32_precision", "none") != "none" or matmul.allow_tf32
        except RuntimeError:              # torch's newer per-backend API was used: that is a choice
            chosen = True
        if chosen:
            return
        matmul.allow_tf32 = True          # the old API's setter keeps torch's old and new settings consistent
        log.info("fp32 matmuls on %s use TF32 (compute capability 8.0 on); set "
                 "torch.backends.cuda.matmul.fp32_precision to choose otherwise", device)


@contextlib.contextmanager
def backend_flags(device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    """cuDNN's autotuner for one compiled call; TF32 matmuls for fp32 where the GPU has them."""
    if device.type != "cuda":
        yield
        return
    if dtype == torch.float32:
        _tf32_for_fp32(device)
    _benchmark.enter()
    try:
        yield
    finally:
        _benchmark.leave()


def compile_model(handle, options: CompileOptions):
    """A clone of the MODEL ``handle`` that runs its UNet through the fast path."""
    clone = handle.clone()
    clone.compile_options = options
    return clone
