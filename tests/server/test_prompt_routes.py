"""POST /prompt, the queue, interruption, the history and jobs routes."""

import asyncio
import json
import threading
from types import SimpleNamespace

from server_helpers import async_test, chain, held, serve, submit, wait_history, wait_started
from server_nodes import Hold

from nodeflow.server.common import DISPATCHER, QUEUE


@async_test
async def test_submit_runs_and_lands_in_history(tmp_path):
    async with serve(tmp_path) as client:
        data = await submit(client, chain(value=5), client_id="me", extra_data={"extra_pnginfo": {"x": 1}})
        assert set(data) == {"prompt_id", "number", "node_errors"} and data["node_errors"] == {}
        entry = await wait_history(client, data["prompt_id"])
        number, pid, prompt, extra, outputs = entry["prompt"]
        assert (number, pid, prompt, outputs) == (data["number"], data["prompt_id"], chain(value=5), ["3"])
        assert extra["client_id"] == "me" and extra["extra_pnginfo"] == {"x": 1} and "create_time" in extra
        assert entry["outputs"] == {"3": {"text": ["15"]}}
        assert entry["status"]["status_str"] == "success" and entry["status"]["completed"] is True
        events = [m[0] for m in entry["status"]["messages"]]
        assert events == ["execution_start", "execution_cached", "execution_success"]
        assert entry["meta"]["3"]["node_id"] == "3"


@async_test
async def test_every_route_is_also_under_api_and_answers_json(tmp_path):
    async with serve(tmp_path) as client:
        for path in ("/prompt", "/api/prompt"):
            resp = await client.get(path)
            assert resp.status == 200 and resp.content_type == "application/json"
            assert await resp.json() == {"exec_info": {"queue_remaining": 0}}
        data = await (await client.post("/api/prompt", json={"prompt": chain()})).json()
        await wait_history(client, data["prompt_id"])
        for path in ("/queue", "/history", "/api/history", f"/api/history/{data['prompt_id']}", "/api/jobs"):
            resp = await client.get(path)
            assert resp.status == 200 and resp.content_type == "application/json", path
        resp = await client.get("/no/such/route")
        assert resp.status == 404 and resp.content_type == "application/json"
        assert (await resp.json())["error"]["type"] == "not_found"
        resp = await client.delete("/prompt")
        assert resp.status == 405 and (await resp.json())["error"]["type"] == "method_not_allowed"


@async_test
async def test_invalid_prompt_gets_comfyui_error_shape(tmp_path):
    async with serve(tmp_path) as client:
        bad = chain()
        bad["1"]["inputs"]["value"] = "seven"
        bad["2"]["inputs"]["b"] = ["99", 0]
        data = await submit(client, bad, expect=400)
        assert data["error"]["type"] == "prompt_outputs_failed_validation"
        assert set(data["error"]) == {"type", "message", "details", "extra_info"}
        errs = data["node_errors"]
        assert set(errs) == {"1", "2"}
        assert errs["1"]["class_type"] == "Const" and errs["1"]["dependent_outputs"] == ["3"]
        e = errs["1"]["errors"][0]
        assert e["type"] == "invalid_input_type" and e["extra_info"]["input_name"] == "value"
        assert e["extra_info"]["received_value"] == "seven"
        assert errs["2"]["errors"][0]["type"] == "invalid_link"
        # The reasons are in node_errors alone (the editor's dialog would show them twice).
        assert data["error"]["details"] == ""
        resp = await client.get("/queue")
        assert (await resp.json())["queue_pending"] == []  # nothing queued


