"""The graph editor at /, nodeflow's workflows as its templates, and the /internal routes it reads."""

import json

import pytest
from server_helpers import async_test, serve

from nodeflow.registry import default_registry
from nodeflow.server import frontend
from nodeflow.templates import TEMPLATES, WORKFLOWS, document
from nodeflow.uiexport import api_to_ui
from nodeflow.uiformat import ui_to_api

HAS_PACKAGE = frontend.find_frontend(None) is not None


def _without_meta(prompt: dict) -> dict:
    return {k: {kk: vv for kk, vv in v.items() if kk != "_meta"} for k, v in prompt.items()}


@pytest.mark.parametrize("path", sorted(WORKFLOWS.glob("*.json")), ids=lambda p: p.name)
def test_every_shipped_workflow_converts_to_the_ui_format_and_back(path):
    registry = default_registry()
    prompt = json.loads(path.read_text())
    ui = json.loads(json.dumps(api_to_ui(prompt, registry)))
    assert ui["version"] == 0.4 and len(ui["nodes"]) == len(prompt)
    assert _without_meta(ui_to_api(ui, registry)) == _without_meta(prompt)
    # Titles the workflow gives survive; positions do not overlap within a column.
    back = ui_to_api(ui, registry)
    for node_id, node in prompt.items():
        if "_meta" in node:
            assert back[node_id]["_meta"]["title"] == node["_meta"]["title"]
    boxes = [(n["pos"][0], n["pos"][1], n["pos"][1] + n["size"][1]) for n in ui["nodes"]]
    for i, (x, top, bottom) in enumerate(boxes):
        for x2, top2, bottom2 in boxes[i + 1:]:
            assert x != x2 or bottom <= top2 or bottom2 <= top


def test_seed_widgets_get_the_control_value_and_links_are_consistent():
    ui = api_to_ui(json.loads((WORKFLOWS / "txt2img_demo.json").read_text()), default_registry())
    sample = next(n for n in ui["nodes"] if n["type"] == "Sample")
    assert sample["widgets_values"][:2] == [0, "randomize"]
    nodes = {n["id"]: n for n in ui["nodes"]}
    for link_id, source, slot, target, target_slot, kind in ui["links"]:
        assert link_id in nodes[source]["outputs"][slot]["links"]
        assert nodes[target]["inputs"][target_slot]["link"] == link_id
        assert nodes[target]["inputs"][target_slot]["type"] == kind == nodes[source]["outputs"][slot]["type"]


def test_a_prompt_with_an_unknown_node_type_is_not_a_template():
    with pytest.raises(ValueError, match="NoSuchNode"):
        api_to_ui({"1": {"class_type": "NoSuchNode", "inputs": {}}}, default_registry())
    assert document("no-such-template", default_registry()) is None


@async_test
async def test_templates_are_served_as_the_editor_asks_for_them(tmp_path):
    async with serve(tmp_path, registry=default_registry()) as client:
        resp = await client.get("/templates/index.json")
        (module,) = await resp.json()
        assert resp.status == 200 and module["moduleName"] == "default"
        names = [t["name"] for t in module["templates"]]
        assert names[0] == "txt2img_demo" and len(names) == len(TEMPLATES)
        first = module["templates"][0]
        assert first["title"] == "txt2img on the demo model" and first["mediaSubtype"] == "webp"
        for entry in module["templates"]:
            doc = await (await client.get(f"/templates/{entry['name']}.json")).json()
            assert {n["type"] for n in doc["nodes"]} <= set(default_registry().names())
            thumb = await client.get(f"/templates/{entry['name']}-1.{entry['mediaSubtype']}")
            assert thumb.status == 200 and thumb.content_type.startswith("image/")
            assert (await thumb.read())[:4] in (b"RIFF", b"<svg")
        for missing in ("nope.json", "index.fr.json", "txt2img_demo-1.svg", "..%2Findex.json", "txt2img"):
            resp = await client.get(f"/templates/{missing}")
            assert resp.status == 404 and (await resp.json())["error"]["type"] == "not_found"
        assert await (await client.get("/templates/index_logo.json")).json() == {}
        resp = await client.get("/api/workflow_templates")
        assert resp.status == 200 and await resp.json() == {}


