"""Workers as Ray actors: the queue spread over GPUs and machines (``pip install "nodeflow[ray]"``).

``RayBackend`` starts a local Ray runtime on loopback, or joins a running cluster
(``address="auto"`` or ``"HOST:PORT"``), and keeps one long-lived actor per GPU in the cluster
(Ray's ``num_gpus=1`` gives each its own), or ``workers`` of them on CPU machines. Each actor is
a ``WorkerRuntime`` (``nodeflow.queue.remote``): its own process, run context, model manager
and output cache, so a checkpoint stays loaded between prompts.

- **Events** stream back through a Ray streaming-generator call, in order, and reach the
  dispatcher's observer as a local worker's would.
- **Files**: the input files a prompt names travel with it (once per worker, while they do not
  change); the files it saves come back as bytes and land in the server's folders before the
  ``executed`` event that names them (``nodeflow.queue.transfer``). Workers need no shared file
  system; each reads models from its own model folders (same names as on the server).
- **Interrupt** reaches the busy actor at once: actors take a control call beside the running
  prompt (``max_concurrency``).
- **Failure**: a dead actor is noticed within ``ping_interval`` seconds when idle, at once when
  busy (the stream breaks): ``execute`` raises ``WorkerLost``, the dispatcher sends its prompt
  back to the queue (the retry lives in the SQLite queue, not in Ray's actor restarts, which
  would re-run it on a cold actor), and a new actor takes the dead one's place in the background.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

from nodeflow.folders import Folders
from nodeflow.queue.backends import DEAD, READY, STARTING, BackendError, Observer, WorkerInfo, WorkerLost
from nodeflow.queue.remote import WorkerRuntime, WorkerSpec
from nodeflow.queue.store import Outcome, QueueItem
from nodeflow.queue.transfer import OutputLander, input_files

log = logging.getLogger(__name__)


@dataclass
class RayOptions:
    #: None: start a Ray runtime on this machine (loopback only); "auto": join the cluster
    #: this machine belongs to (``ray start``); "HOST:PORT": join the cluster there.
    address: str | None = None
    #: Workers to run; None: one per GPU in the cluster (one CPU worker when it has none).
    workers: int | None = None
    #: torch threads per worker process (None: the cluster's CPUs shared among the workers).
    threads: int | None = None
    #: Seconds a new worker may take to start (import torch, load the nodes).
    startup_timeout: float = 180.0
    #: Seconds between health checks of the workers.
    ping_interval: float = 2.0


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise BackendError("the Ray backend needs Ray: pip install \"nodeflow[ray]\"") from None
    return ray


class RayBackend:
    """Workers as Ray actors (see the module's docstring)."""

    def __init__(self, spec: WorkerSpec, folders: Folders, options: RayOptions | None = None) -> None:
        self.spec, self.folders, self.options = spec, folders, options or RayOptions()
        self.lander = OutputLander(folders)
        self.ray: Any = None
        self._workers: list[RayWorker] = []
        self._lock = threading.Lock()
        self._notify: Callable[[], None] = lambda: None
        self._stop = threading.Event()
        self._started_runtime = False
        self._count = 0
        self._num_gpus = 0
        self._monitor: threading.Thread | None = None

    # -- lifetime -----------------------------------------------------------------------------------

    def start(self, notify: Callable[[], None]) -> None:
        """Connect to Ray and start the workers (they come up in the background). Raises
        ``BackendError`` when Ray is missing, the cluster cannot be reached, or it has fewer
        GPUs than ``workers`` asks for."""
        self._notify = notify
        self.ray = import_ray()
        self._connect()
        resources = self.ray.cluster_resources()
        gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 1)) or 1
        wanted = self.options.workers
        if wanted is not None and wanted < 1:
            raise BackendError(f"--workers {wanted}: at least one worker is needed")
        if gpus and wanted is not None and wanted > gpus:
            self.close()
            raise BackendError(f"--workers {wanted}: the Ray cluster has {gpus} GPU(s), one per worker; "
                               f"ask for at most {gpus}, or add machines with GPUs to the cluster")
        count = wanted or max(gpus, 1)
        if not gpus and wanted is None:
            log.info("the Ray cluster has no GPU: running one CPU worker (--workers N for more)")
        self._num_gpus = 1 if gpus else 0
        threads = self.options.threads or max(1, cpus // count)
        self.spec = replace(self.spec, threads=threads, device=self.spec.device if not gpus else None)
        for _ in range(count):
            self._add_worker()
        self._monitor = threading.Thread(target=self._watch, name="nodeflow-ray-monitor", daemon=True)
        self._monitor.start()
        log.info("Ray backend: %d worker(s) starting (%s, %d torch thread(s) each)", count,
                 "one GPU each" if gpus else "CPU", threads)

    def _connect(self) -> None:
        ray, address = self.ray, self.options.address
        if ray.is_initialized():
            return  # this process joined a cluster already (a test, a notebook): use it
        if address is None:
            try:
                with _loopback_only():
                    ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1",
                             logging_level=logging.WARNING, configure_logging=False)
            except Exception as exc:
                raise BackendError(f"cannot start a local Ray runtime: {_first_line(exc)}") from exc
            self._started_runtime = True
            return
        if address != "auto":
            host, _, port = address.rpartition(":")
            if not host or not port.isdigit():
                raise BackendError(f"--ray-address {address!r}: expected HOST:PORT (e.g. 10.0.0.5:6379) or auto")
            try:
                socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
            except OSError as exc:
                raise BackendError(f"cannot reach the Ray cluster at {address}: {exc.strerror or exc} "
                                   f"(is 'ray start --head --port {port}' running there?)") from None
        try:
            ray.init(address=address, logging_level=logging.WARNING, configure_logging=False)
        except Exception as exc:  # noqa: BLE001 - Ray raises many kinds here; each is told to the user
            raise BackendError(f"cannot join the Ray cluster at {address}: {_first_line(exc)}") from None

    def close(self) -> None:
        self._stop.set()
        with self._lock:
            workers, self._workers = list(self._workers), []
        for worker in workers:
            worker.close()
        if self._started_runtime and self.ray is not None:
            self.ray.shutdown()
            self._started_runtime = False

    def workers(self) -> list[RayWorker]:
        with self._lock:
            return list(self._workers)

    # -- workers ------------------------------------------------------------------------------------

    def _add_worker(self, replacing: RayWorker | None = None) -> RayWorker:
        with self._lock:
            self._count += 1
            worker = RayWorker(self, f"ray-{self._count}", replace(self.spec, worker_id=f"ray-{self._count}"))
            if replacing is not None and replacing in self._workers:
                self._workers[self._workers.index(replacing)] = worker
            else:
                self._workers.append(worker)
        threading.Thread(target=self._launch, args=(worker,), name=f"nodeflow-start-{worker.id}",
                         daemon=True).start()
        return worker

    def _launch(self, worker: RayWorker) -> None:
        delay = 5.0
        while not self._stop.is_set():
            try:
                worker.launch(self._actor_class())
            except BackendError as exc:
                worker.fail(str(exc))
                log.error("worker %s could not start: %s; trying again in %.0f s", worker.id, exc, delay)
                self._notify()
                if self._stop.wait(delay):
                    return
                delay = min(delay * 2, 60.0)
                continue
            log.info("worker %s ready: pid %s on %s, %s", worker.id, worker.info().pid, worker.info().host,
                     worker.info().device)
            self._notify()
            return

    def _actor_class(self) -> Any:
        options: dict[str, Any] = {"num_gpus": self._num_gpus, "num_cpus": 0, "max_concurrency": 4,
                                   "max_restarts": 0, "max_task_retries": 0}
        if self.spec.threads:
            options["runtime_env"] = {"env_vars": {"OMP_NUM_THREADS": str(self.spec.threads)}}
        return self.ray.remote(WorkerRuntime).options(**options)

    def lost(self, worker: RayWorker, reason: str) -> None:
        """A worker died: mark it, and start another in its place."""
        if not worker.fail(reason) or self._stop.is_set():
            return
        log.warning("worker %s died (%s); starting another in its place", worker.id, reason)
        worker.close()
        self._notify()
        self._add_worker(replacing=worker)

    def _watch(self) -> None:
        """Notice dead workers within ``ping_interval`` seconds, even idle ones."""
        ray = self.ray
        while not self._stop.wait(self.options.ping_interval):
            ready = [w for w in self.workers() if w.info().state == READY and w.actor is not None]
            if not ready:
                continue
            refs = {w.actor.ping.remote(): w for w in ready}
            done, _ = ray.wait(list(refs), num_returns=len(refs), timeout=max(5.0, self.options.ping_interval))
            for ref in done:
                try:
                    ray.get(ref)
                except ray.exceptions.RayActorError as exc:
                    self.lost(refs[ref], _reason(refs[ref], exc))
                except Exception:
                    log.exception("health check of worker %s failed", refs[ref].id)


