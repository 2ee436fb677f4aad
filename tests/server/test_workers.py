"""Several workers: prompts at once, model affinity, a worker lost under its prompt, a full
disk, and the run contexts that keep workers apart (in-process workers; Ray's are in test_ray.py)."""

import asyncio
import sqlite3
import threading
import time

import pytest
from server_helpers import async_test, chain, make_registry, serve, submit, wait_history

from nodeflow import context as run_context
from nodeflow.folders import Folders
from nodeflow.queue import (
    Dispatcher,
    LocalBackend,
    LocalWorker,
    PromptQueue,
    StorageError,
    WorkerInfo,
    WorkerLost,
    WorkerSet,
    choose_worker,
)
from nodeflow.server.common import QUEUE


def wait_for(predicate, timeout=10.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.01)
    raise AssertionError("timed out")


def model_prompt(name, seed):
    return {"1": {"class_type": "FakeLoad", "inputs": {"ckpt_name": name}},
            "2": {"class_type": "UseModel", "inputs": {"model": ["1", 0], "seed": seed}}}


def meeting(value, parties=2, timeout=5.0):
    return {"1": {"class_type": "Const", "inputs": {"value": value}},
            "2": {"class_type": "Meet", "inputs": {"x": ["1", 0], "parties": parties, "timeout": timeout}},
            "3": {"class_type": "Show", "inputs": {"value": ["2", 0]}}}


def cached_nodes(entry):
    return next(d["nodes"] for e, d in entry["status"]["messages"] if e == "execution_cached")


# -- several prompts at once ------------------------------------------------------------------------


async def wait_idle(client):
    """The workers, once none is busy (a worker is let go just after its prompt's history is written)."""
    for _ in range(500):
        workers = (await (await client.get("/api/workers")).json())["workers"]
        if all(w["state"] == "idle" and w["prompt_id"] is None for w in workers):
            return workers
        await asyncio.sleep(0.01)
    raise AssertionError(f"workers still busy: {workers}")


@async_test
async def test_two_local_workers_run_two_prompts_at_once(tmp_path):
    async with serve(tmp_path, workers=2) as client:
        # Each prompt waits until the other is under way too: only two workers at once pass.
        a = await submit(client, meeting(1))
        b = await submit(client, meeting(2))
        for pid in (a["prompt_id"], b["prompt_id"]):
            entry = await wait_history(client, pid)
            assert entry["status"]["status_str"] == "success", entry
        workers = await wait_idle(client)
        assert [w["id"] for w in workers] == ["local-1", "local-2"]
        assert sorted(w["prompts_done"] for w in workers) == [1, 1]
        assert all(w["state"] == "idle" and w["prompt_id"] is None for w in workers)


@async_test
async def test_one_worker_by_default_runs_one_at_a_time(tmp_path):
    async with serve(tmp_path) as client:
        workers = (await (await client.get("/workers")).json())["workers"]
        assert [(w["id"], w["state"]) for w in workers] == [("local", "idle")]
        first = await submit(client, meeting(1, timeout=0.5))  # alone, it never meets the second one
        second = await submit(client, meeting(2, timeout=0.5))
        entry = await wait_history(client, first["prompt_id"])
        assert entry["status"]["status_str"] == "error"
        assert "BrokenBarrierError" in entry["status"]["messages"][-1][1]["exception_type"]
        spec = await (await client.get("/openapi.json")).json()
        assert "/api/workers" in spec["paths"] or "/workers" in spec["paths"]
        await wait_history(client, second["prompt_id"])


# -- routing ---------------------------------------------------------------------------------------


class Stub:
    def __init__(self, wid, models=(), last_used=0.0):
        self.id = wid
        self._info = WorkerInfo(wid, state="ready", models=list(models), last_used=last_used)

    def info(self):
        return self._info


