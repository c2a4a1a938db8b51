"""CollapseAlert: one rule per known failure of encoder-TRM training, each with a threshold, a patience
(consecutive checks) and an action (``warn``, ``stop`` or ``raise``).

Rules and what they read (``trainer.callback_metrics``, global values identical on every rank):

- ``representation_collapse``: ``diagnostics/encoder_normalized_var`` below ``min_normalized_var``, or
  ``diagnostics/encoder_cross_task_cosine`` above ``max_cross_task_cosine`` (EncoderDiagnostics);
- ``drift``: ``diagnostics/probe_drift_cosine`` above ``max_probe_drift_cosine``, or
  ``diagnostics/probe_drift_rel_l2`` above ``max_probe_drift_rel_l2`` (EncoderDiagnostics' probe);
- ``accuracy_collapse``: ``train/accuracy`` below ``(1 - accuracy_drop) x`` its running peak, once the peak
  has reached ``accuracy_min_peak`` (the seed's E0 failure: 0.7 down to 0);
- ``q_halt_rising``: ``train/q_halt_loss`` higher than at the previous check, ``q_halt_patience`` checks in a
  row (each rise by more than ``q_halt_min_rise`` relative);
- ``nonfinite``: a non-finite training loss (``outputs["loss"]``, which is per rank) at any step since the
  previous check, or non-finite gradients (before clipping), on any rank. Patience 1.

A rule fires when its condition has held for ``patience`` consecutive checks in which its inputs were
fresh, then again only after the condition has cleared. Every alert is ``rank_zero_warn``-ed, written to
TensorBoard as text under ``alerts/<rule>`` (rank 0) and appended to ``<log_dir>/alerts.jsonl`` (rank 0;
fields ``step``, ``rule``, ``action``, ``values``, ``thresholds``, ``patience``, ``message``). ``stop`` and
``raise`` are agreed on every rank with ``trainer.strategy.reduce_boolean_decision`` (so one rank's NaN stops
all of them), then every rank saves ``<log_dir>/checkpoints/alert-step<N>.ckpt``; ``stop`` sets
``trainer.should_stop``, ``raise`` raises :class:`CollapseAlertError` (``trm`` prints it as one line).
"""

from __future__ import annotations

import json
import math
import os
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from callbacks.encoder_diagnostics import EncoderDiagnostics, due, tensorboard_writers
from callbacks.last_checkpoint import LastCheckpoint, weights_are_finite
from trm_lightning import metric_names as names
from trm_lightning.errors import TRMError
from trm_lightning.run_files import ALERTS_FILE, alert_checkpoint_name, checkpoint_dir
from trm_lightning.trainer_state import is_logging_step

Action = Literal["warn", "stop", "raise"]
ACTIONS = ("warn", "stop", "raise")

NORMALIZED_VAR = names.ENCODER_NORMALIZED_VAR
CROSS_TASK_COSINE = names.ENCODER_CROSS_TASK_COSINE
DRIFT_COSINE = names.PROBE_DRIFT_COSINE
DRIFT_REL_L2 = names.PROBE_DRIFT_REL_L2
Q_HALT_LOSS = names.TRAIN_Q_HALT_LOSS


class CollapseAlertError(TRMError):
    """Raised by :class:`CollapseAlert` for a rule whose action is ``raise`` (after saving a checkpoint)."""


@dataclass
class Alert:
    """One firing of a rule."""

    step: int
    rule: str
    action: str
    values: dict[str, float]
    thresholds: dict[str, float | None]
    patience: int
    message: str = field(default="")


# -------------------------------------------------------------------------------------------- rules
class Rule(ABC):
    """A condition checked on fresh values; fires after ``patience`` consecutive true checks.

    Subclasses define ``keys`` (the metric names they read) and :meth:`condition`. :meth:`update` returns an
    :class:`Alert` when the rule fires, else None; checks where none of ``keys`` is present are skipped
    (they neither extend nor break a streak).
    """

    name = "rule"
    keys: tuple[str, ...] = ()

    def __init__(self, patience: int = 1, action: Action = "warn") -> None:
        if patience < 1:
            raise ValueError(f"{self.name}: patience must be >= 1, got {patience}")
        if action not in ACTIONS:
            raise ValueError(f"{self.name}: action must be one of {ACTIONS}, got {action!r}")
        self.patience = patience
        self.action = action
        self.streak = 0

    @abstractmethod
    def thresholds(self) -> dict[str, float | None]:
        """The limits this rule compares against, as written in the alert record."""

    @abstractmethod
    def condition(self, values: Mapping[str, float]) -> bool:
        """True when ``values`` break the rule at this check."""

    @abstractmethod
    def describe(self, values: Mapping[str, float]) -> str:
        """What happened, in one line, for the warning and the record."""

    def update(self, values: Mapping[str, float], step: int = 0) -> Alert | None:
        seen = {k: float(values[k]) for k in self.keys if k in values}
        if not seen:
            return None
        if not self.condition(seen):
            self.streak = 0
            return None
        self.streak += 1
        if self.streak != self.patience:
            return None
        message = (
            f"CollapseAlert [{self.name}] at step {step}: {self.describe(seen)}; "
            f"{self.patience} check(s) in a row; action: {self.action}"
        )
        return Alert(step, self.name, self.action, seen, self.thresholds(), self.patience, message)


