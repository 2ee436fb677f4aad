"""The WebSocket: ComfyUI's message sequence, routing by client id, previews."""

import asyncio
import io
import struct
import threading

from PIL import Image
from server_helpers import WsReader, async_test, chain, held, serve, submit, wait_history, wait_started
from server_nodes import Hold


def kinds(messages):
    """The message types, less ``progress_state`` (``test_progress_state_*`` follow those)."""
    return [t for t, _ in messages if t != "progress_state"]


def states(message):
    """A ``progress_state`` message as ``{node: (state, value, max)}``."""
    return {n: (s["state"], s["value"], s["max"]) for n, s in message["nodes"].items()}


@async_test
async def test_status_on_connect_and_on_change(tmp_path):
    async with serve(tmp_path) as client:
        ws = WsReader(await client.ws_connect("/ws?clientId=abc"))
        assert await ws.next() == ("status", {"status": {"exec_info": {"queue_remaining": 0}}, "sid": "abc"})
        anon = WsReader(await client.ws_connect("/ws"))
        _, first = await anon.next()
        assert len(first["sid"]) == 32  # a generated id
        data = await submit(client, chain())
        t, d = await ws.until(lambda t, d: t == "status")
        assert d == {"status": {"exec_info": {"queue_remaining": 1}}}
        await ws.until(lambda t, d: t == "status" and d["status"]["exec_info"]["queue_remaining"] == 0)
        # The other client sees status too (it goes to everyone).
        await anon.until(lambda t, d: t == "status" and d["status"]["exec_info"]["queue_remaining"] == 0)
        await wait_history(client, data["prompt_id"])


@async_test
async def test_run_sequence_history_first_then_cached_rerun(tmp_path):
    async with serve(tmp_path) as client:
        ws = WsReader(await client.ws_connect("/ws?clientId=me"))
        await ws.next()
        prompt = {"1": {"class_type": "Const", "inputs": {"value": 2}},
                  "2": {"class_type": "Hold", "inputs": {"x": ["1", 0], "steps": 3}},
                  "3": {"class_type": "SaveValue", "inputs": {"value": ["2", 0]}}}
        pid = (await submit(client, prompt, client_id="me"))["prompt_id"]
        messages = await ws.until_done(pid)
        assert all(d["prompt_id"] == pid for _, d in messages)
        assert kinds(messages) == ["execution_start", "execution_cached", "executing", "executing", "progress",
                                   "progress", "progress", "executing", "executed", "execution_success",
                                   "executing"]
        assert messages[1][1]["nodes"] == []
        assert [d["node"] for t, d in messages if t == "executing"] == ["1", "2", "3", None]
        assert [(d["value"], d["max"], d["node"]) for t, d in messages if t == "progress"] == \
            [(1, 3, "2"), (2, 3, "2"), (3, 3, "2")]
        executed = next(d for t, d in messages if t == "executed")
        assert executed["node"] == "3" and executed["output"]["images"][0]["type"] == "output"
        # The history entry exists the moment executing/None arrives.
        entry = (await (await client.get(f"/history/{pid}")).json())[pid]
        assert entry["outputs"]["3"] == executed["output"]
        saved = sorted(p.name for p in (tmp_path / "output").iterdir())

        # The same prompt again: everything cached, the output replayed, no new file.
        pid2 = (await submit(client, prompt, client_id="me"))["prompt_id"]
        messages = await ws.until_done(pid2)
        assert kinds(messages) == ["execution_start", "execution_cached", "executed", "execution_success",
                                   "executing"]
        assert messages[1][1]["nodes"] == ["1", "2", "3"]  # every node that came from the cache, as ComfyUI
        assert next(d for t, d in messages if t == "executed")["output"] == executed["output"]
        assert sorted(p.name for p in (tmp_path / "output").iterdir()) == saved
        entry2 = (await (await client.get(f"/history/{pid2}")).json())[pid2]
        assert entry2["outputs"] == entry["outputs"] and entry2["status"]["completed"]

        # A changed input: a new file, the first one untouched.
        prompt["1"]["inputs"]["value"] = 3
        pid3 = (await submit(client, prompt, client_id="me"))["prompt_id"]
        await ws.until_done(pid3)
        assert len(list((tmp_path / "output").iterdir())) == 2


