"""The training step of two commits, timed in alternation on the same machine (is a change free?).

    python benchmarks/bench_commits.py 56c59ae --rounds 5 -- --preset arc --batch 8 --steps 1 --warmup 1

Checks ``BEFORE`` out into a temporary git worktree (sharing this checkout's ``.venv``), then runs this
checkout's and that checkout's ``benchmarks/bench_train.py`` with the same arguments, one after the other, for
``--rounds`` rounds, and prints per conditioning the median step time of each with its min and max and the
median of the per-round ratios:

    bench commits conditioning=<c> before=<rev> before_s=<median> after_s=<median> after_over_before=<r> ...

``--after-args`` are added to this checkout's runs only (e.g. ``--forward-dtype float32`` to time today's fp32 path
against a commit that had no such option).
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINE = re.compile(r"^bench train_step conditioning=(\S+) .*?step_s=([0-9.e+-]+)")


def run_bench(checkout: Path, args: list[str]) -> dict[str, float]:
    cmd = [str(ROOT / ".venv" / "bin" / "python"), "benchmarks/bench_train.py", "--json", "", *args]
    out = subprocess.run(cmd, cwd=checkout, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"bench commits: {' '.join(cmd)} failed in {checkout}:\n{out.stderr[-2000:]}")
    found = {m.group(1): float(m.group(2)) for line in out.stdout.splitlines() if (m := LINE.match(line))}
    if not found:
        sys.exit(f"bench commits: no train_step line from {checkout}:\n{out.stdout[-2000:]}")
    return found


def main(argv: list[str] | None = None) -> list[str]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("before", help="the commit to compare with (any git revision)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--after-args", default="", help="extra bench_train.py arguments for this checkout only")
    argv = list(sys.argv[1:] if argv is None else argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    args = p.parse_args(argv[:cut])
    args.bench_args = argv[cut + 1:]  # bench_train.py arguments for both, after --
    tmp = Path(tempfile.mkdtemp(prefix="bench_commits_"))
    worktree = tmp / "before"
    subprocess.run(["git", "worktree", "add", "--detach", str(worktree), args.before], cwd=ROOT, check=True,
                   capture_output=True)
    lines = []
    try:
        times: dict[str, dict[str, list[float]]] = {}
        for r in range(args.rounds):
            for side, checkout, extra in (("before", worktree, []), ("after", ROOT, args.after_args.split())):
                for cond, seconds in run_bench(checkout, [*args.bench_args, *extra]).items():
                    times.setdefault(cond, {"before": [], "after": []})[side].append(seconds)
            print(f"bench commits: round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
        for cond, sides in times.items():
            b, a = sides["before"], sides["after"]
            ratios = [x / y for x, y in zip(a, b)]
            line = (f"bench commits conditioning={cond} before={args.before} rounds={args.rounds} "
                    f"before_s={statistics.median(b):.3f} before_min={min(b):.3f} before_max={max(b):.3f} "
                    f"after_s={statistics.median(a):.3f} after_min={min(a):.3f} after_max={max(a):.3f} "
                    f"after_over_before={statistics.median(ratios):.3f} ratio_min={min(ratios):.3f} "
                    f"ratio_max={max(ratios):.3f} after_args='{args.after_args}'")
            print(line, flush=True)
            lines.append(line)
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(worktree)], cwd=ROOT, capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)
    return lines


if __name__ == "__main__":
    main()
