"""The Ray backend, end to end: a real server process (``--backend ray``) with a local Ray
runtime on 127.0.0.1 and two CPU workers, one torch thread each.

One server serves the whole module (starting Ray and its workers takes seconds); each test
leaves both workers idle. What needs no Ray runtime (bad options, startup errors) is tested
at the end with a stand-in for the ``ray`` module.
"""

import asyncio
import hashlib
import json
import os
import shutil
import signal
import sys
import time
import types

import aiohttp
import pytest

pytest.importorskip("ray")

from server_helpers import NODES_FILE, REPO, ServerProcess, async_test, serve

DEMO = REPO / "nodeflow" / "train" / "assets" / "nodeflow-demo.safetensors"


def txt2img(seed=7, prefix="demo"):
    workflow = json.loads((REPO / "workflows" / "txt2img.json").read_text())
    workflow = workflow.get("prompt", workflow)
    for node in workflow.values():
        inputs = node["inputs"]
        if "ckpt_name" in inputs:
            inputs["ckpt_name"] = DEMO.name
        if "seed" in inputs:
            inputs["seed"] = seed
        if "steps" in inputs:
            inputs["steps"] = 4
        if "batch_size" in inputs:
            inputs.update(batch_size=1, width=64, height=64)
        if "filename_prefix" in inputs:
            inputs["filename_prefix"] = prefix
    return workflow


@pytest.fixture(scope="module")
def ray_server(tmp_path_factory):
    """``server.py --backend ray --workers 2 --worker-threads 1``, built-in and test nodes."""
    base = tmp_path_factory.mktemp("ray-server")
    worker_home = tmp_path_factory.mktemp("worker-home")  # the workers' models ($NODEFLOW_HOME)
    for home in (base, worker_home):
        (home / "models" / "checkpoints").mkdir(parents=True)
        shutil.copyfile(DEMO, home / "models" / "checkpoints" / DEMO.name)
    (base / "models" / "checkpoints" / "only-on-server.safetensors").write_bytes(DEMO.read_bytes())
    env_home = os.environ.get("NODEFLOW_HOME")
    os.environ["NODEFLOW_HOME"] = str(worker_home)  # the server's --base-dir wins for the server itself
    try:
        server = ServerProcess(base, "--backend", "ray", "--workers", "2", "--worker-threads", "1", builtin=True)
    finally:
        if env_home is None:
            del os.environ["NODEFLOW_HOME"]
        else:
            os.environ["NODEFLOW_HOME"] = env_home
    try:
        asyncio.run(server.ready(60))
        asyncio.run(idle_workers(server, timeout=120))
        yield server
    finally:
        server.stop()


async def get(server, path):
    async with aiohttp.ClientSession() as session, session.get(server.url + path) as resp:
        return resp.status, await resp.json()


async def post(server, path, body):
    async with aiohttp.ClientSession() as session, session.post(server.url + path, json=body) as resp:
        return resp.status, (await resp.json() if await resp.read() else None)