@async_test
async def test_a_node_the_server_does_not_know_refuses_the_prompt_as_comfyui(tmp_path):
    async with serve(tmp_path) as client:
        # The editor sends a node of a type the server lacks without a class_type.
        prompt = chain(**{"8": {"inputs": {"x": ["1", 0]}, "_meta": {"title": "Mystery"}}})
        data = await submit(client, prompt, expect=400)
        assert data == {"error": {"type": "invalid_prompt", "extra_info": {}, "details": "Node ID '#8'",
                                  "message": "Cannot execute because a node is missing the class_type property."},
                        "node_errors": {}}
        prompt = chain(**{"8": {"class_type": "Mystery", "inputs": {"x": ["1", 0]}}})
        data = await submit(client, prompt, expect=400)
        assert data == {"error": {"type": "invalid_prompt", "extra_info": {}, "details": "Node ID '#8'",
                                  "message": "Cannot execute because node Mystery does not exist."},
                        "node_errors": {}}
        assert (await (await client.get("/queue")).json())["queue_pending"] == []
        assert await (await client.get("/history")).json() == {}


@async_test
async def test_body_errors(tmp_path):
    async with serve(tmp_path) as client:
        resp = await client.post("/prompt", data=b"{not json")
        body = await resp.json()
        assert resp.status == 400 and body["error"]["type"] == "invalid_json" and body["node_errors"] == {}
        resp = await client.post("/prompt", json={"client_id": "x"})
        body = await resp.json()
        assert resp.status == 400 and body["error"]["type"] == "no_prompt"
        resp = await client.post("/prompt", json={"prompt": chain(), "front": "sideways"})
        body = await resp.json()
        assert resp.status == 400 and body["error"]["type"] == "invalid_request" and "front" in body["error"]["details"]
        resp = await client.post("/prompt", json={"prompt": "nodes"})
        assert resp.status == 400
        resp = await client.post("/prompt", json={"prompt": {"a": 1, "b": 2}})
        body = await resp.json()
        assert resp.status == 400 and body["error"]["type"] == "invalid_prompt"
        resp = await client.post("/prompt", json={"prompt": {"1": {"class_type": "Const", "inputs": {"value": 1}}}})
        body = await resp.json()
        assert resp.status == 400 and body["error"]["type"] == "prompt_no_outputs"
        resp = await client.post("/queue", data=b"[1, 2]")
        assert resp.status == 400 and (await resp.json())["error"]["type"] == "invalid_request"


@async_test
async def test_partly_valid_prompt_runs_valid_outputs(tmp_path):
    async with serve(tmp_path) as client:
        prompt = chain(**{"4": {"class_type": "Show", "inputs": {"value": ["5", 0]}},
                          "5": {"class_type": "Const", "inputs": {"value": 10**12}}})
        data = await submit(client, prompt)
        assert list(data["node_errors"]) == ["5"]
        assert data["node_errors"]["5"]["dependent_outputs"] == ["4"]
        entry = await wait_history(client, data["prompt_id"])
        assert entry["prompt"][4] == ["3"] and list(entry["outputs"]) == ["3"]


@async_test
async def test_partial_execution_targets(tmp_path):
    async with serve(tmp_path) as client:
        prompt = chain(**{"4": {"class_type": "Show", "inputs": {"value": ["1", 0]}}})
        data = await submit(client, prompt, partial_execution_targets=["4"])
        entry = await wait_history(client, data["prompt_id"])
        assert list(entry["outputs"]) == ["4"]


@async_test
async def test_resource_limits_refused_at_validation(tmp_path):
    async with serve(tmp_path, max_pixels=1024 * 1024, max_steps=50) as client:
        prompt = {"1": {"class_type": "Canvas", "inputs": {"width": 2048, "height": 1024, "batch_size": 2}},
                  "2": {"class_type": "Steps", "inputs": {"x": ["1", 0], "steps": 51}},
                  "3": {"class_type": "Show", "inputs": {"value": ["2", 0]}}}
        data = await submit(client, prompt, expect=400)
        width = data["node_errors"]["1"]["errors"][0]
        assert width["type"] == "value_bigger_than_max" and width["extra_info"]["input_name"] == "width"
        assert "2048 × 1024 × 2 = 4,194,304 pixels" in width["details"]
        steps = data["node_errors"]["2"]["errors"][0]
        assert steps["extra_info"]["input_name"] == "steps" and "50" in steps["extra_info"]["expected"]
        assert data["node_errors"]["1"]["dependent_outputs"] == ["3"]
        # Within the limits: fine.
        prompt["1"]["inputs"].update(width=1024, batch_size=1)
        prompt["2"]["inputs"]["steps"] = 50
        await submit(client, prompt)