@async_test
async def test_progress_state_follows_each_node_as_comfyui_sends_it(tmp_path):
    async with serve(tmp_path) as client:
        ws = WsReader(await client.ws_connect("/ws?clientId=me"))
        await ws.next()
        prompt = {"1": {"class_type": "Const", "inputs": {"value": 2}},
                  "2": {"class_type": "Hold", "inputs": {"x": ["1", 0], "steps": 3}},
                  "3": {"class_type": "SaveValue", "inputs": {"value": ["2", 0]}}}
        pid = (await submit(client, prompt, client_id="me"))["prompt_id"]
        await ws.until_done(pid)
        seen = [(t, d) for t, d in ws.messages if t != "status" or d["status"]["exec_info"]["queue_remaining"] == 0]
        start = next(i for i, (t, _) in enumerate(seen) if t == "execution_start")
        run = seen[start:]
        order = [(t, states(d) if t == "progress_state" else d.get("node", d.get("value"))) for t, d in run
                 if t in ("progress_state", "executing", "progress", "executed")]
        assert order == [
            ("progress_state", {"1": ("running", 0.0, 1.0)}), ("executing", "1"),
            ("progress_state", {"1": ("finished", 1.0, 1.0), "2": ("running", 0.0, 1.0)}), ("executing", "2"),
            ("progress_state", {"1": ("finished", 1.0, 1.0), "2": ("running", 1.0, 3.0)}), ("progress", "2"),
            ("progress_state", {"1": ("finished", 1.0, 1.0), "2": ("running", 2.0, 3.0)}), ("progress", "2"),
            ("progress_state", {"1": ("finished", 1.0, 1.0), "2": ("running", 3.0, 3.0)}), ("progress", "2"),
            ("progress_state", {"1": ("finished", 1.0, 1.0), "2": ("finished", 3.0, 3.0),
                                "3": ("running", 0.0, 1.0)}), ("executing", "3"),
            ("executed", "3"),
            ("progress_state", {"1": ("finished", 1.0, 1.0), "2": ("finished", 3.0, 3.0),
                                "3": ("finished", 1.0, 1.0)}),
            ("executing", None)]
        message = next(d for t, d in run if t == "progress_state")
        assert message == {"prompt_id": pid, "nodes": {"1": {
            "value": 0.0, "max": 1.0, "state": "running", "node_id": "1", "prompt_id": pid, "display_node_id": "1",
            "parent_node_id": None, "real_node_id": "1"}}}
        # ComfyUI's end: execution_success, the queue's new length, then executing with node None.
        assert [t for t, _ in run[-3:]] == ["execution_success", "status", "executing"]

        # Cached: every node finished at once, after execution_cached.
        ws.messages.clear()
        pid2 = (await submit(client, prompt, client_id="me"))["prompt_id"]
        messages = await ws.until_done(pid2)
        assert [t for t, _ in messages] == ["execution_start", "execution_cached", "progress_state", "executed",
                                            "execution_success", "executing"]
        assert states(messages[2][1]) == {n: ("finished", 1.0, 1.0) for n in "123"}


@async_test
async def test_progress_state_marks_the_failing_node(tmp_path):
    async with serve(tmp_path) as client:
        ws = WsReader(await client.ws_connect("/ws?clientId=me"))
        await ws.next()
        prompt = chain()
        prompt["2"] = {"class_type": "Fail", "inputs": {"x": ["1", 0]}}
        pid = (await submit(client, prompt, client_id="me"))["prompt_id"]
        messages = await ws.until_done(pid)
        assert [t for t, _ in messages][-3:] == ["progress_state", "execution_error", "executing"]
        assert states(messages[-3][1]) == {"1": ("finished", 1.0, 1.0), "2": ("error", 0.0, 1.0)}


@async_test
async def test_interrupted_run_sequence(tmp_path):
    Hold.GATE = threading.Event()
    async with serve(tmp_path) as client:
        ws = WsReader(await client.ws_connect("/ws?clientId=me"))
        await ws.next()
        pid = (await submit(client, held(steps=5), client_id="me"))["prompt_id"]
        await wait_started()
        await client.post("/interrupt")
        messages = await ws.until_done(pid)
        assert kinds(messages)[-2:] == ["execution_interrupted", "executing"]
        interrupted = messages[-2][1]
        assert interrupted["node_id"] == "2" and interrupted["node_type"] == "Hold"
        assert interrupted["executed"] == ["1"] and interrupted["prompt_id"] == pid
        assert "executed" not in kinds(messages) and "execution_success" not in kinds(messages)


@async_test
async def test_error_run_sequence(tmp_path):
    async with serve(tmp_path) as client:
        ws = WsReader(await client.ws_connect("/ws?clientId=me"))
        await ws.next()
        prompt = chain()
        prompt["2"] = {"class_type": "Fail", "inputs": {"x": ["1", 0]}}
        pid = (await submit(client, prompt, client_id="me"))["prompt_id"]
        messages = await ws.until_done(pid)
        assert kinds(messages)[-2:] == ["execution_error", "executing"]
        err = messages[-2][1]
        for key in ("node_id", "node_type", "exception_message", "exception_type", "traceback", "executed",
                    "current_inputs", "current_outputs", "prompt_id"):
            assert key in err
        assert err["node_id"] == "2" and err["exception_message"] == "boom at 1"
        assert "RuntimeError" in "".join(err["traceback"])
        assert err["current_inputs"] == {"x": [1]}  # ComfyUI's lists of values, not reprs
        entry = await wait_history(client, pid)
        assert entry["status"]["messages"][-1][1]["current_inputs"] == {"x": [1]}