async def idle_workers(server, count=2, timeout=60.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        status, body = await get(server, "/api/workers")
        idle = [w for w in body["workers"] if w["state"] == "idle"]
        if status == 200 and len(idle) >= count:
            return idle
        await asyncio.sleep(0.1)
    raise AssertionError(f"workers never idle: {body}\n{server.output()[-3000:]}")


async def history(server, prompt_id, timeout=60.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        _, body = await get(server, f"/history/{prompt_id}")
        if prompt_id in body:
            return body[prompt_id]
        await asyncio.sleep(0.05)
    raise AssertionError(f"prompt {prompt_id} never finished\n{server.output()[-3000:]}")


async def submit(server, prompt, **body):
    status, answer = await post(server, "/prompt", {"prompt": prompt, **body})
    assert status == 200, answer
    return answer["prompt_id"]


def held(value, steps, seconds):
    return {"1": {"class_type": "Const", "inputs": {"value": value}},
            "2": {"class_type": "Hold", "inputs": {"x": ["1", 0], "steps": steps, "seconds": seconds}},
            "3": {"class_type": "Show", "inputs": {"value": ["2", 0]}}}


def run_times(entry):
    stamps = {e: d["timestamp"] for e, d in entry["status"]["messages"]}
    return stamps["execution_start"], stamps.get("execution_success", stamps.get("execution_error"))


# -- the workers -----------------------------------------------------------------------------------


@async_test
async def test_workers_are_listed_with_their_processes(ray_server):
    status, body = await get(ray_server, "/api/workers")
    workers = body["workers"]
    assert status == 200 and [w["id"] for w in workers] == ["ray-1", "ray-2"]
    assert all(w["pid"] and w["pid"] != ray_server.proc.pid and w["device"] == "cpu" for w in workers)
    _, stats = await get(ray_server, "/system_stats")
    names = [d["name"] for d in stats["devices"]]
    assert len(names) == 2 and all("(worker ray-" in n for n in names)


def listening(root_pid):
    """The addresses the process ``root_pid`` and its descendants listen on (TCP, from /proc)."""
    import ipaddress
    from pathlib import Path

    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents[int(stat.parent.name)] = int(fields[1])
        except (OSError, IndexError, ValueError):
            pass
    family = {root_pid}
    while True:
        more = {pid for pid, ppid in parents.items() if ppid in family} - family
        if not more:
            break
        family |= more
    inodes = set()
    for pid in family:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            pass
    found = []
    for table, size in (("/proc/net/tcp", 4), ("/proc/net/tcp6", 16)):
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] == "0A" and cols[9] in inodes:  # LISTEN
                raw = bytes.fromhex(cols[1].split(":")[0])
                words = [raw[i:i + 4][::-1] for i in range(0, size, 4)]
                found.append(ipaddress.ip_address(b"".join(words)))
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_the_ray_runtime_listens_on_loopback_only(ray_server):
    addresses = listening(ray_server.proc.pid)
    assert len(addresses) >= 3  # the server, Ray's own servers, the workers
    assert all((getattr(a, "ipv4_mapped", None) or a).is_loopback for a in addresses), addresses


@async_test
async def test_two_prompts_run_at_the_same_time(ray_server):
    a = await submit(ray_server, held(1, 4, 0.25))
    b = await submit(ray_server, held(2, 4, 0.25))
    (a_start, a_end), (b_start, b_end) = [run_times(await history(ray_server, p)) for p in (a, b)]
    assert a_start < b_end and b_start < a_end, "the two prompts did not overlap"
    await idle_workers(ray_server)


@async_test
async def test_affinity_routing_keeps_each_model_on_one_worker(ray_server):
    ran = []
    for name, seed in (("x.safetensors", 1), ("x.safetensors", 2), ("y.safetensors", 3), ("y.safetensors", 4)):
        prompt = {"1": {"class_type": "FakeLoad", "inputs": {"ckpt_name": name}},
                  "2": {"class_type": "UseModel", "inputs": {"model": ["1", 0], "seed": seed}}}
        entry = await history(ray_server, await submit(ray_server, prompt))
        cached = next(d["nodes"] for e, d in entry["status"]["messages"] if e == "execution_cached")
        ran.append((entry["outputs"]["2"]["text"][2], "1" in cached))
    (x1, x_cached_1), (x2, x_cached_2), (y1, y_cached_1), (y2, y_cached_2) = ran
    assert x1 == x2 and y1 == y2 and x1 != y1  # each model stayed on its worker
    assert (x_cached_1, x_cached_2, y_cached_1, y_cached_2) == (False, True, False, True)  # loaded once each
    _, body = await get(ray_server, "/api/workers")
    held_models = {w["id"]: w["models"] for w in body["workers"]}
    assert "checkpoints/x.safetensors" in held_models[x1] and "checkpoints/y.safetensors" in held_models[y1]


@async_test
async def test_interrupt_reaches_the_busy_worker(ray_server):
    pid = await submit(ray_server, held(3, 200, 0.05))  # 10 s if nothing stops it
    end = time.monotonic() + 30
    while time.monotonic() < end:
        _, body = await get(ray_server, "/api/workers")
        if any(w["prompt_id"] == pid for w in body["workers"]):
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.3)
    asked = time.monotonic()
    status, answer = await post(ray_server, "/interrupt", {"prompt_id": pid})
    assert status == 200 and answer is None  # ComfyUI's empty answer
    entry = await history(ray_server, pid, timeout=10)
    assert time.monotonic() - asked < 3
    assert entry["status"]["messages"][-1][0] == "execution_interrupted"
    await idle_workers(ray_server)