class RepresentationCollapseRule(Rule):
    """Normalised variance below ``min_normalized_var`` or cross-task cosine above ``max_cross_task_cosine``."""

    name = "representation_collapse"
    keys = (NORMALIZED_VAR, CROSS_TASK_COSINE)

    def __init__(self, min_normalized_var: float | None, max_cross_task_cosine: float | None,
                 patience: int = 3, action: Action = "warn") -> None:
        super().__init__(patience, action)
        self.min_normalized_var = min_normalized_var
        self.max_cross_task_cosine = max_cross_task_cosine

    def thresholds(self):
        return {"min_normalized_var": self.min_normalized_var, "max_cross_task_cosine": self.max_cross_task_cosine}

    def _low_var(self, values) -> bool:
        v = values.get(NORMALIZED_VAR)
        return self.min_normalized_var is not None and v is not None and v < self.min_normalized_var

    def _high_cos(self, values) -> bool:
        v = values.get(CROSS_TASK_COSINE)
        return self.max_cross_task_cosine is not None and v is not None and v > self.max_cross_task_cosine

    def condition(self, values) -> bool:
        return self._low_var(values) or self._high_cos(values)

    def describe(self, values) -> str:
        parts = []
        if self._low_var(values):
            parts.append(f"encoder_normalized_var={values[NORMALIZED_VAR]:.4g} < {self.min_normalized_var}")
        if self._high_cos(values):
            parts.append(f"encoder_cross_task_cosine={values[CROSS_TASK_COSINE]:.4f} > {self.max_cross_task_cosine}")
        return " and ".join(parts) + " (the encoder says the same thing for every task)"


class DriftRule(Rule):
    """Probe-set drift between two checks above a threshold (cosine distance or relative L2)."""

    name = "drift"
    keys = (DRIFT_COSINE, DRIFT_REL_L2)

    def __init__(self, max_drift_cosine: float | None, max_drift_rel_l2: float | None,
                 patience: int = 2, action: Action = "warn") -> None:
        super().__init__(patience, action)
        self.max_drift_cosine = max_drift_cosine
        self.max_drift_rel_l2 = max_drift_rel_l2

    def thresholds(self):
        return {"max_probe_drift_cosine": self.max_drift_cosine, "max_probe_drift_rel_l2": self.max_drift_rel_l2}

    def _over(self, values, key, limit) -> bool:
        return limit is not None and key in values and values[key] > limit

    def condition(self, values) -> bool:
        return self._over(values, DRIFT_COSINE, self.max_drift_cosine) or self._over(
            values, DRIFT_REL_L2, self.max_drift_rel_l2
        )

    def describe(self, values) -> str:
        parts = [f"{k.split('/')[-1]}={values[k]:.4g} > {lim}"
                 for k, lim in ((DRIFT_COSINE, self.max_drift_cosine), (DRIFT_REL_L2, self.max_drift_rel_l2))
                 if self._over(values, k, lim)]
        return " and ".join(parts) + " (the probe tasks' encodings are moving: the TRM sees a shifting input)"


class AccuracyCollapseRule(Rule):
    """``key`` below ``(1 - drop) x`` its running peak, once the peak has reached ``min_peak``."""

    name = "accuracy_collapse"

    def __init__(self, drop: float, min_peak: float, patience: int = 3, action: Action = "warn",
                 key: str = names.TRAIN_ACCURACY) -> None:
        super().__init__(patience, action)
        if not 0.0 < drop < 1.0:
            raise ValueError(f"accuracy_drop must be in (0, 1), got {drop}")
        self.drop = drop
        self.min_peak = min_peak
        self.key = key
        self.keys = (key,)
        self.peak = -math.inf

    def thresholds(self):
        return {"drop": self.drop, "min_peak": self.min_peak, "peak": self.peak,
                "floor": (1 - self.drop) * self.peak}

    def condition(self, values) -> bool:
        value = values[self.key]
        if math.isfinite(value):
            self.peak = max(self.peak, value)
        return self.peak >= self.min_peak and value < (1 - self.drop) * self.peak

    def describe(self, values) -> str:
        return (f"{self.key}={values[self.key]:.4f} < (1 - {self.drop}) x peak {self.peak:.4f} "
                f"(training accuracy collapsed)")


