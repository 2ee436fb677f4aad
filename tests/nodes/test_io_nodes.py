"""LoadImage, LoadImageMask, SaveImage and PreviewImage against files in a temporary base
folder, including bad input, and ``nodeflow run`` on a PNG that SaveImage wrote."""

import json
import re
import time

import numpy as np
import pytest
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

import nodeflow
from nodeflow import Executor, Registry, parse, validate
from nodeflow.cli import main as cli_main
from nodes import io as io_nodes
from nodes.image import ScaleImage
from nodes.io import LoadImage, LoadImageMask, PreviewImage, SaveImage, expand_prefix


def registry():
    return Registry([LoadImage, LoadImageMask, SaveImage, PreviewImage, ScaleImage])


def errors_of(workflow):
    return validate(parse(workflow), registry()).errors


def rgba_file(base, name="rgba.png"):
    pixels = np.zeros((2, 3, 4), np.uint8)
    pixels[..., 0] = [[10, 20, 30], [40, 50, 60]]
    pixels[..., 3] = [[255, 0, 51], [255, 255, 255]]
    Image.fromarray(pixels, "RGBA").save(base.input / name)
    return name


# -- LoadImage -------------------------------------------------------------------------------


def test_load_rgba_gives_pixels_and_inverted_alpha(base):
    image, mask = LoadImage().run(rgba_file(base))
    assert image.shape == (1, 2, 3, 3) and mask.shape == (1, 2, 3)
    assert image[0, 1, 2, 0].item() == pytest.approx(60 / 255)
    np.testing.assert_allclose(mask[0].numpy(), [[0.0, 1.0, 0.8], [0.0, 0.0, 0.0]], atol=1e-6)


def test_load_without_alpha_gives_64x64_zero_mask(base):
    Image.new("RGB", (5, 4), (255, 0, 0)).save(base.input / "red.jpg", quality=100)
    image, mask = LoadImage().run("red.jpg")
    assert image.shape == (1, 4, 5, 3) and image[0, 0, 0, 0] > 0.95
    assert mask.shape == (1, 64, 64) and not mask.any()


def test_load_applies_exif_orientation(base):
    # Stored 3 wide x 2 high with a white top-left pixel; orientation 6 = rotate 90° clockwise
    # to display, so it shows 2 wide x 3 high with the white pixel top-right.
    stored = Image.new("RGB", (3, 2))
    stored.putpixel((0, 0), (255, 255, 255))
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(base.input / "rotated.png", exif=exif)
    image, _ = LoadImage().run("rotated.png")
    assert image.shape == (1, 3, 2, 3)
    assert image[0, 0, 1].tolist() == [1.0, 1.0, 1.0] and image[0].sum() == 3.0


def test_load_animation_as_batch(base):
    frames = [Image.new("RGB", (4, 4), c) for c in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]]
    frames[0].save(base.input / "anim.png", save_all=True, append_images=frames[1:], duration=100)
    image, mask = LoadImage().run("anim.png")
    assert image.shape == (3, 4, 4, 3) and mask.shape == (3, 64, 64)
    assert image[:, 0, 0].argmax(dim=1).tolist() == [0, 1, 2]


def test_load_palette_transparency_and_16_bit(base):
    pal = Image.new("P", (2, 1))
    pal.putpalette([0, 0, 0, 255, 255, 255])
    pal.putpixel((1, 0), 1)
    pal.info["transparency"] = 0
    pal.save(base.input / "pal.png", transparency=0)
    _, mask = LoadImage().run("pal.png")
    assert mask[0].tolist() == [[1.0, 0.0]]  # palette index 0 is transparent
    deep = Image.fromarray(np.array([[0, 32768, 65535]], dtype=np.uint16))
    deep.save(base.input / "deep.png")
    image, _ = LoadImage().run("deep.png")
    assert image[0, 0, :, 1].tolist() == pytest.approx([0.0, 32768 / 65535, 1.0])


def test_load_image_mask_channels(base):
    rgba_file(base)
    (alpha,) = LoadImageMask().run("rgba.png", "alpha")
    assert alpha.shape == (1, 2, 3) and alpha[0, 0, 1] == 1.0
    (red,) = LoadImageMask().run("rgba.png", "red")
    assert red[0, 0].tolist() == pytest.approx([10 / 255, 20 / 255, 30 / 255])
    Image.new("RGB", (3, 2)).save(base.input / "opaque.png")
    (none,) = LoadImageMask().run("opaque.png", "alpha")
    assert none.shape == (1, 2, 3) and not none.any()


