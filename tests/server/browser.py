"""A small headless-Chromium driver over the DevTools protocol (aiohttp's WebSocket client;
no browser download, no driver package): start Debian's ``chromium``, open a page, evaluate
JavaScript in it, and collect its console errors and failed requests.

    async with Browser.launch(tmp_path) as browser:
        page = await browser.open("http://127.0.0.1:8188/")
        await page.wait_for("document.querySelector('.comfyui-body') !== null")
        await page.evaluate("1 + 1")
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import re
import shutil
import subprocess
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp

#: Flags that work in a container without a GPU, a sandbox or network beyond loopback.
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1600,1000", "--remote-debugging-port=0")
NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    """The browser binary: ``$NODEFLOW_CHROMIUM``, else the first of ``NAMES`` on the PATH."""
    given = os.environ.get("NODEFLOW_CHROMIUM")
    if given:
        return given if Path(given).is_file() else None
    for name in NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


class CdpError(RuntimeError):
    pass


class Browser:
    def __init__(self, proc: subprocess.Popen, ws: aiohttp.ClientWebSocketResponse,
                 session: aiohttp.ClientSession) -> None:
        self.proc, self.ws, self.session = proc, ws, session
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future] = {}
        self._pages: dict[str, Page] = {}
        self._reader = asyncio.get_running_loop().create_task(self._read())

    @classmethod
    @asynccontextmanager
    async def launch(cls, profile: Path, binary: str | None = None):
        binary = binary or find_chromium()
        if binary is None:
            raise CdpError("no chromium binary")
        profile.mkdir(parents=True, exist_ok=True)
        proc = subprocess.Popen([binary, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        session = aiohttp.ClientSession()
        browser = None
        try:
            url = await asyncio.wait_for(asyncio.to_thread(_devtools_url, proc), 30)
            ws = await session.ws_connect(url, max_msg_size=0)
            browser = cls(proc, ws, session)
            yield browser
        finally:
            if browser is not None:
                browser._reader.cancel()
                await browser.ws.close()
            await session.close()
            proc.terminate()
            try:
                await asyncio.to_thread(proc.wait, 10)
            except subprocess.TimeoutExpired:
                proc.kill()
                await asyncio.to_thread(proc.wait, 10)

    async def _read(self) -> None:
        async for msg in self.ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            data = json.loads(msg.data)
            if "id" in data:
                future = self._waiting.pop(data["id"], None)
                if future is not None and not future.done():
                    if "error" in data:
                        future.set_exception(CdpError(str(data["error"])))
                    else:
                        future.set_result(data.get("result", {}))
            elif "sessionId" in data and data["sessionId"] in self._pages:
                self._pages[data["sessionId"]]._event(data["method"], data.get("params", {}))
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(CdpError("the browser closed the connection"))

    async def send(self, method: str, params: dict | None = None, session: str | None = None,
                   timeout: float = 30) -> dict:
        msg_id = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        self._waiting[msg_id] = future
        message: dict[str, Any] = {"id": msg_id, "method": method, "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        await self.ws.send_str(json.dumps(message))
        return await asyncio.wait_for(future, timeout)

    async def open(self, url: str) -> Page:
        target = (await self.send("Target.createTarget", {"url": "about:blank"}))["targetId"]
        session = (await self.send("Target.attachToTarget", {"targetId": target, "flatten": True}))["sessionId"]
        page = Page(self, session)
        self._pages[session] = page
        for domain in ("Runtime", "Page", "Network", "Log"):
            await page.send(f"{domain}.enable")
        await page.send("Page.navigate", {"url": url})
        return page


def _devtools_url(proc: subprocess.Popen) -> str:
    for raw in proc.stderr:
        line = raw.decode(errors="replace")
        found = re.search(r"DevTools listening on (ws://\S+)", line)
        if found:
            # Keep draining stderr so the browser never blocks on a full pipe.
            import threading

            threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
            return found.group(1)
    raise CdpError(f"chromium exited ({proc.wait()}) before opening its DevTools port")


class Page:
    def __init__(self, browser: Browser, session: str) -> None:
        self.browser, self.session = browser, session
        self.console: list[tuple[str, str]] = []      # (level, text)
        self.errors: list[str] = []                    # uncaught exceptions
        self.failed: list[tuple[int, str]] = []        # (status, url) of HTTP responses >= 400
        self.websocket_frames: list[dict] = []         # JSON frames the page received

    def _event(self, method: str, params: dict) -> None:
        if method == "Runtime.consoleAPICalled":
            text = " ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", []))
            self.console.append((params.get("type", ""), text))
        elif method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            self.errors.append(details.get("exception", {}).get("description") or details.get("text", ""))
        elif method == "Network.responseReceived":
            response = params.get("response", {})
            if response.get("status", 0) >= 400:
                self.failed.append((response["status"], response.get("url", "")))
        elif method == "Network.webSocketFrameReceived":
            payload = params.get("response", {}).get("payloadData", "")
            try:
                self.websocket_frames.append(json.loads(payload))
            except ValueError:
                pass
        elif method == "Log.entryAdded":
            entry = params.get("entry", {})
            self.console.append((entry.get("level", ""), entry.get("text", "")))

    async def send(self, method: str, params: dict | None = None, timeout: float = 30) -> dict:
        return await self.browser.send(method, params, self.session, timeout)

    async def evaluate(self, expression: str, timeout: float = 30) -> Any:
        """The value of a JavaScript expression (awaited if it is a promise)."""
        result = await self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                      "awaitPromise": True}, timeout)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise CdpError(details.get("exception", {}).get("description") or details.get("text", "error"))
        return result.get("result", {}).get("value")

    async def wait_for(self, expression: str, timeout: float = 20, interval: float = 0.05) -> Any:
        """Poll until ``expression`` is truthy; its value."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while True:
            try:
                value = await self.evaluate(expression)
            except CdpError:
                value = None
            if value:
                return value
            if loop.time() > end:
                raise TimeoutError(f"still false after {timeout} s: {expression}")
            await asyncio.sleep(interval)

    async def screenshot(self, path: Path) -> None:
        import base64

        data = (await self.send("Page.captureScreenshot", {"format": "png"}))["data"]
        path.write_bytes(base64.b64decode(data))
