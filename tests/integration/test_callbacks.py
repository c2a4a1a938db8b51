"""The diagnostics callbacks in real tiny fits: values read back from TensorBoard, alerts that fire (and don't)."""

from __future__ import annotations

import json
import os

import pytest
import torch
import yaml
from lightning.pytorch import Callback

from callbacks import CollapseAlert, CollapseAlertError, ContextReliance, EncoderDiagnostics, GradNorms
from callbacks.alert_rules import (
    AccuracyCollapse,
    NonFinite,
    ProbeDrift,
    QHaltRising,
    RepresentationCollapse,
    default_rules,
)
from callbacks.encoder_diagnostics import encoder_statistics
from tests.integration.helpers import ROOT, build_tiny, tiny_args
from trm_lightning.cli import build_cli

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

NO_VAL = ("--trainer.limit_val_batches=0",)
SCALE_INVARIANT = ["diagnostics/encoder_normalized_var", "diagnostics/encoder_l2n_std",
                   "diagnostics/encoder_cross_task_cosine", "diagnostics/encoder_effective_rank",
                   "diagnostics/probe_same_task_cosine", "diagnostics/probe_diff_task_cosine",
                   "diagnostics/probe_retrieval_acc"]
RAW = ["diagnostics/encoder_cross_sample_var", "diagnostics/encoder_output_mean", "diagnostics/encoder_output_std"]


def _fit(dirs, tmp_path, callbacks, *args, encode=None, max_steps=4):
    """A tiny fit with ``callbacks`` appended; ``encode(real_context, trainer) -> context`` replaces the encoder's."""
    train_dir, eval_dir = dirs
    cli = build_tiny(train_dir, eval_dir, tmp_path, f"--trainer.max_steps={max_steps}", *args)
    cli.trainer.callbacks.extend(callbacks)
    if encode is not None:
        real = cli.model.model.encode
        cli.model.model.encode = lambda data: encode(real(data), cli.trainer)
    cli.trainer.fit(cli.model, cli.datamodule)
    return cli


def _scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "histograms": 0, "tensors": 0})
    ea.Reload()
    out = {tag: [(e.step, e.value) for e in ea.Scalars(tag)] for tag in ea.Tags()["scalars"]}
    out["_histograms"] = ea.Tags()["histograms"]
    out["_text"] = ea.Tags()["tensors"]
    return out


