"""Data loading speed: training episodes/s (augmentation, canvas, collation) through the real DataLoader.

    python benchmarks/bench_data.py --preset arc --batch 192 --workers 4

Line: ``bench data episodes_per_s=<x> ...``. Compare with ``samples_per_s`` of bench_train: loading must stay
well ahead of training with the configured workers.
"""

from __future__ import annotations

import time

from common import base_parser, build, emit, quiet, resolve_defaults


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    args = resolve_defaults(parser.parse_args())
    quiet()
    batches = args.steps + args.warmup
    _, dm = build(args, "encoder", f"--data.num_workers={args.workers}",
                  f"--data.episodes_per_epoch={args.batch * batches}")
    loader = iter(dm.train_dataloader())
    for _ in range(args.warmup):  # worker start-up is not throughput
        next(loader)
    start = time.perf_counter()
    n = 0
    for batch in loader:
        n += batch["inputs"].shape[0]
    seconds = time.perf_counter() - start
    emit("data", args, workers=args.workers, episodes=n, episodes_per_s=n / seconds,
         canvas=dm.canvas_size, augmentations=dm.num_train_augmentations)


if __name__ == "__main__":
    main()
