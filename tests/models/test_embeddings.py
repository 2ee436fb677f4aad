"""Textual-inversion embeddings (``embedding:NAME``) with tiny SD 1.x / SD 2.x / SDXL text encoders.

The strong check: an embedding whose vectors are the token embeddings of some words must give
exactly the conditioning of those words, for every family."""

from __future__ import annotations

import logging
import os

import pytest
import torch
from safetensors.torch import save_file

from nodeflow import context as run_context
from nodeflow import folders as folders_module
from nodeflow.models import embeddings
from nodeflow.models.embeddings import EmbeddingError
from nodeflow.models.tokenizer import BOS, EOS


@pytest.fixture(scope="module")
def sd2(sd2_path):
    from nodeflow.models import load_checkpoint
    return load_checkpoint(sd2_path)


@pytest.fixture(autouse=True)
def fresh_cache():
    embeddings.clear_cache()
    yield
    embeddings.clear_cache()


def tower(clip, name):
    return next(t for t in clip.towers if t.name == name)


def token_vectors(clip, name, words):
    """The token embeddings of ``words`` in tower ``name``: what an embedding standing for them holds."""
    t = tower(clip, name)
    ids = t.tokenizer.encode(words)[1:-1]
    return t.model._inner.embeddings.token_embedding.weight[ids].detach().clone()


def with_dir(clip, folder):
    clip = clip.clone()
    clip.embedding_dirs = [folder]
    return clip


def equal(a, b):
    return torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_embedding_of_word_vectors_encodes_like_the_words(family, request, tmp_path):
    ckpt = request.getfixturevalue(family)
    clip = with_dir(ckpt.clip, tmp_path)
    if family == "sdxl":
        sd = {"clip_l": token_vectors(clip, "l", "red cat"), "clip_g": token_vectors(clip, "g", "red cat")}
    else:
        sd = {"emb_params": token_vectors(clip, clip.towers[0].name, "red cat")}
    save_file(sd, tmp_path / "redcat.safetensors")
    tokens = clip.tokenize("a photo of embedding:redcat on a mat")
    for name, chunks in tokens.items():                        # the vectors are in the input, not words
        assert all(isinstance(t, torch.Tensor) for t, _ in chunks[0][4:6]), name
        assert chunks[0][6][0] == tower(clip, name).tokenizer.encode("on")[1]
    assert equal(clip.encode("a photo of embedding:redcat on a mat"), clip.encode("a photo of red cat on a mat"))
    # a different vector changes the conditioning (the splice is not a no-op)
    other = {k: v + 0.5 for k, v in sd.items()}
    save_file(other, tmp_path / "other.safetensors")
    assert not torch.equal(clip.encode("a photo of embedding:other on a mat")[0],
                           clip.encode("a photo of red cat on a mat")[0])


def test_vector_count_sets_the_token_layout(sd1, tmp_path):
    clip = with_dir(sd1.clip, tmp_path)
    vectors = torch.randn(3, 32)
    save_file({"emb_params": vectors}, tmp_path / "three.safetensors")
    (chunk,) = clip.tokenize("cat embedding:three dog")["l"]
    cat, dog = (tower(clip, "l").tokenizer.encode(w)[1] for w in ("cat", "dog"))
    assert chunk[0][0] == BOS and chunk[1][0] == cat and chunk[5][0] == dog and chunk[6][0] == EOS
    for i in range(3):
        assert torch.equal(chunk[2 + i][0], vectors[i])
    cond, pooled = clip.encode("cat embedding:three dog")
    assert cond.shape == (1, 77, 32)
    # the pooled output comes from the end token, which the 3 vectors moved to position 6
    t = tower(clip, "l")
    ids = torch.tensor([[BOS, cat, 0, 0, 0, dog, EOS] + [EOS] * 70])
    with torch.no_grad():
        states = t.model.transformer(ids, output_hidden_states=True).hidden_states
    h, pool = t.model(ids, -1, True, (torch.tensor([0, 0, 0]), torch.tensor([2, 3, 4]), vectors))
    assert torch.allclose(pool, h[:, 6], atol=1e-6) and torch.equal(pooled, pool)
    assert not torch.allclose(h, t.model._inner.final_layer_norm(states[-1]))   # the vectors were used


def test_sdxl_file_gives_each_encoder_its_own_vectors(sdxl, tmp_path):
    clip = with_dir(sdxl.clip, tmp_path)
    save_file({"clip_l": token_vectors(clip, "l", "red"), "clip_g": token_vectors(clip, "g", "blue")},
              tmp_path / "mixed.safetensors")
    cond, pooled = clip.encode("embedding:mixed")
    red, blue = clip.encode("red"), clip.encode("blue")
    assert torch.equal(cond[..., :32], red[0][..., :32])          # CLIP-L, 32 wide in the tiny model
    assert torch.equal(cond[..., 32:], blue[0][..., 32:])         # bigG
    assert torch.equal(pooled, blue[1])                           # pooled is bigG's
    # EncodeTextSDXL's path: text_g and text_l tokenized apart, then encoded together
    tokens = clip.tokenize("blue")                                # text_g: words
    tokens["l"] = clip.tokenize("embedding:mixed")["l"]           # text_l: the embedding's clip_l ("red")
    assert equal(clip.encode_tokens(tokens), (cond, pooled))