@async_test
async def test_files_travel_both_ways(ray_server):
    data = os.urandom(3000)
    form = aiohttp.FormData()
    form.add_field("image", data, filename="blob.png", content_type="image/png")
    async with aiohttp.ClientSession() as session, session.post(ray_server.url + "/upload/image", data=form) as resp:
        assert resp.status == 200
    save = {"1": {"class_type": "Const", "inputs": {"value": 41}},
            "2": {"class_type": "SaveValue", "inputs": {"value": ["1", 0], "filename_prefix": "ray"}},
            "3": {"class_type": "ReadFile", "inputs": {"name": "blob.png"}}}
    first = await history(ray_server, await submit(ray_server, save))
    assert first["outputs"]["3"]["text"] == [str(len(data)), hashlib.sha256(data).hexdigest()]
    image = first["outputs"]["2"]["images"][0]
    assert (ray_server.base / "output" / image["filename"]).is_file()  # landed in the server's output/
    again = {**save, "1": {"class_type": "Const", "inputs": {"value": 42}},
             "3": {"class_type": "ReadFile", "inputs": {"name": f"{image['filename']} [output]"}}}
    second = await history(ray_server, await submit(ray_server, again))
    saved = (ray_server.base / "output" / image["filename"]).read_bytes()
    assert second["outputs"]["3"]["text"] == [str(len(saved)), hashlib.sha256(saved).hexdigest()]
    names = {image["filename"], second["outputs"]["2"]["images"][0]["filename"]}
    assert len(names) == 2 and all((ray_server.base / "output" / n).stat().st_size > 0 for n in names)


@async_test
async def test_a_worker_that_lacks_a_model_fails_the_prompt_naming_itself_and_the_file(ray_server):
    prompt = txt2img()
    prompt["4"]["inputs"]["ckpt_name"] = "only-on-server.safetensors"
    entry = await history(ray_server, await submit(ray_server, prompt))
    error = entry["status"]["messages"][-1][1]
    assert entry["status"]["status_str"] == "error"
    assert "only-on-server.safetensors" in error["exception_message"]
    assert "worker ray-" in error["exception_message"]


@async_test
async def test_events_of_a_remote_prompt_equal_a_local_ones(ray_server, tmp_path):
    prompt = {**held(5, 3, 0.0), "4": {"class_type": "SaveValue", "inputs": {"value": ["2", 0],
                                                                             "filename_prefix": "same"}}}

    async def messages(url, prompt_id):
        async with aiohttp.ClientSession() as session, session.ws_connect(f"{url}/ws?clientId=cmp") as ws:
            await ws.receive_json()  # status
            async with session.post(url + "/prompt", json={"prompt": prompt, "client_id": "cmp",
                                                            "prompt_id": prompt_id}) as resp:
                assert resp.status == 200, await resp.text()
            got = []
            while True:
                msg = await ws.receive_json(timeout=30)
                if msg["type"] == "status":
                    continue
                got.append(msg)
                if msg["type"] == "executing" and msg["data"]["node"] is None:
                    return got

    def plain(msgs):
        return [(m["type"], {k: v for k, v in m["data"].items() if k != "timestamp"}) for m in msgs]

    remote = await messages(ray_server.url, "same-events")
    async with serve(tmp_path) as client:
        local = await messages(str(client.make_url("")).rstrip("/"), "same-events")
    assert plain(remote) == plain(local)
    assert [t for t, _ in plain(remote)].count("progress") == 3
    # progress_state is made where every worker's events pass: a remote prompt has them too.
    states = [d["nodes"] for t, d in plain(remote) if t == "progress_state"]
    assert len(states) >= 6 and states[-1]["2"]["state"] == "finished"
    assert any(s.get("2", {}).get("state") == "running" and s["2"]["value"] == 2.0 for s in states)


