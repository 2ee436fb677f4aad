"""A worker in another process: what a Ray actor runs (this module does not import Ray).

``WorkerRuntime(spec)`` builds, in the worker's process, the same registry as the server, a
run context of its own (the model folders of its machine; input/, output/ and temp/ in a
scratch folder of its own, as it shares no file system with the server), and a ``LocalWorker``
whose executor checks the server's resource limits before each node and collects the files
each node writes. ``execute(record, files)`` is a generator of plain, picklable records, in
the order things happened:

    ("event", event, data)          every ComfyUI event of the prompt (previews only if asked)
    ("files", [FileRecord, ...])    files a node wrote, just before its ``executed`` event
    ("outcome", {...})              last: how the prompt ended, and the worker's state now

An error event names the worker and its machine, so that a user with many workers knows
where a model file is missing.
"""

from __future__ import annotations

import logging
import os
import queue
import shutil
import signal
import socket
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from nodeflow.queue.backends import READY, LocalWorker
from nodeflow.queue.store import QueueItem
from nodeflow.queue.transfer import FileRecord, OutputCollector, store_inputs

log = logging.getLogger(__name__)


@dataclass
class WorkerSpec:
    """What a remote worker needs to know from the server (picklable)."""

    worker_id: str
    #: Where the worker finds its models: ``$NODEFLOW_HOME`` on its machine if set, else this
    #: path (the server's base folder: the same layout on every machine).
    base_dir: str | None = None
    device: str | None = None            # None: its GPU (Ray gives each actor its own), else the CPU
    precision: str | None = None
    #: The fast model path (``--compile``: a torch.compile backend, None: eager; ``--cuda-graphs``).
    compile: str | None = None
    cuda_graphs: bool = False
    #: torch threads in the worker's process (None: torch's default).
    threads: int | None = None
    extra_nodes: list[str] = field(default_factory=list)
    builtin_nodes: bool = True
    cache_size: int = 4096
    max_pixels: int = 0
    max_steps: int = 0
    previews: bool = False


class WorkerRuntime:
    """One worker, in its own process."""

    def __init__(self, spec: WorkerSpec) -> None:
        _die_with_parent()
        if spec.threads:
            os.environ["OMP_NUM_THREADS"] = str(spec.threads)
            try:
                import torch

                torch.set_num_threads(spec.threads)
            except ImportError:
                pass
        from nodeflow.cache import OutputCache
        from nodeflow.context import RunContext
        from nodeflow.folders import Folders
        from nodeflow.limits import ResourceLimits
        from nodeflow.registry import build_registry

        self.spec = spec
        self.host = socket.gethostname()
        self.registry = build_registry(spec.extra_nodes, spec.builtin_nodes)
        self.scratch = Path(tempfile.mkdtemp(prefix=f"nodeflow-{spec.worker_id}-"))
        base = os.environ.get("NODEFLOW_HOME") or spec.base_dir
        folders = Folders.from_base(base, input_dir=str(self.scratch / "input"),
                                    output_dir=str(self.scratch / "output"), temp_dir=str(self.scratch / "temp"))
        for kind in ("input", "output", "temp"):
            folders.io_dir(kind).mkdir(parents=True, exist_ok=True)
        self.context = RunContext(folders, device=spec.device, precision=spec.precision, name=spec.worker_id)
        if spec.compile or spec.cuda_graphs:      # checked here, on the worker's own machine and device
            from nodeflow import configure_devices

            configure_devices(compile=spec.compile, cuda_graphs=spec.cuda_graphs, run_context=self.context)
        self.collector = OutputCollector(folders)
        self._sink: queue.SimpleQueue | None = None
        limits = ResourceLimits(spec.max_pixels, spec.max_steps)
        self.worker = LocalWorker(self.registry, worker_id=spec.worker_id, run_context=self.context,
                                  cache=OutputCache(spec.cache_size), before_node=limits.before_node,
                                  after_node=self._after_node)
        self._lock = threading.Lock()

    # -- info ---------------------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        info = self.worker.info()
        info.host, info.pid, info.state = self.host, os.getpid(), READY
        info.device, info.device_stats = _device(self.context)
        return asdict(info)

    def ping(self) -> int:
        return os.getpid()

    # -- running ------------------------------------------------------------------------------------

    def execute(self, record: dict[str, Any], files: list[FileRecord]) -> Iterator[tuple]:
        """Run one prompt; yields the records described above."""
        with self._lock:  # one prompt at a time, whatever the caller does
            item = QueueItem(record["number"], record["prompt_id"], record["prompt"], record["extra_data"],
                             record["outputs"], dict(record.get("sensitive") or {}))
            self.collector.know(store_inputs(self.context.folders, files))
            sink: queue.SimpleQueue = queue.SimpleQueue()
            self._sink = sink
            box: dict[str, Any] = {}

            def work() -> None:
                try:
                    box["outcome"] = self.worker.execute(item, self._observer)
                except BaseException as exc:  # noqa: BLE001 - raised again in the generator's thread
                    box["error"] = exc
                finally:
                    sink.put(None)

            thread = threading.Thread(target=work, name=f"nodeflow-{self.spec.worker_id}-run", daemon=True)
            thread.start()
            try:
                while (entry := sink.get()) is not None:
                    yield entry
                thread.join()
            finally:
                self._sink = None
                self.collector.release()
            if "error" in box:
                raise box["error"]
            outcome = box["outcome"]
            yield ("outcome", {"status": outcome.status, "outputs": outcome.outputs, "messages": outcome.messages,
                               "error": outcome.error, "info": self.info()})

    def _observer(self, event: str, data: dict) -> None:
        if event == "preview" and not self.spec.previews:
            return
        if event == "execution_error" and data.get("exception_message") is not None:
            data["exception_message"] = f"{data['exception_message']}\n(on worker {self.spec.worker_id}, {self.host})"
        sink = self._sink
        if sink is not None:
            sink.put(("event", event, data))

    def _after_node(self, node_id: str, cls: type, values: tuple, ui: dict | None) -> None:
        records = self.collector.collect()
        sink = self._sink
        if records and sink is not None:
            sink.put(("files", records))

    def interrupt(self, prompt_id: str | None = None) -> bool:
        return self.worker.interrupt(prompt_id)

    def free(self, unload_models: bool = False, free_memory: bool = False) -> bool:
        return self.worker.free(unload_models, free_memory)

    def close(self) -> None:
        shutil.rmtree(self.scratch, ignore_errors=True)


def _die_with_parent() -> None:
    """On Linux, have the kernel kill this worker when its parent (Ray's raylet) dies: a server
    killed with SIGKILL takes its Ray runtime down with it, and no worker may live on holding
    a GPU and its models."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the parent died before the request was made
        os._exit(1)


def _device(context: Any) -> tuple[str, dict | None]:
    """The worker's device name and its ComfyUI /system_stats entry."""
    try:
        import torch

        from nodeflow import context as run_context
        from nodeflow.models import devices
    except ImportError:
        return context.device or "cpu", None
    with run_context.activate(context):
        device = devices.get_device()
    stats: dict[str, Any] = {"name": str(device), "type": device.type, "index": device.index or 0,
                             "vram_total": 0, "vram_free": 0, "torch_vram_total": 0, "torch_vram_free": 0}
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        reserved = torch.cuda.memory_reserved(device)
        stats.update(name=f"{device} {torch.cuda.get_device_name(device)}", vram_total=total, vram_free=free,
                     torch_vram_total=reserved, torch_vram_free=reserved - torch.cuda.memory_allocated(device))
    return str(device), stats
