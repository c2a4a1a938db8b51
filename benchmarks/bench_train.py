"""Training-step speed: encoder-TRM against the same TRM with puzzle-id conditioning, same config, same run.

One step = ``EncoderTRM.act_step`` (carry reset, conditioning on every row, one ACT step) + the ACT loss + backward
+ the puzzle table's sign update (baseline) + the config's optimizer, exactly what ``trm fit`` runs per optimizer
step (:class:`common.TrainStep`). The two sides are timed in alternation (``--repeats`` rounds of ``--steps``
steps each, after ``--warmup``), so a busy machine slows both alike; figures are medians with their min and max.

    python benchmarks/bench_train.py --preset arc --batch 8          # CPU, the ARC config
    python benchmarks/bench_train.py --preset arc                     # GPU: bf16, 192 rows (TRM's per-GPU batch)
    python benchmarks/bench_train.py --preset arc --batch 8 --optimizers   # AdamW against AdamATan2 (puzzle ids)
    python benchmarks/bench_train.py --preset arc --attention-layouts       # the encoder's buckets against packed
    python benchmarks/bench_train.py --contrastive-views   # the contrastive loss's subsets: one encoding or three

Lines: ``bench train_step conditioning=<c> step_s=<median> step_s_min=... step_s_max=...`` for each, then
``bench train_overhead encoder_overhead=<r> encoder_overhead_min=... _max=...`` (encoder / puzzle ids). With
``--optimizers``: ``bench train_step optimizer=<o> ...`` and ``bench train_overhead adam_atan2_over_adamw=<r>``; with
``--attention-layouts``: ``bench train_step attention=<buckets|packed> ...`` and ``... packed_over_buckets=<r>``; with
``--contrastive-views`` (encoder-TRM with ``model.context_contrastive_weight=0.1``): ``bench train_step
contrastive=<shared|separate> ...`` and ``... shared_over_separate=<r>``.
"""

from __future__ import annotations

import torch

from common import (
    Side, TrainStep, base_parser, build, compare, cycle, peak_tflops, quiet, resolve_defaults, to_device,
)
from trm_lightning.flops import encoder_step_flops, trm_step_flops
from trm_lightning.optim import build_optimizer, named_param_groups


def prepare(args, conditioning: str, optimizer_name: str | None = None, *extra: str, contrastive: str = "shared") -> Side:
    lit, dm = build(args, conditioning, *extra)
    hp = lit.hparams
    lit.to(args.device).train()
    batches = [to_device(b, args.device) for _, b in zip(range(4), dm.train_dataloader())]
    modules = {"encoder": lit.model.conditioner, "trm": lit.model.trm}
    groups = named_param_groups(modules, {"encoder": hp.lr, "trm": hp.lr})
    optimizer = build_optimizer(optimizer_name or hp.optimizer, groups, hp.lr, (hp.beta1, hp.beta2), hp.weight_decay)
    feed, step = cycle(batches), TrainStep(lit, optimizer, args, contrastive)
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

    def describe(seconds: float, peak: float) -> dict:
        tflops = (trm_flops + enc_flops) / seconds / 1e12
        record = dict(
            rows=rows, optimizer=optimizer_name or hp.optimizer, step_s=seconds, samples_per_s=rows / seconds,
            tokens_per_s=tokens / seconds, peak_mem_gib=peak, valid_demos_per_row=valid_demos,
            encoder_tokens_per_demo=tokens_per_demo, gflop_per_step=(trm_flops + enc_flops) / 1e9, tflops=tflops,
        )
        peak_t = peak_tflops(args.device)
        if peak_t:
            record["mfu"] = tflops / peak_t
            record["trm_core_mfu"] = trm_flops / seconds / 1e12 / peak_t
        return record

    return Side(run=lambda: step(next(feed)), describe=describe)


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--optimizers", action="store_true",
                        help="compare AdamW and AdamATan2 (puzzle-id conditioning) instead of the two conditionings")
    parser.add_argument("--attention-layouts", action="store_true",
                        help="compare the encoder's attention layouts, buckets and packed (encoder-TRM steps)")
    parser.add_argument("--contrastive-views", action="store_true",
                        help="with the demo-subset contrastive loss: the subsets' contexts from the step's one encoding "
                             "of the demos (shared) against the conditioner run again per subset (separate)")
    args = resolve_defaults(parser.parse_args())
    quiet()
    if args.contrastive_views:
        sides = {name: prepare(args, "encoder", None, "--model.context_contrastive_weight=0.1", contrastive=name)
                 for name in ("shared", "separate")}
        compare(args, sides, "train_step", "step_s", "shared_over_separate", "shared", "separate", "contrastive")
        return
    if args.attention_layouts:
        sides = {name: prepare(args, "encoder", None, f"--model.conditioner.attention={name}")
                 for name in ("buckets", "packed")}
        compare(args, sides, "train_step", "step_s", "packed_over_buckets", "packed", "buckets", "attention")
        return
    if args.optimizers:
        sides = {name: prepare(args, "puzzle_emb", name) for name in ("adamw", "adam_atan2")}
        compare(args, sides, "train_step", "step_s", "adam_atan2_over_adamw", "adam_atan2", "adamw", "optimizer")
        return
    sides = {c: prepare(args, c) for c in ("puzzle_emb", "encoder")}
    compare(args, sides, "train_step", "step_s", "encoder_overhead", "encoder", "puzzle_emb")


if __name__ == "__main__":
    main()
