"""Auth token, origin and host checks, CORS for allowed origins, the access log."""

import asyncio

import aiohttp
import pytest
from server_helpers import async_test, chain, serve, wait_history

TOKEN = "t0ken-with-enough-entropy"


@async_test
async def test_token_required_everywhere(tmp_path):
    async with serve(tmp_path, auth_token=TOKEN) as client:
        for method, path in (("GET", "/prompt"), ("GET", "/api/queue"), ("GET", "/history"), ("GET", "/object_info"),
                             ("GET", "/view?filename=x.png"), ("POST", "/prompt"), ("POST", "/interrupt"),
                             ("GET", "/system_stats"), ("GET", "/openapi.json"), ("GET", "/no/such/route")):
            resp = await client.request(method, path)
            assert resp.status == 401, path
            assert resp.headers["WWW-Authenticate"].startswith("Bearer")
            assert (await resp.json())["error"]["type"] == "unauthorized"
        wrong = {"Authorization": "Bearer nope"}
        assert (await client.get("/prompt", headers=wrong)).status == 401
        good = {"Authorization": f"Bearer {TOKEN}"}
        assert (await client.get("/prompt", headers=good)).status == 200
        resp = await client.post("/prompt", json={"prompt": chain()}, headers=good)
        pid = (await resp.json())["prompt_id"]
        # WebSocket: refused without the token; ?token= works (browsers cannot set headers there).
        with pytest.raises(aiohttp.WSServerHandshakeError) as info:
            await client.ws_connect("/ws?clientId=x")
        assert info.value.status == 401
        ws = await client.ws_connect(f"/ws?clientId=x&token={TOKEN}")
        assert (await ws.receive_json())["type"] == "status"
        await ws.close()
        ws = await client.ws_connect("/ws?clientId=y", headers=good)
        assert (await ws.receive_json())["type"] == "status"
        await ws.close()
        resp = await client.get(f"/history/{pid}", headers=good)
        assert resp.status == 200


