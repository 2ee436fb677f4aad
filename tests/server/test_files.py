"""/view and uploads: formats, numbering, masks, confinement, size limits."""

import io
import json
import os
import tempfile

import aiohttp
from PIL import Image
from server_helpers import async_test, serve


def png(color=(255, 0, 0, 255), size=(8, 8), mode="RGBA", text=None):
    buf = io.BytesIO()
    img = Image.new(mode, size, color)
    if text:
        from PIL.PngImagePlugin import PngInfo
        info = PngInfo()
        for k, v in text.items():
            info.add_text(k, v)
        img.save(buf, format="PNG", pnginfo=info)
    else:
        img.save(buf, format="PNG")
    return buf.getvalue()


def form(data, name="photo.png", **fields):
    f = aiohttp.FormData()
    f.add_field("image", data, filename=name, content_type="image/png")
    for k, v in fields.items():
        f.add_field(k, v)
    return f


async def upload(client, data, name="photo.png", path="/upload/image", expect=200, **fields):
    resp = await client.post(path, data=form(data, name, **fields))
    body = await resp.json()
    assert resp.status == expect, body
    return body


@async_test
async def test_upload_then_view(tmp_path):
    async with serve(tmp_path) as client:
        data = png()
        assert await upload(client, data) == {"name": "photo.png", "subfolder": "", "type": "input"}
        assert (tmp_path / "input" / "photo.png").read_bytes() == data
        resp = await client.get("/view", params={"filename": "photo.png", "type": "input"})
        assert resp.status == 200 and resp.content_type == "image/png" and await resp.read() == data
        assert 'filename="photo.png"' in resp.headers["Content-Disposition"]
        assert resp.headers["X-Content-Type-Options"] == "nosniff"
        # Annotated names, as ComfyUI's LoadImage widgets write them.
        resp = await client.get("/api/view", params={"filename": "photo.png [input]"})
        assert resp.status == 200 and await resp.read() == data


@async_test
async def test_upload_numbering_overwrite_dedupe_subfolder(tmp_path):
    async with serve(tmp_path) as client:
        await upload(client, png((1, 2, 3, 255)))
        # Same name, different bytes: numbered like ComfyUI.
        assert (await upload(client, png((4, 5, 6, 255))))["name"] == "photo (1).png"
        assert (await upload(client, png((7, 8, 9, 255))))["name"] == "photo (2).png"
        # Same bytes as an existing file: that file is reused.
        assert (await upload(client, png((4, 5, 6, 255))))["name"] == "photo (1).png"
        # overwrite replaces.
        new = png((10, 11, 12, 255))
        assert (await upload(client, new, overwrite="true"))["name"] == "photo.png"
        assert (tmp_path / "input" / "photo.png").read_bytes() == new
        # Subfolder and type.
        got = await upload(client, png(), subfolder="pasted", type="temp")
        assert got == {"name": "photo.png", "subfolder": "pasted", "type": "temp"}
        assert (tmp_path / "temp" / "pasted" / "photo.png").is_file()
        # A path in the file name keeps its last part only.
        body = (b"--XyZ\r\nContent-Disposition: form-data; name=\"image\"; filename=\"../../evil.png\"\r\n"
                b"Content-Type: image/png\r\n\r\n" + png((1, 1, 1, 255)) + b"\r\n--XyZ--\r\n")
        resp = await client.post("/upload/image", data=body,
                                 headers={"Content-Type": "multipart/form-data; boundary=XyZ"})
        assert (await resp.json())["name"] == "evil.png"
        assert (tmp_path / "input" / "evil.png").is_file() and not (tmp_path.parent / "evil.png").exists()


@async_test
async def test_upload_refusals(tmp_path):
    async with serve(tmp_path, max_upload_mb=0.01) as client:
        body = await upload(client, b"x" * 20_000, expect=413)
        assert body["error"]["type"] == "too_large"
        assert not list((tmp_path / "input").glob("*")) if (tmp_path / "input").exists() else True
        body = await upload(client, png(), subfolder="../../etc", expect=403)
        assert body["error"]["type"] == "forbidden_path"
        body = await upload(client, png(), subfolder="/tmp", expect=403)
        body = await upload(client, png(), type="models", expect=400)
        resp = await client.post("/upload/image", json={"image": "nope"})
        assert resp.status == 400
        f = aiohttp.FormData(default_to_multipart=True)
        f.add_field("other", "x")
        resp = await client.post("/upload/image", data=f)
        assert resp.status == 400 and "image" in (await resp.json())["error"]["message"]


