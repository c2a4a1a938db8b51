"""Optimisation helpers: named parameter groups and TRM's warmup-then-cosine learning-rate factor."""

from __future__ import annotations

import math
from collections.abc import Callable

from torch import nn


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


def warmup_cosine(warmup_steps: int, total_steps: int, min_ratio: float = 1.0) -> Callable[[int], float]:
    """LR multiplier: linear warmup 0 -> 1 over ``warmup_steps``, then cosine from 1 down to ``min_ratio``
    at ``total_steps``. ``min_ratio = 1.0`` keeps the LR constant after warmup (TRM's default)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def frozen_then(factor: Callable[[int], float], frozen_steps: int) -> Callable[[int], float]:
    """``factor`` with the first ``frozen_steps`` steps at 0: a group frozen through its learning rate keeps
    its weights bit-identical (AdamW's step and decoupled decay both scale with the lr) while the others train."""
    if frozen_steps < 0:
        raise ValueError(f"frozen steps must be >= 0, got {frozen_steps}")

    def frozen_factor(step: int) -> float:
        return 0.0 if step < frozen_steps else factor(step)

    return frozen_factor
