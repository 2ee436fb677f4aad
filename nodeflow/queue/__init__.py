"""The prompt queue, its history, and the workers that run its prompts.

    front end ──put──► PromptQueue (SQLite) ──claim(worker)──► Dispatcher ──execute──► Worker
                           ▲                                      │ events (ComfyUI's)   │
                           └───────── finish (history) ◄──────────┘ ◄────────────────────┘

- ``store``: ``PromptQueue``, persistent and shared by every front end; the single source of
  truth, holding the pending prompts, the running ones (one per worker) and the history.
- ``dispatcher``: ``Dispatcher`` hands prompts to idle workers (the one holding the prompt's
  models first), records how they end, and sends a prompt whose worker died back to the queue.
- ``backends``: the ``Worker`` and ``Backend`` protocols; ``LocalBackend``, workers in this
  process. ``ray_backend``: ``RayBackend``, workers as Ray actors (the ``ray`` extra).

The queue never sees an executor, a worker never sees SQLite. Nothing here imports torch,
aiohttp or Ray.
"""

from nodeflow.events import STATUS_EVENTS
from nodeflow.queue.backends import (
    Backend,
    BackendError,
    LocalBackend,
    LocalWorker,
    Worker,
    WorkerInfo,
    WorkerLost,
    WorkerSet,
    all_cached,
    prompt_models,
    run_prompt,
)
from nodeflow.queue.dispatcher import Dispatcher, Emit, choose_worker
from nodeflow.queue.store import (
    MAX_NUMBER,
    SENSITIVE_EXTRA_DATA_KEYS,
    DuplicatePrompt,
    InvalidNumber,
    Outcome,
    PromptQueue,
    QueueError,
    QueueItem,
    QueueLocked,
    StorageError,
    check_number,
    default_db_path,
    workflow_id,
)

__all__ = [
    "MAX_NUMBER", "SENSITIVE_EXTRA_DATA_KEYS", "STATUS_EVENTS", "Backend", "BackendError", "Dispatcher",
    "DuplicatePrompt", "Emit", "InvalidNumber", "LocalBackend", "LocalWorker", "Outcome", "PromptQueue",
    "QueueError", "QueueItem", "QueueLocked", "StorageError", "Worker", "WorkerInfo", "WorkerLost", "WorkerSet",
    "all_cached", "check_number", "choose_worker", "default_db_path", "prompt_models", "run_prompt", "workflow_id",
]