@async_test
async def test_upload_mask_into_alpha(tmp_path):
    async with serve(tmp_path) as client:
        out = tmp_path / "output"
        out.mkdir()
        (out / "orig.png").write_bytes(png((200, 100, 50, 255), (8, 8), text={"prompt": "{}"}))
        mask = io.BytesIO()
        m = Image.new("RGBA", (4, 4), (0, 0, 0, 255))
        m.putpixel((0, 0), (0, 0, 0, 0))
        m.save(mask, format="PNG")
        ref = json.dumps({"filename": "orig.png", "subfolder": "", "type": "output"})
        got = await upload(client, mask.getvalue(), name="clipspace-mask.png", path="/upload/mask",
                           original_ref=ref, subfolder="clipspace", type="input")
        assert got == {"name": "clipspace-mask.png", "subfolder": "clipspace", "type": "input"}
        with Image.open(tmp_path / "input" / "clipspace" / "clipspace-mask.png") as img:
            assert img.mode == "RGBA" and img.size == (8, 8)
            assert img.getpixel((7, 7)) == (200, 100, 50, 255)
            assert img.getpixel((0, 0))[3] == 0  # the mask's transparency, scaled up
            assert img.text.get("prompt") == "{}"  # the original's metadata kept
        await upload(client, mask.getvalue(), path="/upload/mask", expect=404,
                            original_ref=json.dumps({"filename": "missing.png"}))
        await upload(client, mask.getvalue(), path="/upload/mask", expect=403,
                            original_ref=json.dumps({"filename": "../../x.png", "type": "output"}))
        await upload(client, mask.getvalue(), path="/upload/mask", expect=400, original_ref="not json")


