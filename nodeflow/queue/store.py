"""The persistent prompt queue and history: SQLite, the single source of truth.

``PromptQueue`` keeps the pending prompts (ordered by ``number``, then arrival), the running
ones (one per worker: ``claim(worker_id)``), and the history, in one SQLite file in WAL mode.
Every change is written to the database *before* it takes effect in memory and before it is
acknowledged, so a crash (even SIGKILL) loses nothing a client was told about, and a write the
database refuses (disk full) changes nothing: ``StorageError``. On the next start ``recover()``
marks the prompts that were running as failed, or puts them back in the queue. A prompt whose
worker died goes back with ``requeue()``, its ``tries`` counted in the database. ComfyUI keeps
all of this in memory and loses it on restart.

Queue entries and history entries have ComfyUI's shapes: an entry is the 5-element list
``[number, prompt_id, prompt, extra_data, outputs_to_execute]`` and a history entry is
``{"prompt": entry, "outputs": {node_id: ui}, "status": {"status_str", "completed",
"messages"}, "meta": {node_id: {...}}}``. Nothing here imports torch or aiohttp.
"""

from __future__ import annotations

import contextlib
import heapq
import json
import logging
import math
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nodeflow import events

log = logging.getLogger(__name__)

#: Keys of ``extra_data`` that hold secrets for nodes (ComfyUI's list): passed to the run,
#: never stored, never shown in /queue or /history.
SENSITIVE_EXTRA_DATA_KEYS = ("auth_token_comfy_org", "api_key_comfy_org")



class QueueError(Exception):
    """A request the queue cannot honour."""


class DuplicatePrompt(QueueError):
    """A prompt id that is already queued, running or in the history."""


class QueueLocked(QueueError):
    """Another process already serves this queue database."""


class StorageError(QueueError):
    """The database refused a write (disk full, I/O error, read-only file): nothing changed."""

    def __init__(self, action: str, exc: sqlite3.Error) -> None:
        self.full = "full" in str(exc).lower()
        reason = "the disk holding the queue database is full" if self.full else f"the queue database failed: {exc}"
        super().__init__(f"cannot {action}: {reason}")


class InvalidNumber(QueueError):
    """A queue ``number`` that is not a finite number within ±``MAX_NUMBER``."""


#: The largest queue ``number`` in magnitude: 2**53, the last integer a float (and a
#: JavaScript client) holds exactly; SQLite stores it as it is.
MAX_NUMBER = 2 ** 53


def check_number(number: Any) -> int | float:
    """``number`` as the queue stores it (an int when it is integral); ``InvalidNumber``
    for a bool, a non-number, NaN, an infinity or a magnitude over ``MAX_NUMBER``."""
    if isinstance(number, bool) or not isinstance(number, (int, float)):
        raise InvalidNumber(f"number must be a number, not {type(number).__name__}")
    if isinstance(number, float) and not math.isfinite(number):
        raise InvalidNumber(f"number must be finite, not {number}")
    if abs(number) > MAX_NUMBER:
        raise InvalidNumber(f"number {number:g} is out of range: at most {MAX_NUMBER:,} in magnitude")
    return _number(number)


@dataclass
class QueueItem:
    """One prompt in the queue."""

    number: int | float
    prompt_id: str
    prompt: dict[str, Any]
    extra_data: dict[str, Any]
    #: The output nodes to run (those that passed validation).
    outputs: list[str]
    #: Secrets for nodes (see SENSITIVE_EXTRA_DATA_KEYS): held in memory only, never persisted.
    sensitive: dict[str, Any] = field(default_factory=dict, repr=False)
    #: What the submitter already worked out in this process (e.g. the validated graph),
    #: for the backend to reuse; None after a restart. Never persisted.
    prepared: Any = field(default=None, repr=False, compare=False)
    #: Runs started on a worker that died under them (persisted: a restart keeps counting).
    tries: int = 0

    @property
    def client_id(self) -> str | None:
        cid = self.extra_data.get("client_id")
        return cid if isinstance(cid, str) and cid else None

    def to_comfy(self) -> list:
        """ComfyUI's queue entry: ``[number, prompt_id, prompt, extra_data, outputs_to_execute]``."""
        return [self.number, self.prompt_id, self.prompt, self.extra_data, self.outputs]


@dataclass
class Outcome:
    """How one prompt ended: what goes into its history entry."""

    status: str  # "success" | "error" | "interrupted"
    #: The UI output of each output node: {node_id: {"images": [...], ...}}.
    outputs: dict[str, dict] = field(default_factory=dict)
    #: Status messages in ComfyUI's history format: [[event, data], ...].
    messages: list[list] = field(default_factory=list)
    error: dict | None = None

    @property
    def status_str(self) -> str:
        return "success" if self.status == "success" else "error"


# -- the persistent queue ------------------------------------------------------------------------

