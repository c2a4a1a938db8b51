"""AdamATan2 against the formula of ``reference/trm.md`` §4.1, computed by hand; TRM's schedule counter."""

from __future__ import annotations

import math

import pytest
import torch

from trm_lightning.optim import AdamATan2, TRMSchedule, build_optimizer, trm_lr


def test_adam_atan2_matches_hand_computed_steps():
    lr, b1, b2, wd = 0.1, 0.9, 0.95, 0.1
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64))
    opt = AdamATan2([p], lr=lr, betas=(b1, b2), weight_decay=wd)
    grads = [torch.tensor([0.3, -0.1, 0.0], dtype=torch.float64), torch.tensor([-0.2, 0.4, 1e-8], dtype=torch.float64)]
    want, m, v = [1.0, -2.0, 0.5], [0.0] * 3, [0.0] * 3
    for t, g in enumerate(grads, start=1):
        p.grad = g.clone()
        opt.step()
        for i in range(3):
            want[i] *= 1 - lr * wd
            m[i] = m[i] + (1 - b1) * (g[i].item() - m[i])
            v[i] = v[i] + (1 - b2) * (g[i].item() ** 2 - v[i])
            want[i] -= lr * math.atan2(m[i] / (1 - b1**t), math.sqrt(v[i]) / math.sqrt(1 - b2**t))
        assert p.detach().tolist() == pytest.approx(want, rel=1e-12, abs=1e-15)
    # a zero gradient on a fresh coordinate: atan2(0, 0) = 0, no eps, no NaN
    assert torch.isfinite(p).all()


def test_adam_atan2_step_is_0785_of_adamw_on_a_constant_gradient():
    steps = {}
    for name in ("adamw", "adam_atan2"):
        p = torch.nn.Parameter(torch.zeros(4))
        opt = build_optimizer(name, [{"params": [p]}], lr=1e-3, betas=(0.9, 0.95), weight_decay=0.0)
        for _ in range(50):
            p.grad = torch.full((4,), 0.37)
            opt.step()
        steps[name] = -p.detach()[0].item()
    assert steps["adam_atan2"] / steps["adamw"] == pytest.approx(math.pi / 4, rel=1e-4)


def test_schedule_counts_from_one_like_trm():
    assert [trm_lr(1e-4, s, 2000, 100_000) for s in (1, 2, 3)] == [1e-4 * 1 / 2000, 1e-4 * 2 / 2000, 1e-4 * 3 / 2000]
    assert trm_lr(1e-4, 2000, 2000, 100_000) == 1e-4 and trm_lr(1e-4, 50_000, 2000, 100_000) == 1e-4
    assert trm_lr(1.0, 110, 10, 110, 0.1) == pytest.approx(0.1)  # the last step reaches the floor
    p = torch.nn.Parameter(torch.zeros(1))
    q = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [p], "lr": 1e-4}, {"params": [q], "lr": 5e-5}], lr=1e-4)
    schedule = TRMSchedule(opt, 2000, 100_000, frozen_steps=[0, 2])
    seen = []
    for _ in range(3):
        seen.append([g["lr"] for g in opt.param_groups])
        opt.step()
        schedule.step()
    # TRM's step k + 1 for the k-th optimizer step; the second group frozen for its first 2 steps
    assert seen == [[1e-4 * 1.0 / 2000, 0.0], [1e-4 * 2.0 / 2000, 0.0], [1e-4 * 3.0 / 2000, 5e-5 * 3.0 / 2000]]
