"""``trm report`` over run directories made by short real fits: a normal run, one stopped by a forced collapse
alert, one crashed by an injected exception, and a ``trm test`` of the normal run's checkpoint.

The four runs are made once per module (about 5 s on one thread); every test reads them or copies of them.
"""

from __future__ import annotations

import csv
import json
import shutil
import time
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback

from tests.integration.helpers import ROOT, build_tiny
from trm_lightning.cli import build_cli, main
from trm_lightning.errors import ConfigError
from trm_lightning.report.command import build_report
from trm_lightning.report.plots import FIGURES, overlay_figure
from trm_lightning.report.summary import DIAGNOSTICS
from trm_lightning.report.tables import CSV_COLUMNS

DIAG = "callbacks:\n    - class_path: callbacks.EncoderDiagnostics\n      init_args: {every_n_steps: 1, probe_tasks: 6}\n"
OVERLAYS = {
    "R0_base": "# R0 Baseline: the tiny model trains 4 steps and nothing fires.\n"
               "trainer:\n  logger:\n    init_args:\n      name: R0_base\n  " + DIAG,
    "R1_collapse": "# R1 Collapse: a constant encoder output must stop the run.\n"
                   "trainer:\n  logger:\n    init_args:\n      name: R1_collapse\n  " + DIAG +
                   "    - class_path: callbacks.CollapseAlert\n"
                   "      init_args:\n"
                   "        rules:\n"
                   "          - class_path: RepresentationCollapse\n"
                   "            init_args: {patience: 2, action: stop}\n"
                   "model:\n  lr: 3.0e-3\n",
    "R2_crash": "# R2 Crash: an exception in a callback is recorded as a crash.\n"
                "trainer:\n  max_steps: 6\n  logger:\n    init_args:\n      name: R2_crash\n  " + DIAG,
}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class Spy(Callback):
    """What the trainer itself saw: train metrics after each step, val exact accuracy, the last diagnostics."""

    def __init__(self, fail_at: int | None = None):
        self.train: list[tuple[int, float, float]] = []  # (optimizer step, train/accuracy, train/count)
        self.val: list[tuple[int, float]] = []
        self.diagnostics: dict[int, dict[str, float]] = {}  # optimizer step -> diagnostics/* logged at it
        self.fail_at = fail_at

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.fail_at:  # this step's logs never reach the event file
            raise RuntimeError(f"injected failure at step {self.fail_at}")
        m = trainer.callback_metrics
        self.train.append((trainer.global_step, float(m["train/accuracy"]), float(m["train/count"])))
        self.diagnostics[trainer.global_step] = {k: float(m[k]) for k in DIAGNOSTICS if k in m}

    def on_validation_end(self, trainer, pl_module):
        self.val.append((trainer.global_step, float(trainer.callback_metrics["val/exact_accuracy"])))


def _constant(context):
    return torch.linspace(-1, 1, context.shape[-1]).expand_as(context) + 0 * context


