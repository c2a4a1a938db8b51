"""The diagnostics' statistics and the alert rules, on plain tensors and scripted values (no Trainer)."""

from __future__ import annotations

import math

import pytest
import torch

from callbacks.alert_rules import (
    AccuracyCollapse,
    NonFinite,
    ProbeDrift,
    QHaltRising,
    RepresentationCollapse,
    default_rules,
)
from callbacks.context_reliance import derangement
from trm_lightning.losses import row_accuracy
from callbacks.encoder_diagnostics import (
    batch_statistics,
    drift_statistics,
    effective_rank,
    encoder_statistics,
    pool_context,
    probe_statistics,
    value_moments,
)
from callbacks.grad_norms import clip_ratio, total_norm
from trm_lightning import metric_names as names

SCALE_INVARIANT = [names.ENCODER_NORMALIZED_VAR, names.ENCODER_L2N_STD, names.ENCODER_CROSS_TASK_COSINE,
                   names.ENCODER_EFFECTIVE_RANK]
RAW = [names.ENCODER_CROSS_SAMPLE_VAR, names.ENCODER_OUTPUT_MEAN, names.ENCODER_OUTPUT_STD]


def _context(B=48, P=4, D=32, seed=0, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, P, D, generator=g) + offset


def _tasks(B=48, n=12):
    return torch.arange(B) % n


# ------------------------------------------------------------------------------------- definitions
def test_raw_statistics_match_their_definitions():
    ctx = _context(offset=0.3)
    s = encoder_statistics(ctx, _tasks())
    pooled = ctx.double().mean(1)
    expected_var = pooled.var(0, unbiased=False).mean().item()
    assert s[names.ENCODER_CROSS_SAMPLE_VAR].item() == pytest.approx(expected_var, rel=1e-9)
    assert s[names.ENCODER_OUTPUT_MEAN].item() == pytest.approx(ctx.double().mean().item(), rel=1e-9)
    assert s[names.ENCODER_OUTPUT_STD].item() == pytest.approx(ctx.double().std().item(), rel=1e-9)


def test_scale_invariant_statistics_match_their_definitions():
    ctx = _context(offset=0.5)
    tasks = _tasks()
    s = encoder_statistics(ctx, tasks)
    p = ctx.double().mean(1)
    D = p.shape[1]
    nv = p.var(0, unbiased=False).sum() / p.square().sum(1).mean()
    assert s[names.ENCODER_NORMALIZED_VAR].item() == pytest.approx(nv.item(), rel=1e-9)
    u = p / p.norm(dim=1, keepdim=True)
    l2n_std = u.std(0, unbiased=False).mean() * math.sqrt(D)
    assert s[names.ENCODER_L2N_STD].item() == pytest.approx(l2n_std.item(), rel=1e-9)
    cos = u @ u.T
    pairs = [(i, j) for i in range(len(tasks)) for j in range(len(tasks)) if tasks[i] != tasks[j]]
    expected = sum(cos[i, j].item() for i, j in pairs) / len(pairs)
    assert s[names.ENCODER_CROSS_TASK_COSINE].item() == pytest.approx(expected, rel=1e-9)


def test_normalized_var_is_the_varying_fraction_of_the_energy():
    ctx = _context(B=400, offset=0.0)
    assert encoder_statistics(ctx, _tasks(400)).get(names.ENCODER_NORMALIZED_VAR).item() == pytest.approx(1.0, abs=0.02)
    # a common offset of 3 per dim: energy 9 + 1/P per dim, of which 1/P varies (P=4) -> 0.25/9.25
    shifted = encoder_statistics(_context(B=400, offset=3.0), _tasks(400))[names.ENCODER_NORMALIZED_VAR].item()
    assert shifted == pytest.approx(0.25 / 9.25, rel=0.1)


def test_effective_rank_counts_equal_directions():
    g = torch.Generator().manual_seed(1)
    basis, _ = torch.linalg.qr(torch.randn(16, 16, generator=g, dtype=torch.float64))
    rows = torch.cat([basis[:3] * 2, -basis[:3] * 2])  # centred, 3 equal singular values
    assert effective_rank(rows).item() == pytest.approx(3.0, rel=1e-9)
    assert effective_rank(rows * 1e-3).item() == pytest.approx(3.0, rel=1e-9)
    assert effective_rank(torch.ones(8, 16)).item() == 0.0