def _alerts(log_dir) -> list[dict]:
    path = os.path.join(log_dir, "alerts.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f]


def _all_raise(**kwargs) -> CollapseAlert:
    """Default thresholds, every rule set to raise: a fit that finishes fired nothing."""
    rules = [NonFinite("raise"), RepresentationCollapse(action="raise"), ProbeDrift(action="raise"),
             AccuracyCollapse(action="raise"), QHaltRising(action="raise")]
    return CollapseAlert(rules, **kwargs)


def _defaults_with(*rules, without=()):
    """The default rules, each given rule in place of the default one of its class, the classes ``without`` left out."""
    given = {type(r): r for r in rules}
    return [given.get(type(r), r) for r in default_rules() if type(r) not in without]


class ContextSpy(Callback):
    def __init__(self):
        self.seen = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seen.append((outputs["context"].clone(), outputs["task_index"].clone()))




@pytest.fixture
def dirs(synthetic_task_dir, synthetic_eval_dir):
    return synthetic_task_dir, synthetic_eval_dir


def _constant(context, trainer):
    pattern = torch.linspace(-1, 1, context.shape[-1]).expand_as(context)
    return pattern + 0 * context  # every row the same, the graph still reaches the encoder


# ------------------------------------------------------------------------------ values in TensorBoard
def test_random_encoder_logs_every_metric_and_fires_nothing(dirs, tmp_path):
    spy = ContextSpy()
    callbacks = [EncoderDiagnostics(every_n_steps=1, probe_every_n_steps=2, probe_tasks=6), GradNorms(), spy,
                 _all_raise()]
    cli = _fit(dirs, tmp_path, callbacks, *NO_VAL, "--trainer.gradient_clip_val=0.5")
    log_dir = cli.trainer.log_dir
    tb = _scalars(log_dir)
    assert cli.trainer.global_step == 4 and _alerts(log_dir) == []
    # the batch statistics written at each step are those of that step's context
    for i, (context, tasks) in enumerate(spy.seen):
        expected = encoder_statistics(context, tasks)
        for key, value in expected.items():
            written = dict(tb[key])[i]
            assert written == pytest.approx(value.item(), rel=1e-5, abs=1e-6), (i, key)
    probe = dict(tb["diagnostics/probe_retrieval_acc"])
    assert sorted(probe) == [1, 3]  # probe at steps 2 and 4 (TensorBoard step = optimizer step - 1)
    assert sorted(dict(tb["diagnostics/probe_drift_cosine"])) == [3]  # drift needs a previous check
    assert 0 < dict(tb["diagnostics/probe_drift_rel_l2"])[3] < 1
    for tag in ["grad/encoder_norm", "grad/trm_core_norm", "grad/heads_norm", "grad/total_norm", "grad/clip_ratio",
                "update_ratio/encoder", "update_ratio/trm_core", "update_ratio/heads"]:
        assert len(tb[tag]) == 4, tag
    for (_, total), (_, ratio) in zip(tb["grad/total_norm"], tb["grad/clip_ratio"]):
        assert ratio == pytest.approx(min(1.0, 0.5 / total), rel=1e-4)
    parts = [dict(tb[f"grad/{g}_norm"])[0] for g in ("encoder", "trm_core", "heads")]
    assert sum(p * p for p in parts) == pytest.approx(dict(tb["grad/total_norm"])[0] ** 2, rel=1e-4)
    ratios = [v for _, v in tb["update_ratio/encoder"]]
    assert all(0 < v < 0.5 for v in ratios)  # TRM's schedule counts from 1: the first step already moves
    assert "diagnostics/encoder_context" in tb["_histograms"]


def test_encoder_output_x100_changes_only_the_raw_metrics(dirs, tmp_path):
    logs = {}
    for scale in (1.0, 100.0):
        cli = _fit(dirs, tmp_path / str(scale), [EncoderDiagnostics(every_n_steps=1, probe_tasks=6)], *NO_VAL,
                   "--model.encoder_lr_scale=0",  # the probe then encodes with the same encoder at both scales
                   encode=lambda c, trainer, s=scale: c * s, max_steps=1)
        tb = _scalars(cli.trainer.log_dir)
        logs[scale] = {k: v[0][1] for k, v in tb.items() if k.startswith("diagnostics/")}
    plain, scaled = logs[1.0], logs[100.0]
    for key in SCALE_INVARIANT:
        assert scaled[key] == pytest.approx(plain[key], rel=1e-4, abs=1e-6), key
    var, std, mean = RAW
    assert scaled[var] == pytest.approx(plain[var] * 1e4, rel=1e-3)
    assert scaled[std] == pytest.approx(plain[std] * 100, rel=1e-3)
    assert scaled[mean] == pytest.approx(plain[mean] * 100, rel=1e-3)


# ------------------------------------------------------------------------------ alerts
@pytest.mark.parametrize("action", ["warn", "stop", "raise"])
def test_constant_encoder_fires_representation_collapse(dirs, tmp_path, action):
    alert = CollapseAlert(_defaults_with(RepresentationCollapse(patience=2, action=action)))
    callbacks = [EncoderDiagnostics(every_n_steps=1, probe_tasks=6), alert]
    if action == "raise":
        with pytest.raises(CollapseAlertError, match="representation_collapse"):
            _fit(dirs, tmp_path, callbacks, *NO_VAL, encode=_constant)
        log_dir = next(p for p in (tmp_path / "trm").iterdir())
    else:
        with pytest.warns(UserWarning, match=r"representation_collapse\] at step 2"):
            cli = _fit(dirs, tmp_path, callbacks, *NO_VAL, encode=_constant)
        log_dir = cli.trainer.log_dir
        assert cli.trainer.global_step == (4 if action == "warn" else 2)
        assert cli.trainer.should_stop == (action == "stop")
    records = _alerts(log_dir)
    assert [r["rule"] for r in records] == ["representation_collapse"]
    record = records[0]
    assert record["step"] == 2 and record["action"] == action and record["patience"] == 2
    assert record["values"]["diagnostics/encoder_normalized_var"] == pytest.approx(0.0, abs=1e-6)
    assert record["values"]["diagnostics/encoder_cross_task_cosine"] == pytest.approx(1.0, abs=1e-6)
    assert record["thresholds"] == {"min_normalized_var": 0.01, "max_cross_task_cosine": 0.99, "max_probe_retrieval": 0.5}
    ckpt = os.path.join(log_dir, "checkpoints", "alert-step2.ckpt")
    if action == "warn":
        assert not os.path.exists(ckpt)
        assert "alerts/representation_collapse/text_summary" in _scalars(log_dir)["_text"]
    else:
        assert torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"] == 2


def test_slowly_drifting_encoder_fires_drift(dirs, tmp_path):
    def drifting(context, trainer):  # the frozen encoder's output plus a direction that grows with the step
        direction = torch.linspace(1, -1, context.shape[-1]).expand_as(context)
        return context + 0.2 * trainer.global_step * direction

    def run(name, encode):
        drift = ProbeDrift(max_probe_drift_cosine=None, max_probe_drift_rel_l2=0.05, jump_ratio=None, patience=2,
                           action="stop")  # absolute limit only: the relative test needs a history
        alert = CollapseAlert(_defaults_with(drift, without=(RepresentationCollapse,)))
        cli = _fit(dirs, tmp_path / name, [EncoderDiagnostics(every_n_steps=1, probe_tasks=6), alert], *NO_VAL,
                   "--model.encoder_lr_scale=0", encode=encode, max_steps=5)
        return cli, _alerts(cli.trainer.log_dir)

    cli, records = run("drifting", drifting)
    assert [r["rule"] for r in records] == ["drift"] and records[0]["step"] == 3  # drift at checks 2 and 3
    assert cli.trainer.global_step == 3
    drift = records[0]["values"]["diagnostics/probe_drift_rel_l2"]
    assert 0.05 < drift < 0.2  # slow: a small change per check
    _, still = run("frozen", None)
    assert still == []


def test_nan_loss_fires_nonfinite_and_stops(dirs, tmp_path):
    train_dir, eval_dir = dirs
    cli = build_tiny(train_dir, eval_dir, tmp_path, "--trainer.max_steps=6", "--last_checkpoint.every_n_train_steps=1",
                     *NO_VAL)
    step = cli.model.training_step

    def poisoned(batch, batch_idx):
        out = step(batch, batch_idx)
        if cli.trainer.global_step == 2:  # the third optimizer step
            out["loss"] = out["loss"] * float("nan")
        return out

    cli.model.training_step = poisoned
    cli.trainer.callbacks.append(CollapseAlert(check_every_n_steps=2))
    with pytest.warns(UserWarning) as warned:
        cli.trainer.fit(cli.model, cli.datamodule)
    records = _alerts(cli.trainer.log_dir)
    assert [r["rule"] for r in records] == ["nonfinite"]
    assert records[0]["step"] == 4  # the first check after the NaN step
    assert records[0]["values"] == {"nonfinite_loss_ranks": 1.0, "nonfinite_grad_ranks": 1.0,
                                    "first_nonfinite_step": 3.0}
    assert "first at step 3" in records[0]["message"]
    assert cli.trainer.global_step == 4
    # no checkpoint of the NaN weights; last.ckpt keeps step 2, the last finite state, and the run says so
    ckpt_dir = os.path.join(cli.trainer.log_dir, "checkpoints")
    assert sorted(os.listdir(ckpt_dir)) == ["last.ckpt"]
    last = torch.load(os.path.join(ckpt_dir, "last.ckpt"), weights_only=False)
    assert last["global_step"] == 2
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point())
    messages = [str(w.message) for w in warned]
    assert any("last.ckpt (step 2) is the last finite state" in m for m in messages), messages
    # no EncoderDiagnostics in this fit: default rules that read diagnostics/* stay silent without warning
    assert not [m for m in messages if "no callback in trainer.callbacks publishes" in m]


