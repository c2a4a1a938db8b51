"""EncoderDiagnostics: statistics of the demo encoder's context, over the global batch, to TensorBoard.

The statistics are plain functions of tensors (:func:`batch_statistics`, :func:`probe_statistics`,
:func:`drift_statistics`) so they can be tested without a Trainer; the callback gathers their inputs
from every rank and logs the results. Definitions (``context`` is the detached ``(B, P, D)`` encoder
output of the rows trained at this step, gathered over all ranks into ``N`` rows; ``p_b`` is row ``b``
of the pooled matrix ``context.mean(dim=1)``, shape ``(N, D)``):

The seed's three (scale-dependent; kept for comparison with the seed's dashboard):

- ``encoder_cross_sample_var = mean_d Var_b(p_b[d])``: the biased variance across samples of the pooled
  context, averaged over dimensions. (The seed took the same variance per token slot, before pooling.)
- ``encoder_output_mean``: the mean of every value of ``context`` (all N*P*D).
- ``encoder_output_std``: the (unbiased) standard deviation of every value of ``context``.

Scale-invariant ones (multiplying the context by any c != 0 leaves them unchanged):

- ``encoder_normalized_var = sum_d Var_b(p_b[d]) / mean_b ||p_b||^2``: the fraction of the pooled vectors'
  energy that varies across samples, in [0, 1]. 0 = every row the same; near 1 = zero-mean, all variation.
- ``encoder_l2n_std = sqrt(D) * mean_d Std_b(u_b[d])`` with ``u_b = p_b / ||p_b||`` (biased std): 0 when every
  row points the same way, about 1 for directions spread uniformly over the sphere.
- ``encoder_cross_task_cosine``: the mean cosine ``u_a . u_b`` over ordered pairs of rows of *different*
  tasks (``task_index``); 1 = the encoder says the same thing for every task. Not logged when the global
  batch holds one task.
- ``encoder_effective_rank = exp(H(s / sum(s)))``, ``s`` the singular values of the centred pooled matrix
  ``p - mean_b p_b`` and H the Shannon entropy; singular values below ``1e-6 x max_b ||p_b||`` count as
  zero (float32 noise), and the rank is 0 when none is left (NaN for a non-finite context). Ranges from 0
  (collapsed) to min(N - 1, D).

Probe set (a fixed set of training tasks, each in two augmentations training never draws, from
``datamodule.probe_batch``; encoded under ``no_grad`` in eval mode). Each probe row is its whole context
flattened to ``P*D`` values, what the TRM reads; ``a_i``/``b_i`` are task i in view A/B:

- ``probe_same_task_cosine``: mean over i of cos(a_i, b_i) (the same task under two augmentations);
- ``probe_diff_task_cosine``: mean over i != j of cos(a_i, b_j);
- ``probe_retrieval_acc``: fraction of i whose nearest view-B row (by cosine) is b_i, strictly (a tie
  with another task counts as a miss, so a collapsed encoder scores 0, chance is 1/n);
- ``probe_drift_cosine``: mean over rows of 1 - cos(current, previous check), over both views;
- ``probe_drift_rel_l2 = ||current - previous||_F / ||previous||_F``. Both drift values start at the
  second probe check. A jump shows here, for one check;
- ``probe_window_drift_cosine``: mean over rows of 1 - cos(current, the encoding ``drift_window`` checks ago, or
  the first one until there are that many): cumulative drift, which a slow rotation builds up while each check's
  own drift stays tiny;
- ``probe_context_loss`` / ``probe_stale_context_loss``: the TRM's mean token loss (a full evaluation rollout) on
  the probe queries with today's context and with the context of ``stale_lag`` checks ago, and
  ``probe_stale_context_gap`` = stale - today. Is the TRM keeping up with the encoder? Healthy training makes the
  gap positive (today's context serves today's TRM better); a gap that falls below 0 says the TRM still reads the
  old encodings better than the current ones: the encoder moved away from what the TRM learned.

Also a histogram ``diagnostics/encoder_context`` of the context values (rank 0's rows only) to TensorBoard.
"""