def test_scaling_x100_leaves_scale_invariant_statistics_and_changes_raw_ones():
    ctx, tasks = _context(offset=0.2), _tasks()
    a, b = encoder_statistics(ctx, tasks), encoder_statistics(ctx * 100, tasks)
    for key in SCALE_INVARIANT:
        assert b[key].item() == pytest.approx(a[key].item(), rel=1e-4, abs=1e-6), key
    for key in RAW:
        assert abs(b[key].item()) > 50 * abs(a[key].item()), key


def test_collapsed_and_random_contexts_sit_at_the_ends():
    ctx = _context()
    constant = _context(B=1).expand_as(ctx) + 0 * ctx
    c = encoder_statistics(constant, _tasks())
    assert c[names.ENCODER_NORMALIZED_VAR].item() == pytest.approx(0.0, abs=1e-12)
    assert c[names.ENCODER_L2N_STD].item() == pytest.approx(0.0, abs=1e-6)
    assert c[names.ENCODER_CROSS_TASK_COSINE].item() == pytest.approx(1.0, abs=1e-9)
    assert c[names.ENCODER_EFFECTIVE_RANK].item() == 0.0
    r = encoder_statistics(_context(B=256), _tasks(256, 64))
    assert r[names.ENCODER_NORMALIZED_VAR].item() > 0.9
    assert 0.9 < r[names.ENCODER_L2N_STD].item() < 1.1
    assert abs(r[names.ENCODER_CROSS_TASK_COSINE].item()) < 0.05
    assert r[names.ENCODER_EFFECTIVE_RANK].item() > 20


def test_non_finite_context_gives_nan_not_an_error():
    ctx = _context()
    ctx[3, 0, 0] = float("nan")
    stats = encoder_statistics(ctx, _tasks())  # the SVD would raise on NaN
    assert math.isnan(stats[names.ENCODER_EFFECTIVE_RANK].item())
    assert math.isnan(stats[names.ENCODER_NORMALIZED_VAR].item())


def test_cross_task_cosine_ignores_pairs_of_the_same_task():
    rows = torch.eye(4, 8).repeat_interleave(3, dim=0)  # 4 tasks, 3 identical rows each, orthogonal tasks
    ctx = rows.unsqueeze(1)
    tasks = torch.arange(4).repeat_interleave(3)
    assert encoder_statistics(ctx, tasks)[names.ENCODER_CROSS_TASK_COSINE].item() == pytest.approx(0.0, abs=1e-12)
    assert names.ENCODER_CROSS_TASK_COSINE not in encoder_statistics(ctx, torch.zeros(12, dtype=torch.long))


def test_statistics_of_gathered_shards_equal_the_whole_batch():
    ctx, tasks = _context(offset=0.1), _tasks()
    whole = encoder_statistics(ctx, tasks)
    shards = [ctx[0::2], ctx[1::2]]  # how DDP ranks split a global batch
    pooled = torch.cat([pool_context(s) for s in shards])
    moments = sum(value_moments(s) for s in shards)
    gathered = batch_statistics(pooled, torch.cat([tasks[0::2], tasks[1::2]]), moments)
    for key, value in whole.items():
        assert gathered[key].item() == pytest.approx(value.item(), rel=1e-9, abs=1e-12), key


# ------------------------------------------------------------------------------------- probe, drift
def test_probe_statistics():
    a = _context(B=8, seed=3)
    same = probe_statistics(a, a * 5)
    assert same[names.PROBE_SAME_TASK_COSINE].item() == pytest.approx(1.0)
    assert same[names.PROBE_RETRIEVAL_ACC].item() == 1.0
    assert same[names.PROBE_DIFF_TASK_COSINE].item() < 0.5
    collapsed = probe_statistics(torch.ones(8, 16), torch.ones(8, 16))
    assert collapsed[names.PROBE_RETRIEVAL_ACC].item() == 0.0  # ties are misses, not lucky hits
    assert collapsed[names.PROBE_DIFF_TASK_COSINE].item() == pytest.approx(1.0)
    swapped = probe_statistics(a, a.roll(1, dims=0))  # B finds the wrong task everywhere
    assert swapped[names.PROBE_RETRIEVAL_ACC].item() == 0.0


