"""Helpers of the server tests: apps on test servers, real server processes, WebSocket readers."""

import asyncio
import functools
import json
import sys
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import server_nodes
from aiohttp.test_utils import TestClient, TestServer
from server_nodes import Hold

from nodeflow import Registry
from nodeflow.server import ServerConfig, create_app


def make_registry() -> Registry:
    return Registry(server_nodes.ALL)


def async_test(fn):
    """Run an async test function in a fresh event loop (no pytest plugin needed)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return asyncio.run(asyncio.wait_for(fn(*args, **kwargs), 30))

    return wrapper


@asynccontextmanager
async def serve(tmp_path, registry=None, backend=None, **options):
    """A running app on a loopback port and a client for it."""
    options.setdefault("base_dir", str(tmp_path))
    app = create_app(ServerConfig(**options), registry or make_registry(), backend=backend)
    client = TestClient(TestServer(app, host="127.0.0.1"))
    try:
        await client.start_server()
    except BaseException:
        await client.close()
        raise
    try:
        yield client
    finally:
        if Hold.GATE is not None:
            Hold.GATE.set()
        await client.close()


def chain(value=1, out="Show", **extra):
    """Const -> Add -> output node."""
    prompt = {
        "1": {"class_type": "Const", "inputs": {"value": value}},
        "2": {"class_type": "Add", "inputs": {"a": ["1", 0], "b": 10}},
        "3": {"class_type": out, "inputs": {"value": ["2", 0]}},
    }
    prompt.update(extra)
    return prompt


def held(value=1, steps=3, **inputs):
    """Const -> Hold -> Show: holds at step 1 while Hold.GATE is set and not released."""
    return {
        "1": {"class_type": "Const", "inputs": {"value": value}},
        "2": {"class_type": "Hold", "inputs": {"x": ["1", 0], "steps": steps, **inputs}},
        "3": {"class_type": "Show", "inputs": {"value": ["2", 0]}},
    }


async def submit(client, prompt, expect=200, **body):
    resp = await client.post("/prompt", json={"prompt": prompt, **body})
    data = await resp.json()
    assert resp.status == expect, data
    return data


async def wait_history(client, prompt_id, timeout=10.0):
    """Poll /history/{id} until the prompt is there."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while loop.time() < end:
        resp = await client.get(f"/history/{prompt_id}")
        data = await resp.json()
        if prompt_id in data:
            return data[prompt_id]
        await asyncio.sleep(0.01)
    raise AssertionError(f"prompt {prompt_id} never reached the history")


async def wait_started():
    """Wait until a Hold node reached step 1."""
    for _ in range(1000):
        if Hold.STARTED.is_set():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("Hold never started")


class WsReader:
    """Collects a WebSocket's messages; `until` waits for one that matches."""

    def __init__(self, ws):
        self.ws = ws
        self.messages = []  # (type, data) for text; ("binary", bytes) for binary

    async def next(self, timeout=10.0):
        msg = await self.ws.receive(timeout=timeout)
        if msg.type.name == "TEXT":
            m = json.loads(msg.data)
            item = (m["type"], m["data"])
        elif msg.type.name == "BINARY":
            item = ("binary", msg.data)
        else:
            raise AssertionError(f"websocket closed: {msg}")
        self.messages.append(item)
        return item

    async def until(self, predicate, timeout=10.0):
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while True:
            item = await self.next(max(end - loop.time(), 0.01))
            if predicate(*item):
                return item

    async def until_done(self, prompt_id, timeout=10.0):
        await self.until(lambda t, d: t == "executing" and isinstance(d, dict) and d.get("node") is None
                         and d.get("prompt_id") == prompt_id, timeout)
        return [m for m in self.messages if m[0] == "binary" or m[1].get("prompt_id") == prompt_id]

    async def quiet(self, seconds=0.15):
        """Messages arriving within `seconds` (expecting none, usually)."""
        got = []
        try:
            while True:
                got.append(await self.next(seconds))
        except (asyncio.TimeoutError, TimeoutError):
            return got


# -- a real server process --------------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[2]
NODES_FILE = str(Path(__file__).with_name("server_nodes.py"))


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def readme_server(base: Path):
    """``python server.py --port N`` started in ``base`` as the README says (no other flag),
    yielded once it answers (its ``.url`` set); its log is printed if the block fails, and
    the server is stopped after it."""
    import os
    import subprocess
    import time
    import urllib.request

    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    port = free_port()
    log_path = base / "server.log"
    with open(log_path, "wb") as log:
        server = subprocess.Popen([sys.executable, str(REPO / "server.py"), "--port", str(port)], cwd=base,
                                  env=env, stdout=log, stderr=subprocess.STDOUT)
        server.url = f"http://127.0.0.1:{port}"
        try:
            end = time.monotonic() + 60
            while True:
                assert server.poll() is None, log_path.read_text()
                assert time.monotonic() < end, "the server did not start: " + log_path.read_text()
                try:
                    with urllib.request.urlopen(server.url + "/prompt", timeout=2):
                        break
                except OSError:
                    time.sleep(0.1)
            yield server
        except BaseException:
            print(log_path.read_text()[-4000:])
            raise
        finally:
            server.terminate()
            server.wait(30)


class ServerProcess:
    """``python server.py`` on a free loopback port with the test nodes (and the built-in ones
    with ``builtin``)."""

    def __init__(self, base: Path, *args: str, port: int | None = None, builtin: bool = False) -> None:
        import os
        import subprocess

        self.base, self.port = base, port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(base / f"server-{self.port}.log", "ab")  # noqa: SIM115 - closed in stop()
        cmd = [sys.executable, str(REPO / "server.py"), "--port", str(self.port), "--base-dir", str(base),
               *([] if builtin else ["--no-builtin-nodes"]), "--extra-nodes", NODES_FILE, *args]
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})

    async def ready(self, timeout: float = 20.0) -> "ServerProcess":
        import aiohttp

        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        async with aiohttp.ClientSession() as session:
            while loop.time() < end:
                if self.proc.poll() is not None:
                    raise AssertionError(f"server exited: {self.output()}")
                try:
                    async with session.get(self.url + "/prompt") as resp:
                        if resp.status == 200:
                            return self
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.05)
        raise AssertionError(f"server not ready: {self.output()}")

    def output(self) -> str:
        self.log.flush()
        return (self.base / f"server-{self.port}.log").read_text(errors="replace")

    def kill(self) -> None:
        import signal

        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> int:
        import subprocess

        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()
        return self.proc.returncode
