"""A ComfyUI client, used the way ComfyUI's own websocket API example does, against a real
``python server.py``: POST /prompt with a client_id (urllib: no JSON content type), follow
the WebSocket until ``executing`` with ``node: null`` for that prompt (skipping binary
preview frames), read /history/{id}, fetch every image through /view."""

import asyncio
import json
import urllib.parse
import urllib.request
import uuid

import aiohttp
from server_helpers import ServerProcess, async_test


def queue_prompt(server, prompt, client_id):
    p = {"prompt": prompt, "client_id": client_id}
    req = urllib.request.Request(f"{server}/prompt", data=json.dumps(p).encode("utf-8"))
    return json.loads(urllib.request.urlopen(req).read())


def get_history(server, prompt_id):
    with urllib.request.urlopen(f"{server}/history/{prompt_id}") as response:
        return json.loads(response.read())


def get_image(server, filename, subfolder, folder_type):
    url_values = urllib.parse.urlencode({"filename": filename, "subfolder": subfolder, "type": folder_type})
    with urllib.request.urlopen(f"{server}/view?{url_values}") as response:
        return response.read()


async def get_images(server, ws, prompt, client_id):
    prompt_id = (await asyncio.to_thread(queue_prompt, server, prompt, client_id))["prompt_id"]
    while True:
        out = await ws.receive(timeout=20)
        if out.type == aiohttp.WSMsgType.TEXT:
            message = json.loads(out.data)
            if message["type"] == "executing":
                data = message["data"]
                if data["node"] is None and data["prompt_id"] == prompt_id:
                    break  # execution is done
        elif out.type != aiohttp.WSMsgType.BINARY:
            raise AssertionError(f"websocket closed: {out}")
    history = (await asyncio.to_thread(get_history, server, prompt_id))[prompt_id]
    output_images = {}
    for node_id in history["outputs"]:
        node_output = history["outputs"][node_id]
        if "images" in node_output:
            output_images[node_id] = [
                await asyncio.to_thread(get_image, server, image["filename"], image["subfolder"], image["type"])
                for image in node_output["images"]]
    return output_images


@async_test
async def test_comfyui_websocket_api_example_flow(tmp_path):
    server = await ServerProcess(tmp_path, "--preview").ready()
    try:
        client_id = str(uuid.uuid4())
        prompt = {"4": {"class_type": "Const", "inputs": {"value": 42}},
                  "5": {"class_type": "Hold", "inputs": {"x": ["4", 0], "steps": 3, "preview": True}},
                  "9": {"class_type": "SaveValue", "inputs": {"value": ["5", 0], "filename_prefix": "ComfyUI"}}}
        async with aiohttp.ClientSession() as session:
            ws = await session.ws_connect(f"ws://127.0.0.1:{server.port}/ws?clientId={client_id}")
            images = await get_images(server.url, ws, prompt, client_id)
            assert list(images) == ["9"] and len(images["9"]) == 1
            saved = tmp_path / "output" / "ComfyUI_00001_.png"
            assert images["9"][0] == saved.read_bytes()
            # Again, with a new seed-like change: the example's usual loop.
            prompt["4"]["inputs"]["value"] = 43
            images = await get_images(server.url, ws, prompt, client_id)
            assert images["9"][0] == (tmp_path / "output" / "ComfyUI_00002_.png").read_bytes()
            await ws.close()
    finally:
        server.stop()
