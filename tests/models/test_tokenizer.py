import pytest

from nodeflow.models.tokenizer import BOS, EOS, ClipTokenizer, parse_prompt_weights, write_vocab_files


def ids(chunk):
    return [t for t, _ in chunk]


def test_reference_ids_and_padding():
    assert ClipTokenizer().encode("a photo of a cat") == [49406, 320, 1125, 539, 320, 2368, 49407]
    (sd1,) = ClipTokenizer(pad_token=EOS).tokenize_weighted("a photo of a cat")
    (sd2,) = ClipTokenizer(pad_token=0).tokenize_weighted("a photo of a cat")
    assert len(sd1) == len(sd2) == 77
    assert ids(sd1) == [49406, 320, 1125, 539, 320, 2368] + [49407] * 71
    assert ids(sd2) == [49406, 320, 1125, 539, 320, 2368, 49407] + [0] * 70


def test_same_ids_as_transformers_tokenizer(tmp_path):
    from transformers import CLIPTokenizer

    hf = CLIPTokenizer.from_pretrained(write_vocab_files(tmp_path / "tokenizer"))
    ours = ClipTokenizer()
    for text in ["a photo of a cat", "A PHOTO   of a Cat!!", "don't stop, it's 1234 über-cool 🐱 naïve café",
                 "hello\nworld\tx", "masterpiece, best_quality, 8k uhd", "日本語のテキスト", "",
                 "<|endoftext|> tricky", "a<|endoftext|>b", "x <|endoftext|><|startoftext|> y", "<|ENDOFTEXT|> x",
                 "<|endoftext|", "  <|endoftext|>  ", "<|startoftext|>cat!"]:
        assert ours.encode(text) == hf(text)["input_ids"], text


def test_special_tokens_in_the_text_are_special():
    tok = ClipTokenizer()
    assert tok.encode("<|endoftext|> tricky") == [BOS, EOS, 22319, EOS]
    assert tok.words("(<|startoftext|>:1.2) cat<|endoftext|>") == [([BOS], 1.2), ([2368, EOS], 1.0)]


def test_empty_prompt():
    (chunk,) = ClipTokenizer().tokenize_weighted("")
    assert ids(chunk) == [BOS] + [EOS] * 76
    assert ClipTokenizer(0).empty_chunk()[:3] == [(BOS, 1.0), (EOS, 1.0), (0, 1.0)]


@pytest.mark.parametrize("text, expected", [
    ("a cat", [("a cat", 1.0)]),
    ("a (red) cat", [("a ", 1.0), ("red", 1.1), (" cat", 1.0)]),
    ("((red))", [("red", pytest.approx(1.21))]),
    ("(red:1.5) [blue]", [("red", 1.5), (" ", 1.0), ("blue", pytest.approx(1 / 1.1))]),
    ("(a (b:2) c:0.5)", [("a ", 0.5), ("b", 1.0), (" c", 0.5)]),
    ("( spaced : 1.25 )", [(" spaced ", 1.25)]),
    (r"\(not weighted\) \[x\] a\:b \\", [(r"(not weighted) [x] a:b \ ".rstrip(), 1.0)]),
    ("stray ) and ] and :1.2)", [("stray ) and ] and :1.2)", 1.0)]),
    ("unclosed (rest", [("unclosed ", 1.0), ("rest", 1.1)]),
    ("time 12:30 (x:y)", [("time 12:30 ", 1.0), ("x:y", 1.1)]),
])
def test_prompt_weight_syntax(text, expected):
    assert parse_prompt_weights(text) == expected


def test_weights_attach_to_tokens():
    (chunk,) = ClipTokenizer().tokenize_weighted("a (photo:1.2) of a [cat]")
    assert ids(chunk)[:7] == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert [w for _, w in chunk[:7]] == [1.0, 1.0, 1.2, 1.0, 1.0, pytest.approx(1 / 1.1), 1.0]


def test_long_prompt_chunks_of_77():
    tok = ClipTokenizer()
    chunks = tok.tokenize_weighted(" ".join(["cat"] * 80))          # 80 one-token words
    assert [len(c) for c in chunks] == [77, 77]
    assert ids(chunks[0]) == [BOS] + [2368] * 75 + [EOS]
    assert ids(chunks[1])[:7] == [BOS, 2368, 2368, 2368, 2368, 2368, EOS]
    exactly = tok.tokenize_weighted(" ".join(["cat"] * 75))
    assert len(exactly) == 1 and ids(exactly[0])[-1] == EOS


def test_short_words_do_not_straddle_chunks():
    tok = ClipTokenizer()
    word = tok.words("photorealistic")[0][0]                          # several tokens, fewer than 8
    assert 1 < len(word) < 8
    chunks = tok.tokenize_weighted(" ".join(["cat"] * 74) + " photorealistic")
    assert ids(chunks[0])[1:76] == [2368] * 74 + [EOS] and ids(chunks[1])[1:1 + len(word)] == word


