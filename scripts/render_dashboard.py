"""Draw a run's dashboard (the Custom Scalars page ``callbacks.Dashboard`` writes) from its event files, as a PNG.

    python scripts/render_dashboard.py runs/demo/version_0 --out docs/img/dashboard.png

Each chart of :func:`callbacks.dashboard.layout` is one panel with the scalars its regular expressions match, the
alert thresholds (``thresholds/<metric>``) dashed, and each alert of ``alerts.jsonl`` as a dotted vertical line. It
is the same page TensorBoard shows, drawn without a browser (for the README and for machines without one).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from matplotlib.figure import Figure  # noqa: E402

from callbacks.dashboard import THRESHOLD_PREFIX, layout  # noqa: E402
from trm_lightning.report.runs import read_alerts, read_scalars  # noqa: E402


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="a run directory (with its TensorBoard event file)")
    p.add_argument("--out", default=None, help="the PNG (default: <run>/dashboard.png)")
    p.add_argument("--categories", nargs="*", default=None, help="only these categories (default: all)")
    args = p.parse_args(argv)
    run = Path(args.run)
    scalars, _ = read_scalars(run)
    alerts = read_alerts(run)
    charts = []
    for category, entries in layout().items():
        if args.categories and not any(c in category for c in args.categories):
            continue
        for title, (_, patterns) in entries.items():
            tags = [t for t in sorted(scalars) if any(re.search(pat, t) for pat in patterns)]
            if any(not t.startswith(THRESHOLD_PREFIX) for t in tags):
                charts.append((category, title, tags))
    cols = 3
    rows = -(-len(charts) // cols)
    fig = Figure(figsize=(5.2 * cols, 2.9 * rows + 0.6), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, (category, title, tags) in zip(axes, charts):
        for i, tag in enumerate(t for t in tags if not t.startswith(THRESHOLD_PREFIX)):
            steps, values = zip(*scalars[tag])
            ax.plot(steps, values, color=f"C{i}", label=tag, linewidth=1.2,
                    marker="." if len(steps) < 30 else None)
        for tag in (t for t in tags if t.startswith(THRESHOLD_PREFIX)):
            steps, values = zip(*scalars[tag])
            ax.plot(steps, values, color="red", linestyle="--", linewidth=1.0,
                    label="threshold: " + tag[len(THRESHOLD_PREFIX):])
        for alert in alerts:
            ax.axvline(alert["step"], color="grey", linestyle=":", linewidth=1.0)
        ax.set_title(f"{category} / {title}", fontsize=8.5)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6.5, loc="best")
    for ax in axes[len(charts):]:
        ax.set_visible(False)
    rules = sorted({a["rule"] for a in alerts})
    fig.suptitle(f"{run}: the Custom Scalars dashboard (red dashed: alert thresholds; dotted: alerts"
                 f"{' ' + ', '.join(rules) if rules else ', none fired'})", fontsize=10)
    out = Path(args.out) if args.out else run / "dashboard.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    print(f"dashboard: {len(charts)} charts from {run} -> {out}")
    return out


if __name__ == "__main__":
    main()
