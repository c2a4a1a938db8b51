"""The ``trm`` command as a user meets it: help, configs, and one-line errors on bad input."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.helpers import ROOT, tiny_args
from trm_lightning.cli import build_cli
from trm_lightning.models.encoder import StandardDemoEncoder

TRM = str(Path(sys.executable).parent / "trm")
CONFIGS = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs").rglob("*.yaml"))
BASE = "configs/arc1/encoder_trm.yaml"


def _run(*args: str, cwd=ROOT, timeout=300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([TRM, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def test_help_and_module_entry_point():
    out = _run("--help")
    assert out.returncode == 0 and "fit" in out.stdout and "test" in out.stdout
    fit_help = _run("fit", "--help")
    assert "--model.conditioner" in fit_help.stdout and "--model.lr_warmup_steps" in fit_help.stdout
    assert "the first optimizer step already has" in " ".join(fit_help.stdout.split())  # docstrings become --help
    # every knob of the default conditioner (the seed's encoder knobs) is documented in `trm fit --help`
    knobs = list(inspect.signature(StandardDemoEncoder.__init__).parameters)[2:]
    assert len(knobs) == 11
    for knob in knobs:
        assert f"\n  {knob}\n" in fit_help.stdout, knob
    assert "how a demo pair's tokens become one vector" in fit_help.stdout
    knob_help = _run("fit", "--model.conditioner.help", "StandardDemoEncoder")
    assert knob_help.returncode == 0 and "--model.conditioner.pooling_method" in knob_help.stdout
    mod = subprocess.run([sys.executable, "-m", "trm_lightning", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert mod.returncode == 0 and "fit" in mod.stdout


@pytest.mark.parametrize("config", CONFIGS)
def test_every_config_parses(config, capsys):
    # experiment files are overlays on the base recipe, the diagnostics timeline's on the few-shot config (and
    # collapse.yaml on the timeline); the others stand alone
    stack = ["--config", BASE] if config.startswith("configs/experiments/") else []
    if config.startswith("configs/diagnostics/"):
        stack = ["--config", "configs/fewshot_cpu.yaml", "--config", "configs/diagnostics/timeline.yaml"]
    if config.startswith("configs/fewshot/"):  # the few-shot toolkit's overlays, on the benchmark's config
        stack = ["--config", str(ROOT / "configs" / "fewshot_cpu.yaml")]
    with pytest.raises(SystemExit) as exit_info:
        build_cli(["fit", *stack, "--config", str(ROOT / config), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "model:" in printed and "data:" in printed


def test_print_config_resolves_overrides():
    out = _run("fit", "--config", "configs/demo.yaml", "--model.lr", "3e-5", "--print_config")
    assert out.returncode == 0, out.stderr
    assert "lr: 3.0e-05" in out.stdout and "canvas_size: 10" in out.stdout


def _one_line_error(out: subprocess.CompletedProcess) -> str:
    assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
    assert "Traceback" not in out.stderr
    lines = [line for line in out.stderr.strip().splitlines() if line.startswith("trm: error:")]
    assert len(lines) == 1, out.stderr[-2000:]
    return lines[0]


def _grid(n, m, colour=1):
    return [[colour] * m for _ in range(n)]


def _write_task(directory: Path, name: str, train_input) -> None:
    task = {"train": [{"input": train_input, "output": _grid(2, 2)}], "test": [{"input": _grid(2, 2), "output": _grid(2, 2)}]}
    (directory / f"{name}.json").write_text(json.dumps(task))


def _fit_on(train_dir, eval_dir, tmp_path, *extra):
    return _run("fit", *tiny_args(train_dir, eval_dir, tmp_path, "--trainer.max_steps=1", *extra))


def test_malformed_json_names_the_file(tmp_path, synthetic_eval_dir):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.json").write_text('{"train": [')
    line = _one_line_error(_fit_on(bad, synthetic_eval_dir, tmp_path))
    assert "broken.json" in line


@pytest.mark.parametrize(
    "grid,needle",
    [(_grid(31, 31), "31"), (_grid(2, 2, colour=10), "10")],
    ids=["31x31", "colour10"],
)
def test_bad_grids_name_file_task_and_pair(tmp_path, synthetic_eval_dir, grid, needle):
    bad = tmp_path / "bad"
    bad.mkdir()
    _write_task(bad, "t_bad", grid)
    line = _one_line_error(_fit_on(bad, synthetic_eval_dir, tmp_path))
    assert "t_bad" in line and needle in line and "0" in line


def test_unknown_config_key_is_one_error(tmp_path):
    out = _run("fit", "--config", "configs/demo.yaml", "--model.encoder_depth", "4")
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert "encoder_depth" in out.stderr


def test_too_many_train_puzzles(tmp_path, synthetic_task_dir, synthetic_eval_dir):
    line = _one_line_error(_fit_on(synthetic_task_dir, synthetic_eval_dir, tmp_path, "--data.max_train_puzzles=500"))
    assert "500" in line and "12" in line


def test_overfit_gate_exit_status_and_verdict_line(tmp_path, synthetic_task_dir, synthetic_eval_dir):
    gate = "--trainer.callbacks+=callbacks.overfit_gate.OverfitGate"
    failed = _fit_on(synthetic_task_dir, synthetic_eval_dir, tmp_path, "--trainer.max_steps=2", gate,
                     "--trainer.callbacks.check_every_n_steps=1")
    assert failed.returncode == 1, failed.stderr[-2000:]
    last = failed.stderr.strip().splitlines()[-1]
    assert last.startswith("overfit: FAIL exact=") and last.endswith("first_step_95=none budget=2")
    passed = _fit_on(synthetic_task_dir, synthetic_eval_dir, tmp_path, "--trainer.max_steps=4", gate,
                     "--trainer.callbacks.exact_threshold=0.0", "--trainer.callbacks.cell_threshold=0.0",
                     "--trainer.callbacks.check_every_n_steps=2")
    assert passed.returncode == 0, passed.stderr[-2000:]
    assert passed.stdout.strip().splitlines()[-1].startswith("overfit: PASS exact=")
    assert "first_step_95=2 budget=4" in passed.stdout  # stops at the first passing check
