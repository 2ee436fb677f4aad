"""Textual-inversion embeddings: ``embedding:NAME`` in a prompt.

A prompt word ``embedding:NAME`` (also inside weighting, ``(embedding:NAME:1.2)``) stands for
the vectors of the embedding file ``NAME`` in the embeddings folders
(``folders().model_dirs("embeddings")``: ``models/embeddings`` and any extra folders of
``nodeflow.json``). ``NAME`` may name a subfolder (``embedding:styles/film``) and may carry its
extension (``embedding:film.pt``); without one, ``NAME`` as it is, then ``NAME.safetensors``,
``.pt``, ``.bin`` and ``.pth`` are tried, folder by folder. The vectors take the place of token
embeddings in the text encoder's input: an embedding of ``n`` vectors fills ``n`` of a chunk's 75
token places, and weighting scales them as it scales tokens.

File formats (each read without running code: ``torch.load(weights_only=True)`` or safetensors):

- A1111 ``.pt``: ``{"string_to_param": {"*": tensor [n, dim]}, "name": ..., ...}``;
- safetensors (or a pickle) with one tensor, ``emb_params`` or any other key, ``[n, dim]``
  (``[dim]`` and ``[1, n, dim]`` are read as ``n`` vectors too);
- SDXL embeddings: ``{"clip_l": [n, 768], "clip_g": [n, 1280]}``: each text encoder takes the
  tensor named after it (``clip_l`` also serves SD 1.x's encoder, ``clip_h`` SD 2.x's);
- diffusers' ``learned_embeds.bin`` / ``.safetensors``: ``{"<token>": tensor [dim] or [n, dim]}``.

An embedding whose vectors are not as wide as the text encoder's token embeddings (an SD 1.x
embedding, 768 wide, in an SD 2.x prompt, 1024) raises ``EmbeddingError`` naming the file and
both widths; so does a file that is not an embedding. A name that no embeddings folder holds is
*left out of the prompt* with a logged warning naming it, the folders searched and the names
that are there (ComfyUI also leaves such a word out, with a terser warning); workflows that
name an embedding the machine lacks keep running, and the missing name is not encoded as the
words "embedding", ":" and the name.

Loaded files are cached by path, size and modification time, so encoding a prompt again does
not read the file again, and a replaced file is read anew.
"""

from __future__ import annotations

import difflib
import logging
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from nodeflow.models.files import CheckpointError, SafetensorsFile, load_pickle

log = logging.getLogger(__name__)

#: The extensions tried, in this order, for a name given without one.
EXTENSIONS = (".safetensors", ".pt", ".bin", ".pth")
_SAFETENSORS = (".safetensors", ".sft")
#: Token-embedding widths of the text encoders SD uses, to say what an embedding was made for.
KNOWN_WIDTHS = {768: "SD 1.x / CLIP-L", 1024: "SD 2.x / OpenCLIP ViT-H", 1280: "SDXL's OpenCLIP bigG"}
_CACHE_SIZE = 256


class EmbeddingError(CheckpointError):
    """An embedding file that cannot be used: unreadable, not an embedding, or made for another
    text encoder (its vectors' width differs)."""


# --- finding files ----------------------------------------------------------------------------

def embedding_dirs() -> list[Path]:
    """The embeddings folders of the process-wide ``nodeflow.folders`` configuration."""
    from nodeflow.folders import folders

    return list(folders().model_dirs("embeddings"))


def find_embedding(name: str, dirs: Sequence[Path] | None = None) -> Path | None:
    """The file of embedding ``name`` (``film``, ``film.pt``, ``styles/film``), or None if no
    folder of ``dirs`` (default: the configured embeddings folders) holds it, or if ``name`` is
    not a plain relative name (absolute, ``..``). Each folder is searched for ``name`` as it is,
    then with the extensions of ``EXTENSIONS``, before the next folder."""
    from nodeflow.folders import UnsafePath, safe_relative

    try:
        candidates = [safe_relative(name)] + [safe_relative(name + ext) for ext in EXTENSIONS]
    except UnsafePath:
        return None
    for root in (embedding_dirs() if dirs is None else dirs):
        for rel in candidates:
            path = Path(root) / rel
            try:
                if path.is_file():
                    return path
            except OSError:                    # a name too long for the file system, say
                continue
    return None