def _growing_constant(context, trainer):
    """Every row the same pattern (collapsed), scaled up at each step (the probe set drifts in relative L2)."""
    pattern = torch.linspace(-1, 1, context.shape[-1]).expand_as(context)
    return pattern * (1.0 + 0.2 * trainer.global_step) + 0 * context


@pytest.mark.parametrize("alert_first", [False, True])
def test_alerts_do_not_depend_on_the_callback_order(dirs, tmp_path, alert_first):
    """CollapseAlert before EncoderDiagnostics reads this step's values (it asks the producer to compute them first),
    so the same alerts fire at the same steps with the same values as after it, and the diagnostics are computed
    once per step either way."""
    def run(name, first):
        diagnostics = EncoderDiagnostics(every_n_steps=1, probe_every_n_steps=1, probe_tasks=6)
        computed = []
        batch_check = diagnostics._batch_check
        diagnostics._batch_check = lambda trainer, *a: computed.append(trainer.global_step) or batch_check(trainer, *a)
        rules = [RepresentationCollapse(patience=2), ProbeDrift(max_probe_drift_cosine=None,
                                                                max_probe_drift_rel_l2=0.05, jump_ratio=None,
                                                                patience=2)]
        alert = CollapseAlert(rules, check_every_n_steps=1)
        order = [alert, diagnostics] if first else [diagnostics, alert]
        with pytest.warns(UserWarning, match=r"\[drift\] at step 3"):
            cli = _fit(dirs, tmp_path / name, order, *NO_VAL, encode=_growing_constant)
        assert computed == [1, 2, 3, 4]
        return _alerts(cli.trainer.log_dir), _scalars(cli.trainer.log_dir)

    records, tb = run("this_order", alert_first)
    assert [(r["step"], r["rule"]) for r in records] == [(2, "representation_collapse"), (3, "drift")]
    assert records[1]["values"]["diagnostics/probe_drift_rel_l2"] == pytest.approx(0.2 / 1.4, rel=1e-4)
    other_records, other_tb = run("other_order", not alert_first)
    assert other_records == records
    assert {k: v for k, v in other_tb.items() if k.startswith("diagnostics/")} == {
        k: v for k, v in tb.items() if k.startswith("diagnostics/")}
    assert {"alerts/representation_collapse/text_summary", "alerts/drift/text_summary"} <= set(tb["_text"])