def test_drift_statistics():
    a = _context(B=8, seed=4)
    assert drift_statistics(a, a)[names.PROBE_DRIFT_COSINE].item() == pytest.approx(0.0, abs=1e-12)
    doubled = drift_statistics(2 * a, a)
    assert doubled[names.PROBE_DRIFT_COSINE].item() == pytest.approx(0.0, abs=1e-12)
    assert doubled[names.PROBE_DRIFT_REL_L2].item() == pytest.approx(1.0)
    assert drift_statistics(-a, a)[names.PROBE_DRIFT_COSINE].item() == pytest.approx(2.0)


# ------------------------------------------------------------------------------------- rules
def _feed(rule, key, series):
    """Step through ``series`` and return the check indices at which the rule fired."""
    return [i for i, v in enumerate(series) if rule.update({key: v}, step=i) is not None]


def test_accuracy_collapse_fires_within_patience_after_the_fall():
    series = [0.1, 0.3, 0.5, 0.7, 0.7, 0.05, 0.05, 0.05, 0.05, 0.05]
    fall = series.index(0.05)
    for patience in (1, 2, 3):
        rule = AccuracyCollapse(drop=0.5, min_peak=0.2, patience=patience)
        fired = _feed(rule, "train/accuracy", series)
        assert fired == [fall + patience - 1], (patience, fired)  # once, not at every later check
    alert = AccuracyCollapse(0.5, 0.2, 1).update({"train/accuracy": 0.7}, 1)
    assert alert is None


def test_accuracy_that_holds_does_not_fire():
    rule = AccuracyCollapse(drop=0.5, min_peak=0.2, patience=2)
    assert _feed(rule, "train/accuracy", [0.1, 0.3, 0.5, 0.7, 0.7, 0.68, 0.69, 0.68, 0.68]) == []
    low = AccuracyCollapse(drop=0.5, min_peak=0.2, patience=1)
    assert _feed(low, "train/accuracy", [0.1, 0.15, 0.01, 0.0]) == []  # the peak never passed min_peak


def test_accuracy_alert_record():
    rule = AccuracyCollapse(drop=0.5, min_peak=0.2, patience=1)
    rule.update({"train/accuracy": 0.7}, 10)
    alert = rule.update({"train/accuracy": 0.05, "other": 1.0}, 20)
    assert alert.rule == "accuracy_collapse" and alert.step == 20 and alert.action == "warn"
    assert alert.values == {"train/accuracy": 0.05}
    assert alert.thresholds["peak"] == 0.7 and alert.thresholds["floor"] == pytest.approx(0.35)
    assert "train/accuracy=0.0500" in alert.message


def test_rising_rule_needs_patience_consecutive_rises():
    rule = QHaltRising(patience=3)
    assert _feed(rule, "train/q_halt_loss", [0.05, 0.06, 0.07, 0.065, 0.07, 0.08, 0.09, 0.1]) == [6]
    strict = QHaltRising(patience=2, min_rise=0.5)
    assert _feed(strict, "train/q_halt_loss", [1.0, 1.1, 1.2, 1.3]) == []
    assert _feed(QHaltRising(patience=2, min_rise=0.5), "train/q_halt_loss", [2.0, 3.1, 4.7]) == [2]


def test_representation_rule_streaks_and_rearms():
    rule = RepresentationCollapse(min_normalized_var=0.01, max_cross_task_cosine=0.99, patience=2)
    nv, cos = "diagnostics/encoder_normalized_var", "diagnostics/encoder_cross_task_cosine"
    checks = [
        {nv: 0.5, cos: 0.5},
        {nv: 0.001, cos: 0.5},   # 1
        {nv: 0.5, cos: 0.999},   # 2 -> fires (either condition)
        {nv: 0.001, cos: 0.999},  # still collapsed: no repeat
        {},                       # no fresh values: skipped
        {nv: 0.5, cos: 0.5},      # clears
        {nv: 0.0, cos: 1.0},
        {nv: 0.0, cos: 1.0},      # fires again
    ]
    fired = [i for i, v in enumerate(checks) if rule.update(v, i) is not None]
    assert fired == [2, 7]