@async_test
async def test_query_token_sets_a_strict_cookie(tmp_path):
    async with serve(tmp_path, auth_token=TOKEN) as client:
        resp = await client.get(f"/prompt?token={TOKEN}")
        assert resp.status == 200
        cookie = resp.headers["Set-Cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
        # The cookie alone now authenticates (the test client keeps it).
        assert (await client.get("/queue")).status == 200


@async_test
async def test_cross_origin_posts_and_websockets_refused(tmp_path):
    async with serve(tmp_path) as client:
        host = f"127.0.0.1:{client.port}"
        evil = {"Origin": "http://evil.example"}
        resp = await client.post("/prompt", json={"prompt": chain()}, headers=evil)
        assert resp.status == 403 and (await resp.json())["error"]["type"] == "forbidden_origin"
        for path in ("/queue", "/interrupt", "/history", "/upload/image", "/settings"):
            assert (await client.post(path, json={"clear": True}, headers=evil)).status == 403, path
        assert (await client.post("/prompt", json={"prompt": chain()}, headers={"Origin": "null"})).status == 403
        # Same host, other port: another origin.
        other_port = {"Origin": f"http://127.0.0.1:{client.port + 1}"}
        assert (await client.post("/prompt", json={"prompt": chain()}, headers=other_port)).status == 403
        with pytest.raises(aiohttp.WSServerHandshakeError) as info:
            await client.ws_connect("/ws", headers=evil)
        assert info.value.status == 403
        # Reading is not refused (a browser cannot read the answer cross-origin anyway).
        assert (await client.get("/queue", headers=evil)).status == 200
        # The server's own pages, and clients that send no Origin, are fine.
        resp = await client.post("/prompt", json={"prompt": chain()}, headers={"Origin": f"http://{host}"})
        assert resp.status == 200
        await wait_history(client, (await resp.json())["prompt_id"])
        ws = await client.ws_connect("/ws", headers={"Origin": f"http://{host}"})
        await ws.close()
        assert "Access-Control-Allow-Origin" not in resp.headers


@async_test
async def test_allowed_origin_gets_cors(tmp_path):
    origin = "http://localhost:5173"
    async with serve(tmp_path, allow_origins=[origin]) as client:
        resp = await client.options("/prompt", headers={"Origin": origin, "Access-Control-Request-Method": "POST",
                                                        "Access-Control-Request-Headers": "content-type"})
        assert resp.status == 204
        assert resp.headers["Access-Control-Allow-Origin"] == origin
        assert "Authorization" in resp.headers["Access-Control-Allow-Headers"]
        resp = await client.post("/prompt", json={"prompt": chain()}, headers={"Origin": origin})
        assert resp.status == 200 and resp.headers["Access-Control-Allow-Origin"] == origin
        await wait_history(client, (await resp.json())["prompt_id"])
        ws = await client.ws_connect("/ws", headers={"Origin": origin})
        await ws.close()
        assert (await client.post("/prompt", json={"prompt": chain()},
                                  headers={"Origin": "http://localhost:5174"})).status == 403


@async_test
async def test_preflight_passes_auth_but_the_request_does_not(tmp_path):
    origin = "https://app.example"
    async with serve(tmp_path, allow_origins=["*"], auth_token=TOKEN) as client:
        resp = await client.options("/prompt", headers={"Origin": origin, "Access-Control-Request-Method": "POST"})
        assert resp.status == 204
        assert (await client.post("/prompt", json={"prompt": chain()}, headers={"Origin": origin})).status == 401


@async_test
async def test_dns_rebinding_refused_on_loopback(tmp_path):
    async with serve(tmp_path, allow_hosts=["studio.local"]) as client:
        resp = await client.get("/prompt", headers={"Host": f"attacker.example:{client.port}"})
        assert resp.status == 403 and (await resp.json())["error"]["type"] == "forbidden_host"
        # Same-origin from the rebound name would pass the origin check: the host check stops it.
        resp = await client.post("/prompt", json={"prompt": chain()},
                                 headers={"Host": "attacker.example", "Origin": "http://attacker.example"})
        assert resp.status == 403
        for host in (f"localhost:{client.port}", f"127.0.0.1:{client.port}", "[::1]", "studio.local:8188"):
            assert (await client.get("/prompt", headers={"Host": host})).status == 200, host


@async_test
async def test_no_host_check_when_listening_beyond_loopback(tmp_path):
    async with serve(tmp_path, hosts=["0.0.0.0"]) as client:
        assert (await client.get("/prompt", headers={"Host": "gpu-box.lan:8188"})).status == 200


@async_test
async def test_origin_scheme_must_match(tmp_path):
    async with serve(tmp_path) as client:
        for origin in (f"https://127.0.0.1:{client.port}", f"https://localhost:{client.port}",
                       f"ws://127.0.0.1:{client.port}", "https://127.0.0.1"):
            resp = await client.post("/prompt", json={"prompt": chain()}, headers={"Origin": origin})
            assert resp.status == 403, origin
            with pytest.raises(aiohttp.WSServerHandshakeError):
                await client.ws_connect("/ws", headers={"Origin": origin})
        resp = await client.post("/prompt", json={"prompt": chain()},
                                 headers={"Origin": f"http://127.0.0.1:{client.port}"})
        assert resp.status == 200
        await wait_history(client, (await resp.json())["prompt_id"])


def test_same_origin_compares_scheme_host_and_port():
    from nodeflow.server.security import same_origin

    assert same_origin("http://example.com", "example.com", "http")
    assert same_origin("http://example.com:80", "example.com", "http")
    assert same_origin("https://example.com", "example.com:443", "https")
    assert not same_origin("https://example.com:8188", "example.com:8188", "http")
    assert not same_origin("http://example.com:8188", "example.com:8188", "https")
    assert not same_origin("http://example.com", "example.com:8188", "http")


@async_test
async def test_access_log_redacts_the_token(tmp_path):
    import logging

    from aiohttp.test_utils import TestClient, TestServer
    from server_helpers import make_registry

    from nodeflow.server import ServerConfig, create_app
    from nodeflow.server.security import AccessLogger

    lines = []

    class Keep(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    logger = logging.getLogger("nodeflow.test-access")
    logger.setLevel(logging.INFO)
    logger.addHandler(Keep())
    app = create_app(ServerConfig(base_dir=str(tmp_path), auth_token=TOKEN), make_registry())
    server = TestServer(app, host="127.0.0.1")
    await server.start_server(access_log_class=AccessLogger, access_log=logger)  # as main() runs it
    client = TestClient(server)
    await client.start_server()
    try:
        resp = await client.get(f"/prompt?token={TOKEN}&x=1", headers={"Referer": f"http://h/?token={TOKEN}"})
        assert resp.status == 200
        cookie = resp.headers["Set-Cookie"]
        assert "Path=/" in cookie and "HttpOnly" in cookie and "SameSite=Strict" in cookie
        await client.get(f"/queue?tok%65n={TOKEN}")
        for _ in range(100):
            if len(lines) >= 2:
                break
            await asyncio.sleep(0.01)
    finally:
        await client.close()
    assert len(lines) == 2 and all(TOKEN not in line for line in lines), lines
    assert "/prompt?token=[redacted]&x=1" in lines[0] and "http://h/?token=[redacted]" in lines[0]
    assert '" 200 ' in lines[0]


def test_redact_token():
    from nodeflow.server.security import redact_token

    assert redact_token("/a?token=abc&tokens=1#frag") == "/a?token=[redacted]&tokens=1#frag"
    assert redact_token("/a") == "/a" and redact_token("/a?x=1") == "/a?x=1"


@async_test
async def test_undecodable_bearer_token_is_refused_not_a_failure(tmp_path):
    async with serve(tmp_path, auth_token=TOKEN) as client:
        def send(header: bytes) -> bytes:
            import socket

            with socket.create_connection(("127.0.0.1", client.port)) as s:
                s.sendall(b"GET /prompt HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: " + header +
                          b"\r\nConnection: close\r\n\r\n")
                out = b""
                while chunk := s.recv(65536):
                    out += chunk
            return out

        for header in (b"Bearer \xff\xfe\x80", b"Bearer " + TOKEN.encode() + b"\xc3", b"\xff\xfe"):
            answer = await asyncio.to_thread(send, header)
            assert answer.startswith(b"HTTP/1.1 401"), answer[:200]
        ok = await asyncio.to_thread(send, b"Bearer " + TOKEN.encode())
        assert ok.startswith(b"HTTP/1.1 200")