_SCHEMA = """
CREATE TABLE IF NOT EXISTS prompts (
    seq INTEGER PRIMARY KEY,                 -- arrival order, the tie-break after number
    prompt_id TEXT NOT NULL UNIQUE,
    number REAL NOT NULL,                    -- ComfyUI's priority: lower runs first
    state TEXT NOT NULL,                     -- 'pending' | 'running' | 'done'
    prompt TEXT NOT NULL,                    -- the API-format workflow (JSON)
    extra_data TEXT NOT NULL,                -- JSON object (client_id, extra_pnginfo, create_time, ...)
    outputs TEXT NOT NULL,                   -- JSON list: the output nodes to run
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    finished_seq INTEGER,                    -- history order
    status TEXT,                             -- JSON {"status_str", "completed", "messages"}
    result TEXT,                             -- JSON {node_id: ui}
    meta TEXT,                               -- JSON {node_id: {"node_id", "display_node", ...}}
    worker TEXT,                             -- the worker running it (state 'running')
    tries INTEGER NOT NULL DEFAULT 0         -- runs lost with their worker
);
CREATE INDEX IF NOT EXISTS prompts_history ON prompts (finished_seq) WHERE finished_seq IS NOT NULL;
CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""

#: Columns added since the first schema (to databases made before them, when a queue opens one).
_WORKER_COLUMNS = (("worker", "TEXT"), ("tries", "INTEGER NOT NULL DEFAULT 0"))

#: Columns that let the jobs view filter and sort in SQL, without decoding any JSON; added
#: to databases made before them (and filled from the JSON) when a queue opens one.
_JOB_COLUMNS = (
    ("create_time", "INTEGER"),              # extra_data.create_time (ms), as the submitter set it
    ("workflow_id", "TEXT"),                 # extra_data.extra_pnginfo.workflow.id
    ("status_str", "TEXT"),                  # 'success' | 'error' | 'interrupted' once done (the JSON
                                             # status keeps ComfyUI's 'success' | 'error')
    ("exec_start", "INTEGER"),               # timestamps (ms) of execution_start and of the end event
    ("exec_end", "INTEGER"),
)
#: Covers every column the jobs view filters and sorts on: it reads the index alone, never
#: the rows (whose JSON runs over many pages).
_JOB_INDEX = ("CREATE INDEX IF NOT EXISTS prompts_jobs ON prompts (create_time, number, prompt_id, status_str, "
              "workflow_id, exec_start, exec_end) WHERE state = 'done'")

#: Rows deleted per transaction when clearing: the lock is let go in between (for a moment,
#: so that a waiting thread gets it), so that a submission waits for one small batch at
#: most, never for the whole history.
_DELETE_BATCH = 50
_DELETE_PAUSE = 0.001

#: The writer connection leaves checkpointing the WAL to others (unless the WAL passes 40 MB):
#: SQLite would do it inside a commit, under the queue's lock, for up to a tenth of a second
#: on a big history. The worker thread and long deletions do it on the reader connection,
#: outside that lock, at most this often (s).
_CHECKPOINT_INTERVAL = 1.0
#: ... and this often while deleting in bulk, which fills the WAL fast.
_BULK_CHECKPOINT_INTERVAL = 0.05


def default_db_path(base_dir: str | os.PathLike) -> Path:
    return Path(base_dir) / "nodeflow.sqlite3"


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else value


def workflow_id(extra_data: dict) -> str | None:
    """The id of the editor workflow a prompt came from (``extra_pnginfo.workflow.id``)."""
    info = extra_data.get("extra_pnginfo")
    workflow = info.get("workflow") if isinstance(info, dict) else None
    wid = workflow.get("id") if isinstance(workflow, dict) else None
    return wid if isinstance(wid, str) else None


def _create_time(extra_data: dict) -> int | None:
    value = extra_data.get("create_time")
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) \
        and math.isfinite(value) and abs(value) < 2 ** 62 else None


def _run_times(messages: Iterable) -> tuple[int | None, int | None]:
    """Timestamps of ``execution_start`` and of the event that ended the run, from a
    history entry's status messages."""
    start = end = None
    for message in messages or ():
        if not isinstance(message, (list, tuple)) or len(message) != 2 or not isinstance(message[1], dict):
            continue
        event, stamp = message[0], message[1].get("timestamp")
        if not isinstance(stamp, int) or isinstance(stamp, bool):
            continue
        if event == "execution_start":
            start = stamp
        elif event in ("execution_success", "execution_error", "execution_interrupted"):
            end = stamp
    return start, end


@dataclass
class Running:
    """A prompt a worker is running."""

    seq: int
    item: QueueItem
    worker: str
    started: float