def test_rules_are_chosen_in_yaml_by_short_or_full_class_path(dirs, tmp_path, capsys):
    overlay = tmp_path / "alerts.yaml"
    overlay.write_text(
        "trainer:\n"
        "  callbacks:\n"
        "    - class_path: callbacks.CollapseAlert\n"
        "      init_args:\n"
        "        check_every_n_steps: 5\n"
        "        rules:\n"
        "          - class_path: RepresentationCollapse\n"
        "            init_args: {min_normalized_var: 0.02, patience: 4, action: stop}\n"
        "          - class_path: callbacks.alert_rules.ProbeDrift\n"
        "            init_args: {max_probe_drift_rel_l2: 0.1}\n"
        "          - class_path: callbacks.NonFinite\n"
        "    - class_path: CollapseAlert\n"  # no rules: the default list
    )
    cli = build_tiny(*dirs, tmp_path, "--config", str(overlay))
    configured, default = [cb for cb in cli.trainer.callbacks if isinstance(cb, CollapseAlert)]
    assert configured.check_every_n_steps == 5
    collapse, drift, nonfinite = configured.rules
    assert type(collapse) is RepresentationCollapse and (collapse.patience, collapse.action) == (4, "stop")
    assert collapse.thresholds() == {"min_normalized_var": 0.02, "max_cross_task_cosine": 0.99,
                                     "max_probe_retrieval": 0.5}
    assert type(drift) is ProbeDrift and drift.thresholds() == {"max_probe_drift_cosine": 0.2,
                                                                "max_probe_drift_rel_l2": 0.1, "jump_ratio": 3.0}
    assert type(nonfinite) is NonFinite and nonfinite.action == "stop"
    assert [type(r) for r in default.rules] == [type(r) for r in default_rules()]

    with pytest.raises(SystemExit):
        build_cli(["fit", *tiny_args(*dirs, tmp_path, "--config", str(overlay)), "--print_config"])
    printed = capsys.readouterr().out
    entries = yaml.safe_load(printed)["trainer"]["callbacks"]
    assert [r["class_path"] for r in entries[0]["init_args"]["rules"]] == [  # short names resolved to import paths
        "callbacks.RepresentationCollapse", "callbacks.alert_rules.ProbeDrift", "callbacks.NonFinite"]
    assert entries[1]["init_args"]["rules"] is None
    saved = tmp_path / "printed.yaml"  # the callbacks a run's config.yaml holds parse back to the same rules
    saved.write_text(yaml.safe_dump({"trainer": {"callbacks": entries}}))
    again = build_tiny(*dirs, tmp_path, "--config", str(saved))
    rebuilt = next(cb for cb in again.trainer.callbacks if isinstance(cb, CollapseAlert))
    assert [(type(r), r.thresholds(), r.patience, r.action) for r in rebuilt.rules] == [
        (type(r), r.thresholds(), r.patience, r.action) for r in configured.rules]


