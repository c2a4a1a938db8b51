"""The FLOPs formula that MFU is computed from, against PyTorch's own FLOP counter."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from trm_lightning.flops import bf16_peak_tflops, encoder_step_flops, trm_step_flops
from trm_lightning.models.encoder import DemoGridEncoder
from trm_lightning.models.trm import TinyRecursiveModel


def _counted(fn) -> int:
    # the math backend runs attention as matrix products the counter sees (CPU's fused kernel it does not)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def test_trm_step_formula_matches_the_counter():
    S, D, P = 5, 32, 3
    trm = TinyRecursiveModel(vocab_size=12, seq_len=S * S, hidden_size=D, num_heads=4, num_layers=2,
                             H_cycles=3, L_cycles=2, prefix_len=P)
    batch = {"inputs": torch.randint(0, 12, (2, S * S))}
    carry = trm.initial_carry(batch)
    x = trm.embed(batch["inputs"], torch.randn(2, P, D))

    def step():
        _, _, logits, q = trm(carry.y, carry.z, x)
        (logits.float().sum() + q.sum()).backward()

    expected = 2 * trm_step_flops(S, D, 4.0, L_layers=2, H_cycles=3, L_cycles=2, puzzle_emb_len=P)
    # the counter also sees the q head (2 x D per row, negligible) and nothing else
    assert _counted(step) == pytest.approx(expected, rel=0.01)


def test_arc_config_is_the_quoted_0_4_tflop_per_row_step():
    assert trm_step_flops(30) == pytest.approx(0.40e12, rel=0.02)


def test_encoder_formula_matches_the_counter():
    S, D = 4, 32
    enc = DemoGridEncoder(D, 4, 2, S, 12, 4.0, "mean", "post", 0.0, 1e-5, 10000.0)
    demos = torch.randint(2, 12, (3, S * S))  # 3 demo pairs, no padding

    def step():
        enc(demos, demos).sum().backward()

    counted = _counted(step)
    expected = encoder_step_flops(3, S, D, 4.0, encoder_num_layers=2)
    assert counted == pytest.approx(expected, rel=0.05)  # + the pooling projection


def test_peaks():
    assert bf16_peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert bf16_peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert bf16_peak_tflops("NVIDIA H200") == 989.0
    assert bf16_peak_tflops("cpu") is None