def test_drift_and_nonfinite_rules():
    drift = ProbeDrift(max_probe_drift_cosine=0.1, max_probe_drift_rel_l2=None, jump_ratio=None, patience=2)
    key = "diagnostics/probe_drift_cosine"
    assert _feed(drift, key, [0.01, 0.2, 0.05, 0.2, 0.3]) == [4]
    # relative to the run's own drift: the early, steadily large drifts of learning do not fire; a jump over a
    # settled run does (0.9 > 3 x the median 0.1 of the previous five)
    jump = ProbeDrift(max_probe_drift_cosine=0.2, jump_ratio=3.0, history=5)
    assert _feed(jump, key, [0.5, 0.4, 0.35, 0.3, 0.1, 0.05, 0.04, 0.9, 0.05]) == [7]
    assert jump.state()["recent"][key] == [0.1, 0.05, 0.04, 0.9, 0.05]  # the last five, kept in checkpoints
    nonfinite = NonFinite("raise")
    assert nonfinite.update({"nonfinite_loss_ranks": 0.0, "nonfinite_grad_ranks": 0.0}) is None
    alert = nonfinite.update({"nonfinite_loss_ranks": 1.0, "nonfinite_grad_ranks": 0.0}, 7)
    assert alert.action == "raise" and alert.step == 7 and "1 rank(s)" in alert.message


def test_rule_arguments_are_checked():
    with pytest.raises(ValueError):
        AccuracyCollapse(drop=1.5, min_peak=0.2)
    with pytest.raises(ValueError):
        QHaltRising(patience=0)
    with pytest.raises(ValueError):
        NonFinite("explode")
    with pytest.raises(ValueError, match="leave the rule out"):
        RepresentationCollapse(min_normalized_var=None, max_cross_task_cosine=None)
    with pytest.raises(ValueError, match="leave the rule out"):
        ProbeDrift(max_probe_drift_cosine=None, max_probe_drift_rel_l2=None)


def test_default_rules_keep_the_documented_thresholds():
    """CollapseAlert() without rules checks these (docs/diagnostics.md gives the measurements behind them)."""
    rules = default_rules()
    assert [(type(r).__name__, r.name, r.patience, r.action) for r in rules] == [
        ("NonFinite", "nonfinite", 1, "stop"),
        ("RepresentationCollapse", "representation_collapse", 3, "warn"),
        ("ProbeDrift", "drift", 1, "warn"),
        ("CumulativeDrift", "cumulative_drift", 2, "warn"),
        ("OutputMeanShift", "output_mean_shift", 3, "warn"),
        ("AccuracyCollapse", "accuracy_collapse", 3, "warn"),
        ("QHaltRising", "q_halt_rising", 8, "warn"),
        ("IgnoredEncoder", "ignored_encoder", 3, "warn"),
        ("IgnoredEncoder", "ignored_encoder", 5, "warn"),
    ]
    nonfinite, collapse, drift, cumulative, mean, accuracy, q_halt, ignored_val, ignored_train = rules
    assert nonfinite.check_gradients and nonfinite.checked_during_warmup
    assert not any(r.checked_during_warmup for r in rules[1:])
    assert collapse.thresholds() == {"min_normalized_var": 0.01, "max_cross_task_cosine": 0.99,
                                     "max_probe_retrieval": 0.5}
    assert drift.thresholds() == {"max_probe_drift_cosine": 0.2, "max_probe_drift_rel_l2": None, "jump_ratio": 3.0}
    assert drift.history == 5
    assert cumulative.thresholds() == {"max_window_drift_cosine": 0.3, "max_stale_context_gap": -0.05}
    assert mean.thresholds() == {"max_mean_fraction": 0.5}
    assert (accuracy.drop, accuracy.min_peak, accuracy.keys) == (0.5, 0.2, ("train/accuracy",))
    assert (q_halt.min_rise, q_halt.keys) == (0.0, ("train/q_halt_loss",))
    assert collapse.keys == ("diagnostics/encoder_normalized_var", "diagnostics/encoder_cross_task_cosine",
                             "diagnostics/probe_retrieval_acc")
    assert drift.keys == ("diagnostics/probe_drift_cosine", "diagnostics/probe_drift_rel_l2")
    assert ignored_val.keys == ("val/reliance_drop_shuffled_cell", "train/accuracy", "train/count")
    assert ignored_train.keys == ("train/reliance_drop_shuffled_cell", "train/accuracy", "train/count")


