"""The persistent queue and the worker, without HTTP."""

import threading
import time

import pytest
from server_helpers import chain, held, make_registry
from server_nodes import Hold

from nodeflow.queue import (
    Dispatcher,
    DuplicatePrompt,
    LocalBackend,
    LocalWorker,
    Outcome,
    PromptQueue,
    QueueLocked,
    WorkerSet,
)

WF = {"1": {"class_type": "Const", "inputs": {"value": 1}}}


def put(q, pid, **kw):
    return q.put(pid, WF, {"client_id": "c"}, ["1"], **kw)


def test_order_number_then_arrival_and_front(tmp_path):
    q = PromptQueue(tmp_path / "q.db")
    put(q, "a")
    put(q, "b")
    put(q, "c", front=True)
    put(q, "d", number=0.5)
    assert [i.prompt_id for i in q.pending()] == ["c", "a", "d", "b"]
    assert [i.number for i in q.pending()] == [-2, 0, 0.5, 1]
    assert q.claim("w1", 0).prompt_id == "c"
    assert q.claim("w2", 0).prompt_id == "a"  # one per worker: several run at once
    assert [i.prompt_id for i in q.running()] == ["c", "a"] and q.remaining() == 4
    assert [(r.item.prompt_id, r.worker) for r in q.running_entries()] == [("c", "w1"), ("a", "w2")]
    assert q.claim("w3", 0, prompt_id="b").prompt_id == "b"  # a chosen one
    assert q.claim("w4", 0, prompt_id="b") is None  # no longer pending
    assert q.claim("w4", 0).prompt_id == "d" and q.claim("w5", 0) is None
    q.close()


def test_entries_have_comfyui_shape(tmp_path):
    q = PromptQueue(tmp_path / "q.db")
    item = put(q, "a")
    assert item.to_comfy() == [0, "a", WF, {"client_id": "c"}, ["1"]]
    assert item.client_id == "c"


def test_duplicate_prompt_id_refused(tmp_path):
    q = PromptQueue(tmp_path / "q.db")
    put(q, "a")
    with pytest.raises(DuplicatePrompt):
        put(q, "a")
    q.finish(q.claim("w", 0), Outcome("success"))
    with pytest.raises(DuplicatePrompt):
        put(q, "a")  # in the history too


def test_survives_reopen_and_numbers_continue(tmp_path):
    path = tmp_path / "q.db"
    q = PromptQueue(path)
    for pid in "abc":
        put(q, pid, sensitive={"api_key_comfy_org": "secret"})
    first = q.claim("w", 0)
    q.finish(first, Outcome("success", {"1": {"text": ["x"]}}, [["execution_start", {"prompt_id": "a"}]]))
    q.claim("w", 0)  # "b" is running when the process dies
    q._db.close()  # no orderly close: as after a kill
    q._lock_file.close()

    q2 = PromptQueue(path)
    assert [i.prompt_id for i in q2.pending()] == ["c"]
    assert q2.recover() == ["b"]
    hist = q2.history()
    assert list(hist) == ["a", "b"]
    assert hist["a"]["outputs"] == {"1": {"text": ["x"]}}
    assert hist["a"]["status"] == {"status_str": "success", "completed": True,
                                   "messages": [["execution_start", {"prompt_id": "a"}]]}
    assert hist["b"]["status"]["status_str"] == "error"
    assert "stopped" in hist["b"]["status"]["messages"][0][1]["exception_message"]
    assert put(q2, "d").number == 3  # numbers continue
    # Secrets were never written to disk.
    assert b"secret" not in path.read_bytes() and b"secret" not in (tmp_path / "q.db-wal").read_bytes()


def test_recover_can_requeue(tmp_path):
    path = tmp_path / "q.db"
    q = PromptQueue(path)
    put(q, "a")
    put(q, "b")
    q.claim("w", 0)
    q.close()
    q2 = PromptQueue(path)
    assert q2.recover(requeue=True) == ["a"]
    assert [i.prompt_id for i in q2.pending()] == ["a", "b"]
    assert q2.history() == {}


