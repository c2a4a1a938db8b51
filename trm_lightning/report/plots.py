"""PNG figures overlaying the runs, one panel per logged tag, against the optimizer step; each run's alerts are
dotted vertical lines in its colour. Figures are built with ``matplotlib.figure.Figure`` (the Agg canvas, no
pyplot state), so this works on machines without a display.

Line ``gid``\\ s: a run's curve is ``run:<id>``, an alert marker ``alert:<id>`` (tests count curves by these).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from matplotlib.figure import Figure

from trm_lightning import metric_names as names
from trm_lightning.report.runs import Run, Series
from trm_lightning.report.summary import DIAGNOSTICS, measured_train_accuracy

TRAIN_ACCURACIES = (names.TRAIN_ACCURACY, names.TRAIN_EXACT_ACCURACY)  # counted on halted rows only
#: figure name -> the tags it shows (``lr/*``: every learning-rate tag any run logged, one panel each)
FIGURES: dict[str, tuple[str, ...]] = {
    "accuracy": (*TRAIN_ACCURACIES, names.VAL_ACCURACY, names.VAL_EXACT_ACCURACY),
    "q_halt_loss": (names.TRAIN_Q_HALT_LOSS, names.VAL_Q_HALT_LOSS),
    "diagnostics": DIAGNOSTICS,
    "drift": names.DRIFT_DIAGNOSTICS + names.KEEPING_UP_DIAGNOSTICS,  # is the TRM keeping up with the encoder?
    "reliance": names.RELIANCE_DIAGNOSTICS,  # does it read the demos?
    "lr": (names.LR_PREFIX + "*",),
}


def _tags(runs: Sequence[Run], patterns: Sequence[str]) -> list[str]:
    tags: list[str] = []
    for pattern in patterns:
        if pattern.endswith("/*"):
            prefix = pattern[:-1]
            tags += sorted({t for r in runs for t in r.scalars if t.startswith(prefix)} - set(tags))
        elif any(r.scalars.get(pattern) for r in runs):
            tags.append(pattern)
    return tags


def series(run: Run, tag: str) -> Series:
    """What a panel draws: train accuracies only where rows halted, everything else as logged."""
    if tag in TRAIN_ACCURACIES:
        return measured_train_accuracy(run, tag)
    return run.scalars.get(tag, [])


def overlay_figure(runs: Sequence[Run], tags: Sequence[str], title: str) -> Figure | None:
    """One panel per tag in ``tags`` that some run logged (None when none did), one line per run with data."""
    tags = _tags(runs, tags)
    if not tags:
        return None
    cols = 1 if len(tags) == 1 else 2
    nrows = math.ceil(len(tags) / cols)
    fig = Figure(figsize=(6.5 * cols, 3.2 * nrows + 0.8), layout="constrained")
    axes = fig.subplots(nrows, cols, squeeze=False).ravel()
    colours = [f"C{i % 10}" for i in range(len(runs))]
    for ax, tag in zip(axes, tags):
        for run, colour in zip(runs, colours):
            points = series(run, tag)
            if points:
                steps, values = zip(*points)
                ax.plot(steps, values, color=colour, label=run.id, gid=f"run:{run.id}",
                        marker="." if len(points) < 30 else None)
            for alert in run.alerts:
                ax.axvline(alert["step"], color=colour, linestyle=":", linewidth=1.2, gid=f"alert:{run.id}")
        ax.set_title(tag, fontsize=10)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    for ax in axes[len(tags):]:
        ax.set_visible(False)
    handles = {}  # one legend entry per run that drew a curve in any panel, in run order
    for ax in axes[:len(tags)]:
        for line in ax.get_lines():
            if str(line.get_gid()).startswith("run:"):
                handles.setdefault(line.get_label(), line)
    order = {run.id: i for i, run in enumerate(runs)}
    handles = [handles[k] for k in sorted(handles, key=order.__getitem__)]
    fig.suptitle(f"{title} (dotted: alerts)")
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 4), fontsize=8)
    return fig


def fewshot_figure(runs: Sequence[Run]) -> Figure | None:
    """The held-out-rule benchmark per run (None when no run has ``fewshot_eval.json``): exact accuracy in percent
    with its 95% Wilson interval, on held-out rules (own context and shuffled) and on new tasks of training rules.
    Bar ``gid``\\ s: ``fewshot:<part>:<id>``."""
    from trm_lightning.report.summary import fewshot_scores
    from trm_lightning.stats import wilson_interval

    scored = [(run, fewshot_scores(run)) for run in runs]
    scored = [(run, scores) for run, scores in scored if scores]
    if not scored:
        return None
    parts = (("heldout", ("heldout", "puzzle_emb_baseline"), "held-out rules"),
             ("shuffled_context", ("shuffled_context",), "held-out, shuffled context"),
             ("train", ("train", "baseline_new"), "new tasks of training rules"))
    fig = Figure(figsize=(9.0, 1.2 + 0.42 * len(scored) * 1.6), layout="constrained")
    ax = fig.subplots()
    height = 0.8 / len(parts)
    for i, (part, keys, label) in enumerate(parts):
        ys, values, errors, owners = [], [], [[], []], []
        for j, (run, scores) in enumerate(scored):
            entry = next((scores[k] for k in keys if k in scores), None)
            if entry is None or entry[1] == 0:
                continue
            k, n, _ = entry
            lo, hi = wilson_interval(k, n)
            value = 100.0 * k / n
            ys.append(j + (i - 1) * height)
            owners.append(run.id)
            values.append(value)
            errors[0].append(value - 100 * lo)
            errors[1].append(100 * hi - value)
        if ys:
            bars = ax.barh(ys, values, height=height, xerr=errors, color=f"C{i}", label=label, capsize=2)
            for bar, owner in zip(bars, owners):
                bar.set_gid(f"fewshot:{part}:{owner}")
    ax.set_yticks(range(len(scored)), [run.id for run, _ in scored], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("exact answers, % (95% Wilson interval)")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.suptitle("few-shot benchmark: held-out rules")
    return fig


def write_plots(runs: Sequence[Run], out_dir: Path) -> list[Path]:
    """Write ``<out_dir>/<figure>.png`` for each of :data:`FIGURES` with data, and ``fewshot.png`` when runs hold
    the held-out-rule benchmark's scores; returns the paths written."""
    written = []
    fig = fewshot_figure(runs)
    if fig is not None:
        path = out_dir / "fewshot.png"
        fig.savefig(path, dpi=90)
        written.append(path)
    for name, tags in FIGURES.items():
        fig = overlay_figure(runs, tags, name)
        if fig is None:
            continue
        path = out_dir / f"{name}.png"
        fig.savefig(path, dpi=90)
        written.append(path)
    return written