@async_test
async def test_without_the_builtin_nodes_no_template_is_offered(tmp_path):
    async with serve(tmp_path) as client:  # the test nodes only
        (module,) = await (await client.get("/templates/index.json")).json()
        assert module["templates"] == []
        assert (await client.get("/templates/txt2img_demo.json")).status == 404


@pytest.mark.skipif(not HAS_PACKAGE, reason="comfyui-frontend-package is not installed (the web extra)")
@async_test
async def test_the_installed_editor_is_served_at_the_root(tmp_path):
    async with serve(tmp_path) as client:
        resp = await client.get("/")
        text = await resp.text()
        assert resp.status == 200 and resp.content_type == "text/html" and "<script" in text
        assert resp.headers["Cache-Control"] == "no-cache"
        asset = text.split('src="', 1)[1].split('"', 1)[0].lstrip("./")
        assert (await client.get("/" + asset)).status == 200
        # The API keeps its routes; a missing file is a JSON 404.
        assert (await client.get("/prompt")).status == 200
        resp = await client.get("/assets/no-such-file.js")
        assert resp.status == 404 and (await resp.json())["error"]["type"] == "not_found"


@async_test
async def test_without_the_editor_the_root_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setattr(frontend, "MODULE", "no_such_frontend_package_here")
    async with serve(tmp_path) as client:
        resp = await client.get("/")
        text = await resp.text()
        assert resp.status == 200 and resp.content_type == "text/html"
        assert 'pip install "nodeflow[web]"' in text and "openapi.json" in text and "--web-root" in text


@async_test
async def test_web_root_overrides_the_package(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "index.html").write_text("<!doctype html><title>mine</title>")
    (site / "app.js").write_text("console.log(1)")
    async with serve(tmp_path, web_root=str(site)) as client:
        assert "mine" in await (await client.get("/")).text()
        assert (await client.get("/app.js")).status == 200
    with pytest.raises(ValueError, match="no index.html"):
        frontend.find_frontend(str(tmp_path / "empty"))


def test_frontend_version_range():
    assert frontend._tested("1.58.1") and frontend._tested("1.28.9")
    assert not frontend._tested("1.28.8") and not frontend._tested("1.59.0") and not frontend._tested("x")


@async_test
async def test_internal_routes_the_editor_reads(tmp_path):
    import logging

    async with serve(tmp_path) as client:
        logging.getLogger("nodeflow.test").warning("a line for the log panel")
        text = await (await client.get("/internal/logs")).json()
        assert isinstance(text, str) and "a line for the log panel" in text
        raw = await (await client.get("/internal/logs/raw")).json()
        assert raw["size"]["cols"] > 0 and any("log panel" in e["m"] for e in raw["entries"])
        assert all(set(e) == {"t", "m"} for e in raw["entries"])
        resp = await client.patch("/internal/logs/subscribe", json={"clientId": "c", "enabled": True})
        assert resp.status == 200
        assert (await client.patch("/internal/logs/subscribe", data=b"{")).status == 400
        paths = await (await client.get("/internal/folder_paths")).json()
        assert paths["checkpoints"] == ["models/checkpoints"]
        (tmp_path / "input").mkdir(exist_ok=True)
        (tmp_path / "input" / "a.png").write_bytes(b"x")
        (tmp_path / "input" / "sub").mkdir()
        assert await (await client.get("/internal/files/input")).json() == ["a.png"]
        resp = await client.get("/internal/files/models")
        assert resp.status == 400 and (await resp.json())["error"]["type"] == "invalid_type"
    # The buffer is detached with the app.
    assert not any(type(h).__name__ == "LogBuffer" for h in logging.getLogger().handlers)
