"""Issue 14, part two: the newer ComfyUI core nodes (switch, custom combo, text and regex nodes,
lists and rebatching, resize/stitch/pad, resolution and seed), each against results worked out
by hand from ComfyUI's documented behaviour; the switch and the lists also in whole prompts, and
ResizeImageMaskNode's dynamic widgets from an editor file."""

import time

import pytest
import torch

import nodeflow
from nodeflow.uiformat import ui_to_api
from nodes.core_utils import ResolutionSelector
from nodes.image_resize import ImageScaleToMaxDimension, ImageStitch, ResizeAndPadImage, resize_by_rule
from nodes.lists import GetItemFromList, RebatchImages, RebatchLatents
from nodes.logic import ComfySwitchNode
from nodes.text import (
    JsonExtractString,
    RegexExtract,
    RegexMatch,
    RegexReplace,
    StringFormat,
    StringReplace,
    StringSubstring,
)


def image(b, h, w, value=0.5, c=3):
    return torch.full((b, h, w, c), value)


# -- text -----------------------------------------------------------------------------------------


def test_text_nodes():
    assert StringReplace().run("a-b-c", "-", "+") == ("a+b+c",)
    assert StringReplace().run("abc", "", "x") == ("abc",)  # not "xaxbxcx"
    assert StringSubstring().run("nodeflow", 1, -1) == ("odeflo",)
    assert StringFormat().run("{a} x {b:.1f}", **{"values.a": 3, "values.b": 2.25}) == ("3 x 2.2",)
    assert JsonExtractString().run('say ```json\n{"prompt": "a cat", "n": 2}\n```', "prompt") == ("a cat",)
    assert JsonExtractString().run("{broken {\"n\": 2}", "n") == ("2",)
    assert JsonExtractString().run("no json", "n") == ("",)


def test_string_format_refuses_attribute_access_and_huge_padding():
    with pytest.raises(ValueError, match="reaches into a value"):
        StringFormat().run("{a.__class__}", **{"values.a": 1})
    with pytest.raises(ValueError, match="more than 10000 characters"):
        StringFormat().run("{a:>999999999}", **{"values.a": 1})


def test_regex_nodes_as_the_templates_use_them():
    text = "Verse one\n---\nChorus here"
    # From ComfyUI's ACE-Step template: the part before and after a --- line.
    assert RegexExtract().run(text, r"(?sm)^(.*?)^---$(.*)", "First Group", True, False, False, 1) == ("Verse one\n",)
    assert RegexExtract().run(text, r"(?s)(?<=\n---\n)([\s\S]*)$", "First Group", True, False, False, 1) \
        == ("Chorus here",)
    assert RegexExtract().run("a1 b22 c333", r"[a-z](\d+)", "All Groups", True, False, False, 1) == ("1\n22\n333",)
    assert RegexExtract().run("a1 b22", r"[a-z]\d+", "All Matches", True, False, False, 1) == ("a1\nb22",)
    assert RegexExtract().run("abc", "(", "First Match", True, False, False, 1) == ("",)  # bad pattern: empty
    assert RegexReplace().run("```json\n{}\n```", r"^```(?:json)?\s*\n?", "", False, False, False, 1) \
        == ("{}\n```",)
    assert RegexReplace().run("Hello {user_input}!", "{user_input}", "Ann", True, False, False, 0) == ("Hello Ann!",)
    assert RegexMatch().run("Cat", "cat", True, False, False) == (True,)


def test_regex_extract_all_groups_needs_a_pattern_with_groups():
    # ComfyUI's "All Groups" only takes matches of a pattern that has groups, so a pattern
    # without any gives "" even for group 0 (checked against ComfyUI 0.8.0).
    assert RegexExtract().run("Hello World", "l+", "All Groups", True, False, False, 0) == ("",)
    assert RegexExtract().run("a-b c-d", r"(\w)-(\w)", "All Groups", True, False, False, 0) == ("a-b\nc-d",)
    assert RegexExtract().run("a-b c-d", r"(\w)-(\w)", "All Groups", True, False, False, 2) == ("b\nd",)
    assert RegexExtract().run("Hello World", "l+", "First Group", True, False, False, 0) == ("ll",)


def test_a_catastrophic_pattern_fails_in_bounded_time():
    start = time.monotonic()
    with pytest.raises(ValueError, match="took more than"):
        RegexMatch().run("a" * 40 + "b", r"(a|aa)+$", False, False, False)
    assert time.monotonic() - start < 10
    with pytest.raises(ValueError, match="limit is 1,000,000"):
        RegexMatch().run("a" * 1_000_001, "a", True, False, False)


# -- logic and lists ------------------------------------------------------------------------------


