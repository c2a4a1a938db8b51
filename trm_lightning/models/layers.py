"""Building blocks shared by the TRM core and the demo encoder (pure ``nn.Module``s).

Follows the TRM reference (``reference/trm.md`` §1.3): bias-free linear layers with truncated LeCun-normal
init, RMSNorm without a gain computed in fp32, rotary position embeddings applied in fp32, fused-QKV
attention through ``F.scaled_dot_product_attention`` and SwiGLU with TRM's intermediate-size rounding.
Shapes: B batch, L sequence, D hidden, H heads, Dh head dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

try:  # flash attention over variable-length sequences (CUDA; torch >= 2.10)
    from torch.nn.attention.varlen import varlen_attn as _varlen_attn
except ImportError:  # pragma: no cover - older torch: the padded reference path serves
    _varlen_attn = None

# std of a standard normal truncated at +-2 sigma: dividing by it gives the requested std after truncation
_TRUNC_STD_AT_2 = 0.87962566103423978


def trunc_normal_(tensor: Tensor, std: float) -> Tensor:
    """JAX-style truncated normal (clip at +-2 sigma) whose *resulting* std is ``std``."""
    if std == 0:
        return tensor.zero_()
    s = std / _TRUNC_STD_AT_2
    return nn.init.trunc_normal_(tensor, mean=0.0, std=s, a=-2 * s, b=2 * s)


class CastedLinear(nn.Linear):
    """``nn.Linear`` that computes in its input's dtype (TRM's ``CastedLinear``): fp32 master weights, cast to bf16
    when the activations are bf16 (``forward_dtype: bfloat16``); with fp32 inputs it is ``nn.Linear`` exactly."""

    def forward(self, x: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight.to(x.dtype), bias)


def lecun_linear(in_features: int, out_features: int, bias: bool = False) -> CastedLinear:
    """A :class:`CastedLinear` with truncated LeCun-normal weights (std 1/sqrt(fan_in)) and zero bias."""
    layer = CastedLinear(in_features, out_features, bias=bias)
    with torch.no_grad():
        trunc_normal_(layer.weight, 1.0 / math.sqrt(in_features))
        if bias:
            layer.bias.zero_()
    return layer


def rms_norm(x: Tensor, eps: float = 1e-5) -> Tensor:
    """RMSNorm without a learnable gain, computed in fp32 and cast back to the input dtype.

    PyTorch's ``rms_norm`` accumulates in fp32 whatever the input dtype (bitwise equal to upcasting first,
    as TRM does, on CPU) and is one fused kernel on GPUs instead of six elementwise passes."""
    return F.rms_norm(x, (x.shape[-1],), eps=eps).to(x.dtype)


def swiglu_intermediate(hidden_size: int, expansion: float) -> int:
    """TRM's SwiGLU width: round(expansion * D * 2/3) rounded up to a multiple of 256 (1536 for D=512)."""
    inter = round(expansion * hidden_size * 2 / 3)
    return -(-inter // 256) * 256


class RotaryEmbedding(nn.Module):
    """Rotate-half RoPE tables for positions 0..max_positions-1 (non-persistent buffers).

    With ``grid_side`` the tables are 2-D (axial) RoPE over a canvas: position ``p >= grid_start`` is the cell
    ``q = (p - grid_start) % grid_side**2`` (so the segments of a demo pair, input then output, share their cells'
    rotations), at row ``q // grid_side + 1`` and column ``q % grid_side + 1``; positions before ``grid_start`` (the
    TRM's prefix) are at row 0, column 0. Half of each head's rotary frequencies turn with the row, half with the
    column, so a cell's relation to another (same column, one row up, ...) is one rotation wherever both are.
    The tables have the 1-D tables' shapes: :func:`apply_rope` uses either.
    """

    def __init__(
        self, head_dim: int, max_positions: int, base: float = 10000.0, grid_side: int | None = None,
        grid_start: int = 0,
    ) -> None:
        super().__init__()
        t = torch.arange(max_positions, dtype=torch.float32)
        if grid_side is None:
            inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
            freqs = torch.outer(t, inv_freq)  # (L, Dh/2)
        else:
            if head_dim % 4:
                raise ValueError(f"2-D RoPE needs a head dimension divisible by 4, got {head_dim}")
            half = head_dim // 2
            inv_freq = 1.0 / (base ** (torch.arange(0, half, 2, dtype=torch.float32) / half))  # (Dh/4,)
            cell = (t - grid_start).clamp_min(0) % (grid_side * grid_side)
            grid = t >= grid_start
            rows = torch.where(grid, torch.div(cell, grid_side, rounding_mode="floor") + 1, 0.0)
            cols = torch.where(grid, cell % grid_side + 1, 0.0)
            freqs = torch.cat((torch.outer(rows, inv_freq), torch.outer(cols, inv_freq)), dim=-1)  # (L, Dh/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (L, Dh)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(self, positions: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Return (cos, sin) of shape (L, Dh), or (..., L, Dh) when ``positions`` indexes the table."""
        if positions is None:
            return self.cos, self.sin
        return self.cos[positions], self.sin[positions]


POS_ENCODINGS = ("rope", "rope2d")


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x`` (B, H, L, Dh) in fp32. ``cos``/``sin`` are (L, Dh) or (B, L, Dh)."""
    if cos.dim() == 3:
        cos, sin = cos[:, None], sin[:, None]
    xf = x.float()
    return (xf * cos + _rotate_half(xf) * sin).to(x.dtype)


def _key_mask_to_attn(key_mask: Tensor | None) -> Tensor | None:
    # (B, Lk) bool, True = attend  ->  (B, 1, 1, Lk) for SDPA broadcasting over heads and queries;
    # (B, Lq, Lk) (a mask per query)  ->  (B, 1, Lq, Lk)
    if key_mask is None:
        return None
    return key_mask[:, None] if key_mask.dim() == 3 else key_mask[:, None, None, :]


@dataclass(frozen=True)
class PackedLayout:
    """Where each sequence lies in a packed row, for attention without padding: sequence ``i`` holds the tokens
    ``cu_q[i]:cu_q[i+1]`` of the queries and ``cu_k[i]:cu_k[i+1]`` of the keys (self-attention: the same layout).

    Passed where a key mask would go (``Attention``/``CrossAttention``/``Block`` ``key_mask=``), with the packed
    tensors as one row ``(1, T, D)``. On a CUDA device with half-precision inputs it runs
    ``torch.nn.attention.varlen.varlen_attn`` (flash attention over variable lengths, no mask and no padding);
    elsewhere it pads each sequence to the longest, masks the padding and runs SDPA, the same numbers as the
    masked path (the reference the tests compare against).
    """

    cu_q: Tensor  # (n + 1,) int32 cumulative query lengths
    cu_k: Tensor  # (n + 1,) int32 cumulative key lengths
    max_q: int
    max_k: int

    @classmethod
    def self_attention(cls, lengths: Tensor, max_len: int) -> "PackedLayout":
        cu = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
        return cls(cu, cu, max_len, max_len)

    def pooling(self, lengths: Tensor, max_len: int) -> "PackedLayout":
        """One query per sequence (a learned pooling query) over the keys of ``lengths``."""
        n = lengths.shape[0]
        return PackedLayout(torch.arange(n + 1, device=lengths.device, dtype=torch.int32),
                            F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32), 1, max_len)


def _packed_index(cu: Tensor, total: int) -> tuple[Tensor, Tensor]:
    """(sequence, position within it) of each of the ``total`` packed tokens."""
    tokens = torch.arange(total, device=cu.device)
    seq = torch.searchsorted(cu[1:].long(), tokens, right=True)
    return seq, tokens - cu.long()[seq]


def packed_attention(q: Tensor, k: Tensor, v: Tensor, layout: PackedLayout) -> Tensor:
    """(1, H, Tq, Dh) packed queries over (1, H, Tk, Dh) packed keys/values -> (1, H, Tq, Dh), each sequence
    attending only within itself."""
    if q.is_cuda and _varlen_attn is not None and q.dtype in (torch.float16, torch.bfloat16):
        out = _varlen_attn(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), layout.cu_q,
                           layout.cu_k, layout.max_q, layout.max_k)
        return out.transpose(0, 1).unsqueeze(0)
    n = layout.cu_q.shape[0] - 1
    H, Dh = q.shape[1], q.shape[3]
    seq_q, at_q = _packed_index(layout.cu_q, q.shape[2])
    seq_k, at_k = _packed_index(layout.cu_k, k.shape[2])

    def unpack(x: Tensor, seq: Tensor, at: Tensor, width: int) -> Tensor:
        out = x.new_zeros(n, width, H, Dh)
        out[seq, at] = x[0].transpose(0, 1)
        return out.transpose(1, 2)  # (n, H, width, Dh)

    valid = torch.zeros(n, layout.max_k, dtype=torch.bool, device=k.device)
    valid[seq_k, at_k] = True
    out = F.scaled_dot_product_attention(unpack(q, seq_q, at_q, layout.max_q), unpack(k, seq_k, at_k, layout.max_k),
                                         unpack(v, seq_k, at_k, layout.max_k), attn_mask=valid[:, None, None, :])
    return out.transpose(1, 2)[seq_q, at_q].transpose(0, 1).unsqueeze(0)


class _MultiHead(nn.Module):
    """Head bookkeeping and the output projection shared by self- and cross-attention."""

    def __init__(self, hidden_size: int, num_heads: int) -> None:
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.o_proj = lecun_linear(hidden_size, hidden_size)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | PackedLayout | None) -> Tensor:
        """(B, H, Lq, Dh) queries over (B, H, Lk, Dh) keys/values -> (B, Lq, D) after o_proj; a
        :class:`PackedLayout` instead of a key mask: packed sequences (B = 1), each attending within itself."""
        if isinstance(key_mask, PackedLayout):
            out = packed_attention(q, k, v, key_mask)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=_key_mask_to_attn(key_mask))
        return self.o_proj(rearrange(out, "b h l d -> b l (h d)"))


class Attention(_MultiHead):
    """Non-causal multi-head self-attention, fused QKV, no biases, optional RoPE and key-padding mask."""

    def __init__(self, hidden_size: int, num_heads: int) -> None:
        super().__init__(hidden_size, num_heads)
        self.qkv_proj = lecun_linear(hidden_size, 3 * hidden_size)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None = None, key_mask: Tensor | None = None) -> Tensor:
        qkv = rearrange(self.qkv_proj(x), "b l (three h d) -> three b h l d", three=3, h=self.num_heads)
        q, k, v = qkv.unbind(0)  # (B, H, L, Dh)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
            q, k = q.to(v.dtype), k.to(v.dtype)
        return self._attend(q, k, v, key_mask)


class CrossAttention(_MultiHead):
    """Multi-head attention of ``queries`` over ``memory`` with an optional key mask (True = attend)."""

    def __init__(self, hidden_size: int, num_heads: int) -> None:
        super().__init__(hidden_size, num_heads)
        self.q_proj = lecun_linear(hidden_size, hidden_size)
        self.kv_proj = lecun_linear(hidden_size, 2 * hidden_size)

    def forward(self, queries: Tensor, memory: Tensor, key_mask: Tensor | None = None) -> Tensor:
        q = rearrange(self.q_proj(queries), "b l (h d) -> b h l d", h=self.num_heads)
        k, v = rearrange(self.kv_proj(memory), "b l (two h d) -> two b h l d", two=2, h=self.num_heads).unbind(0)
        return self._attend(q, k, v, key_mask)


class SwiGLU(nn.Module):
    """down(silu(gate) * up), with gate and up fused into one projection."""

    def __init__(self, hidden_size: int, expansion: float) -> None:
        super().__init__()
        inter = swiglu_intermediate(hidden_size, expansion)
        self.gate_up_proj = lecun_linear(hidden_size, 2 * inter)
        self.down_proj = lecun_linear(inter, hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class LayerScale(nn.Module):
    """CaiT per-channel scale of a residual branch, initialised to ``init``."""

    def __init__(self, hidden_size: int, init: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((hidden_size,), float(init)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma.to(x.dtype)


class Block(nn.Module):
    """Transformer block: attention then SwiGLU, each on a residual branch.

    ``norm_style="post"`` is TRM's ``x = norm(x + f(x))``; ``"pre"`` is ``x = x + f(norm(x))``.
    ``layer_scale_init > 0`` multiplies each branch by a learned per-channel scale (CaiT).
    ``cross=True`` makes the attention attend to a ``memory`` instead of to ``x`` itself (the set encoder).
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        expansion: float = 4.0,
        norm_style: str = "post",
        layer_scale_init: float = 0.0,
        rms_norm_eps: float = 1e-5,
        cross: bool = False,
    ) -> None:
        super().__init__()
        if norm_style not in ("post", "pre"):
            raise ValueError(f"norm_style must be 'post' or 'pre', got {norm_style!r}")
        self.norm_style = norm_style
        self.eps = rms_norm_eps
        self.cross = cross
        self.attn = CrossAttention(hidden_size, num_heads) if cross else Attention(hidden_size, num_heads)
        self.mlp = SwiGLU(hidden_size, expansion)
        use_ls = layer_scale_init > 0
        self.ls_attn = LayerScale(hidden_size, layer_scale_init) if use_ls else nn.Identity()
        self.ls_mlp = LayerScale(hidden_size, layer_scale_init) if use_ls else nn.Identity()

    def _attend(self, h: Tensor, rope, key_mask, memory) -> Tensor:
        if self.cross:
            return self.attn(h, memory, key_mask)
        return self.attn(h, rope, key_mask)

    def forward(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor] | None = None,
        key_mask: Tensor | None = None,
        memory: Tensor | None = None,
    ) -> Tensor:
        if self.norm_style == "post":
            x = rms_norm(x + self.ls_attn(self._attend(x, rope, key_mask, memory)), self.eps)
            return rms_norm(x + self.ls_mlp(self.mlp(x)), self.eps)
        x = x + self.ls_attn(self._attend(rms_norm(x, self.eps), rope, key_mask, memory))
        return x + self.ls_mlp(self.mlp(rms_norm(x, self.eps)))