def test_the_documented_yaml_example_parses(dirs, tmp_path):
    doc = (ROOT / "docs" / "diagnostics.md").read_text()
    example = next(block for block in doc.split("```yaml\n")[1:] if "CollapseAlert" in block).split("```")[0]
    overlay = tmp_path / "example.yaml"
    overlay.write_text(example)
    cli = build_tiny(*dirs, tmp_path, "--config", str(overlay))
    (alert,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, CollapseAlert)]
    assert [type(r) for r in alert.rules] == [NonFinite, RepresentationCollapse, AccuracyCollapse]
    assert (alert.warmup_steps, alert.rules[1].action, alert.rules[2].patience) == (2000, "stop", 5)


# ------------------------------------------------------------------------------ context reliance
def test_context_reliance(dirs, tmp_path):
    zero = _fit(dirs, tmp_path / "zero", [ContextReliance()], encode=lambda c, t: 0 * c, max_steps=2)
    metrics = zero.trainer.callback_metrics
    for key in ["val/reliance_drop_shuffled", "val/reliance_drop_zero", "val/reliance_drop_shuffled_cell",
                "val/reliance_drop_zero_cell"]:
        assert metrics[key].item() == 0.0, key
    tb = _scalars(zero.trainer.log_dir)
    assert tb["val/reliance_drop_zero_cell"] == [(1, 0.0)]

    real = _fit(dirs, tmp_path / "real", [ContextReliance()], max_steps=2)
    m = real.trainer.callback_metrics
    # the real numbers the drops start from are the module's own val metrics
    assert (m["val/accuracy_zero_context"] + m["val/reliance_drop_zero_cell"]).item() == pytest.approx(
        m["val/accuracy"].item(), abs=1e-6)
    assert (m["val/exact_accuracy_zero_context"] + m["val/reliance_drop_zero"]).item() == pytest.approx(
        m["val/exact_accuracy"].item(), abs=1e-6)
    # this TRM does read its context: the ablations change some cells
    assert m["val/reliance_drop_zero_cell"].item() != 0.0 or m["val/reliance_drop_shuffled_cell"].item() != 0.0


def test_dashboard_layout_and_threshold_lines(dirs, tmp_path):
    from callbacks import Dashboard
    from callbacks.dashboard import layout

    alert = CollapseAlert(check_every_n_steps=1)
    cli = _fit(dirs, tmp_path, [Dashboard(), EncoderDiagnostics(every_n_steps=1, probe_tasks=6), alert], *NO_VAL)
    tb = _scalars(cli.trainer.log_dir)
    assert "custom_scalars__config__" in tb["_text"]  # the layout is in the event file
    for metric in ("diagnostics/encoder_normalized_var", "diagnostics/encoder_cross_task_cosine",
                   "diagnostics/probe_drift_cosine", "diagnostics/probe_window_drift_cosine"):
        lines = tb[f"thresholds/{metric}"]
        assert len(lines) == 4 and len({v for _, v in lines}) == 1  # one value per check, a flat line
    assert dict(tb["thresholds/diagnostics/encoder_normalized_var"])[1] == pytest.approx(0.01)
    charts = {c for category in layout().values() for c in category}
    assert {"normalised variance", "since drift_window checks ago (a slow drift)", "per parameter group"} <= charts


def test_training_reliance_signal_and_an_ignored_encoder(dirs, tmp_path):
    """ContextReliance's training-time drop: exactly 0 when the TRM gets the same context for every row (it cannot
    read the demos), so IgnoredEncoder fires once the training accuracy rose; the real encoder's drop is published
    every step."""
    from callbacks import IgnoredEncoder
    from trm_lightning import metric_names as names

    def run(name, encode, max_steps):
        rule = IgnoredEncoder(key=names.TRAIN_RELIANCE_DROP_SHUFFLED_CELL, min_drop=1e-9, patience=3)
        reliance = ContextReliance(train_every_n_steps=1, train_rows=4)
        cli = _fit(dirs, tmp_path / name, [reliance, CollapseAlert([rule], check_every_n_steps=1)], *NO_VAL,
                   "--model.lr=3e-3", encode=encode, max_steps=max_steps)
        return _alerts(cli.trainer.log_dir), _scalars(cli.trainer.log_dir)

    records, tb = run("ignored", _constant, 8)
    drops = [v for _, v in tb["train/reliance_drop_shuffled_cell"]]
    assert len(drops) == 8 and all(v == 0.0 for v in drops)
    assert [r["rule"] for r in records][:1] == ["ignored_encoder"]