def test_routing_prefers_the_worker_holding_the_models_then_the_least_recently_used():
    a, b, c = Stub("a", ["checkpoints/x"], 5.0), Stub("b", ["checkpoints/y"], 1.0), Stub("c", [], 0.0)
    assert choose_worker([a, b, c], {"checkpoints/y"}) is b
    assert choose_worker([a, b, c], {"checkpoints/x", "loras/l"}) is a
    assert choose_worker([a, b, c], {"checkpoints/z"}) is c  # nothing to evict on c
    assert choose_worker([a, b], {"checkpoints/z"}) is b  # y was used longer ago than x
    assert choose_worker([a, b, c], set()) is c


@async_test
async def test_affinity_routing_loads_each_model_once(tmp_path):
    """A, A, B, B with two workers: round robin would load a model four times; affinity twice."""
    async with serve(tmp_path, workers=2) as client:
        ran = []
        for name, seed in (("a.safetensors", 1), ("a.safetensors", 2), ("b.safetensors", 3), ("b.safetensors", 4)):
            pid = (await submit(client, model_prompt(name, seed)))["prompt_id"]
            entry = await wait_history(client, pid)
            assert entry["status"]["status_str"] == "success", entry
            ran.append((entry["outputs"]["2"]["text"][2], "1" in cached_nodes(entry)))
            await wait_idle(client)
        assert ran == [("local-1", False), ("local-1", True), ("local-2", False), ("local-2", True)]
        workers = {w["id"]: w for w in (await (await client.get("/api/workers")).json())["workers"]}
        assert workers["local-1"]["models"] == ["checkpoints/a.safetensors"]
        assert workers["local-2"]["models"] == ["checkpoints/b.safetensors"]


# -- a worker lost under its prompt ----------------------------------------------------------------


class Dying(LocalWorker):
    """Dies under the first `deaths` prompts it is given (as a Ray actor whose process is killed)."""

    def __init__(self, registry, deaths, **kw):
        super().__init__(registry, **kw)
        self.deaths = deaths
        self._info.state = "ready"

    def execute(self, item, observer):
        if self.deaths:
            self.deaths -= 1
            self._info.last_used = time.time()
            observer("execution_start", {"prompt_id": item.prompt_id, "timestamp": 0})
            raise WorkerLost(self.id, "its process was killed")
        return super().execute(item, observer)


def run_until_history(queue, count, dispatcher):
    dispatcher.start()
    try:
        wait_for(lambda: queue.history_count() >= count)
    finally:
        dispatcher.stop()


def test_a_prompt_whose_worker_dies_runs_again_on_another(tmp_path):
    registry = make_registry()
    q = PromptQueue(tmp_path / "q.db")
    dying = Dying(registry, deaths=1, worker_id="w1")
    good = LocalWorker(registry, worker_id="w2")
    events = []
    disp = Dispatcher(q, WorkerSet([dying, good]), lambda e, d, c: events.append((e, d)))
    q.put("p", chain(7), {}, ["3"])
    run_until_history(q, 1, disp)
    entry = q.history()["p"]
    assert entry["status"]["status_str"] == "success" and entry["outputs"]["3"] == {"text": ["17"]}
    # Lost once (counted in the database), then done by the other worker.
    assert good.info().done == 1 and dying.deaths == 0
    assert q._db.execute("SELECT tries FROM prompts WHERE prompt_id = 'p'").fetchone()[0] == 1
    closing = [d for e, d in events if e == "executing" and d["node"] is None]
    assert len(closing) == 1  # the client sees the prompt end once


def test_a_prompt_that_loses_every_worker_fails_naming_the_worker(tmp_path):
    registry = make_registry()
    q = PromptQueue(tmp_path / "q.db")
    workers = [Dying(registry, deaths=10, worker_id=f"w{i}") for i in (1, 2)]
    disp = Dispatcher(q, WorkerSet(workers), max_tries=3)
    q.put("p", chain(7), {}, ["3"])
    run_until_history(q, 1, disp)
    status = q.history()["p"]["status"]
    error = status["messages"][-1][1]
    assert status["status_str"] == "error" and error["exception_type"] == "nodeflow.queue.WorkerLost"
    assert "worker w" in error["exception_message"] and "3 time(s)" in error["exception_message"]
    assert sum(10 - w.deaths for w in workers) == 3


