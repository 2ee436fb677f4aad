"""The CLIP tokenizer, offline, with prompt weighting and long-prompt chunking.

The byte-pair vocabulary is OpenAI CLIP's ``bpe_simple_vocab_16e6.txt.gz`` (MIT licence,
see ``LICENSE-CLIP-BPE`` next to this file). The vocab and merges are derived from it the
way CLIP's own tokenizer does: the 256 byte symbols, the same with ``</w>``, one token per
merge, then ``<|startoftext|>`` (49406) and ``<|endoftext|>`` (49407). Text is normalised
like transformers' ``CLIPTokenizer`` (NFC, whitespace runs to one space, lower case), so the
ids equal that tokenizer's: ``"a photo of a cat"`` → ``[49406, 320, 1125, 539, 320, 2368,
49407]``. ``<|startoftext|>`` and ``<|endoftext|>`` written in a prompt are those tokens, as there.

Prompt syntax (A1111 / ComfyUI conventions):

- ``(text)`` multiplies the weight of ``text`` by 1.1, ``[text]`` divides it by 1.1;
  ``(text:1.3)`` sets the factor to 1.3; groups nest and multiply.
- ``\\(``, ``\\)``, ``\\[``, ``\\]``, ``\\:`` and ``\\\\`` are literal characters; a closing
  bracket without an opener is literal too; an opener never closed applies to the rest.
- Prompts longer than 75 tokens are split into chunks of 77 (start, 75 tokens, end/pad);
  a word shorter than 8 tokens never straddles two chunks.
- ``embedding:NAME`` (at the start of a word or after ``,`` / ``;``; ``NAME`` runs to the next
  space, ``,`` or ``;``) stands for a textual-inversion embedding's vectors when ``tokenize_weighted``
  is given a lookup (``nodeflow.models.embeddings``): they take ``n`` token places, carry the
  weight of their group like words, and are never split across chunks (an embedding that does
  not fit in the chunk's room starts the next chunk; only one of more than 75 vectors is split).
  A name that is not found as written is tried without trailing ``.;:!?`` (``embedding:x.``
  at a sentence's end), those characters staying as text. A name not found at all is left out.
  Without a lookup the text is plain words.
"""

from __future__ import annotations

import gzip
import json
import logging
import re
from collections.abc import Callable, Iterator, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

BOS, EOS = 49406, 49407          # <|startoftext|>, <|endoftext|>
MAX_LENGTH = 77                  # CLIP's context: start + 75 tokens + end
MAX_WORD_LENGTH = 8              # words with fewer tokens than this stay in one chunk
BPE_FILE = Path(__file__).with_name("bpe_simple_vocab_16e6.txt.gz")

# CLIP's pre-tokenisation pattern: contractions, letter runs, single digits, symbol runs.
_WORD_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""

# 77 (token, weight) pairs; a token is an id (int) or, for an embedding, a vector (a 1-D tensor)
Chunk = list[tuple[Any, float]]
#: ``name -> vectors [n, width]`` (a tensor, or any sequence of 1-D vectors) or None if there is none
EmbeddingLookup = Callable[[str], "Sequence | None"]

EMBEDDING_PREFIX = "embedding:"
# embedding:NAME at the start of a word or after "," or ";"; NAME runs to a space, "," or ";".
_EMBEDDING = re.compile(r"(?<![^\s,;])embedding:(?P<name>[^\s,;]+)")
_TRAILING = ".;:!?"              # tried off a name that is not found as written


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible map from the 256 byte values to printable characters."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    chars = printable + [256 + n for n in range(len(others))]
    return dict(zip(printable + others, map(chr, chars)))


@lru_cache(maxsize=1)
def vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's vocabulary (49408 entries) and its 48894 merges, derived from the shipped BPE file."""
    with gzip.open(BPE_FILE) as f:
        lines = f.read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1]]
    symbols = list(_bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


@lru_cache(maxsize=1)
def _bpe():
    """A `tokenizers.Tokenizer` doing CLIP's normalisation, word split and BPE. ``<|startoftext|>`` and
    ``<|endoftext|>`` written in the text are those tokens (as in transformers' CLIPTokenizer and
    open_clip), matched before normalisation; start and end tokens are not added."""
    from tokenizers import AddedToken, Regex, Tokenizer, models, normalizers, pre_tokenizers

    vocab, merges = vocab_and_merges()
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<|endoftext|>",
                               end_of_word_suffix="</w>", continuing_subword_prefix="", fuse_unk=False))
    tok.normalizer = normalizers.Sequence([
        normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_WORD_PATTERN), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t in ("<|startoftext|>", "<|endoftext|>")])
    return tok