from __future__ import annotations

import math
from collections import deque

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from callbacks.helpers import MetricProducer, due, tensorboard_writers
from trm_lightning import metric_names as names
from trm_lightning.checks import check_at_least
from trm_lightning.losses import act_loss

RANK_RTOL = 1e-6  # singular values below this x the largest row norm are float32 noise


# --------------------------------------------------------------------------------------- statistics
def pool_context(context: Tensor) -> Tensor:
    """(B, P, D) context -> (B, D) float64 mean over the P context tokens."""
    return context.detach().double().mean(dim=1)


def value_moments(context: Tensor) -> Tensor:
    """(3,) float64: count, sum and sum of squares of every value of ``context`` (summable over ranks)."""
    values = context.detach().double()
    return torch.stack([torch.tensor(float(values.numel()), dtype=torch.float64, device=values.device),
                        values.sum(), values.square().sum()])


def _unit_rows(x: Tensor, eps: float = 1e-30) -> Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(eps)


def effective_rank(pooled: Tensor, rtol: float = RANK_RTOL) -> Tensor:
    """exp(entropy) of the normalised singular values of the centred ``pooled`` (N, D); see module doc."""
    pooled = pooled.double()
    if not bool(torch.isfinite(pooled).all()):  # SVD cannot run; the non-finite alert reads the loss
        return pooled.new_tensor(math.nan)
    scale = pooled.norm(dim=-1).max() if pooled.numel() else pooled.new_zeros(())
    s = torch.linalg.svdvals(pooled - pooled.mean(dim=0, keepdim=True))
    s = s[s > rtol * scale]
    if s.numel() == 0:
        return pooled.new_zeros(())
    p = s / s.sum()
    return torch.exp(-(p * p.log()).sum())


def batch_statistics(pooled: Tensor, task_index: Tensor, moments: Tensor) -> dict[str, Tensor]:
    """Every batch diagnostic from the global pooled matrix (N, D), its task ids (N,) and the value moments.

    Returns 0-d float64 tensors keyed by their logged names (:mod:`trm_lightning.metric_names`).
    """
    pooled = pooled.double()
    n_rows, dim = pooled.shape
    count, total, total_sq = moments.double().unbind()
    mean = total / count
    var_all = (total_sq - count * mean.square()).clamp_min(0) / (count - 1).clamp_min(1)

    centred = pooled - pooled.mean(dim=0, keepdim=True)
    per_dim_var = centred.square().mean(dim=0)  # (D,) biased
    mean_sq_norm = pooled.square().sum(dim=-1).mean()
    unit = _unit_rows(pooled)
    unit_std = (unit - unit.mean(dim=0, keepdim=True)).square().mean(dim=0).sqrt()  # (D,) biased

    out = {
        names.ENCODER_CROSS_SAMPLE_VAR: per_dim_var.mean(),
        names.ENCODER_OUTPUT_MEAN: mean,
        names.ENCODER_OUTPUT_STD: var_all.sqrt(),
        names.ENCODER_NORMALIZED_VAR: torch.where(  # 0 for an all-zero context; NaN stays NaN
            mean_sq_norm == 0, torch.zeros_like(mean_sq_norm), per_dim_var.sum() / mean_sq_norm
        ),
        names.ENCODER_L2N_STD: unit_std.mean() * math.sqrt(dim),
        names.ENCODER_EFFECTIVE_RANK: effective_rank(pooled),
    }
    different = task_index.view(-1, 1) != task_index.view(1, -1)  # (N, N)
    if bool(different.any()):
        cosine = unit @ unit.T
        out[names.ENCODER_CROSS_TASK_COSINE] = cosine[different].mean()
    return out