@async_test
async def test_queue_listing_order_front_and_number(tmp_path):
    Hold.GATE = threading.Event()
    async with serve(tmp_path) as client:
        running = await submit(client, held(), client_id="c")
        await wait_started()
        a = await submit(client, chain(1))
        b = await submit(client, chain(2), front=True)
        c = await submit(client, chain(3), number=0.5)
        d = await submit(client, chain(4), prompt_id="my-own-id")
        assert d["prompt_id"] == "my-own-id"
        dup = await submit(client, chain(5), expect=400, prompt_id="my-own-id")
        assert dup["error"]["type"] == "duplicate_prompt_id"
        queue = await (await client.get("/queue")).json()
        assert [e[1] for e in queue["queue_running"]] == [running["prompt_id"]]
        assert all(len(e) == 5 for e in queue["queue_running"] + queue["queue_pending"])
        assert [e[1] for e in queue["queue_pending"]] == [b["prompt_id"], c["prompt_id"], a["prompt_id"], "my-own-id"]
        assert (await (await client.get("/prompt")).json())["exec_info"]["queue_remaining"] == 5

        resp = await client.post("/queue", json={"delete": [a["prompt_id"], running["prompt_id"]]})
        assert (await resp.json())["deleted"] == 1  # the running one is not deleted
        resp = await client.post("/queue", json={"clear": True})
        assert (await resp.json())["deleted"] == 3
        queue = await (await client.get("/queue")).json()
        assert queue["queue_pending"] == [] and len(queue["queue_running"]) == 1
        Hold.GATE.set()
        await wait_history(client, running["prompt_id"])
        hist = await (await client.get("/history")).json()
        assert list(hist) == [running["prompt_id"]]  # deleted prompts never ran


@async_test
async def test_interrupt_running_prompt(tmp_path):
    Hold.GATE = threading.Event()
    async with serve(tmp_path) as client:
        first = await submit(client, held())
        second = await submit(client, chain(7))
        await wait_started()
        resp = await client.post("/interrupt", json={"prompt_id": second["prompt_id"]})
        assert resp.status == 200 and await resp.read() == b""  # ComfyUI's answer; not the running one
        await asyncio.sleep(0.05)
        assert [i[1] for i in (await (await client.get("/queue")).json())["queue_running"]] == [first["prompt_id"]]
        resp = await client.post("/interrupt", json={"prompt_id": first["prompt_id"]})
        assert resp.status == 200 and await resp.read() == b""
        entry = await wait_history(client, first["prompt_id"])
        assert entry["status"]["status_str"] == "error" and entry["status"]["completed"] is False
        assert entry["status"]["messages"][-1][0] == "execution_interrupted"
        # The queue goes on.
        entry = await wait_history(client, second["prompt_id"])
        assert entry["status"]["status_str"] == "success"
        # An empty body interrupts whatever runs (nothing now).
        resp = await client.post("/interrupt")
        assert resp.status == 200 and await resp.read() == b""


@async_test
async def test_failing_node_error_in_history(tmp_path):
    async with serve(tmp_path) as client:
        prompt = chain()
        prompt["2"] = {"class_type": "Fail", "inputs": {"x": ["1", 0]}}
        data = await submit(client, prompt)
        entry = await wait_history(client, data["prompt_id"])
        assert entry["status"]["status_str"] == "error"
        event, err = entry["status"]["messages"][-1]
        assert event == "execution_error"
        assert err["node_id"] == "2" and err["node_type"] == "Fail" and err["exception_message"] == "boom at 1"
        assert err["prompt_id"] == data["prompt_id"] and isinstance(err["traceback"], list)
        # The worker is still alive.
        data = await submit(client, chain(2))
        assert (await wait_history(client, data["prompt_id"]))["status"]["completed"]


