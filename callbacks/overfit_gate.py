"""OverfitGate: the seed's E1 check ("MUST PASS FIRST") as a callback with an exit status.

Every ``check_every_n_steps`` optimizer steps it rolls the model out (``halt_max_steps`` steps, halting off)
on the training puzzles' own queries, un-augmented, and measures exact-match and cell accuracy. The run
passes when both reach their thresholds within ``trainer.max_steps``; it then stops early (``stop_on_pass``)
and prints ``overfit: PASS exact=<x> cell=<y> first_step_95=<n> budget=<steps>`` as its last line. Otherwise
``trm`` prints ``overfit: FAIL ...`` and exits 1 once the run has ended normally (its ``status.json`` says
``finished``, with the verdict under ``verdicts``; its checkpoints are the finished run's).
"""

from __future__ import annotations

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader

from trm_lightning.checks import check_at_least, check_probability
from trm_lightning.losses import act_loss


class OverfitGate(Callback):
    """Pass/fail on memorising the training puzzles.

    Args:
        exact_threshold: exact-match accuracy (whole grid right) the run must reach.
        cell_threshold: mean per-query cell accuracy (EOS border included) it must reach too.
        check_every_n_steps: optimizer steps between checks.
        stop_on_pass: stop training at the first check that passes.
    """

    def __init__(
        self,
        exact_threshold: float = 0.95,
        cell_threshold: float = 0.99,
        check_every_n_steps: int = 50,
        stop_on_pass: bool = True,
    ) -> None:
        check_probability("OverfitGate.exact_threshold", exact_threshold)
        check_probability("OverfitGate.cell_threshold", cell_threshold)
        check_at_least("OverfitGate.check_every_n_steps", check_every_n_steps, 1)
        self.exact_threshold = exact_threshold
        self.cell_threshold = cell_threshold
        self.check_every_n_steps = check_every_n_steps
        self.stop_on_pass = stop_on_pass
        self.first_pass_step: int | None = None
        self.verdict: str | None = None  # the verdict line, once the fit ended (RunStatus records it)
        self.passed: bool | None = None  # the CLI exits 1 when False
        self.last: tuple[int, float, float] | None = None  # (step, exact, cell)
        self._loader: DataLoader | None = None

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        dm = trainer.datamodule
        queries = dm.queries("train", [0])  # un-augmented, with the puzzle-id baseline's trained rows
        self._loader = DataLoader(queries, batch_size=64, shuffle=False)
        rank_zero_info(f"overfit gate: {len(queries)} queries of {len(dm.train_tasks)} training puzzles")

    @torch.no_grad()
    def _check(self, trainer: Trainer, pl_module: LightningModule) -> None:
        was_training = pl_module.training
        pl_module.eval()
        exact, cell, n = 0.0, 0.0, 0
        for batch in self._loader:
            batch = {k: v.to(pl_module.device) for k, v in batch.items()}
            logits, q_halt, _ = pl_module.model.rollout(batch)
            out = act_loss(logits, batch["labels"], q_halt)
            exact += out.exact.sum().item()
            cell += out.token_accuracy.sum().item()
            n += out.exact.numel()
        pl_module.train(was_training)
        step = trainer.global_step
        self.last = (step, exact / n, cell / n)
        if trainer.is_global_zero and trainer.logger is not None:  # every rank computed the same numbers
            trainer.logger.log_metrics({"overfit/exact_accuracy": exact / n, "overfit/cell_accuracy": cell / n}, step)
        if self.first_pass_step is None and self._passes():
            self.first_pass_step = step
            if self.stop_on_pass:
                trainer.should_stop = True

    def _passes(self) -> bool:
        return self.last is not None and self.last[1] >= self.exact_threshold and self.last[2] >= self.cell_threshold

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        if trainer.global_step % self.check_every_n_steps == 0:
            self._check(trainer, pl_module)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.last is None or self.last[0] != trainer.global_step:
            self._check(trainer, pl_module)
        _, exact, cell = self.last
        verdict = "PASS" if self.first_pass_step is not None else "FAIL"
        line = (
            f"overfit: {verdict} exact={exact:.4f} cell={cell:.4f} "
            f"first_step_95={self.first_pass_step if self.first_pass_step is not None else 'none'} "
            f"budget={trainer.max_steps}"
        )
        self.verdict, self.passed = line, verdict == "PASS"
        if self.passed and trainer.is_global_zero:
            print(line, flush=True)  # a FAIL line is the command's error, printed by `trm` after the run ends