def test_sdxl_file_in_an_sd1_prompt_uses_clip_l(sd1, tmp_path):
    clip = with_dir(sd1.clip, tmp_path)
    save_file({"clip_l": token_vectors(clip, "l", "red"), "clip_g": torch.randn(1, 128)}, tmp_path / "xl.safetensors")
    assert equal(clip.encode("embedding:xl"), clip.encode("red"))


def test_file_formats(sd1, tmp_path):
    clip = with_dir(sd1.clip, tmp_path)
    vec = token_vectors(clip, "l", "red cat")
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": torch.nn.Parameter(vec.clone())},
                "name": "a1111", "step": 3000, "sd_checkpoint": "abc123", "sd_checkpoint_name": "v1-5"},
               tmp_path / "a1111.pt")
    save_file({"whatever": vec.clone()}, tmp_path / "single.safetensors")
    torch.save({"<red-cat>": vec.clone()}, tmp_path / "learned_embeds.bin")               # diffusers, [n, dim]
    torch.save({"<red>": vec[0].clone()}, tmp_path / "one_vector.bin")                    # diffusers, [dim]
    save_file({"emb_params": vec[None].clone()}, tmp_path / "batched.safetensors")        # [1, n, dim]
    torch.save({"emb_params": vec.clone().half()}, tmp_path / "half.pth")
    save_file({"emb_params": vec.clone()}, tmp_path / "odd.emb")                        # told by its content
    words = clip.encode("a red cat")
    for name in ("a1111", "a1111.pt", "single", "learned_embeds", "batched", "odd.emb"):
        assert equal(clip.encode(f"a embedding:{name}"), words), name
    assert torch.allclose(clip.encode("a embedding:half")[0], words[0], atol=1e-2)          # fp16 rounding
    loaded = embeddings.load_embedding_file(tmp_path / "half.pth")["emb_params"]
    assert loaded.dtype == torch.float32 and torch.equal(loaded, vec.half().float())
    assert equal(clip.encode("a embedding:one_vector"), clip.encode("a red"))


def test_names_subfolders_and_extension_order(sd1, tmp_path):
    clip = with_dir(sd1.clip, tmp_path)
    (tmp_path / "styles").mkdir()
    save_file({"e": token_vectors(clip, "l", "red")}, tmp_path / "styles" / "film.safetensors")
    torch.save({"e": token_vectors(clip, "l", "blue")}, tmp_path / "styles" / "film.pt")
    save_file({"e": token_vectors(clip, "l", "green")}, tmp_path / "v1.5.safetensors")
    assert equal(clip.encode("embedding:styles/film"), clip.encode("red"))      # .safetensors before .pt
    assert equal(clip.encode("embedding:styles/film.pt"), clip.encode("blue"))
    assert equal(clip.encode("embedding:v1.5"), clip.encode("green"))           # a dot in the name
    assert equal(clip.encode("cat,embedding:v1.5, dog"), clip.encode("cat,green, dog"))
    assert equal(clip.encode("a embedding:v1.5."), clip.encode("a green."))     # sentence end
    assert equal(clip.encode("a xembedding:v1.5"), clip.encode("a xembedding:v1.5"))   # not an embedding word
    assert not any(isinstance(t, torch.Tensor) for t, _ in clip.tokenize("a xembedding:v1.5")["l"][0])


def test_configured_embeddings_folder_is_used(sd1, tmp_path, monkeypatch):
    """Without embedding_dirs the handle looks in nodeflow.folders' models/embeddings: no node passes a folder."""
    folder = tmp_path / "models" / "embeddings"
    folder.mkdir(parents=True)
    save_file({"e": token_vectors(sd1.clip, "l", "red")}, folder / "red.safetensors")
    monkeypatch.setattr(run_context.default(), "_folders", folders_module.Folders.from_base(tmp_path))
    assert sd1.clip.embedding_dirs is None
    assert equal(sd1.clip.encode("embedding:red"), sd1.clip.encode("red"))
    assert equal(sd1.clip.set_last_layer(-2).encode("embedding:red"), sd1.clip.set_last_layer(-2).encode("red"))


def test_wrong_width_is_a_clear_error(sd1, sd2, tmp_path):
    save_file({"emb_params": torch.randn(2, 128)}, tmp_path / "wide.safetensors")
    with pytest.raises(EmbeddingError, match=r"wide\.safetensors.*128 wide.*CLIP-L.*32 wide"):
        with_dir(sd1.clip, tmp_path).encode("a embedding:wide")
    save_file({"clip_l": torch.randn(1, 32), "clip_g": torch.randn(1, 128)}, tmp_path / "xl.safetensors")
    with pytest.raises(EmbeddingError, match=r"xl\.safetensors holds vectors for clip_g, clip_l but none .*clip_h"):
        with_dir(sd2.clip, tmp_path).encode("embedding:xl")
    save_file({"a": torch.randn(1, 32), "b": torch.randn(1, 32)}, tmp_path / "two.safetensors")
    with pytest.raises(EmbeddingError, match="holds 2 tensors"):
        with_dir(sd1.clip, tmp_path).encode("embedding:two")