@async_test
async def test_history_routes(tmp_path):
    async with serve(tmp_path) as client:
        ids = []
        for i in range(4):
            ids.append((await submit(client, chain(i)))["prompt_id"])
            await wait_history(client, ids[-1])
        assert list(await (await client.get("/history")).json()) == ids
        assert list(await (await client.get("/history?max_items=2")).json()) == ids[2:]
        assert list(await (await client.get("/history?max_items=1&offset=1")).json()) == ids[1:2]
        assert await (await client.get("/history/unknown")).json() == {}
        assert (await client.get("/history?max_items=x")).status == 400
        await client.post("/history", json={"delete": [ids[0]]})
        assert list(await (await client.get("/history")).json()) == ids[1:]
        await client.post("/history", json={"clear": True})
        assert await (await client.get("/history")).json() == {}


@async_test
async def test_jobs(tmp_path):
    Hold.GATE = threading.Event()
    async with serve(tmp_path) as client:
        ok = await submit(client, chain(1), extra_data={"extra_pnginfo": {"workflow": {"id": "wf-1"}}})
        await wait_history(client, ok["prompt_id"])
        bad = chain(2)
        bad["2"] = {"class_type": "Fail", "inputs": {"x": ["1", 0]}}
        failed = await submit(client, bad)
        await wait_history(client, failed["prompt_id"])
        running = await submit(client, held())
        await wait_started()
        pending = await submit(client, chain(3))

        data = await (await client.get("/api/jobs")).json()
        by_id = {j["id"]: j for j in data["jobs"]}
        assert by_id[ok["prompt_id"]]["status"] == "completed"
        assert by_id[ok["prompt_id"]]["workflow_id"] == "wf-1"
        assert by_id[failed["prompt_id"]]["status"] == "failed"
        assert by_id[failed["prompt_id"]]["execution_error"]["node_id"] == "2"
        assert by_id[running["prompt_id"]]["status"] == "in_progress"
        assert by_id[pending["prompt_id"]]["status"] == "pending"
        assert data["pagination"] == {"offset": 0, "limit": None, "total": 4, "has_more": False}
        # Newest first by default.
        assert data["jobs"][0]["id"] == pending["prompt_id"]

        data = await (await client.get("/api/jobs?status=completed,failed&limit=1&sort_order=asc")).json()
        assert [j["id"] for j in data["jobs"]] == [ok["prompt_id"]] and data["pagination"]["has_more"] is True
        # Statuses the server does not know match nothing (a newer frontend may ask for more).
        data = await (await client.get("/api/jobs?status=bogus")).json()
        assert data["jobs"] == [] and data["pagination"]["total"] == 0

        one = await (await client.get(f"/api/jobs/{ok['prompt_id']}")).json()
        assert one["outputs"] == {"3": {"text": ["11"]}} and one["workflow"]["prompt"] == chain(1)
        assert (await (await client.get(f"/api/jobs/{pending['prompt_id']}")).json())["status"] == "pending"
        assert (await client.get("/api/jobs/nope")).status == 404

        # An interrupted prompt is a cancelled job (what the editor's history panel asks for).
        await client.post("/interrupt")
        await wait_history(client, running["prompt_id"])
        await wait_history(client, pending["prompt_id"])
        data = await (await client.get("/api/jobs?status=completed,failed,cancelled&limit=64&offset=0")).json()
        statuses = {j["id"]: j["status"] for j in data["jobs"]}
        assert statuses == {ok["prompt_id"]: "completed", failed["prompt_id"]: "failed",
                            running["prompt_id"]: "cancelled", pending["prompt_id"]: "completed"}
        data = await (await client.get("/api/jobs?status=cancelled,someday")).json()
        assert [j["id"] for j in data["jobs"]] == [running["prompt_id"]] and data["pagination"]["total"] == 1
        data = await (await client.get("/api/jobs?status=failed")).json()
        assert [j["id"] for j in data["jobs"]] == [failed["prompt_id"]]
        assert (await (await client.get(f"/api/jobs/{running['prompt_id']}")).json())["status"] == "cancelled"


