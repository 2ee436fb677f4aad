"""A real server process killed with SIGKILL mid-queue and restarted: nothing is lost."""

import asyncio

import aiohttp
from server_helpers import ServerProcess, async_test


def save(value):
    return {"1": {"class_type": "Const", "inputs": {"value": value}},
            "2": {"class_type": "SaveValue", "inputs": {"value": ["1", 0], "filename_prefix": "kept"}}}


def slow(value, seconds):
    return {"1": {"class_type": "Const", "inputs": {"value": value}},
            "2": {"class_type": "Hold", "inputs": {"x": ["1", 0], "steps": 2, "seconds": seconds}},
            "3": {"class_type": "SaveValue", "inputs": {"value": ["2", 0], "filename_prefix": "slow"}}}


async def post(session, url, prompt):
    async with session.post(url + "/prompt", json={"prompt": prompt, "client_id": "restart-test"}) as resp:
        assert resp.status == 200, await resp.text()
        return (await resp.json())["prompt_id"]


async def history(session, url, pid=None):
    async with session.get(url + (f"/history/{pid}" if pid else "/history")) as resp:
        return await resp.json()


async def wait_for(check, timeout=20.0):
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while loop.time() < end:
        result = await check()
        if result:
            return result
        await asyncio.sleep(0.05)
    raise AssertionError("timed out")


async def running_is(session, url, pid):
    async with session.get(url + "/queue") as resp:
        queue = await resp.json()
    return [e[1] for e in queue["queue_running"]] == [pid]


@async_test
async def test_sigkill_mid_queue_then_restart(tmp_path):
    server = await ServerProcess(tmp_path).ready()
    try:
        async with aiohttp.ClientSession() as s:
            url = server.url
            done = await post(s, url, save(1))
            await wait_for(lambda: _in_history(s, url, done))
            before = await history(s, url)
            image = before[done]["outputs"]["2"]["images"][0]
            first_file = (tmp_path / "output" / image["filename"]).read_bytes()

            victim = await post(s, url, slow(2, seconds=60))
            await wait_for(lambda: running_is(s, url, victim))
            waiting = [await post(s, url, save(v)) for v in (3, 4)]
            server.kill()  # SIGKILL: no cleanup at all

            server = await ServerProcess(tmp_path, port=server.port).ready()
            for pid in waiting:
                entry = await wait_for(lambda pid=pid: _in_history(s, url, pid))
                assert entry["status"]["status_str"] == "success", entry
            hist = await history(s, url)
            # The finished prompt is intact, and came first.
            assert next(iter(hist)) == done and hist[done] == before[done]
            # The killed one is marked failed, and says why.
            assert hist[victim]["status"]["status_str"] == "error"
            assert "stopped" in hist[victim]["status"]["messages"][-1][1]["exception_message"]
            # Files: the old image is served and untouched; new runs wrote new files.
            async with s.get(url + "/view", params=image) as resp:
                assert resp.status == 200 and await resp.read() == first_file
            names = {hist[p]["outputs"]["2"]["images"][0]["filename"] for p in [done, *waiting]}
            assert len(names) == 3
            # The same prompt again after the restart (the cache is empty): a new file, never an overwrite.
            again = await post(s, url, save(1))
            entry = await wait_for(lambda: _in_history(s, url, again))
            assert entry["outputs"]["2"]["images"][0]["filename"] not in names
            assert (tmp_path / "output" / image["filename"]).read_bytes() == first_file

            # With --requeue-interrupted, the killed prompt runs again after the restart.
            victim = await post(s, url, slow(5, seconds=0.5))
            await wait_for(lambda: running_is(s, url, victim))
            server.kill()
            server = await ServerProcess(tmp_path, "--requeue-interrupted", port=server.port).ready()
            entry = await wait_for(lambda: _in_history(s, url, victim))
            assert entry["status"]["status_str"] == "success"
            assert len(await history(s, url)) == 6
        assert server.stop() == 0  # SIGTERM: an orderly stop
    finally:
        server.kill()


async def _in_history(session, url, pid):
    return (await history(session, url, pid)).get(pid)