def probe_statistics(view_a: Tensor, view_b: Tensor) -> dict[str, Tensor]:
    """Task specificity on the probe set: ``view_a``/``view_b`` (n, F), row i = task i in each view."""
    a, b = _unit_rows(view_a.double().flatten(1)), _unit_rows(view_b.double().flatten(1))
    cosine = a @ b.T  # (n, n): [i, j] = cos(a_i, b_j)
    n = cosine.shape[0]
    same = cosine.diagonal()
    off = ~torch.eye(n, dtype=torch.bool, device=cosine.device)
    out = {names.PROBE_SAME_TASK_COSINE: same.mean()}
    if n > 1:
        best_other = cosine.masked_fill(~off, -math.inf).max(dim=1).values
        out[names.PROBE_DIFF_TASK_COSINE] = cosine[off].mean()
        out[names.PROBE_RETRIEVAL_ACC] = (same > best_other).double().mean()
    return out


def drift_statistics(current: Tensor, previous: Tensor) -> dict[str, Tensor]:
    """How far the probe encodings moved since the previous check: rows (n, F) in the same order."""
    cur, prev = current.double().flatten(1), previous.double().flatten(1)
    cos = (_unit_rows(cur) * _unit_rows(prev)).sum(dim=-1)
    return {
        names.PROBE_DRIFT_COSINE: (1 - cos).mean(),
        names.PROBE_DRIFT_REL_L2: (cur - prev).norm() / prev.norm().clamp_min(1e-300),
    }


def window_drift(current: Tensor, reference: Tensor) -> Tensor:
    """Mean over rows of 1 - cos(current, reference): how far the probe encodings are from where they were
    ``drift_window`` checks ago, however slowly they got there."""
    cur, ref = current.double().flatten(1), reference.double().flatten(1)
    return (1 - (_unit_rows(cur) * _unit_rows(ref)).sum(dim=-1)).mean()


class ProbeTracker:
    """The probe statistics of successive probe checks: task specificity now, drift since the previous check and
    since ``drift_window`` checks ago (the encodings of the last ``drift_window`` checks are kept, on the CPU).

    :meth:`update` takes a probe check's context (2n, P, D), rows ``i`` and ``n + i`` being task ``i`` in its two
    views, and returns the statistics; :attr:`reference` is the context the window drift compared with (``drift_window``
    checks ago, or the oldest kept) and :attr:`stale` the one ``stale_lag`` checks ago (for the keeping-up loss)."""

    def __init__(self, drift_window: int = 50, history: list[Tensor] | None = None, stale_lag: int = 5) -> None:
        self.history: deque[Tensor] = deque(history or [], maxlen=max(drift_window, stale_lag))
        self.drift_window, self.stale_lag = drift_window, stale_lag
        self.reference: Tensor | None = None
        self.stale: Tensor | None = None

    def update(self, context: Tensor) -> dict[str, Tensor]:
        rows = context.detach().double().flatten(1)  # (2n, P*D)
        n = rows.shape[0] // 2
        stats = probe_statistics(rows[:n], rows[n:])
        self.reference = self.stale = None
        if self.history:
            previous = self.history[-1].to(rows.device)
            self.reference = self.history[-min(self.drift_window, len(self.history))].to(context.device)
            self.stale = self.history[-min(self.stale_lag, len(self.history))].to(context.device)
            stats.update(drift_statistics(rows, previous))
            stats[names.PROBE_WINDOW_DRIFT_COSINE] = window_drift(rows, self.reference)
        self.history.append(context.detach().float().cpu())
        return stats


def encoder_statistics(context: Tensor, task_index: Tensor) -> dict[str, Tensor]:
    """:func:`batch_statistics` of one (B, P, D) context on one process (tests, notebooks)."""
    return batch_statistics(pool_context(context), task_index, value_moments(context))