@async_test
async def test_execution_cached_lists_every_cached_node(tmp_path):
    async with serve(tmp_path) as client:
        ws = WsReader(await client.ws_connect("/ws?clientId=me"))
        await ws.next()
        prompt = chain(**{"5": {"class_type": "Hold", "inputs": {"x": ["1", 0], "steps": 1}},
                          "6": {"class_type": "Show", "inputs": {"value": ["5", 0]}}})
        await ws.until_done((await submit(client, prompt, client_id="me"))["prompt_id"])
        prompt["5"]["inputs"]["steps"] = 2  # 5 and 6 run again; 1, 2 and 3 come from the cache
        pid = (await submit(client, prompt, client_id="me"))["prompt_id"]
        messages = await ws.until_done(pid)
        cached = next(d for t, d in messages if t == "execution_cached")
        assert cached["nodes"] == ["1", "2", "3"]
        assert [d["node"] for t, d in messages if t == "executing"] == ["5", "6", None]
        entry = await wait_history(client, pid)
        assert entry["status"]["messages"][1] == ["execution_cached", cached]


@async_test
async def test_messages_go_to_their_client_or_everyone(tmp_path):
    async with serve(tmp_path) as client:
        alice = WsReader(await client.ws_connect("/ws?clientId=alice"))
        bob = WsReader(await client.ws_connect("/ws?clientId=bob"))
        await alice.next()
        await bob.next()
        pid = (await submit(client, chain(1), client_id="alice"))["prompt_id"]
        await alice.until_done(pid)
        await wait_history(client, pid)
        assert all(t == "status" for t, _ in bob.messages + await bob.quiet())

        # Without client_id, everyone hears about it.
        pid = (await submit(client, chain(2)))["prompt_id"]
        await alice.until_done(pid)
        await bob.until_done(pid)


@async_test
async def test_reconnect_mid_run_learns_current_node(tmp_path):
    Hold.GATE = threading.Event()
    async with serve(tmp_path) as client:
        pid = (await submit(client, held(), client_id="me"))["prompt_id"]
        await wait_started()
        ws = WsReader(await client.ws_connect("/ws?clientId=me"))
        assert (await ws.next())[0] == "status"
        assert await ws.next() == ("executing", {"node": "2", "display_node": "2", "prompt_id": pid})
        Hold.GATE.set()
        await ws.until_done(pid)


@async_test
async def test_feature_flags_answered(tmp_path):
    async with serve(tmp_path) as client:
        raw = await client.ws_connect("/ws?clientId=me")
        ws = WsReader(raw)
        await ws.next()
        await raw.send_json({"type": "feature_flags", "data": {"supports_preview_metadata": True}})
        t, d = await ws.until(lambda t, d: t == "feature_flags")
        assert d["supports_preview_metadata"] is False and d["max_upload_size"] > 0


@async_test
async def test_previews_off_by_default(tmp_path):
    async with serve(tmp_path) as client:
        ws = WsReader(await client.ws_connect("/ws?clientId=me"))
        await ws.next()
        pid = (await submit(client, held(preview=True), client_id="me"))["prompt_id"]
        messages = await ws.until_done(pid)
        assert "binary" not in kinds(messages) and kinds(messages).count("progress") == 3


@async_test
async def test_previews_as_binary_frames_when_enabled(tmp_path):
    async with serve(tmp_path, previews=True) as client:
        ws = WsReader(await client.ws_connect("/ws?clientId=me"))
        await ws.next()
        pid = (await submit(client, held(preview=True), client_id="me"))["prompt_id"]
        messages = await ws.until_done(pid)
        frames = [d for t, d in messages if t == "binary"]
        assert len(frames) == 3
        event, fmt = struct.unpack(">II", frames[0][:8])
        assert (event, fmt) == (1, 1)  # preview image, JPEG
        with Image.open(io.BytesIO(frames[0][8:])) as img:
            assert img.format == "JPEG" and img.size == (16, 16)
        # Each frame follows its progress message.
        order = kinds(messages)
        assert order.index("binary") == order.index("progress") + 1
        # Another client does not get them.
        other = WsReader(await client.ws_connect("/ws?clientId=other"))
        await other.next()
        pid = (await submit(client, held(preview=True, value=9), client_id="me"))["prompt_id"]
        await ws.until_done(pid)
        assert all(t == "status" for t, _ in other.messages + await other.quiet())


@async_test
async def test_a_client_that_does_not_keep_up_is_dropped(monkeypatch):
    from nodeflow.server import ws as ws_module

    class FakeWs:
        closed_with = None

        async def close(self, code, message):
            self.closed_with = code

    monkeypatch.setattr(ws_module, "OUTBOX_LIMIT", 2)
    fake = FakeWs()
    conn = ws_module.Connection("slow", fake)  # never started: nothing is written
    for i in range(5):
        conn.post(f"m{i}")
    await asyncio.sleep(0)
    assert conn.dropped and fake.closed_with == 1008 and conn.outbox.qsize() == 2
