"""The dispatcher: hands queued prompts to free workers and records how they end.

    PromptQueue ──next_pending──► Dispatcher ──claim(worker)──► a thread per running prompt
        ▲                            │ picks the worker            │ worker.execute(item, observer)
        └────── finish (history) ◄───┴──────── events (ComfyUI's) ◄┘

One loop thread takes the first pending prompt whenever a worker is idle, and gives it to the
idle worker that already holds its models (``model_inputs``); when none does, to the one whose
models were used least recently (so what gets evicted is what was wanted least). The queue
order is kept: routing picks the worker, never the prompt.

Each prompt then runs in a thread of its own: events go out as they come (``emit(event, data,
client_id)``), with ComfyUI's ``progress_state`` derived from them here, so that a remote
worker's prompt gets them too; the history entry is written, the queue's new length announced
(``on_change``), and only then the closing ``executing`` with ``node: None`` is sent (clients
read the history the moment they see it). A worker that dies
under its prompt (``WorkerLost``) sends the prompt back to the queue, at its place, to run on
another worker, up to ``max_tries`` runs; then it fails naming the worker. A write the
database refuses (disk full) is tried again every second until it goes through: nothing
that finished is lost, and nothing runs twice. The dispatcher survives any exception a
backend, a node or a malformed prompt can raise.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from nodeflow import events
from nodeflow.queue.backends import READY, Backend, Worker, WorkerLost, prompt_models
from nodeflow.queue.store import Outcome, PromptQueue, QueueError, QueueItem, StorageError

log = logging.getLogger(__name__)

#: ``emit(event, data, client_id)``: where the dispatcher sends ComfyUI's events about a prompt.
Emit = Callable[[str, dict, "str | None"], None]

#: Runs a prompt may lose with its worker before it fails.
DEFAULT_MAX_TRIES = 3
#: Seconds between two tries of a database write that failed.
RETRY_INTERVAL = 1.0


@dataclass
class _Run:
    """A prompt running on a worker."""

    worker: Worker
    item: QueueItem
    thread: threading.Thread | None = None
    cancel: bool = False
    #: The node running now (None between nodes), for clients that reconnect mid-run.
    node: str | None = None
    #: The worker is done; the history is being written (the worker is free in a moment).
    finishing: bool = False
    started: float = field(default_factory=time.time)


class Dispatcher:
    """Runs the queue's prompts on a backend's workers, several at a time (one per worker).

    ``emit(event, data, client_id)`` receives every event about a prompt (called from the
    prompt's thread; it must not block for long); an ``emit`` with a ``listening(client_id)``
    method is asked first whether anyone listens before ``progress_state`` is built.
    ``on_change()`` is called when the queue's length changed (a prompt finished or went back
    to the queue). ``registry``, when given, tells which model files a prompt names (for
    routing); without it prompts go to the least recently used idle worker.
    """

    def __init__(self, queue: PromptQueue, backend: Backend, emit: Emit | None = None,
                 on_change: Callable[[], None] | None = None, *, registry: Any = None, poll: float = 0.5,
                 max_tries: int = DEFAULT_MAX_TRIES) -> None:
        self.queue, self.backend, self.registry = queue, backend, registry
        self._emit = emit or (lambda event, data, client_id: None)
        self._on_change = on_change or (lambda: None)
        self._poll = poll
        self.max_tries = max(1, max_tries)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._cond = threading.Condition()
        self._runs: dict[str, _Run] = {}           # worker id -> its run
        #: Database writes to try again: (what, function) — a finish or a requeue that failed.
        self._deferred: list[tuple[str, Callable[[], None]]] = []
        self._waiting_since: float | None = None   # when prompts started to wait with no live worker

    # -- control ------------------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self.backend.start(self._workers_changed)
            self._thread = threading.Thread(target=self._loop, name="nodeflow-dispatcher", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop after interrupting the running prompts; they stay 'running' in the database,
        so the next start's ``recover`` decides their fate, as after a crash."""
        self._stop.set()
        self.interrupt()
        self.queue.wake()
        self._workers_changed()
        deadline = time.monotonic() + timeout
        threads = [self._thread] if self._thread is not None else []
        with self._cond:
            threads += [run.thread for run in self._runs.values() if run.thread is not None]
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                log.warning("thread %s did not stop within %.0f s", thread.name, timeout)
        self._thread = None
        self._flush_deferred()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def running(self) -> list[tuple[QueueItem, str, str | None]]:
        """``(item, worker id, node running now)`` of each running prompt, oldest first."""
        with self._cond:
            runs = sorted(self._runs.values(), key=lambda r: r.started)
            return [(r.item, r.worker.id, r.node) for r in runs]

    @property
    def current(self) -> QueueItem | None:
        """The oldest running prompt (a single worker's only one)."""
        running = self.running()
        return running[0][0] if running else None

    @property
    def current_node(self) -> str | None:
        running = self.running()
        return running[0][2] if running else None

    def workers(self) -> list[dict[str, Any]]:
        """Each worker as ``GET /api/workers`` shows it."""
        with self._cond:
            busy = {worker_id: run.item.prompt_id for worker_id, run in self._runs.items()}
        shown = []
        for worker in self.backend.workers():
            info = worker.info()
            state = info.state if info.state != READY else ("busy" if info.id in busy else "idle")
            shown.append({"id": info.id, "host": info.host, "pid": info.pid, "device": info.device, "state": state,
                          "prompt_id": busy.get(info.id), "models": list(info.models), "prompts_done": info.done,
                          "last_used": info.last_used or None, "error": info.error})
        return shown

    def free(self, unload_models: bool = False, free_memory: bool = False) -> bool:
        """Ask every worker to release cached models and memory (ComfyUI's POST /free)."""
        freed = False
        for worker in self.backend.workers():
            try:
                freed = bool(worker.free(unload_models, free_memory)) or freed
            except Exception:  # a dead or busy remote worker: the others still free theirs
                log.exception("worker %s could not free memory", worker.id)
        return freed

    def interrupt(self, prompt_id: str | None = None) -> bool:
        """Interrupt the running prompt ``prompt_id``, or every running prompt when None."""
        with self._cond:
            runs = [r for r in self._runs.values() if prompt_id is None or r.item.prompt_id == prompt_id]
            for run in runs:
                run.cancel = True
        for run in runs:
            try:
                run.worker.interrupt(run.item.prompt_id)
            except Exception:
                log.exception("could not interrupt prompt %s on worker %s", run.item.prompt_id, run.worker.id)
        return bool(runs)

    # -- the loop ---------------------------------------------------------------------------------

    def _workers_changed(self) -> None:
        with self._cond:
            self._cond.notify_all()
        self.queue.wake()

    def _idle(self) -> list[Worker]:
        with self._cond:
            busy = set(self._runs)
        return [w for w in self.backend.workers() if w.info().state == READY and w.id not in busy]

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._step()
            except Exception:  # a backend's own failure, say: log, wait, go on
                log.exception("the dispatcher's loop failed; going on")
                self._stop.wait(RETRY_INTERVAL)

    def _step(self) -> None:
        self._retry_deferred()
        if not self._idle():
            self._note_no_worker()
            with self._cond:
                self._cond.wait(self._poll)
            return
        item = self.queue.next_pending(timeout=self._poll, stop=self._stop)
        idle = self._idle()
        if item is None or not idle:
            return
        models = self._models(item)
        worker = choose_worker(idle, models)
        if self._holder_finishing(worker, models):
            # The worker that holds these models is writing its last prompt's history (a
            # client may send the next prompt the moment it sees it): wait for it a moment.
            with self._cond:
                self._cond.wait(0.05)
            return
        try:
            claimed = self.queue.claim(worker.id, prompt_id=item.prompt_id)
        except StorageError as exc:  # the prompt stays pending: try again in a moment
            log.error("%s; trying again in %.0f s", exc, RETRY_INTERVAL)
            self._stop.wait(RETRY_INTERVAL)
            return
        except QueueError:  # closed
            self._stop.set()
            return
        if claimed is None:  # deleted meanwhile
            return
        run = _Run(worker, claimed)
        run.thread = threading.Thread(target=self._run, args=(run,), name=f"nodeflow-{worker.id}", daemon=True)
        with self._cond:
            self._runs[worker.id] = run
        run.thread.start()

    def _holder_finishing(self, chosen: Worker, models: set[str]) -> bool:
        if not models:
            return False
        have = len(models & set(chosen.info().models))
        with self._cond:
            finishing = [r.worker for r in self._runs.values() if r.finishing]
        return any(len(models & set(w.info().models)) > have for w in finishing)

    def _models(self, item: QueueItem) -> set[str]:
        return prompt_models(item.prompt, self.registry) if self.registry is not None else set()

    def _note_no_worker(self) -> None:
        """With prompts waiting and no live worker, say why, once a minute."""
        workers = self.backend.workers()
        live = [w for w in workers if w.info().state != "dead"]
        if live or not self.queue.pending_count():
            self._waiting_since = None
            return
        now = time.monotonic()
        if self._waiting_since is None or now - self._waiting_since >= 60:
            self._waiting_since = now
            reasons = "; ".join(f"{w.id}: {w.info().error or 'dead'}" for w in workers) or "no workers"
            log.error("%d prompt(s) wait: every worker is dead (%s)", self.queue.pending_count(), reasons)

    # -- one prompt -----------------------------------------------------------------------------------

    def _run(self, run: _Run) -> None:
        try:
            self._execute(run)
        except BaseException:  # the server must outlive anything a prompt does
            log.exception("unexpected failure while running prompt %s", run.item.prompt_id)
            self.queue.release(run.item)
        finally:
            self._free(run)

    def _free(self, run: _Run) -> None:
        """The prompt is over (its closing message sent): the worker may take the next one."""
        with self._cond:
            if self._runs.get(run.worker.id) is not run:
                return
            del self._runs[run.worker.id]
            self._cond.notify_all()
        self.queue.wake()

    def _execute(self, run: _Run) -> None:
        item, worker = run.item, run.worker
        pid, client = item.prompt_id, item.client_id
        messages: list[list] = []

        def send(event: str, data: dict) -> None:
            try:
                self._emit(event, data, client)
            except Exception:  # a lost event must not fail the prompt
                log.exception("could not deliver %s for prompt %s", event, pid)

        progress = events.ProgressState(pid)
        listening = getattr(self._emit, "listening", None)

        def observer(event: str, data: dict) -> None:
            if event in events.STATUS_EVENTS:
                messages.append([event, data])
            if event == "executing":
                run.node = data.get("node")
            elif event == "execution_start" and run.cancel:
                worker.interrupt(pid)  # asked before the executor was listening
            changed, before = progress.update(event, data)
            # The message lists every node that started: build it only for someone listening.
            changed = changed and (listening is None or listening(client))
            if changed and before:
                send("progress_state", progress.message())
            send(event, data)
            if changed and not before:
                send("progress_state", progress.message())

        try:
            if run.cancel:
                outcome = _interrupted_before_start(item, observer)
            else:
                outcome = worker.execute(item, observer)
        except WorkerLost as exc:
            if self._stop.is_set():
                self.queue.release(item)
                return
            outcome = self._lost(run, exc, observer, messages)
            if outcome is None:
                return  # queued again
        except BaseException as exc:  # even SystemExit from a node fails this prompt only
            log.exception("prompt %s failed outside any node", pid)
            error = events.execution_error(pid, f"{type(exc).__name__}: {exc}", node_id=run.node,
                                           exception_type=events.exception_name(exc),
                                           traceback_lines=traceback.format_exception(exc))
            observer("execution_error", error)
            outcome = Outcome("error", {}, messages, error)
        run.node = None
        run.finishing = True
        if self._stop.is_set() and outcome.status == "interrupted":
            self.queue.release(item)  # stopped by shutdown: recover() decides on the next start
            return
        self._record(item, outcome, send)

    def _lost(self, run: _Run, exc: WorkerLost, observer, messages: list) -> Outcome | None:
        """The worker died under the prompt: queue it again, or fail it after ``max_tries``."""
        item = run.item
        if item.tries + 1 < self.max_tries:
            log.warning("%s while running prompt %s; running it again on another worker (run %d of at most %d)",
                        exc, item.prompt_id, item.tries + 2, self.max_tries)
            try:
                self.queue.requeue(item)
            except StorageError as err:
                log.error("%s; trying again every %.0f s", err, RETRY_INTERVAL)
                self._defer(f"queue prompt {item.prompt_id} again", lambda: self.queue.requeue(item), None)
            self._changed()
            return None
        message = (f"worker {exc.worker} died while running this prompt ({exc.reason}); it was run "
                   f"{item.tries + 1} time(s), each time on a worker that died, and is not tried again")
        error = events.execution_error(item.prompt_id, message, node_id=run.node,
                                       exception_type="nodeflow.queue.WorkerLost")
        observer("execution_error", error)
        return Outcome("error", {}, messages, error)

    def _record(self, item: QueueItem, outcome: Outcome, send: Callable[[str, dict], None]) -> None:
        """Write the history entry, then send the closing message (clients fetch it on that)."""
        closing = events.executing(item.prompt_id, None)
        try:
            self.queue.finish(item, outcome)
        except StorageError as exc:
            log.error("%s; trying again every %.0f s", exc, RETRY_INTERVAL)
            self._defer(f"record prompt {item.prompt_id}", lambda: self.queue.finish(item, outcome),
                        lambda: send("executing", closing))
            return
        except QueueError:  # closed under us: the next start's recover() decides
            return
        self._changed()  # ComfyUI's order: the queue's new length, then the closing message
        send("executing", closing)

    def _changed(self) -> None:
        try:
            self._on_change()
        except Exception:
            log.exception("on_change failed")

    # -- database writes that failed ---------------------------------------------------------------

    def _defer(self, what: str, write: Callable[[], None], then: Callable[[], None] | None) -> None:
        def attempt() -> None:
            write()
            self._changed()
            if then is not None:
                then()

        with self._cond:
            self._deferred.append((what, attempt))

    def _retry_deferred(self) -> None:
        with self._cond:
            pending, self._deferred = self._deferred, []
        kept = []
        for what, attempt in pending:
            try:
                attempt()
                log.info("done at last: %s", what)
            except StorageError:
                kept.append((what, attempt))
            except QueueError:
                pass  # closed
        if kept:
            with self._cond:
                self._deferred[:0] = kept
            self._stop.wait(RETRY_INTERVAL)

    def _flush_deferred(self) -> None:
        with self._cond:
            pending, self._deferred = self._deferred, []
        for what, attempt in pending:
            try:
                attempt()
            except QueueError as exc:
                log.error("lost at shutdown: %s (%s); the prompt stays running in the database for recovery",
                          what, exc)


def choose_worker(idle: list[Worker], models: set[str]) -> Worker:
    """The idle worker for a prompt naming ``models``: the one holding most of them; among
    equals, the one used least recently (its models are the ones to evict)."""
    def key(indexed: tuple[int, Worker]) -> tuple:
        index, worker = indexed
        info = worker.info()
        return -len(models & set(info.models)), info.last_used, index

    return min(enumerate(idle), key=key)[1]


def _interrupted_before_start(item: QueueItem, observer: Callable[[str, dict], None]) -> Outcome:
    start = events.execution_start(item.prompt_id)
    data = events.execution_interrupted(item.prompt_id)
    observer("execution_start", start)
    observer("execution_interrupted", data)
    return Outcome("interrupted", {}, [["execution_start", start], ["execution_interrupted", data]])
