"""Schemas, models, system stats, the frontend's small routes, /openapi.json."""

import subprocess
import sys

from server_helpers import async_test, serve


@async_test
async def test_object_info(tmp_path):
    async with serve(tmp_path) as client:
        info = await (await client.get("/object_info")).json()
        assert {"Const", "Add", "Hold", "Show", "SaveValue"} <= set(info)
        const = info["Const"]
        assert const["input"]["required"]["value"][0] == "INT"
        assert const["output"] == ["INT"] and const["output_node"] is False
        assert info["Show"]["output_node"] is True
        one = await (await client.get("/api/object_info/Hold")).json()
        assert list(one) == ["Hold"] and one["Hold"] == info["Hold"]
        assert await (await client.get("/object_info/Nope")).json() == {}


@async_test
async def test_models_and_embeddings(tmp_path):
    (tmp_path / "models" / "checkpoints" / "sub").mkdir(parents=True)
    (tmp_path / "models" / "checkpoints" / "a.safetensors").write_bytes(b"")
    (tmp_path / "models" / "checkpoints" / "sub" / "b.ckpt").write_bytes(b"")
    (tmp_path / "models" / "checkpoints" / "notes.txt").write_text("")
    (tmp_path / "models" / "embeddings").mkdir(parents=True)
    (tmp_path / "models" / "embeddings" / "easyneg.pt").write_bytes(b"")
    async with serve(tmp_path) as client:
        kinds = await (await client.get("/models")).json()
        assert "checkpoints" in kinds and "loras" in kinds
        assert await (await client.get("/models/checkpoints")).json() == ["a.safetensors", "sub/b.ckpt"]
        assert await (await client.get("/api/models/loras")).json() == []
        assert (await client.get("/models/nope")).status == 404
        assert await (await client.get("/embeddings")).json() == ["easyneg"]


@async_test
async def test_system_stats_shape(tmp_path):
    async with serve(tmp_path) as client:
        stats = await (await client.get("/api/system_stats")).json()
        system = stats["system"]
        for key, kind in (("os", str), ("python_version", str), ("embedded_python", bool), ("comfyui_version", str),
                          ("pytorch_version", str), ("ram_total", int), ("ram_free", int), ("argv", list)):
            assert isinstance(system[key], kind), key
        assert system["embedded_python"] is False and system["ram_total"] > 0
        dev = stats["devices"][0]
        assert {"name", "type", "index", "vram_total", "vram_free", "torch_vram_total", "torch_vram_free"} <= set(dev)


def test_server_imports_without_torch():
    code = ("import sys; sys.modules['torch'] = None; import nodeflow.server, nodeflow.queue; "
            "from nodeflow.server.routes_info import _torch_devices; "
            "print(_torch_devices(1, 1)[0] == '')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True"


@async_test
async def test_frontend_startup_routes(tmp_path):
    async with serve(tmp_path) as client:
        assert await (await client.get("/api/extensions")).json() == []
        users = await (await client.get("/api/users")).json()
        assert "users" not in users and users["storage"] == "server"  # single-user, no login screen
        features = await (await client.get("/api/features")).json()
        assert features["supports_preview_metadata"] is False and features["max_upload_size"] == 100 * 1024 * 1024
        assert await (await client.get("/api/settings")).json() == {}
        resp = await client.post("/api/settings", json={"Comfy.ColorPalette": "dark", "Comfy.X": [1]})
        assert resp.status == 200
        resp = await client.post("/api/settings/Comfy.Locale", json="en")
        assert resp.status == 200
        assert await (await client.get("/api/settings")).json() == {
            "Comfy.ColorPalette": "dark", "Comfy.Locale": "en", "Comfy.X": [1]}
        assert await (await client.get("/api/settings/Comfy.Locale")).json() == "en"
        assert await (await client.get("/api/settings/Unset")).json() is None
        assert (await client.post("/api/settings", json=[1])).status == 400
        assert await (await client.get("/api/userdata?dir=workflows")).json() == []
        assert (await client.get("/api/userdata/workflows%2Fa.json")).status == 404


@async_test
async def test_settings_persist_across_restart(tmp_path):
    async with serve(tmp_path) as client:
        await client.post("/settings", json={"Comfy.A": 1})
    async with serve(tmp_path) as client:
        assert await (await client.get("/settings")).json() == {"Comfy.A": 1}


@async_test
async def test_openapi_document(tmp_path):
    async with serve(tmp_path) as client:
        doc = await (await client.get("/openapi.json")).json()
        assert doc["openapi"].startswith("3.")
        paths = doc["paths"]
        for path in ("/prompt", "/queue", "/interrupt", "/history", "/history/{prompt_id}", "/view",
                     "/upload/image", "/upload/mask", "/object_info", "/object_info/{node_class}", "/models",
                     "/models/{folder}", "/embeddings", "/system_stats", "/extensions", "/features", "/ws",
                     "/jobs", "/jobs/{job_id}", "/userdata/{file}"):
            assert path in paths, path
        post = paths["/prompt"]["post"]
        assert post["requestBody"]["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/PromptRequest"}
        schemas = doc["components"]["schemas"]
        assert {"PromptRequest", "PromptResponse", "ErrorResponse", "HistoryEntry", "QueueResponse"} <= set(schemas)
        assert "client_id" in schemas["PromptRequest"]["properties"]
        upload = paths["/upload/image"]["post"]["requestBody"]["content"]
        assert "multipart/form-data" in upload
        assert paths["/history/{prompt_id}"]["get"]["parameters"][0]["name"] == "prompt_id"


@async_test
async def test_web_root_served(tmp_path):
    web = tmp_path / "web"
    web.mkdir()
    (web / "index.html").write_text("<html>frontend</html>")
    (web / "app.js").write_text("console.log(1)")
    async with serve(tmp_path, web_root=str(web)) as client:
        assert "frontend" in await (await client.get("/")).text()
        assert (await client.get("/app.js")).status == 200
        # API routes win over static files.
        assert (await client.get("/prompt")).content_type == "application/json"


def test_nodeflow_serve_passes_options_to_the_server(capsys):
    import pytest

    from nodeflow import cli

    with pytest.raises(SystemExit) as info:
        cli.main(["serve", "--help"])
    assert info.value.code == 0
    assert "--auth-token" in capsys.readouterr().out
    with pytest.raises(SystemExit) as info:
        cli.main(["serve", "--port", "not-a-number"])
    assert info.value.code == 2 and "--port" in capsys.readouterr().err