def test_one_process_per_database(tmp_path):
    q = PromptQueue(tmp_path / "q.db")
    with pytest.raises(QueueLocked):
        PromptQueue(tmp_path / "q.db")
    q.close()
    PromptQueue(tmp_path / "q.db").close()


def test_delete_clear_and_history_limits(tmp_path):
    q = PromptQueue(tmp_path / "q.db", max_history=3)
    for pid in "abcdef":
        put(q, pid)
    assert q.delete_pending(["b", "zz"]) == 1
    assert [i.prompt_id for i in q.pending()] == ["a", "c", "d", "e", "f"]
    for _ in range(4):
        q.finish(q.claim("w", 0), Outcome("success"))
    assert list(q.history()) == ["c", "d", "e"]  # trimmed to the newest 3
    assert list(q.history(max_items=2)) == ["d", "e"]
    assert list(q.history(max_items=1, offset=0)) == ["c"]
    assert q.delete_history(["d"]) == 1 and list(q.history()) == ["c", "e"]
    assert q.clear_pending() == 1 and q.remaining() == 0
    assert q.clear_history() == 2 and q.history() == {}


def test_settings_store(tmp_path):
    q = PromptQueue(tmp_path / "q.db")
    q.set_settings({"Comfy.A": 1, "Comfy.B": {"x": [1, 2]}})
    q.set_settings({"Comfy.A": 2})
    assert q.settings() == {"Comfy.A": 2, "Comfy.B": {"x": [1, 2]}}
    assert q.setting("Comfy.B") == {"x": [1, 2]} and q.setting("nope") is None


