"""ControlNet and T2I-Adapter nodes in workflows on tiny models: ComfyUI's schemas, chaining,
areas, KSamplerAdvanced step ranges, the Canny node against kornia, patches composing (FreeU +
LoRA + ControlNet), bad input, and the control network's trip through the model manager."""

from __future__ import annotations

import pytest
import torch

import nodeflow.folders as folders_mod
from nodeflow import Executor, default_registry
from nodeflow import context as run_context
from nodeflow.models import devices, testing
from nodeflow.models.testing import save, write_tiny_adapter, write_tiny_controlnet, write_tiny_sd1


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    base = tmp_path_factory.mktemp("controlnet")
    write_tiny_sd1(base / "models" / "checkpoints" / "tiny_sd1.safetensors")
    write_tiny_controlnet(base / "models" / "controlnet" / "control_tiny_canny.safetensors", "sd1", seed=11)
    write_tiny_controlnet(base / "models" / "controlnet" / "control_tiny_depth.safetensors", "sd1", seed=12,
                          layout="diffusers")
    write_tiny_controlnet(base / "models" / "controlnet" / "control_tiny_xl.safetensors", "sdxl")
    write_tiny_adapter(base / "models" / "t2i_adapter" / "t2iadapter_tiny.safetensors", "full")
    g = torch.Generator().manual_seed(0)
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    save({f"{name}.lora_down.weight": torch.randn(2, 32, generator=g),
          f"{name}.lora_up.weight": torch.randn(32, 2, generator=g),
          f"{name}.alpha": torch.tensor(2.0)}, base / "models" / "loras" / "tiny_lora.safetensors")
    for name in ("input", "output", "temp"):
        (base / name).mkdir()
    image = torch.zeros(1, 64, 64, 3)
    image[:, 16:48, 16:48] = 1.0                                   # a white square: clear edges
    from PIL import Image

    Image.fromarray((image[0].numpy() * 255).astype("uint8")).save(base / "input" / "hint.png")
    saved = run_context.default()._folders
    folders_mod.configure(base)
    yield base, image
    run_context.default()._folders = saved


def workflow(*controls, sampler=None, model=("1", 0)):
    """txt2img with ``controls``: (node id, control net name, strength, start, end, hint node)."""
    wf = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny_sd1.safetensors"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red circle", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {"class_type": "KSampler", "inputs": {"model": list(model), "seed": 3, "steps": 4, "cfg": 4.0,
                                                   "sampler_name": "euler", "scheduler": "normal",
                                                   "positive": ["2", 0], "negative": ["3", 0],
                                                   "latent_image": ["4", 0], "denoise": 1.0}},
        "7": {"class_type": "SaveLatent", "inputs": {"samples": ["6", 0], "filename_prefix": "t"}},
    }
    if sampler is not None:
        wf["6"] = sampler
    pos, neg = ["2", 0], ["3", 0]
    for node, name, strength, start, end, hint in controls:
        wf[f"{node}l"] = {"class_type": "ControlNetLoader", "inputs": {"control_net_name": name}}
        wf[node] = {"class_type": "ControlNetApplyAdvanced",
                    "inputs": {"positive": pos, "negative": neg, "control_net": [f"{node}l", 0], "image": hint,
                               "strength": strength, "start_percent": start, "end_percent": end}}
        pos, neg = [node, 0], [node, 1]
    wf["6"]["inputs"]["positive"], wf["6"]["inputs"]["negative"] = pos, neg
    return wf


def run(wf, image):
    wf = {**wf, "h": {"class_type": "LoadImage", "inputs": {"image": "hint.png"}}}
    return Executor(default_registry()).run(wf)


def samples(result):
    assert result.ok, result.error
    return result.output("6")["samples"]


