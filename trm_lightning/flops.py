"""Model FLOPs of one training step, from a formula (benchmarks' MFU; checked against PyTorch's counter).

Conventions: a multiply-add is 2 FLOPs; only matrix products count (norms, activations, softmax and RoPE are
ignored, as in the usual MFU accounting); backward = 2 x forward for every module that runs with gradient.

One block (attention + SwiGLU) over ``n`` tokens attending over ``m`` keys, width D, SwiGLU width I::

    linear:    2 n (3 D^2 + D^2 + 3 D I)        qkv, out, gate+up, down
    attention: 2 * 2 n m D                      scores and the weighted sum

One TRM ACT step per row (``reference/trm.md`` §1): ``H_cycles * (L_cycles + 1)`` net calls of ``L_layers``
blocks over ``P + S^2`` tokens, of which the last ``L_cycles + 1`` run with gradient, plus the LM head on the
``S^2`` grid tokens (with gradient). The ARC config (D 512, I 1536, 916 tokens, H3 L4, 2 layers) gives about
0.40 TFLOP per row-step, the figure the issue quotes for the official TRM.

The demo encoder (run with gradient on every row every step) costs ``valid demos x num_layers`` blocks over
the tokens of an (input, output) pair: all ``2 S^2`` canvas cells without cropping (a padding mask skips no
compute), only the real cells with ``encoder_crop_buckets > 0`` (bucket padding not counted).
"""

from __future__ import annotations

from trm_lightning.models.layers import swiglu_intermediate


def block_flops(tokens: int, keys: int, hidden: int, inter: int) -> int:
    """Forward FLOPs of one post-norm block (self-attention + SwiGLU) over ``tokens`` queries."""
    linear = 2 * tokens * (4 * hidden * hidden + 3 * hidden * inter)
    attention = 4 * tokens * keys * hidden
    return linear + attention


def trm_net_flops(canvas_size: int, hidden_size: int, expansion: float, L_layers: int, puzzle_emb_len: int) -> int:
    """Forward FLOPs of one call of the TRM core's shared net (``L_layers`` blocks) for one row."""
    tokens = puzzle_emb_len + canvas_size * canvas_size
    return L_layers * block_flops(tokens, tokens, hidden_size, swiglu_intermediate(hidden_size, expansion))


def trm_step_flops(
    canvas_size: int,
    hidden_size: int = 512,
    expansion: float = 4.0,
    L_layers: int = 2,
    H_cycles: int = 3,
    L_cycles: int = 4,
    puzzle_emb_len: int = 16,
    vocab_size: int = 12,
) -> int:
    """Training FLOPs (forward + backward) of the TRM core for one row and one ACT step."""
    grid = canvas_size * canvas_size
    net = trm_net_flops(canvas_size, hidden_size, expansion, L_layers, puzzle_emb_len)
    calls = H_cycles * (L_cycles + 1)
    grad_calls = L_cycles + 1
    head = 2 * grid * hidden_size * vocab_size
    return net * calls + 2 * net * grad_calls + 3 * head


def encoder_step_flops(
    valid_demos: float,
    canvas_size: int,
    hidden_size: int = 512,
    expansion: float = 4.0,
    encoder_num_layers: int = 2,
    tokens_per_demo: float | None = None,
) -> float:
    """Training FLOPs (forward + backward) of the per-demo grid encoder for one row with ``valid_demos``
    encoded demo pairs of ``tokens_per_demo`` tokens each (default: the whole ``2 S^2`` canvas; with
    cropping, the mean number of real cells). The set encoder over <= 10 vectors is not counted."""
    tokens = 2 * canvas_size * canvas_size if tokens_per_demo is None else tokens_per_demo
    inter = swiglu_intermediate(hidden_size, expansion)
    per_demo = encoder_num_layers * block_flops(tokens, tokens, hidden_size, inter)
    return 3.0 * valid_demos * per_demo


def trm_rollout_flops(
    canvas_size: int,
    halt_max_steps: int = 16,
    hidden_size: int = 512,
    expansion: float = 4.0,
    L_layers: int = 2,
    H_cycles: int = 3,
    L_cycles: int = 4,
    puzzle_emb_len: int = 16,
) -> int:
    """Forward FLOPs of an evaluation rollout (``halt_max_steps`` ACT steps) of the TRM core for one row."""
    net = trm_net_flops(canvas_size, hidden_size, expansion, L_layers, puzzle_emb_len)
    return net * H_cycles * (L_cycles + 1) * halt_max_steps


# dense bf16 tensor-core peaks (no sparsity), TFLOP/s, matched against torch.cuda.get_device_name()
BF16_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "4090": 165.2}


def bf16_peak_tflops(device_name: str) -> float | None:
    """The device's dense bf16 peak in TFLOP/s, or None when it is not in :data:`BF16_PEAK_TFLOPS`."""
    if "H100" in device_name and "PCIe" in device_name:
        return 756.0
    for key, peak in BF16_PEAK_TFLOPS.items():
        if key in device_name:
            return peak
    return None
