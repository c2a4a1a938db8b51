"""Training-step speed: encoder-TRM against the same TRM with puzzle-id conditioning, same config, same run.

One step = ``EncoderTRM.act_step`` (carry reset, conditioning on every row, one ACT step) + the ACT loss + backward
+ the puzzle table's sign update (baseline) + AdamW, exactly what ``trm fit`` runs per optimizer step
(:class:`common.TrainStep`).

    python benchmarks/bench_train.py --preset arc --batch 8          # CPU, the ARC config
    python benchmarks/bench_train.py --preset arc                     # GPU: bf16, 192 rows (TRM's per-GPU batch)

Lines: ``bench train_step conditioning=<c> ...`` for each, then ``bench train_overhead encoder_overhead=<r>``
(step time with the encoder / step time with puzzle ids).
"""

from __future__ import annotations

import torch

from common import (
    TrainStep, base_parser, build, compare_conditionings, cycle, peak_tflops, quiet, resolve_defaults, timed, to_device,
)
from trm_lightning.flops import encoder_step_flops, trm_step_flops
from trm_lightning.optim import named_param_groups


def measure(args, conditioning: str) -> dict:
    lit, dm = build(args, conditioning)
    hp = lit.hparams
    lit.to(args.device).train()
    loader = dm.train_dataloader()
    batches = [to_device(b, args.device) for _, b in zip(range(4), loader)]
    modules = {"encoder": lit.model.conditioner, "trm": lit.model.trm}
    groups = named_param_groups(modules, {"encoder": hp.lr, "trm": hp.lr})
    optimizer = torch.optim.AdamW(groups, lr=hp.lr, betas=(hp.beta1, hp.beta2), weight_decay=hp.weight_decay)
    feed, step = cycle(batches), TrainStep(lit, optimizer, args)
    seconds, peak = timed(lambda: step(next(feed)), args.steps, args.warmup, args.device)
    rows = args.batch
    tokens = rows * (hp.puzzle_emb_len + hp.canvas_size**2)
    valid_demos = torch.cat([b["demo_mask"].sum(1).float() for b in batches]).mean().item()
    real_cells = sum(((b["demo_inputs"] != 0).sum() + (b["demo_outputs"] != 0).sum()).item() for b in batches)
    tokens_per_demo = real_cells / sum(b["demo_mask"].sum().item() for b in batches)
    encoder = hp.conditioner["init_args"] if conditioning == "encoder" else None
    if encoder is not None and encoder["crop_buckets"] <= 0:
        tokens_per_demo = 2 * hp.canvas_size**2
    trm_flops = rows * trm_step_flops(
        hp.canvas_size, hp.hidden_size, hp.expansion, hp.L_layers, hp.H_cycles, hp.L_cycles, hp.puzzle_emb_len
    )
    enc_flops = 0.0
    if encoder is not None:
        enc_flops = rows * encoder_step_flops(valid_demos, hp.canvas_size, hp.hidden_size, hp.expansion,
                                              encoder["num_layers"], tokens_per_demo)
    tflops = (trm_flops + enc_flops) / seconds / 1e12
    record = dict(
        conditioning=conditioning, rows=rows, step_s=seconds, samples_per_s=rows / seconds,
        tokens_per_s=tokens / seconds, peak_mem_gib=peak, valid_demos_per_row=valid_demos,
        encoder_tokens_per_demo=tokens_per_demo,
        gflop_per_step=(trm_flops + enc_flops) / 1e9, tflops=tflops,
    )
    peak_t = peak_tflops(args.device)
    if peak_t:
        record["mfu"] = tflops / peak_t
        record["trm_core_mfu"] = trm_flops / seconds / 1e12 / peak_t
    del lit, step, optimizer, batches
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return record


def main() -> None:
    args = resolve_defaults(base_parser(__doc__.splitlines()[0]).parse_args())
    quiet()
    compare_conditionings(args, measure, "train_step", "step_s")


if __name__ == "__main__":
    main()