def test_schemas_are_comfyuis():
    info = default_registry().object_info()
    apply = info["ControlNetApplyAdvanced"]["input"]
    assert list(apply["required"]) == ["positive", "negative", "control_net", "image", "strength", "start_percent",
                                       "end_percent"]
    assert list(apply["optional"]) == ["vae"]
    assert apply["required"]["start_percent"][1]["step"] == 0.001
    assert info["ControlNetApplyAdvanced"]["output_name"] == ["positive", "negative"]
    assert list(info["ControlNetApply"]["input"]["required"]) == ["conditioning", "control_net", "image", "strength"]
    assert list(info["DiffControlNetLoader"]["input"]["required"]) == ["model", "control_net_name"]
    canny = info["Canny"]["input"]["required"]
    assert list(canny) == ["image", "low_threshold", "high_threshold"]
    assert canny["low_threshold"][1]["default"] == 0.4 and canny["high_threshold"][1]["default"] == 0.8


def test_controlnets_chain_and_change_the_picture(base):
    _, image = base
    hint = ["c", 0]
    edges = {"c": {"class_type": "Canny", "inputs": {"image": ["h", 0], "low_threshold": 0.4, "high_threshold": 0.8}}}
    plain = samples(run(workflow(), image))
    one = samples(run({**workflow(("10", "control_tiny_canny.safetensors", 1.0, 0.0, 1.0, hint)), **edges}, image))
    two = samples(run({**workflow(("10", "control_tiny_canny.safetensors", 1.0, 0.0, 1.0, hint),
                                  ("11", "control_tiny_depth.safetensors", 0.7, 0.0, 0.5, ["h", 0])), **edges}, image))
    adapter = samples(run({**workflow(("10", "t2iadapter_tiny.safetensors", 1.0, 0.0, 1.0, hint)), **edges}, image))
    for changed in (one, two, adapter):
        assert not torch.allclose(changed, plain, atol=1e-3)
    assert not torch.allclose(one, two, atol=1e-3)
    zero = samples(run({**workflow(("10", "control_tiny_canny.safetensors", 0.0, 0.0, 1.0, hint)), **edges}, image))
    assert torch.equal(zero, plain)


def test_controlnet_with_an_area_and_advanced_step_ranges(base):
    _, image = base
    wf = workflow(("10", "control_tiny_canny.safetensors", 1.0, 0.0, 1.0, ["h", 0]))
    wf["20"] = {"class_type": "ConditioningSetAreaPercentage",
                "inputs": {"conditioning": ["2", 0], "width": 0.5, "height": 1.0, "x": 0.5, "y": 0.0, "strength": 1.0}}
    wf["21"] = {"class_type": "ConditioningCombine", "inputs": {"conditioning_1": ["2", 0],
                                                                "conditioning_2": ["20", 0]}}
    wf["10"]["inputs"]["positive"] = ["21", 0]
    assert samples(run(wf, image)).shape == (1, 4, 8, 8)
    advanced = {"class_type": "KSamplerAdvanced",
                "inputs": {"model": ["1", 0], "add_noise": "enable", "noise_seed": 3, "steps": 4, "cfg": 4.0,
                           "sampler_name": "euler", "scheduler": "normal", "positive": ["2", 0],
                           "negative": ["3", 0], "latent_image": ["4", 0], "start_at_step": 2, "end_at_step": 4,
                           "return_with_leftover_noise": "disable"}}
    plain = samples(run(workflow(sampler=advanced), image))
    # a ControlNet active only in the first half of the schedule does nothing in steps 2–4
    late = workflow(("10", "control_tiny_canny.safetensors", 1.0, 0.0, 0.4, ["h", 0]), sampler=advanced)
    assert torch.allclose(samples(run(late, image)), plain, atol=1e-6)
    early = workflow(("10", "control_tiny_canny.safetensors", 1.0, 0.0, 1.0, ["h", 0]), sampler=advanced)
    assert not torch.allclose(samples(run(early, image)), plain, atol=1e-3)


