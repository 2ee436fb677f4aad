"""CLIP text encoders (transformers' ``CLIPTextModel``) and the ``TextEncoder`` handle.

Towers, named as ComfyUI names them:

- ``l``: OpenAI CLIP ViT-L/14 (SD 1.x; SDXL's first encoder). Checkpoints store it in
  transformers' layout, which loads as it is.
- ``h``: OpenCLIP ViT-H/14 (SD 2.x) and ``g``: OpenCLIP ViT-bigG/14 (SDXL's second encoder,
  the refiner's only one). Checkpoints store these in OpenCLIP's layout (fused ``in_proj``
  attention weights, ``text_projection`` as a matrix to right-multiply); ``openclip_to_hf``
  converts.

``TextEncoder.encode(text)`` gives ``(cond [1, 77*k, D], pooled [1, P])`` float32 on the CPU:
prompt weights applied the ComfyUI way (each token's hidden state moved away from the empty
prompt's by its weight), prompts past 75 tokens in chunks of 77, concatenated. The hidden
layer used is the family's default (SD 1.x: last, SD 2.x / SDXL: penultimate) unless
``set_last_layer(n)`` picks another. For SDXL, cond concatenates both towers (768 + 1280)
and pooled is bigG's projected pooled output (the first chunk's).

``embedding:NAME`` in a prompt stands for a textual-inversion embedding from the embeddings
folders (``nodeflow.models.embeddings``: formats, lookup, a missing name left out with a
warning): ``tokenize`` puts its vectors in the chunks in place of token ids, each tower taking
its own (``clip_l`` / ``clip_g`` of an SDXL file), and ``ClipTextModel`` splices them into the
token embeddings, before the position embeddings are added; the causal mask and the pooled
output (taken at the end token, whose id stays in the input) are as for words.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from nodeflow.models import devices, embeddings, patching
from nodeflow.models.files import CheckpointError, assign_weights
from nodeflow.models.tokenizer import BOS, EOS, Chunk, ClipTokenizer


def openclip_to_hf(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """OpenCLIP text-tower keys (no ``cond_stage_model.model.`` prefix) -> transformers keys
    (``text_model.*`` and ``text_projection.weight``). Keys outside the text tower (``logit_scale``,
    ``attn_mask``, ``visual.*``) are dropped."""
    out: dict[str, torch.Tensor] = {}
    for key, t in sd.items():
        p = "text_model."
        if key == "token_embedding.weight":
            out[p + "embeddings.token_embedding.weight"] = t
        elif key == "positional_embedding":
            out[p + "embeddings.position_embedding.weight"] = t
        elif key.startswith("ln_final."):
            out[p + "final_layer_norm." + key[len("ln_final."):]] = t
        elif key == "text_projection":
            out["text_projection.weight"] = t.T.contiguous()                 # x @ W  ->  Linear(W.T)
        elif key.startswith("transformer.resblocks."):
            i, rest = key[len("transformer.resblocks."):].split(".", 1)
            layer = f"{p}encoder.layers.{i}."
            if rest.startswith("attn.in_proj_"):
                kind = rest.rsplit("_", 1)[1]                                # weight | bias
                for name, part in zip(("q_proj", "k_proj", "v_proj"), t.chunk(3, dim=0)):
                    out[f"{layer}self_attn.{name}.{kind}"] = part
            else:
                for a, b in (("ln_1.", "layer_norm1."), ("ln_2.", "layer_norm2."),
                             ("attn.out_proj.", "self_attn.out_proj."), ("mlp.c_fc.", "mlp.fc1."),
                             ("mlp.c_proj.", "mlp.fc2.")):
                    if rest.startswith(a):
                        out[layer + b + rest[len(a):]] = t
                        break
                else:
                    raise CheckpointError(f"unknown OpenCLIP text-tower key {key!r}")
    return out


def text_config_from_shapes(shapes: Mapping[str, tuple], *, hidden_act: str, num_heads: int | None = None):
    """A ``CLIPTextConfig`` read from transformers-layout shapes. Heads are 64 wide (every CLIP
    text tower SD uses); narrower test towers get one head. The layer count is one past the highest
    ``encoder.layers.N`` in any key, so a layer missing a weight shows as missing, not as extra.
    A key the architecture cannot be read without raises ``ValueError`` naming it."""
    from transformers import CLIPTextConfig

    layer_keys = [int(m.group(1)) for k in shapes if (m := re.match(r"text_model\.encoder\.layers\.(\d+)\.", k))]
    try:
        vocab, width = shapes["text_model.embeddings.token_embedding.weight"]
        intermediate = shapes["text_model.encoder.layers.0.mlp.fc1.weight"][0]
        positions = shapes["text_model.embeddings.position_embedding.weight"][0]
    except KeyError as e:
        raise ValueError(f"missing key {e.args[0]!r}") from None
    projection = shapes.get("text_projection.weight", (width,))[0]
    return CLIPTextConfig(
        vocab_size=vocab, hidden_size=width, num_hidden_layers=max(layer_keys) + 1,
        intermediate_size=intermediate, num_attention_heads=num_heads or max(1, width // 64),
        max_position_embeddings=positions, hidden_act=hidden_act, projection_dim=projection, layer_norm_eps=1e-5,
        bos_token_id=BOS, eos_token_id=EOS, pad_token_id=EOS, attn_implementation="sdpa")


# (token embedding module, rows, columns, vectors) of the forward under way in this thread / task
_SPLICE: ContextVar[tuple | None] = ContextVar("nodeflow_clip_splice", default=None)
_PLACEHOLDER = 0      # the id at a spliced position; never the end token, which marks the pooled output


def _splice_vectors(module: nn.Module, _args, output: torch.Tensor):
    """Forward hook of a token embedding: puts the pending vectors (see ``ClipTextModel.forward``) in
    place of the looked-up ones. Does nothing outside such a forward, or for another model."""
    pending = _SPLICE.get()
    if pending is None or pending[0] is not module:
        return None
    _, rows, cols, values = pending
    output = output.clone()
    output[rows.to(output.device), cols.to(output.device)] = values.to(output.device, output.dtype)
    return output


class ClipTextModel(nn.Module):
    """transformers' ``CLIPTextModel`` plus an optional ``text_projection``, returning the hidden
    state of any layer and the (projected) pooled output. Input positions can take given vectors
    instead of token ids' embeddings (textual inversion): transformers' ``CLIPTextModel`` takes no
    ``inputs_embeds``, so a hook on its token embedding splices them in, leaving the rest of its
    forward (position embeddings, causal mask, pooled output at the first end token) as it is."""

    def __init__(self, config, projection: bool, missing_last_layers: int = 0):
        super().__init__()
        from transformers import CLIPTextModel

        self.transformer = CLIPTextModel(config)
        self.text_projection = nn.Linear(config.hidden_size, config.projection_dim, bias=False) if projection else None
        self.num_layers = config.num_hidden_layers
        self.missing_last_layers = missing_last_layers   # final layers of the original tower this one lacks
        self.width = config.hidden_size
        self._inner.embeddings.token_embedding.register_forward_hook(_splice_vectors)

    @property
    def _inner(self) -> nn.Module:
        """The module holding embeddings / encoder / final_layer_norm (transformers 4 nests it in .text_model)."""
        return getattr(self.transformer, "text_model", self.transformer)

    def hf_prefix(self) -> str:
        """How transformers names the keys of ``self.transformer`` (with or without ``text_model.``)."""
        return "text_model." if self._inner is not self.transformer else ""

    def hidden_index(self, layer: int) -> int:
        """Where layer ``layer`` (-1 = last, -2 = penultimate, ...) of the original tower is in
        ``hidden_states`` (0: the embeddings, i: the output of layer i). Layers count from the
        original's end: diffusers' SD 2.x text encoder has 23 of ViT-H's 24 layers, so its last one
        is layer -2. Layers before the first count as the last."""
        full = self.num_layers + self.missing_last_layers
        index = full + 1 + layer if -layer <= full else full
        if index > self.num_layers:
            which = f"{layer} (before the first: the last)" if -layer > full else f"{layer}"
            raise ValueError(f"CLIP layer {which} is not in this text encoder: it lacks the original's last "
                             f"{self.missing_last_layers} layer(s) (as diffusers' SD 2.x text_encoder does); "
                             f"use {-1 - self.missing_last_layers} or an earlier layer")
        return index

    def forward(self, ids: torch.Tensor, layer: int, final_norm: bool,
                vectors: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None, project: bool = True
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """ids (B, 77) -> hidden state after layer ``layer`` (-1 = last), (B, 77, D); pooled (B, P).
        ``vectors``: ``(rows [N], columns [N], values [N, D])``: the input embedding at
        ``(rows[i], columns[i])`` is ``values[i]`` instead of the token embedding of the id there (whose
        value then does not matter, as long as it is not the end token: the pooled output is taken at
        the first end token's position)."""
        index = self.hidden_index(layer)
        token = _SPLICE.set((self._inner.embeddings.token_embedding, *vectors)) if vectors is not None else None
        try:
            out = self.transformer(input_ids=ids, output_hidden_states=True)
        finally:
            if token is not None:
                _SPLICE.reset(token)
        hidden = out.hidden_states[index]
        if final_norm:
            hidden = self._inner.final_layer_norm(hidden)
        pooled = out.pooler_output
        if self.text_projection is not None and project:
            pooled = self.text_projection(pooled)
        return hidden, pooled


def build_text_model(sd: dict[str, torch.Tensor], *, hidden_act: str, num_heads: int | None = None,
                     missing_last_layers: int = 0, what: str = "text encoder") -> ClipTextModel:
    """A ``ClipTextModel`` holding the tensors of ``sd`` (transformers layout) without copying them.
    ``missing_last_layers``: how many final layers of the original tower ``sd`` lacks (see
    ``ClipTextModel.hidden_index``). Keys that do not fit raise ``CheckpointError`` naming ``what``."""
    sd = {k: v for k, v in sd.items() if not k.endswith("position_ids")}
    try:
        config = text_config_from_shapes({k: tuple(v.shape) for k, v in sd.items()}, hidden_act=hidden_act,
                                         num_heads=num_heads)
    except ValueError as e:
        raise CheckpointError(f"cannot read the architecture of the {what}: {e}. "
                              "Is the file truncated or a different kind of model?") from None
    with torch.device("meta"):
        model = ClipTextModel(config, projection="text_projection.weight" in sd,
                              missing_last_layers=missing_last_layers)
    prefix = model.hf_prefix()
    sd = {("transformer." + prefix + k[len("text_model."):] if k.startswith("text_model.") else k): v
          for k, v in sd.items()}
    assign_weights(model, sd, what)
    emb = model._inner.embeddings
    emb.position_ids = torch.arange(config.max_position_embeddings).expand(1, -1)   # a non-persistent buffer
    return model


@dataclass
class Tower:
    """One CLIP tower inside a TextEncoder."""
    name: str                 # "l", "h" or "g"
    model: ClipTextModel
    tokenizer: ClipTokenizer  # pads with 49407 (l) or 0 (h, g)
    default_layer: int        # hidden layer used when no clip skip is set: -1 last, -2 penultimate
    final_norm: bool          # apply the final LayerNorm to that layer (SD 1.x, 2.x) or not (SDXL)


FAMILY_TOWERS = {  # family -> [(tower, pad token, default layer, final norm)]
    "sd1": [("l", EOS, -1, True)],
    "sd2": [("h", 0, -2, True)],
    "sdxl": [("l", EOS, -2, False), ("g", 0, -2, False)],
    "sdxl_refiner": [("g", 0, -2, False)],
}


class TextEncoder:
    """The CLIP handle of a checkpoint: tokenizer(s), text tower(s), and the clip-skip setting."""

    def __init__(self, towers: list[Tower], *, family: str, device: torch.device | None = None,
                 layer: int | None = None, embedding_dirs: Iterable[str | Path] | None = None):
        self.towers = towers
        self.family = family
        self.device = device or devices.get_device()
        self.layer = layer                  # None: each tower's default; else -1 last, -2 penultimate, ...
        self.patches: dict[str, patching.Patches] = {}   # per tower name: weight patches (LoRA)
        # where embedding:NAME is looked up; None: the configured embeddings folders (nodeflow.folders)
        self.embedding_dirs = None if embedding_dirs is None else [Path(d) for d in embedding_dirs]

    @property
    def dtype(self) -> torch.dtype:
        return next(self.towers[0].model.parameters()).dtype

    def clone(self) -> TextEncoder:
        """A handle sharing the weights, with its own settings."""
        other = TextEncoder(list(self.towers), family=self.family, device=self.device, layer=self.layer,
                            embedding_dirs=self.embedding_dirs)
        other.patches = dict(self.patches)
        return other

    def set_last_layer(self, n: int) -> TextEncoder:
        """A clone that takes the hidden state of layer ``n`` (ComfyUI's CLIPSetLastLayer: -1 = last,
        -2 = penultimate, ...). Layers past the first count as the last."""
        if not isinstance(n, int) or n >= 0:
            raise ValueError(f"last layer must be a negative integer (-1 = last layer), got {n!r}")
        clone = self.clone()
        clone.layer = n
        return clone

    def clip_skip(self, n: int) -> TextEncoder:
        """``set_last_layer`` that also takes A1111's positive form (clip skip 2 = layer -2)."""
        return self.set_last_layer(-abs(n))

    def tokenize(self, text: str) -> dict[str, list[Chunk]]:
        """The prompt as chunks of 77 (token, weight) pairs per tower: ``{"l": [...], "g": [...]}``.
        ``embedding:NAME`` becomes the embedding's vectors for each tower (1-D tensors in place of
        ids); a name that ``embedding_dirs`` (default: the configured embeddings folders) lacks is
        left out, with one logged warning for all towers. A file that is not an embedding, or whose
        vectors do not fit a tower's width, raises ``EmbeddingError`` naming it."""
        missing: list[str] = []
        out = {}
        for t in self.towers:
            lookup = embeddings.EmbeddingLookup(t.name, t.model.width, self.embedding_dirs)
            out[t.name] = t.tokenizer.tokenize_weighted(text, lookup, missing)
        if missing:
            embeddings.warn_missing(missing, self.embedding_dirs)
        return out

    def encode(self, text: str, projected: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cond [1, 77*k, D], pooled [1, P])`` float32 CPU for a prompt (weights, chunks; see module doc).
        ``projected=False``: the pooled output before the text projection (GLIGEN's phrases)."""
        return self.encode_tokens(self.tokenize(text), projected)

    @torch.no_grad()
    def encode_tokens(self, tokens: dict[str, list[Chunk]],
                      projected: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode the output of ``tokenize`` (one entry per tower)."""
        conds, pooled = [], None
        for tower in self.towers:
            chunks = tokens[tower.name]
            ids, vectors = self._ids_and_vectors(tower, chunks)                           # (k, 77)
            weights = torch.tensor([[w for _, w in c] for c in chunks], dtype=torch.float32)
            weighted = bool((weights != 1.0).any())
            if weighted:
                ids = torch.cat([ids, torch.tensor([[t for t, _ in tower.tokenizer.empty_chunk()]])])
            devices.model_manager().load(tower.model, self.device)
            patching.sync(tower.model, self.patches.get(tower.name, {}))
            hidden, pool = tower.model(ids.to(self.device), self.layer or tower.default_layer, tower.final_norm,
                                       vectors, projected)
            hidden = hidden.float().cpu()                                                # (k[+1], 77, D)
            if weighted:
                empty, hidden = hidden[-1], hidden[:-1]
                hidden = empty + (hidden - empty) * weights[..., None]
            conds.append(hidden.reshape(1, -1, hidden.shape[-1]))                       # (1, 77*k, D)
            pooled = pool[0:1].float().cpu()               # the first chunk's, of the last tower (bigG on SDXL)
        if len({c.shape[1] for c in conds}) != 1:
            raise ValueError("the towers tokenized the prompt into different numbers of chunks")
        return torch.cat(conds, dim=-1), pooled

    @staticmethod
    def _ids_and_vectors(tower: Tower, chunks: list[Chunk]):
        """The chunks' ids (k, 77), embedding vectors replaced by a placeholder id, and the
        ``vectors`` argument of ``ClipTextModel.forward`` for them (None when there are none)."""
        rows, at, values = [], [], []
        for i, chunk in enumerate(chunks):
            row = []
            for j, (t, _) in enumerate(chunk):
                if isinstance(t, torch.Tensor) and t.dim() == 1:
                    if t.shape[0] != tower.model.width:
                        raise ValueError(f"an embedding vector {t.shape[0]} wide was given to the CLIP-"
                                         f"{tower.name.upper()} text encoder, which takes {tower.model.width}")
                    at.append((i, j))
                    values.append(t)
                    row.append(_PLACEHOLDER)
                else:
                    row.append(int(t))
            rows.append(row)
        ids = torch.tensor(rows)
        if not values:
            return ids, None
        where = torch.tensor(at)
        return ids, (where[:, 0], where[:, 1], torch.stack([v.float() for v in values]))


def make_text_encoder(models: dict[str, ClipTextModel], family: str, device: torch.device | None = None) -> TextEncoder:
    """The TextEncoder of ``family`` ("sd1", "sd2", "sdxl", "sdxl_refiner") from its tower models."""
    towers = []
    for name, pad, layer, norm in FAMILY_TOWERS[family]:
        if name not in models:
            raise ValueError(f"the {family} text encoder needs its CLIP-{name.upper()} tower, which is missing")
        towers.append(Tower(name, models[name], ClipTokenizer(pad), layer, norm))
    return TextEncoder(towers, family=family, device=device)