@async_test
async def test_large_prompt_validates_off_loop(tmp_path):
    async with serve(tmp_path) as client:
        prompt = {"0": {"class_type": "Const", "inputs": {"value": 0}}}
        for i in range(1, 3000):
            prompt[str(i)] = {"class_type": "Add", "inputs": {"a": [str(i - 1), 0], "b": 1}}
        prompt["out"] = {"class_type": "Show", "inputs": {"value": ["2999", 0]}}
        data = await submit(client, prompt)
        entry = await wait_history(client, data["prompt_id"], timeout=20)
        assert entry["outputs"]["out"] == {"text": ["2999"]}


@async_test
async def test_sensitive_extra_data_not_shown(tmp_path):
    Hold.GATE = threading.Event()
    async with serve(tmp_path) as client:
        await submit(client, held())
        await wait_started()
        data = await submit(client, chain(), extra_data={"api_key_comfy_org": "s3cret", "keep": 1})
        queue = await client.get("/queue")
        assert "s3cret" not in await queue.text()
        Hold.GATE.set()
        await wait_history(client, data["prompt_id"])
        text = await (await client.get("/history")).text()
        assert "s3cret" not in text and '"keep":1' in text
        await asyncio.sleep(0)


@async_test
async def test_free_clears_the_cache(tmp_path):
    async with serve(tmp_path) as client:
        prompt = held(steps=1)
        await wait_history(client, (await submit(client, prompt))["prompt_id"])
        await wait_history(client, (await submit(client, prompt))["prompt_id"])
        assert Hold.RUNS == 1  # cached
        resp = await client.post("/api/free", json={"unload_models": True})
        assert (await resp.json())["freed"] is True
        await wait_history(client, (await submit(client, prompt))["prompt_id"])
        assert Hold.RUNS == 2
        assert (await (await client.post("/free")).json())["freed"] is False


@async_test
async def test_number_must_be_finite_and_in_range(tmp_path):
    async with serve(tmp_path) as client:
        body = json.dumps({"prompt": chain()})[:-1]
        for number in ("1e999", "-1e999", "NaN", "Infinity", "1e300", "-1e300", "9.1e15"):
            resp = await client.post("/prompt", data=f'{body}, "number": {number}}}')
            data = await resp.json()
            assert resp.status == 400, (number, data)
            assert set(data["error"]) == {"type", "message", "details", "extra_info"} and data["node_errors"] == {}
            assert data["error"]["type"] == "invalid_request" and "number" in data["error"]["details"]
        ok = await submit(client, chain(2), number=2.5)
        assert ok["number"] == 2.5
        big = await submit(client, chain(3), number=-(2 ** 53))
        await wait_history(client, big["prompt_id"])
        await wait_history(client, ok["prompt_id"])
        # Everything still reads back as strict JSON, and later submissions still work.
        for path in ("/history", "/api/jobs", "/queue"):
            json.loads(await (await client.get(path)).text(), parse_constant=_no_constant)
        await wait_history(client, (await submit(client, chain(4)))["prompt_id"])


def image(i):
    return {"filename": f"{i}.png", "subfolder": "", "type": "output"}


def _no_constant(name):
    raise AssertionError(f"{name} in JSON")


@async_test
async def test_query_integers_refused_in_comfyui_shape(tmp_path):
    async with serve(tmp_path) as client:
        for path, name in (("/history?max_items=abc", "max_items"), ("/history?max_items=-5", "max_items"),
                           ("/history?offset=x", "offset"), ("/api/jobs?limit=abc", "limit"),
                           ("/api/jobs?limit=0", "limit"), ("/api/jobs?offset=1.5", "offset")):
            resp = await client.get(path)
            body = await resp.json()
            assert resp.status == 400, path
            assert set(body["error"]) == {"type", "message", "details", "extra_info"}, body
            assert name in body["error"]["message"]
        assert await (await client.get("/history?max_items=0")).json() == {}


