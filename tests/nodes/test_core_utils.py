"""ComfyUI's newer model-free utility nodes: the math expression (and its safe evaluator),
number conversion, text joining, previews and image batching; ComfyUI's negative
LatentFromBatch index; and their use in an API prompt as ComfyUI's templates write it."""

import json

import pytest
import torch

import nodeflow
from nodes._mathexpr import ExpressionError, evaluate
from nodes.core_utils import (
    BatchImagesNode,
    ComfyMathExpression,
    ComfyNumberConvert,
    ImageCompare,
    MaskPreview,
    PreviewAny,
    StringConcatenate,
)
from nodes.latent import LatentFromBatch


def math(expression, **values):
    return ComfyMathExpression().run(expression, **{f"values.{k}": v for k, v in values.items()})


@pytest.mark.parametrize("expression, values, expected", [
    ("a + b", {"a": 2, "b": 3.5}, (5.5, 5, True)),
    ("a * b + 1", {"a": 3, "b": 25}, (76.0, 76, True)),
    # From ComfyUI's LTX templates: frames for a duration, a multiple of 17 plus 5.
    ("max(5, round(a * 24)) + (5 - (max(5, round(a * 24)) % 17)) % 17", {"a": 3.0}, (73.0, 73, True)),
    ("a > 2048", {"a": 4096}, (1.0, 1, True)),
    ("a > 2048", {"a": 1024}, (0.0, 0, False)),
    ("sum(values) / len_ if False else sum(values) / 2", {"a": 2, "b": 4}, (3.0, 3, True)),
    ("1 + floor(a*b/8)*8", {"a": 5, "b": 25}, (121.0, 121, True)),
    ("-a ** 2 if not b else sqrt(a)", {"a": 16, "b": True}, (4.0, 4, True)),
    ("2 ** 10 - pow(2, 3) + abs(-1) - 7 // 2 + 7 % 4", {}, (1017.0, 1017, True)),
])
def test_math_expression(expression, values, expected):
    got = math(expression, **values)
    assert got == expected and type(got[0]) is float and type(got[1]) is int and type(got[2]) is bool


@pytest.mark.parametrize("expression, message", [
    ("__import__('os').system('true')", "only these functions can be called"),
    ("a.__class__", "attribute access is not allowed"),
    ("values[0]", "indexing is not allowed"),
    ("[x for x in values]", "a comprehension is not allowed"),
    ("(lambda: 1)()", "only these functions can be called"),
    ("9 ** 9 ** 9", "exponent 387420489 exceeds the maximum of 4000"),
    ("pow(10, 5000)", "exceeds the maximum of 4000"),
    ("(2 ** 4000) * (2 ** 4000)", "beyond 4096 bits"),
    ("'x' * 3", "is not a number"),
    ("c + 1", "unknown name 'c'"),
    ("1 / 0", "division by zero"),
    ("", "empty"),
    ("a +", "not a valid expression"),
    ("1" * 3000, "longer than 2000"),
])
def test_math_expression_refuses_what_is_not_arithmetic(expression, message):
    with pytest.raises(ValueError, match=message):
        math(expression, a=1)


def test_evaluator_never_runs_code(tmp_path):
    marker = tmp_path / "ran"
    with pytest.raises(ExpressionError):
        evaluate(f"open({str(marker)!r}, 'w')", {})
    assert not marker.exists()


def test_number_convert_and_concatenate():
    assert ComfyNumberConvert().run("3.7") == (3.7, 3)
    assert ComfyNumberConvert().run(" -12 ") == (-12.0, -12)
    assert ComfyNumberConvert().run(True) == (1.0, 1) and ComfyNumberConvert().run(2.9) == (2.9, 2)
    with pytest.raises(ValueError, match="cannot convert the text 'abc'"):
        ComfyNumberConvert().run("abc")
    assert StringConcatenate().run("a photo", "of a cat", " ") == ("a photo of a cat",)


