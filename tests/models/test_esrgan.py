"""ESRGAN-family upscalers: key layouts, detection from shapes, forward against an independent
reference written here with F.conv2d over the raw state dict, tiling, and safe loading."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from nodeflow import Interrupted
from nodeflow.models import esrgan
from nodeflow.models.esrgan import load_upscale_model
from nodeflow.models.files import CheckpointError

torch.set_num_threads(min(2, torch.get_num_threads()))
CPU = torch.device("cpu")


# --- tiny state dicts, written from the key names users' files have --------------------------

def _conv(sd, name, cin, cout, g, gain=1.0):
    sd[f"{name}.weight"] = torch.randn(cout, cin, 3, 3, generator=g) * gain / math.sqrt(cin * 9)
    sd[f"{name}.bias"] = torch.randn(cout, generator=g) * 0.05


def rrdb_sd(nf=8, nb=2, gc=4, in_ch=3, out_ch=3, ups=2, unshuffle=1, seed=0) -> dict[str, torch.Tensor]:
    """Real-ESRGAN / BasicSR layout ("new")."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    _conv(sd, "conv_first", in_ch * unshuffle ** 2, nf, g)
    for b in range(nb):
        for r in (1, 2, 3):
            for c in range(1, 6):
                _conv(sd, f"body.{b}.rdb{r}.conv{c}", nf + (c - 1) * gc, nf if c == 5 else gc, g)
    _conv(sd, "conv_body", nf, nf, g)
    for i in range(ups):
        _conv(sd, f"conv_up{i + 1}", nf, nf, g)
    _conv(sd, "conv_hr", nf, nf, g)
    _conv(sd, "conv_last", nf, out_ch, g)
    return sd