def missing_message(name: str, dirs: Sequence[Path] | None = None) -> str:
    """Why ``embedding:name`` found nothing, with the names that are there."""
    from nodeflow.folders import Folders, UnsafePath, safe_relative

    dirs = embedding_dirs() if dirs is None else list(dirs)
    where = ", ".join(str(d) for d in dirs) or "(no embeddings folder configured)"
    try:
        safe_relative(name)
    except UnsafePath:
        return (f"embedding {name!r} is not a plain relative name (names are relative to the embeddings "
                f"folders: {where}); left out of the prompt")
    here = Path.cwd()
    names = Folders(here, here, here, here, {"embeddings": [Path(d) for d in dirs]}).list_models("embeddings")
    stems = {n.rsplit(".", 1)[0]: n for n in names}
    close = difflib.get_close_matches(name, list(stems), n=1)
    hint = f" (did you mean embedding:{close[0]}?)" if close else ""
    shown = ", ".join(names[:20]) + (" ..." if len(names) > 20 else "") if names else "none"
    return f"embedding {name!r} not found in {where}{hint}; left out of the prompt. Available: {shown}"


# --- reading files ----------------------------------------------------------------------------

def _tensors(obj, path: Path) -> dict[str, torch.Tensor]:
    """The candidate tensors of a loaded embedding file, by name."""
    if isinstance(obj, dict) and "string_to_param" in obj:            # A1111
        params = obj["string_to_param"]
        found = {k: v for k, v in params.items() if isinstance(v, torch.Tensor)} if isinstance(params, dict) else {}
        if len(found) != 1:
            raise EmbeddingError(f"embedding file {path}: 'string_to_param' should hold one tensor (A1111's "
                                 f"format), it holds {len(found)}")
        return {"string_to_param": next(iter(found.values()))}
    if isinstance(obj, dict):
        found = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    elif isinstance(obj, (list, tuple)) and obj and all(isinstance(v, torch.Tensor) for v in obj):
        found = {"list": torch.cat([v.reshape(-1, v.shape[-1]) for v in obj])}
    else:
        found = {}
    if not found:
        raise EmbeddingError(f"embedding file {path}: holds no tensors (a {type(obj).__name__}); not a "
                             "textual-inversion embedding")
    return found


def _read(path: Path) -> dict[str, torch.Tensor]:
    """The file's candidate tensors, float32 copies. Told apart by their first bytes (a pickle or
    torch's zip, else safetensors' header), else by the suffix, whose reader then explains the damage."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError as e:
        raise EmbeddingError(f"embedding file {path}: cannot read it: {e.strerror or e}") from None
    if head[:2] == b"PK" or head[:1] == b"\x80":
        obj = load_pickle(path)
    elif (len(head) == 9 and head[8:9] == b"{") or path.suffix.lower() in _SAFETENSORS:
        with SafetensorsFile(path) as f:
            obj = {k: f.get(k) for k in list(f.keys())}
    else:
        obj = load_pickle(path)
    out = {}
    for key, t in _tensors(obj, path).items():
        if not t.is_floating_point():
            raise EmbeddingError(f"embedding file {path}: tensor {key!r} holds {t.dtype} values, not vectors")
        out[key] = t.detach().to("cpu", torch.float32, copy=True).contiguous()   # no view of a mapped file
    return out


_cache: OrderedDict[Path, tuple[tuple[int, int], dict[str, torch.Tensor]]] = OrderedDict()
_cache_lock = threading.Lock()


def load_embedding_file(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of an embedding file (float32, CPU) by name, from the cache while the file's size
    and modification time are unchanged. Raises ``EmbeddingError`` (a ``CheckpointError``) naming
    the file when it cannot be read."""
    path = Path(path)
    try:
        st = path.stat()
    except OSError as e:
        raise EmbeddingError(f"embedding file {path}: cannot read it: {e.strerror or e}") from None
    stamp = (st.st_size, st.st_mtime_ns)
    with _cache_lock:
        hit = _cache.get(path)
        if hit is not None and hit[0] == stamp:
            _cache.move_to_end(path)
            return hit[1]
    try:
        tensors = _read(path)
    except EmbeddingError:
        raise
    except CheckpointError as e:
        raise EmbeddingError(f"embedding {e}" if str(e).startswith(str(path)) else f"embedding file {path}: {e}") \
            from None
    with _cache_lock:
        _cache[path] = (stamp, tensors)
        _cache.move_to_end(path)
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    return tensors