class PromptQueue:
    """Pending prompts, the running ones and the history, persisted in SQLite. Thread-safe.

    ``path`` is a file (created if missing) or ``":memory:"`` for a queue that dies with the
    process. One process owns a database file at a time (a lock file next to it says so).
    The database is written through on every change; the pending prompts are also held in
    memory (a heap in run order), so taking the next one and listing them read no rows.
    Long reads use a second connection, and long deletions go a batch at a time, so a
    ``put`` never waits long for the lock. Opening a big database from an older version
    adds columns to it first: open one off the event loop.
    """

    def __init__(self, path: str | os.PathLike = ":memory:", *, max_history: int = 10_000) -> None:
        self.path = str(path)
        self.max_history = max_history
        self._cond = threading.Condition(threading.RLock())
        self._closed = False
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._lock_file = self._take_lock() if self.path != ":memory:" else None
        # One connection, shared by threads under our own lock; autocommit, explicit transactions.
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        # In WAL mode NORMAL is durable against a process crash (not a power cut): a commit is
        # in the WAL file before it returns; the WAL is fsynced at checkpoints.
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA busy_timeout=5000")
        # See _CHECKPOINT_INTERVAL; the writer checkpoints itself only when the WAL is past 40 MB
        # (a long prompt running while many are submitted), as a safety net.
        self._db.execute("PRAGMA wal_autocheckpoint=10000")
        self._db.executescript(_SCHEMA)
        self._migrate()
        self._repair_numbers()
        # Long reads (the history, the jobs view) go through a second connection under their
        # own lock: WAL lets them run beside the writer, so they never hold up a submission.
        self._read_lock = threading.Lock()
        self._reader = self._db
        if self.path != ":memory:":
            self._reader = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._reader.execute("PRAGMA busy_timeout=5000")
            self._reader.execute("PRAGMA query_only=1")
        self._last_checkpoint = 0.0
        #: Pending prompts: id -> (seq, item); the heap orders (number, seq, id), lazily pruned.
        self._items: dict[str, tuple[int, QueueItem]] = {}
        self._heap: list[tuple[float, int, str]] = []
        #: Running prompts by id, in the order they were claimed.
        self._running: dict[str, Running] = {}
        top = self._db.execute("SELECT MAX(number) FROM prompts WHERE number >= 0 AND number <= ?",
                               (MAX_NUMBER,)).fetchone()[0]
        self._next_number = int(top) + 1 if isinstance(top, (int, float)) and math.isfinite(top) else 0
        self._seq = self._db.execute("SELECT COALESCE(MAX(seq), 0) FROM prompts").fetchone()[0]
        self._finished_seq = self._db.execute("SELECT COALESCE(MAX(finished_seq), 0) FROM prompts").fetchone()[0]
        self._done = self._db.execute("SELECT COUNT(*) FROM prompts WHERE state = 'done'").fetchone()[0]
        for row in self._db.execute("SELECT seq, number, prompt_id, prompt, extra_data, outputs, tries FROM prompts "
                                    "WHERE state = 'pending'").fetchall():
            self._add_pending(row[0], self._item(row[1:]))
        self._trim_history()  # --max-history may have been lowered since

    def _take_lock(self) -> Any:
        handle = open(self.path + ".lock", "a+")  # noqa: SIM115 - held for the queue's lifetime
        try:
            import fcntl
        except ImportError:  # Windows: no advisory lock; one server per database is on the user
            return handle
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            raise QueueLocked(f"another nodeflow server is using {self.path}") from None
        return handle

    def _migrate(self) -> None:
        """Add the columns of later versions to a database made before them: the workers', and
        the jobs view's (filled from the JSON)."""
        have = {row[1] for row in self._db.execute("PRAGMA table_info(prompts)")}
        for name, decl in _WORKER_COLUMNS:
            if name not in have:
                self._db.execute(f"ALTER TABLE prompts ADD COLUMN {name} {decl}")
        missing = [(name, decl) for name, decl in _JOB_COLUMNS if name not in have]
        if missing:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for name, decl in missing:
                    self._db.execute(f"ALTER TABLE prompts ADD COLUMN {name} {decl}")
                last = 0
                while rows := self._db.execute("SELECT seq, extra_data, status FROM prompts WHERE seq > ? "
                                               "ORDER BY seq LIMIT 500", (last,)).fetchall():
                    self._db.executemany("UPDATE prompts SET create_time = ?, workflow_id = ?, status_str = ?, "
                                         "exec_start = ?, exec_end = ? WHERE seq = ?",
                                         [_job_columns(extra, status) + (seq,) for seq, extra, status in rows])
                    last = rows[-1][0]
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            if last:
                log.info("added the jobs columns to %s", self.path)
        self._db.execute(_JOB_INDEX)
        if self._db.execute("PRAGMA user_version").fetchone()[0] < 1:
            self._mark_interrupted()
            self._db.execute("PRAGMA user_version = 1")

    def _mark_interrupted(self) -> None:
        """Databases of earlier versions stored interrupted prompts as 'error' in the jobs
        columns: tell them apart (the jobs view's 'cancelled')."""
        rows = self._db.execute("SELECT seq, status FROM prompts WHERE state = 'done' AND status_str = 'error'"
                                ).fetchall()
        seqs = [(seq,) for seq, status in rows if _was_interrupted(status)]
        if seqs:
            self._db.executemany("UPDATE prompts SET status_str = 'interrupted' WHERE seq = ?", seqs)

    def _repair_numbers(self) -> None:
        """Bring stored numbers out of range (infinities from an older server) back within
        ±MAX_NUMBER, so that they order as before and read back as valid JSON."""
        n = self._db.execute("UPDATE prompts SET number = CASE WHEN number IS NULL THEN 0 WHEN number > 0 THEN ? "
                             "ELSE ? END WHERE number IS NULL OR number > ? OR number < ? OR number != number",
                             (MAX_NUMBER, -MAX_NUMBER, MAX_NUMBER, -MAX_NUMBER)).rowcount
        if n:
            log.warning("%d queue number(s) in %s were out of range; set to ±%d", n, self.path, MAX_NUMBER)

    def close(self) -> None:
        with self._cond, self._read_lock:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
            if self._reader is not self._db:
                self._reader.close()
            self._db.close()
            if self._lock_file is not None:
                self._lock_file.close()

    def _add_pending(self, seq: int, item: QueueItem) -> None:
        self._items[item.prompt_id] = (seq, item)
        heapq.heappush(self._heap, (float(item.number), seq, item.prompt_id))

    # -- queueing -------------------------------------------------------------------------------

    def put(self, prompt_id: str, prompt: dict, extra_data: dict, outputs: list[str], *,
            number: float | None = None, front: bool = False, sensitive: dict | None = None,
            prepared: Any = None) -> QueueItem:
        """Queue a validated prompt. Without ``number`` it gets the next one (negated with
        ``front``, so it runs before everything queued). ``sensitive`` and ``prepared`` stay
        in memory with the item (see ``QueueItem``). Raises ``DuplicatePrompt``, and
        ``StorageError`` when the database cannot take it (nothing is queued then)."""
        if number is not None:
            number = check_number(number)
        with self._cond:
            self._check_open()
            given = number
            if number is None:
                number = -self._next_number if front else self._next_number
            item = QueueItem(_number(number), prompt_id, prompt, extra_data, list(outputs), dict(sensitive or {}),
                             prepared)
            seq = self._seq + 1
            try:
                self._db.execute(
                    "INSERT INTO prompts (seq, prompt_id, number, state, prompt, extra_data, outputs, created, "
                    "create_time, workflow_id) VALUES (?, ?, ?, 'pending', ?, ?, ?, ?, ?, ?)",
                    (seq, prompt_id, number, events.dumps(prompt), events.dumps(extra_data),
                     events.dumps(item.outputs), time.time(), _create_time(extra_data), workflow_id(extra_data)))
            except sqlite3.IntegrityError as exc:
                if _duplicate_id(exc):
                    raise DuplicatePrompt(f"prompt id {prompt_id!r} is already queued or in the history") from None
                raise QueueError(f"cannot queue prompt {prompt_id!r}: {exc}") from exc
            except sqlite3.Error as exc:
                raise StorageError(f"queue prompt {prompt_id!r}", exc) from exc
            if given is None:
                self._next_number += 1
            self._seq = seq
            self._add_pending(seq, item)
            self._cond.notify_all()
            return item

    def _head(self) -> tuple[int, QueueItem] | None:
        """The first pending prompt, as ``(seq, item)`` (stale heap entries dropped on the way)."""
        while self._heap:
            _, seq, pid = self._heap[0]
            entry = self._items.get(pid)
            if entry is not None and entry[0] == seq:
                return entry
            heapq.heappop(self._heap)
        return None

    def _wait_pending(self, deadline: float | None, stop: threading.Event | None) -> bool:
        """Wait (holding the condition) until a prompt is pending: False on timeout, on
        ``stop`` or when the queue is closed."""
        while not self._closed and not self._items:
            if stop is not None and stop.is_set():
                return False
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return False
            self._cond.wait(remaining)
        return not self._closed and not (stop is not None and stop.is_set())

    def next_pending(self, timeout: float | None = None, stop: threading.Event | None = None) -> QueueItem | None:
        """The prompt that runs next, left in the queue; waits up to ``timeout`` seconds for
        one. ``None`` on timeout, when the queue is closed, or once ``stop`` is set (call
        ``wake()`` after setting it)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            if not self._wait_pending(deadline, stop):
                return None
            head = self._head()
            return head[1] if head is not None else None

    def claim(self, worker: str, timeout: float | None = None, stop: threading.Event | None = None, *,
              prompt_id: str | None = None) -> QueueItem | None:
        """Take a pending prompt for ``worker`` and mark it running: ``prompt_id``, or else the
        first one (waiting up to ``timeout`` seconds for one). ``None`` on timeout, when the
        queue is closed, once ``stop`` is set, or when ``prompt_id`` is no longer pending.
        The database is written first: when it refuses (``StorageError``), the prompt stays
        pending, as it was."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            if prompt_id is not None:
                self._check_open()
                entry = self._items.get(prompt_id)
            else:
                entry = self._head() if self._wait_pending(deadline, stop) else None
            if entry is None:
                return None
            seq, item = entry
            now = time.time()
            try:
                self._db.execute("UPDATE prompts SET state = 'running', started = ?, worker = ? WHERE seq = ?",
                                 (now, worker, seq))
            except sqlite3.Error as exc:
                raise StorageError(f"start prompt {item.prompt_id!r}", exc) from exc
            del self._items[item.prompt_id]
            self._running[item.prompt_id] = Running(seq, item, worker, now)
            return item

    def finish(self, item: QueueItem, outcome: Outcome, meta: dict | None = None) -> None:
        """Move a running prompt to the history (``StorageError``: it stays running)."""
        status = {"status_str": outcome.status_str, "completed": outcome.status == "success",
                  "messages": outcome.messages}
        if meta is None:
            meta = {n: {"node_id": n, "display_node": n, "parent_node": None, "real_node_id": n}
                    for n in outcome.outputs}
        status_text, result_text, meta_text = events.dumps(status), events.dumps(outcome.outputs), events.dumps(meta)
        start, end = _run_times(outcome.messages)
        with self._cond:
            self._check_open()
            try:
                cur = self._db.execute(
                    "UPDATE prompts SET state = 'done', finished = ?, finished_seq = ?, status = ?, result = ?, "
                    "meta = ?, status_str = ?, exec_start = ?, exec_end = ?, worker = NULL WHERE prompt_id = ?",
                    (time.time(), self._finished_seq + 1, status_text, result_text, meta_text, _outcome(outcome),
                     start, end, item.prompt_id))
            except sqlite3.Error as exc:
                raise StorageError(f"record the history of prompt {item.prompt_id!r}", exc) from exc
            self._finished_seq += 1
            if cur.rowcount:
                self._done += 1
            self._running.pop(item.prompt_id, None)
            self._trim_history()
            self._cond.notify_all()
        self._checkpoint()

    def requeue(self, item: QueueItem) -> int:
        """Put a running prompt back in the queue, at its old place (its worker died under
        it); returns how many runs it has lost so far. ``StorageError``: it stays running."""
        with self._cond:
            self._check_open()
            running = self._running.get(item.prompt_id)
            if running is None:
                raise QueueError(f"prompt {item.prompt_id!r} is not running")
            try:
                self._db.execute("UPDATE prompts SET state = 'pending', started = NULL, worker = NULL, "
                                 "tries = tries + 1 WHERE seq = ?", (running.seq,))
            except sqlite3.Error as exc:
                raise StorageError(f"queue prompt {item.prompt_id!r} again", exc) from exc
            del self._running[item.prompt_id]
            item.tries += 1
            self._add_pending(running.seq, item)
            self._cond.notify_all()
            return item.tries

    def wake(self) -> None:
        """Wake threads waiting in ``claim`` or ``next_pending`` (to see their ``stop`` event)."""
        with self._cond:
            self._cond.notify_all()

    def release(self, item: QueueItem) -> None:
        """Forget a running prompt without a history entry: it stays 'running' in the
        database, for ``recover`` on the next start (used when the server stops mid-run)."""
        with self._cond:
            if self._running.pop(item.prompt_id, None) is not None:
                self._cond.notify_all()

    def recover(self, *, requeue: bool = False) -> list[str]:
        """After a crash: the prompts left 'running' are marked failed (or queued again with
        ``requeue``). Returns their ids. Call once at start-up, before any claim."""
        with self._cond:
            self._check_open()
            rows = self._db.execute("SELECT seq, number, prompt_id, prompt, extra_data, outputs, tries FROM prompts "
                                    "WHERE state = 'running' ORDER BY seq").fetchall()
            now = time.time()
            for row in rows:
                seq, pid = row[0], row[2]
                if requeue:
                    self._db.execute("UPDATE prompts SET state = 'pending', started = NULL, worker = NULL "
                                     "WHERE seq = ?", (seq,))
                    self._add_pending(seq, self._item(row[1:]))
                    continue
                error = events.execution_error(pid, "the server stopped while this prompt was running",
                                               exception_type="nodeflow.queue.ServerStopped")
                error["timestamp"] = int(now * 1000)
                status = {"status_str": "error", "completed": False, "messages": [["execution_error", error]]}
                self._finished_seq += 1
                self._db.execute(
                    "UPDATE prompts SET state = 'done', finished = ?, finished_seq = ?, status = ?, result = '{}', "
                    "meta = '{}', status_str = 'error', exec_start = NULL, exec_end = ?, worker = NULL WHERE seq = ?",
                    (now, self._finished_seq, events.dumps(status), error["timestamp"], seq))
                self._done += 1
            self._cond.notify_all()
            return [row[2] for row in rows]

    def delete_pending(self, prompt_ids: Iterable[str]) -> int:
        """Delete these pending prompts (running ones stay). May take a while for many: call
        it off an event loop."""
        with self._cond:
            self._check_open()
            entries = [entry for pid in dict.fromkeys(map(str, prompt_ids))
                       if (entry := self._items.pop(pid, None)) is not None]
        self._delete_entries(entries)
        return len(entries)

    def clear_pending(self) -> int:
        """Delete every pending prompt. May take a while for many: call it off an event loop."""
        with self._cond:
            self._check_open()
            entries = list(self._items.values())
            self._items.clear()
            self._heap.clear()
        self._delete_entries(entries)
        return len(entries)

    def _delete_entries(self, entries: list[tuple[int, QueueItem]]) -> None:
        # The prompts are already out of the in-memory queue: no one can claim them meanwhile.
        # Those the database refuses to delete (disk full) go back, and the error is raised.
        for i in range(0, len(entries), _DELETE_BATCH):
            with self._cond:
                self._check_open()
                batch = entries[i:i + _DELETE_BATCH]
                try:
                    self._db.executemany("DELETE FROM prompts WHERE seq = ?", [(seq,) for seq, _ in batch])
                except sqlite3.Error as exc:
                    for seq, item in entries[i:]:
                        self._add_pending(seq, item)
                    self._cond.notify_all()
                    raise StorageError("delete the queued prompts", exc) from exc
            self._pause()
        if entries:
            self._checkpoint(every=0)

    # -- reading the queue --------------------------------------------------------------------------

    def remaining(self) -> int:
        """ComfyUI's ``queue_remaining``: pending plus running."""
        return len(self._items) + len(self._running)

    def pending_count(self) -> int:
        return len(self._items)

    def pending(self) -> list[QueueItem]:
        """The pending prompts in the order they will run."""
        with self._cond:
            entries = sorted(self._items.values(), key=lambda e: (float(e[1].number), e[0]))
        return [item for _, item in entries]

    def running(self) -> list[QueueItem]:
        """The running prompts, in the order they started."""
        with self._cond:
            return [r.item for r in self._running.values()]

    def running_entries(self) -> list[Running]:
        """The running prompts with their workers, in the order they started."""
        with self._cond:
            return list(self._running.values())

    def state_of(self, prompt_id: str) -> str | None:
        """'pending', 'running', 'done' or None."""
        with self._cond:
            if prompt_id in self._items:
                return "pending"
            self._check_open()
            row = self._db.execute("SELECT state FROM prompts WHERE prompt_id = ?", (prompt_id,)).fetchone()
        return row[0] if row else None

    def get_pending(self, prompt_id: str) -> QueueItem | None:
        entry = self._items.get(prompt_id)
        return entry[1] if entry is not None else None

    @staticmethod
    def _item(row: tuple) -> QueueItem:
        number, pid, prompt, extra, outputs, tries = row
        return QueueItem(_number(number), pid, json.loads(prompt), json.loads(extra), json.loads(outputs),
                         tries=tries or 0)

    # -- history -------------------------------------------------------------------------------------

    def history_json(self, max_items: int | None = None, offset: int | None = None,
                     prompt_id: str | None = None) -> str:
        """The history as a JSON object text ``{prompt_id: entry}``, oldest first, built from
        the stored JSON without decoding it. ``max_items`` alone gives the newest ones."""
        with self._reading() as db:
            if prompt_id is not None:
                rows = db.execute(_HISTORY_SELECT + " AND prompt_id = ?", (prompt_id,)).fetchall()
            else:
                if offset is None or offset < 0:
                    offset = max(self._done - max_items, 0) if max_items is not None else 0
                limit = max_items if max_items is not None else -1
                rows = db.execute(_HISTORY_SELECT + " ORDER BY finished_seq LIMIT ? OFFSET ?",
                                  (limit, offset)).fetchall()
        parts = []
        for number, pid, prompt, extra, outputs, status, result, meta in rows:
            key = json.dumps(pid)
            parts.append(f'{key}:{{"prompt":[{json.dumps(_number(number))},{key},{prompt},{extra},{outputs}],'
                         f'"outputs":{result or "{}"},"status":{status or "null"},"meta":{meta or "{}"}}}')
        return "{" + ",".join(parts) + "}"

    def history(self, max_items: int | None = None, offset: int | None = None,
                prompt_id: str | None = None) -> dict[str, dict]:
        return json.loads(self.history_json(max_items, offset, prompt_id))

    def history_count(self) -> int:
        return self._done

    def history_jobs(self, *, outcomes: Iterable[str] | None = None, workflow: str | None = None,
                     by_duration: bool = False, descending: bool = True,
                     limit: int | None = None) -> tuple[int, list[tuple]]:
        """The history as the jobs view sorts it, without decoding any entry: ``(total,
        keys)``, ``keys`` being at most ``limit`` tuples ``(sort key, prompt_id)`` in order.
        ``outcomes``: only those that ended so ("success", "error", "interrupted"); ``workflow``:
        only those of that editor workflow id. The sort key is ``(create_time, number,
        prompt_id)``, or with ``by_duration`` ``(run time in ms, create_time, number,
        prompt_id)``; the jobs still queued sort by the same keys."""
        where, params = "state = 'done'", []
        if outcomes is not None:
            wanted = set(outcomes)
            if not wanted <= {"success", "error", "interrupted"}:
                raise ValueError(f"unknown outcome(s): {', '.join(sorted(wanted))}")
            # An entry whose outcome was never recorded counts as a success, as in ComfyUI.
            clauses = ["COALESCE(status_str, '') NOT IN ('error', 'interrupted')"] if "success" in wanted else []
            others = sorted(wanted - {"success"})
            if others:
                clauses.append(f"status_str IN ({', '.join('?' * len(others))})")
                params += others
            where += f" AND ({' OR '.join(clauses)})" if clauses else " AND 0"
        if workflow is not None:
            where += " AND workflow_id = ?"
            params.append(workflow)
        direction = "DESC" if descending else "ASC"
        order = ", ".join(f"{c} {direction}" for c in ("create_time", "number", "prompt_id"))
        if by_duration:
            order = f"duration {direction}, {order}"
        with self._reading() as db:
            total = db.execute(f"SELECT COUNT(*) FROM prompts WHERE {where}", params).fetchone()[0]
            rows = db.execute(
                "SELECT CASE WHEN exec_start IS NOT NULL AND exec_end IS NOT NULL THEN exec_end - exec_start "
                "ELSE 0 END "
                f"AS duration, COALESCE(create_time, 0) AS ct, number, prompt_id FROM prompts WHERE {where} "
                f"ORDER BY {order} LIMIT ?", (*params, -1 if limit is None else limit)).fetchall()
        keys = [((d, ct, _number(n), pid) if by_duration else (ct, _number(n), pid), pid) for d, ct, n, pid in rows]
        return total, keys

    def history_summaries(self, prompt_ids: Iterable[str]) -> dict[str, dict]:
        """What the jobs view shows of these history entries: ``{prompt_id: {"number",
        "create_time", "workflow_id", "exec_start", "exec_end", "status", "outputs"}}`` (only
        the status and the outputs are decoded; the workflow is not read)."""
        ids = list(dict.fromkeys(prompt_ids))
        found: dict[str, dict] = {}
        with self._reading() as db:
            for i in range(0, len(ids), 500):
                chunk = ids[i:i + 500]
                rows = db.execute("SELECT prompt_id, number, create_time, workflow_id, exec_start, exec_end, status, "
                                  f"result FROM prompts WHERE state = 'done' AND prompt_id IN "
                                  f"({','.join('?' * len(chunk))})", chunk).fetchall()
                for pid, number, ct, wid, start, end, status, result in rows:
                    found[pid] = {"number": _number(number), "create_time": ct, "workflow_id": wid,
                                  "exec_start": start, "exec_end": end,
                                  "status": json.loads(status) if status else {},
                                  "outputs": json.loads(result) if result else {}}
        return found

    def delete_history(self, prompt_ids: Iterable[str]) -> int:
        """Delete these history entries. May take a while for many: call it off an event loop."""
        ids = list(dict.fromkeys(map(str, prompt_ids)))
        n = 0
        for i in range(0, len(ids), _DELETE_BATCH):
            with self._cond:
                self._check_open()
                cur = self._db.executemany("DELETE FROM prompts WHERE prompt_id = ? AND state = 'done'",
                                           [(pid,) for pid in ids[i:i + _DELETE_BATCH]])
                self._done -= cur.rowcount
                n += cur.rowcount
            self._pause()
        self._checkpoint(every=0)
        return n

    def clear_history(self) -> int:
        """Delete the whole history (what finished before the call), a batch of rows per
        transaction. It takes a while for a long history: call it off an event loop."""
        with self._cond:
            self._check_open()
            last = self._finished_seq
        n = 0
        while True:
            with self._cond:
                self._check_open()
                deleted = self._db.execute(
                    "DELETE FROM prompts WHERE seq IN (SELECT seq FROM prompts WHERE finished_seq IS NOT NULL "
                    "AND finished_seq <= ? AND state = 'done' ORDER BY finished_seq LIMIT ?)",
                    (last, _DELETE_BATCH)).rowcount
                self._done -= deleted
                n += deleted
            if deleted < _DELETE_BATCH:
                self._checkpoint(every=0)
                return n
            self._pause()

    def _trim_history(self) -> None:
        excess = self._done - self.max_history
        if self.max_history > 0 and excess > 0:
            try:
                n = self._db.execute("DELETE FROM prompts WHERE seq IN (SELECT seq FROM prompts WHERE finished_seq "
                                     "IS NOT NULL AND state = 'done' ORDER BY finished_seq LIMIT ?)",
                                     (excess,)).rowcount
            except sqlite3.Error as exc:  # a full disk, say: the next finish tries again
                log.warning("could not trim the history of %s: %s", self.path, exc)
                return
            self._done -= n

    # -- settings (the web frontend's, a small key-value store) -------------------------------------

    def settings(self) -> dict[str, Any]:
        with self._cond:
            self._check_open()
            rows = self._db.execute("SELECT key, value FROM settings ORDER BY key").fetchall()
        return {k: json.loads(v) for k, v in rows}

    def setting(self, key: str) -> Any:
        with self._cond:
            self._check_open()
            row = self._db.execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def set_settings(self, values: dict[str, Any]) -> None:
        with self._cond:
            self._check_open()
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    self._db.executemany("INSERT INTO settings (key, value) VALUES (?, ?) "
                                         "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                                         [(str(k), events.dumps(v)) for k, v in values.items()])
                    self._db.execute("COMMIT")
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                raise StorageError("save the settings", exc) from exc

    def _check_open(self) -> None:
        if self._closed:
            raise QueueError("the queue is closed")

    def _pause(self) -> None:
        """Between two batches of a bulk deletion: let waiting threads have the lock, and
        keep the WAL short."""
        time.sleep(_DELETE_PAUSE)
        self._checkpoint(every=_BULK_CHECKPOINT_INTERVAL)

    def _checkpoint(self, every: float = _CHECKPOINT_INTERVAL) -> None:
        """Copy the WAL into the database (a passive checkpoint: writers go on meanwhile),
        unless one ran less than ``every`` seconds ago. Called without the queue's lock."""
        now = time.monotonic()
        if self._reader is self._db or now - self._last_checkpoint < every:
            return
        self._last_checkpoint = now
        with self._read_lock:
            if not self._closed:
                try:
                    self._reader.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                except sqlite3.Error as exc:  # busy, say: the next one catches up
                    log.debug("checkpoint of %s skipped: %s", self.path, exc)

    @contextlib.contextmanager
    def _reading(self) -> Iterator[sqlite3.Connection]:
        """The connection for long reads, held for the duration of the ``with``."""
        if self._reader is self._db:  # ":memory:": one connection, the writer's lock
            with self._cond:
                self._check_open()
                yield self._db
        else:
            with self._read_lock:
                self._check_open()
                yield self._reader


def _duplicate_id(exc: sqlite3.IntegrityError) -> bool:
    """Whether an IntegrityError is the unique constraint on ``prompt_id`` (and not, say, a
    NOT NULL one)."""
    return "UNIQUE" in str(exc) and "prompt_id" in str(exc)


def _job_columns(extra_text: str, status_text: str | None) -> tuple:
    try:
        extra = json.loads(extra_text)
    except ValueError:
        extra = {}
    try:
        status = json.loads(status_text) if status_text else None
    except ValueError:
        status = None
    extra = extra if isinstance(extra, dict) else {}
    status = status if isinstance(status, dict) else None
    start, end = _run_times(status.get("messages") if status else ())
    status_str = status.get("status_str") if status else None
    if status_str == "error" and _was_interrupted(status_text):
        status_str = "interrupted"
    return _create_time(extra), workflow_id(extra), status_str if isinstance(status_str, str) else None, start, end


def _outcome(outcome: Outcome) -> str:
    """The jobs columns' ``status_str``: how the prompt ended."""
    return outcome.status if outcome.status in ("success", "interrupted") else "error"


def _was_interrupted(status_text: str | None) -> bool:
    """Whether a stored history status says the prompt was interrupted."""
    try:
        status = json.loads(status_text) if status_text else None
    except ValueError:
        return False
    messages = status.get("messages") if isinstance(status, dict) else None
    return isinstance(messages, list) and any(
        isinstance(m, list) and m[:1] == ["execution_interrupted"] for m in messages)


_HISTORY_SELECT = ("SELECT number, prompt_id, prompt, extra_data, outputs, status, result, meta FROM prompts "
                   "WHERE finished_seq IS NOT NULL AND state = 'done'")