class NotATensor:
    pass


def test_unsafe_or_broken_files_are_refused(sd1, tmp_path):
    clip = with_dir(sd1.clip, tmp_path)
    torch.save({"string_to_param": {"*": torch.randn(1, 32)}, "extra": NotATensor()}, tmp_path / "code.pt")
    with pytest.raises(EmbeddingError, match=r"code\.pt: refused to load"):
        clip.encode("embedding:code")
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(EmbeddingError, match=r"empty\.pt.*empty"):
        clip.encode("embedding:empty")


def test_missing_embedding_warns_and_is_left_out(sd1, sdxl, tmp_path, caplog):
    save_file({"e": torch.randn(1, 32)}, tmp_path / "present.safetensors")
    clip = with_dir(sd1.clip, tmp_path)
    with caplog.at_level(logging.WARNING, logger="nodeflow.models.embeddings"):
        got = clip.encode("a embedding:presnt cat")
    assert equal(got, clip.encode("a cat"))                       # not encoded as "embedding : presnt"
    (record,) = caplog.records
    assert "'presnt' not found in " + str(tmp_path) in record.getMessage()
    assert "did you mean embedding:present?" in record.getMessage() and "left out" in record.getMessage()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="nodeflow.models.embeddings"):
        with_dir(sdxl.clip, tmp_path).encode("embedding:nothing")  # two towers: one warning
        with_dir(sd1.clip, tmp_path).encode("embedding:../present")
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2 and "'nothing' not found" in messages[0]
    assert "'../present' is not a plain relative name" in messages[1]


def test_weighting_applies_to_embedding_vectors(sd1, tmp_path):
    clip = with_dir(sd1.clip, tmp_path)
    save_file({"e": token_vectors(clip, "l", "red cat")}, tmp_path / "x.safetensors")
    assert equal(clip.encode("a (embedding:x:1.2) on [embedding:x]"), clip.encode("a (red cat:1.2) on [red cat]"))
    chunk = clip.tokenize("a (embedding:x:1.2)")["l"][0]
    assert [w for _, w in chunk[:5]] == [1.0, 1.0, 1.2, 1.2, 1.0]
    assert not torch.equal(clip.encode("a (embedding:x:1.2)")[0], clip.encode("a embedding:x")[0])


def test_embedding_moves_whole_to_the_next_chunk(sd1, tmp_path):
    clip = with_dir(sd1.clip, tmp_path)
    vectors = token_vectors(clip, "l", "red green blue")               # 3 vectors
    save_file({"e": vectors}, tmp_path / "rgb.safetensors")
    cat = tower(clip, "l").tokenizer.encode("cat")[1]
    chunks = clip.tokenize("cat " * 73 + "embedding:rgb")["l"]          # 73 + 3 > 75: next chunk
    assert len(chunks) == 2
    assert [t for t, _ in chunks[0][:76]] == [BOS] + [cat] * 73 + [EOS, EOS]
    assert all(torch.equal(chunks[1][1 + i][0], vectors[i]) for i in range(3)) and chunks[1][4][0] == EOS
    fits = clip.tokenize("cat " * 72 + "embedding:rgb")["l"]            # 72 + 3 = 75: fits
    assert len(fits) == 1 and isinstance(fits[0][75][0], torch.Tensor) and fits[0][76][0] == EOS
    # the second chunk encodes like the three words alone (their words did not move together: 1 token each)
    cond, _ = clip.encode("cat " * 73 + "embedding:rgb")
    assert cond.shape == (1, 154, 32)
    assert torch.equal(cond[:, 77:], clip.encode("red green blue")[0])
    # only an embedding longer than a whole chunk is split
    save_file({"e": torch.randn(80, 32)}, tmp_path / "huge.safetensors")
    big = clip.tokenize("cat embedding:huge")["l"]
    assert len(big) == 2 and big[0][1][0] == cat
    assert sum(isinstance(t, torch.Tensor) for c in big for t, _ in c) == 80


def test_loaded_files_are_cached_by_size_and_mtime(sd1, tmp_path, monkeypatch):
    clip = with_dir(sd1.clip, tmp_path)
    path = tmp_path / "c.safetensors"
    save_file({"e": token_vectors(clip, "l", "red")}, path)
    reads = []
    real = embeddings._read
    monkeypatch.setattr(embeddings, "_read", lambda p: reads.append(p) or real(p))
    first = clip.encode("embedding:c, (embedding:c:1.1)")
    assert clip.encode("embedding:c, (embedding:c:1.1)") is not None and len(reads) == 1
    save_file({"e": token_vectors(clip, "l", "blue")}, path)            # replaced: read again
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    assert equal(clip.encode("embedding:c"), clip.encode("blue")) and len(reads) == 2
    assert not torch.equal(first[0], clip.encode("embedding:c, (embedding:c:1.1)")[0])
    assert len(reads) == 2
