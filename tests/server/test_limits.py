"""Resource limits at run time: values that arrive through links, and sizes that nodes make
of LATENTs and IMAGEs, are checked on each node's resolved inputs before it runs."""

from server_helpers import WsReader, async_test, serve, submit, wait_history

LIMIT = 256 * 256  # --max-pixels of these tests


def error_of(entry):
    event, data = entry["status"]["messages"][-1]
    assert entry["status"]["status_str"] == "error" and event == "execution_error", entry["status"]
    return data


async def run_failing(client, prompt):
    data = await submit(client, prompt)  # passes validation: only literals are known there
    return error_of(await wait_history(client, data["prompt_id"]))


@async_test
async def test_steps_through_a_link(tmp_path):
    async with serve(tmp_path, max_steps=50) as client:
        prompt = {"1": {"class_type": "Const", "inputs": {"value": 100000}},
                  "2": {"class_type": "Steps", "inputs": {"x": ["1", 0], "steps": ["1", 0]}},
                  "3": {"class_type": "Show", "inputs": {"value": ["2", 0]}}}
        err = await run_failing(client, prompt)
        assert err["node_id"] == "2" and err["node_type"] == "Steps"
        message = err["exception_message"]
        assert "'steps'" in message and "100000" in message and "--max-steps" in message and "50" in message
        assert err["current_inputs"]["steps"] == [100000]
        # Within the limit through the same link: runs.
        prompt["1"]["inputs"]["value"] = 50
        data = await submit(client, prompt)
        assert (await wait_history(client, data["prompt_id"]))["status"]["completed"]


@async_test
async def test_width_and_height_through_links(tmp_path):
    async with serve(tmp_path, max_pixels=LIMIT) as client:
        prompt = {"1": {"class_type": "Const", "inputs": {"value": 65536}},
                  "2": {"class_type": "Canvas", "inputs": {"width": ["1", 0], "height": ["1", 0], "batch_size": 1}},
                  "3": {"class_type": "Show", "inputs": {"value": ["2", 0]}}}
        err = await run_failing(client, prompt)
        assert err["node_id"] == "2" and "width 65536, height 65536" in err["exception_message"]
        assert f"{LIMIT:,}" in err["exception_message"] and "--max-pixels" in err["exception_message"]


@async_test
async def test_sizes_that_nodes_make(tmp_path):
    async with serve(tmp_path, max_pixels=LIMIT) as client:
        base = {"1": {"class_type": "EmptyLat", "inputs": {"width": 256, "height": 256, "batch_size": 1}}}
        cases = [
            ({"class_type": "LatScaleBy", "inputs": {"samples": ["1", 0], "scale_by": 8.0}}, "'scale_by' = 8"),
            ({"class_type": "LatRepeat", "inputs": {"samples": ["1", 0], "amount": 64}}, "'amount' = 64"),
        ]
        for node, words in cases:
            prompt = {**base, "2": node, "3": {"class_type": "ShowSize", "inputs": {"value": ["2", 0]}}}
            err = await run_failing(client, prompt)
            assert err["node_id"] == "2" and words in err["exception_message"], err["exception_message"]
        # megapixels of an IMAGE.
        prompt = {**base, "2": {"class_type": "LatToImage", "inputs": {"samples": ["1", 0]}},
                  "3": {"class_type": "ImgToTotal", "inputs": {"image": ["2", 0], "megapixels": 4.0}},
                  "4": {"class_type": "ShowSize", "inputs": {"value": ["3", 0]}}}
        err = await run_failing(client, prompt)
        assert err["node_id"] == "3" and "'megapixels' = 4" in err["exception_message"]
        # A size no input tells: caught where the LATENT flows into the next node.
        prompt = {**base, "2": {"class_type": "LatTimes4", "inputs": {"samples": ["1", 0]}},
                  "3": {"class_type": "ShowSize", "inputs": {"value": ["2", 0]}}}
        err = await run_failing(client, prompt)
        assert err["node_id"] == "3" and "input 'value'" in err["exception_message"]
        assert "a LATENT of 1 × 1,024 × 1,024 = 1,048,576 pixels" in err["exception_message"]
        assert err["current_inputs"]["value"] == [{"samples": "SimpleNamespace[1, 4, 128, 128]"}]
        # Within the limit: fine.
        prompt = {**base, "2": {"class_type": "LatScaleBy", "inputs": {"samples": ["1", 0], "scale_by": 1.0}},
                  "3": {"class_type": "ShowSize", "inputs": {"value": ["2", 0]}}}
        data = await submit(client, prompt)
        entry = await wait_history(client, data["prompt_id"])
        assert entry["outputs"]["3"] == {"text": ["[1, 4, 32, 32]"]}


@async_test
async def test_limit_error_reaches_the_websocket(tmp_path):
    async with serve(tmp_path, max_pixels=LIMIT) as client:
        ws = WsReader(await client.ws_connect("/ws?clientId=me"))
        await ws.next()
        prompt = {"1": {"class_type": "EmptyLat", "inputs": {"width": 256, "height": 256, "batch_size": 1}},
                  "2": {"class_type": "LatRepeat", "inputs": {"samples": ["1", 0], "amount": 2}},
                  "3": {"class_type": "ShowSize", "inputs": {"value": ["2", 0]}}}
        pid = (await submit(client, prompt, client_id="me"))["prompt_id"]
        messages = await ws.until_done(pid)
        event, err = messages[-2]
        assert event == "execution_error" and err["node_id"] == "2"
        assert err["exception_type"].endswith("LimitExceeded")
        assert err["current_inputs"] == {"samples": [{"samples": "SimpleNamespace[1, 4, 32, 32]"}], "amount": [2]}


@async_test
async def test_guard_keeps_the_cache(tmp_path):
    """Guarded node classes keep their type names: cache keys and schemas are unchanged."""
    from server_nodes import Hold

    async with serve(tmp_path) as client:
        prompt = {"1": {"class_type": "Const", "inputs": {"value": 1}},
                  "2": {"class_type": "Hold", "inputs": {"x": ["1", 0], "steps": 1}},
                  "3": {"class_type": "Show", "inputs": {"value": ["2", 0]}}}
        for _ in range(2):
            await wait_history(client, (await submit(client, prompt))["prompt_id"])
        assert Hold.RUNS == 1
        info = await (await client.get("/object_info/Hold")).json()
        assert info["Hold"]["name"] == "Hold" and info["Hold"]["python_module"] == "server_nodes"
