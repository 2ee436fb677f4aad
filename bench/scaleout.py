"""Scale-out: prompts per minute with 1 and 2 Ray workers, the Ray path's overhead, recovery.

    python bench/scaleout.py [--prompts 16] [--sleep 0.5] [--demo 8] [--skip-demo]

Starts ``python server.py`` (loopback, a temporary base folder, the nodes defined below and
the built-in ones) once per configuration and measures, through its HTTP API:

1. **Throughput** on a sleep-like workload: ``--prompts`` prompts that each sleep ``--sleep``
   seconds in a node (no CPU used), submitted at once; prompts per minute with ``--backend ray
   --workers 1`` and ``--workers 2``. Target: 2 workers ≥ 1.9× one.
2. **Throughput on demo-model txt2img** (64×64, 20 euler steps, a new seed each): ``--demo``
   prompts with 1 and 2 workers (one torch thread each). On a 2-core machine two workers can
   at best double it.
3. **Overhead per prompt** of the Ray path over the local backend: a trivial prompt (three
   cheap nodes, a new value each time) submitted one after another, from ``POST /prompt``
   until its history entry is there; the mean difference between ``--backend ray --workers
   1`` and the default local backend. Target: ≤ 20 ms.
4. **Recovery**: a prompt running on one of two workers whose process is killed (SIGKILL,
   its pid from ``/api/workers``): the time from the kill until the prompt starts again on
   the other, warm worker, and until it is done. Target: restarted within 5 s.

Each worker gets one torch thread (``--worker-threads 1``). The figures depend on the
machine: run it on a quiet one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from nodeflow import Float, Int, Node, Output, Result, Socket

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "nodeflow" / "train" / "assets" / "nodeflow-demo.safetensors"


# -- the bench's nodes (registered by the server and its workers) ---------------------------------


class BenchSleep(Node):
    """Sleeps, checking for interruption every 10 ms."""
    inputs = {"value": Int(default=0, min=0, max=1 << 40), "seconds": Float(default=0.5, min=0.0, max=60.0)}
    outputs = [Output("INT")]

    def run(self, value, seconds):
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.context.check_interrupted()
            time.sleep(min(0.01, max(end - time.monotonic(), 0)))
        return (value,)


class BenchPlus(Node):
    inputs = {"a": Socket("INT"), "b": Int(default=1)}
    outputs = [Output("INT")]

    def run(self, a, b):
        return (a + b,)


class BenchOut(Node):
    inputs = {"value": Socket("INT")}
    outputs = []
    output_node = True

    def run(self, value):
        return Result(ui={"text": [str(value)]})


def sleeper(value: int, seconds: float) -> dict:
    return {"1": {"class_type": "BenchSleep", "inputs": {"value": value, "seconds": seconds}},
            "2": {"class_type": "BenchOut", "inputs": {"value": ["1", 0]}}}


def trivial(value: int) -> dict:
    return {"1": {"class_type": "BenchSleep", "inputs": {"value": value, "seconds": 0.0}},
            "2": {"class_type": "BenchPlus", "inputs": {"a": ["1", 0], "b": 1}},
            "3": {"class_type": "BenchOut", "inputs": {"value": ["2", 0]}}}


def txt2img(seed: int) -> dict:
    workflow = json.loads((ROOT / "workflows" / "txt2img.json").read_text())
    for node in workflow.values():
        inputs = node["inputs"]
        if "ckpt_name" in inputs:
            inputs["ckpt_name"] = DEMO.name
        if "seed" in inputs:
            inputs.update(seed=seed, cfg=5.0)
        if "batch_size" in inputs:
            inputs.update(width=64, height=64)
        if "text" in inputs and "watermark" not in inputs["text"]:
            inputs["text"] = "a red circle on a cyan background"
    return workflow


# -- a server process and a client ----------------------------------------------------------------


class Server:
    def __init__(self, base: Path, *args: str) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(base / f"server-{self.port}.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "server.py"), "--port", str(self.port), "--base-dir", str(base),
             "--extra-nodes", str(Path(__file__).resolve()), "--db", ":memory:", *args],
            cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT)

    async def start(self, session, workers: int) -> None:
        end = time.monotonic() + 180
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise SystemExit(f"the server exited; see {self.log.name}")
            try:
                async with session.get(self.url + "/api/workers") as resp:
                    body = await resp.json()
                if sum(w["state"] == "idle" for w in body["workers"]) >= workers:
                    return
            except OSError:
                pass
            await asyncio.sleep(0.1)
        raise SystemExit(f"the workers never came up; see {self.log.name}")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


async def submit(session, server: Server, prompt: dict) -> str:
    async with session.post(server.url + "/prompt", json={"prompt": prompt}) as resp:
        body = await resp.json()
        if resp.status != 200:
            raise SystemExit(f"POST /prompt: {resp.status} {body}")
        return body["prompt_id"]


async def done(session, server: Server, prompt_id: str, poll: float = 0.002) -> dict:
    while True:
        async with session.get(f"{server.url}/history/{prompt_id}") as resp:
            entry = (await resp.json()).get(prompt_id)
        if entry is not None:
            if entry["status"]["status_str"] != "success":
                raise SystemExit(f"prompt {prompt_id} failed: {entry['status']['messages'][-1]}")
            return entry
        await asyncio.sleep(poll)


async def throughput(session, server: Server, prompts: list[dict]) -> float:
    """Prompts per minute: all submitted at once, until the last one is done."""
    start = time.monotonic()
    ids = [await submit(session, server, p) for p in prompts]
    for pid in ids:
        await done(session, server, pid, poll=0.02)
    return len(prompts) / (time.monotonic() - start) * 60


async def latency(session, server: Server, count: int, offset: int) -> list[float]:
    times = []
    for i in range(count):
        start = time.perf_counter()
        await done(session, server, await submit(session, server, trivial(offset + i)))
        times.append(time.perf_counter() - start)
    return times


async def recovery(session, server: Server) -> tuple[float, float]:
    """(seconds from the kill until the prompt starts again elsewhere, until it is done)."""
    import aiohttp

    async with session.ws_connect(f"{server.url}/ws?clientId=bench") as ws:
        async with session.post(server.url + "/prompt", json={"prompt": sleeper(7, 3.0), "client_id": "bench"}) as r:
            pid = (await r.json())["prompt_id"]
        victim = None
        while victim is None:
            async with session.get(server.url + "/api/workers") as resp:
                victim = next((w for w in (await resp.json())["workers"] if w["prompt_id"] == pid), None)
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.5)
        os.kill(victim["pid"], signal.SIGKILL)
        killed = time.monotonic()
        restarted, starts = None, 0
        while True:
            msg = await ws.receive(timeout=60)
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            data = json.loads(msg.data)
            if data["type"] == "execution_start" and data["data"]["prompt_id"] == pid:
                starts += 1
                if starts == 2:  # the first run's start was sent before the kill
                    restarted = time.monotonic() - killed
            if data["type"] == "executing" and data["data"]["node"] is None and data["data"]["prompt_id"] == pid:
                break
    await done(session, server, pid)
    return restarted if restarted is not None else float("nan"), time.monotonic() - killed


async def main_async(args: argparse.Namespace) -> None:
    import aiohttp

    base = Path(tempfile.mkdtemp(prefix="nodeflow-scaleout-"))
    (base / "models" / "checkpoints").mkdir(parents=True)
    shutil.copyfile(DEMO, base / "models" / "checkpoints" / DEMO.name)
    ray = ["--backend", "ray", "--worker-threads", "1"]
    results: dict[str, float] = {}
    async with aiohttp.ClientSession() as session:
        # Overhead: the local backend first, then Ray with one worker.
        local = Server(base, "--no-builtin-nodes")
        try:
            await local.start(session, 1)
            await latency(session, local, 20, 0)  # warm up
            local_times = await latency(session, local, args.latency, 1000)
        finally:
            local.stop()
        for workers in (1, 2):
            server = Server(base, *ray, "--workers", str(workers), *(["--no-builtin-nodes"] if args.skip_demo else []))
            try:
                await server.start(session, workers)
                if workers == 1:
                    await latency(session, server, 20, 2000)
                    ray_times = await latency(session, server, args.latency, 3000)
                sleeps = [sleeper(10_000 * workers + i, args.sleep) for i in range(args.prompts)]
                results[f"sleep_{workers}"] = await throughput(session, server, sleeps)
                if not args.skip_demo:
                    await throughput(session, server, [txt2img(900 + i) for i in range(workers)])  # load the model
                    demo = [txt2img(100 * workers + i) for i in range(args.demo)]
                    results[f"demo_{workers}"] = await throughput(session, server, demo)
                if workers == 2:
                    results["restart"], results["recovered"] = await recovery(session, server)
            finally:
                server.stop()
    shutil.rmtree(base, ignore_errors=True)

    local_ms, ray_ms = statistics.mean(local_times) * 1e3, statistics.mean(ray_times) * 1e3
    print(f"machine: {os.cpu_count()} CPUs; workers: one torch thread each")
    print(f"sleep workload ({args.prompts} prompts × {args.sleep:g} s): 1 worker {results['sleep_1']:.1f}/min, "
          f"2 workers {results['sleep_2']:.1f}/min, speed-up {results['sleep_2'] / results['sleep_1']:.2f}× "
          "(target ≥ 1.9×)")
    if not args.skip_demo:
        print(f"demo txt2img ({args.demo} prompts, 64×64, 20 steps): 1 worker {results['demo_1']:.1f}/min, "
              f"2 workers {results['demo_2']:.1f}/min, speed-up {results['demo_2'] / results['demo_1']:.2f}×")
    print(f"per prompt, POST to history ({args.latency} trivial prompts in a row): local {local_ms:.1f} ms "
          f"(p50 {statistics.median(local_times) * 1e3:.1f}), ray {ray_ms:.1f} ms "
          f"(p50 {statistics.median(ray_times) * 1e3:.1f}); overhead {ray_ms - local_ms:.1f} ms (target ≤ 20 ms)")
    print(f"killed worker: its prompt started again on the other worker after {results['restart']:.2f} s "
          f"(target ≤ 5 s), done {results['recovered']:.2f} s after the kill (a 3 s prompt run again)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=16, help="prompts of the sleep workload")
    p.add_argument("--sleep", type=float, default=0.5, help="seconds each of them sleeps")
    p.add_argument("--demo", type=int, default=8, help="demo-model txt2img prompts")
    p.add_argument("--latency", type=int, default=100, help="trivial prompts for the overhead")
    p.add_argument("--skip-demo", action="store_true", help="no demo-model workload (no torch in the workers)")
    asyncio.run(main_async(p.parse_args()))


if __name__ == "__main__":
    main()