def test_tries_survive_a_restart(tmp_path):
    path = tmp_path / "q.db"
    q = PromptQueue(path)
    q.put("p", chain(), {}, ["3"])
    item = q.claim("w1", 0)
    assert q.requeue(item) == 1 and q.pending()[0].tries == 1
    q.close()
    assert PromptQueue(path).pending()[0].tries == 1


# -- a full disk ------------------------------------------------------------------------------------


class FullDisk:
    """The queue's connection, refusing the statements that match `when`."""

    def __init__(self, real, when):
        self.real, self.when = real, when

    def execute(self, sql, *args):
        if self.when(sql):
            raise sqlite3.OperationalError("database or disk is full")
        return self.real.execute(sql, *args)

    def executemany(self, sql, *args):
        if self.when(sql):
            raise sqlite3.OperationalError("database or disk is full")
        return self.real.executemany(sql, *args)

    def __getattr__(self, name):
        return getattr(self.real, name)


@async_test
async def test_a_full_disk_answers_503_and_loses_nothing(tmp_path):
    async with serve(tmp_path) as client:
        queue = client.app[QUEUE]
        done = await submit(client, chain(1))
        await wait_history(client, done["prompt_id"])
        # The database can grow no more: a new prompt is refused, clearly, and changes nothing.
        pages = queue._db.execute("PRAGMA page_count").fetchone()[0]
        queue._db.execute(f"PRAGMA max_page_count = {pages}")
        refused = None
        for i in range(200):
            resp = await client.post("/prompt", json={"prompt": chain(100 + i, pad={"class_type": "Const",
                                                                                     "inputs": {"value": i}})})
            if resp.status != 200:
                refused = (resp.status, await resp.json(), dict(resp.headers))
                break
        assert refused is not None, "the database never filled up"
        status, body, headers = refused
        assert status == 503 and body["error"]["type"] == "storage_unavailable"
        assert "disk" in body["error"]["details"] and "Retry-After" in headers
        queue._db.execute("PRAGMA max_page_count = 1073741823")
        again = await submit(client, chain(999))
        entry = await wait_history(client, again["prompt_id"])
        assert entry["status"]["status_str"] == "success"
        history = await (await client.get("/history")).json()
        assert done["prompt_id"] in history  # nothing accepted went missing


@async_test
async def test_a_prompt_that_cannot_start_or_be_recorded_stays_and_runs_later(tmp_path):
    from nodeflow.queue import dispatcher as dispatcher_module

    dispatcher_module.RETRY_INTERVAL, saved = 0.05, dispatcher_module.RETRY_INTERVAL
    try:
        async with serve(tmp_path) as client:
            queue = client.app[QUEUE]
            real = queue._db
            queue._db = FullDisk(real, lambda sql: "state = 'running'" in sql)
            pid = (await submit(client, chain(3)))["prompt_id"]
            await asyncio.sleep(0.3)
            listed = await (await client.get("/queue")).json()
            assert [e[1] for e in listed["queue_pending"]] == [pid]  # still there, still pending
            # It may start now, but its history cannot be written: it stays listed as running.
            queue._db = FullDisk(real, lambda sql: "state = 'done'" in sql)
            await asyncio.sleep(0.5)
            listed = await (await client.get("/queue")).json()
            assert [e[1] for e in listed["queue_running"]] == [pid]
            assert await (await client.get(f"/history/{pid}")).json() == {}
            queue._db = real
            entry = await wait_history(client, pid)
            assert entry["status"]["status_str"] == "success" and entry["outputs"]["3"] == {"text": ["13"]}
    finally:
        dispatcher_module.RETRY_INTERVAL = saved


def test_storage_errors_change_nothing(tmp_path):
    q = PromptQueue(tmp_path / "q.db")
    q.put("a", chain(), {}, ["3"])
    real = q._db
    q._db = FullDisk(real, lambda sql: sql.startswith(("INSERT", "UPDATE", "DELETE")))
    with pytest.raises(StorageError, match="disk holding the queue database is full"):
        q.put("b", chain(), {}, ["3"])
    with pytest.raises(StorageError):
        q.claim("w", 0)
    with pytest.raises(StorageError):
        q.delete_pending(["a"])
    q._db = real
    assert [i.prompt_id for i in q.pending()] == ["a"] and q.state_of("b") is None
    assert q.put("b", chain(), {}, ["3"]).number == 1  # numbering went on as if nothing happened


