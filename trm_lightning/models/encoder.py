"""The seed's StandardDemoEncoder: demo (input, output) pairs -> context tokens for the TRM prefix.

::

    StandardDemoEncoder
    ├── DemoGridEncoder (per valid demo pair)
    │   ├── separate input / output token embeddings, [input; output] -> 2*S*S tokens, x sqrt(D)
    │   ├── RoPE over positions 0..2*S*S-1, PAD keys masked
    │   ├── encoder_num_layers blocks (post- or pre-norm, optional layer scale)
    │   ├── pooling over non-PAD tokens: mean | attention (one learned query) | weighted (softmax scores)
    │   └── linear projection -> one D-vector per demo
    └── DemoSetEncoder (over the K demos of a row)
        ├── puzzle_emb_len learned query tokens
        ├── encoder_set_layers cross-attention layers over the valid demos only (+ SwiGLU)
        └── final RMSNorm -> context (B, puzzle_emb_len, D), unit RMS per token

Only the valid demo slots are encoded (packed, then scattered back), so masked slots cost nothing and
cannot change the output. ``StandardDemoEncoder`` is a :class:`~trm_lightning.models.conditioning.Conditioner`:
``model.conditioner: StandardDemoEncoder`` (the default) with the seed's knobs as its ``init_args``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from trm_lightning.checks import check_at_least
from trm_lightning.errors import ConfigError
from trm_lightning.models.conditioning import Conditioner, ConditionerShape
from trm_lightning.models.layers import (
    Block,
    CrossAttention,
    PackedLayout,
    POS_ENCODINGS,
    RotaryEmbedding,
    lecun_linear,
    rms_norm,
    trunc_normal_,
)
from trm_lightning.vocab import PAD, VOCAB_SIZE

POOLING_METHODS = ("mean", "attention", "weighted")
TRANSFORMS = ("concat", "diff", "cross")
ATTENTION_LAYOUTS = ("buckets", "packed")


_compiled_encode_fn = None


def _compiled_encode():
    """``torch.compile`` of :meth:`DemoGridEncoder._encode` with dynamic shapes (the number of pairs and the
    bucket widths change every step), made once per process on first use; a free function, so the module
    itself stays plain (EMA copies, pickling and checkpoints never see a compiled wrapper)."""
    global _compiled_encode_fn
    if _compiled_encode_fn is None:
        _compiled_encode_fn = torch.compile(DemoGridEncoder._encode, dynamic=True)
    return _compiled_encode_fn


_compiled_packed_fn = None


def _compiled_packed():
    """``torch.compile`` of :meth:`DemoGridEncoder._packed_body` (the packed path's layers and pooling), dynamic
    shapes, made once per process; the packing itself (a ``nonzero`` and the one host sync) stays eager."""
    global _compiled_packed_fn
    if _compiled_packed_fn is None:
        _compiled_packed_fn = torch.compile(DemoGridEncoder._packed_body, dynamic=True)
    return _compiled_packed_fn


def _any_or_all(preferred: Tensor, fallback: Tensor) -> Tensor:
    """``preferred`` (N, L) where a row has any True, else that row of ``fallback`` (never an empty mask)."""
    return torch.where(preferred.any(dim=1, keepdim=True), preferred, fallback)


class DemoGridEncoder(nn.Module):
    """Encodes one demo pair (input grid, output grid), as canvas tokens, into one D-vector.

    ``crop_buckets``: encode only each pair's real cells, in this many length buckets (0 = the whole
    canvas, as the seed's code did; same result, more compute).

    ``transform`` (seed §1, transformation modelling) decides what the encoder sees of a pair:

    - ``concat``: the tokens of [input; output], one self-attention over both (the seed's encoder);
    - ``diff``: a third segment of per-cell tokens ``(colour in, colour out)`` wherever both grids have a
      cell (a learned embedding per pair of tokens: "unchanged red", "blue -> green", ...);
    - ``cross``: self-attention within each grid only, then one cross-attention block in which every token
      attends to the input grid's tokens; only the output grid's tokens are pooled.

    ``compile``: run the encoding of each bucket (embeddings, blocks, pooling) through ``torch.compile``
    with dynamic shapes; for GPUs.

    ``attention``: ``buckets`` (the length buckets above, padded within a bucket, a key mask over the padding)
    or ``packed``: every pair's real cells in one packed row, no padding and no mask, attention by
    :func:`~trm_lightning.models.layers.packed_attention` (flash attention over variable lengths on a CUDA
    device in half precision; a padded reference elsewhere). Same output; ``transform="cross"`` is not packed.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_layers: int,
        canvas_size: int,
        vocab_size: int = VOCAB_SIZE,
        expansion: float = 4.0,
        pooling: str = "mean",
        norm_style: str = "post",
        layer_scale_init: float = 0.0,
        rms_norm_eps: float = 1e-5,
        rope_theta: float = 10000.0,
        crop_buckets: int = 16,
        transform: str = "concat",
        compile: bool = False,
        attention: str = "buckets",
        pos_encoding: str = "rope",
        absolute_positions: bool = False,
    ) -> None:
        super().__init__()
        if pos_encoding not in POS_ENCODINGS:
            raise ValueError(f"pos_encoding must be one of {POS_ENCODINGS}, got {pos_encoding!r}")
        if attention not in ATTENTION_LAYOUTS:
            raise ValueError(f"attention must be one of {ATTENTION_LAYOUTS}, got {attention!r}")
        if attention == "packed" and transform == "cross":
            raise ValueError("attention='packed' does not support transform='cross' (its per-grid masks); use buckets")
        self.attention = attention
        if pooling not in POOLING_METHODS:
            raise ValueError(f"pooling must be one of {POOLING_METHODS}, got {pooling!r}")
        if transform not in TRANSFORMS:
            raise ValueError(f"transform must be one of {TRANSFORMS}, got {transform!r}")
        self.transform = transform
        self.vocab_size = vocab_size
        self.cells = canvas_size * canvas_size
        self.segments = 3 if transform == "diff" else 2
        self.pooling = pooling
        self.crop_buckets = crop_buckets
        self.use_compile = compile  # not `self.compile`: that would hide nn.Module.compile()
        self.norm_style = norm_style
        self.eps = rms_norm_eps
        self.embed_scale = math.sqrt(hidden_size)
        self.input_embed = nn.Embedding(vocab_size, hidden_size)
        self.output_embed = nn.Embedding(vocab_size, hidden_size)
        embeds = [self.input_embed, self.output_embed]
        if transform == "diff":
            self.diff_embed = nn.Embedding(vocab_size * vocab_size, hidden_size)
            embeds.append(self.diff_embed)
        self.canvas_size = canvas_size
        if absolute_positions:  # learned row and column embeddings, shared by the segments
            self.row_embed = nn.Embedding(canvas_size, hidden_size)
            self.col_embed = nn.Embedding(canvas_size, hidden_size)
            embeds += [self.row_embed, self.col_embed]
        self.absolute_positions = absolute_positions
        for emb in embeds:
            trunc_normal_(emb.weight.data, 1.0 / math.sqrt(hidden_size))
        self.rope = RotaryEmbedding(hidden_size // num_heads, self.segments * self.cells, rope_theta,
                                    grid_side=canvas_size if pos_encoding == "rope2d" else None)
        self.layers = nn.ModuleList(
            Block(hidden_size, num_heads, expansion, norm_style, layer_scale_init, rms_norm_eps) for _ in range(num_layers)
        )
        if transform == "cross":
            self.cross = Block(hidden_size, num_heads, expansion, norm_style, layer_scale_init, rms_norm_eps, cross=True)
        if pooling == "attention":
            self.pool_query = nn.Parameter(trunc_normal_(torch.empty(1, 1, hidden_size), 0.02))
            self.pool_attn = CrossAttention(hidden_size, num_heads)
        elif pooling == "weighted":
            self.pool_score = lecun_linear(hidden_size, 1)
        self.pool_proj = lecun_linear(hidden_size, hidden_size)

    def forward(self, demo_inputs: Tensor, demo_outputs: Tensor) -> Tensor:
        """(N, S*S) input tokens and (N, S*S) output tokens -> (N, D).

        PAD cells are never keys and never pooled, so they cannot change the result: with ``crop_buckets``
        > 0 they are not computed at all. Each pair keeps only its real cells (grid + EOS border) with their
        original positions; pairs are sorted by length and encoded in ``crop_buckets`` equal-count buckets,
        each padded only to its own longest pair. Same output as the full canvas (a test checks), at a
        cost that follows the grids' real size. Costs one host sync per call (the bucket lengths).
        """
        inputs, outputs = demo_inputs.long(), demo_outputs.long()
        segments = [inputs, outputs]
        if self.transform == "diff":  # (in, out) token pairs where both grids have a cell, else PAD (id 0)
            both = (inputs != PAD) & (outputs != PAD)
            segments.append(torch.where(both, inputs * self.vocab_size + outputs, PAD))
        tokens = torch.cat(segments, dim=1)  # (N, segments * S*S)
        real = tokens != PAD  # EOS and colours count, PAD does not
        if self.attention == "packed" and tokens.shape[0] > 0:
            return self._encode_packed(tokens, real)
        encode = (lambda *a: _compiled_encode()(self, *a)) if self.use_compile else self._encode
        if self.crop_buckets <= 0 or tokens.shape[0] == 0:
            return encode(tokens, None, real)
        lengths = real.sum(1)
        by_length = torch.argsort(lengths)
        # per row, the positions of its real cells first (in canvas order), then its PAD cells
        positions = torch.sort((~real).to(torch.int8), dim=1, stable=True).indices
        sorted_lengths = lengths[by_length].tolist()  # the one host sync: bucket shapes
        n = len(sorted_lengths)
        bounds = sorted({round(n * b / self.crop_buckets) for b in range(1, self.crop_buckets + 1)})
        chunks, start = [], 0
        for end in bounds:
            if end <= start:
                continue
            rows = by_length[start:end]
            width = max(1, sorted_lengths[end - 1])
            pos = positions[rows, :width]
            mask = torch.arange(width, device=tokens.device) < lengths[rows, None]
            chunks.append(encode(tokens[rows].gather(1, pos), pos, mask))
            start = end
        return torch.cat(chunks)[torch.argsort(by_length)]

    def _encode(self, tokens: Tensor, positions: Tensor | None, mask: Tensor) -> Tensor:
        """(N, L) tokens at canvas ``positions`` (None: the whole canvas, in order) -> (N, D) vectors."""
        if positions is None:
            positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
        segment = positions // self.cells  # 0 input, 1 output, 2 diff
        h = self._embed(tokens, positions)
        rope = self.rope(positions)
        attend = mask
        if self.transform == "cross":  # each grid attends within itself
            attend = (segment.unsqueeze(2) == segment.unsqueeze(1)) & mask.unsqueeze(1)
        for layer in self.layers:
            h = layer(h, rope, attend)
        pool_mask = mask
        if self.transform == "cross":  # every token attends to the input grid; the output grid is pooled
            h = self.cross(h, key_mask=_any_or_all(mask & (segment == 0), mask), memory=h)
            pool_mask = _any_or_all(mask & (segment == 1), mask)
        if self.norm_style == "pre":
            h = rms_norm(h, self.eps)
        return self.pool_proj(self._pool(h, pool_mask))

    def _embed(self, tokens: Tensor, positions: Tensor) -> Tensor:
        """Token embeddings (..., L, D) x sqrt(D), each token by its segment's table (input, output, diff), plus,
        with ``absolute_positions``, its cell's row and column embeddings (the same cell in every segment)."""
        segment = positions // self.cells  # 0 input, 1 output, 2 diff
        embeds = [self.input_embed, self.output_embed] + ([self.diff_embed] if self.transform == "diff" else [])
        h = None
        for i, embed in enumerate(embeds):
            mine = segment == i
            part = embed(torch.where(mine, tokens, PAD)) * mine.unsqueeze(-1)
            h = part if h is None else h + part
        if self.absolute_positions:
            cell = positions % self.cells
            h = h + self.row_embed(cell // self.canvas_size) + self.col_embed(cell % self.canvas_size)
        return h * self.embed_scale

    def _encode_packed(self, tokens: Tensor, real: Tensor) -> Tensor:
        """``attention="packed"``: the real cells of every pair in one row (1, T, D), each pair attending within
        itself, then pooled per pair -> (N, D). One host sync (the longest pair)."""
        lengths = real.sum(1)
        pair, positions = real.nonzero(as_tuple=True)  # grouped by pair, canvas order within it
        max_len = max(1, int(lengths.max()))
        cu = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
        body = (lambda *a: _compiled_packed()(self, *a)) if self.use_compile else self._packed_body
        return body(tokens[pair, positions], positions, pair, lengths, cu, max_len)

    def _packed_body(self, tokens: Tensor, positions: Tensor, pair: Tensor, lengths: Tensor, cu: Tensor,
                     max_len: int) -> Tensor:
        """The packed path after packing: (T,) tokens at canvas ``positions`` of pairs ``pair`` -> (N, D)."""
        layout = PackedLayout(cu, cu, max_len, max_len)
        h = self._embed(tokens[None], positions[None])
        rope = self.rope(positions[None])
        for layer in self.layers:
            h = layer(h, rope, layout)
        if self.norm_style == "pre":
            h = rms_norm(h, self.eps)
        h = h[0]  # (T, D)
        n = lengths.shape[0]
        if self.pooling == "mean":
            pooled = h.new_zeros(n, h.shape[-1]).index_add_(0, pair, h) / lengths.clamp_min(1).to(h.dtype)[:, None]
        elif self.pooling == "attention":
            q = self.pool_query.to(h.dtype).expand(1, n, -1)
            pooled = self.pool_attn(q, h[None], layout.pooling(lengths, max_len))[0]
        else:  # weighted: a softmax over each pair's cells
            scores = self.pool_score(h).squeeze(-1).float()
            top = scores.new_full((n,), float("-inf")).scatter_reduce(0, pair, scores, "amax")
            e = (scores - top[pair]).exp()
            weights = (e / e.new_zeros(n).index_add_(0, pair, e)[pair]).to(h.dtype)
            pooled = h.new_zeros(n, h.shape[-1]).index_add_(0, pair, weights[:, None] * h)
        return self.pool_proj(pooled)

    def _pool(self, h: Tensor, key_mask: Tensor) -> Tensor:
        if self.pooling == "mean":
            w = key_mask.to(h.dtype).unsqueeze(-1)  # (N, T, 1)
            return (h * w).sum(1) / w.sum(1).clamp_min(1.0)
        if self.pooling == "attention":
            q = self.pool_query.to(h.dtype).expand(h.shape[0], -1, -1)
            return self.pool_attn(q, h, key_mask).squeeze(1)
        scores = self.pool_score(h).squeeze(-1).float().masked_fill(~key_mask, float("-inf"))
        weights = torch.softmax(scores, dim=-1).to(h.dtype)  # (N, T)
        return torch.einsum("nt,ntd->nd", weights, h)


class DemoSetEncoder(nn.Module):
    """Aggregates the K demo vectors of each row into ``output_tokens`` context tokens."""

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        output_tokens: int,
        num_layers: int = 1,
        expansion: float = 4.0,
        norm_style: str = "post",
        layer_scale_init: float = 0.0,
        rms_norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.eps = rms_norm_eps
        self.queries = nn.Parameter(trunc_normal_(torch.empty(output_tokens, hidden_size), 0.02))
        self.layers = nn.ModuleList(
            Block(hidden_size, num_heads, expansion, norm_style, layer_scale_init, rms_norm_eps, cross=True)
            for _ in range(num_layers)
        )

    def forward(self, demo_vectors: Tensor, demo_mask: Tensor) -> Tensor:
        """(B, K, D) demo vectors and (B, K) validity -> (B, output_tokens, D) with unit RMS per token."""
        # a row with no valid demo would attend to nothing (NaN): let it attend to its zero vectors instead
        key_mask = demo_mask | ~demo_mask.any(dim=1, keepdim=True)
        q = self.queries.to(demo_vectors.dtype).unsqueeze(0).expand(demo_vectors.shape[0], -1, -1)
        for layer in self.layers:
            q = layer(q, key_mask=key_mask, memory=demo_vectors)
        return rms_norm(q, self.eps)


class StandardDemoEncoder(Conditioner):
    """The seed's demo encoder (StandardDemoEncoder), the default ``model.conditioner``.

    A transformer over each demo pair, pooled to one vector per pair, then a set encoder of learned query tokens
    over the task's pairs, emitting ``puzzle_emb_len`` context tokens of unit RMS.

    Each argument after ``shape`` is one of the seed's knobs (its name there in brackets); set them in YAML as
    ``model.conditioner.init_args.<name>`` or on the command line as ``--model.conditioner.<name>``.

    Args:
        shape: the sizes shared with the TRM (hidden size, heads, context tokens, canvas), filled in by the model.
        num_layers: transformer layers of the per-demo grid encoder (``encoder_num_layers``).
        pooling_method: how a demo pair's tokens become one vector: ``mean``, ``attention`` (one learned query)
            or ``weighted`` (softmax scores) (``encoder_pooling_method``).
        set_layers: cross-attention layers of the set encoder over the demos (``encoder_set_layers``).
        layer_scale_init: CaiT layer-scale init of the encoder's residual branches, 0 = off
            (``encoder_layer_scale_init``).
        norm_style: encoder blocks with ``post``-norm (TRM style) or ``pre``-norm (``encoder_norm_style``).
        transform: what the encoder reads of a demo pair (seed §1): ``concat`` ([input; output], the seed's),
            ``diff`` (plus per-cell "colour in -> colour out" tokens) or ``cross`` (each grid attends within
            itself, then to the input grid; the output grid is pooled).
        test_conditioning: the set encoder also attends to the encoded test input, so the context depends on the
            query, not only on the task's demos (seed §1, "cross-attend demos -> test input").
        crop_buckets: encode only the real cells of each demo pair, sorted into this many length buckets (0 = the
            whole canvas; the output is the same, only the compute differs). 16 measured fastest on an H200 at the
            ARC config (benchmarks/RESULTS.md: 2, 4, 8, 16, 32).
        pos_encoding: the grid encoder's positions: ``rope`` (1-D RoPE over the pair's flattened input then output
            canvas) or ``rope2d`` (axial RoPE by row and column; a cell of the input and the same cell of the
            output share their rotation, so attention compares them at no distance).
        attention: how the grid encoder's attention skips the padding: ``buckets`` (``crop_buckets`` length
            buckets, a key mask within each) or ``packed`` (every pair's real cells in one packed sequence, no
            mask: flash attention over variable lengths on a GPU in bf16/fp16). The same output either way; not
            with ``transform: cross``.
        absolute_positions: add learned row and column embeddings to every grid token (the same cell of the
            input and the output shares them). With RoPE alone a token knows where it is only through what
            attention learns to compare; with them the blocks' MLPs can mix a cell's colour with its place, so a
            pooled demo vector can say *where* things are (at the bottom, on an edge). The few-shot notebook
            (docs/fewshot_findings.md) measures it.
    """

    runtime_options = ("crop_buckets", "attention")

    def __init__(
        self,
        shape: ConditionerShape,
        num_layers: int = 2,
        pooling_method: Literal["mean", "attention", "weighted"] = "mean",
        set_layers: int = 1,
        layer_scale_init: float = 0.0,
        norm_style: Literal["post", "pre"] = "post",
        transform: Literal["concat", "diff", "cross"] = "concat",
        test_conditioning: bool = False,
        crop_buckets: int = 16,
        attention: Literal["buckets", "packed"] = "buckets",
        pos_encoding: Literal["rope", "rope2d"] = "rope",
        absolute_positions: bool = False,
    ) -> None:
        super().__init__()
        key = "model.conditioner."
        if attention == "packed" and transform == "cross":
            raise ConfigError(f"{key}attention=packed does not support {key}transform=cross; use attention=buckets")
        check_at_least(key + "num_layers", num_layers, 0)
        check_at_least(key + "set_layers", set_layers, 1)  # 0 would leave the context blind to the demos
        check_at_least(key + "layer_scale_init", layer_scale_init, 0)
        check_at_least(key + "crop_buckets", crop_buckets, 0)
        if pos_encoding == "rope2d" and (shape.hidden_size // shape.num_heads) % 4:
            raise ConfigError(f"{key}pos_encoding=rope2d needs model.hidden_size / model.num_heads divisible by 4, "
                              f"got {shape.hidden_size // shape.num_heads}")
        D = shape.hidden_size
        self.hidden_size = D
        self.grid_encoder = DemoGridEncoder(
            D, shape.num_heads, num_layers, shape.canvas_size, shape.vocab_size, shape.expansion, pooling_method,
            norm_style, layer_scale_init, crop_buckets=crop_buckets, transform=transform, compile=shape.compile,
            attention=attention, pos_encoding=pos_encoding, absolute_positions=absolute_positions,
        )
        self.test_conditioning = test_conditioning
        if test_conditioning:  # marks the query's slot in the set encoder's memory
            self.query_slot = nn.Parameter(trunc_normal_(torch.empty(D), 0.02))
        self.set_encoder = DemoSetEncoder(
            D, shape.num_heads, shape.prefix_len, set_layers, shape.expansion, norm_style, layer_scale_init
        )

    def forward(self, batch: Mapping[str, Tensor]) -> Tensor:
        """The context (B, prefix_len, D) of the batch rows' demos (and, with ``test_conditioning``, their query)."""
        query = batch["inputs"] if self.test_conditioning else None
        return self.encode(batch["demo_inputs"], batch["demo_outputs"], batch["demo_mask"], query)

    def encode(
        self, demo_inputs: Tensor, demo_outputs: Tensor, demo_mask: Tensor, query_inputs: Tensor | None = None
    ) -> Tensor:
        """(B, K, S*S) demo inputs/outputs and (B, K) mask -> context (B, prefix_len, D).

        With ``test_conditioning`` the query's input grid (B, S*S) is encoded too (as a pair with an empty
        output) and joins the demos in the set encoder's memory, marked by a learned slot vector.
        """
        vectors, query = self._demo_vectors(demo_inputs, demo_outputs, demo_mask, query_inputs)
        return self._aggregate(vectors, demo_mask, query)

    def encode_views(self, batch: Mapping[str, Tensor], view_masks: Sequence[Tensor]) -> list[Tensor]:
        """The batch's context and one per view mask (:meth:`Conditioner.encode_views`), with every demo pair
        encoded once: the grid encoder reads each pair on its own, so only the set encoder runs once per view."""
        mask = batch["demo_mask"]
        for view in view_masks:
            if (view.bool() & ~mask.bool()).any():
                raise ValueError("a view mask selects a demo slot that the batch's demo_mask marks invalid")
        query = batch["inputs"] if self.test_conditioning else None
        vectors, query = self._demo_vectors(batch["demo_inputs"], batch["demo_outputs"], mask, query)
        return [self._aggregate(vectors, m, query) for m in (mask, *view_masks)]

    def _demo_vectors(
        self, demo_inputs: Tensor, demo_outputs: Tensor, demo_mask: Tensor, query_inputs: Tensor | None
    ) -> tuple[Tensor, Tensor | None]:
        """One vector per demo slot (B, K, D), zero at invalid slots, and the encoded query (B, D) or None."""
        B, K, T = demo_inputs.shape
        valid = demo_mask.reshape(B * K).nonzero().squeeze(1)  # indices of the valid slots
        ins, outs = demo_inputs.reshape(B * K, T)[valid], demo_outputs.reshape(B * K, T)[valid]
        if self.test_conditioning:
            if query_inputs is None:
                raise ValueError("test_conditioning needs the query inputs")
            ins = torch.cat([ins, query_inputs.to(ins.dtype)])
            outs = torch.cat([outs, torch.zeros_like(query_inputs, dtype=outs.dtype)])
        encoded = self.grid_encoder(ins, outs)
        n_demos = valid.shape[0]
        vectors = encoded.new_zeros(B * K, encoded.shape[-1]).index_copy(0, valid, encoded[:n_demos])
        query = encoded[n_demos:] + self.query_slot.to(encoded.dtype) if self.test_conditioning else None
        return vectors.view(B, K, -1), query

    def _aggregate(self, vectors: Tensor, demo_mask: Tensor, query: Tensor | None) -> Tensor:
        """The set encoder over the demo vectors that ``demo_mask`` keeps (and the query, if any)."""
        # slots outside the mask must not reach the set encoder's output (they never do through attention, but an
        # all-masked row attends to its zero vectors): zero them as the per-view encode would have left them
        memory, mask = vectors * demo_mask.unsqueeze(-1).to(vectors.dtype), demo_mask
        if query is not None:
            memory = torch.cat([memory, query.unsqueeze(1)], dim=1)
            mask = torch.cat([demo_mask, torch.ones_like(demo_mask[:, :1])], dim=1)
        return self.set_encoder(memory, mask)
