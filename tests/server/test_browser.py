"""The graph editor in a real browser (headless Chromium over the DevTools protocol), on a server
started as the README says: the first screen offers "txt2img on the demo model"; loaded and
run, its picture shows on the SaveImage node, the job in the queue panel, and the running node
is outlined while it samples; a broken graph shows an error and runs nothing.

Debian's ``chromium`` package is the browser (``.ci/run`` installs it); set
``NODEFLOW_CHROMIUM`` to use another binary. The test skips only when there is none.
"""

import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from browser import Browser, find_chromium
from server_helpers import REPO, readme_server

from nodeflow.server import frontend

CHROMIUM = find_chromium()
APP = "(window.app ?? window.comfyAPI?.app?.app)"
#: The ids of the nodes the editor outlines as running now (its own stroke style for them).
OUTLINED = (f"(() => {{ const a = {APP}; if (!a || !a.graph) return []; return a.graph.nodes"
            ".filter(n => n.strokeStyles?.running?.call(n)).map(n => String(n.id)); })()")
#: The pictures the SaveImage node (id 9 in the template) shows, loaded.
PICTURES = (f"(() => {{ const n = {APP}.graph.getNodeById(9); return (n?.imgs || [])"
            ".filter(i => i.complete && i.naturalWidth > 0).map(i => i.src); })()")
#: Press the Run button (1.28's test id is on the split button around it).
RUN = ("(() => { const e = document.querySelector('[data-testid=queue-button]'); "
       "(e.tagName === 'BUTTON' ? e : e.querySelector('button')).click(); })()")
#: Open the queue panel: "Expand job queue" (1.58), else the sidebar's Queue tab (1.28).
QUEUE_PANEL = ("(() => { const b = [...document.querySelectorAll('button')]; const label = e => "
               "((e.getAttribute('aria-label') || '') + ' ' + e.innerText).trim().toLowerCase(); "
               "(b.find(e => label(e).includes('job queue')) || b.find(e => label(e).split(/\\s+/).includes('queue')))"
               ".click(); })()")
#: Requests the stock frontend makes that ComfyUI answers 404 too (a user's optional files).
OPTIONAL = ("/user.css", "/api/userdata/user.css", "/api/userdata/comfy.templates.json", "/favicon.ico")


def _make_demo_model(base: Path) -> None:
    """``nodeflow demo`` in ``base``, as the README's set-up says (``python server.py`` follows)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    demo = subprocess.run([sys.executable, "-m", "nodeflow.cli", "demo", "--quiet", "--steps", "1", "--batch", "1"],
                          cwd=base, env=env, capture_output=True, text=True, timeout=120)
    assert demo.returncode == 0, demo.stderr
    assert (base / "models" / "checkpoints" / "nodeflow-demo.safetensors").is_file()


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.loads(resp.read())


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium to drive: install Debian's chromium package "
                    "(apt-get install chromium; .ci/run does) or set NODEFLOW_CHROMIUM")
def test_the_editor_runs_the_demo_template_and_shows_errors(tmp_path):
    assert frontend.find_frontend(None) is not None, \
        'the graph editor is not installed: pip install -e ".[web]" (as the README says)'
    _make_demo_model(tmp_path)
    with readme_server(tmp_path) as server:
        asyncio.run(asyncio.wait_for(_drive(server.url, tmp_path), 150))


async def _drive(url: str, base: Path) -> None:
    started = time.monotonic()
    async with Browser.launch(base / "profile", CHROMIUM) as browser:
        page = await browser.open(url + "/")
        try:
            await _scenario(page, url, base)
        except BaseException:
            await page.screenshot(base / "failure.png")
            print("screenshot:", base / "failure.png", "\nconsole:", page.console[-20:], "\nerrors:", page.errors)
            raise
    print(f"browser scenario: {time.monotonic() - started:.1f} s")


async def _scenario(page, url: str, base: Path) -> None:
    # A new user's first screen: the templates, nodeflow's demo first.
    card = "[data-testid=template-workflow-txt2img_demo]"
    await page.wait_for(f"!!document.querySelector('{card}')", 60)
    assert "txt2img on the demo model" in await page.evaluate(f"document.querySelector('{card}').innerText")
    await page.evaluate(f"document.querySelector('{card}').click()")
    await page.wait_for(f"{APP}?.graph?.nodes?.length === 7", 30)
    assert await page.evaluate(f"{APP}.graph.getNodeById(4).widgets[0].value") == "nodeflow-demo.safetensors"

    # Run: the running node is outlined while it works, then the picture shows on SaveImage.
    await page.evaluate(RUN)
    outlined: set[str] = set()
    end = time.monotonic() + 120  # (seconds on a quiet machine; a loaded one may take much longer)
    while not await page.evaluate(PICTURES):
        assert time.monotonic() < end, f"no picture on the SaveImage node; outlined: {outlined}"
        outlined.update(await page.evaluate(OUTLINED))
        await asyncio.sleep(0.02)
    assert "3" in outlined, f"the Sample node was never outlined as running (outlined: {outlined})"
    pictures = await page.evaluate(PICTURES)
    assert len(pictures) == 4 and all("/api/view?filename=demo_" in p and "type=output" in p for p in pictures)
    await page.wait_for(f"{APP}.runningNodeId == null", 10)  # nothing outlined once it is done
    states = [f["data"] for f in page.websocket_frames if f.get("type") == "progress_state"]
    assert any(s["nodes"].get("3", {}).get("state") == "running" for s in states)

    # The job in the queue panel, with its picture.
    history = _get(url + "/api/history")
    (entry,) = history.values()
    saved = entry["outputs"]["9"]["images"][0]["filename"]
    await page.evaluate(QUEUE_PANEL)
    await page.wait_for(f"document.body.innerText.includes('{saved}') || [...document.querySelectorAll('img')]"
                        f".some(i => i.src.includes('filename={saved}') && i.naturalWidth > 0)", 15)

    # A broken graph: the sampler's model link removed. An error shows; nothing runs.
    starts = sum(f.get("type") == "execution_start" for f in page.websocket_frames)
    await page.evaluate(f"{APP}.graph.getNodeById(3).disconnectInput(0)")
    await page.evaluate(RUN)
    await page.wait_for("document.body.innerText.includes('Required input')", 15)  # 1.58's panel, 1.28's dialog
    errors = await page.evaluate(f"JSON.stringify({APP}.lastNodeErrors)")
    assert "required_input_missing" in errors and '"3"' in errors
    await asyncio.sleep(0.5)
    assert sum(f.get("type") == "execution_start" for f in page.websocket_frames) == starts
    assert len(_get(url + "/api/history")) == 1 and _get(url + "/api/queue")["queue_pending"] == []

    # Every request of the editor was answered, but for the optional files and the refused prompt.
    failed = [(status, u) for status, u in page.failed
              if u[len(url):] not in OPTIONAL and not (status == 400 and u == url + "/api/prompt")]
    assert failed == [], failed
