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


@async_test
async def test_load_image_is_measured_by_its_header_before_it_decodes(tmp_path, monkeypatch):
    """A 9000 × 9000 PNG is a few kB: LoadImage must not decode it whole when the server
    refuses that many pixels."""
    import io as _io

    from PIL import Image
    from server_helpers import make_registry

    from nodes.io import LoadImage, LoadImageMask

    (tmp_path / "input").mkdir()
    buffer = _io.BytesIO()
    Image.new("L", (9000, 9000)).save(buffer, format="PNG")
    assert len(buffer.getvalue()) < 200_000
    (tmp_path / "input" / "huge.png").write_bytes(buffer.getvalue())
    Image.new("RGB", (64, 32)).save(tmp_path / "input" / "small.png")
    decoded = []
    monkeypatch.setattr(LoadImage, "run", lambda self, image: decoded.append(image) or (None, None))
    registry = make_registry()
    registry.register(LoadImage)
    registry.register(LoadImageMask)
    async with serve(tmp_path, registry=registry) as client:  # the default --max-pixels: 4096 × 4096
        for node in ({"class_type": "LoadImage", "inputs": {"image": "huge.png"}},
                     {"class_type": "LoadImageMask", "inputs": {"image": "huge.png", "channel": "red"}}):
            err = await run_failing(client, {"1": node, "2": {"class_type": "ShowSize", "inputs": {"value": ["1", 0]}}})
            message = err["exception_message"]
            assert err["node_id"] == "1" and "1 × 9,000 × 9,000" in message and "--max-pixels" in message
        assert decoded == []
        data = await submit(client, {"1": {"class_type": "LoadImageMask", "inputs": {"image": "small.png",
                                                                                      "channel": "red"}},
                                     "2": {"class_type": "ShowSize", "inputs": {"value": ["1", 0]}}})
        entry = await wait_history(client, data["prompt_id"])
        assert entry["outputs"]["2"]["text"] == ["[1, 32, 64]"]


@async_test
async def test_literal_sizes_are_bounded(tmp_path):
    async with serve(tmp_path) as client:  # the default --max-literal-size: 1,000,000 characters
        text = "x" * 1_000_001
        prompt = {"1": {"class_type": "FakeLoad", "inputs": {"ckpt_name": text}},
                  "2": {"class_type": "UseModel", "inputs": {"model": ["1", 0], "seed": 0}}}
        data = await submit(client, prompt, expect=400)
        (err,) = data["node_errors"]["1"]["errors"]
        assert err["type"] == "value_bigger_than_max" and err["extra_info"]["input_name"] == "ckpt_name"
        assert "1,000,001" in err["extra_info"]["received_value"] and len(str(data)) < 5000  # not echoed back
        prompt["1"]["inputs"]["extra"] = {"__value__": ["y" * 1000] * 1001}  # a list literal, as JSON
        prompt["1"]["inputs"]["ckpt_name"] = "a.safetensors"
        data = await submit(client, prompt, expect=400)
        assert data["node_errors"]["1"]["errors"][0]["type"] == "value_bigger_than_max"
        del prompt["1"]["inputs"]["extra"]
        # Nothing was stored.
        assert await (await client.get("/history")).json() == {}
        assert (await (await client.get("/queue")).json())["queue_pending"] == []
        # Within the limit: fine.
        prompt["1"]["inputs"]["ckpt_name"] = "x" * 1_000_000
        pid = (await submit(client, prompt))["prompt_id"]
        assert (await wait_history(client, pid))["status"]["completed"]
        # A body over 32 MiB is refused before it is parsed.
        resp = await client.post("/prompt", data=b'{"prompt": "' + b"z" * (33 << 20) + b'"}',
                                 headers={"Content-Type": "application/json"})
        assert resp.status == 413 and (await resp.json())["error"]["type"] == "too_large"
    async with serve(tmp_path, max_literal=0, db_path=":memory:") as client:  # 0: no limit
        prompt["1"]["inputs"]["ckpt_name"] = "x" * 1_000_001
        pid = (await submit(client, prompt))["prompt_id"]
        assert (await wait_history(client, pid))["status"]["completed"]