class RayWorker:
    """The server's handle on one worker actor."""

    def __init__(self, backend: RayBackend, worker_id: str, spec: WorkerSpec) -> None:
        self.id, self.backend, self.spec = worker_id, backend, spec
        self.actor: Any = None
        self._info = WorkerInfo(worker_id, state=STARTING)
        self._have: dict[tuple[str, str], tuple[int, int]] = {}  # input files it holds: (kind, name) -> stamp
        self._lock = threading.Lock()

    def info(self) -> WorkerInfo:
        return self._info

    def launch(self, actor_class: Any) -> None:
        ray = self.backend.ray
        actor = actor_class.remote(self.spec)
        try:
            details = ray.get(actor.info.remote(), timeout=self.backend.options.startup_timeout)
        except ray.exceptions.GetTimeoutError:
            ray.kill(actor)
            raise BackendError(f"it did not start within {self.backend.options.startup_timeout:.0f} s "
                               "(is a GPU free in the Ray cluster?)") from None
        except Exception as exc:  # noqa: BLE001 - whatever the worker's constructor raised, told to the user
            ray.kill(actor)
            raise BackendError(_first_line(exc)) from None
        self.actor = actor
        self._update(details)
        self._info.state = READY

    def fail(self, reason: str) -> bool:
        """Mark the worker dead; False if it was already."""
        with self._lock:
            if self._info.state == DEAD:
                return False
            self._info.state, self._info.error = DEAD, reason
            return True

    def _update(self, details: dict[str, Any]) -> None:
        info = self._info
        for key in ("host", "pid", "device", "models", "done", "last_used", "device_stats"):
            if key in details:
                setattr(info, key, details[key])

    # -- running ------------------------------------------------------------------------------------

    def execute(self, item: QueueItem, observer: Observer) -> Outcome:
        ray, actor = self.backend.ray, self.actor
        if actor is None or self._info.state != READY:
            raise WorkerLost(self.id, self._info.error or "it is not running")
        lander = self.backend.lander
        files = input_files(item.prompt, self.backend.folders, self._have)
        record = {"number": item.number, "prompt_id": item.prompt_id, "prompt": item.prompt,
                  "extra_data": item.extra_data, "outputs": item.outputs, "sensitive": item.sensitive}
        ended: dict[str, Any] | None = None
        try:
            for ref in actor.execute.options(num_returns="streaming").remote(record, files):
                entry = ray.get(ref)
                if entry[0] == "event":
                    event, data = entry[1], entry[2]
                    if event == "executed":
                        data = {**data, "output": lander.rewrite(self.id, data.get("output"))}
                    observer(event, data)
                elif entry[0] == "files":
                    lander.land(self.id, entry[1])
                elif entry[0] == "outcome":
                    ended = entry[1]
        except ray.exceptions.RayActorError as exc:
            reason = _reason(self, exc)
            self.backend.lost(self, reason)
            raise WorkerLost(self.id, reason) from None
        except ray.exceptions.RayTaskError as exc:  # the runtime itself raised: this prompt fails
            raise RuntimeError(f"worker {self.id} failed: {_first_line(exc.cause or exc)}") from None
        if ended is None:
            raise RuntimeError(f"worker {self.id} ended the prompt without an outcome")
        for rec in files:
            self._have[(rec.kind, rec.name)] = (len(rec.data), rec.mtime_ns)
        self._update(ended["info"])
        outputs = {n: lander.rewrite(self.id, ui) for n, ui in (ended["outputs"] or {}).items()}
        return Outcome(ended["status"], outputs, ended["messages"], ended["error"])

    def interrupt(self, prompt_id: str | None = None) -> bool:
        return bool(self._call("interrupt", prompt_id, timeout=10))

    def free(self, unload_models: bool = False, free_memory: bool = False) -> bool:
        freed = self._call("free", unload_models, free_memory, timeout=60)
        if freed:
            self._info.models = []
        return bool(freed)

    def _call(self, method: str, *args: Any, timeout: float) -> Any:
        ray, actor = self.backend.ray, self.actor
        if actor is None or self._info.state != READY:
            return None
        try:
            return ray.get(getattr(actor, method).remote(*args), timeout=timeout)
        except ray.exceptions.RayActorError as exc:
            self.backend.lost(self, _reason(self, exc))
        except Exception as exc:  # noqa: BLE001 - a control call that fails leaves the worker as it is
            log.warning("worker %s: %s failed: %s", self.id, method, _first_line(exc))
        return None

    def close(self) -> None:
        actor, self.actor = self.actor, None
        if actor is not None:
            try:
                self.backend.ray.kill(actor)
            except Exception:  # noqa: BLE001 - gone already
                pass


@contextlib.contextmanager
def _loopback_only() -> Iterator[None]:
    """Keep a Ray runtime started for this server on loopback. Ray turns the node address
    127.0.0.1 into the machine's reachable one (it expects other machines to join) and then
    listens on the network; a runtime private to this server has no one to wait for. Where
    Ray's internals differ, it is left as it is (Ray's token authentication still guards it)."""
    try:
        from ray._private import services
    except ImportError:
        services = None
    resolve = getattr(services, "resolve_ip_for_localhost", None)
    if resolve is None:
        log.warning("this Ray version cannot be kept on loopback: its runtime listens on the network, "
                    "guarded by Ray's token authentication")
        yield
        return
    services.resolve_ip_for_localhost = lambda host: host
    try:
        yield
    finally:
        services.resolve_ip_for_localhost = resolve


def _reason(worker: RayWorker, exc: BaseException) -> str:
    info = worker.info()
    where = f"pid {info.pid} on {info.host}" if info.pid else "its process"
    return f"the worker process ({where}) died: {_first_line(exc)}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__

