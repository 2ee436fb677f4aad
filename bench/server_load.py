"""Load test of the server: many clients submitting a cheap workflow at once.

    python bench/server_load.py [--prompts 1000] [--clients 20] [--ws] [--server URL]

Starts ``python server.py`` on a free loopback port with a temporary base folder and the
cheap nodes defined below (unless ``--server`` names a running one that has them), then
``--clients`` clients each submit their share of ``--prompts`` prompts over HTTP, one after
another (so up to ``--clients`` requests are in flight). It reports validated submissions
per second, the p50/p99 latency of POST /prompt, how long the queue took to drain, and
checks that nothing was lost: every prompt must end in the history with status success
(and, with ``--ws``, every client must see ``executing`` with ``node: null`` for each of its
prompts). Exit status 1 if anything was lost.

This file is also the node module the server loads (``--extra-nodes bench/server_load.py``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from nodeflow import Int, Node, Output, Result, Socket

ROOT = Path(__file__).resolve().parent.parent


# -- the cheap nodes (registered by the server process) ----------------------------------------


class BenchConst(Node):
    inputs = {"value": Int(default=0, min=0, max=1 << 40)}
    outputs = [Output("INT")]

    def run(self, value):
        return (value,)


class BenchAdd(Node):
    inputs = {"a": Int(default=0), "b": Int(default=0)}
    outputs = [Output("INT")]

    def run(self, a, b):
        return (a + b,)


class BenchShow(Node):
    inputs = {"value": Socket("INT")}
    outputs = []
    output_node = True

    def run(self, value):
        return Result(ui={"text": [str(value)]})


def workflow(i: int) -> dict:
    # A distinct value per prompt, so every prompt really runs (no cache hits).
    return {"1": {"class_type": "BenchConst", "inputs": {"value": i}},
            "2": {"class_type": "BenchAdd", "inputs": {"a": ["1", 0], "b": 1}},
            "3": {"class_type": "BenchShow", "inputs": {"value": ["2", 0]}}}


# -- the load ---------------------------------------------------------------------------------------


async def client(url: str, index: int, count: int, first: int, latencies: list[float], ids: dict[str, str],
                 use_ws: bool, seen: dict[str, set[str]]) -> None:
    import aiohttp

    client_id = f"bench-{index}-{uuid.uuid4().hex[:8]}"
    async with aiohttp.ClientSession() as session:
        ws = await session.ws_connect(f"{url}/ws?clientId={client_id}") if use_ws else None
        done: set[str] = set()
        seen[client_id] = done
        for i in range(first, first + count):
            body = {"prompt": workflow(i), "client_id": client_id}
            t = time.perf_counter()
            async with session.post(f"{url}/prompt", json=body) as resp:
                data = await resp.json()
                if resp.status != 200:
                    raise RuntimeError(f"POST /prompt answered {resp.status}: {data}")
            latencies.append(time.perf_counter() - t)
            ids[data["prompt_id"]] = client_id
        if ws is not None:
            mine = {pid for pid, cid in ids.items() if cid == client_id}
            while not mine <= done:
                msg = await ws.receive(timeout=60)
                if msg.type != aiohttp.WSMsgType.TEXT:
                    break
                m = json.loads(msg.data)
                if m["type"] == "executing" and m["data"].get("node") is None:
                    done.add(m["data"]["prompt_id"])
            await ws.close()


async def run(url: str, prompts: int, clients: int, use_ws: bool) -> int:
    import aiohttp

    latencies: list[float] = []
    ids: dict[str, str] = {}
    seen: dict[str, set[str]] = {}
    share = [prompts // clients + (1 if k < prompts % clients else 0) for k in range(clients)]
    firsts = [sum(share[:k]) for k in range(clients)]
    start = time.perf_counter()
    submit_end = [0.0]

    async def timed(k: int) -> None:
        await client(url, k, share[k], firsts[k], latencies, ids, use_ws, seen)

    tasks = [asyncio.create_task(timed(k)) for k in range(clients)]
    # Submission time: until the last POST /prompt answered.
    while len(latencies) < prompts and not all(t.done() for t in tasks):
        await asyncio.sleep(0.002)
    submit_end[0] = time.perf_counter()
    await asyncio.gather(*tasks)

    async with aiohttp.ClientSession() as session:
        while True:  # wait for the queue to drain
            async with session.get(f"{url}/prompt") as resp:
                if (await resp.json())["exec_info"]["queue_remaining"] == 0:
                    break
            await asyncio.sleep(0.05)
        drained = time.perf_counter()
        async with session.get(f"{url}/history") as resp:
            history = await resp.json()
    submit_s = submit_end[0] - start
    lost = [pid for pid in ids if pid not in history]
    failed = [pid for pid in ids if pid in history and history[pid]["status"]["status_str"] != "success"]
    unseen = sum(len({p for p, c in ids.items() if c == cid} - done) for cid, done in seen.items()) if use_ws else 0
    lat = sorted(latencies)
    p50 = statistics.median(lat) * 1000
    p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000
    print(f"prompts: {len(ids)} by {clients} clients{' (with WebSockets)' if use_ws else ''}")
    print(f"submissions/s: {len(ids) / submit_s:.0f}  ({submit_s:.2f} s for all POST /prompt)")
    print(f"POST /prompt latency: p50 {p50:.1f} ms, p99 {p99:.1f} ms")
    print(f"all executed after {drained - start:.2f} s ({len(ids) / (drained - start):.0f} prompts/s end to end)")
    print(f"lost: {len(lost)}, failed: {len(failed)}" + (f", executing-null not seen: {unseen}" if use_ws else ""))
    return 1 if lost or failed or unseen else 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=1000)
    p.add_argument("--clients", type=int, default=20)
    p.add_argument("--ws", action="store_true", help="each client also follows its events on a WebSocket")
    p.add_argument("--server", help="URL of a running server (with these nodes) instead of starting one")
    args = p.parse_args()
    if args.server:
        return asyncio.run(run(args.server.rstrip("/"), args.prompts, args.clients, args.ws))
    with tempfile.TemporaryDirectory() as base:
        port = _free_port()
        cmd = [sys.executable, str(ROOT / "server.py"), "--port", str(port), "--base-dir", base,
               "--no-builtin-nodes", "--extra-nodes", str(Path(__file__).resolve())]
        log = open(Path(base) / "server.log", "wb")  # noqa: SIM115 - a file, not a pipe that could fill
        server = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                  env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            url = f"http://127.0.0.1:{port}"
            _wait_ready(url, server, Path(base) / "server.log")
            return asyncio.run(run(url, args.prompts, args.clients, args.ws))
        finally:
            server.terminate()
            try:
                server.wait(10)
            except subprocess.TimeoutExpired:
                server.kill()
            log.close()


def _wait_ready(url: str, server: subprocess.Popen, log: Path) -> None:
    import urllib.request

    for _ in range(300):
        if server.poll() is not None:
            raise SystemExit(f"the server exited: {log.read_text()}")
        try:
            with urllib.request.urlopen(url + "/prompt", timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise SystemExit("the server did not start")


if __name__ == "__main__":
    sys.exit(main())
