"""UI-format (editor) workflows converted to the API format: ComfyUI's default graph, the
newer link objects, reroutes, primitives, converted widgets, bypassed and muted nodes,
notes, unknown types, and a converted workflow that runs."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

import nodeflow
from nodeflow import Combo, Executor, Float, Int, Node, Output, Registry, Socket, String, WorkflowError, parse, validate
from nodeflow.spec import MAX_SEED
from nodeflow.uiformat import ui_to_api
from nodes.image import ImageInvert, ScaleImage
from nodes.io import LoadImage, PreviewImage, SaveImage


# Schema stand-ins with ComfyUI's input names and order: the conversion needs schemas only.
class CheckpointLoaderSimple(Node):
    display_name = "Load Checkpoint"
    inputs = {"ckpt_name": Combo(choices=["v1-5-pruned-emaonly.safetensors"])}
    outputs = [Output("MODEL"), Output("CLIP"), Output("VAE")]

    def run(self, ckpt_name):
        raise NotImplementedError


class CLIPTextEncode(Node):
    display_name = "CLIP Text Encode (Prompt)"
    inputs = {"text": String(multiline=True), "clip": Socket("CLIP")}
    outputs = [Output("CONDITIONING")]

    def run(self, text, clip):
        raise NotImplementedError


class EmptyLatentImage(Node):
    display_name = "Empty Latent Image"
    inputs = {"width": Int(default=512, min=16, max=16384, step=8),
              "height": Int(default=512, min=16, max=16384, step=8),
              "batch_size": Int(default=1, min=1, max=4096)}
    outputs = [Output("LATENT")]

    def run(self, width, height, batch_size):
        raise NotImplementedError


class KSampler(Node):
    display_name = "KSampler"
    inputs = {"model": Socket("MODEL"), "seed": Int(default=0, min=0, max=MAX_SEED, control_after_generate=True),
              "steps": Int(default=20, min=1, max=10000), "cfg": Float(default=8.0, min=0.0, max=100.0),
              "sampler_name": Combo(choices=["euler"]), "scheduler": Combo(choices=["normal"]),
              "positive": Socket("CONDITIONING"), "negative": Socket("CONDITIONING"),
              "latent_image": Socket("LATENT"), "denoise": Float(default=1.0, min=0.0, max=1.0)}
    outputs = [Output("LATENT")]

    def run(self, **kw):
        raise NotImplementedError


class VAEDecode(Node):
    display_name = "VAE Decode"
    inputs = {"samples": Socket("LATENT"), "vae": Socket("VAE")}
    outputs = [Output("IMAGE")]

    def run(self, samples, vae):
        raise NotImplementedError


def model_registry():
    return Registry([CheckpointLoaderSimple, CLIPTextEncode, EmptyLatentImage, KSampler, VAEDecode, SaveImage])


def out(name, kind, links, slot=0):
    return {"name": name, "type": kind, "links": links, "slot_index": slot}


# ComfyUI's default graph as its editor saves it (format version 0.4).
DEFAULT_GRAPH = {
    "last_node_id": 9, "last_link_id": 9,
    "nodes": [
        {"id": 7, "type": "CLIPTextEncode", "pos": [413, 389], "size": {"0": 425.3, "1": 180.6}, "flags": {},
         "order": 3, "mode": 0, "inputs": [{"name": "clip", "type": "CLIP", "link": 5}],
         "outputs": [out("CONDITIONING", "CONDITIONING", [6])],
         "properties": {"Node name for S&R": "CLIPTextEncode"}, "widgets_values": ["text, watermark"]},
        {"id": 6, "type": "CLIPTextEncode", "pos": [415, 186], "size": {"0": 422.8, "1": 164.3}, "flags": {},
         "order": 2, "mode": 0, "inputs": [{"name": "clip", "type": "CLIP", "link": 3}],
         "outputs": [out("CONDITIONING", "CONDITIONING", [4])],
         "properties": {"Node name for S&R": "CLIPTextEncode"},
         "widgets_values": ["beautiful scenery nature glass bottle landscape, , purple galaxy bottle,"]},
        {"id": 5, "type": "EmptyLatentImage", "pos": [473, 609], "size": {"0": 315, "1": 106}, "flags": {},
         "order": 1, "mode": 0, "outputs": [out("LATENT", "LATENT", [2])],
         "properties": {"Node name for S&R": "EmptyLatentImage"}, "widgets_values": [512, 512, 1]},
        {"id": 3, "type": "KSampler", "pos": [863, 186], "size": {"0": 315, "1": 262}, "flags": {}, "order": 4,
         "mode": 0, "inputs": [{"name": "model", "type": "MODEL", "link": 1},
                               {"name": "positive", "type": "CONDITIONING", "link": 4},
                               {"name": "negative", "type": "CONDITIONING", "link": 6},
                               {"name": "latent_image", "type": "LATENT", "link": 2}],
         "outputs": [out("LATENT", "LATENT", [7])], "properties": {"Node name for S&R": "KSampler"},
         "widgets_values": [156680208700286, "randomize", 20, 8, "euler", "normal", 1]},
        {"id": 8, "type": "VAEDecode", "pos": [1209, 188], "size": {"0": 210, "1": 46}, "flags": {}, "order": 5,
         "mode": 0,
         "inputs": [{"name": "samples", "type": "LATENT", "link": 7}, {"name": "vae", "type": "VAE", "link": 8}],
         "outputs": [out("IMAGE", "IMAGE", [9])], "properties": {"Node name for S&R": "VAEDecode"}},
        {"id": 9, "type": "SaveImage", "pos": [1451, 189], "size": {"0": 210, "1": 58}, "flags": {}, "order": 6,
         "mode": 0, "inputs": [{"name": "images", "type": "IMAGE", "link": 9}], "properties": {},
         "widgets_values": ["ComfyUI"]},
        {"id": 4, "type": "CheckpointLoaderSimple", "pos": [26, 474], "size": {"0": 315, "1": 98}, "flags": {},
         "order": 0, "mode": 0,
         "outputs": [out("MODEL", "MODEL", [1], 0), out("CLIP", "CLIP", [3, 5], 1), out("VAE", "VAE", [8], 2)],
         "properties": {"Node name for S&R": "CheckpointLoaderSimple"},
         "widgets_values": ["v1-5-pruned-emaonly.safetensors"]},
    ],
    "links": [[1, 4, 0, 3, 0, "MODEL"], [2, 5, 0, 3, 3, "LATENT"], [3, 4, 1, 6, 0, "CLIP"],
              [4, 6, 0, 3, 1, "CONDITIONING"], [5, 4, 1, 7, 0, "CLIP"], [6, 7, 0, 3, 2, "CONDITIONING"],
              [7, 3, 0, 8, 0, "LATENT"], [8, 4, 2, 8, 1, "VAE"], [9, 8, 0, 9, 0, "IMAGE"]],
    "groups": [], "config": {}, "extra": {}, "version": 0.4,
}

# What ComfyUI's "Save (API)" gives for it.
DEFAULT_API = {
    "3": {"inputs": {"seed": 156680208700286, "steps": 20, "cfg": 8, "sampler_name": "euler", "scheduler": "normal",
                     "denoise": 1, "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0],
                     "latent_image": ["5", 0]}, "class_type": "KSampler", "_meta": {"title": "KSampler"}},
    "4": {"inputs": {"ckpt_name": "v1-5-pruned-emaonly.safetensors"}, "class_type": "CheckpointLoaderSimple",
          "_meta": {"title": "Load Checkpoint"}},
    "5": {"inputs": {"width": 512, "height": 512, "batch_size": 1}, "class_type": "EmptyLatentImage",
          "_meta": {"title": "Empty Latent Image"}},
    "6": {"inputs": {"text": "beautiful scenery nature glass bottle landscape, , purple galaxy bottle,",
                     "clip": ["4", 1]}, "class_type": "CLIPTextEncode",
          "_meta": {"title": "CLIP Text Encode (Prompt)"}},
    "7": {"inputs": {"text": "text, watermark", "clip": ["4", 1]}, "class_type": "CLIPTextEncode",
          "_meta": {"title": "CLIP Text Encode (Prompt)"}},
    "8": {"inputs": {"samples": ["3", 0], "vae": ["4", 2]}, "class_type": "VAEDecode",
          "_meta": {"title": "VAE Decode"}},
    "9": {"inputs": {"filename_prefix": "ComfyUI", "images": ["8", 0]}, "class_type": "SaveImage",
          "_meta": {"title": "Save Image"}},
}


def test_default_graph_converts_like_comfyui():
    api = ui_to_api(json.loads(json.dumps(DEFAULT_GRAPH)), model_registry())
    assert api == DEFAULT_API
    assert list(api) == ["4", "5", "6", "7", "3", "8", "9"]  # the editor's execution order
    report = validate(parse(api), model_registry())
    assert report.complete, report.summary()


def test_default_graph_with_the_builtin_registry():
    reg = nodeflow.default_registry()
    if "KSampler" not in reg or "CheckpointLoaderSimple" not in reg:
        pytest.skip("the model nodes are not registered")
    api = ui_to_api(json.loads(json.dumps(DEFAULT_GRAPH)), reg)
    assert {k: v["inputs"] for k, v in api.items()} == {k: v["inputs"] for k, v in DEFAULT_API.items()}


def test_newer_format_link_objects_and_widget_inputs():
    graph = json.loads(json.dumps(DEFAULT_GRAPH))
    graph["version"] = 1
    graph["links"] = [{"id": link[0], "origin_id": link[1], "origin_slot": link[2], "target_id": link[3],
                       "target_slot": link[4], "type": link[5]} for link in graph["links"]]
    sampler = next(n for n in graph["nodes"] if n["id"] == 3)
    # Newer editors list every widget among the inputs too, unlinked.
    sampler["inputs"] += [{"name": name, "type": kind, "widget": {"name": name}, "link": None}
                          for name, kind in [("seed", "INT"), ("steps", "INT"), ("cfg", "FLOAT"),
                                             ("sampler_name", "COMBO"), ("scheduler", "COMBO"), ("denoise", "FLOAT")]]
    sampler["title"] = "My sampler"
    api = ui_to_api(graph, model_registry())
    assert api["3"]["inputs"] == DEFAULT_API["3"]["inputs"] and api["3"]["_meta"] == {"title": "My sampler"}
    assert api["9"] == DEFAULT_API["9"]


def test_the_slot_after_a_seed_is_always_the_control_value():
    graph = json.loads(json.dumps(DEFAULT_GRAPH))
    sampler = next(n for n in graph["nodes"] if n["id"] == 3)
    # Saved without the control widget's value: the editor still gives the slot after the
    # seed to it, and every later widget shifts (frontend 1.58.1's graphToPrompt sends
    # steps 8, cfg "euler", ...; validation then reports the bad values).
    sampler["widgets_values"] = [7, 20, 8, "euler", "normal", 1]
    inputs = ui_to_api(graph, model_registry())["3"]["inputs"]
    assert [inputs[k] for k in ("seed", "steps", "cfg", "sampler_name", "scheduler", "denoise")] == \
        [7, 8, "euler", "normal", 1, 1.0]
    sampler["widgets_values"] = {"seed": 5, "steps": 3, "cfg": 2.5, "sampler_name": "euler", "scheduler": "normal",
                                 "denoise": 0.5, "not_an_input": 1}
    inputs = ui_to_api(graph, model_registry())["3"]["inputs"]
    assert inputs["seed"] == 5 and inputs["denoise"] == 0.5 and "not_an_input" not in inputs


def test_unknown_types_are_kept_for_validation_to_name():
    graph = json.loads(json.dumps(DEFAULT_GRAPH))
    graph["nodes"].append({"id": 20, "type": "FancyUpscaler", "mode": 0,
                           "inputs": [{"name": "image", "type": "IMAGE", "link": 30},
                                      {"name": "factor", "type": "FLOAT", "widget": {"name": "factor"}, "link": None}],
                           "widgets_values": [2.0]})
    graph["links"].append([30, 8, 0, 20, 0, "IMAGE"])
    api = ui_to_api(graph, model_registry())
    assert api["20"] == {"inputs": {"factor": 2.0, "image": ["8", 0]}, "class_type": "FancyUpscaler",
                         "_meta": {"title": "FancyUpscaler"}}
    errors = validate(parse(api), model_registry()).errors
    assert [(e.node_id, e.message) for e in errors] == [("20", "Unknown node type 'FancyUpscaler'")]


def test_bad_documents_are_refused():
    with pytest.raises(WorkflowError, match="entry 0 of 'nodes' is not a node"):
        ui_to_api({"nodes": [5], "links": []}, model_registry())
    with pytest.raises(WorkflowError):
        ui_to_api({"1": {"class_type": "SaveImage"}}, model_registry())


def image_registry():
    return Registry([LoadImage, ScaleImage, ImageInvert, SaveImage, PreviewImage])


def editor_graph():
    """LoadImage -> Reroute -> (bypassed) ImageInvert -> ImageScale (width from a primitive
    node through a converted widget) -> SaveImage; a muted PreviewImage and a note."""
    return {
        "nodes": [
            {"id": 1, "type": "LoadImage", "mode": 0, "order": 0,
             "outputs": [out("IMAGE", "IMAGE", [1]), out("MASK", "MASK", None, 1)],
             "widgets_values": ["pic.png", "image"]},
            {"id": 2, "type": "Reroute", "mode": 0, "order": 1, "inputs": [{"name": "", "type": "*", "link": 1}],
             "outputs": [{"name": "", "type": "IMAGE", "links": [2]}]},
            {"id": 3, "type": "ImageInvert", "mode": 4, "order": 2,
             "inputs": [{"name": "image", "type": "IMAGE", "link": 2}], "outputs": [out("IMAGE", "IMAGE", [3])]},
            {"id": 4, "type": "ImageScale", "mode": 0, "order": 4,
             "inputs": [{"name": "image", "type": "IMAGE", "link": 3},
                        {"name": "width", "type": "INT", "link": 4,
                         "widget": {"name": "width", "config": ["INT", {"default": 512}]}}],
             "outputs": [out("IMAGE", "IMAGE", [5, 6])],
             "widgets_values": ["nearest-exact", 999, 6, "disabled"]},
            {"id": 5, "type": "PrimitiveNode", "mode": 0, "order": 3, "title": "width",
             "outputs": [{"name": "INT", "type": "INT", "links": [4], "widget": {"name": "width"}}],
             "widgets_values": [8, "fixed"]},
            {"id": 6, "type": "SaveImage", "mode": 0, "order": 5,
             "inputs": [{"name": "images", "type": "IMAGE", "link": 5}], "widgets_values": ["ui_run"]},
            {"id": 7, "type": "Note", "mode": 0, "widgets_values": ["remember the milk"]},
            {"id": 8, "type": "PreviewImage", "mode": 2, "order": 6,
             "inputs": [{"name": "images", "type": "IMAGE", "link": 6}]},
        ],
        "links": [[1, 1, 0, 2, 0, "*"], [2, 2, 0, 3, 0, "IMAGE"], [3, 3, 0, 4, 0, "IMAGE"], [4, 5, 0, 4, 1, "INT"],
                  [5, 4, 0, 6, 0, "IMAGE"], [6, 4, 0, 8, 0, "IMAGE"]],
        "groups": [{"title": "a group", "bounding": [0, 0, 100, 100]}], "version": 0.4,
    }


def test_editor_only_bypassed_and_muted_nodes():
    api = ui_to_api(editor_graph(), image_registry())
    assert api == {
        "1": {"inputs": {"image": "pic.png"}, "class_type": "LoadImage", "_meta": {"title": "Load Image"}},
        "4": {"inputs": {"upscale_method": "nearest-exact", "width": 8, "height": 6, "crop": "disabled",
                         "image": ["1", 0]}, "class_type": "ImageScale", "_meta": {"title": "Upscale Image"}},
        "6": {"inputs": {"filename_prefix": "ui_run", "images": ["4", 0]}, "class_type": "SaveImage",
              "_meta": {"title": "Save Image"}},
    }


def test_bypass_picks_input_of_the_link_type_and_drops_what_has_none():
    graph = editor_graph()
    # Bypass the scaler: SaveImage gets the scaler's IMAGE input (slot 0 has the right type).
    graph["nodes"][3]["mode"] = 4
    api = ui_to_api(graph, image_registry())
    assert api["6"]["inputs"]["images"] == ["1", 0] and "4" not in api
    # Mute the loader: everything downstream loses its image, and validation says so.
    graph["nodes"][0]["mode"] = 2
    api = ui_to_api(graph, image_registry())
    assert "images" not in api["6"]["inputs"]
    (err,) = validate(parse(api), image_registry()).errors
    assert err.node_id == "6" and err.input_name == "images" and err.type == "required_input_missing"


def test_converted_ui_workflow_runs(base):
    pixels = np.arange(4 * 4 * 3, dtype=np.uint8).reshape(4, 4, 3) * 5
    Image.fromarray(pixels).save(base.input / "pic.png")
    # The Python API takes the editor's format as it is, converting with the executor's schemas.
    result = nodeflow.run(editor_graph(), executor=Executor(image_registry()))
    assert result.ok, result.error
    (entry,) = result.ui["6"]["images"]
    with Image.open(base.output / entry["filename"]) as im:
        saved = np.asarray(im)
        chunks = dict(im.text)
    # The saved picture carries both forms: it reopens in the editor with its layout.
    assert json.loads(chunks["workflow"]) == editor_graph()
    assert json.loads(chunks["prompt"])["6"]["class_type"] == "SaveImage"
    # Width 8 from the primitive, height 6 from the widget, nearest-exact, not inverted (bypassed).
    expected = torch.nn.functional.interpolate(torch.from_numpy(pixels).permute(2, 0, 1)[None].float(),
                                               size=(6, 8), mode="nearest-exact")[0].permute(1, 2, 0).numpy()
    assert saved.shape == (6, 8, 3) and np.array_equal(saved, expected.astype(np.uint8))


def test_loading_a_ui_json_file_through_the_api(base, tmp_path):
    Image.new("RGB", (4, 4), (9, 9, 9)).save(base.input / "pic.png")
    path = tmp_path / "editor.json"
    path.write_text(json.dumps(editor_graph()))
    api = nodeflow.load_workflow(path)
    assert api["4"]["inputs"]["width"] == 8 and set(api) == {"1", "4", "6"}


def test_converter_imports_no_torch():
    code = textwrap.dedent("""
        import sys
        from nodeflow import Int, Node, Output, Registry
        from nodeflow.uiformat import ui_to_api
        class Const(Node):
            inputs = {"value": Int()}
            outputs = [Output("INT")]
            def run(self, value): return (value,)
        api = ui_to_api({"nodes": [{"id": 1, "type": "Const", "widgets_values": [3]}], "links": []}, Registry([Const]))
        assert api["1"]["inputs"] == {"value": 3}, api
        assert "torch" not in sys.modules
    """)
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("doc, message", [
    ({"nodes": [], "links": 5}, "'links' must be a list, got the number 5"),
    ({"nodes": [], "links": {"1": [1, 2, 0, 3, 0, "IMAGE"]}}, "'links' must be a list, got an object"),
    ({"nodes": [{"id": 1, "type": "Reroute", "inputs": {"a": 1}}], "links": []},
     "node 1 (Reroute): 'inputs' must be a list, got an object"),
    ({"nodes": [{"id": 2, "type": "SaveImage", "inputs": 5}], "links": []},
     "node 2 (SaveImage): 'inputs' must be a list, got the number 5"),
    ({"nodes": [{"id": 2, "type": "SaveImage", "outputs": "IMAGE"}], "links": []},
     "node 2 (SaveImage): 'outputs' must be a list, got a string"),
    ({"nodes": [], "links": [], "definitions": {"subgraphs": 5}},
     "'definitions.subgraphs' must be a list, got the number 5"),
])
def test_malformed_ui_documents_say_what_is_wrong(doc, message):
    with pytest.raises(WorkflowError, match="UI-format workflow: " + message.replace("(", r"\(").replace(")", r"\)")):
        ui_to_api(doc, model_registry())


def _places(obj, prefix=()):
    yield prefix
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for key, value in items:
        yield from _places(value, prefix + (key,))


def test_junk_anywhere_in_a_ui_document_is_a_workflow_error_or_converts():
    """Every place of two editor files, each junk value: converting (then validating) never
    raises anything but WorkflowError."""
    junk = [5, 1.5, "x", None, True, [], {}, [1], {"a": 1}, "Reroute", 4, [1, 2, 3, 4, 5, "IMAGE"]]
    for base, registry in ((DEFAULT_GRAPH, model_registry()), (editor_graph(), image_registry())):
        for place in list(_places(base))[1:]:
            for value in junk:
                doc = json.loads(json.dumps(base))
                target = doc
                for key in place[:-1]:
                    target = target[key]
                target[place[-1]] = value
                try:
                    graph = parse(ui_to_api(doc, registry))
                except WorkflowError:
                    continue
                validate(graph, registry).to_comfy(graph)


def test_editor_widgets_custom_combo_options_and_image_compare():
    # What the stock frontend (comfyui-frontend-package 1.58.1) sent for this document from
    # its graphToPrompt: a custom combo's own widgets (index, option1, ...) after its choice;
    # the image-compare slider, which takes no place in widgets_values, with its initial value.
    from nodes.core_utils import ImageCompare
    from nodes.logic import CustomCombo

    doc = {"nodes": [
        {"id": 1, "type": "CustomCombo", "mode": 0, "order": 0,
         "outputs": [out("STRING", "STRING", []), out("INDEX", "INT", [], 1)],
         "widgets_values": ["16:9", 1, "9:16", "16:9", ""]},
        {"id": 2, "type": "LoadImage", "mode": 0, "order": 1,
         "outputs": [out("IMAGE", "IMAGE", [1, 2]), out("MASK", "MASK", None, 1)],
         "widgets_values": ["pic.png", "image"]},
        {"id": 3, "type": "ImageCompare", "mode": 0, "order": 2,
         "inputs": [{"name": "image_a", "type": "IMAGE", "link": 1}, {"name": "image_b", "type": "IMAGE", "link": 2}],
         "outputs": [],
         "widgets_values": [{"before": "/api/view?filename=a.png", "after": "/api/view?filename=b.png"}]},
    ], "links": [[1, 2, 0, 3, 0, "IMAGE"], [2, 2, 0, 3, 1, "IMAGE"]], "version": 0.4}
    api = ui_to_api(doc, Registry([CustomCombo, LoadImage, ImageCompare]))
    assert api["1"]["inputs"] == {"choice": "16:9", "index": 1, "option1": "9:16", "option2": "16:9", "option3": ""}
    # The index sent is the choice's position among the options, whatever was saved (the
    # editor itself saves this document with index -1 and sends 1).
    doc["nodes"][0]["widgets_values"] = ["16:9", -1, "9:16", "16:9", ""]
    assert ui_to_api(doc, Registry([CustomCombo, LoadImage, ImageCompare]))["1"]["inputs"]["index"] == 1
    doc["nodes"][0]["widgets_values"] = ["4:3", 0, "9:16", "16:9", ""]
    assert ui_to_api(doc, Registry([CustomCombo, LoadImage, ImageCompare]))["1"]["inputs"]["index"] == -1
    assert api["3"]["inputs"] == {"compare_view": {"__value__": ["", ""]}, "image_a": ["2", 0], "image_b": ["2", 0]}
    doc["nodes"][2]["widgets_values"] = []
    assert ui_to_api(doc, Registry([CustomCombo, LoadImage, ImageCompare]))["3"]["inputs"]["compare_view"] == \
        {"__value__": ["", ""]}