@async_test
async def test_view_confinement(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET-CONTENT")
    (tmp_path / "output").mkdir()
    (tmp_path / "output" / "ok.png").write_bytes(png())
    os.symlink(secret, tmp_path / "output" / "link.png")
    os.symlink(tmp_path, tmp_path / "output" / "dirlink")
    async with serve(tmp_path) as client:
        for params in ({"filename": "../secret.txt"},
                       {"filename": str(secret)},
                       {"filename": "secret.txt", "subfolder": ".."},
                       {"filename": "secret.txt", "subfolder": str(tmp_path)},
                       {"filename": "link.png"},  # a symlink out of the folder
                       {"filename": "secret.txt", "subfolder": "dirlink"},
                       {"filename": "..\\secret.txt"},
                       {"filename": "ok.png\x00.txt"}):
            resp = await client.get("/view", params=params)
            assert resp.status == 403, params
            assert "TOP-SECRET" not in await resp.text()
        resp = await client.get("/view", params={"filename": "ok.png", "type": "models"})
        assert resp.status == 400
        resp = await client.get("/view", params={"filename": "nope.png"})
        assert resp.status == 404
        resp = await client.get("/view")
        assert resp.status == 400
        resp = await client.get("/view", params={"filename": "ok.png"})  # type defaults to output
        assert resp.status == 200


@async_test
async def test_view_preview_and_channels(tmp_path):
    (tmp_path / "output").mkdir()
    (tmp_path / "output" / "a.png").write_bytes(png((10, 20, 30, 128), (32, 16)))
    (tmp_path / "output" / "page.html").write_text("<script>alert(1)</script>")
    async with serve(tmp_path) as client:
        for spec, fmt in (("webp;50", "WEBP"), ("jpeg;90", "JPEG"), ("jpg", "JPEG"), ("bogus", "WEBP")):
            resp = await client.get("/view", params={"filename": "a.png", "preview": spec})
            assert resp.status == 200
            with Image.open(io.BytesIO(await resp.read())) as img:
                assert img.format == fmt and img.size == (32, 16)
            assert resp.content_type == f"image/{fmt.lower()}"
        resp = await client.get("/view", params={"filename": "a.png", "channel": "rgb"})
        with Image.open(io.BytesIO(await resp.read())) as img:
            assert img.mode == "RGB" and img.getpixel((0, 0)) == (10, 20, 30)
        resp = await client.get("/view", params={"filename": "a.png", "channel": "a"})
        with Image.open(io.BytesIO(await resp.read())) as img:
            assert img.mode == "RGBA" and img.getpixel((0, 0))[3] == 128
        # Not an image: never served as HTML.
        resp = await client.get("/view", params={"filename": "page.html"})
        assert resp.status == 200 and resp.content_type == "application/octet-stream"
        assert resp.headers["Content-Disposition"].startswith("attachment")
        resp = await client.get("/view", params={"filename": "page.html", "preview": "webp"})
        assert resp.status == 400


def raw_upload_body(filename, data=b"data", **fields):
    """A multipart body with exactly this file name (aiohttp's FormData would quote it)."""
    parts = [b"--XyZ\r\nContent-Disposition: form-data; name=\"image\"; filename=\"" + filename.encode() + b"\"\r\n"
             b"Content-Type: image/png\r\n\r\n" + data + b"\r\n"]
    for k, v in fields.items():
        parts.append(f"--XyZ\r\nContent-Disposition: form-data; name=\"{k}\"\r\n\r\n{v}\r\n".encode())
    return b"".join(parts) + b"--XyZ--\r\n"


async def raw_upload(client, filename, **fields):
    resp = await client.post("/upload/image", data=raw_upload_body(filename, **fields),
                             headers={"Content-Type": "multipart/form-data; boundary=XyZ"})
    return resp.status, await resp.text()


@async_test
async def test_upload_names_that_are_not_files_refused(tmp_path):
    async with serve(tmp_path) as client:
        (tmp_path / "input").mkdir()
        before = sorted(p.name for p in tmp_path.iterdir())
        for name in (".", "..", "a/..", "a/.", "dir/", "x" * 256, "é" * 128):
            for overwrite in ("false", "true"):
                status, text = await raw_upload(client, name, overwrite=overwrite)
                assert status == 400, (name, overwrite, text)
                assert json.loads(text)["error"]["type"] == "invalid_filename"
                assert str(tmp_path) not in text
        # Nothing landed beside input/ (". (1)" used to be written one level up), nor in it.
        assert sorted(p.name for p in tmp_path.iterdir()) == before
        assert list((tmp_path / "input").iterdir()) == []
        resp = await client.get("/view", params={"filename": ".", "type": "input"})
        assert resp.status == 400
        # A name of 255 bytes is fine.
        status, text = await raw_upload(client, "x" * 251 + ".png")
        assert status == 200, text


@async_test
async def test_upload_errors_are_400_without_server_paths(tmp_path):
    async with serve(tmp_path) as client:
        (tmp_path / "input" / "folder.png").mkdir(parents=True)
        (tmp_path / "input" / "afile").write_bytes(b"x")
        # overwrite onto a folder's name
        status, text = await raw_upload(client, "folder.png", overwrite="true")
        assert status == 400 and "is a folder" in text and str(tmp_path) not in text, text
        assert (tmp_path / "input" / "folder.png").is_dir()
        # without overwrite: a numbered name, as for any existing name
        status, text = await raw_upload(client, "folder.png")
        assert status == 200 and json.loads(text)["name"] == "folder (1).png"
        # a subfolder that is a file
        for subfolder in ("afile", "afile/deeper"):
            status, text = await raw_upload(client, "p.png", subfolder=subfolder)
            assert status == 400 and json.loads(text)["error"]["type"] == "invalid_subfolder", text
            assert str(tmp_path) not in text
        # a subfolder part over 255 bytes
        status, text = await raw_upload(client, "p.png", subfolder="s" * 300)
        assert status == 400 and str(tmp_path) not in text
        # /view of a file that is no image: PIL's message names the path; the body must not.
        (tmp_path / "output").mkdir()
        (tmp_path / "output" / "page.html").write_text("<p>")
        resp = await client.get("/view", params={"filename": "page.html", "preview": "webp"})
        text = await resp.text()
        assert resp.status == 400 and str(tmp_path) not in text and "page.html" in text


@async_test
async def test_overwritten_upload_has_the_mode_of_a_new_file(tmp_path):
    async with serve(tmp_path) as client:
        await upload(client, png((1, 2, 3, 255)))
        await upload(client, png((4, 5, 6, 255)), overwrite="true")
        await upload(client, png((7, 8, 9, 255)), name="new.png")
        mode = (tmp_path / "input" / "photo.png").stat().st_mode & 0o777
        umask = os.umask(0)
        os.umask(umask)
        assert mode == (tmp_path / "input" / "new.png").stat().st_mode & 0o777 == 0o666 & ~umask
        assert not [p for p in (tmp_path / "input").iterdir() if p.name.startswith(".")]


def test_error_texts_lose_server_paths():
    from nodeflow.server.common import describe_error

    exc = FileNotFoundError(2, "No such file or directory", "/srv/sd/input/x.png")
    assert describe_error(exc) == "FileNotFoundError: No such file or directory"
    exc = ValueError("cannot identify image file '/srv/my base/output/a.png' or '/etc/other.png'")
    text = describe_error(exc, ["/srv/my base"])
    assert "/srv" not in text and "/etc" not in text and "'output/a.png'" in text and "'other.png'" in text


@async_test
async def test_temp_is_emptied_at_start_without_following_symlinks(tmp_path, monkeypatch):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.png").write_bytes(b"keep")
    temp = tmp_path / "base" / "temp"
    (temp / "sub").mkdir(parents=True)
    (temp / "old.png").write_bytes(b"x")
    (temp / "sub" / "deep.png").write_bytes(b"x")
    os.symlink(outside, temp / "linked")
    os.symlink(outside / "keep.png", temp / "file-link.png")
    async with serve(tmp_path / "base") as client:
        assert list(temp.iterdir()) == []
        assert (outside / "keep.png").read_bytes() == b"keep"
        assert (await client.get("/prompt")).status == 200
    # A temp folder that holds other folders (here: the base itself) is left alone.
    (tmp_path / "base" / "output").mkdir()
    (tmp_path / "base" / "output" / "saved.png").write_bytes(b"x")
    async with serve(tmp_path / "base", temp_dir=str(tmp_path / "base")):
        assert (tmp_path / "base" / "output" / "saved.png").is_file()
    # So is the system's temporary folder, should temp/ be set to it.
    shared = tmp_path / "system-tmp"
    shared.mkdir()
    (shared / "someone-elses.txt").write_text("x")
    monkeypatch.setattr(tempfile, "gettempdir", lambda: str(shared))
    async with serve(tmp_path / "base", temp_dir=str(shared)):
        assert (shared / "someone-elses.txt").is_file()


MALFORMED_FORMS = [
    # A NUL byte in the file name: not an HTTP header at all.
    b'--XX\r\nContent-Disposition: form-data; name="image"; filename="a\x00b.png"\r\nContent-Type: image/png\r\n\r\n'
    b"abc\r\n--XX--\r\n",
    b'--XX\r\nContent-Disposition: form-data; name="image"; filename="ab.png"\r\nBad Header\x01: x\r\n\r\nabc\r\n'
    b"--XX--\r\n",
    b'--XX\r\nContent-Disposition: form-data; name="image"; filename="ab.png"\r\n\r\nabc\r\n--YY--\r\n',  # cut short
    b"no boundary at all",
]


@async_test
async def test_malformed_multipart_forms_are_the_clients_error(tmp_path):
    async with serve(tmp_path) as client:
        for route in ("/upload/image", "/upload/mask"):
            for body in MALFORMED_FORMS:
                resp = await client.post(route, data=body, headers={"Content-Type": "multipart/form-data; boundary=XX"})
                answer = await resp.json()
                assert resp.status == 400 and answer["error"]["type"] == "invalid_request", (route, body, answer)
            resp = await client.post(route, data=b"x", headers={"Content-Type": 'multipart/form-data; boundary=""'})
            assert resp.status == 400
        assert not (tmp_path / "input").exists() or not any((tmp_path / "input").iterdir())


@async_test
async def test_images_over_max_pixels_are_not_decoded_by_view_or_mask_uploads(tmp_path):
    (tmp_path / "output").mkdir()
    Image.new("L", (3000, 3000)).save(tmp_path / "output" / "big.png")
    async with serve(tmp_path, max_pixels=2000 * 2000) as client:
        assert (await client.get("/view?filename=big.png")).status == 200  # the file itself, as it is
        resp = await client.get("/view?filename=big.png&preview=webp;50")
        answer = await resp.json()
        assert resp.status == 400 and answer["error"]["type"] == "too_large"
        assert "9,000,000" in answer["error"]["message"]
        form = aiohttp.FormData()
        form.add_field("image", png(), filename="mask.png", content_type="image/png")
        form.add_field("original_ref", json.dumps({"filename": "big.png", "type": "output"}))
        resp = await client.post("/upload/mask", data=form)
        assert resp.status == 400 and (await resp.json())["error"]["type"] == "too_large"
        assert not (tmp_path / "input" / "mask.png").exists()