class RisingRule(Rule):
    """``key`` rose at each of the last ``patience`` checks (each rise > ``min_rise`` relative)."""

    name = "q_halt_rising"

    def __init__(self, patience: int = 5, min_rise: float = 0.0, action: Action = "warn",
                 key: str = Q_HALT_LOSS) -> None:
        super().__init__(patience, action)
        self.min_rise = min_rise
        self.key = key
        self.keys = (key,)
        self.previous: float | None = None

    def thresholds(self):
        return {"min_rise": self.min_rise, "previous": self.previous}

    def condition(self, values) -> bool:
        value, previous = values[self.key], self.previous
        self.previous = value
        return previous is not None and value > previous * (1 + self.min_rise)

    def describe(self, values) -> str:
        return f"{self.key}={values[self.key]:.4g} rose at each check (halting head losing calibration)"


class NonFiniteRule(Rule):
    """A non-finite loss or gradient on any rank since the previous check (values: counts of ranks)."""

    name = "nonfinite"
    keys = ("nonfinite_loss_ranks", "nonfinite_grad_ranks", "first_nonfinite_step")

    def __init__(self, action: Action = "stop") -> None:
        super().__init__(1, action)

    def thresholds(self):
        return {"max_nonfinite_ranks": 0}

    def condition(self, values) -> bool:
        return values.get("nonfinite_loss_ranks", 0) > 0 or values.get("nonfinite_grad_ranks", 0) > 0

    def describe(self, values) -> str:
        first = values.get("first_nonfinite_step", math.inf)
        where = f", first at step {int(first)}" if math.isfinite(first) else ""
        return (f"non-finite loss on {int(values.get('nonfinite_loss_ranks', 0))} rank(s), "
                f"non-finite gradients on {int(values.get('nonfinite_grad_ranks', 0))} rank(s){where}")