def test_freeu_lora_and_controlnet_compose(base):
    _, image = base
    cn = ("10", "control_tiny_canny.safetensors", 1.0, 0.0, 1.0, ["h", 0])
    lora = {"model": ["1", 0], "lora_name": "tiny_lora.safetensors", "strength_model": 1.0}
    freeu = {"model": ["30", 0], "b1": 1.1, "b2": 1.2, "s1": 0.9, "s2": 0.2}
    patched = {"30": {"class_type": "LoraLoaderModelOnly", "inputs": lora},
               "31": {"class_type": "FreeU", "inputs": freeu}}
    all_three = samples(run({**workflow(cn, model=("31", 0)), **patched}, image))
    without_freeu = samples(run({**workflow(cn, model=("30", 0)), **patched}, image))
    without_lora = {**patched, "31": {**patched["31"], "inputs": {**patched["31"]["inputs"], "model": ["1", 0]}}}
    freeu_cn = samples(run({**workflow(cn, model=("31", 0)), **without_lora}, image))
    assert not torch.allclose(all_three, without_freeu, atol=1e-3)
    assert not torch.allclose(all_three, freeu_cn, atol=1e-3)


def test_a_controlnet_for_another_family_is_named(base):
    _, image = base
    result = run(workflow(("10", "control_tiny_xl.safetensors", 1.0, 0.0, 1.0, ["h", 0])), image)
    assert not result.ok
    message = result.error["exception_message"]
    assert "control_tiny_xl.safetensors" in message and "SD" in message and "sd1" in message


def test_the_control_network_goes_through_the_model_manager(base, monkeypatch):
    _, image = base
    loads = []
    manager = devices.model_manager()  # the run context's (nodeflow.run runs in the default one)
    original = manager.load
    monkeypatch.setattr(manager, "load", lambda module, device: (loads.append((type(module).__name__, device)),
                                                                 original(module, device))[1])
    samples(run(workflow(("10", "control_tiny_canny.safetensors", 1.0, 0.0, 1.0, ["h", 0])), image))
    kinds = [k for k, _ in loads]
    assert "ControlNet" in kinds and "UNet" in kinds
    # each ControlNet load comes right before the UNet's, on the same device
    for i, (kind, device) in enumerate(loads):
        if kind == "ControlNet":
            assert loads[i + 1] == ("UNet", device)


def test_canny_matches_kornia(base):
    kornia = pytest.importorskip("kornia")
    from nodes.controlnet import Canny

    g = torch.Generator().manual_seed(0)
    image = torch.nn.functional.interpolate(torch.rand(2, 3, 8, 6, generator=g), size=(64, 48), mode="bilinear")
    for low, high in ((0.4, 0.8), (0.1, 0.2), (0.05, 0.3)):
        (ours,) = Canny().run(image.movedim(1, -1), low, high)
        theirs = kornia.filters.canny(image, low, high)[1].repeat(1, 3, 1, 1).movedim(1, -1)
        assert torch.equal(ours, theirs)
    assert Canny.validate_inputs(low_threshold=0.9, high_threshold=0.2)
    edges = Canny().run(base[1], 0.4, 0.8)[0]
    assert edges.sum() > 0 and set(edges.unique().tolist()) <= {0.0, 1.0}


def test_old_apply_reaches_the_negative_side(base):
    from nodeflow.models.controlnet import ControlHint
    from nodeflow.sampling import CFGDenoiser, DiscreteSchedule
    from nodes.controlnet import ControlNetApply, LoadControlNet

    _, image = base
    (control,) = LoadControlNet().run("control_tiny_canny.safetensors")
    pos = [[torch.zeros(1, 77, 32), {}]]
    neg = [[torch.ones(1, 77, 32), {}]]
    (applied,) = ControlNetApply().run(pos, control, image, 0.8)
    assert isinstance(applied[0][1]["control"], ControlHint) and "control" not in pos[0][1]
    den = CFGDenoiser(tiny_model(), DiscreteSchedule.scaled_linear(), applied, neg, 3.0, (1, 4, 8, 8), "cpu")
    negative = [e for e in den.entries if e.uncond]
    assert negative[0].meta.get("control") is applied[0][1]["control"]


def tiny_model():
    from nodeflow.models.diffusion import DiffusionModel
    from nodeflow.models.unet import UNet

    return DiffusionModel(UNet(testing.tiny_unet_config("sd1")), family="sd1", device=torch.device("cpu"))


