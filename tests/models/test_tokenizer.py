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
