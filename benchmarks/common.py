"""Shared pieces of the benchmarks: build model and data from a real config, time on the right device, emit.

Each benchmark builds the model and the datamodule through the ``trm`` CLI parser (``--config`` files plus
overrides, exactly what ``trm fit`` would build), moves the model to the device and drives the pure model
(``EncoderTRM.act_step`` + the ACT loss + backward + the optimizer, :class:`TrainStep`), without a Trainer, so the
number is the step itself.
Batches are real ARC episodes (real demo counts per row), drawn once and reused.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python benchmarks/x.py` from anywhere
    sys.path.insert(0, str(ROOT))

from trm_lightning.cli import build_cli  # noqa: E402
from trm_lightning.flops import bf16_peak_tflops  # noqa: E402
from trm_lightning.losses import act_loss  # noqa: E402
from trm_lightning.models.conditioning import PuzzleEmbedding  # noqa: E402
from trm_lightning.regularisers import contrastive_views, demo_subset_contrastive_loss, info_nce  # noqa: E402

# the two conditionings every benchmark compares, by the label its lines print
CONDITIONERS = {"puzzle_emb": "PuzzleEmbedding", "encoder": "StandardDemoEncoder"}

PRESETS = {
    # the CPU demo config and the ARC config (hidden 512, canvas 30) of the issue
    "demo": ["--config", str(ROOT / "configs" / "demo.yaml")],
    "arc": ["--config", str(ROOT / "configs" / "arc1" / "encoder_trm.yaml")],
}


def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--preset", choices=sorted(PRESETS), default="demo", help="config to measure")
    p.add_argument("--batch", type=int, default=None, help="rows per step (default: 8 on CPU, 192 on a GPU)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default: 3 on CPU, 20 on a GPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 1 CPU, 5 GPU)")
    p.add_argument("--repeats", type=int, default=5,
                   help="timed repeats of --steps calls each; figures are their median, with min and max")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", choices=["32", "bf16"], default=None,
                   help="autocast dtype (default: bf16 on a GPU, 32 on CPU where bf16 is slower)")
    p.add_argument("--forward-dtype", choices=["float32", "bfloat16"], default=None,
                   help="model.forward_dtype (default: the config's; the ARC preset's is bfloat16, TRM's)")
    p.add_argument("--compile", action="store_true", help="model.compile=true: torch.compile the TRM core's net and the demo encoder")
    p.add_argument("--crop-buckets", type=int, default=None,
                   help="model.conditioner.crop_buckets (default: the config's; 0 encodes the whole canvas)")
    p.add_argument("--json", default=str(ROOT / "runs" / "bench" / "results.jsonl"),
                   help="append one JSON record per line here")
    p.add_argument("overrides", nargs="*", help="extra trm options, e.g. --model.hidden_size=256 (after --)")
    return p


def resolve_defaults(args: argparse.Namespace) -> argparse.Namespace:
    gpu = args.device.startswith("cuda")
    args.batch = args.batch or (192 if gpu else 8)
    args.steps = args.steps or (20 if gpu else 3)
    args.warmup = args.warmup if args.warmup is not None else (5 if gpu else 1)
    args.precision = args.precision or ("bf16" if gpu else "32")
    return args


def build(args: argparse.Namespace, conditioning: str, *extra: str):
    """(LightningModule, datamodule) for the preset + overrides + ``extra`` with the conditioner of ``conditioning``
    (a key of :data:`CONDITIONERS`), the batch size set and no logger."""
    cli = build_cli(
        [
            *PRESETS[args.preset],
            "--trainer.logger=false",
            "--trainer.callbacks=[]",
            "--trainer.accelerator=cpu",  # the benchmark moves the model itself
            f"--data.global_batch_size={args.batch}",
            f"--data.episodes_per_epoch={max(args.batch, 1) * 4}",
            "--data.num_workers=0",
            f"--model.compile={args.compile}",
            *([] if args.forward_dtype is None else [f"--model.forward_dtype={args.forward_dtype}"]),
            *args.overrides,
            *extra,
            # after the overrides: choosing another conditioner class drops the encoder knobs they may set
            f"--model.conditioner={CONDITIONERS[conditioning]}",
            *([] if args.crop_buckets is None or conditioning != "encoder"
              else [f"--model.conditioner.crop_buckets={args.crop_buckets}"]),
        ],
        run=False,
    )
    return cli.model, cli.datamodule


class TrainStep:
    """One optimizer step as ``trm fit`` runs it, on the pure model: the ACT step on the carried rows, the ACT loss
    (plus the demo-subset contrastive loss when ``model.context_contrastive_weight > 0``), backward, the puzzle table's
    sign step (puzzle-id conditioning), AdamW. Call it with a batch.

    ``contrastive``: how the two demo subsets are encoded, ``shared`` (with the step's context from one encoding of
    the demos, as ``trm fit`` does) or ``separate`` (the conditioner run again on each subset, the reference)."""

    def __init__(self, lit, optimizer: torch.optim.Optimizer, args: argparse.Namespace,
                 contrastive: str = "shared") -> None:
        self.model, self.hp, self.optimizer, self.args = lit.model, lit.hparams, optimizer, args
        self.carry = None
        self.contrastive = contrastive

    def __call__(self, batch: dict[str, torch.Tensor]) -> None:
        if self.carry is None:
            self.carry = self.model.initial_carry(batch)
        weight, temperature = self.hp.context_contrastive_weight, self.hp.context_contrastive_temperature
        shared = weight > 0 and self.contrastive == "shared"
        with autocast(self.args):
            self.carry, out = self.model.act_step(self.carry, batch, contrastive_views if shared else None)
            data = self.carry.data
            loss = act_loss(out.logits, data["labels"], out.q_halt, self.hp.q_halt_loss_weight, self.hp.loss_type).loss
            if shared:
                loss = loss + weight * info_nce(*out.views, data["task_index"], temperature)
            elif weight > 0:
                loss = loss + weight * demo_subset_contrastive_loss(self.model.encode, data, temperature)
        loss.backward()
        if isinstance(self.model.conditioner, PuzzleEmbedding):
            self.model.conditioner.sign_update(self.hp.puzzle_emb_lr, self.hp.puzzle_emb_weight_decay)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def autocast(args: argparse.Namespace):
    if args.precision == "bf16":
        return torch.autocast(device_type=args.device.split(":")[0], dtype=torch.bfloat16)
    return contextlib.nullcontext()


def to_device(batch: dict[str, torch.Tensor], device: str) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def cycle(batches: list) -> Iterator:
    while True:
        yield from batches


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], None], steps: int, warmup: int, device: str) -> tuple[float, float]:
    """(seconds per call, peak accelerator memory in GiB or NaN on CPU) over ``steps`` calls after ``warmup``."""
    for _ in range(warmup):
        fn()
    sync(device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    seconds = (time.perf_counter() - start) / steps
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else float("nan")
    return seconds, peak


@dataclass
class Side:
    """One side of a comparison: ``run`` is one timed call; ``describe(seconds, peak)`` its record fields."""

    run: Callable[[], None]
    describe: Callable[[float, float], dict]


def interleaved(args: argparse.Namespace, sides: dict[str, Side]) -> dict[str, list[tuple[float, float]]]:
    """Warm every side up, then ``args.repeats`` rounds in which each side in turn times ``args.steps`` calls, so a
    busy machine slows both sides of a ratio alike. Returns ``{label: [(seconds per call, peak GiB), ...]}``."""
    for side in sides.values():
        for _ in range(args.warmup):
            side.run()
    sync(args.device)
    times: dict[str, list[tuple[float, float]]] = {label: [] for label in sides}
    for _ in range(args.repeats):
        for label, side in sides.items():
            times[label].append(timed(side.run, args.steps, 0, args.device))
    return times


def spread(values: list[float]) -> dict[str, float]:
    """``median``, ``min`` and ``max`` of ``values``."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def compare(args: argparse.Namespace, sides: dict[str, Side], name: str, seconds_key: str, ratio_name: str,
            numerator: str, denominator: str, label_key: str = "conditioning") -> None:
    """Time ``sides`` interleaved and emit, per side, ``bench <name> <label_key>=<label> <seconds_key>=<median>
    <seconds_key>_min=... <seconds_key>_max=... ...``; then the ratio ``numerator / denominator`` of the medians with
    the min and max of the per-round ratios: ``bench <name>_overhead <ratio_name>=<r> <ratio_name>_min=...``."""
    times = interleaved(args, sides)
    rows = None
    for label, side in sides.items():
        seconds = [s for s, _ in times[label]]
        stats = spread(seconds)
        peak = max(p for _, p in times[label])
        record = {label_key: label, **side.describe(stats["median"], peak)}
        record.update({f"{seconds_key}_min": stats["min"], f"{seconds_key}_max": stats["max"],
                       "repeats": args.repeats})
        rows = record.get("rows", rows)
        emit(name, args, **record)
    ratios = [a / b for (a, _), (b, _) in zip(times[numerator], times[denominator])]
    medians = spread([s for s, _ in times[numerator]])["median"] / spread([s for s, _ in times[denominator]])["median"]
    emit(f"{name.split('_')[0]}_overhead", args, rows=rows, **{ratio_name: medians, f"{ratio_name}_min": min(ratios),
                                                             f"{ratio_name}_max": max(ratios)})


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def peak_tflops(device: str) -> float | None:
    return bf16_peak_tflops(device_name(device)) if device.startswith("cuda") else None


def fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace(" ", "_")


def emit(name: str, args: argparse.Namespace, **fields) -> None:
    """Print ``bench <name> key=value ...`` and append the same record as JSON to ``args.json``."""
    print(f"bench {name} " + " ".join(f"{k}={fmt(v)}" for k, v in fields.items()), flush=True)
    record = {
        "bench": name,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name(args.device),
        "torch": torch.__version__,
        "preset": args.preset,
        "precision": args.precision,
        "overrides": args.overrides,
        "compile": bool(getattr(args, "compile", False)),
        "forward_dtype": getattr(args, "forward_dtype", None),  # None: the config's
        "crop_buckets": getattr(args, "crop_buckets", None),  # None: the config's
        **fields,
    }
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def quiet() -> None:
    """Keep Lightning's and the datamodule's info lines out of the benchmark output."""
    import logging
    import warnings

    warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