def test_switch_in_a_prompt_runs_only_the_chosen_branch(base):
    prompt = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
        "2": {"class_type": "EmptyImage", "inputs": {"width": 16, "height": 4, "batch_size": 1, "color": 0}},
        "3": {"class_type": "ComfySwitchNode", "inputs": {"switch": True, "on_false": ["1", 0], "on_true": ["2", 0]}},
        "4": {"class_type": "GetImageSize", "inputs": {"image": ["3", 0]}},
        "5": {"class_type": "PreviewAny", "inputs": {"source": ["4", 0]}},
    }
    result = nodeflow.run(prompt)
    assert result.ok and result.output("5") == "16"
    assert "1" not in result.executed and "2" in result.executed


def test_switch_with_no_branch_connected_gives_none():
    assert ComfySwitchNode().run(True) == (None,)
    assert ComfySwitchNode().check_lazy_status(False, on_false=None) == ["on_false"]
    assert ComfySwitchNode().check_lazy_status(False, on_false="ready", on_true=None) == []


def test_create_list_then_get_item_and_per_item_runs(base):
    prompt = {
        "1": {"class_type": "PrimitiveString", "inputs": {"value": "first"}},
        "2": {"class_type": "PrimitiveString", "inputs": {"value": "second"}},
        "3": {"class_type": "CreateList", "inputs": {"inputs.input0": ["1", 0], "inputs.input1": ["2", 0]}},
        "4": {"class_type": "StringConcatenate", "inputs": {"string_a": ["3", 0], "string_b": "!", "delimiter": ""}},
        "5": {"class_type": "GetItemFromList", "inputs": {"list": ["4", 0], "index": -1}},
        "6": {"class_type": "PreviewAny", "inputs": {"source": ["5", 0]}},
        "7": {"class_type": "PreviewAny", "inputs": {"source": ["4", 0]}},
    }
    result = nodeflow.run(prompt)
    assert result.ok
    assert result.output("4") == ["first!", "second!"]  # StringConcatenate ran once per item
    assert result.output("6") == "second!"
    assert result.ui["7"] == {"text": ["first!", "second!"]}


def test_get_item_from_list_errors_name_the_range():
    with pytest.raises(ValueError, match=r"index 5 is out of range for a list of 2 item\(s\)"):
        GetItemFromList().run(["a", "b"], [5])
    assert GetItemFromList().run([["x", "y", "z"]], [1]) == ("y",)  # a single list value


def test_rebatch_images_regroups_frames_and_splits_on_size():
    a, b, c = image(3, 4, 4, 0.1), image(2, 4, 4, 0.2), image(1, 8, 8, 0.3)
    (batches,) = RebatchImages().run([a, b, c], [2])
    assert [tuple(x.shape) for x in batches] == [(2, 4, 4, 3), (2, 4, 4, 3), (1, 4, 4, 3), (1, 8, 8, 3)]
    assert batches[1][0, 0, 0, 0].item() == pytest.approx(0.1) and batches[1][1, 0, 0, 0].item() == pytest.approx(0.2)


def test_rebatch_latents_keeps_batch_index_and_drops_all_ones_masks():
    first = {"samples": torch.zeros(3, 4, 2, 2)}
    second = {"samples": torch.ones(1, 4, 2, 2), "batch_index": [7], "noise_mask": torch.zeros(1, 16, 16)}
    (batches,) = RebatchLatents().run([first, second], [2])
    assert [b["batch_index"] for b in batches] == [[0, 1], [2, 7]]
    assert "noise_mask" not in batches[0]
    assert batches[1]["noise_mask"].shape == (2, 1, 16, 16)
    assert batches[1]["noise_mask"][0].min().item() == 1.0 and batches[1]["noise_mask"][1].max().item() == 0.0


# -- pictures -------------------------------------------------------------------------------------


@pytest.mark.parametrize("rule, settings, size", [
    ("scale dimensions", {"width": 40, "height": 0, "crop": "center"}, (20, 40)),
    ("scale by multiplier", {"multiplier": 0.5}, (15, 30)),
    ("scale longer dimension", {"longer_size": 30}, (15, 30)),
    ("scale shorter dimension", {"shorter_size": 10}, (10, 20)),
    ("scale width", {"width": 30}, (15, 30)),
    ("scale height", {"height": 15}, (15, 30)),
    ("scale total pixels", {"megapixels": 200 / (1024 * 1024)}, (10, 20)),
    ("scale to multiple", {"multiple": 16}, (16, 48)),
])
def test_resize_rules(rule, settings, size):
    out = resize_by_rule(image(1, 30, 60), rule, settings, "bilinear")
    assert tuple(out.shape[1:3]) == size
    mask = resize_by_rule(torch.ones(2, 30, 60), rule, settings, "nearest-exact")  # masks too
    assert tuple(mask.shape) == (2, *size)