def write_vocab_files(folder: str | Path) -> Path:
    """Write ``vocab.json``, ``merges.txt`` and a tokenizer config: a transformers / diffusers
    ``tokenizer/`` folder that ``CLIPTokenizer.from_pretrained(folder)`` loads offline."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = vocab_and_merges()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n",
                                       encoding="utf-8")
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": MAX_LENGTH, "bos_token": "<|startoftext|>",
              "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1), encoding="utf-8")
    return folder


# --- prompt weighting -----------------------------------------------------------------------

_PROMPT_TOKENS = re.compile(
    r"\\(?P<escaped>.)"                                             # \( \) \[ \] \: \\
    r"|:\s*(?P<weight>[+-]?(?:\d+(?:\.\d*)?|\.\d+))\s*\)"           # :1.2)  closes a ( group
    r"|(?P<bracket>[()\[\]])"
    r"|(?P<text>[^\\()\[\]:]+|:|\\$)",
    re.S,
)


def parse_prompt_weights(text: str) -> list[tuple[str, float]]:
    """Split a prompt into ``(text, weight)`` segments; adjacent equal weights are merged.

    >>> parse_prompt_weights("a (red:1.5) [cat]")
    [('a ', 1.0), ('red', 1.5), (' ', 1.0), ('cat', 0.9090909090909091)]
    """
    segments: list[list] = []                     # [text, weight] pairs, weights updated in place
    open_round: list[int] = []                    # index in `segments` where each ( group starts
    open_square: list[int] = []

    def scale(start: int, factor: float) -> None:
        for seg in segments[start:]:
            seg[1] *= factor

    for m in _PROMPT_TOKENS.finditer(text):
        bracket = m.group("bracket")
        if m.group("escaped") is not None:
            segments.append([m.group("escaped"), 1.0])
        elif m.group("weight") is not None:
            if open_round:
                scale(open_round.pop(), float(m.group("weight")))
            else:
                segments.append([m.group(0), 1.0])
        elif bracket == "(":
            open_round.append(len(segments))
        elif bracket == "[":
            open_square.append(len(segments))
        elif bracket == ")" and open_round:
            scale(open_round.pop(), 1.1)
        elif bracket == "]" and open_square:
            scale(open_square.pop(), 1 / 1.1)
        else:                                     # plain text, or a closer without its opener
            segments.append([m.group(0), 1.0])
    for start in open_round:
        scale(start, 1.1)
    for start in open_square:
        scale(start, 1 / 1.1)

    merged: list[tuple[str, float]] = []
    for seg_text, weight in segments:
        if merged and merged[-1][1] == weight:
            merged[-1] = (merged[-1][0] + seg_text, weight)
        elif seg_text:
            merged.append((seg_text, weight))
    return merged


# --- tokenizer ------------------------------------------------------------------------------

class ClipTokenizer:
    """CLIP tokenizer for one text encoder. ``pad_token`` is 49407 for OpenAI CLIP (SD 1.x,
    SDXL's CLIP-L) and 0 for OpenCLIP encoders (SD 2.x, SDXL's bigG)."""

    def __init__(self, pad_token: int = EOS):
        self.pad_token = pad_token

    def encode(self, text: str) -> list[int]:
        """Plain token ids with start and end tokens, no padding, no weighting syntax."""
        return [BOS, *_bpe().encode(text, add_special_tokens=False).ids, EOS]

    def words(self, text: str, embeddings: EmbeddingLookup | None = None,
              missing: list[str] | None = None) -> list[tuple[list, float]]:
        """The prompt as weighted words: ``[(token ids of one word, weight), ...]``. With an
        ``embeddings`` lookup, each ``embedding:NAME`` found is one word whose tokens are the
        embedding's vectors (1-D tensors); names not found are left out and appended to
        ``missing`` (or, without that list, logged as a warning)."""
        out = []
        for segment, weight in parse_prompt_weights(text):
            for piece in _split_embeddings(segment, embeddings, missing):
                if not isinstance(piece, str):                 # an embedding's vectors
                    out.append((list(piece), weight))
                    continue
                words = piece.split()
                if not words:
                    continue
                for enc in _bpe().encode_batch(words, add_special_tokens=False):
                    if enc.ids:
                        out.append((list(enc.ids), weight))
        return out

    def tokenize_weighted(self, text: str, embeddings: EmbeddingLookup | None = None,
                          missing: list[str] | None = None) -> list[Chunk]:
        """The prompt as chunks of 77 ``(token, weight)`` pairs: start token, up to 75
        prompt tokens, end token, padding. An empty prompt gives one chunk. ``embeddings``:
        how ``embedding:NAME`` finds its vectors (see ``words``; without it, plain text)."""
        body = MAX_LENGTH - 2
        chunks: list[list[tuple[Any, float]]] = [[]]
        for ids, weight in self.words(text, embeddings, missing):
            pairs = [(t, weight) for t in ids]
            vectors = not isinstance(ids[0], int)
            while pairs:
                room = body - len(chunks[-1])
                if len(pairs) <= room:
                    chunks[-1].extend(pairs)
                    pairs = []
                elif (len(pairs) > body) if vectors else (len(pairs) >= MAX_WORD_LENGTH):
                    # a long word (or an embedding longer than a chunk) is split at the chunk end
                    chunks[-1].extend(pairs[:room])
                    pairs = pairs[room:]
                    chunks.append([])
                else:                                     # a short word moves to a new chunk
                    chunks.append([])
        if len(chunks) > 1 and not chunks[-1]:
            chunks.pop()
        out = []
        for body_pairs in chunks:
            chunk = [(BOS, 1.0), *body_pairs, (EOS, 1.0)]
            chunk += [(self.pad_token, 1.0)] * (MAX_LENGTH - len(chunk))
            out.append(chunk)
        return out

    def empty_chunk(self) -> Chunk:
        """The chunk of the empty prompt (start, end, padding): the reference that weights scale from."""
        return self.tokenize_weighted("")[0]


def _split_embeddings(segment: str, embeddings: EmbeddingLookup | None,
                      missing: list[str] | None) -> Iterator:
    """``segment`` as text pieces (str) and embeddings' vectors, in order."""
    if embeddings is None or EMBEDDING_PREFIX not in segment:
        yield segment
        return
    start = 0
    for m in _EMBEDDING.finditer(segment):
        name, leftover = m.group("name"), ""
        vectors = embeddings(name)
        if vectors is None:
            stripped = name.rstrip(_TRAILING)
            if stripped and stripped != name:
                vectors = embeddings(stripped)
                if vectors is not None:
                    leftover = name[len(stripped):]
        yield segment[start:m.start()]
        if vectors is None:
            if missing is None:
                log.warning("embedding %r not found; left out of the prompt", name)
            else:
                missing.append(name)
        else:
            yield vectors
        yield leftover
        start = m.end()
    yield segment[start:]
