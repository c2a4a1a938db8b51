"""The numbers of docs/diagnostics.md's calibration and collapse timeline, read from run directories.

    python scripts/timeline_table.py RUN_DIR [RUN_DIR ...] [--after 500]

For each run: the range (min / median / max, from step ``--after`` on) of the diagnostics the alert rules read,
the training accuracy's peak and the first step it fell below half of it (after reaching ``--min-peak``), and the
first step of each alert rule that fired, with how many steps it came before that fall: as the run recorded them
(``alerts.jsonl``) and replayed with today's default rules over the logged scalars ("replayed alert").
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from callbacks.alert_rules import default_rules  # noqa: E402
from trm_lightning import metric_names as names  # noqa: E402
from trm_lightning.report.runs import read_alerts, read_scalars  # noqa: E402
from trm_lightning.report.summary import measured_train_accuracy  # noqa: E402

RANGES = (
    names.PROBE_DRIFT_COSINE, names.PROBE_WINDOW_DRIFT_COSINE, names.PROBE_RETRIEVAL_ACC,
    names.ENCODER_NORMALIZED_VAR, names.ENCODER_CROSS_TASK_COSINE, names.ENCODER_OUTPUT_MEAN,
    names.ENCODER_OUTPUT_STD, names.PROBE_STALE_CONTEXT_GAP, names.PROBE_CONTEXT_LOSS,
    names.TRAIN_RELIANCE_DROP_SHUFFLED_CELL, names.VAL_RELIANCE_DROP_SHUFFLED_CELL, "grad/encoder_norm",
    "grad/total_norm", names.TRAIN_ACCURACY,
)


class _Run:
    def __init__(self, scalars):
        self.scalars = scalars


def mean_fraction(scalars) -> list[tuple[int, float]]:
    """``|encoder_output_mean| / sqrt(mean^2 + std^2)`` (what OutputMeanShift reads) per step."""
    std = dict(scalars.get(names.ENCODER_OUTPUT_STD, []))
    out = []
    for step, mean in scalars.get(names.ENCODER_OUTPUT_MEAN, []):
        if step in std:
            rms = (mean * mean + std[step] ** 2) ** 0.5
            out.append((step, abs(mean) / rms if rms else 0.0))
    return out


def fall_step(accuracy: list[tuple[int, float]], min_peak: float, fraction: float) -> tuple[float, int, int | None]:
    """(peak, its step, the first step after it with accuracy below ``fraction`` x the running peak)."""
    peak, peak_step = float("-inf"), 0
    for step, value in accuracy:
        if value > peak:
            peak, peak_step = value, step
        elif peak >= min_peak and value < fraction * peak:
            return peak, peak_step, step
    return peak, peak_step, None


def replay(scalars, every: int, warmup: int) -> dict[str, int]:
    """The first step each of today's default rules (``callbacks.alert_rules.default_rules``) fires at, replayed
    over the logged scalars of every ``every``-th step as CollapseAlert checks them (rules not checked during
    warmup skip the steps before ``warmup``): the alerts the shipped defaults give on an old run."""
    by_step: dict[int, dict[str, float]] = {}
    for tag, points in scalars.items():
        for step, value in points:
            if step % every == 0:
                by_step.setdefault(step, {})[tag] = value
    first: dict[str, int] = {}
    rules = default_rules()
    for step in sorted(by_step):
        for rule in rules:
            if rule.checked_during_warmup or step >= warmup:
                alert = rule.update(by_step[step], step)
                if alert is not None:
                    first.setdefault(alert.rule, step)
    return first


def _print_first(label: str, first: dict[str, int], fell: int | None) -> None:
    for rule, step in sorted(first.items(), key=lambda kv: kv[1]):
        lead = "" if fell is None else f" ({fell - step:+d} steps before the fall)"
        print(f"first {label} {rule} @ {step}{lead}")
    if not first:
        print(f"no {label}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+")
    p.add_argument("--after", type=int, default=500, help="ranges from this step on (after the early transient)")
    p.add_argument("--min-peak", type=float, default=0.2)
    p.add_argument("--fraction", type=float, default=0.5, help="accuracy fell: below this fraction of its peak")
    p.add_argument("--check-every", type=int, default=50, help="replay: CollapseAlert's check_every_n_steps")
    p.add_argument("--warmup", type=int, default=50, help="replay: CollapseAlert's warmup_steps")
    args = p.parse_args(argv)
    for run in args.runs:
        run_dir = Path(run)
        scalars, _ = read_scalars(run_dir)
        acc = measured_train_accuracy(_Run(scalars), names.TRAIN_ACCURACY)
        last = max((s for series in scalars.values() for s, _ in series), default=0)
        print(f"## {run_dir} ({last} steps)")
        print(f"{'metric':<45} {'min':>9} {'median':>9} {'max':>9} {'n':>4}  (from step {args.after})")
        series = {tag: scalars.get(tag, []) for tag in RANGES}
        series[names.TRAIN_ACCURACY] = acc
        series["output_mean_fraction"] = mean_fraction(scalars)
        for tag, points in series.items():
            values = [v for s, v in points if s >= args.after]
            if values:
                print(f"{tag:<45} {min(values):>9.4f} {statistics.median(values):>9.4f} {max(values):>9.4f} "
                      f"{len(values):>4}")
        peak, peak_step, fell = fall_step(acc, args.min_peak, args.fraction)
        print(f"train/accuracy peak {peak:.3f} @ {peak_step}; below {args.fraction:g} x peak: "
              f"{'never' if fell is None else f'step {fell}'}")
        first: dict[str, int] = {}
        for alert in read_alerts(run_dir):
            first.setdefault(alert["rule"], int(alert["step"]))
        _print_first("alert", first, fell)  # what the run recorded (alerts.jsonl)
        _print_first("replayed alert", replay(scalars, args.check_every, args.warmup), fell)  # today's defaults
        print()


if __name__ == "__main__":
    main()
