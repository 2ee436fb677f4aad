"""The suite's UI-format documents, converted by the stock editor itself: each is loaded into
the frontend that nodeflow serves (headless Chromium over the DevTools protocol), and the API
prompt of the editor's own ``app.graphToPrompt()`` must equal ``ui_to_api``'s (the same node
ids, class types, input values and links; key order aside).

The expected prompts in tests/nodes/test_subgraphs.py and test_uiformat.py come from the
editor's rules; this test checks them against the editor. It skips when there is no Chromium
(Debian's ``chromium``; or set ``NODEFLOW_CHROMIUM``) or no frontend package.
"""

import asyncio
import copy
import importlib.util
import json
import time
from pathlib import Path

import pytest
from browser import Browser, CdpError, find_chromium
from server_helpers import readme_server

from nodeflow.registry import default_registry
from nodeflow.server import frontend
from nodeflow.uiformat import ui_to_api

CHROMIUM = find_chromium()
APP = "(window.app ?? window.comfyAPI?.app?.app)"
NODE_TESTS = Path(__file__).parent.parent / "nodes"


def _module(name: str):
    spec = importlib.util.spec_from_file_location(f"_frontend_prompt_{name}", NODE_TESTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _documents() -> dict[str, dict]:
    """The UI-format documents of the node tests, and a few variants they build."""
    sg, ui = _module("test_subgraphs"), _module("test_uiformat")
    docs = {"subgraphs": sg.workflow(), "renumbered": sg.renumbered_workflow(),
            "group nodes": sg.group_node_workflow(), "default graph": copy.deepcopy(ui.DEFAULT_GRAPH),
            "editor-only, bypassed, muted": ui.editor_graph()}
    doc = sg.workflow()
    del doc["nodes"][3]["widgets_values_named"]
    doc["nodes"][3]["widgets_values"] = []
    docs["no promoted values"] = doc
    doc = sg.workflow()
    doc["nodes"][1]["mode"], doc["nodes"][2]["mode"] = 4, 2
    docs["bypassed and muted instances"] = doc
    doc = sg.renumbered_workflow()
    del doc["state"]
    docs["renumbered, no state"] = doc
    doc = sg.workflow()
    doc["nodes"].append({"id": 40, "type": "PrimitiveNode", "mode": 0, "order": 0,
                         "outputs": [{"name": "INT", "type": "INT", "links": [9], "widget": {"name": "width"}}],
                         "widgets_values": [12, "fixed"]})
    doc["links"].append(sg.link(9, 40, 0, 10, 1, "INT"))
    doc["nodes"][1]["inputs"][1]["link"] = 9
    doc["nodes"][2]["properties"] = {"proxyWidgets": [["6", "width"]]}
    docs["primitive into an instance, a proxied widget"] = doc
    doc = ui.editor_graph()
    doc["nodes"][3]["mode"] = 4
    docs["bypassed scaler"] = doc
    doc = copy.deepcopy(ui.DEFAULT_GRAPH)
    next(n for n in doc["nodes"] if n["id"] == 3)["widgets_values"] = [7, True, 30, 6.5, "euler", "karras", 0.5]
    docs["legacy seed control"] = doc
    docs["custom combo, image compare"] = {"nodes": [
        {"id": 1, "type": "CustomCombo", "mode": 0, "order": 0, "pos": [0, 0],
         "outputs": [{"name": "STRING", "type": "STRING", "links": []}, {"name": "INDEX", "type": "INT", "links": []}],
         "widgets_values": ["16:9", -1, "9:16", "16:9", ""]},
        {"id": 2, "type": "LoadImage", "mode": 0, "order": 1, "pos": [0, 300],
         "outputs": [{"name": "IMAGE", "type": "IMAGE", "links": [1]}, {"name": "MASK", "type": "MASK", "links": None}],
         "widgets_values": ["pic.png", "image"]},
        {"id": 3, "type": "ImageCompare", "mode": 0, "order": 2, "pos": [300, 300],
         "inputs": [{"name": "image_a", "type": "IMAGE", "link": 1}], "outputs": [], "widgets_values": []},
    ], "links": [[1, 2, 0, 3, 0, "IMAGE"]], "version": 0.4}
    return docs


def _same(value):
    """JSON numbers as the editor sends them (8.0 and 8 are one number)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, list):
        return [_same(v) for v in value]
    if isinstance(value, dict):
        return {k: _same(v) for k, v in value.items()}
    return value


def _prompt(api: dict) -> dict:
    return {node_id: {"class_type": node.get("class_type"), "inputs": _same(node["inputs"])}
            for node_id, node in api.items()}


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium to drive: install Debian's chromium package "
                    "(apt-get install chromium; .ci/run does) or set NODEFLOW_CHROMIUM")
@pytest.mark.skipif(frontend.find_frontend(None) is None,
                    reason='the graph editor is not installed: pip install -e ".[web]"')
def test_graph_to_prompt_of_the_editor_equals_ui_to_api(tmp_path):
    docs = _documents()
    with readme_server(tmp_path) as server:
        theirs = asyncio.run(asyncio.wait_for(_editor_prompts(server.url, tmp_path, docs), 120))
    registry = default_registry()
    for name, doc in docs.items():
        output, saved = theirs[name]["output"], theirs[name]["workflow"]
        assert output, f"{name}: the editor made an empty prompt (did it fail to load the document?)"
        assert _prompt(ui_to_api(copy.deepcopy(doc), registry)) == _prompt(output), name
        # The workflow as the editor saves it (its own format version, ids, widget values)
        # converts to the same prompt.
        assert _prompt(ui_to_api(saved, registry)) == _prompt(output), f"{name}, as the editor saves it"


async def _editor_prompts(url: str, base: Path, docs: dict[str, dict]) -> dict[str, dict]:
    async with Browser.launch(base / "profile", CHROMIUM) as browser:
        page = await browser.open(url + "/")
        # Ready once the node types from /object_info are registered (else every node loads
        # as a placeholder without a class).
        await page.wait_for(f"!!{APP}?.vueAppReady && !!{APP}?.canvas && !!{APP}?.graphToPrompt && "
                            "!!window.LiteGraph?.registered_node_types?.SaveImage", 60)
        prompts = {}
        for name, doc in docs.items():
            load = (f"(async () => {{ const app = {APP}; await app.loadGraphData({json.dumps(doc)}, true, false, "
                    "null, {skipAssetScans: true, silentAssetErrors: true}); "
                    "const p = await app.graphToPrompt(); "
                    # As JSON, the way the editor posts it (the DevTools protocol's own copy
                    # would turn the editor's reactive arrays into objects).
                    "return JSON.stringify({output: p.output, workflow: p.workflow}); })()")
            end = time.monotonic() + 30
            while True:
                try:
                    prompts[name] = json.loads(await page.evaluate(load, timeout=60))
                    break
                except CdpError as error:  # the editor still setting up its canvas
                    if "canvas is null" not in str(error) or time.monotonic() > end:
                        raise
                    await asyncio.sleep(0.5)
        return prompts