def test_load_validation_missing_unsafe_and_not_an_image(base):
    rgba_file(base)
    (base.input / "fake.png").write_bytes(b"this is not a PNG")
    (base.output / "made.png").write_bytes((base.input / "rgba.png").read_bytes())

    def problems(name):
        return errors_of({"1": {"class_type": "LoadImage", "inputs": {"image": name}},
                          "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "x"}}})

    assert problems("rgba.png") == []
    assert problems("made.png [output]") == []  # ComfyUI clients' annotated names
    missing = problems("nope.png")
    assert missing[0].input_name == "image" and missing[0].message == "Image file not found"
    assert "rgba.png" in missing[0].expected
    unsafe = problems("../secret.png")
    assert "not a plain relative file name" in unsafe[0].message
    fake = problems("fake.png")
    assert fake[0].type == "custom_validation_failed" and "'fake.png' is not an image file" in fake[0].message
    with pytest.raises(ValueError, match="not an image file"):
        LoadImage().run("fake.png")


def test_load_fingerprint_follows_content(base):
    name = rgba_file(base)
    before = LoadImage.fingerprint(image=name)
    assert before == LoadImage.fingerprint(image=name)
    Image.new("RGBA", (3, 2)).save(base.input / name)
    assert LoadImage.fingerprint(image=name) != before


def test_load_schema_lists_input_images_with_upload_hint(base):
    rgba_file(base)
    (base.input / "sub").mkdir()
    Image.new("RGB", (1, 1)).save(base.input / "sub" / "b.webp")
    spec = registry().object_info("LoadImage")["LoadImage"]["input"]["required"]["image"]
    assert spec[0] == ["rgba.png", "sub/b.webp"] and spec[1]["image_upload"] is True
    assert registry().object_info("LoadImage")["LoadImage"]["output"] == ["IMAGE", "MASK"]


# -- SaveImage / PreviewImage ------------------------------------------------------------------


def read_png(path):
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")), dict(im.text)


def test_save_numbers_files_and_embeds_workflow(base):
    (base.output / "shot_00007_.png").write_bytes(b"")  # numbering continues after what is there
    images = torch.rand(2, 3, 4, 3, generator=torch.Generator().manual_seed(0))
    prompt = {"1": {"class_type": "SaveImage", "inputs": {"filename_prefix": "shot"}}}
    extra = {"workflow": {"nodes": [], "links": []}}
    result = SaveImage().run(images, "shot", prompt=prompt, extra_pnginfo=extra)
    assert result.ui == {"images": [{"filename": "shot_00008_.png", "subfolder": "", "type": "output"},
                                    {"filename": "shot_00009_.png", "subfolder": "", "type": "output"}]}
    pixels, text = read_png(base.output / "shot_00009_.png")
    assert np.array_equal(pixels, (images[1].numpy() * 255).clip(0, 255).astype(np.uint8))
    assert json.loads(text["prompt"]) == prompt and json.loads(text["workflow"]) == extra["workflow"]


def test_save_metadata_can_be_left_out(base, monkeypatch):
    img = torch.zeros(1, 2, 2, 3)
    monkeypatch.setenv("NODEFLOW_DISABLE_METADATA", "1")
    SaveImage().run(img, "plain", prompt={"a": 1}, extra_pnginfo={"workflow": {}})
    assert read_png(base.output / "plain_00001_.png")[1] == {}


def test_save_subfolder_tokens_and_confinement(base):
    img = torch.zeros(1, 2, 3, 3)
    result = SaveImage().run(img, "day/%date:yyyy-MM-dd%_%width%x%height%")
    today = time.strftime("%Y-%m-%d")
    assert result.ui["images"] == [{"filename": f"{today}_3x2_00001_.png", "subfolder": "day", "type": "output"}]
    assert (base.output / "day" / f"{today}_3x2_00001_.png").is_file()
    with pytest.raises(ValueError, match="would leave the output folder"):
        SaveImage().run(img, "../../etc/x")
    assert not (base.base / "etc").exists() and not (base.base.parent / "etc" / "x_00001_.png").exists()
    wf = {"1": {"class_type": "LoadImage", "inputs": {"image": rgba_file(base)}},
          "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "../../etc/x"}}}
    (err,) = errors_of(wf)
    assert err.node_id == "2" and "filename_prefix '../../etc/x' would leave the output folder" in err.message
    wf["2"]["inputs"]["filename_prefix"] = "/abs/x"
    assert errors_of(wf)[0].node_id == "2"


def test_save_never_overwrites(base, monkeypatch):
    (base.output / "keep_00001_.png").write_bytes(b"precious")
    monkeypatch.setattr(io_nodes, "_next_counter", lambda directory, stem: 1)  # as if a writer raced us
    result = SaveImage().run(torch.zeros(1, 2, 2, 3), "keep")
    assert result.ui["images"][0]["filename"] == "keep_00002_.png"
    assert (base.output / "keep_00001_.png").read_bytes() == b"precious"


def test_prefix_tokens_from_the_workflow():
    prompt = {"3": {"class_type": "KSampler", "inputs": {"seed": 42}, "_meta": {"title": "Sampler"}}}
    now = time.struct_time((2024, 3, 5, 7, 8, 9, 0, 0, -1))
    assert expand_prefix("%Sampler.seed%-%KSampler.seed%-%date:yy.M.d-hhmmss%-%year%%unknown%", 1, 2, prompt, now) \
        == "42-42-24.3.5-070809-2024%unknown%"


def test_preview_goes_to_temp(base):
    result = PreviewImage().run(torch.zeros(1, 2, 2, 3))
    (entry,) = result.ui["images"]
    assert entry["type"] == "temp" and entry["subfolder"] == ""
    assert re.fullmatch(r"ComfyUI_temp_[a-z]{5}_00001_\.png", entry["filename"])
    assert (base.temp / entry["filename"]).is_file()


# -- end to end ----------------------------------------------------------------------------------


def test_saved_png_runs_again_with_the_same_pixels(base, capsys):
    rgba_file(base)
    workflow = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "rgba.png"}},
        "2": {"class_type": "ImageScale", "inputs": {"image": ["1", 0], "upscale_method": "bicubic",
                                                     "width": 7, "height": 5, "crop": "disabled"}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "again"}},
    }
    first = nodeflow.run(workflow, executor=Executor(nodeflow.default_registry()))
    assert first.ok and first.ui["3"]["images"][0]["filename"] == "again_00001_.png"
    saved = base.output / "again_00001_.png"
    assert json.loads(read_png(saved)[1]["prompt"]) == workflow

    assert cli_main(["run", str(saved), "--base-dir", str(base.base), "-q"]) == 0
    second = base.output / "again_00002_.png"
    assert second.is_file()
    assert np.array_equal(read_png(saved)[0], read_png(second)[0])
    assert read_png(saved)[0].shape == (5, 7, 3)