# ----------------------------------------------------------------------------------------- callback
class CollapseAlert(Callback):
    """Watches the diagnostics and training metrics; warns, stops or raises when a failure shows.

    Put it after EncoderDiagnostics in ``trainer.callbacks`` (otherwise it reads their values one check
    later). A threshold of None turns its rule off.

    Args:
        check_every_n_steps: optimizer steps between checks; None uses ``trainer.log_every_n_steps``.
        warmup_steps: checks before this optimizer step evaluate only the non-finite rule.
        min_normalized_var: representation collapse when ``encoder_normalized_var`` is below this.
        max_cross_task_cosine: representation collapse when ``encoder_cross_task_cosine`` is above this.
        collapse_patience: consecutive checks before representation collapse fires.
        collapse_action: warn, stop or raise on representation collapse.
        max_probe_drift_cosine: drift when ``probe_drift_cosine`` (mean 1 - cos to the previous probe check)
            is above this.
        max_probe_drift_rel_l2: drift when ``probe_drift_rel_l2`` is above this.
        drift_patience: consecutive probe checks before drift fires.
        drift_action: warn, stop or raise on drift.
        accuracy_key: the training accuracy the collapse rule follows.
        accuracy_drop: accuracy collapse when it falls below (1 - this) x its running peak; None turns it off.
        accuracy_min_peak: the rule is armed once the peak reaches this.
        accuracy_patience: consecutive checks below the floor before it fires.
        accuracy_action: warn, stop or raise on accuracy collapse.
        q_halt_patience: consecutive rising checks of ``train/q_halt_loss`` before it fires; None turns it off.
        q_halt_min_rise: a check counts as rising when the loss grew by more than this fraction.
        q_halt_action: warn, stop or raise on a rising q_halt_loss.
        nonfinite_action: warn, stop or raise on a non-finite loss or gradient; None turns it off.
        check_gradients: also test the gradients for non-finite values every step (off under 16-mixed
            precision, whose GradScaler skips such steps by design).
    """

    def __init__(
        self,
        check_every_n_steps: int | None = None,
        warmup_steps: int = 0,
        min_normalized_var: float | None = 0.01,
        max_cross_task_cosine: float | None = 0.99,
        collapse_patience: int = 3,
        collapse_action: Action = "warn",
        max_probe_drift_cosine: float | None = 0.3,
        max_probe_drift_rel_l2: float | None = None,
        drift_patience: int = 2,
        drift_action: Action = "warn",
        accuracy_key: str = names.TRAIN_ACCURACY,
        accuracy_drop: float | None = 0.5,
        accuracy_min_peak: float = 0.2,
        accuracy_patience: int = 3,
        accuracy_action: Action = "warn",
        q_halt_patience: int | None = 8,
        q_halt_min_rise: float = 0.0,
        q_halt_action: Action = "warn",
        nonfinite_action: Action | None = "stop",
        check_gradients: bool = True,
    ) -> None:
        if check_every_n_steps is not None and check_every_n_steps < 1:
            raise ValueError(f"check_every_n_steps must be >= 1 or None, got {check_every_n_steps}")
        self.check_every_n_steps = check_every_n_steps
        self.warmup_steps = warmup_steps
        self.check_gradients = check_gradients
        self.collapse = (
            RepresentationCollapseRule(min_normalized_var, max_cross_task_cosine, collapse_patience, collapse_action)
            if min_normalized_var is not None or max_cross_task_cosine is not None else None
        )
        self.drift = (
            DriftRule(max_probe_drift_cosine, max_probe_drift_rel_l2, drift_patience, drift_action)
            if max_probe_drift_cosine is not None or max_probe_drift_rel_l2 is not None else None
        )
        self.accuracy = (
            AccuracyCollapseRule(accuracy_drop, accuracy_min_peak, accuracy_patience, accuracy_action, accuracy_key)
            if accuracy_drop is not None else None
        )
        self.q_halt = RisingRule(q_halt_patience, q_halt_min_rise, q_halt_action) if q_halt_patience else None
        self.nonfinite = NonFiniteRule(nonfinite_action) if nonfinite_action is not None else None
        self.alerts: list[Alert] = []  # every alert of this run (all ranks keep the list)
        self._log_dir: str | None = None
        self._diagnostics: EncoderDiagnostics | None = None
        self._seen_step = -1
        self._seen_probe_step = -1
        self._train_fresh = False
        self._bad_loss: Tensor | None = None
        self._bad_grad: Tensor | None = None

    @property
    def rules(self) -> list[Rule]:
        return [r for r in (self.nonfinite, self.collapse, self.drift, self.accuracy, self.q_halt) if r is not None]

    # --------------------------------------------------------------------------------------- setup
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # trainer.log_dir broadcasts under DDP: read it here, on every rank, never under is_global_zero
        log_dir = trainer.log_dir
        self._log_dir = log_dir or trainer.default_root_dir

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        found = [cb for cb in trainer.callbacks if isinstance(cb, EncoderDiagnostics)]
        self._diagnostics = found[0] if found else None
        if self._diagnostics is not None and trainer.callbacks.index(self._diagnostics) > trainer.callbacks.index(self):
            rank_zero_warn("CollapseAlert comes before EncoderDiagnostics in trainer.callbacks: "
                           "it reads their values one check later")
        if self._diagnostics is None and (self.collapse or self.drift):
            rank_zero_warn("CollapseAlert: no EncoderDiagnostics callback; the collapse and drift rules read "
                           "diagnostics/* only if something else logs them")
        self._seen_step = self._seen_probe_step = -1
        self._train_fresh = False
        self._bad_loss = self._bad_grad = self._first_bad = None

    def _flag(self, bad: Tensor, step: int) -> None:
        """Remember the first step with a non-finite value, on the device (no host sync)."""
        at = torch.where(bad, float(step), math.inf)
        self._first_bad = at if self._first_bad is None else torch.minimum(self._first_bad, at)

    # --------------------------------------------------------------------------------------- hooks
    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer) -> None:
        if self.nonfinite is None or not self.check_gradients or str(trainer.precision).startswith("16"):
            return
        grads = [p.grad.detach() for p in pl_module.parameters() if p.grad is not None]
        if grads:
            bad = ~torch.isfinite(torch.nn.utils.get_total_norm(grads, norm_type=2.0))
            self._bad_grad = bad if self._bad_grad is None else self._bad_grad | bad
            self._flag(bad, trainer.global_step + 1)  # the step this optimizer update completes

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if self.nonfinite is not None and isinstance(loss, Tensor):
            bad = ~torch.isfinite(loss.detach()).all()  # no sync: read at the next check
            self._bad_loss = bad if self._bad_loss is None else self._bad_loss | bad
            self._flag(bad, trainer.global_step)
        if is_logging_step(trainer):  # the module logged train/* at this step
            self._train_fresh = True
        every = self.check_every_n_steps or max(int(trainer.log_every_n_steps), 1)
        if due(trainer, every):
            self._check(trainer, pl_module)

    # --------------------------------------------------------------------------------------- check
    def _fresh_values(self, trainer: Trainer) -> dict[str, float]:
        metrics = trainer.callback_metrics
        keys: list[str] = []
        diag = self._diagnostics
        if diag is None:
            keys += [NORMALIZED_VAR, CROSS_TASK_COSINE, DRIFT_COSINE, DRIFT_REL_L2]
        else:
            if diag.last_step > self._seen_step:
                keys += [NORMALIZED_VAR, CROSS_TASK_COSINE]
                self._seen_step = diag.last_step
            if diag.last_probe_step > self._seen_probe_step:
                keys += [DRIFT_COSINE, DRIFT_REL_L2]
                self._seen_probe_step = diag.last_probe_step
        if self._train_fresh:
            keys += [k for k in (self.accuracy.key if self.accuracy else None, Q_HALT_LOSS) if k]
            self._train_fresh = False
        return {k: float(metrics[k]) for k in keys if k in metrics}

    def _nonfinite_counts(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, float]:
        flags = torch.zeros(2, dtype=torch.float32, device=pl_module.device)
        first = torch.full((), math.inf, dtype=torch.float32, device=pl_module.device)
        if self._bad_loss is not None:
            flags[0] = self._bad_loss.float().to(flags.device)
        if self._bad_grad is not None:
            flags[1] = self._bad_grad.float().to(flags.device)
        if self._first_bad is not None:
            first = self._first_bad.float().to(flags.device)
        self._bad_loss = self._bad_grad = self._first_bad = None
        if trainer.world_size > 1:  # every rank, at the same steps
            flags = trainer.strategy.reduce(flags, reduce_op="sum")
            first = -trainer.strategy.reduce(-first, reduce_op="max")  # the earliest over ranks
        loss_ranks, grad_ranks = flags.tolist()
        return {"nonfinite_loss_ranks": loss_ranks, "nonfinite_grad_ranks": grad_ranks,
                "first_nonfinite_step": float(first)}

    def _check(self, trainer: Trainer, pl_module: LightningModule) -> None:
        step = trainer.global_step
        fired: list[Alert] = []
        if self.nonfinite is not None:
            alert = self.nonfinite.update(self._nonfinite_counts(trainer, pl_module), step)
            fired += [alert] if alert else []
        values = self._fresh_values(trainer)
        if step >= self.warmup_steps:
            for rule in (self.collapse, self.drift, self.accuracy, self.q_halt):
                if rule is not None:
                    alert = rule.update(values, step)
                    fired += [alert] if alert else []

        for alert in fired:
            self._report(trainer, alert)
        # the values are global, but agree anyway (float differences, one rank's flags): all ranks, same steps
        stop = trainer.strategy.reduce_boolean_decision(any(a.action in ("stop", "raise") for a in fired), all=False)
        if not stop:
            return
        do_raise = trainer.strategy.reduce_boolean_decision(any(a.action == "raise" for a in fired), all=False)
        if weights_are_finite(pl_module):
            trainer.save_checkpoint(os.path.join(checkpoint_dir(self._log_dir), alert_checkpoint_name(step)))
        else:
            last = next((c for c in trainer.callbacks if isinstance(c, LastCheckpoint)), None)
            where = (f"{last.last_model_path} (step {last.last_finite_step}) is the last finite state"
                     if last is not None and last.last_model_path else "no finite checkpoint was saved")
            rank_zero_warn(f"CollapseAlert: stopping at step {step} with non-finite weights, so no alert "
                           f"checkpoint; {where}")
        if do_raise:
            reasons = "; ".join(a.message for a in fired if a.action == "raise")
            raise CollapseAlertError(reasons or f"CollapseAlert: another rank raised at step {step}")
        trainer.should_stop = True

    def _report(self, trainer: Trainer, alert: Alert) -> None:
        self.alerts.append(alert)
        rank_zero_warn(alert.message)
        if not trainer.is_global_zero:  # writing only below: no collective
            return
        for writer in tensorboard_writers(trainer):
            writer.add_text(f"alerts/{alert.rule}", alert.message, global_step=alert.step)
            writer.flush()
        os.makedirs(self._log_dir, exist_ok=True)
        with open(os.path.join(self._log_dir, ALERTS_FILE), "a") as f:
            f.write(json.dumps(_jsonable(asdict(alert))) + "\n")


def _jsonable(record: dict) -> dict:
    """Non-finite floats as strings, so every line is strict JSON."""
    def fix(v):
        if isinstance(v, dict):
            return {k: fix(x) for k, x in v.items()}
        if isinstance(v, float) and not math.isfinite(v):
            return str(v)
        return v
    return fix(record)