@pytest.fixture(scope="module")
def runs(tmp_path_factory, synthetic_task_dir, synthetic_eval_dir):
    """{"dir": runs folder, "<name>": Spy, "test": the test run's callback_metrics}."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("report")
    runs_dir, conf = root / "runs", root / "conf"
    conf.mkdir()
    out = {"dir": runs_dir}
    try:
        for name, text in OVERLAYS.items():
            overlay = conf / f"{name}.yaml"
            overlay.write_text(text)
            cli = build_tiny(synthetic_task_dir, synthetic_eval_dir, runs_dir, "--config", str(overlay))
            spy = out[name] = Spy(fail_at=3 if name == "R2_crash" else None)
            cli.trainer.callbacks.append(spy)  # after EncoderDiagnostics: sees this step's values
            if name == "R1_collapse":
                real = cli.model.model.encode
                cli.model.model.encode = lambda data, real=real: _constant(real(data))
            if name == "R2_crash":
                with pytest.raises(RuntimeError, match="injected failure"):
                    cli.trainer.fit(cli.model, cli.datamodule)
            elif name == "R1_collapse":
                with pytest.warns(UserWarning, match=r"representation_collapse\] at step 2"):
                    cli.trainer.fit(cli.model, cli.datamodule)
            else:
                cli.trainer.fit(cli.model, cli.datamodule)
        ckpt = runs_dir / "R0_base" / "version_0" / "checkpoints" / "last.ckpt"
        # as `make demo` does: the run's own saved config, which has no hypothesis line of its own
        test = build_cli(["test", "--config", str(ckpt.parents[1] / "config.yaml"), f"--ckpt_path={ckpt}",
                          "--trainer.logger.init_args.name=R0_test"])
        out["test"] = {k: float(v) for k, v in test.trainer.callback_metrics.items()}
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.fixture(scope="module")
def report(runs, tmp_path_factory):
    return build_report(runs["dir"], baseline="R0_base", out=tmp_path_factory.mktemp("report_out"))


def _rows(report):
    return {row.run: row for row in report.rows}


# ----------------------------------------------------------------------------------------------- the table
def test_every_run_gets_a_row_with_its_hypothesis_and_change(report):
    rows = _rows(report)
    assert list(rows) == ["R0_base/version_0", "R0_test/version_0", "R1_collapse/version_0", "R2_crash/version_0"]
    assert report.baseline == "R0_base/version_0" and report.skipped == []
    assert rows["R0_base/version_0"].hypothesis == "R0 Baseline: the tiny model trains 4 steps and nothing fires."
    assert rows["R1_collapse/version_0"].hypothesis == "R1 Collapse: a constant encoder output must stop the run."
    assert rows["R2_crash/version_0"].hypothesis == "R2 Crash: an exception in a callback is recorded as a crash."
    # the test run's config has no comment line of its own: it inherits the hypothesis of the run it tested
    assert rows["R0_test/version_0"].hypothesis == rows["R0_base/version_0"].hypothesis

    assert rows["R0_base/version_0"].changes is None
    assert [str(c) for c in rows["R1_collapse/version_0"].changes] == [
        "trainer.callbacks.CollapseAlert: added", "model.lr: 0.001 → 0.003"]
    assert [str(c) for c in rows["R2_crash/version_0"].changes] == ["trainer.max_steps: 4 → 6"]


def test_status_steps_and_alerts(report, runs):
    rows = _rows(report)
    base, alert, crash, test = (rows[f"{n}/version_0"] for n in ("R0_base", "R1_collapse", "R2_crash", "R0_test"))
    assert (base.status, base.status_detail, base.steps) == ("finished", "", 4)
    assert (alert.status, alert.steps) == ("stopped by alert", 2)
    assert alert.status_detail == "representation_collapse at step 2 (action stop)"
    assert (alert.first_alert_step, alert.first_alert_rule, alert.alerts) == (2, "representation_collapse", 1)
    assert (crash.status, crash.steps) == ("crashed", 3)
    assert crash.status_detail == "RuntimeError: injected failure at step 3"
    assert (test.stage, test.status, test.steps) == ("test", "finished", None)
    for row in (base, crash, test):
        assert row.first_alert_step is None and row.alerts == 0
    for row in (base, alert, crash, test):
        assert 0 < row.wall_s < 120


def test_accuracies_pass_at_2_and_diagnostics_are_what_the_trainer_saw(report, runs):
    rows = _rows(report)
    for name in ("R0_base", "R1_collapse", "R2_crash"):
        row, spy = rows[f"{name}/version_0"], runs[name]
        measured = [(step, acc) for step, acc, count in spy.train if count > 0]  # steps where rows halted
        if measured:
            peak = max(acc for _, acc in measured)
            assert row.peak_train_accuracy == pytest.approx(peak, abs=1e-6)
            assert row.peak_train_accuracy_step == next(s for s, a in measured if a == peak)
            assert row.final_train_accuracy == pytest.approx(measured[-1][1], abs=1e-6)
        else:
            assert row.peak_train_accuracy is row.final_train_accuracy is None
        if spy.val:
            best = max(v for _, v in spy.val)
            assert row.best_val_exact_accuracy == pytest.approx(best, abs=1e-6)
            assert row.best_val_exact_accuracy_step == next(s for s, v in spy.val if v == best)
        assert row.diagnostics_step == max(spy.diagnostics) == {"R2_crash": 2}.get(name, row.steps)
        last = spy.diagnostics[row.diagnostics_step]
        assert set(last) == set(DIAGNOSTICS)
        for tag, value in last.items():
            assert row.diagnostics[tag] == pytest.approx(value, rel=1e-5, abs=1e-7), (name, tag)
    assert [step for step, _ in runs["R0_base"].val] == [2, 4] and runs["R2_crash"].val == [(2, pytest.approx(
        rows["R2_crash/version_0"].best_val_exact_accuracy))]
    # pass@2 as counts, from the test run's eval_details.json, also shown on the fit run it evaluated
    test, base = rows["R0_test/version_0"], rows["R0_base/version_0"]
    assert test.arc_pass2_tasks == 6  # every synthetic eval task
    assert 100 * test.arc_pass2_solved / test.arc_pass2_tasks == pytest.approx(runs["test"]["ARC/pass@2"], abs=1e-4)
    assert (base.arc_pass2_solved, base.arc_pass2_tasks, base.arc_pass2_source) == (
        test.arc_pass2_solved, 6, "R0_test/version_0")
    assert rows["R1_collapse/version_0"].arc_pass2_tasks is None
    assert test.checkpoint_from == "R0_base/version_0" and base.checkpoint_from is None


def test_csv_and_markdown_hold_every_column(report):
    with open(report.csv_path, newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == CSV_COLUMNS
        lines = {line["run"]: line for line in reader}
    rows = _rows(report)
    assert list(lines) == list(rows)
    for run, line in lines.items():
        row = rows[run]
        assert line["status"] == row.status and line["status_detail"] == row.status_detail
        assert line["steps"] == ("" if row.steps is None else str(row.steps))
        assert float(line["wall_s"]) == pytest.approx(row.wall_s)
        assert line["hypothesis"] == (row.hypothesis or "")
        for key in ("peak_train_accuracy", "final_train_accuracy", "best_val_exact_accuracy", *DIAGNOSTICS):
            value = row.diagnostics.get(key) if key in DIAGNOSTICS else getattr(row, key)
            if value is None:
                assert line[key] == "", (run, key)
            else:
                assert float(line[key]) == pytest.approx(value, rel=1e-12), (run, key)
    assert lines["R1_collapse/version_0"]["change"] == "trainer.callbacks.CollapseAlert: added; model.lr: 0.001 → 0.003"
    assert lines["R1_collapse/version_0"]["first_alert_step"] == "2"
    assert lines["R1_collapse/version_0"]["first_alert_rule"] == "representation_collapse"
    assert lines["R0_base/version_0"]["change"] == "baseline"
    assert lines["R0_base/version_0"]["arc_pass2_tasks"] == "6"

    text = report.markdown_path.read_text()
    assert "| ID | Hypothesis | Change | Status | Result | Notes |" in text
    line = next(x for x in text.splitlines() if x.startswith("| R1_collapse/version_0 | R1 Collapse"))
    assert "model.lr: 0.001 → 0.003" in line
    assert "🛑 stopped by alert: representation_collapse at step 2" in line
    assert "first alert representation_collapse @ 2 (1 in all); 2 steps" in line
    crash = next(x for x in text.splitlines() if x.startswith("| R2_crash/version_0 |"))
    assert "❌ crashed: RuntimeError: injected failure at step 3" in crash and "trainer.max_steps: 4 → 6" in crash
    base = next(x for x in text.splitlines() if x.startswith("| R0_base/version_0 |"))
    solved = int(rows["R0_base/version_0"].arc_pass2_solved)
    assert "| baseline | ✅ finished |" in base and f"pass@2 {solved}/6 (held-out) (R0_test/version_0) | 4 steps in" in base
    test = next(x for x in text.splitlines() if x.startswith("| R0_test/version_0 |"))
    assert test.endswith(f"| none | ✅ finished | pass@2 {solved}/6 (held-out) | test run of R0_base/version_0 |")
    assert lines["R0_test/version_0"]["checkpoint_from"] == "R0_base/version_0"
    assert "## Encoder diagnostics at the end" in text and "encoder_cross_sample_var" in text


# ----------------------------------------------------------------------------------------------- the plots
def test_plots_are_pngs_with_one_line_per_run(report):
    written = {p.name for p in report.plots}
    # every figure with data; these runs log no probe drift (one probe check) and no reliance drops
    assert {"accuracy.png", "q_halt_loss.png", "diagnostics.png", "lr.png"} <= written
    assert written <= {f"{name}.png" for name in FIGURES} and "reliance.png" not in written
    for path in report.plots:
        data = path.read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 10_000, path
    fits = [r for r in report.runs if r.id != "R0_test/version_0"]
    fig = overlay_figure(report.runs, FIGURES["diagnostics"], "diagnostics")
    axes = [ax for ax in fig.axes if ax.get_visible() and ax.get_title()]
    assert [ax.get_title() for ax in axes] == list(DIAGNOSTICS)
    for ax in axes:
        curves = [line for line in ax.get_lines() if line.get_gid().startswith("run:")]
        alerts = [line for line in ax.get_lines() if line.get_gid().startswith("alert:")]
        assert sorted(c.get_label() for c in curves) == sorted(r.id for r in fits), ax.get_title()
        assert [a.get_gid() for a in alerts] == ["alert:R1_collapse/version_0"]
        assert list(alerts[0].get_xdata()) == [2, 2]  # the alert's optimizer step
    lr = overlay_figure(report.runs, FIGURES["lr"], "lr")
    titles = [ax.get_title() for ax in lr.axes if ax.get_visible() and ax.get_title()]
    assert titles == ["lr/encoder", "lr/trm"]
    for ax in lr.axes[:2]:
        curves = {line.get_label(): line for line in ax.get_lines() if line.get_gid().startswith("run:")}
        assert len(curves) == 3
        assert list(curves["R2_crash/version_0"].get_xdata()) == [1, 2, 3]  # steps 1..3, then the crash
        assert list(curves["R1_collapse/version_0"].get_ydata()) == pytest.approx([3e-3, 3e-3])  # warmup 1 step


# ----------------------------------------------------------------------------------- robustness, liveness
def test_unrelated_files_and_half_written_runs_are_skipped_one_line_each(runs, tmp_path, capsys):
    messy = tmp_path / "messy"
    shutil.copytree(runs["dir"] / "R0_base" / "version_0", messy / "good" / "version_0")
    torn = messy / "torn" / "version_0"
    shutil.copytree(runs["dir"] / "R0_base" / "version_0", torn)
    event = next(torn.glob("events.out.tfevents.*"))
    event.write_bytes(event.read_bytes()[:-7])  # a run killed mid-write: the last record is cut
    (messy / "notes.txt").write_text("not a run")
    (messy / "half" / "version_0").mkdir(parents=True)
    (messy / "half" / "version_0" / "config.yaml").write_text("model: {lr: 0.001}\n")  # no events yet
    (messy / "broken" / "version_0").mkdir(parents=True)
    (messy / "broken" / "version_0" / "config.yaml").write_text("model: [unclosed\n")
    (messy / "broken" / "version_0" / "events.out.tfevents.1.host.0.0").write_bytes(b"\x00garbage")
    (messy / "empty" / "version_3").mkdir(parents=True)
    (messy / "other" / "data").mkdir(parents=True)
    (messy / "other" / "data" / "x.bin").write_bytes(b"\x01\x02")
    (messy / "fewshot" / "data" / "train").mkdir(parents=True)
    for i in range(40):  # a data folder of many task files: one line for the folder, not one per file
        (messy / "fewshot" / "data" / "train" / f"task{i:03d}.json").write_text("{}")

    main(["report", str(messy), "--out", str(tmp_path / "out"), "--no-plots"])
    printed = capsys.readouterr().out.splitlines()
    skipped = [line for line in printed if line.startswith("skipped ")]
    assert skipped == [
        "skipped broken/version_0: config.yaml is not readable YAML (while parsing a flow sequence)",
        "skipped empty/version_3: no config.yaml (a half-written run, or not one made by `trm fit`)",
        "skipped fewshot/data/train/: not a run directory (40 files outside any run)",
        "skipped half/version_0: no TensorBoard event file",
        "skipped notes.txt: not a run directory (a file outside any run)",
        "skipped other/data/x.bin: not a run directory (a file outside any run)",
    ]
    assert printed[-1].startswith("report: 2 run(s), 6 skipped, baseline good/version_0;")
    with open(tmp_path / "out" / "report.csv", newline="") as f:
        lines = {line["run"]: line for line in csv.DictReader(f)}
    assert list(lines) == ["good/version_0", "torn/version_0"]
    assert lines["torn/version_0"]["status"] == "finished" and lines["torn/version_0"]["change"] == "none"
    assert "## Skipped" in (tmp_path / "out" / "report.md").read_text()


def test_a_run_without_an_end_marker_is_running_while_it_writes_then_crashed(runs, tmp_path):
    live = tmp_path / "live"
    shutil.copytree(runs["dir"] / "R0_base" / "version_0", live / "R0_base" / "version_0")
    run_dir = live / "R0_base" / "version_0"
    status = json.loads((run_dir / "status.json").read_text())
    status["fit"] = {k: status["fit"][k] for k in ("status", "start_time", "pid", "host")} | {"status": "running"}
    (run_dir / "status.json").write_text(json.dumps(status))
    newest = max(p.stat().st_mtime for p in run_dir.iterdir() if p.is_file())
    fresh = build_report(live, out=tmp_path / "a", stale_after_s=600, now=newest + 30, plots=False).rows[0]
    assert (fresh.status, fresh.status_detail) == ("running", "last write 30 s ago")
    assert fresh.steps == 4  # the last logged step
    assert fresh.wall_s == pytest.approx(newest + 30 - status["fit"]["start_time"])
    dead = build_report(live, out=tmp_path / "b", stale_after_s=600, now=newest + 3600, plots=False).rows[0]
    assert (dead.status, dead.status_detail) == ("crashed", "no end marker, no write for 60 min (killed?)")
    (run_dir / "status.json").unlink()  # a run from before status markers
    old = build_report(live, out=tmp_path / "c", stale_after_s=600, now=time.time() + 3600, plots=False).rows[0]
    assert old.status == "unknown" and old.status_detail.startswith("no status.json")


# ----------------------------------------------------------------------------------------------- the command
def test_command_line_errors_and_help(runs, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["report", str(tmp_path / "nowhere")])
    assert info.value.code == 2
    assert capsys.readouterr().err.strip() == f"trm: error: report: {tmp_path / 'nowhere'} is not a directory"
    with pytest.raises(ConfigError, match=r"--baseline R9 is not among the runs under .*: R0_base/version_0, "):
        build_report(runs["dir"], baseline="R9", out=tmp_path / "x")
    with pytest.raises(SystemExit):
        build_cli(["--help"])
    assert "`trm report RUNS_DIR [--baseline RUN] [--out DIR]`" in " ".join(capsys.readouterr().out.split())
    with pytest.raises(SystemExit):
        main(["report", "--help"])
    assert "--baseline RUN" in capsys.readouterr().out
    # the default output folder, RUNS_DIR/report, is never scanned as a run
    copy = tmp_path / "copy"
    shutil.copytree(runs["dir"], copy)
    for _ in range(2):
        report = build_report(copy, plots=False)
        assert report.skipped == [] and len(report.rows) == 4 and report.baseline == "R0_base/version_0"
    assert report.markdown_path == copy / "report" / "report.md" and report.markdown_path.exists()
    # RUNS_DIR may be one run directory
    single = build_report(copy / "R2_crash" / "version_0", out=tmp_path / "single", plots=False)
    assert [(r.run, r.status, r.steps) for r in single.rows] == [("R2_crash/version_0", "crashed", 3)]
    assert single.skipped == []


# ------------------------------------------------------------------- the docs' scripts over the same run directories
def _script(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dashboard_rendering_and_timeline_table(runs, tmp_path, capsys):
    run = runs["dir"] / "R1_collapse" / "version_0"
    out = _script("render_dashboard").main([str(run), "--out", str(tmp_path / "dash.png")])
    assert out.read_bytes()[:8] == PNG_MAGIC
    assert "charts from" in capsys.readouterr().out
    _script("timeline_table").main([str(run), "--after", "0"])
    printed = capsys.readouterr().out
    assert "diagnostics/encoder_normalized_var" in printed
    assert "first alert representation_collapse @ 2" in printed  # from alerts.jsonl