def test_comfyui_png_with_only_a_ui_workflow_runs(base):
    rgba_file(base)
    ui = {"nodes": [
        {"id": 1, "type": "LoadImage", "mode": 0, "outputs": [{"name": "IMAGE", "type": "IMAGE", "links": [1]}],
         "widgets_values": ["rgba.png", "image"]},
        {"id": 2, "type": "SaveImage", "mode": 0, "inputs": [{"name": "images", "type": "IMAGE", "link": 1}],
         "widgets_values": ["from_ui"]}],
        "links": [[1, 1, 0, 2, 0, "IMAGE"]], "groups": [], "version": 0.4}
    info = PngInfo()
    info.add_text("workflow", json.dumps(ui))
    Image.new("RGB", (1, 1)).save(base.base / "comfy.png", pnginfo=info)
    assert cli_main(["run", str(base.base / "comfy.png"), "--base-dir", str(base.base), "-q"]) == 0
    pixels, text = read_png(base.output / "from_ui_00001_.png")
    assert pixels.shape == (2, 3, 3) and json.loads(text["prompt"])["2"]["class_type"] == "SaveImage"


# -- prefixes with folders ------------------------------------------------------------------------


def test_date_format_with_slashes_makes_subfolders(base, monkeypatch):
    day = time.struct_time((2026, 11, 29, 10, 0, 0, 6, 333, -1))
    assert expand_prefix("%date:yyyy/MM/dd%/y", 1, 1, now=day) == "2026/11/29/y"
    assert expand_prefix("%date:yyyy%/%width%/%x/y%", 3, 1, now=day) == "2026/3/%x/y%"   # only dates take "/"
    monkeypatch.setattr(io_nodes.time, "localtime", lambda *a: day)
    result = SaveImage().run(torch.zeros(1, 2, 2, 3), "%date:yyyy/MM/dd%/y")
    assert result.ui["images"] == [{"filename": "y_00001_.png", "subfolder": "2026/11/29", "type": "output"}]
    assert (base.output / "2026" / "11" / "29" / "y_00001_.png").is_file()
    with pytest.raises(ValueError, match="would leave the output folder"):
        SaveImage().run(torch.zeros(1, 2, 2, 3), "%date:yyyy/../../..%/y")