def test_long_words_are_split_at_the_chunk_end():
    tok = ClipTokenizer()
    long_word = "x" + "-y" * 10                                       # 21 tokens
    n = len(tok.words(long_word)[0][0])
    assert n >= 8
    chunks = tok.tokenize_weighted(" ".join(["cat"] * 70) + " " + long_word)
    assert len(chunks) == 2
    assert ids(chunks[0])[71:76] == tok.words(long_word)[0][0][:5]


# --- embedding:NAME ---------------------------------------------------------------------------

def lookup_of(table):
    """A lookup like ``nodeflow.models.embeddings.EmbeddingLookup``, from a dict of name -> [n, 2] tensors."""
    calls = []

    def lookup(name):
        calls.append(name)
        return table.get(name)
    lookup.calls = calls
    return lookup


def vecs(n):
    import torch
    return torch.arange(2.0 * n).reshape(n, 2)


def is_vector(t):
    return not isinstance(t, int)


def test_embedding_words_become_vectors():
    tok = ClipTokenizer()
    lookup = lookup_of({"x": vecs(3)})
    words = tok.words("a embedding:x b", lookup)
    a, b = tok.encode("a")[1], tok.encode("b")[1]
    assert [len(w) for w, _ in words] == [1, 3, 1] and words[0][0] == [a] and words[2][0] == [b]
    assert all(is_vector(t) for t in words[1][0]) and words[1][0][2].tolist() == [4.0, 5.0]
    (chunk,) = tok.tokenize_weighted("a embedding:x b", lookup)
    assert chunk[:2] == [(BOS, 1.0), (a, 1.0)] and chunk[5:7] == [(b, 1.0), (EOS, 1.0)]
    assert [is_vector(t) for t, _ in chunk[2:5]] == [True] * 3


def test_without_a_lookup_embedding_text_is_words():
    tok = ClipTokenizer()
    (chunk,) = tok.tokenize_weighted("embedding:x")
    plain = tok.encode("embedding:x")
    assert len(plain) > 3 and ids(chunk)[:len(plain)] == plain


def test_where_embedding_names_are_recognised():
    tok = ClipTokenizer()
    lookup = lookup_of({"x": vecs(1), "sub/y.pt": vecs(2)})
    assert sum(map(is_vector, (t for w, _ in tok.words("cat,embedding:x;embedding:sub/y.pt", lookup)
                               for t in w))) == 3
    assert not any(is_vector(t) for w, _ in tok.words("xembedding:x (a:embedding:x)", lookup) for t in w)
    # weighting groups and escapes around it
    words = tok.words(r"(embedding:x:1.3) [embedding:x] \(embedding:x\)", lookup)
    assert [(len(w), round(wt, 4)) for w, wt in words][:2] == [(1, 1.3), (1, round(1 / 1.1, 4))]
    assert not any(is_vector(t) for w, _ in words[2:] for t in w)      # "(embedding:x)" literally: no match


def test_trailing_punctuation_and_missing_names():
    tok = ClipTokenizer()
    lookup = lookup_of({"x": vecs(1)})
    missing = []
    words = tok.words("embedding:x. embedding:x, embedding:gone! end", lookup, missing)
    assert missing == ["gone!"]
    assert lookup.calls == ["x.", "x", "x", "gone!", "gone"]
    period, comma, end = tok.encode(".")[1], tok.encode(",")[1], tok.encode("end")[1]
    assert [w if not is_vector(w[0]) else "V" for w, _ in words] == ["V", [period], "V", [comma], [end]]


def test_missing_names_are_logged_without_a_list(caplog):
    with caplog.at_level("WARNING", logger="nodeflow.models.tokenizer"):
        (chunk,) = ClipTokenizer().tokenize_weighted("a embedding:nope", lookup_of({}))
    assert ids(chunk)[:3] == [BOS, 320, EOS] and "'nope' not found" in caplog.text


def test_embeddings_never_straddle_chunks():
    tok = ClipTokenizer()
    lookup = lookup_of({"e7": vecs(7), "e10": vecs(10), "e80": vecs(80)})
    for name, n in (("e7", 7), ("e10", 10)):                  # a word of 10 tokens would be split here
        chunks = tok.tokenize_weighted("cat " * 70 + f"embedding:{name}", lookup)
        assert len(chunks) == 2 and ids(chunks[0])[70:72] == [2368, EOS]
        assert [is_vector(t) for t in ids(chunks[1])[1:n + 2]] == [True] * n + [False]
    fits = tok.tokenize_weighted("cat " * 65 + "embedding:e10", lookup)
    assert len(fits) == 1 and is_vector(ids(fits[0])[75]) and ids(fits[0])[76] == EOS
    huge = tok.tokenize_weighted("cat embedding:e80 dog", lookup)      # longer than a chunk: split
    assert len(huge) == 2 and sum(is_vector(t) for c in huge for t in ids(c)) == 80
    assert ids(huge[0])[1] == 2368 and is_vector(ids(huge[0])[75]) and ids(huge[1])[7] == tok.encode("dog")[1]
