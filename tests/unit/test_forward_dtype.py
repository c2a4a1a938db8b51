"""``forward_dtype: bfloat16`` (TRM's): bf16 residual stream and carry, fp32 master weights, against fp32 on CPU.

Tolerances, measured on this tiny random model (hidden 64, 2 layers, H/L cycles 2/2, so 6 net calls a step): after
one ACT step the bf16 logits differ from fp32 by a mean of about 1% of their RMS and at most about 6% of their
largest value, and 98% of the cells keep their argmax. The test allows 2%, 10% and 97%.
"""

from __future__ import annotations

import pytest
import torch

from trm_lightning.losses import act_loss
from trm_lightning.models.trm import TinyRecursiveModel

S, D = 6, 64


def _pair():
    torch.manual_seed(0)
    kw = dict(seq_len=S * S, hidden_size=D, num_heads=4, num_layers=2, H_cycles=2, L_cycles=2, prefix_len=2,
              halt_max_steps=4)
    fp32 = TinyRecursiveModel(**kw)
    bf16 = TinyRecursiveModel(**kw, forward_dtype="bfloat16")
    bf16.load_state_dict(fp32.state_dict())
    return fp32, bf16


def _step(model, inputs, prefix):
    x = model.embed(inputs, prefix)
    y, z = model.initial_states(inputs)
    return x, model(y, z, x)


def test_bf16_keeps_stream_and_carry_in_bf16_and_weights_in_fp32():
    _, model = _pair()
    inputs = torch.randint(0, 12, (4, S * S))
    x, (y, z, logits, q) = _step(model, inputs, torch.randn(4, 2, D))
    assert (x.dtype, y.dtype, z.dtype, logits.dtype, q.dtype) == (torch.bfloat16,) * 4 + (torch.float32,)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    carry = model.reset_carry(model.initial_carry({"inputs": inputs}), {"inputs": inputs})
    assert carry.y.dtype == torch.bfloat16  # fresh rows in the carry too


def test_bf16_matches_fp32_within_stated_tolerances():
    fp32, bf16 = _pair()
    g = torch.Generator().manual_seed(1)
    inputs = torch.randint(0, 12, (16, S * S), generator=g)
    prefix = torch.randn(16, 2, D, generator=g)
    want = _step(fp32, inputs, prefix)[1][2]
    got = _step(bf16, inputs, prefix)[1][2].float()
    diff = (got - want).abs()
    assert diff.mean() < 0.02 * want.pow(2).mean().sqrt()
    assert diff.max() < 0.10 * want.abs().max()
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.97


def test_bf16_gradients_reach_the_fp32_weights():
    _, model = _pair()
    inputs = torch.randint(2, 12, (4, S * S))
    _, (_, _, logits, q) = _step(model, inputs, torch.randn(4, 2, D))
    act_loss(logits, inputs.long(), q[:, 0]).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads.values())
    assert grads["layers.0.attn.qkv_proj.weight"].abs().sum() > 0


def test_unknown_forward_dtype_is_refused():
    with pytest.raises(ValueError, match="forward_dtype must be one of"):
        TinyRecursiveModel(seq_len=4, hidden_size=8, num_heads=2, prefix_len=1, forward_dtype="float16")
