"""The Tiny Recursive Model core and its ACT carry (``reference/trm.md`` §1, §10.1-10.10).

Notation: the paper's answer state ``y`` (the code's ``z_H``) and latent ``z`` (``z_L``); ``x`` is the
embedded input with the conditioning prefix in front. One ACT step::

    with no_grad: repeat H_cycles-1 times: { repeat L_cycles: z = net(z, y + x);  y = net(y, z) }
    repeat L_cycles: z = net(z, y + x)          # with grad
    y = net(y, z)
    logits = lm_head(y)[:, prefix:];  q = q_head(y[:, 0])

``net(h, inj)`` adds ``inj`` to ``h`` and runs the ONE shared stack of ``num_layers`` post-norm blocks.
The carry (y, z) is detached between ACT steps.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

import torch.nn.functional as F

from trm_lightning.models.layers import (
    POS_ENCODINGS, Block, CastedLinear, RotaryEmbedding, lecun_linear, trunc_normal_,
)
from trm_lightning.vocab import VOCAB_SIZE


@dataclass
class ACTCarry:
    """State that persists across training steps: one row per batch slot."""

    y: Tensor  # (B, P + S*S, D) answer state
    z: Tensor  # (B, P + S*S, D) latent state
    steps: Tensor  # (B,) int32, ACT steps taken on the current row
    halted: Tensor  # (B,) bool, the row finished at the last step and will load a new sample
    data: dict[str, Tensor]  # the samples the rows are working on (inputs, labels, demos, ...)


FORWARD_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _net_body(layers: nn.ModuleList, rope: tuple[Tensor, Tensor], h: Tensor, injection: Tensor) -> Tensor:
    h = h + injection
    for layer in layers:
        h = layer(h, rope)
    return h


_compiled_net_body = None


def _compiled_net():
    """``torch.compile`` of the shared net, made once per process on first use (a free function, so the
    module itself stays plain: EMA copies, pickling and checkpoints never see a compiled wrapper)."""
    global _compiled_net_body
    if _compiled_net_body is None:
        _compiled_net_body = torch.compile(_net_body)
    return _compiled_net_body


def _rows(mask: Tensor, like: Tensor) -> Tensor:
    """Reshape a (B,) mask to broadcast against ``like`` (B, ...)."""
    return mask.view(-1, *([1] * (like.dim() - 1)))


class TinyRecursiveModel(nn.Module):
    """TRM: one shared ``num_layers`` net, H/L recursion, LM head on y, halting head on prefix slot 0.

    Args:
        vocab_size: token vocabulary (ARC: PAD, EOS, 10 colours = 12).
        seq_len: grid tokens per row (canvas_size ** 2).
        hidden_size: model width D.
        num_heads: attention heads (head dim = D / heads).
        expansion: SwiGLU expansion factor (width rounded as TRM does).
        num_layers: blocks in the shared net (TRM's ``L_layers``).
        H_cycles: outer cycles T per ACT step; the first T-1 run without gradient.
        L_cycles: latent updates n per cycle.
        prefix_len: conditioning tokens in front of the grid (``puzzle_emb_len``).
        halt_max_steps: ACT steps before a row is forced to halt; evaluation always runs this many.
        halt_exploration_prob: probability that a training row gets a random minimum of U{2..max} steps.
        rope_theta: RoPE base.
        rms_norm_eps: RMSNorm epsilon.
        compile: run the shared net through ``torch.compile`` (fuses the elementwise work around the
            matrix products: 2.2x faster training steps at the ARC config on an H200).
        context_broadcast: also add the mean of the prefix tokens to every grid token's embedding, so every cell
            reads the conditioning in its own residual stream at every recursion step (``x`` is injected at each
            latent update), not only through attention to the prefix. Off (the default) is TRM's input.
        pos_encoding: ``rope`` (TRM's: 1-D RoPE over the flattened prefix + canvas) or ``rope2d`` (axial RoPE: half of
            each head's frequencies turn with the cell's row, half with its column; the prefix at row 0, column 0).
        forward_dtype: the dtype of the embeddings, the initial states, the residual stream and the carry (TRM's
            ``forward_dtype``, bfloat16 in its configs): ``float32`` or ``bfloat16``. Weights stay fp32 and are cast
            at use; RMSNorm and RoPE compute in fp32 and cast back, logits go to the loss in fp64, as TRM does.
    """

    def __init__(
        self,
        vocab_size: int = VOCAB_SIZE,
        seq_len: int = 900,
        hidden_size: int = 512,
        num_heads: int = 8,
        expansion: float = 4.0,
        num_layers: int = 2,
        H_cycles: int = 3,
        L_cycles: int = 4,
        prefix_len: int = 16,
        halt_max_steps: int = 16,
        halt_exploration_prob: float = 0.1,
        rope_theta: float = 10000.0,
        rms_norm_eps: float = 1e-5,
        compile: bool = False,
        forward_dtype: str = "float32",
        context_broadcast: bool = False,
        pos_encoding: str = "rope",
    ) -> None:
        super().__init__()
        if forward_dtype not in FORWARD_DTYPES:
            raise ValueError(f"forward_dtype must be one of {tuple(FORWARD_DTYPES)}, got {forward_dtype!r}")
        self.forward_dtype = FORWARD_DTYPES[forward_dtype]
        if H_cycles < 1 or L_cycles < 1 or halt_max_steps < 1 or prefix_len < 1:
            raise ValueError("H_cycles, L_cycles, halt_max_steps and prefix_len must all be >= 1")
        self.hidden_size = hidden_size
        self.prefix_len = prefix_len
        self.H_cycles = H_cycles
        self.L_cycles = L_cycles
        self.halt_max_steps = halt_max_steps
        self.halt_exploration_prob = halt_exploration_prob
        self.use_compile = compile  # not `self.compile`: that would hide nn.Module.compile()
        self.embed_scale = math.sqrt(hidden_size)
        self.context_broadcast = context_broadcast

        self.embed_tokens = nn.Embedding(vocab_size, hidden_size)
        trunc_normal_(self.embed_tokens.weight.data, 1.0 / math.sqrt(hidden_size))
        self.layers = nn.ModuleList(
            Block(hidden_size, num_heads, expansion, "post", 0.0, rms_norm_eps) for _ in range(num_layers)
        )
        if pos_encoding not in POS_ENCODINGS:
            raise ValueError(f"pos_encoding must be one of {POS_ENCODINGS}, got {pos_encoding!r}")
        side = math.isqrt(seq_len)
        if pos_encoding == "rope2d" and side * side != seq_len:
            raise ValueError(f"pos_encoding='rope2d' needs a square canvas, got seq_len={seq_len}")
        self.rope = RotaryEmbedding(hidden_size // num_heads, prefix_len + seq_len, rope_theta,
                                    grid_side=side if pos_encoding == "rope2d" else None, grid_start=prefix_len)
        self.lm_head = lecun_linear(hidden_size, vocab_size)
        # q[:, 0] = halt logit, q[:, 1] = TRM's "continue" logit (unused: no_ACT_continue=True, as in TRM)
        self.q_head = CastedLinear(hidden_size, 2, bias=True)
        with torch.no_grad():
            self.q_head.weight.zero_()
            self.q_head.bias.fill_(-5.0)
        # fixed (not learned) initial states, truncated normal with std 1
        self.register_buffer("y_init", trunc_normal_(torch.empty(hidden_size), 1.0))
        self.register_buffer("z_init", trunc_normal_(torch.empty(hidden_size), 1.0))

    # ----------------------------------------------------------------------------------------- recursion
    def embed(self, inputs: Tensor, prefix: Tensor) -> Tensor:
        """(B, S*S) tokens and (B, P, D) prefix -> x (B, P + S*S, D).

        Token embeddings (std 1/sqrt(D)) are scaled by sqrt(D) to unit RMS, as in TRM. The prefix enters as
        given: the demo encoder already emits unit-RMS tokens (TRM's zero-initialised puzzle embedding is
        scaled by its conditioner). With ``context_broadcast`` every grid token also gets the prefix's mean token.
        """
        weight = self.embed_tokens.weight.to(self.forward_dtype)  # TRM's CastedEmbedding (the same tensor in fp32)
        tokens = F.embedding(inputs.long(), weight) * self.embed_scale
        prefix = prefix.to(tokens.dtype)
        if self.context_broadcast:
            tokens = tokens + prefix.mean(dim=1, keepdim=True)
        return torch.cat([prefix, tokens], dim=1)

    def net(self, h: Tensor, injection: Tensor) -> Tensor:
        body = _compiled_net() if self.use_compile else _net_body
        return body(self.layers, self.rope(), h, injection)

    def forward(self, y: Tensor, z: Tensor, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """One ACT step. Returns detached (y, z), logits (B, S*S, V) and q logits (B, 2) in fp32."""
        with torch.no_grad():
            for _ in range(self.H_cycles - 1):
                for _ in range(self.L_cycles):
                    z = self.net(z, y + x)
                y = self.net(y, z)
        for _ in range(self.L_cycles):
            z = self.net(z, y + x)
        y = self.net(y, z)
        logits = self.lm_head(y[:, self.prefix_len :])
        q = self.q_head(y[:, 0]).float()
        return y.detach(), z.detach(), logits, q

    # ------------------------------------------------------------------------------------------- ACT carry
    def initial_states(self, inputs: Tensor) -> tuple[Tensor, Tensor]:
        """The fixed initial (y, z), each (B, P + S*S, D), for rows of ``inputs`` (B, S*S) (expanded views)."""
        B, T = inputs.shape
        shape = (B, self.prefix_len + T, self.hidden_size)
        return self.y_init.to(self.forward_dtype).expand(shape), self.z_init.to(self.forward_dtype).expand(shape)

    def initial_carry(self, batch: Mapping[str, Tensor]) -> ACTCarry:
        """Every row halted, so the first ``reset_carry`` loads the whole batch."""
        inputs = batch["inputs"]
        B = inputs.shape[0]
        y, z = self.initial_states(inputs)
        return ACTCarry(
            y=y,
            z=z,
            steps=torch.zeros(B, dtype=torch.int32, device=inputs.device),
            halted=torch.ones(B, dtype=torch.bool, device=inputs.device),
            data={k: torch.zeros_like(v) for k, v in batch.items()},
        )

    def reset_carry(self, carry: ACTCarry, batch: Mapping[str, Tensor]) -> ACTCarry:
        """Halted rows take the batch's row at the same index, fresh states and zero steps; others keep theirs."""
        h = carry.halted
        if set(batch) != set(carry.data):
            raise ValueError(f"batch keys {sorted(batch)} differ from the carry's {sorted(carry.data)}")
        data = {k: torch.where(_rows(h, v), v, carry.data[k]) for k, v in batch.items()}
        y = torch.where(_rows(h, carry.y), self.y_init.to(carry.y.dtype), carry.y)
        z = torch.where(_rows(h, carry.z), self.z_init.to(carry.z.dtype), carry.z)
        steps = torch.where(h, torch.zeros_like(carry.steps), carry.steps)
        return ACTCarry(y=y, z=z, steps=steps, halted=torch.zeros_like(h), data=data)

    def halt(self, steps: Tensor, q_halt_logits: Tensor) -> Tensor:
        """Which rows halt after ``steps`` ACT steps (training rule; evaluation just runs halt_max_steps).

        Halt when q_halt > 0 or at ``halt_max_steps``; with probability ``halt_exploration_prob`` a row must
        first reach a random minimum of U{2..halt_max_steps} steps.
        """
        halted = steps >= self.halt_max_steps
        if self.halt_max_steps > 1:
            halted = halted | (q_halt_logits > 0)
            explore = torch.rand_like(q_halt_logits) < self.halt_exploration_prob
            min_steps = torch.randint_like(steps, 2, self.halt_max_steps + 1)
            halted = halted & (steps >= torch.where(explore, min_steps, torch.zeros_like(min_steps)))
        return halted