@async_test
async def test_same_seed_same_png_through_local_and_ray(ray_server, tmp_path):
    entry = await history(ray_server, await submit(ray_server, txt2img(seed=11, prefix="seeded")), timeout=120)
    assert entry["status"]["status_str"] == "success", entry["status"]
    remote = (ray_server.base / "output" / entry["outputs"]["9"]["images"][0]["filename"]).read_bytes()

    from nodeflow.registry import build_registry

    (tmp_path / "models" / "checkpoints").mkdir(parents=True)
    shutil.copyfile(DEMO, tmp_path / "models" / "checkpoints" / DEMO.name)
    async with serve(tmp_path, registry=build_registry()) as client:
        resp = await client.post("/prompt", json={"prompt": txt2img(seed=11, prefix="seeded")})
        pid = (await resp.json())["prompt_id"]
        for _ in range(1200):
            local_entry = (await (await client.get(f"/history/{pid}")).json()).get(pid)
            if local_entry:
                break
            await asyncio.sleep(0.05)
    local = (tmp_path / "output" / local_entry["outputs"]["9"]["images"][0]["filename"]).read_bytes()
    assert remote[:8] == b"\x89PNG\r\n\x1a\n" and remote == local


@async_test
async def test_a_killed_workers_prompt_completes_on_the_other_worker(ray_server):
    """Last in this module: it leaves a new worker in place of the one it kills."""
    prompt = {**held(9, 8, 0.25), "4": {"class_type": "WhereAmI", "inputs": {"x": ["2", 0]}}}
    pid = await submit(ray_server, prompt)
    end = time.monotonic() + 30
    victim = None
    while victim is None and time.monotonic() < end:
        _, body = await get(ray_server, "/api/workers")
        victim = next((w for w in body["workers"] if w["prompt_id"] == pid), None)
        await asyncio.sleep(0.05)
    assert victim is not None
    await asyncio.sleep(0.5)
    os.kill(victim["pid"], signal.SIGKILL)
    killed = time.monotonic()
    entry = await history(ray_server, pid, timeout=30)
    assert entry["status"]["status_str"] == "success" and entry["outputs"]["3"] == {"text": ["9"]}
    assert entry["outputs"]["4"]["text"][2] not in (victim["id"], "")  # it ran on another worker
    assert time.monotonic() - killed < 15
    _, body = await get(ray_server, "/api/workers")
    ids = [w["id"] for w in body["workers"]]
    assert victim["id"] not in ids or next(w for w in body["workers"] if w["id"] == victim["id"])["state"] == "dead"
    await idle_workers(ray_server, timeout=120)  # its replacement came up
    assert "ray-3" in [w["id"] for w in (await get(ray_server, "/api/workers"))[1]["workers"]]


# -- bad options and startup errors, without a Ray runtime -------------------------------------------


def run_server(*args, env=None, timeout=60):
    import subprocess

    code = ("import sys\n"
            "if '--no-ray' in sys.argv:\n"
            "    sys.modules['ray'] = None; sys.argv.remove('--no-ray')\n"
            "from nodeflow.server.serve_cli import main; sys.exit(main(sys.argv[1:]))")
    return subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def test_without_ray_the_server_says_how_to_get_it(tmp_path):
    proc = run_server("--no-ray", "--backend", "ray", "--base-dir", str(tmp_path), "--port", "0",
                      "--no-builtin-nodes", "--extra-nodes", NODES_FILE)
    assert proc.returncode == 1 and 'pip install "nodeflow[ray]"' in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_an_unreachable_cluster_is_named(tmp_path):
    proc = run_server("--backend", "ray", "--ray-address", "127.0.0.1:9", "--base-dir", str(tmp_path),
                      "--port", "0", "--no-builtin-nodes", "--extra-nodes", NODES_FILE)
    assert proc.returncode == 1 and "cannot reach the Ray cluster at 127.0.0.1:9" in proc.stderr, proc.stderr
    proc = run_server("--backend", "ray", "--ray-address", "nonsense", "--base-dir", str(tmp_path), "--port", "0")
    assert proc.returncode == 1 and "expected HOST:PORT" in proc.stderr
    proc = run_server("--ray-address", "127.0.0.1:9", "--base-dir", str(tmp_path), "--port", "0")
    assert proc.returncode == 2 and "need --backend ray" in proc.stderr