def test_preview_any_shows_text():
    result = PreviewAny().run({"a": [1, 2]})
    assert result.values == (json.dumps({"a": [1, 2]}, indent=4),) and result.ui == {"text": [result.values[0]]}
    assert PreviewAny().run(7).ui == {"text": ["7"]} and PreviewAny().run("hi").values == ("hi",)


def test_mask_preview_and_image_compare_write_previews(base):
    mask = torch.zeros(1, 4, 5)
    mask[0, 1, 2] = 1.0
    result = MaskPreview().run(mask)
    assert result.values[0] is mask
    (entry,) = result.ui["images"]
    assert entry["type"] == "temp" and (base.temp / entry["filename"]).is_file()
    compare = ImageCompare().run(torch.rand(1, 4, 4, 3), torch.rand(2, 4, 4, 3))
    assert len(compare.ui["a_images"]) == 1 and len(compare.ui["b_images"]) == 2


def test_batch_images_in_input_order():
    a, b = torch.zeros(1, 4, 6, 3), torch.ones(2, 2, 3, 4)
    (batch,) = BatchImagesNode().run(**{"images.image0": a, "images.image1": b})
    assert batch.shape == (3, 4, 6, 4)
    assert torch.all(batch[0, ..., :3] == 0) and torch.all(batch[0, ..., 3] == 1)
    assert torch.allclose(batch[1:], torch.ones(1))
    with pytest.raises(ValueError, match="at least one image"):
        BatchImagesNode().run()


def test_batch_images_crops_the_centre_to_the_first_aspect_before_resizing():
    # ComfyUI's rule (checked against ComfyUI 0.8.0): an image of another size is cropped in
    # the centre to the first image's aspect ratio, then resized bilinearly. A 4x4 image
    # joining a 2x4 (H x W) one keeps its rows 1 and 2 unchanged (no averaging of rows).
    first = torch.zeros(1, 2, 4, 3)
    rows = torch.arange(4.0).view(1, 4, 1, 1).expand(1, 4, 4, 3) / 4
    (batch,) = BatchImagesNode().run(**{"images.image0": first, "images.image1": rows})
    assert batch.shape == (2, 2, 4, 3)
    assert torch.allclose(batch[1], rows[0, 1:3])


def test_latent_from_batch_counts_negative_indices_from_the_end():
    lat = {"samples": torch.arange(4.0).reshape(4, 1, 1, 1)}
    (part,) = LatentFromBatch().run(lat, batch_index=-1, length=3)
    assert part["samples"].flatten().tolist() == [3.0] and part["batch_index"] == [3]


def test_template_style_prompt_runs(base):
    """Primitive -> math expression -> preview, as ComfyUI's templates wire them."""
    prompt = {
        "1": {"class_type": "PrimitiveFloat", "inputs": {"value": 3.0}},
        "2": {"class_type": "ComfyMathExpression",
              "inputs": {"expression": "max(5, round(a * 24)) + 1", "values.a": ["1", 0]}},
        "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 1]}},
        "4": {"class_type": "StringConcatenate", "inputs": {"string_a": "frames:", "string_b": "n", "delimiter": " "}},
        "5": {"class_type": "PreviewAny", "inputs": {"source": ["4", 0]}},
    }
    result = nodeflow.run(prompt, executor=nodeflow.Executor(nodeflow.default_registry()))
    assert result.ok, result.error
    assert result.ui["3"] == {"text": ["73"]} and result.ui["5"] == {"text": ["frames: n"]}
    bad = dict(prompt, **{"2": {"class_type": "ComfyMathExpression", "inputs": {"expression": "a.__class__",
                                                                                 "values.a": ["1", 0]}}})
    failed = nodeflow.run(bad, executor=nodeflow.Executor(nodeflow.default_registry()))
    assert failed.status == "error" and "attribute access is not allowed" in str(failed.error)