@async_test
async def test_long_database_work_runs_off_the_event_loop(tmp_path):
    async with serve(tmp_path) as client:
        queue = client.app[QUEUE]
        loop_thread = threading.get_ident()
        seen = {}
        for name in ("clear_history", "delete_history", "clear_pending", "delete_pending", "settings",
                     "set_settings", "history_jobs"):
            original = getattr(queue, name)

            def spy(*args, _name=name, _original=original, **kwargs):
                seen[_name] = threading.get_ident()
                return _original(*args, **kwargs)

            setattr(queue, name, spy)
        await client.post("/history", json={"clear": True, "delete": ["x"]})
        await client.post("/queue", json={"clear": True, "delete": ["x"]})
        await client.get("/settings")
        await client.post("/settings", json={"a": 1})
        await client.get("/api/jobs")
        assert set(seen) == {"clear_history", "delete_history", "clear_pending", "delete_pending", "settings",
                             "set_settings", "history_jobs"}
        assert loop_thread not in seen.values()


@async_test
async def test_jobs_page_in_sql_decodes_only_the_page(tmp_path, monkeypatch):
    import nodeflow.queue.store as queue_module

    async with serve(tmp_path) as client:
        queue = client.app[QUEUE]
        await asyncio.to_thread(client.app[DISPATCHER].stop)  # the test plays the worker
        # A long history, written straight into the store (each entry carries a big workflow).
        workflow = {"id": "wf-big", "nodes": ["x" * 100] * 20}
        for i in range(300):
            extra = {"create_time": 1_000 + i, "extra_pnginfo": {"workflow": workflow if i % 2 else {"id": "other"}}}
            item = queue.put(f"p{i:03}", chain(i), extra, ["3"])
            queue.claim("w", 0)
            start = {"prompt_id": item.prompt_id, "timestamp": 10_000 + i}
            end = {"prompt_id": item.prompt_id, "timestamp": 10_000 + i + (i % 7) * 100}
            queue.finish(item, queue_module.Outcome("success" if i % 5 else "error", {"3": {"images": [image(i)]}},
                                                    [["execution_start", start],
                                                     ["execution_success" if i % 5 else "execution_error", end]]))
        decoded = []
        monkeypatch.setattr(queue_module, "json", SimpleNamespace(
            dumps=json.dumps, loads=lambda text, *a, **k: decoded.append(len(text)) or json.loads(text, *a, **k)))
        data = await (await client.get("/api/jobs?limit=5")).json()
        assert [j["id"] for j in data["jobs"]] == ["p299", "p298", "p297", "p296", "p295"]
        assert data["pagination"] == {"offset": 0, "limit": 5, "total": 300, "has_more": True}
        assert len(decoded) <= 10 and sum(decoded) < 5_000  # the page's status and outputs, nothing else
        job = data["jobs"][0]
        assert job["status"] == "completed" and job["create_time"] == 1299 and job["workflow_id"] == "wf-big"
        assert job["execution_start_time"] == 10_299 and job["execution_end_time"] == 10_299 + 5 * 100
        assert job["outputs_count"] == 1 and job["priority"] == 299
        assert job["preview_output"] == {**image(299), "nodeId": "3", "mediaType": "images"}
        # Filters and sorts, done by SQL.
        data = await (await client.get("/api/jobs?status=failed&limit=3&offset=1&sort_order=asc")).json()
        assert [j["id"] for j in data["jobs"]] == ["p005", "p010", "p015"] and data["pagination"]["total"] == 60
        assert all(j["status"] == "failed" for j in data["jobs"])
        data = await (await client.get("/api/jobs?workflow_id=wf-big&limit=2")).json()
        assert [j["id"] for j in data["jobs"]] == ["p299", "p297"] and data["pagination"]["total"] == 150
        data = await (await client.get("/api/jobs?sort_by=execution_duration&limit=2")).json()
        assert [j["id"] for j in data["jobs"]] == ["p293", "p286"]  # 600 ms, the newest first
        data = await (await client.get("/api/jobs?limit=2&offset=299")).json()
        assert [j["id"] for j in data["jobs"]] == ["p000"] and data["pagination"]["has_more"] is False
