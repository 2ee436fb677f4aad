"""Schemas, models, system stats, the frontend's small routes, /openapi.json."""

import json
import subprocess
import sys

import pytest
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
        # Every status a route answers is listed; every error is ComfyUI's error object.
        for path, methods in paths.items():
            for method, op in methods.items():
                assert {"401", "403"} <= set(op["responses"]), (method, path)
                if "requestBody" in op:
                    assert {"400", "413"} <= set(op["responses"]), (method, path)
                for status, answer in op["responses"].items():
                    if status >= "400":
                        assert answer["content"]["application/json"]["schema"] == {
                            "$ref": "#/components/schemas/ErrorResponse"}
        assert set(paths["/jobs/{job_id}"]["get"]["responses"]) == {"200", "401", "403", "404"}
        assert set(paths["/userdata/{file}"]["delete"]["responses"]) == {"204", "400", "401", "403", "404", "507"}
        assert "content" not in paths["/interrupt"]["post"]["responses"]["200"]  # empty, as ComfyUI's
        assert "101" in paths["/ws"]["get"]["responses"]
        # The history of one prompt is a map of id -> entry, like the whole history.
        one = paths["/history/{prompt_id}"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
        assert one == {"$ref": "#/components/schemas/History"}
        assert schemas["History"]["additionalProperties"] == {"$ref": "#/components/schemas/HistoryEntry"}
        # Constraints of query parameters.
        jobs = {p["name"]: p["schema"] for p in paths["/jobs"]["get"]["parameters"]}
        assert jobs["limit"] == {"type": "integer", "minimum": 1, "maximum": 2 ** 53}
        assert jobs["sort_order"]["enum"] == ["asc", "desc"]
        view = {p["name"]: p for p in paths["/view"]["get"]["parameters"]}
        assert view["filename"]["required"] is True


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


@async_test
async def test_experiment_models(tmp_path):
    base, extra = tmp_path / "base", tmp_path / "big-disk" / "loras"  # an extra folder outside the base
    extra.mkdir(parents=True)
    (extra / "far.safetensors").write_bytes(b"12345")
    (base / "models" / "loras").mkdir(parents=True)
    (base / "nodeflow.json").write_text(json.dumps({"models": {"loras": [str(extra)]}}))
    (base / "models" / "loras" / "near.safetensors").write_bytes(b"1")
    (extra / "near.safetensors").write_bytes(b"shadowed by the first folder")
    async with serve(base) as client:
        folders = await (await client.get("/api/experiment/models")).json()
        by_name = {f["name"]: f["folders"] for f in folders}
        assert by_name["loras"] == ["models/loras", str(extra)] and by_name["checkpoints"] == ["models/checkpoints"]
        files = await (await client.get("/api/experiment/models/loras")).json()
        assert [(f["name"], f["pathIndex"]) for f in files] == [("far.safetensors", 1), ("near.safetensors", 0)]
        assert files[0]["size"] == 5 and files[0]["modified"] > 0
        assert await (await client.get("/api/experiment/models/vae")).json() == []
        resp = await client.get("/api/experiment/models/nope")
        assert resp.status == 404
        assert await (await client.get("/api/global_subgraphs")).json() == {}
        assert await (await client.get("/api/node_replacements")).json() == {}


@async_test
async def test_userdata_files(tmp_path):
    async with serve(tmp_path) as client:
        user = tmp_path / "user" / "default"
        workflow = b'{"nodes": [], "links": []}'
        resp = await client.post("/api/userdata/workflows%2Fa.json", data=workflow)
        assert resp.status == 200 and await resp.json() == "workflows/a.json"
        assert (user / "workflows" / "a.json").read_bytes() == workflow
        resp = await client.get("/api/userdata/workflows%2Fa.json")
        assert resp.status == 200 and await resp.read() == workflow and resp.content_type == "application/json"
        # overwrite=false: 409 when it exists; full_info answers {path, size, modified}.
        resp = await client.post("/api/userdata/workflows%2Fa.json?overwrite=false", data=b"{}")
        assert resp.status == 409 and (user / "workflows" / "a.json").read_bytes() == workflow
        resp = await client.post("/api/userdata/workflows%2Fb.json?overwrite=false&full_info=true", data=b"{}")
        info = await resp.json()
        assert resp.status == 200 and info["path"] == "workflows/b.json" and info["size"] == 2 and info["modified"] > 0
        await client.post("/api/userdata/workflows%2Fsub%2Fc.json", data=b"[]")
        # Listing.
        assert await (await client.get("/api/userdata?dir=workflows")).json() == ["a.json", "b.json"]
        listed = await (await client.get("/api/userdata?dir=workflows&recurse=true&split=true")).json()
        assert listed == [["a.json", "a.json"], ["b.json", "b.json"], ["sub/c.json", "sub", "c.json"]]
        listed = await (await client.get("/api/userdata?dir=workflows&full_info=true")).json()
        assert [f["path"] for f in listed] == ["a.json", "b.json"]
        assert (await client.get("/api/userdata")).status == 400
        # Move.
        resp = await client.post("/api/userdata/workflows%2Fb.json/move/workflows%2Fa.json?overwrite=false")
        assert resp.status == 409
        resp = await client.post("/api/userdata/workflows%2Fb.json/move/workflows%2Fd.json")
        assert resp.status == 200 and await resp.json() == "workflows/d.json"
        assert not (user / "workflows" / "b.json").exists() and (user / "workflows" / "d.json").is_file()
        resp = await client.post("/api/userdata/workflows%2Fnope.json/move/workflows%2Fe.json")
        assert resp.status == 404
        # Delete.
        resp = await client.delete("/api/userdata/workflows%2Fd.json")
        assert resp.status == 204 and not (user / "workflows" / "d.json").exists()
        assert (await client.delete("/api/userdata/workflows%2Fd.json")).status == 404
        assert (await client.get("/api/userdata/workflows%2Fd.json")).status == 404
        # Confined, and names must be files.
        (tmp_path / "secret.txt").write_text("TOP-SECRET")
        for path in ("/api/userdata/..%2F..%2Fsecret.txt", "/api/userdata/%2Fetc%2Fpasswd"):
            resp = await client.get(path)
            assert resp.status == 403 and "TOP-SECRET" not in await resp.text()
            assert (await client.post(path, data=b"x")).status == 403
        assert (await client.get("/api/userdata?dir=..")).status == 403
        for name in ("workflows%2F.", "workflows%2F", "."):
            assert (await client.post(f"/api/userdata/{name}", data=b"x")).status in (400, 404), name
        resp = await client.post("/api/userdata/workflows", data=b"x")  # a folder
        assert resp.status == 400 and str(tmp_path) not in await resp.text()
        # Served as a download unless harmless.
        await client.post("/api/userdata/page.html", data=b"<script>alert(1)</script>")
        resp = await client.get("/api/userdata/page.html")
        assert resp.content_type == "application/octet-stream"


def test_db_paths_are_absolute_and_memory_stays_sqlites_name(tmp_path, monkeypatch):
    from nodeflow.server.serve_cli import config_from_args, parser

    monkeypatch.chdir(tmp_path)
    assert config_from_args(parser().parse_args(["--db", "q.sqlite3"])).db_path == str(tmp_path / "q.sqlite3")
    # resolved as a path, ":memory:" became a file of that name in the current directory
    assert config_from_args(parser().parse_args(["--db", ":memory:"])).db_path == ":memory:"


def test_device_and_precision_options():
    from nodeflow.server.serve_cli import config_from_args, parser

    config = config_from_args(parser().parse_args(["--device", "CPU", "--precision", "fp32"]))
    assert (config.device, config.precision) == ("cpu", "fp32")
    for bad in (["--device", "tpu"], ["--device", "mps:1"], ["--precision", "fp8"]):
        with pytest.raises(SystemExit):
            parser().parse_args(bad)
    assert (config.compile, config.cuda_graphs) == (None, False)
    config = config_from_args(parser().parse_args(["--compile", "--cuda-graphs"]))
    assert (config.compile, config.cuda_graphs) == ("inductor", True)
    config = config_from_args(parser().parse_args(["--compile", "--compile-backend", "aot_eager"]))
    assert config.compile == "aot_eager"


@async_test
async def test_fast_path_options_checked_when_the_worker_starts(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    from nodeflow import context as run_context
    from nodeflow.server.app import StartupError

    for name, value in (("compile", None), ("cuda_graphs", False), ("device", None)):
        monkeypatch.setattr(run_context.default(), name, value)
    async with serve(tmp_path, device="cpu", compile="eager") as client:
        assert (await client.get("/prompt")).status == 200
        assert run_context.default().compile == "eager"
    if not torch.cuda.is_available():
        with pytest.raises(StartupError, match="--cuda-graphs needs a CUDA device"):
            async with serve(tmp_path, device="cpu", cuda_graphs=True):
                pass


@async_test
async def test_device_and_precision_applied_when_the_worker_starts(tmp_path):
    devices = pytest.importorskip("nodeflow.models.devices")
    try:
        async with serve(tmp_path, device="cpu", precision="bf16") as client:
            assert (await client.get("/prompt")).status == 200
            assert str(devices.get_device()) == "cpu" and devices.get_precision() == "bf16"
    finally:
        devices.set_device(None)
        devices.set_precision(None)
    import torch

    if not torch.cuda.is_available():
        from nodeflow.server.app import StartupError

        with pytest.raises(StartupError, match="--device cuda:0"):
            async with serve(tmp_path, device="cuda:0"):
                pass


@async_test
async def test_user_folder_names_too_long_for_the_file_system_are_the_clients_error(tmp_path):
    """Found by fuzzing: a 300-byte folder name made os.stat fail (500)."""
    async with serve(tmp_path) as client:
        assert (await client.post("/userdata/a.json", data=b"{}")).status == 200
        for folder in ("x" * 300, "workflows/" + "y" * 300):
            resp = await client.get("/userdata", params={"dir": folder})
            assert resp.status == 400 and (await resp.json())["error"]["type"] == "invalid_filename"
        resp = await client.post("/userdata/" + "z" * 300, data=b"{}")
        assert resp.status == 400