def clear_cache() -> None:
    """Forget every loaded embedding file."""
    with _cache_lock:
        _cache.clear()


def _describe(width: int) -> str:
    return f"{width} ({KNOWN_WIDTHS[width]})" if width in KNOWN_WIDTHS else str(width)


def vectors_for(path: str | Path, tower: str, width: int) -> torch.Tensor:
    """The vectors ``[n, width]`` (float32) that embedding file ``path`` gives the text encoder
    ``tower`` ("l", "h" or "g") whose token embeddings are ``width`` wide. A file with ``clip_l`` /
    ``clip_g`` (/ ``clip_h``) tensors gives each encoder its own; any other file must hold one
    tensor (``emb_params`` is taken if there are several). ``EmbeddingError`` when the file holds no
    tensor for this encoder or its vectors are not ``width`` wide."""
    path = Path(path)
    tensors = load_embedding_file(path)
    per_encoder = sorted(k for k in tensors if k.startswith("clip_"))
    own = f"clip_{tower}"
    if per_encoder:
        if own not in tensors:
            raise EmbeddingError(f"embedding file {path} holds vectors for {', '.join(per_encoder)} but none for "
                                 f"this text encoder ({own}): it was made for another model")
        key = own
    elif len(tensors) == 1:
        key = next(iter(tensors))
    elif "emb_params" in tensors:
        key = "emb_params"
    else:
        listed = ", ".join(f"{k} {tuple(v.shape)}" for k, v in list(tensors.items())[:6])
        raise EmbeddingError(f"embedding file {path} holds {len(tensors)} tensors ({listed}); an embedding has "
                             "one (or clip_l / clip_g for SDXL)")
    t = tensors[key]
    while t.dim() > 2 and t.shape[0] == 1:
        t = t[0]
    if t.dim() == 1:
        t = t[None]
    if t.dim() != 2 or t.shape[0] == 0:
        raise EmbeddingError(f"embedding file {path}: tensor {key!r} has shape {tuple(tensors[key].shape)}; "
                             "expected [vectors, width]")
    if t.shape[1] != width:
        raise EmbeddingError(
            f"embedding file {path}: its vectors are {_describe(t.shape[1])} wide, but this text encoder "
            f"(CLIP-{tower.upper()}) takes vectors {_describe(width)} wide: the embedding was made for another "
            "model")
    return t


class EmbeddingLookup:
    """``lookup(name)`` -> the vectors ``[n, width]`` of ``embedding:name`` for one text encoder, or
    None when no embeddings folder holds ``name``. What ``ClipTokenizer.tokenize_weighted`` takes.

    ``dirs``: the folders to search (default: the configured embeddings folders, read at each lookup)."""

    def __init__(self, tower: str, width: int, dirs: Iterable[Path] | None = None):
        self.tower = tower
        self.width = width
        self.dirs = None if dirs is None else [Path(d) for d in dirs]

    def __call__(self, name: str) -> torch.Tensor | None:
        path = find_embedding(name, self.dirs)
        return None if path is None else vectors_for(path, self.tower, self.width)


def warn_missing(names: Iterable[str], dirs: Sequence[Path] | None = None) -> None:
    """Log one warning per embedding name that was not found (see ``missing_message``)."""
    for name in dict.fromkeys(names):
        log.warning("%s", missing_message(name, dirs))