def test_threads_submit_while_worker_drains(tmp_path):
    q = PromptQueue(tmp_path / "q.db")
    done = []
    disp = Dispatcher(q, LocalBackend(make_registry()),
                      lambda e, d, c: done.append(d["prompt_id"]) if e == "executing" and d["node"] is None else None)
    disp.start()

    def submit(k):
        for i in range(25):
            q.put(f"{k}-{i}", chain(value=k * 100 + i), {}, ["3"])

    threads = [threading.Thread(target=submit, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    deadline = time.monotonic() + 10
    while len(done) < 100 and time.monotonic() < deadline:
        time.sleep(0.01)
    disp.stop()
    assert len(done) == 100 and q.history_count() == 100
    assert all(e["status"]["status_str"] == "success" for e in q.history().values())


class Exploding(LocalWorker):
    """A worker that fails outside any node for some prompts."""

    def execute(self, item, observer):
        if item.prompt.get("explode"):
            raise KeyError("malformed")
        return super().execute(item, observer)


def test_worker_survives_anything(tmp_path):
    q = PromptQueue(tmp_path / "q.db")
    events = []
    disp = Dispatcher(q, WorkerSet([Exploding(make_registry())]), lambda e, d, c: events.append((e, d)))
    disp.start()
    q.put("bad", {**chain(), "explode": {"class_type": "Const", "inputs": {}}}, {}, ["3"])
    q.put("exit", {"1": {"class_type": "Const", "inputs": {"value": 1}},
                   "2": {"class_type": "Exit", "inputs": {"x": ["1", 0]}},
                   "3": {"class_type": "Show", "inputs": {"value": ["2", 0]}}}, {}, ["3"])
    q.put("good", chain(), {}, ["3"])
    deadline = time.monotonic() + 10
    while q.history_count() < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert disp.alive
    disp.stop()
    hist = q.history()
    assert hist["bad"]["status"]["status_str"] == "error"
    assert "KeyError" in hist["bad"]["status"]["messages"][-1][1]["exception_message"]
    assert hist["exit"]["status"]["status_str"] == "error"
    assert hist["good"]["status"]["status_str"] == "success"
    # Each prompt ends with executing/None, after its error.
    closing = [d["prompt_id"] for e, d in events if e == "executing" and d["node"] is None]
    assert closing == ["bad", "exit", "good"]


def test_stop_mid_run_leaves_it_for_recovery(tmp_path):
    path = tmp_path / "q.db"
    q = PromptQueue(path)
    Hold.GATE = threading.Event()
    disp = Dispatcher(q, LocalBackend(make_registry()))
    disp.start()
    q.put("long", held(), {}, ["3"])
    assert Hold.STARTED.wait(5)
    disp.stop()
    assert q.history() == {} and q.state_of("long") == "running"
    q.close()
    q2 = PromptQueue(path)
    assert q2.recover(requeue=True) == ["long"]


def test_prompt_invalid_at_run_time_fails_cleanly(tmp_path):
    """A queued prompt that no longer validates (e.g. queued by an older server, or its nodes
    are gone) fails with a clear error; a malformed link never reaches the executor."""
    q = PromptQueue(tmp_path / "q.db")
    events = []
    disp = Dispatcher(q, LocalBackend(make_registry()), lambda e, d, c: events.append((e, d)))
    broken = chain()
    broken["2"]["inputs"]["a"] = ["1", 0, "extra"]  # a malformed link
    q.put("broken", broken, {}, ["3"])
    q.put("good", chain(), {}, ["3"])
    disp.start()
    deadline = time.monotonic() + 10
    while q.history_count() < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    disp.stop()
    hist = q.history()
    err = hist["broken"]["status"]["messages"][-1][1]
    assert hist["broken"]["status"]["status_str"] == "error"
    assert err["node_id"] == "2" and "no longer valid" in err["exception_message"]
    assert "Bad link" in err["exception_message"]
    assert hist["good"]["status"]["status_str"] == "success"
    assert ("execution_error", err) in events


def test_numbers_checked_and_only_real_duplicates_reported(tmp_path):
    from nodeflow.queue import InvalidNumber

    q = PromptQueue(tmp_path / "q.db")
    for bad in (float("nan"), float("inf"), -float("inf"), 1e300, True, "3"):
        with pytest.raises(InvalidNumber):
            put(q, "a", number=bad)
    assert put(q, "a", number=2 ** 53).number == 2 ** 53 and put(q, "b").number == 0


def test_bad_stored_numbers_do_not_stop_a_restart(tmp_path):
    """A database written by an older server that took any float: infinities are stored as
    such. The queue opens anyway, and everything reads back as strict JSON."""
    import json
    import sqlite3

    path = tmp_path / "q.db"
    q = PromptQueue(path)
    put(q, "done")
    q.finish(q.claim("w", 0), Outcome("success"))
    put(q, "waiting")
    q.close()
    db = sqlite3.connect(path)
    db.execute("UPDATE prompts SET number = 9e999 WHERE prompt_id = 'done'")
    db.execute("UPDATE prompts SET number = -9e999 WHERE prompt_id = 'waiting'")
    db.commit()
    db.close()

    q = PromptQueue(path)
    strict = dict(parse_constant=lambda name: pytest.fail(f"{name} in JSON"))
    history = json.loads(q.history_json(), **strict)
    assert history["done"]["prompt"][0] == 2 ** 53
    assert [i.number for i in q.pending()] == [-(2 ** 53)]
    json.dumps([i.to_comfy() for i in q.pending()], allow_nan=False)
    assert put(q, "next").number == 2 ** 53 + 1  # numbering goes on


def test_databases_from_before_the_jobs_columns_are_migrated(tmp_path):
    import sqlite3

    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE prompts (seq INTEGER PRIMARY KEY, prompt_id TEXT NOT NULL UNIQUE, number REAL NOT NULL,
            state TEXT NOT NULL, prompt TEXT NOT NULL, extra_data TEXT NOT NULL, outputs TEXT NOT NULL,
            created REAL NOT NULL, started REAL, finished REAL, finished_seq INTEGER, status TEXT, result TEXT,
            meta TEXT);
        CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        INSERT INTO prompts VALUES (1, 'old', 0, 'done', '{}',
            '{"create_time": 1700, "extra_pnginfo": {"workflow": {"id": "wf"}}}', '[]', 0, 0, 0, 1,
            '{"status_str": "error", "completed": false, "messages": [["execution_start", {"timestamp": 5}],
              ["execution_error", {"timestamp": 9, "node_id": "2"}]]}', '{}', '{}');
        INSERT INTO prompts VALUES (2, 'stopped', 0, 'done', '{}', '{"create_time": 1800}', '[]', 0, 0, 0, 2,
            '{"status_str": "error", "completed": false, "messages": [["execution_start", {"timestamp": 5}],
              ["execution_interrupted", {"timestamp": 7, "node_id": "2"}]]}', '{}', '{}');
    """)
    db.commit()
    db.close()
    q = PromptQueue(path)
    total, keys = q.history_jobs(outcomes=["error"], workflow="wf")
    assert total == 1 and keys == [((1700, 0, "old"), "old")]
    row = q.history_summaries(["old"])["old"]
    assert (row["create_time"], row["workflow_id"], row["exec_start"], row["exec_end"]) == (1700, "wf", 5, 9)
    assert q.history_jobs(outcomes=["success"]) == (0, [])
    assert q.history_jobs(outcomes=["interrupted"])[1] == [((1800, 0, "stopped"), "stopped")]
    assert q.history_jobs(outcomes=[])[0] == 0 and q.history_jobs()[0] == 2


def test_interrupted_prompts_of_databases_with_the_jobs_columns_are_told_apart(tmp_path):
    """A database of the version before ``cancelled`` jobs: interrupted prompts stored as 'error'."""
    path = tmp_path / "q.db"
    q = PromptQueue(path)
    for pid, outcome in (("a", Outcome("success")), ("b", Outcome("error")), ("c", Outcome("interrupted"))):
        put(q, pid)
        messages = [["execution_interrupted", {"timestamp": 1}]] if outcome.status == "interrupted" else []
        q.finish(q.claim("w", 0), Outcome(outcome.status, messages=messages))
    assert q.history_jobs(outcomes=["interrupted"])[1][0][1] == "c"
    q._db.execute("UPDATE prompts SET status_str = 'error' WHERE prompt_id = 'c'")
    q._db.execute("PRAGMA user_version = 0")
    q.close()
    q = PromptQueue(path)
    assert [k[1] for k in q.history_jobs(outcomes=["interrupted"])[1]] == ["c"]
    assert [k[1] for k in q.history_jobs(outcomes=["error"])[1]] == ["b"]
    assert [k[1] for k in q.history_jobs(outcomes=["success", "error"], descending=False)[1]] == ["a", "b"]
    with pytest.raises(ValueError):
        q.history_jobs(outcomes=["cancelled"])


def test_clearing_lets_go_of_the_lock_between_batches(tmp_path, monkeypatch):
    """A long history is deleted a batch per transaction: a submission never waits for all of it."""
    import nodeflow.queue.store as queue_module

    monkeypatch.setattr(queue_module, "_DELETE_BATCH", 10)
    q = PromptQueue(tmp_path / "q.db")
    for i in range(95):
        put(q, f"h{i}")
        q.finish(q.claim("w", 0), Outcome("success"))
    for i in range(25):
        put(q, f"p{i}")
    deletes = []
    real = q._db

    class Spy:
        def execute(self, sql, *args):
            if sql.startswith("DELETE"):
                deletes.append(q._cond._is_owned())
            return real.execute(sql, *args)

        def executemany(self, sql, *args):
            return self.execute(sql, *args) if not sql.startswith("DELETE") else \
                (deletes.append(q._cond._is_owned()), real.executemany(sql, *args))[1]

    q._db = Spy()
    assert q.clear_history() == 95 and len(deletes) == 10  # ten short transactions, not one long one
    assert q.clear_pending() == 25 and len(deletes) == 13
    assert all(deletes) and q.history() == {} and q.remaining() == 0
    q._db = real
