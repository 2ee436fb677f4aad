"""Run-time folders: the nodeflow.json config is checked, and model listings survive link cycles."""

import json
import os
from pathlib import Path

import pytest

from nodeflow.folders import Folders


def _config(tmp_path, data):
    (tmp_path / "nodeflow.json").write_text(json.dumps(data))


def test_config_moves_folders_and_adds_model_folders(tmp_path):
    _config(tmp_path, {"output_dir": "out", "models": {"checkpoints": ["/mnt/big"], "vae": "/mnt/vae"}})
    f = Folders.from_base(tmp_path)
    assert f.output == tmp_path / "out"
    assert f.model_dirs("checkpoints") == [tmp_path / "models" / "checkpoints", Path("/mnt/big")]
    assert f.model_dirs("vae")[1].as_posix() == "/mnt/vae"          # one folder as a plain string


@pytest.mark.parametrize("data, message", [
    ([1], "must hold a JSON object"),
    ({"outputdir": "x"}, "unknown key 'outputdir' (did you mean 'output_dir'?)"),
    ({"models": {"checkpoint": ["x"]}}, "unknown model kind 'checkpoint' (did you mean 'checkpoints'?)"),
    ({"models": ["x"]}, "'models' must be an object"),
    ({"models": {"vae": [1]}}, "models.vae must be a folder or a list of folders"),
    ({"input_dir": 5}, "'input_dir' must be a folder name"),
])
def test_config_mistakes_are_named(tmp_path, data, message):
    _config(tmp_path, data)
    with pytest.raises(ValueError) as info:
        Folders.from_base(tmp_path)
    assert message in str(info.value) and "nodeflow.json" in str(info.value)


def test_model_listing_follows_links_but_not_cycles(tmp_path):
    big = tmp_path / "big"
    (big / "sub").mkdir(parents=True)
    (big / "sub" / "b.safetensors").write_bytes(b"")
    ckpts = tmp_path / "models" / "checkpoints"
    ckpts.mkdir(parents=True)
    (ckpts / "a.safetensors").write_bytes(b"")
    os.symlink(big, ckpts / "big")                     # a link to a big disk: followed
    os.symlink(ckpts, big / "sub" / "back")            # a cycle back to the top: walked once
    names = Folders.from_base(tmp_path).list_models("checkpoints")
    assert names == ["a.safetensors", "big/sub/b.safetensors"]
