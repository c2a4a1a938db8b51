"""Where a training step's time goes: the top kernels of one encoder-TRM step, and which attention kernel runs.

    python benchmarks/profile_step.py --preset arc --batch 64 --out runs/bench/profile.txt

Line: ``bench profile attention_kernels=<names> gemm_share=<x> attention_share=<y> other_share=<z>``.
"""

from __future__ import annotations

import torch
from torch.profiler import ProfilerActivity, profile

from common import TrainStep, base_parser, build, cycle, emit, quiet, resolve_defaults, sync, to_device


def classify(name: str) -> str:
    n = name.lower()
    if any(k in n for k in ("flash", "fmha", "efficient_attention", "attention", "sdpa", "cutlass_f")):
        return "attention"
    if any(k in n for k in ("gemm", "sm90_xmma", "cublas", "matmul", "mm_", "nvjet", "cutlass")):
        return "gemm"
    return "other"


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="write the kernel table here")
    args = resolve_defaults(parser.parse_args())
    quiet()
    lit, dm = build(args, "encoder")
    lit.to(args.device).train()
    batches = [to_device(b, args.device) for _, b in zip(range(2), dm.train_dataloader())]
    feed = cycle(batches)
    optimizer = torch.optim.AdamW([p for p in lit.parameters() if p.requires_grad], lr=1e-4)
    train_step = TrainStep(lit, optimizer, args)

    def step() -> None:
        train_step(next(feed))

    for _ in range(max(1, args.warmup)):
        step()
    sync(args.device)
    gpu = args.device.startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
    with profile(activities=activities) as prof:
        step()
        sync(args.device)
    key = "self_device_time_total" if gpu else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, key, 0) > 0]
    if gpu:  # kernels only: device-side events without CPU children
        events = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA] or events
    total = sum(getattr(e, key) for e in events) or 1.0
    shares = {"gemm": 0.0, "attention": 0.0, "other": 0.0}
    attention = set()
    for e in events:
        kind = classify(e.key)
        shares[kind] += getattr(e, key) / total
        if kind == "attention":
            attention.add(e.key.split("(")[0][:60])
    table = prof.key_averages().table(sort_by=key, row_limit=25, max_name_column_width=70)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table)
    print(table)
    emit("profile", args, rows=args.batch, attention_kernels="|".join(sorted(attention)) or "none",
         gemm_share=shares["gemm"], attention_share=shares["attention"], other_share=shares["other"])


if __name__ == "__main__":
    main()
