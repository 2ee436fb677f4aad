import pytest
import torch

from nodeflow.models.tokenizer import EOS


def hidden(clip, text, layer=None):
    """The raw hidden states of the one tower of an SD1 handle for ``text``'s first chunk, unweighted."""
    tower = clip.towers[0]
    ids = torch.tensor([[t for t, _ in clip.tokenize(text)[tower.name][0]]])
    with torch.no_grad():
        h, _ = tower.model(ids, layer or tower.default_layer, tower.final_norm)
    return h


def test_weights_move_tokens_away_from_the_empty_prompt(sd1):
    cond, _ = sd1.clip.encode("a (cat:1.5) on a [mat]")
    plain = hidden(sd1.clip, "a cat on a mat")                        # the same tokens, unweighted
    empty = hidden(sd1.clip, "")
    weights = torch.ones(77)
    weights[2], weights[5] = 1.5, 1 / 1.1                              # <start> a cat on a mat <end>
    assert torch.allclose(cond, empty + (plain - empty) * weights[None, :, None], atol=1e-6)


def test_unit_weights_change_nothing(sd1):
    assert torch.equal(sd1.clip.encode("a (cat:1.0) on a mat")[0], sd1.clip.encode("a cat on a mat")[0])


def test_long_prompt_is_chunked_and_concatenated(sd1):
    text = " ".join(["cat"] * 100)
    cond, pooled = sd1.clip.encode(text)
    assert cond.shape == (1, 154, 32) and pooled.shape == (1, 32)
    chunks = sd1.clip.tokenize(text)["l"]
    second = torch.tensor([[t for t, _ in chunks[1]]])
    with torch.no_grad():
        h, _ = sd1.clip.towers[0].model(second, -1, True)
    assert torch.allclose(cond[:, 77:], h, atol=1e-6)


def test_empty_prompt(sd1, sdxl):
    assert sd1.clip.encode("")[0].shape == (1, 77, 32)
    cond, pooled = sdxl.clip.encode("")
    assert cond.shape == (1, 77, 160) and pooled.shape == (1, 128)


def test_clip_skip_returns_a_clone(sd1):
    skipped = sd1.clip.set_last_layer(-2)
    assert skipped is not sd1.clip and sd1.clip.layer is None and skipped.layer == -2
    assert skipped.towers[0].model is sd1.clip.towers[0].model            # weights shared
    tower = sd1.clip.towers[0]
    ids = torch.tensor([[t for t, _ in sd1.clip.tokenize("a cat")["l"][0]]])
    with torch.no_grad():
        states = tower.model.transformer(ids, output_hidden_states=True).hidden_states
        expected = tower.model._inner.final_layer_norm(states[-2])        # SD1 + clip skip: norm applied
    assert torch.allclose(skipped.encode("a cat")[0], expected, atol=1e-6)
    assert torch.equal(sd1.clip.clip_skip(2).encode("a cat")[0], skipped.encode("a cat")[0])
    assert torch.equal(sd1.clip.set_last_layer(-99).encode("a cat")[0], sd1.clip.encode("a cat")[0])
    with pytest.raises(ValueError, match="negative"):
        sd1.clip.set_last_layer(0)


def test_sdxl_towers_and_padding(sdxl):
    tokens = sdxl.clip.tokenize("a cat")
    assert set(tokens) == {"l", "g"}
    assert tokens["l"][0][-1][0] == EOS and tokens["g"][0][-1][0] == 0
    assert [t.default_layer for t in sdxl.clip.towers] == [-2, -2]
    assert not any(t.final_norm for t in sdxl.clip.towers)


def test_spliced_vectors_replace_token_embeddings(sd1, sdxl):
    """ClipTextModel.forward's ``vectors``: the token embeddings of the ids they replace give the
    ids' own output; the hook is inert outside such a forward and for other models."""
    from nodeflow.models.clip import _SPLICE

    for clip in (sd1.clip, sdxl.clip):
        for tower in clip.towers:
            ids = torch.tensor([[t for t, _ in tower.tokenizer.tokenize_weighted("a red cat")[0]]] * 2)
            table = tower.model._inner.embeddings.token_embedding.weight
            rows, cols = torch.tensor([0, 1, 1]), torch.tensor([2, 2, 3])
            placeheld = ids.clone()
            placeheld[rows, cols] = 0
            with torch.no_grad():
                plain = tower.model(ids, -2, True)
                spliced = tower.model(placeheld, -2, True, (rows, cols, table[ids[rows, cols]]))
                other = tower.model(placeheld, -2, True)
            assert torch.equal(plain[0], spliced[0]) and torch.equal(plain[1], spliced[1])
            assert not torch.equal(other[0], plain[0])              # no splice left over
            assert _SPLICE.get() is None


def test_a_failed_forward_leaves_no_splice(sd1):
    from nodeflow.models.clip import _SPLICE

    model = sd1.clip.towers[0].model
    with pytest.raises(Exception):  # noqa: B017 - any failure will do: the splice must be reset after it
        model(torch.zeros(1, 77, dtype=torch.long), -1, True, (torch.tensor([0]), torch.tensor([1]), torch.zeros(1, 5)))
    assert _SPLICE.get() is None


def test_embedding_tokens_of_the_wrong_width_are_refused(sd1):
    tokens = sd1.clip.tokenize("a cat")
    tokens["l"][0][1] = (torch.zeros(7), 1.0)
    with pytest.raises(ValueError, match="7 wide .*CLIP-L.* takes 32"):
        sd1.clip.encode_tokens(tokens)