def to_old_layout(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same weights under the original ESRGAN repository's keys: model.0 conv_first,
    model.1.sub.{i}.RDB{r}.conv{c}.0, model.1.sub.{nb} conv_body, upconvs at model.3, model.6, …,
    conv_hr at model.{3n+2}, conv_last at model.{3n+4}."""
    nb = len({k.split(".")[1] for k in sd if k.startswith("body.")})
    n = len({k.split(".")[0] for k in sd if k.startswith("conv_up")})
    top = {"conv_first": "model.0", "conv_body": f"model.1.sub.{nb}", "conv_hr": f"model.{3 * n + 2}",
           "conv_last": f"model.{3 * n + 4}", **{f"conv_up{k + 1}": f"model.{3 * k + 3}" for k in range(n)}}
    out = {}
    for key, v in sd.items():
        parts = key.split(".")
        if parts[0] == "body":                   # body.b.rdbR.convC.weight -> model.1.sub.b.RDBR.convC.0.weight
            out[f"model.1.sub.{parts[1]}.RDB{parts[2][3:]}.{parts[3]}.0.{parts[4]}"] = v
        else:
            out[f"{top[parts[0]]}.{parts[1]}"] = v
    return out


def compact_sd(nf=8, num_conv=3, scale=4, in_ch=3, seed=0) -> dict[str, torch.Tensor]:
    """SRVGGNetCompact: body.0 conv, body.1 PReLU, …, body.{2·num_conv+2} conv to in_ch·scale²."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    _conv(sd, "body.0", in_ch, nf, g)
    i = 1
    for _ in range(num_conv):
        sd[f"body.{i}.weight"] = torch.rand(nf, generator=g) * 0.3
        _conv(sd, f"body.{i + 1}", nf, nf, g)
        i += 2
    sd[f"body.{i}.weight"] = torch.rand(nf, generator=g) * 0.3
    _conv(sd, f"body.{i + 1}", nf, in_ch * scale * scale, g)
    return sd


def write(sd, path, wrapper=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        torch.save({wrapper: sd} if wrapper else sd, path)
    return path


# --- an independent reference forward -----------------------------------------------------

def _c(sd, name, x):
    return F.conv2d(x, sd[f"{name}.weight"], sd[f"{name}.bias"], padding=1)


def _lrelu(x):
    return torch.where(x >= 0, x, 0.2 * x)


def ref_rrdbnet(sd, x):
    """RRDBNet as the papers describe it, over Real-ESRGAN's keys."""
    H, W = x.shape[-2:]
    out_ch, in_raw = sd["conv_last.weight"].shape[0], sd["conv_first.weight"].shape[1]
    u = {4 * out_ch: 2, 16 * out_ch: 4}.get(in_raw, 1)
    n = len([k for k in sd if k.startswith("conv_up") and k.endswith(".weight")])
    if u > 1:                                    # Real-ESRGAN: reflect-pad to a multiple, then unshuffle
        x = F.pad(x, (0, -W % u, 0, -H % u), mode="reflect")
        b, c, h, w = x.shape
        x = x.view(b, c, h // u, u, w // u, u).permute(0, 1, 3, 5, 2, 4).reshape(b, c * u * u, h // u, w // u)
    feat = _c(sd, "conv_first", x)
    body = feat
    nb = len({k.split(".")[1] for k in sd if k.startswith("body.")})
    for b in range(nb):
        block_in = body
        for r in (1, 2, 3):
            rdb_in, feats = body, [body]
            for c in range(1, 5):
                feats.append(_lrelu(_c(sd, f"body.{b}.rdb{r}.conv{c}", torch.cat(feats, 1))))
            body = rdb_in + 0.2 * _c(sd, f"body.{b}.rdb{r}.conv5", torch.cat(feats, 1))
        body = block_in + 0.2 * body
    feat = feat + _c(sd, "conv_body", body)
    for i in range(n):
        feat = feat.repeat_interleave(2, -2).repeat_interleave(2, -1)  # nearest ×2
        feat = _lrelu(_c(sd, f"conv_up{i + 1}", feat))
    out = _c(sd, "conv_last", _lrelu(_c(sd, "conv_hr", feat)))
    s = 2 ** n // u
    return out[..., :H * s, :W * s]


def ref_compact(sd, x):
    convs = sorted(int(k.split(".")[1]) for k, v in sd.items() if k.endswith(".weight") and v.ndim == 4)
    out = x
    for i in convs:
        out = _c(sd, f"body.{i}", out)
        if i != convs[-1]:
            a = sd[f"body.{i + 1}.weight"].view(1, -1, 1, 1)
            out = torch.where(out >= 0, out, a * out)
    c = x.shape[1]
    s = math.isqrt(out.shape[1] // c)
    b, _, h, w = out.shape
    out = out.view(b, c, s, s, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c, h * s, w * s)  # pixel shuffle
    return out + x.repeat_interleave(s, -2).repeat_interleave(s, -1)


def image(b=1, h=12, w=10, c=3, seed=1):
    return torch.rand(b, h, w, c, generator=torch.Generator().manual_seed(seed))


def nchw(img):
    return img.movedim(-1, 1)


# --- loading and detection ------------------------------------------------------------------

@pytest.mark.parametrize("name, wrapper", [("m.pth", None), ("m.pth", "params_ema"), ("m.pth", "params"),
                                           ("m.pt", None), ("m.safetensors", None)])
def test_real_esrgan_layout_loads_and_matches_reference(tmp_path, name, wrapper):
    sd = rrdb_sd(nf=8, nb=2, gc=4)
    up = load_upscale_model(write(sd, tmp_path / name, wrapper), device=CPU)
    assert up.arch == "RRDBNet" and up.scale == 4
    c = up.config
    assert (c.nf, c.nb, c.gc, c.in_channels, c.out_channels, c.unshuffle) == (8, 2, 4, 3, 3, 1)
    img = image()
    with torch.no_grad():
        expected = ref_rrdbnet(sd, nchw(img))
        assert torch.allclose(up.model(nchw(img)), expected, atol=1e-5)
    out = up.upscale(img)
    assert out.shape == (1, 48, 40, 3)
    assert torch.allclose(out, expected.clamp(0, 1).movedim(1, -1), atol=1e-5)


def test_params_ema_is_preferred_over_params(tmp_path):
    ema, raw = rrdb_sd(seed=1), rrdb_sd(seed=2)
    path = tmp_path / "both.pth"
    torch.save({"params": raw, "params_ema": ema}, path)
    up = load_upscale_model(path, device=CPU)
    assert torch.equal(up.model.conv_first.weight, ema["conv_first.weight"])


@pytest.mark.parametrize("ups, scale", [(2, 4), (1, 2), (3, 8), (0, 1)])
def test_original_esrgan_layout_is_the_same_model(tmp_path, ups, scale):
    sd = rrdb_sd(nf=8, nb=3, gc=4, ups=ups, seed=ups)
    old = to_old_layout(sd)
    if ups == 2:                                 # the ×4 indices everyone knows
        assert {"model.0.weight", "model.1.sub.3.weight", "model.3.weight", "model.6.weight", "model.8.weight",
                "model.10.weight", "model.1.sub.2.RDB3.conv5.0.weight"} <= set(old)
    up = load_upscale_model(write(old, tmp_path / "old.pth"), device=CPU)
    assert up.arch == "RRDBNet" and up.scale == scale and (up.config.nb, up.config.nf) == (3, 8)
    img = image(h=7, w=9)
    with torch.no_grad():
        assert torch.allclose(up.model(nchw(img)), ref_rrdbnet(sd, nchw(img)), atol=1e-5)
    assert up.upscale(img).shape == (1, 7 * scale, 9 * scale, 3)


@pytest.mark.parametrize("unshuffle, scale", [(2, 2), (4, 1)])
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_pixel_unshuffle_models(tmp_path, unshuffle, scale, suffix):
    sd = rrdb_sd(nf=8, nb=1, gc=4, unshuffle=unshuffle)
    assert sd["conv_first.weight"].shape[1] == 3 * unshuffle ** 2
    up = load_upscale_model(write(sd, tmp_path / f"x{scale}{suffix}", "params_ema" if suffix == ".pth" else None),
                            device=CPU)
    assert (up.scale, up.config.unshuffle, up.config.in_channels) == (scale, unshuffle, 3)
    img = image(h=10, w=11)                      # not multiples of the factor: padded, then cropped
    with torch.no_grad():
        expected = ref_rrdbnet(sd, nchw(img))
        assert expected.shape == (1, 3, 10 * scale, 11 * scale)
        assert torch.allclose(up.model(nchw(img)), expected, atol=1e-5)
    assert up.upscale(img).shape == (1, 10 * scale, 11 * scale, 3)


def test_old_layout_with_pixel_unshuffle(tmp_path):
    sd = rrdb_sd(nf=8, nb=1, gc=4, unshuffle=2)
    up = load_upscale_model(write(to_old_layout(sd), tmp_path / "x2.safetensors"), device=CPU)
    assert (up.scale, up.config.unshuffle) == (2, 2)
    img = image(h=8, w=6)
    with torch.no_grad():
        assert torch.allclose(up.model(nchw(img)), ref_rrdbnet(sd, nchw(img)), atol=1e-5)


def test_dataparallel_prefix_and_other_widths(tmp_path):
    sd = rrdb_sd(nf=12, nb=1, gc=6, in_ch=1, out_ch=1)
    up = load_upscale_model(write({"module." + k: v for k, v in sd.items()}, tmp_path / "gray.pth"), device=CPU)
    assert (up.config.nf, up.config.gc, up.in_channels, up.scale) == (12, 6, 1, 4)
    img = image(c=1)
    assert torch.allclose(up.upscale(img), ref_rrdbnet(sd, nchw(img)).clamp(0, 1).movedim(1, -1), atol=1e-5)


@pytest.mark.parametrize("scale", [4, 2])
def test_compact_model(tmp_path, scale):
    sd = compact_sd(nf=8, num_conv=3, scale=scale)
    up = load_upscale_model(write(sd, tmp_path / "compact.pth", "params"), device=CPU)
    assert up.arch == "SRVGGNetCompact" and up.scale == scale
    assert (up.config.nf, up.config.num_conv) == (8, 3)
    img = image()
    with torch.no_grad():
        assert torch.allclose(up.model(nchw(img)), ref_compact(sd, nchw(img)), atol=1e-5)


def test_weights_wait_in_the_requested_dtype(tmp_path):
    up = load_upscale_model(write(rrdb_sd(nb=1), tmp_path / "m.safetensors"), device=CPU, dtype=torch.bfloat16)
    assert up.dtype == torch.bfloat16 and up.model.conv_last.weight.dtype == torch.bfloat16
    assert up.upscale(image()).dtype == torch.float32


# --- errors ----------------------------------------------------------------------------------

def test_unknown_layout_names_the_file_and_what_was_expected(tmp_path):
    path = write({"encoder.conv_in.weight": torch.zeros(4, 3, 3, 3)}, tmp_path / "vae.safetensors")
    with pytest.raises(CheckpointError) as e:
        load_upscale_model(path, device=CPU)
    msg = str(e.value)
    assert str(path) in msg and "conv_first.weight" in msg and "model.1.sub.0.RDB1.conv1.0.weight" in msg
    assert "encoder.conv_in.weight" in msg


def test_incomplete_old_layout_says_what_is_wrong(tmp_path):
    old = to_old_layout(rrdb_sd(nb=2))
    del old["model.6.weight"], old["model.6.bias"]
    with pytest.raises(CheckpointError, match=r"model indices \[0, 3, 8, 10\]"):
        load_upscale_model(write(old, tmp_path / "broken.pth"), device=CPU)
    sd = rrdb_sd(nb=2)
    del sd["body.1.rdb2.conv3.weight"]
    with pytest.raises(CheckpointError, match="missing.*body.1.rdb2.conv3.weight"):
        load_upscale_model(write(sd, tmp_path / "missing.pth"), device=CPU)


def test_pickle_that_needs_code_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return os.mkdir, (str(marker),)

    path = tmp_path / "evil.pth"
    torch.save({"params_ema": {"conv_first.weight": torch.zeros(1)}, "x": Payload()}, path)
    with pytest.raises(CheckpointError, match="refused to load"):
        load_upscale_model(path, device=CPU)
    assert not marker.exists()


def test_missing_and_foreign_files(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        load_upscale_model(tmp_path / "nope.pth", device=CPU)
    (tmp_path / "junk.pth").write_bytes(b"hello world")
    with pytest.raises(CheckpointError, match="not a valid checkpoint"):
        load_upscale_model(tmp_path / "junk.pth", device=CPU)


# --- tiles ------------------------------------------------------------------------------------

def test_tiled_apply_is_exact_for_a_local_function():
    x = torch.rand(1, 3, 50, 70)
    fn = lambda t: t.repeat_interleave(3, -2).repeat_interleave(3, -1) * 2   # noqa: E731
    assert torch.allclose(esrgan.tiled_apply(fn, x, 3, 16, 8), fn(x), atol=1e-6)
    assert esrgan.tile_count(50, 70, 16, 8) == 6 * 8


def test_tiles_match_the_whole_image_when_the_overlap_covers_the_receptive_field(tmp_path):
    """A 1-block RRDBNet sees 17 low-resolution convs deep (conv_first, 15 dense-block convs, conv_body)
    plus under 2 pixels of its upsampling convs: 19 input pixels. The outer quarter of each overlap is
    not used, so an overlap of 80 keeps the blend exact."""
    sd = rrdb_sd(nf=8, nb=1, gc=4)
    up = load_upscale_model(write(sd, tmp_path / "m.pth"), device=CPU)
    img = image(h=36, w=250, seed=4)
    calls = []
    tiled = up.upscale(img, tile=160, overlap=80, progress=lambda i, n: calls.append((i, n)))
    assert calls == [(1, 3), (2, 3), (3, 3)]
    whole = up.upscale(img, tile=1024)
    assert torch.allclose(tiled, whole, atol=1e-5)


def test_compact_model_tiles_are_exact_with_a_16_pixel_overlap(tmp_path):
    up = load_upscale_model(write(compact_sd(num_conv=2), tmp_path / "c.pth"), device=CPU)
    img = image(b=2, h=70, w=45, seed=5)
    calls = []
    tiled = up.upscale(img, tile=32, overlap=32, progress=lambda i, n: calls.append(n))
    assert calls == [2 * 4 * 2] * 16            # 2 images × (4 × 2 tiles of 32 px with 16 px overlap)
    assert torch.allclose(tiled, up.upscale(img, tile=512), atol=1e-5)


def test_unshuffle_tiles_keep_the_pixel_grid(tmp_path):
    """Tile starts are multiples of the unshuffle factor, so each tile's pixels fall in the same
    2×2 groups as in the whole image (a one-block ×2 model: 38 input pixels of receptive field)."""
    up = load_upscale_model(write(rrdb_sd(nf=8, nb=1, gc=4, unshuffle=2), tmp_path / "x2.pth"), device=CPU)
    img = image(h=20, w=501, seed=6)             # x starts 0, 162 and 179 rounded down to 178
    assert esrgan._starts(501, 322, 160, 2) == [0, 162, 178]
    tiled = up.upscale(img, tile=322, overlap=161)
    assert torch.allclose(tiled, up.upscale(img, tile=1024), atol=1e-5)


def test_progress_can_interrupt(tmp_path):
    up = load_upscale_model(write(compact_sd(num_conv=1), tmp_path / "c.pth"), device=CPU)
    seen = []

    def progress(i, n):
        seen.append(i)
        if i == 2:
            raise Interrupted("stop")

    with pytest.raises(Interrupted):
        up.upscale(image(h=40, w=40), tile=16, overlap=4, progress=progress)
    assert seen == [1, 2]


def test_out_of_memory_halves_the_tile(tmp_path, monkeypatch, caplog):
    up = load_upscale_model(write(compact_sd(num_conv=1), tmp_path / "c.pth"), device=CPU)
    inner = up.model
    sizes = []

    class Small(torch.nn.Module):                # "runs out of memory" on tiles over 150 pixels wide
        config = inner.config

        def forward(self, x):
            sizes.append(x.shape[-1])
            if x.shape[-1] > 150:
                raise esrgan.OutOfMemoryError("CUDA out of memory (simulated)")
            return inner(x)

    up.model = Small()
    img = image(h=20, w=300, seed=7)
    out = up.upscale(img, tile=512, overlap=32)
    assert sizes[0] == 300 and set(sizes[1:2]) == {256} and max(sizes[-3:]) <= 128
    up.model = inner
    assert torch.allclose(out, up.upscale(img, tile=512), atol=1e-5)
    assert "retrying with 128-pixel tiles" in caplog.text
    up.model = Small()
    with pytest.raises(esrgan.OutOfMemoryError):
        up.upscale(image(h=20, w=300), tile=200)   # 200 -> 100 is under the 128-pixel floor


def test_half_precision_overflow_is_redone_in_fp32(tmp_path, caplog):
    sd = compact_sd(num_conv=1)
    sd = {k: v * 60 if v.ndim == 4 else v for k, v in sd.items()}     # activations beyond fp16's 65504
    up = load_upscale_model(write(sd, tmp_path / "hot.pth"), device=CPU, dtype=torch.float16)
    img = image(h=8, w=8)
    out = up.upscale(img)
    assert up.dtype == torch.float32 and "switching it to float32" in caplog.text
    with torch.no_grad():
        assert torch.allclose(out, ref_compact(sd, nchw(img)).clamp(0, 1).movedim(1, -1), atol=1e-4)


def test_alpha_channel_is_scaled_alongside(tmp_path):
    up = load_upscale_model(write(compact_sd(num_conv=1, scale=2), tmp_path / "c.pth"), device=CPU)
    rgba = image(c=4)
    out = up.upscale(rgba)
    assert out.shape == (1, 24, 20, 4)
    assert torch.allclose(out[..., :3], up.upscale(rgba[..., :3]))
    with pytest.raises(ValueError, match="takes 3 channels"):
        up.upscale(image(c=5))
    with pytest.raises(ValueError, match=r"\(B, H, W, 3\)"):
        up.upscale(torch.rand(12, 10, 3))