# ----------------------------------------------------------------------------------------- callback
class EncoderDiagnostics(MetricProducer):
    """Logs ``diagnostics/*`` statistics of the encoder context every ``every_n_steps`` optimizer steps.

    Every rank computes the same numbers from the global batch (the pooled context and the value
    moments are all-gathered), and logs them with ``on_step=True``. Definitions: see the module docstring
    and ``docs/diagnostics.md``. The training step must return ``context`` (B, P, D) and ``task_index`` (B,).
    A :class:`~callbacks.helpers.MetricProducer`: :class:`~callbacks.CollapseAlert` reads this step's values
    wherever it stands in ``trainer.callbacks``.

    Args:
        every_n_steps: optimizer steps between batch statistics; None uses ``trainer.log_every_n_steps``.
            Choose a multiple of ``log_every_n_steps`` so that every check is written.
        probe_every_n_steps: steps between probe-set checks (task specificity and drift); None uses
            ``every_n_steps``; 0 turns the probe off.
        probe_tasks: training tasks in the probe set (each in two augmentations never used in training).
        histogram_every_n_steps: steps between histograms of the context values; None uses the probe
            interval (or ``every_n_steps`` when the probe is off); 0 turns them off.
        drift_window: probe checks back for the reference of ``probe_window_drift_cosine`` (the probe encodings of
            the last this many checks are kept, on the CPU: 50 x probe rows x P x D floats, 2 MB per check at the
            ARC config with 32 probe tasks). 50 makes a rotation of 1 degree per check fire CumulativeDrift's
            default within 46 checks (docs/diagnostics.md).
        stale_lag: probe checks back for the stale context of the keeping-up loss.
        keeping_up: also compute the TRM's probe loss with today's and the stale context at each probe check (two
            evaluation rollouts of the probe rows).
    """

    publishes = names.SCALAR_DIAGNOSTICS

    def __init__(
        self,
        every_n_steps: int | None = None,
        probe_every_n_steps: int | None = None,
        probe_tasks: int = 16,
        histogram_every_n_steps: int | None = None,
        drift_window: int = 50,
        stale_lag: int = 5,
        keeping_up: bool = True,
    ) -> None:
        super().__init__()
        check_at_least("EncoderDiagnostics.drift_window", drift_window, 1)
        check_at_least("EncoderDiagnostics.stale_lag", stale_lag, 1)
        for name, value in [("every_n_steps", every_n_steps), ("probe_every_n_steps", probe_every_n_steps),
                            ("histogram_every_n_steps", histogram_every_n_steps)]:
            check_at_least(f"EncoderDiagnostics.{name}", value, 0, allow_none=True)
        check_at_least("EncoderDiagnostics.probe_tasks", probe_tasks, 2)  # retrieval needs other tasks
        self.every_n_steps = every_n_steps
        self.probe_every_n_steps = probe_every_n_steps
        self.probe_tasks = probe_tasks
        self.histogram_every_n_steps = histogram_every_n_steps
        self.drift_window = drift_window
        self.stale_lag = stale_lag
        self.keeping_up = keeping_up
        self._probe_batch: dict[str, Tensor] | None = None
        self._tracker = ProbeTracker(drift_window, stale_lag=stale_lag)

    # ---------------------------------------------------------------------------------- intervals
    def _intervals(self, trainer: Trainer) -> tuple[int, int, int]:
        every = self.every_n_steps if self.every_n_steps is not None else max(int(trainer.log_every_n_steps), 1)
        probe = self.probe_every_n_steps if self.probe_every_n_steps is not None else every
        hist = self.histogram_every_n_steps
        if hist is None:
            hist = probe if probe > 0 else every
        return every, probe, hist

    @property
    def state_key(self) -> str:
        """Unique per configuration, so two of these callbacks in one run each keep their own checkpointed state."""
        return self._generate_state_key(every_n_steps=self.every_n_steps, probe_every_n_steps=self.probe_every_n_steps,
                                        probe_tasks=self.probe_tasks)

    def state_dict(self) -> dict:
        """The past probe encodings, so the drifts after a resume compare with the same checks as the uninterrupted
        run's."""
        return {"probe_history": [h.clone() for h in self._tracker.history]}

    def load_state_dict(self, state_dict: dict) -> None:
        self._restored_history = list(state_dict.get("probe_history", []))

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        self._probe_batch = None
        self._tracker = ProbeTracker(self.drift_window, getattr(self, "_restored_history", []), self.stale_lag)
        self._restored_history = []
        _, probe, _ = self._intervals(trainer)
        datamodule = getattr(trainer, "datamodule", None)
        if probe > 0:
            if datamodule is None or not hasattr(datamodule, "probe_batch"):
                rank_zero_warn("EncoderDiagnostics: no datamodule with probe_batch(); the probe set is off")
            else:
                self._probe_batch = datamodule.probe_batch(self.probe_tasks, views=2)

    # ---------------------------------------------------------------------------------- the step's work
    def _produce(self, trainer: Trainer, pl_module: LightningModule, outputs) -> bool:
        """Batch statistics, probe check and histogram, each when due (called by ``on_train_batch_end`` or a
        consumer, once per step)."""
        every, probe, hist = self._intervals(trainer)
        if not isinstance(outputs, dict) or "context" not in outputs:
            return False
        step = trainer.global_step
        did = False
        if due(trainer, every):
            self.publish(pl_module, step, self._batch_check(trainer, pl_module, outputs["context"],
                                                            outputs["task_index"]))
            did = True
        if self._probe_batch is not None and due(trainer, probe):
            self.publish(pl_module, step, self._probe_check(trainer, pl_module))
            did = True
        if due(trainer, hist):
            did = True
            if trainer.is_global_zero:  # no collective below
                values = outputs["context"].detach().float().flatten().cpu()
                for writer in tensorboard_writers(trainer):
                    writer.add_histogram(names.ENCODER_CONTEXT_HISTOGRAM, values, global_step=step)
        return did

    @staticmethod
    def _batch_check(trainer: Trainer, pl_module: LightningModule, context: Tensor, task_index: Tensor):
        pooled = pool_context(context)  # (B, D)
        moments = value_moments(context)
        tasks = task_index.detach().long()
        if trainer.world_size > 1:  # every rank gathers, every rank computes the same numbers
            pooled = pl_module.all_gather(pooled).reshape(-1, pooled.shape[-1])
            tasks = pl_module.all_gather(tasks).reshape(-1)
            moments = pl_module.all_gather(moments).reshape(-1, 3).sum(dim=0)
        return batch_statistics(pooled, tasks, moments)

    def _probe_check(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, Tensor]:
        """Encode the probe set (identical on every rank: same parameters, same batch; no collective)."""
        batch = {k: v.to(pl_module.device) for k, v in self._probe_batch.items()}
        was_training = pl_module.training
        pl_module.eval()
        try:
            with torch.no_grad(), trainer.precision_plugin.forward_context():
                context = pl_module.model.encode(batch)
        finally:
            pl_module.train(was_training)
        stats = self._tracker.update(context)
        if self.keeping_up and self._tracker.stale is not None:
            stats.update(self._keeping_up(trainer, pl_module, batch, context, self._tracker.stale))
        return stats

    @staticmethod
    def _keeping_up(trainer: Trainer, pl_module: LightningModule, batch, today: Tensor, stale: Tensor):
        """The TRM's probe loss with today's context and with the stale one (evaluation rollouts, eval mode)."""
        losses = []
        was_training = pl_module.training
        pl_module.eval()
        try:
            with torch.no_grad(), trainer.precision_plugin.forward_context():
                for context in (today, stale.to(today.dtype)):
                    logits, q_halt, _ = pl_module.model.rollout(batch, context=context)
                    losses.append(act_loss(logits, batch["labels"], q_halt).lm_loss.double().mean())
        finally:
            pl_module.train(was_training)
        return {names.PROBE_CONTEXT_LOSS: losses[0], names.PROBE_STALE_CONTEXT_LOSS: losses[1],
                names.PROBE_STALE_CONTEXT_GAP: losses[1] - losses[0]}