def test_resize_match_size():
    out = resize_by_rule(image(1, 30, 60), "match size", {"match": torch.zeros(1, 7, 9), "crop": "center"}, "area")
    assert tuple(out.shape) == (1, 7, 9, 3)


def test_resize_image_mask_from_an_editor_file_takes_the_chosen_options_widgets(base):
    """The editor stores a dynamic combo's chosen option's widgets right after it."""
    workflow = {"nodes": [
        {"id": 1, "type": "EmptyImage", "widgets_values": [60, 30, 1, 0]},
        {"id": 2, "type": "ResizeImageMaskNode", "inputs": [{"name": "input", "type": "IMAGE", "link": 1}],
         "widgets_values": ["scale longer dimension", 20, "lanczos"]},
        {"id": 3, "type": "GetImageSize", "inputs": [{"name": "image", "type": "IMAGE", "link": 2}]},
        {"id": 4, "type": "PreviewAny", "inputs": [{"name": "source", "type": "*", "link": 3}]}],
        "links": [[1, 1, 0, 2, 0, "IMAGE"], [2, 2, 0, 3, 0, "IMAGE"], [3, 3, 1, 4, 0, "INT"]]}
    prompt = ui_to_api(workflow)
    assert prompt["2"]["inputs"] == {"resize_type": "scale longer dimension", "resize_type.longer_size": 20,
                                     "scale_method": "lanczos", "input": ["1", 0]}
    assert nodeflow.run(prompt).output("4") == "10"  # 60 × 30 -> 20 × 10


def test_resize_image_mask_checks_the_chosen_options_inputs():
    prompt = {"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
              "2": {"class_type": "ResizeImageMaskNode", "inputs": {
                  "input": ["1", 0], "resize_type": "scale by multiplier", "resize_type.multiplier": 99.0,
                  "scale_method": "area"}},
              "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}}}
    with pytest.raises(nodeflow.ValidationFailed) as info:
        nodeflow.run(prompt)
    assert "node 2 (ResizeImageMaskNode), input 'resize_type.multiplier'" in str(info.value)
    del prompt["2"]["inputs"]["resize_type.multiplier"]
    with pytest.raises(nodeflow.ValidationFailed, match="'resize_type.multiplier': Required input is missing"):
        nodeflow.run(prompt)


def test_resize_and_pad_centres_the_image():
    out = ResizeAndPadImage().run(image(1, 10, 20, 0.5), 20, 20, "black", "nearest-exact")[0]
    assert out.shape == (1, 20, 20, 3)
    assert out[0, 0, 0, 0].item() == 0.0 and out[0, 10, 10, 0].item() == 0.5  # rows 5..14 hold the image
    assert out[0, 4, 10, 0].item() == 0.0 and out[0, 5, 10, 0].item() == 0.5


def test_scale_to_max_dimension():
    assert ImageScaleToMaxDimension().run(image(1, 30, 60), "area", 20)[0].shape == (1, 10, 20, 3)


def test_image_stitch():
    a, b = image(1, 4, 4, 0.0), image(2, 8, 4, 1.0, c=4)
    out = ImageStitch().run(a, "right", True, 2, "red", b)[0]
    # b scaled to a's height (4 × 2), a's last image repeated, a strip of 2, a gets alpha 1.
    assert out.shape == (2, 4, 4 + 2 + 2, 4)
    assert out[0, 0, 4].tolist() == [1.0, 0.0, 0.0, 1.0]
    left = ImageStitch().run(a, "up", False, 0, "white", image(1, 2, 6, 1.0))[0]
    assert left.shape == (1, 6, 6, 3) and left[0, 3, 0, 0].item() == 1.0 and left[0, 3, 1, 0].item() == 0.0
    assert ImageStitch().run(a, "down", True, 0, "white")[0] is a


@pytest.mark.parametrize("ratio, mp, multiple, minimum, expected", [
    ("1:1 (Square)", 1.0, 8, 256, (1024, 1024)),
    ("16:9 (Widescreen)", 1.0, 8, 256, (1368, 768)),   # 16·√(2²⁰/144) = 1365.3 -> 1368; 768
    ("9:16 (Portrait Widescreen)", 0.1, 64, 256, (256, 448)),   # 242.8 -> 256, 431.7 -> 448
    # 240 × 432 is under 512: the smallest 9k × 16k with k a multiple of 8 and 9k >= 512 is k = 64.
    ("9:16 (Portrait Widescreen)", 0.1, 8, 512, (576, 1024)),
])
def test_resolution_selector(ratio, mp, multiple, minimum, expected):
    assert ResolutionSelector().run(ratio, mp, multiple, minimum) == expected
