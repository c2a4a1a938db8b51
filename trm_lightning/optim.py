"""Optimisation: named parameter groups, TRM's warmup-then-cosine learning-rate factor, and AdamATan2.

TRM trains with AdamATan2 (the ``adam-atan2`` package, ``reference/trm.md`` §4.1): Adam whose division by
``sqrt(v) + eps`` is replaced by ``atan2``, so there is no eps and the step is bounded by ``lr * pi / 2``:

    p <- p * (1 - lr * wd)
    m <- lerp(m, g, 1 - beta1);  v <- lerp(v, g^2, 1 - beta2)
    p <- p - lr * atan2(m / (1 - beta1^t), sqrt(v) / sqrt(1 - beta2^t))

On a constant gradient Adam(W)'s step tends to ``lr`` and AdamATan2's to ``lr * atan2(1, 1) = 0.785 lr``, and
their ratio moves with the gradient noise: learning rates do not transfer between the two.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import nn

OPTIMIZERS = ("adamw", "adam_atan2")


def named_param_groups(groups: dict[str, nn.Module], lrs: dict[str, float]) -> list[dict]:
    """One optimizer param group per named module (trainable parameters only), with its own lr.

    The ``name`` key is what ``LearningRateMonitor`` uses for its curves (``lr-AdamW/encoder`` ...).
    """
    out = []
    for name, module in groups.items():
        params = [p for p in module.parameters() if p.requires_grad]
        if params:
            out.append({"params": params, "lr": lrs[name], "name": name})
    return out


def trm_lr(base_lr: float, step: int, warmup_steps: int, total_steps: int, min_ratio: float = 1.0) -> float:
    """TRM's learning rate at its ``step``-th optimizer step (counted from 1), in TRM's own float operations
    (``cosine_schedule_with_warmup_lr_lambda``): linear warmup, the first step already at ``1 / warmup_steps`` of the
    rate; then a half cosine from ``base_lr`` down to ``min_ratio * base_lr`` at ``total_steps``. ``min_ratio = 1``
    keeps it constant after warmup (TRM's default)."""
    if step < warmup_steps:
        return base_lr * float(step) / float(max(1, warmup_steps))
    progress = float(step - warmup_steps) / float(max(1, total_steps - warmup_steps))
    return base_lr * (min_ratio + max(0.0, (1 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * 0.5 * 2.0 * progress))))


class TRMSchedule(torch.optim.lr_scheduler.LRScheduler):
    """Each param group at :func:`trm_lr` of its own base lr, or 0 during its first ``frozen_steps[i]`` steps.

    Stepped once per optimizer step (Lightning's ``interval: step``): the ``k``-th optimizer step (0-based) runs at
    TRM's step ``k + 1``. A group frozen through its learning rate keeps its weights bit-identical (the optimizers'
    steps and decoupled decay all scale with the lr) while the others train.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, min_ratio: float = 1.0,
                 frozen_steps: list[int] | None = None) -> None:
        self.warmup_steps, self.total_steps, self.min_ratio = warmup_steps, total_steps, min_ratio
        self.frozen_steps = list(frozen_steps or [0] * len(optimizer.param_groups))
        if len(self.frozen_steps) != len(optimizer.param_groups) or min(self.frozen_steps, default=0) < 0:
            raise ValueError(f"frozen_steps needs one count >= 0 per param group, got {self.frozen_steps}")
        super().__init__(optimizer)

    def lr_at(self, base_lr: float, index: int, frozen: int = 0) -> float:
        """The lr of the ``index``-th optimizer step (0-based) for a group of base ``base_lr``."""
        return 0.0 if index < frozen else trm_lr(base_lr, index + 1, self.warmup_steps, self.total_steps, self.min_ratio)

    def get_lr(self) -> list[float]:
        return [self.lr_at(base, self.last_epoch, frozen) for base, frozen in zip(self.base_lrs, self.frozen_steps)]


class AdamATan2(torch.optim.Optimizer):
    """TRM's optimizer (the ``adam-atan2`` package's update, see the module docstring), in plain PyTorch.

    Args:
        params: parameters or param groups.
        lr: learning rate.
        betas: (beta1, beta2) of the first and second moment averages.
        weight_decay: decoupled weight decay (``p <- p * (1 - lr * wd)`` before the step), on every parameter.
    """

    def __init__(self, params: Iterable, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.95),
                 weight_decay: float = 0.1) -> None:
        if lr < 0 or weight_decay < 0 or not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"AdamATan2: bad lr={lr}, betas={betas} or weight_decay={weight_decay}")
        super().__init__(params, {"lr": lr, "betas": betas, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2), wd = group["lr"], group["betas"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                t = state["step"]
                m, v = state["exp_avg"], state["exp_avg_sq"]
                p.mul_(1.0 - lr * wd)
                m.lerp_(grad, 1.0 - beta1)
                v.lerp_(grad * grad, 1.0 - beta2)
                bias1, bias2_sqrt = 1.0 - beta1**t, math.sqrt(1.0 - beta2**t)
                p.sub_(torch.atan2(m / bias1, v.sqrt() / bias2_sqrt).mul_(lr))  # lr x the step, then subtracted
        return loss


def build_optimizer(name: str, groups: list[dict], lr: float, betas: tuple[float, float],
                    weight_decay: float) -> torch.optim.Optimizer:
    """``adamw`` (torch's AdamW) or ``adam_atan2`` (TRM's) over the named ``groups``."""
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, weight_decay=weight_decay)
    if name == "adam_atan2":
        return AdamATan2(groups, lr=lr, betas=betas, weight_decay=weight_decay)
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")