# ------------------------------------------------------------------------------------- reliance, grads
def test_derangement_moves_every_row_to_another_task():
    for tasks in ([0, 0, 1, 1, 2, 2], [3, 1, 3, 2, 1, 2, 0, 0], [5, 5, 5, 1, 2, 3], list(range(7))):
        t = torch.tensor(tasks)
        perm = derangement(t)
        assert sorted(perm.tolist()) == list(range(len(tasks)))
        assert (perm != torch.arange(len(tasks))).all()
        assert (t[perm] != t).all(), tasks
    same = derangement(torch.zeros(3, dtype=torch.long))  # one task: rows still move
    assert (same != torch.arange(3)).all()
    assert derangement(torch.tensor([4])) is None


def test_row_accuracy_counts_supervised_cells_only():
    labels = torch.tensor([[1, 2, -100], [3, -100, -100], [-100, -100, -100]])
    preds = torch.tensor([[1, 0, 7], [3, 9, 9], [0, 0, 0]])
    has, exact, cell = row_accuracy(preds, labels)
    assert has.tolist() == [True, True, False]
    assert exact[:2].tolist() == [False, True]
    assert cell[:2].tolist() == [0.5, 1.0]


def test_grad_norm_helpers():
    a, b = torch.full((3,), 2.0), torch.full((1,), 2.0)
    assert total_norm([a, b]).item() == pytest.approx(4.0)
    assert total_norm([]).item() == 0.0
    assert clip_ratio(torch.tensor(4.0), 1.0).item() == pytest.approx(0.25, rel=1e-5)
    assert clip_ratio(torch.tensor(0.5), 1.0).item() == 1.0
    assert clip_ratio(torch.tensor(4.0), None).item() == 1.0


# ------------------------------------------------------------------------------------- probe set
def test_probe_batch_is_fixed_aligned_and_unseen_in_training(synthetic_task_dir, synthetic_eval_dir):
    from trm_lightning.data.datamodule import ARCDataModule

    dm = ARCDataModule(train_source=str(synthetic_task_dir), eval_source=str(synthetic_eval_dir), canvas_size=6,
                       max_demos=4, global_batch_size=4, num_train_augmentations=10, val_augmentations=2)
    batch = dm.probe_batch(5, views=2)
    assert batch["inputs"].shape[0] == 10
    assert torch.equal(batch["task_index"][:5], batch["task_index"][5:])
    assert len(set(batch["task_index"].tolist())) == 5
    assert (batch["aug_index"][:5] == 12).all() and (batch["aug_index"][5:] == 13).all()  # after train 0-9, val 10-11
    again = dm.probe_batch(5, views=2)
    assert all(torch.equal(batch[k], again[k]) for k in batch)
    assert dm.probe_batch(50)["inputs"].shape[0] == 2 * len(dm.train_tasks)


def test_the_arc_recipe_spells_out_the_default_rules():
    from pathlib import Path

    import yaml

    import callbacks.alert_rules as alert_rules

    config = yaml.safe_load((Path(__file__).resolve().parents[2] / "configs/arc1/encoder_trm.yaml").read_text())
    (alert,) = [c for c in config["trainer"]["callbacks"] if c["class_path"] == "callbacks.CollapseAlert"]
    spelled = [getattr(alert_rules, r["class_path"])(**r.get("init_args", {})) for r in alert["init_args"]["rules"]]
    assert [(type(r), r.thresholds(), r.patience, r.action, r.keys) for r in spelled] == [
        (type(r), r.thresholds(), r.patience, r.action, r.keys) for r in default_rules()]