def test_prefix_with_a_trailing_slash_is_a_name_as_in_comfyui(base):
    # ComfyUI normalises the prefix first (os.path.normpath("a/") == "a"): "a/" saves
    # a_00001_.png in output/ itself, not _00001_.png in output/a/.
    result = SaveImage().run(torch.zeros(1, 2, 2, 3), "a/")
    assert result.ui["images"] == [{"filename": "a_00001_.png", "subfolder": "", "type": "output"}]
    result = SaveImage().run(torch.zeros(1, 2, 2, 3), "a/b")
    assert result.ui["images"] == [{"filename": "b_00001_.png", "subfolder": "a", "type": "output"}]


# -- LoadImageOutput --------------------------------------------------------------------------------


def test_load_image_output_reads_the_output_folder(base):
    from nodes.io import LoadImageOutput

    SaveImage().run(torch.full((1, 2, 3, 3), 0.5), "fed_back")
    (base.output / "sub").mkdir()
    Image.new("RGB", (4, 4)).save(base.output / "sub" / "x.png")
    choices = LoadImageOutput.inputs["image"].options_list()
    assert choices == ["fed_back_00001_.png [output]", "sub/x.png [output]"]
    image, mask = LoadImageOutput().run("fed_back_00001_.png [output]")
    assert image.shape == (1, 2, 3, 3) and image[0, 0, 0, 0] == pytest.approx(127 / 255)  # 0.5 · 255 truncated
    assert LoadImageOutput().run("sub/x.png")[0].shape == (1, 4, 4, 3)     # a plain name: output/ too
    assert LoadImageOutput.fingerprint(image="sub/x.png") == LoadImageOutput.fingerprint(image="sub/x.png [output]")
    spec = LoadImageOutput.inputs["image"]
    assert spec.check("sub/x.png") is None and spec.check("../x.png") is not None
    assert spec.options()["image_folder"] == "output" and spec.options()["image_upload"] is True
    assert "image_folder" not in LoadImage.inputs["image"].options()
    with pytest.raises(FileNotFoundError):
        LoadImage().run("sub/x.png")                                        # LoadImage stays in input/


# -- the shipped example inputs -----------------------------------------------------------------------


def test_shipped_example_inputs(base):
    import shutil
    from pathlib import Path

    folder = Path(__file__).resolve().parents[2] / "workflows" / "inputs"
    for name in ("example.png", "example_masked.png"):
        shutil.copyfile(folder / name, base.input / name)
    image, mask = LoadImage().run("example.png")
    assert image.shape == (1, 512, 512, 3) and mask.shape == (1, 64, 64) and not mask.any()
    masked, hole = LoadImage().run("example_masked.png")
    assert torch.equal(masked, image)                         # the same picture, with a hole in its alpha
    assert hole.shape == (1, 512, 512) and set(hole.unique().tolist()) == {0.0, 1.0}
    assert 0.04 < hole.mean() < 0.1 and hole[0, 400, 385] == 1 and hole[0, 10, 10] == 0
    # The script beside them draws the same pixels again.
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_examples", folder / "make_examples.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    drawn = script.landscape()
    assert np.array_equal(np.asarray(drawn), (image[0].numpy() * 255).round().astype(np.uint8))
    assert np.array_equal(np.asarray(script.masked(drawn)), np.asarray(Image.open(folder / "example_masked.png")))
