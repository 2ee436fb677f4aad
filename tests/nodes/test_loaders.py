"""Checkpoint loaders on tiny checkpoints in the real layouts: diffusers folders listed and
loaded as one choice, CheckpointLoader's config deciding the prediction type."""

from __future__ import annotations

import pytest

import nodeflow.folders as folders_mod
from nodeflow import context as run_context
from nodeflow import default_registry, parse, validate
from nodeflow.models.testing import write_tiny_diffusers, write_tiny_sd1, write_tiny_sd2
from nodes.loaders import DiffusersLoader, LoadModel, LoadModelWithConfig, checkpoint_choices, config_choices


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    base = tmp_path_factory.mktemp("loaders")
    ckpts = base / "models" / "checkpoints"
    write_tiny_sd1(ckpts / "tiny_sd1.safetensors")
    write_tiny_sd2(ckpts / "sd2" / "tiny_sd2.safetensors")                     # detected as ε
    write_tiny_sd2(ckpts / "tiny_sd2_v.safetensors", v_prediction=True)        # detected as v
    write_tiny_diffusers(ckpts / "pipes" / "tiny_diffusers", "sd1")
    write_tiny_diffusers(base / "models" / "diffusers" / "other_pipe", "sd1", seed=4)
    configs = base / "models" / "configs"
    configs.mkdir(parents=True)
    (configs / "my-model.yaml").write_text("model:\n  target: ldm.models.diffusion.ddpm.LatentDiffusion\n"
                                           "  params:\n    parameterization: \"v\"  # v-prediction\n")
    (configs / "v1-inference.yaml").write_text("model:\n  params:\n    linear_start: 0.00085\n")
    saved = run_context.default()._folders
    folders_mod.configure(base)
    yield base
    run_context.default()._folders = saved


def test_diffusers_folders_are_one_choice_and_their_files_are_hidden(models):
    choices = checkpoint_choices()
    assert "pipes/tiny_diffusers" in choices and "other_pipe" in choices
    assert "tiny_sd1.safetensors" in choices and "sd2/tiny_sd2.safetensors" in choices
    assert not any(c.startswith("pipes/tiny_diffusers/") for c in choices), choices
    assert not any(part in c for c in choices for part in ("unet/", "vae/", "text_encoder/")), choices
    schema = default_registry().object_info("CheckpointLoaderSimple")["CheckpointLoaderSimple"]
    assert schema["input"]["required"]["ckpt_name"][0] == choices


def test_a_diffusers_choice_loads_like_a_checkpoint(models):
    model, clip, vae = LoadModel().run("pipes/tiny_diffusers")
    assert model.family == "sd1" and clip is not None and vae is not None
    other = LoadModel().run("other_pipe")[0]                      # from models/diffusers
    assert other.family == "sd1"
    assert LoadModel.fingerprint(ckpt_name="pipes/tiny_diffusers") is not None
    assert LoadModel.fingerprint(ckpt_name="pipes/tiny_diffusers") != LoadModel.fingerprint(ckpt_name="other_pipe")
    report = validate(parse({"1": {"class_type": "CheckpointLoaderSimple",
                                   "inputs": {"ckpt_name": "pipes/tiny_diffusers/unet"}}}), default_registry())
    assert any(e.type == "value_not_in_list" for e in report.errors)


def test_diffusers_loader_lists_models_diffusers(models):
    assert DiffusersLoader.inputs["model_path"].options_list() == ["other_pipe"]
    model, clip, vae = DiffusersLoader().run("other_pipe")
    assert model.family == "sd1" and clip is not None and vae is not None
    with pytest.raises(FileNotFoundError, match="other_pipe"):
        DiffusersLoader().run("missing")


def test_checkpoint_loader_config_sets_the_prediction_type(models):
    choices = config_choices()
    assert choices[:2] == ["my-model.yaml", "v1-inference.yaml"]          # found files first
    assert "v2-inference-v.yaml" in choices and choices.count("v1-inference.yaml") == 1
    eps_model = "sd2/tiny_sd2.safetensors"
    assert LoadModel().run(eps_model)[0].prediction_type == "eps"
    assert LoadModelWithConfig().run("v2-inference-v.yaml", eps_model)[0].prediction_type == "v"   # by name
    assert LoadModelWithConfig().run("v2-inference-v_fp32.yaml", eps_model)[0].prediction_type == "v"
    assert LoadModelWithConfig().run("my-model.yaml", eps_model)[0].prediction_type == "v"        # by its key
    # A config without "parameterization: v" means ε, even for a model detected as v.
    assert LoadModel().run("tiny_sd2_v.safetensors")[0].prediction_type == "v"
    assert LoadModelWithConfig().run("v1-inference.yaml", "tiny_sd2_v.safetensors")[0].prediction_type == "eps"
    assert LoadModelWithConfig().run("v2-inference.yaml", "tiny_sd2_v.safetensors")[0].prediction_type == "eps"
    # Another config is another cache key.
    assert LoadModelWithConfig.fingerprint(ckpt_name=eps_model, config_name="v2-inference.yaml") != \
        LoadModelWithConfig.fingerprint(ckpt_name=eps_model, config_name="v2-inference-v.yaml")


def test_checkpoint_loader_validates_with_any_listed_config(models):
    wf = {"1": {"class_type": "CheckpointLoader", "inputs": {"config_name": "my-model.yaml",
                                                            "ckpt_name": "tiny_sd1.safetensors"}}}
    assert not [e for e in validate(parse(wf), default_registry()).errors if e.type == "value_not_in_list"]
    wf["1"]["inputs"]["config_name"] = "nope.yaml"
    assert any(e.type == "value_not_in_list" for e in validate(parse(wf), default_registry()).errors)
