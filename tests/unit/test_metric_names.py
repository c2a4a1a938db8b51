"""The shared names have one home each: the logged metric names (``trm_lightning/metric_names.py``) and the run
directory's file names (``trm_lightning/run_files.py``). The names are public, so they are also listed here."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from trm_lightning import metric_names as names
from trm_lightning import run_files

ROOT = Path(__file__).resolve().parents[2]
SOURCES = ("trm_lightning", "callbacks", "benchmarks")

# Literals still waiting for an edit in a file this change did not own (the exact lines are in the change's note):
# (file, name) -> why it is still there. Remove an entry once its file imports the name.
PENDING: dict[tuple[str, str], str] = {}  # (file, name) pairs still to move, each with the edit it needs


def _string_literals(path: Path) -> set[str]:
    """Every string constant of a Python file, f-string pieces included, docstrings and bare strings excluded."""
    tree = ast.parse(path.read_text())
    bare = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Expr)}
    return {node.value for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in bare}


def _shared_names() -> dict[str, Path]:
    """Each name (and name prefix) another file might spell out -> its home module."""
    out: dict[str, Path] = {}
    for module in (names, run_files):
        home = Path(module.__file__).relative_to(ROOT)
        for key, value in vars(module).items():
            if key.isupper() and isinstance(value, str) and ("/" in value or "." in value):
                out[value] = home
    metric_home = Path(names.__file__).relative_to(ROOT)
    for split in (names.TRAIN, names.VAL, names.VAL_SEEN, names.TEST):
        out[names.split_metric(split, "")] = metric_home  # "train/", as in f"train/{key}"
    out[run_files.CHECKPOINT_DIR] = Path(run_files.__file__).relative_to(ROOT)
    out["alert-step"] = Path(run_files.__file__).relative_to(ROOT)
    return out


def test_no_shared_name_is_spelled_out_outside_its_home():
    shared = _shared_names()
    found = []
    for root in SOURCES:
        for path in sorted((ROOT / root).rglob("*.py")):
            rel = path.relative_to(ROOT)
            for literal in _string_literals(path):
                for name, home in shared.items():
                    spelled = literal == name or (name.endswith(("/", "@", "-step")) and literal.startswith(name))
                    if spelled and rel != home and (rel.as_posix(), name) not in PENDING:
                        found.append(f"{rel}: {literal!r} (import it from {home})")
    assert found == []


def test_the_public_names():
    assert names.ACT_METRIC_KEYS == ("accuracy", "exact_accuracy", "q_halt_accuracy", "steps", "lm_loss",
                                     "q_halt_loss", "count")
    assert (names.TRAIN_ACCURACY, names.TRAIN_Q_HALT_LOSS, names.TRAIN_COUNT, names.VAL_EXACT_ACCURACY) == (
        "train/accuracy", "train/q_halt_loss", "train/count", "val/exact_accuracy")
    assert names.VAL_VIEWS == ("val", "val_seen") and names.pass_at(2) == "ARC/pass@2"
    assert names.is_train_metric("train/accuracy") and not names.is_train_metric("val/accuracy")
    assert names.SCALAR_DIAGNOSTICS == tuple(f"diagnostics/{n}" for n in (
        "encoder_cross_sample_var", "encoder_output_mean", "encoder_output_std", "encoder_normalized_var",
        "encoder_l2n_std", "encoder_cross_task_cosine", "encoder_effective_rank", "probe_same_task_cosine",
        "probe_diff_task_cosine", "probe_retrieval_acc", "probe_drift_cosine", "probe_drift_rel_l2",
        "probe_window_drift_cosine", "probe_context_loss", "probe_stale_context_loss", "probe_stale_context_gap"))
    assert (run_files.CONFIG_FILE, run_files.EXPERIMENT_FILE, run_files.STATUS_FILE, run_files.ALERTS_FILE,
            run_files.SUBMISSION_FILE, run_files.EVAL_DETAILS_FILE) == (
        "config.yaml", "experiment.json", "status.json", "alerts.jsonl", "submission.json", "eval_details.json")
    assert run_files.LAST_CHECKPOINT == "last.ckpt" and run_files.alert_checkpoint_name(7) == "alert-step7.ckpt"
    assert run_files.checkpoint_dir("runs/a/version_0") == "runs/a/version_0/checkpoints"


def test_every_documented_diagnostic_is_a_name_and_every_name_is_documented():
    doc = (ROOT / "docs" / "diagnostics.md").read_text()
    documented = set(re.findall(r"`(diagnostics/[a-z0-9_]+)`", doc))
    assert documented == {*names.SCALAR_DIAGNOSTICS, names.ENCODER_CONTEXT_HISTOGRAM}


def test_last_checkpoint_and_the_lightning_defaults_agree():
    """LastCheckpoint pins ``last.ckpt``; ``checkpoints/`` is ModelCheckpoint's own run-directory folder."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from callbacks.last_checkpoint import LastCheckpoint

    assert LastCheckpoint.CHECKPOINT_NAME_LAST + LastCheckpoint.FILE_EXTENSION == run_files.LAST_CHECKPOINT
    assert ModelCheckpoint.CHECKPOINT_NAME_LAST + ModelCheckpoint.FILE_EXTENSION == run_files.LAST_CHECKPOINT


def test_the_scan_sees_code_strings_and_skips_docstrings(tmp_path):
    source = tmp_path / "example.py"
    source.write_text('"""Logs ``train/accuracy``."""\n\ndef f(k):\n    """``status.json``"""\n'
                      '    return {f"train/{k}": 1, "name": "alerts.jsonl"}\n')
    assert _string_literals(source) == {"train/", "name", "alerts.jsonl"}
