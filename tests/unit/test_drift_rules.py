"""The default alert rules on hand-built probe sequences, checked as CollapseAlert checks them (every probe check
fresh): a slow rotation, a slow mean offset and a single jump each fire their documented rule within the
documented number of checks (docs/diagnostics.md); a stable but noisy encoder fires nothing over 200 checks."""

from __future__ import annotations

import math

import torch

from callbacks.alert_rules import default_rules
from callbacks.encoder_diagnostics import ProbeTracker, encoder_statistics

N, P, D = 16, 4, 32  # probe tasks, context tokens, width


def _base(seed: int = 0) -> torch.Tensor:
    """(2N, P, D): task i in view A (row i) and view B (row N + i), close to each other, far from other tasks."""
    g = torch.Generator().manual_seed(seed)
    tasks = torch.randn(N, P, D, generator=g)
    views = tasks.repeat(2, 1, 1) + 0.15 * torch.randn(2 * N, P, D, generator=g)
    return views


def _rotate(x: torch.Tensor, degrees: float) -> torch.Tensor:
    """Rotate every consecutive pair of the D coordinates by ``degrees``: each token, and so each flattened row,
    turns by exactly that angle."""
    t = math.radians(degrees)
    a, b = x[..., 0::2], x[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = a * math.cos(t) - b * math.sin(t)
    out[..., 1::2] = a * math.sin(t) + b * math.cos(t)
    return out


def _fired(sequence, checks: int) -> list[tuple[int, str]]:
    tracker, rules, tasks = ProbeTracker(drift_window=50), default_rules(), torch.arange(2 * N) % N
    fired = []
    for check in range(checks):
        context = sequence(check)
        stats = {**tracker.update(context), **encoder_statistics(context, tasks)}
        values = {k: float(v) for k, v in stats.items()}
        for rule in rules:
            alert = rule.update(values, check)
            if alert is not None:
                fired.append((check, alert.rule))
    return fired


def test_a_slow_rotation_fires_cumulative_drift_and_nothing_else():
    base = _base()
    for degrees, within in ((2.0, 24), (1.0, 47)):  # 1 - cos(k x degrees) passes 0.3 at k = 23 and 46; patience 2
        fired = _fired(lambda c: _rotate(base, degrees * c), 100)
        assert fired and fired[0][1] == "cumulative_drift" and fired[0][0] <= within, fired
        assert {rule for _, rule in fired} == {"cumulative_drift"}, fired  # no jump, no collapse


def test_a_slow_mean_offset_fires_cumulative_drift_not_collapse():
    base = _base()
    offset = torch.randn(P, D, generator=torch.Generator().manual_seed(5)) * 0.15  # +15% of an RMS per check
    fired = _fired(lambda c: base + c * offset, 100)
    rules = {rule for _, rule in fired}
    assert fired and fired[0][1] == "cumulative_drift" and fired[0][0] <= 11, fired
    assert "representation_collapse" not in rules  # every task is still told apart: a shift, not a collapse
    assert "drift" not in rules  # no single check jumps


def test_a_single_jump_fires_drift_at_once():
    base = _base()
    fired = _fired(lambda c: base if c < 30 else _rotate(base, 90.0), 40)
    assert fired[0] == (30, "drift"), fired  # the jump's own check: patience 1


def test_a_stable_but_noisy_encoder_fires_nothing_in_200_checks():
    base = _base()
    g = torch.Generator().manual_seed(7)
    fired = _fired(lambda c: base + 0.1 * torch.randn(base.shape, generator=g), 200)
    assert fired == []


def test_a_collapsed_encoder_still_fires_representation_collapse():
    pattern = torch.linspace(-1, 1, D).expand(2 * N, P, D).clone()
    fired = _fired(lambda c: pattern + 1e-4 * torch.randn(pattern.shape, generator=torch.Generator().manual_seed(c)), 6)
    assert ("representation_collapse" in {rule for _, rule in fired}), fired


def test_cumulative_drift_fires_only_when_the_drift_hurts_the_trm():
    """With the keeping-up loss logged, a far drift fires only while the TRM reads the stale context better (gap
    below -0.05): the stable run's drift (0.27 -> 0.7 while accuracy rose, gap about 0) stays quiet."""
    from callbacks.alert_rules import CumulativeDrift

    def fires(drift: float, gap: float | None, **kwargs) -> bool:
        values = {"diagnostics/probe_window_drift_cosine": drift}
        if gap is not None:
            values["diagnostics/probe_stale_context_gap"] = gap
        rule = CumulativeDrift(**kwargs)
        return [rule.update(values, check) is not None for check in range(2)] == [False, True]  # patience 2

    assert fires(0.7, -0.07) and fires(0.7, None)  # hurts; no keeping-up loss: the drift alone decides
    assert not fires(0.7, 0.0) and not fires(0.7, -0.03) and not fires(0.2, -0.5)
    assert fires(0.7, 0.0, max_stale_context_gap=None)  # the drift alone, by choice
