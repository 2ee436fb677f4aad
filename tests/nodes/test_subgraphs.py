"""Subgraphs and group nodes in UI-format workflows, converted as the editor's
``graphToPrompt`` does.

The documents below are written in the editor's current format (format version 1: link
objects, ``definitions.subgraphs`` with input node -10 and output node -20). The expected
API prompts are written by hand from the editor's rules: inner nodes run as
``"<instance>:<inner>"``, nested ones with one more segment; an inner input fed from the
subgraph's input takes the instance's link, else its promoted widget value, else the inner
widget's own value; bypassed nodes pass through; muted nodes and instances disappear."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import nodeflow
from nodeflow import Combo, Executor, Float, Int, Node, Output, Registry, Socket, WorkflowError, parse, validate
from nodeflow.spec import MAX_SEED
from nodeflow.uiformat import ui_to_api
from nodes.image import ImageInvert, ScaleImage
from nodes.io import LoadImage, PreviewImage, SaveImage

SCALE = "0b7f4e43-2a1f-4a57-9d5e-6e0c1bd3a001"  # "Invert and scale": image, width -> IMAGE
OUTER = "0b7f4e43-2a1f-4a57-9d5e-6e0c1bd3a002"  # contains an instance of SCALE and a bypassed invert


def registry():
    return Registry([LoadImage, ScaleImage, ImageInvert, SaveImage, PreviewImage])


def link(link_id, origin, origin_slot, target, target_slot, kind):
    return {"id": link_id, "origin_id": origin, "origin_slot": origin_slot, "target_id": target,
            "target_slot": target_slot, "type": kind}


def socket(name, kind, link_id=None):
    return {"name": name, "type": kind, "link": link_id}


def widget(name, kind, link_id=None):
    return {"name": name, "type": kind, "widget": {"name": name}, "link": link_id}


def scale_definition():
    """image -> ImageInvert (5) -> ImageScale (6, width from the subgraph's input) -> IMAGE."""
    return {
        "id": SCALE, "version": 1, "name": "Invert and scale",
        "inputNode": {"id": -10, "bounding": [0, 0, 75, 100]}, "outputNode": {"id": -20, "bounding": [900, 0, 75, 100]},
        "inputs": [{"id": "in-image", "name": "image", "type": "IMAGE", "linkIds": [11]},
                   {"id": "in-width", "name": "width", "type": "INT", "linkIds": [12]}],
        "outputs": [{"id": "out-image", "name": "IMAGE", "type": "IMAGE", "linkIds": [13]}],
        "widgets": [],
        "nodes": [
            {"id": 5, "type": "ImageInvert", "mode": 0, "inputs": [socket("image", "IMAGE", 11)],
             "outputs": [{"name": "IMAGE", "type": "IMAGE", "links": [14]}]},
            {"id": 6, "type": "ImageScale", "mode": 0,
             "inputs": [socket("image", "IMAGE", 14), widget("width", "INT", 12)],
             "outputs": [{"name": "IMAGE", "type": "IMAGE", "links": [13]}],
             "widgets_values": ["nearest-exact", 4, 6, "disabled"]},
        ],
        "links": [link(11, -10, 0, 5, 0, "IMAGE"), link(12, -10, 1, 6, 1, "INT"), link(14, 5, 0, 6, 0, "IMAGE"),
                  link(13, 6, 0, -20, 0, "IMAGE")],
    }


def outer_definition():
    """image, width -> [instance 7 of SCALE] -> ImageInvert 8 (bypassed) -> IMAGE; a muted
    preview (9) hangs off the instance."""
    return {
        "id": OUTER, "version": 1, "name": "Nested",
        "inputNode": {"id": -10, "bounding": [0, 0, 75, 100]}, "outputNode": {"id": -20, "bounding": [900, 0, 75, 100]},
        "inputs": [{"id": "o-image", "name": "image", "type": "IMAGE", "linkIds": [21]},
                   {"id": "o-width", "name": "width", "type": "INT", "linkIds": [22]}],
        "outputs": [{"id": "o-out", "name": "IMAGE", "type": "IMAGE", "linkIds": [24]}],
        "nodes": [
            {"id": 7, "type": SCALE, "mode": 0,
             "inputs": [socket("image", "IMAGE", 21), widget("width", "INT", 22)],
             "outputs": [{"name": "IMAGE", "type": "IMAGE", "links": [23, 25]}], "widgets_values": [3]},
            {"id": 8, "type": "ImageInvert", "mode": 4, "inputs": [socket("image", "IMAGE", 23)],
             "outputs": [{"name": "IMAGE", "type": "IMAGE", "links": [24]}]},
            {"id": 9, "type": "PreviewImage", "mode": 2, "inputs": [socket("images", "IMAGE", 25)]},
        ],
        "links": [link(21, -10, 0, 7, 0, "IMAGE"), link(22, -10, 1, 7, 1, "INT"), link(23, 7, 0, 8, 0, "IMAGE"),
                  link(24, 8, 0, -20, 0, "IMAGE"), link(25, 7, 0, 9, 0, "IMAGE")],
    }


def instance(node_id, definition, image_link, out_links, order, **extra):
    return {"id": node_id, "type": definition, "mode": 0, "order": order,
            "inputs": [socket("image", "IMAGE", image_link), widget("width", "INT")],
            "outputs": [{"name": "IMAGE", "type": "IMAGE", "links": out_links}], **extra}


def save(node_id, image_link, order, prefix):
    return {"id": node_id, "type": "SaveImage", "mode": 0, "order": order,
            "inputs": [socket("images", "IMAGE", image_link)], "widgets_values": [prefix]}


def workflow():
    """LoadImage 1 feeds three instances: 10 (SCALE, promoted width 8), 11 (SCALE, no value:
    the inner widget's 4), 30 (OUTER, promoted width 7; its ``widgets_values_named`` says 5,
    which the editor does not read); each is saved."""
    return {
        "id": "7d2b6c1e-0000-4000-8000-000000000000", "revision": 0, "version": 1,
        "state": {"lastNodeId": 31, "lastLinkId": 8},
        "nodes": [
            {"id": 1, "type": "LoadImage", "mode": 0, "order": 0,
             "outputs": [{"name": "IMAGE", "type": "IMAGE", "links": [1, 3, 5]},
                         {"name": "MASK", "type": "MASK", "links": None}],
             "widgets_values": ["pic.png", "image"]},
            instance(10, SCALE, 1, [2], 1, widgets_values=[8]),
            instance(11, SCALE, 3, [4], 2, widgets_values=[]),
            instance(30, OUTER, 5, [6], 3, widgets_values=[7], widgets_values_named={"width": 5}),
            save(20, 2, 4, "first"), save(21, 4, 5, "second"), save(31, 6, 6, "nested"),
        ],
        "links": [link(1, 1, 0, 10, 0, "IMAGE"), link(2, 10, 0, 20, 0, "IMAGE"), link(3, 1, 0, 11, 0, "IMAGE"),
                  link(4, 11, 0, 21, 0, "IMAGE"), link(5, 1, 0, 30, 0, "IMAGE"), link(6, 30, 0, 31, 0, "IMAGE")],
        "groups": [], "config": {}, "extra": {},
        "definitions": {"subgraphs": [scale_definition(), outer_definition()]},
    }


def scaled(image, width, title="Upscale Image"):
    return {"inputs": {"upscale_method": "nearest-exact", "width": width, "height": 6, "crop": "disabled",
                       "image": image}, "class_type": "ImageScale", "_meta": {"title": title}}


def inverted(image):
    return {"inputs": {"image": image}, "class_type": "ImageInvert", "_meta": {"title": "Invert Image Colors"}}


def saved(image, prefix):
    return {"inputs": {"filename_prefix": prefix, "images": image}, "class_type": "SaveImage",
            "_meta": {"title": "Save Image"}}


# What the stock frontend's graphToPrompt (comfyui-frontend-package 1.58.1, default settings)
# produced for workflow() loaded into the editor served by nodeflow: 30:7:6 takes the
# positional promoted value 7, not widgets_values_named's 5.
EXPECTED = {
    "1": {"inputs": {"image": "pic.png"}, "class_type": "LoadImage", "_meta": {"title": "Load Image"}},
    "10:5": inverted(["1", 0]),
    "10:6": scaled(["10:5", 0], 8),
    "11:5": inverted(["1", 0]),
    "11:6": scaled(["11:5", 0], 4),
    "30:7:5": inverted(["1", 0]),
    "30:7:6": scaled(["30:7:5", 0], 7),
    "20": saved(["10:6", 0], "first"),
    "21": saved(["11:6", 0], "second"),
    "31": saved(["30:7:6", 0], "nested"),
}


def test_subgraph_instances_convert_like_the_editor(base):
    Image.new("RGB", (7, 5)).save(base.input / "pic.png")
    api = ui_to_api(workflow(), registry())
    assert api == EXPECTED
    # Root nodes by execution order, each instance's inner nodes in place (the editor orders
    # them otherwise; the order changes nothing that runs).
    assert list(api) == ["1", "10:5", "10:6", "11:5", "11:6", "30:7:5", "30:7:6", "20", "21", "31"]
    assert validate(parse(api), registry()).complete


def test_promoted_values_positional_legacy_and_links():
    doc = workflow()
    nested = doc["nodes"][3]
    # Positional, one value per promoted input; the editor (its default settings) does not
    # restore by name (frontend 1.58.1 gives 7 with or without widgets_values_named).
    assert ui_to_api(doc, registry())["30:7:6"]["inputs"]["width"] == 7
    del nested["widgets_values_named"]
    assert ui_to_api(doc, registry())["30:7:6"]["inputs"]["width"] == 7
    nested["widgets_values"] = []  # no value on the outer instance: the inner instance's own (3)
    assert ui_to_api(doc, registry())["30:7:6"]["inputs"]["width"] == 3
    # A link into the instance's input wins over any widget value; but a legacy primitive
    # node linked there gives nothing, and the inner widget's own value (4) stands: what the
    # stock frontend (1.58.1) sent for this document (its primitive finds no widget to fill).
    doc["nodes"].append({"id": 40, "type": "PrimitiveNode", "mode": 0, "order": 0,
                         "outputs": [{"name": "INT", "type": "INT", "links": [9], "widget": {"name": "width"}}],
                         "widgets_values": [12, "fixed"]})
    doc["links"].append(link(9, 40, 0, 10, 1, "INT"))
    doc["nodes"][1]["inputs"][1]["link"] = 9
    assert ui_to_api(doc, registry())["10:6"]["inputs"]["width"] == 4


def test_instances_save_only_some_inputs_and_named_values():
    doc = workflow()
    doc["nodes"][1]["inputs"] = [socket("image", "IMAGE", 1)]  # the editor leaves unlinked widget inputs out
    api = ui_to_api(doc, registry())
    assert api["10:6"]["inputs"]["width"] == 8 and api["10:5"]["inputs"]["image"] == ["1", 0]


def test_bypassed_and_muted_instances(base):
    Image.new("RGB", (7, 5)).save(base.input / "pic.png")
    doc = workflow()
    doc["nodes"][1]["mode"] = 4  # bypass instance 10: its IMAGE input passes straight to node 20
    doc["nodes"][2]["mode"] = 2  # mute instance 11: nothing of it runs, node 21 loses its input
    api = ui_to_api(doc, registry())
    assert not any(k.startswith(("10:", "11:")) for k in api)
    assert api["20"]["inputs"]["images"] == ["1", 0] and "images" not in api["21"]["inputs"]
    (err,) = validate(parse(api), registry()).errors
    assert (err.node_id, err.input_name, err.type) == ("21", "images", "required_input_missing")


def test_converted_subgraph_workflow_runs_and_its_png_runs_again(base):
    pixels = (np.arange(5 * 7 * 3, dtype=np.uint8).reshape(5, 7, 3) * 3)
    Image.fromarray(pixels).save(base.input / "pic.png")
    doc = workflow()
    result = nodeflow.run(doc, executor=Executor(registry()))
    assert result.ok, result.error
    assert set(result.ui) == {"20", "21", "31"}
    first = result.ui["20"]["images"][0]["filename"]
    with Image.open(base.output / first) as im:
        picture, chunks = np.asarray(im), dict(im.text)
    assert json.loads(chunks["workflow"]) == doc  # the workflow as it came, subgraphs and all
    assert json.loads(chunks["prompt"]) == EXPECTED
    inverted_pixels = 255 - pixels
    assert picture.shape == (6, 8, 3) and picture[0, 0].tolist() == inverted_pixels[0, 0].tolist()
    # The saved PNG runs again, on a fresh executor, to the same picture.
    again = nodeflow.run(base.output / first, executor=Executor(registry()))
    assert again.ok, again.error
    with Image.open(base.output / again.ui["20"]["images"][0]["filename"]) as im:
        assert np.array_equal(np.asarray(im), picture)


class Sampler(Node):
    """A KSampler stand-in: ComfyUI's widget order, with a seed."""

    type_name = "KSampler"
    inputs = {"model": Socket("MODEL"), "seed": Int(default=0, min=0, max=MAX_SEED, control_after_generate=True),
              "steps": Int(default=20, min=1, max=10000), "cfg": Float(default=8.0, min=0.0, max=100.0),
              "sampler_name": Combo(choices=["euler", "dpmpp_2m"]), "scheduler": Combo(choices=["normal", "karras"]),
              "positive": Socket("CONDITIONING"), "negative": Socket("CONDITIONING"),
              "latent_image": Socket("LATENT"), "denoise": Float(default=1.0, min=0.0, max=1.0)}
    outputs = [Output("LATENT")]

    def run(self, **kw):
        raise NotImplementedError


def sampler_doc(values, **extra):
    node = {"id": 3, "type": "KSampler", "mode": 0, **extra}
    if values is not None:
        node["widgets_values"] = values
    return {"nodes": [node], "links": [], "version": 0.4}


@pytest.mark.parametrize("values, expected", [
    # 2023 files: the control slot is a boolean.
    ([7, True, 30, 6.5, "dpmpp_2m", "karras", 0.5], (7, 30, 6.5, "dpmpp_2m", "karras", 0.5)),
    ([7, "fixed", 30, 6.5, "dpmpp_2m", "karras", 0.5], (7, 30, 6.5, "dpmpp_2m", "karras", 0.5)),
    # Shorter lists and none at all: the widgets' defaults, as the editor sends them.
    ([7, "randomize", 30], (7, 30, 8.0, "euler", "normal", 1.0)),
    (None, (0, 20, 8.0, "euler", "normal", 1.0)),
    ([], (0, 20, 8.0, "euler", "normal", 1.0)),
])
def test_legacy_and_short_widget_values(values, expected):
    inputs = ui_to_api(sampler_doc(values), Registry([Sampler]))["3"]["inputs"]
    assert tuple(inputs[k] for k in ("seed", "steps", "cfg", "sampler_name", "scheduler", "denoise")) == expected


def test_save_image_defaults_when_widget_values_are_missing():
    doc = {"nodes": [{"id": 9, "type": "SaveImage", "mode": 0, "inputs": [socket("images", "IMAGE")]}],
           "links": []}
    assert ui_to_api(doc, registry())["9"]["inputs"] == {"filename_prefix": "ComfyUI"}
    # A template that stores ["ComfyUI", ""] (an extra value from a widget nodeflow lacks) is fine.
    doc["nodes"][0]["widgets_values"] = ["ComfyUI", ""]
    assert ui_to_api(doc, registry())["9"]["inputs"] == {"filename_prefix": "ComfyUI"}


def test_promoted_seed_has_no_control_slot_in_a_subgraph_instance():
    seed_def = {
        "id": "0b7f4e43-2a1f-4a57-9d5e-6e0c1bd3a003", "name": "seeded",
        "inputs": [{"name": "seed", "type": "INT", "linkIds": [1]}, {"name": "steps", "type": "INT", "linkIds": [2]}],
        "outputs": [],
        "nodes": [{"id": 3, "type": "KSampler", "mode": 0,
                   "inputs": [widget("seed", "INT", 1), widget("steps", "INT", 2)],
                   "widgets_values": [1, "fixed", 2, 8, "euler", "normal", 1]}],
        "links": [link(1, -10, 0, 3, 0, "INT"), link(2, -10, 1, 3, 1, "INT")],
    }
    doc = {"nodes": [{"id": 4, "type": seed_def["id"], "mode": 0, "widgets_values": [7, 30]}],
           "links": [], "definitions": {"subgraphs": [seed_def]}}
    inputs = ui_to_api(doc, Registry([Sampler]))["4:3"]["inputs"]
    assert (inputs["seed"], inputs["steps"]) == (7, 30)
    # An instance's promoted widgets keep no slot for the seed's control value: the editor
    # reads the list one value per promoted input, so an older list with "randomize" after
    # the seed gives the steps that string (what frontend 1.58.1's graphToPrompt sends;
    # validation then reports it).
    doc["nodes"][0]["widgets_values"] = [7, "randomize", 30]
    inputs = ui_to_api(doc, Registry([Sampler]))["4:3"]["inputs"]
    assert (inputs["seed"], inputs["steps"]) == (7, "randomize")


def group_node_workflow():
    return {
        "nodes": [
            {"id": 1, "type": "LoadImage", "mode": 0, "order": 0, "pos": [0, 0],
             "outputs": [{"name": "IMAGE", "type": "IMAGE", "links": [5]}], "widgets_values": ["pic.png", "image"]},
            {"id": 50, "type": "workflow>invert_scale", "mode": 0, "order": 1, "pos": [300, 0],
             "inputs": [socket("image", "IMAGE", 5)], "outputs": [{"name": "IMAGE", "type": "IMAGE", "links": [6]}],
             "widgets_values": ["bilinear", 10, 12, "center"]},
            {**save(2, 6, 2, "grouped"), "pos": [600, 0]},
        ],
        "links": [[5, 1, 0, 50, 0, "IMAGE"], [6, 50, 0, 2, 0, "IMAGE"]],
        "extra": {"groupNodes": {"invert_scale": {
            "nodes": [{"type": "ImageInvert", "index": 0, "pos": [0, 0], "inputs": [socket("image", "IMAGE")],
                       "outputs": [{"name": "IMAGE", "type": "IMAGE", "links": []}]},
                      {"type": "ImageScale", "index": 1, "pos": [300, 0], "inputs": [socket("image", "IMAGE")],
                       "outputs": [{"name": "IMAGE", "type": "IMAGE", "links": []}],
                       "widgets_values": ["nearest-exact", 4, 6, "disabled"]}],
            "links": [[0, 0, 1, 0, 17, "IMAGE"]], "external": [[1, 0, "IMAGE"]]}}},
        "version": 0.4,
    }


def test_group_nodes_convert_like_the_editor():
    # What the stock frontend (comfyui-frontend-package 1.58.1) sent for this document: on
    # load it turns the group node into a subgraph, numbering the inner nodes (51, 52) and
    # then the new instance (53) after the highest id (no last_node_id here: 50); the values
    # and links are the group node's.
    api = ui_to_api(group_node_workflow(), registry())
    assert api == {
        "1": {"inputs": {"image": "pic.png"}, "class_type": "LoadImage", "_meta": {"title": "Load Image"}},
        "53:51": inverted(["1", 0]),
        "53:52": {"inputs": {"upscale_method": "bilinear", "width": 10, "height": 12, "crop": "center",
                             "image": ["53:51", 0]}, "class_type": "ImageScale", "_meta": {"title": "Upscale Image"}},
        "2": saved(["53:52", 0], "grouped"),
    }
    # After last_node_id; a second group node (first in the list) numbered first (the frontend: 63:61, 63:62 and
    # 53:51, 53:52 / 56:54, 56:55).
    doc = group_node_workflow()
    doc["last_node_id"] = 60
    assert sorted(ui_to_api(doc, registry())) == ["1", "2", "63:61", "63:62"]
    doc = group_node_workflow()
    second = {**doc["nodes"][1], "id": 40, "inputs": [socket("image", "IMAGE", 7)],
              "outputs": [{"name": "IMAGE", "type": "IMAGE", "links": [8]}],
              "widgets_values": ["nearest-exact", 20, 22, "disabled"]}
    doc["nodes"][1:1] = [second]
    doc["nodes"].append({**save(3, 8, 3, "second"), "pos": [600, 300]})
    doc["links"] += [[7, 1, 0, 40, 0, "IMAGE"], [8, 40, 0, 3, 0, "IMAGE"]]
    api = ui_to_api(doc, registry())
    assert api["3"]["inputs"]["images"] == ["53:52", 0] and api["53:52"]["inputs"]["width"] == 20
    assert api["2"]["inputs"]["images"] == ["56:55", 0] and api["56:55"]["inputs"]["width"] == 10


def renumbered_workflow():
    """workflow() with ids that repeat: LoadImage is node 6 (as SCALE's inner ImageScale), and
    OUTER's inner instance is node 5 (as SCALE's inner ImageInvert)."""
    doc = workflow()
    doc["nodes"][0]["id"] = 6
    for entry in doc["links"]:
        if entry["origin_id"] == 1:
            entry["origin_id"] = 6
    outer = doc["definitions"]["subgraphs"][1]
    outer["nodes"][0]["id"] = 5
    for entry in outer["links"]:
        for end in ("origin_id", "target_id"):
            if entry[end] == 7:
                entry[end] = 5
    return doc


def test_inner_nodes_whose_ids_repeat_are_renumbered_as_the_editor_does():
    # What the stock frontend (comfyui-frontend-package 1.58.1) did with renumbered_workflow():
    # it renumbers, on load, each inner node whose id a root node or an earlier definition's
    # node has, to the next id after state.lastNodeId (31) and the ids seen so far; its
    # graphToPrompt then sent these ids.
    api = ui_to_api(renumbered_workflow(), registry())
    assert sorted(api) == sorted(["6", "10:5", "10:32", "11:5", "11:32", "30:33:5", "30:33:32", "20", "21", "31"])
    assert api["10:32"]["inputs"]["image"] == ["10:5", 0] and api["10:5"]["inputs"]["image"] == ["6", 0]
    assert api["30:33:32"]["inputs"]["image"] == ["30:33:5", 0] and api["30:33:32"]["inputs"]["width"] == 7
    assert api["20"]["inputs"]["images"] == ["10:32", 0] and api["31"]["inputs"]["images"] == ["30:33:32", 0]
    # Without a saved state, numbering goes on from the highest inner id seen so far, past
    # the ids taken (the frontend's ids for this document too).
    doc = renumbered_workflow()
    del doc["state"]
    assert sorted(ui_to_api(doc, registry())) == sorted(["6", "10:5", "10:7", "11:5", "11:7", "30:8:5", "30:8:7",
                                                         "20", "21", "31"])
    # Files of format 0.4 count from last_node_id (the frontend: 41, 42).
    doc["version"], doc["last_node_id"] = 0.4, 40
    doc["links"] = [[e["id"], e["origin_id"], e["origin_slot"], e["target_id"], e["target_slot"], e["type"]]
                    for e in doc["links"]]
    assert sorted(ui_to_api(doc, registry())) == sorted(["6", "10:5", "10:41", "11:5", "11:41", "30:42:5",
                                                         "30:42:41", "20", "21", "31"])


# -- bad input -----------------------------------------------------------------------------------


def test_missing_definition_names_the_instance():
    doc = workflow()
    doc["definitions"]["subgraphs"] = [outer_definition()]  # SCALE is gone
    with pytest.raises(WorkflowError, match=rf"subgraph instance 10 \(in the workflow\) uses the subgraph definition "
                                            rf"'{SCALE}', which the workflow does not define"):
        ui_to_api(doc, registry())
    doc["nodes"] = [n for n in doc["nodes"] if n["id"] not in (10, 11, 20, 21)]
    with pytest.raises(WorkflowError, match=r"subgraph instance 30:7 \(in subgraph instance 30\) uses"):
        ui_to_api(doc, registry())


def test_a_subgraph_that_contains_itself_is_refused():
    doc = workflow()
    scale = doc["definitions"]["subgraphs"][0]
    scale["nodes"].append({"id": 99, "type": OUTER, "mode": 0, "inputs": [], "outputs": []})
    with pytest.raises(WorkflowError, match=r"subgraph instance 30:7:99 contains itself: it is an instance of the "
                                            r"subgraph 'Nested'"):
        ui_to_api({**doc, "nodes": [doc["nodes"][0], doc["nodes"][3]]}, registry())
    # Directly, at the first level too.
    scale["nodes"][-1]["type"] = SCALE
    with pytest.raises(WorkflowError, match=r"subgraph instance 10:99 contains itself"):
        ui_to_api(doc, registry())


def test_a_promoted_widget_must_name_an_inner_input():
    # The editor (1.58.1) would drop such a promotion silently; nodeflow refuses the document
    # instead, naming the instance and the inner node, so that a broken file is not run with
    # a value the user never sees.
    doc = workflow()
    doc["nodes"][3]["widgets_values_named"] = {"height": 5}
    with pytest.raises(WorkflowError, match=r"subgraph instance 30 .* promotes a widget 'height' "
                                            r"\(widgets_values_named\), but its subgraph 'Nested' .* has no input"):
        ui_to_api(doc, registry())
    doc = workflow()
    doc["nodes"][1]["properties"] = {"proxyWidgets": [["6", "width"], ["6", "sharpness"]]}
    with pytest.raises(WorkflowError, match=r"subgraph instance 10 .* promotes the widget 'sharpness' of inner node 6 "
                                            r"\(ImageScale\) \(proxyWidgets\), but that node has no input"):
        ui_to_api(doc, registry())
    doc["nodes"][1]["properties"] = {"proxyWidgets": [["77", "width"]]}
    with pytest.raises(WorkflowError, match=r"subgraph instance 10 .* inner node 77 .* has no node 77"):
        ui_to_api(doc, registry())
    # Promotions that do name an inner input, and the editor's own widgets, are fine.
    doc["nodes"][1]["properties"] = {"proxyWidgets": [["6", "width"], ["-1", "width"], ["5", "$$preview"]]}
    assert ui_to_api(doc, registry()) == EXPECTED


def test_bad_subgraph_files_fail_cleanly_on_the_command_line(tmp_path):
    doc = workflow()
    doc["definitions"]["subgraphs"] = []
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(doc))
    run = subprocess.run([sys.executable, "-m", "nodeflow.cli", "validate", str(path)], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode != 0 and "Traceback" not in run.stderr
    assert "subgraph instance 10" in run.stderr + run.stdout
