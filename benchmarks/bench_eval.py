"""Evaluation speed: queries/s of a full rollout (``halt_max_steps`` ACT steps, the demo context computed once
per query), encoder-TRM against puzzle-id conditioning, same config, same run.

    python benchmarks/bench_eval.py --preset arc --batch 8

Lines: ``bench eval_rollout conditioning=<c> ...`` for each, then ``bench eval_overhead encoder_overhead=<r>``.
"""

from __future__ import annotations

import torch

from common import Side, autocast, base_parser, build, compare, cycle, peak_tflops, quiet, resolve_defaults, to_device
from trm_lightning.flops import trm_rollout_flops


def prepare(args, conditioning: str) -> Side:
    lit, dm = build(args, conditioning, f"--data.eval_batch_size={args.batch}")
    hp = lit.hparams
    model = lit.model.to(args.device).eval()
    dm.setup()
    batches = [to_device(b, args.device) for _, b in zip(range(2), dm.val_dataloader()[0])]
    batches = [b for b in batches if b["inputs"].shape[0] == args.batch] or batches
    feed = cycle(batches)

    @torch.no_grad()
    def rollout() -> None:
        with autocast(args):
            model.rollout(next(feed))

    rows = batches[0]["inputs"].shape[0]
    flops = rows * trm_rollout_flops(hp.canvas_size, hp.halt_max_steps, hp.hidden_size, hp.expansion,
                                     hp.L_layers, hp.H_cycles, hp.L_cycles, hp.puzzle_emb_len)

    def describe(seconds: float, peak: float) -> dict:
        record = dict(rows=rows, rollout_s=seconds, queries_per_s=rows / seconds, peak_mem_gib=peak,
                      halt_max_steps=hp.halt_max_steps)
        peak_t = peak_tflops(args.device)
        if peak_t:
            record["trm_core_mfu"] = flops / seconds / 1e12 / peak_t
        return record

    return Side(run=rollout, describe=describe)


def main() -> None:
    args = resolve_defaults(base_parser(__doc__.splitlines()[0]).parse_args())
    quiet()
    sides = {c: prepare(args, c) for c in ("puzzle_emb", "encoder")}
    compare(args, sides, "eval_rollout", "rollout_s", "encoder_overhead", "encoder", "puzzle_emb")


if __name__ == "__main__":
    main()