class FakeRay(types.SimpleNamespace):
    """Just enough of the ``ray`` module for the checks RayBackend.start makes first."""

    def __init__(self, gpus):
        super().__init__(exceptions=types.SimpleNamespace(RayActorError=RuntimeError))
        self.gpus, self.shut = gpus, False

    def is_initialized(self):
        return True

    def cluster_resources(self):
        return {"CPU": 16.0, "GPU": float(self.gpus)}

    def shutdown(self):
        self.shut = True


def test_more_workers_than_gpus_is_refused(tmp_path, monkeypatch):
    from nodeflow.folders import Folders
    from nodeflow.queue import BackendError, ray_backend
    from nodeflow.queue.remote import WorkerSpec

    monkeypatch.setattr(ray_backend, "import_ray", lambda: FakeRay(gpus=2))
    backend = ray_backend.RayBackend(WorkerSpec(""), Folders.from_base(tmp_path), ray_backend.RayOptions(workers=4))
    with pytest.raises(BackendError, match="--workers 4: the Ray cluster has 2 GPU"):
        backend.start(lambda: None)
    assert backend.workers() == []


def test_cli_checks_worker_options():
    from nodeflow.server.serve_cli import config_from_args, parser

    for bad in (["--workers", "0"], ["--workers", "x"], ["--backend", "dask"], ["--max-tries", "-1"]):
        with pytest.raises(SystemExit):
            parser().parse_args(bad)
    config = config_from_args(parser().parse_args(["--backend", "ray", "--workers", "3", "--ray-address", "auto",
                                                   "--worker-threads", "2", "--max-tries", "5"]))
    assert (config.backend, config.workers, config.ray_address, config.worker_threads, config.max_tries) == \
        ("ray", 3, "auto", 2, 5)


@async_test
async def test_no_ray_imported_without_the_option(tmp_path):
    async with serve(tmp_path) as client:
        assert (await client.get("/api/workers")).status == 200
    code = ("import sys; from nodeflow.server import create_app, ServerConfig; "
            f"create_app(ServerConfig(base_dir={str(tmp_path)!r})); print('ray' in sys.modules)")
    import subprocess

    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# -- the server killed: nothing lost, no worker left behind -------------------------------------------


def alive(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            return "\nState:\tZ" not in f.read()
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@async_test
async def test_sigkill_of_the_server_loses_nothing_and_leaves_no_worker(tmp_path):
    args = ("--backend", "ray", "--workers", "1", "--worker-threads", "1")
    server = ServerProcess(tmp_path, *args)
    try:
        await server.ready(60)
        (worker,) = await idle_workers(server, count=1, timeout=120)
        done = await submit(server, held(1, 1, 0.0))
        await history(server, done)
        victim = await submit(server, held(2, 100, 0.5))
        waiting = [await submit(server, held(v, 1, 0.0)) for v in (3, 4, 5)]
        end = time.monotonic() + 30
        while time.monotonic() < end and (await get(server, "/api/workers"))[1]["workers"][0]["prompt_id"] != victim:
            await asyncio.sleep(0.05)
        server.kill()  # SIGKILL: no cleanup at all
        end = time.monotonic() + 15
        while alive(worker["pid"]) and time.monotonic() < end:
            await asyncio.sleep(0.1)
        assert not alive(worker["pid"]), "the worker outlived its server"

        server = ServerProcess(tmp_path, *args, port=server.port)
        await server.ready(60)
        for pid in waiting:
            assert (await history(server, pid, timeout=120))["status"]["status_str"] == "success"
        _, entries = await get(server, "/history")
        assert set(entries) == {done, victim, *waiting}  # nothing lost
        assert entries[victim]["status"]["status_str"] == "error"  # it was running: marked, as documented
    finally:
        server.stop()