# -- run contexts ----------------------------------------------------------------------------------


def test_workers_in_one_process_keep_their_own_folders_and_devices(tmp_path):
    registry = make_registry()
    contexts = [run_context.RunContext(Folders.from_base(tmp_path / name), device="cpu" if name == "a" else "meta",
                                       name=name) for name in ("a", "b")]
    workers = [LocalWorker(registry, worker_id=c.name, run_context=c) for c in contexts]
    q = PromptQueue(tmp_path / "q.db")
    disp = Dispatcher(q, WorkerSet(workers))
    prompt = {**meeting(1), "4": {"class_type": "WhereAmI", "inputs": {"x": ["2", 0]}}}
    q.put("p1", prompt, {}, ["3", "4"])
    q.put("p2", {**prompt, "1": {"class_type": "Const", "inputs": {"value": 2}}}, {}, ["3", "4"])
    run_until_history(q, 2, disp)
    seen = {e["outputs"]["4"]["text"][2]: e["outputs"]["4"]["text"] for e in q.history().values()}
    # The two ran at once (they met), each seeing its own context only.
    assert seen["a"] == [str(tmp_path / "a" / "output"), "cpu", "a", str(tmp_path / "a")]
    assert seen["b"] == [str(tmp_path / "b" / "output"), "meta", "b", str(tmp_path / "b")]
    assert run_context.current() is run_context.default()  # nothing leaked into this thread


def test_local_backend_makes_a_context_per_worker(tmp_path):
    backend = LocalBackend(make_registry(), workers=2, devices=["cpu", "meta"])
    ctxs = [w.run_context for w in backend.workers()]
    assert [c.device for c in ctxs] == ["cpu", "meta"] and ctxs[0] is not ctxs[1]
    assert ctxs[0].state("x", object) is not ctxs[1].state("x", object)
    first, second = backend.workers()
    assert first.executor.cache is not second.executor.cache
    single = LocalBackend(make_registry())
    assert single.workers()[0].run_context is run_context.default()


def test_workers_take_the_fast_path_settings(tmp_path, monkeypatch):
    """--compile and --cuda-graphs reach every in-process worker's context, and a remote
    worker's through its WorkerSpec (checked there, on its own device)."""
    pytest.importorskip("torch")
    from nodeflow.queue.remote import WorkerRuntime, WorkerSpec

    monkeypatch.setattr(run_context.default(), "compile", "eager")
    backend = LocalBackend(make_registry(), workers=2, devices=["cpu", "cpu"])
    assert [(w.run_context.compile, w.run_context.cuda_graphs) for w in backend.workers()] == [("eager", False)] * 2
    runtime = WorkerRuntime(WorkerSpec("w1", base_dir=str(tmp_path), device="cpu", compile="aot_eager",
                                       builtin_nodes=False))
    try:
        assert (runtime.context.compile, runtime.context.cuda_graphs) == ("aot_eager", False)
    finally:
        runtime.close()
    with pytest.raises(ValueError, match="--cuda-graphs needs a CUDA device"):
        WorkerRuntime(WorkerSpec("w2", base_dir=str(tmp_path), device="cpu", cuda_graphs=True, builtin_nodes=False))


def test_dispatcher_survives_a_backend_whose_workers_are_all_dead(tmp_path, caplog):
    registry = make_registry()
    worker = LocalWorker(registry)
    worker._info.state, worker._info.error = "dead", "its process was killed"
    q = PromptQueue(tmp_path / "q.db")
    disp = Dispatcher(q, WorkerSet([worker]), poll=0.05)
    q.put("p", chain(), {}, ["3"])
    with caplog.at_level("ERROR"):
        disp.start()
        wait_for(lambda: "every worker is dead" in caplog.text)
    assert q.state_of("p") == "pending"  # it waits
    worker._info.state = "ready"
    disp._workers_changed()
    wait_for(lambda: q.history_count() == 1)
    disp.stop()
    assert threading.active_count() < 50