def test_ui_format_widgets_land_in_comfyuis_order(base):
    """A UI-format graph as ComfyUI's editor saves these nodes: widgets_values are positional."""
    from nodeflow import parse, validate
    from nodeflow.uiformat import ui_to_api

    def node(id_, type_, widgets, inputs=(), outputs=()):
        return {"id": id_, "type": type_, "mode": 0, "order": id_, "widgets_values": widgets,
                "inputs": [{"name": n, "type": t, "link": link} for n, t, link in inputs],
                "outputs": [{"name": n, "type": t, "links": links, "slot_index": i}
                            for i, (n, t, links) in enumerate(outputs)]}

    graph = {"nodes": [
        node(1, "ControlNetLoader", ["control_tiny_canny.safetensors"], outputs=[("CONTROL_NET", "CONTROL_NET", [1])]),
        node(2, "LoadImage", ["hint.png", "image"], outputs=[("IMAGE", "IMAGE", [2]), ("MASK", "MASK", [])]),
        node(3, "Canny", [0.3, 0.7], inputs=[("image", "IMAGE", 2)], outputs=[("IMAGE", "IMAGE", [3])]),
        node(4, "CLIPLoader", ["clip_l.safetensors", "stable_diffusion", "default"],
             outputs=[("CLIP", "CLIP", [])]),
        node(5, "ControlNetApplyAdvanced", [0.8, 0.1, 0.9],
             inputs=[("positive", "CONDITIONING", None), ("negative", "CONDITIONING", None),
                     ("control_net", "CONTROL_NET", 1), ("image", "IMAGE", 3), ("vae", "VAE", None)],
             outputs=[("positive", "CONDITIONING", []), ("negative", "CONDITIONING", [])]),
        node(6, "FreeU_V2", [1.3, 1.4, 0.9, 0.2], inputs=[("model", "MODEL", None)], outputs=[("MODEL", "MODEL", [])]),
    ], "links": [[1, 1, 0, 5, 2, "CONTROL_NET"], [2, 2, 0, 3, 0, "IMAGE"], [3, 3, 0, 5, 3, "IMAGE"]]}
    api = ui_to_api(graph, default_registry())
    assert api["5"]["inputs"]["strength"] == 0.8 and api["5"]["inputs"]["start_percent"] == 0.1
    assert api["5"]["inputs"]["end_percent"] == 0.9
    assert api["3"]["inputs"]["low_threshold"] == 0.3 and api["3"]["inputs"]["high_threshold"] == 0.7
    assert api["4"]["inputs"] == {"clip_name": "clip_l.safetensors", "type": "stable_diffusion", "device": "default"}
    assert [api["6"]["inputs"][k] for k in ("b1", "b2", "s1", "s2")] == [1.3, 1.4, 0.9, 0.2]
    report = validate(parse({"1": api["1"], "2": api["2"], "3": {**api["3"]},
                             "9": {"class_type": "PreviewImage", "inputs": {"images": ["3", 0]}}}),
                      default_registry())
    assert report.complete, report.summary()


def test_patch_inputs_out_of_range_are_named(base):
    from nodeflow import parse, validate

    wf = workflow(model=("30", 0))
    wf["30"] = {"class_type": "FreeU", "inputs": {"model": ["1", 0], "b1": 12.0, "b2": 1.2, "s1": 0.9, "s2": 0.2}}
    wf["10"] = {"class_type": "ControlNetApplyAdvanced", "inputs": {"positive": ["2", 0], "negative": ["3", 0],
                                                                    "control_net": ["10l", 0], "image": ["h", 0],
                                                                    "strength": 1.0, "start_percent": 0.0,
                                                                    "end_percent": 1.5}}
    wf["10l"] = {"class_type": "ControlNetLoader", "inputs": {"control_net_name": "control_tiny_canny.safetensors"}}
    wf["h"] = {"class_type": "LoadImage", "inputs": {"image": "hint.png"}}
    report = validate(parse(wf), default_registry())
    text = report.summary()
    assert "node 30 (FreeU), input 'b1'" in text and "node 10 (ControlNetApplyAdvanced), input 'end_percent'" in text
