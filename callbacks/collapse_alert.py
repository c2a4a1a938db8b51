"""CollapseAlert: checks a list of rules (:mod:`callbacks.alert_rules`) over the diagnostics and training metrics,
and warns, stops or raises when one fires.

What the rules read (global values, identical on every rank): the values a :class:`~callbacks.helpers.MetricProducer`
(:class:`~callbacks.EncoderDiagnostics`) published for this step, which the alert asks it to compute first if it has
not yet, so the order of the two in ``trainer.callbacks`` does not matter; the ``train/...`` metrics the module
logged at this step; counts of non-finite losses and gradients since the previous check, which the alert keeps
itself. A value published at an earlier check is not read twice.

Every alert is ``rank_zero_warn``-ed, written to TensorBoard as text under ``alerts/<rule>`` (rank 0) and appended to
``<log_dir>/alerts.jsonl`` (rank 0; fields ``step``, ``rule``, ``action``, ``values``, ``thresholds``,
``patience``, ``message``). ``stop`` and ``raise`` are agreed on every rank with
``trainer.strategy.reduce_boolean_decision`` (so one rank's NaN stops all of them), then every rank saves
``<log_dir>/checkpoints/alert-step<N>.ckpt``; ``stop`` sets ``trainer.should_stop``, ``raise`` raises
:class:`CollapseAlertError` (``trm`` prints it as one line). Under ``fast_dev_run`` (no run directory) alerts are
only warned: nothing is written.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import asdict

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from callbacks.alert_rules import (
    FIRST_NONFINITE_STEP,
    NONFINITE_GRAD_RANKS,
    NONFINITE_LOSS_RANKS,
    STOPPING_ACTIONS,
    Alert,
    AlertRule,
    NonFinite,
    default_rules,
)
from callbacks.dashboard import threshold_tag
from callbacks.helpers import MetricProducer, due, tensorboard_writers
from callbacks.last_checkpoint import LastCheckpoint, weights_are_finite
from trm_lightning.checks import check_at_least
from trm_lightning.errors import ConfigError, TRMError
from trm_lightning.metric_names import ACT_METRIC_KEYS, TRAIN, is_train_metric, split_metric
from trm_lightning.run_files import ALERTS_FILE, alert_checkpoint_name, checkpoint_dir
from trm_lightning.trainer_state import is_logging_step


MODULE_TRAIN_METRICS = frozenset(split_metric(TRAIN, key) for key in ACT_METRIC_KEYS)  # TRMLitModule logs them


class CollapseAlertError(TRMError):
    """Raised by :class:`CollapseAlert` for a rule whose action is ``raise`` (after saving a checkpoint)."""


class CollapseAlert(Callback):
    """Watches the diagnostics and training metrics; warns, stops or raises when a rule fires.

    Its place in ``trainer.callbacks`` does not matter. In YAML::

        - class_path: callbacks.CollapseAlert
          init_args:
            check_every_n_steps: 50
            rules:
              - class_path: RepresentationCollapse
                init_args: {min_normalized_var: 0.01, patience: 3, action: stop}
              - class_path: NonFinite

    Args:
        rules: the rules to check (:mod:`callbacks.alert_rules`), in the order their alerts are reported; None gives
            :func:`~callbacks.alert_rules.default_rules` (NonFinite stops; RepresentationCollapse, ProbeDrift,
            AccuracyCollapse and QHaltRising warn; thresholds in ``docs/diagnostics.md``). A list replaces the
            default list whole: leave a rule out to turn it off.
        check_every_n_steps: optimizer steps between checks; None uses ``trainer.log_every_n_steps``.
        warmup_steps: checks before this optimizer step evaluate only the rules checked during warmup (NonFinite).
    """

    def __init__(
        self,
        rules: list[AlertRule] | None = None,
        check_every_n_steps: int | None = None,
        warmup_steps: int = 0,
    ) -> None:
        check_at_least("CollapseAlert.check_every_n_steps", check_every_n_steps, 1, allow_none=True)
        check_at_least("CollapseAlert.warmup_steps", warmup_steps, 0)
        self._explicit_rules = rules is not None
        rules = default_rules() if rules is None else list(rules)
        if not rules:
            raise ConfigError("CollapseAlert.rules is empty; remove the callback to turn the alerts off")
        self.rules: list[AlertRule] = rules
        self.check_every_n_steps = check_every_n_steps
        self.warmup_steps = warmup_steps
        self.alerts: list[Alert] = []  # every alert of this run (all ranks keep the list)
        self._log_dir: str | None = None
        self._producers: list[MetricProducer] = []
        self._seen: dict[str, int] = {}  # published name -> the step of the value last read
        self._train_fresh = False
        self._bad_loss: Tensor | None = None
        self._bad_grad: Tensor | None = None
        self._first_bad: Tensor | None = None

    @property
    def _nonfinite_rules(self) -> list[NonFinite]:
        return [r for r in self.rules if isinstance(r, NonFinite)]

    @property
    def _metric_keys(self) -> list[str]:
        """The metric names the rules read, each once, in rule order."""
        keys = [k for r in self.rules if not isinstance(r, NonFinite) for k in r.keys]
        return list(dict.fromkeys(keys))

    # --------------------------------------------------------------------------------------- state
    @property
    def state_key(self) -> str:
        """Unique per configuration, so two of these callbacks in one run each keep their own checkpointed state."""
        return self._generate_state_key(rules=tuple(type(r).__name__ for r in self.rules), check_every_n_steps=self.check_every_n_steps, warmup_steps=self.warmup_steps)

    def state_dict(self) -> dict:
        """The rules' memory (streaks, a peak, a previous value): a resumed run fires exactly when the uninterrupted
        one would have."""
        return {"rules": [[type(rule).__name__, rule.state()] for rule in self.rules]}

    def load_state_dict(self, state_dict: dict) -> None:
        saved = state_dict.get("rules", [])
        if [name for name, _ in saved] != [type(rule).__name__ for rule in self.rules]:
            rank_zero_warn("CollapseAlert: the checkpoint's rules differ from this run's; their streaks start afresh")
            return
        for rule, (_, state) in zip(self.rules, saved):
            rule.load_state(state)

    # --------------------------------------------------------------------------------------- setup
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # trainer.log_dir broadcasts under DDP: read it here, on every rank, never under is_global_zero
        log_dir = trainer.log_dir
        self._log_dir = None if trainer.fast_dev_run else (log_dir or trainer.default_root_dir)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._producers = [cb for cb in trainer.callbacks if isinstance(cb, MetricProducer)]
        # what this run produces: the producers' names and the ACT metrics the module logs as train/<key>
        fed = {name for p in self._producers for name in p.publishes} | MODULE_TRAIN_METRICS
        unfed = [rule for rule in self.rules if not isinstance(rule, NonFinite) and rule.keys[0] not in fed]
        if self._explicit_rules:  # rules the user listed: say each one that will never fire
            for rule in unfed:
                rank_zero_warn(f"CollapseAlert: no callback in trainer.callbacks publishes {', '.join(rule.keys)}; "
                               f"the {rule.name} rule reads them only if something else logs them")
        elif unfed:
            rank_zero_info("CollapseAlert: default rules without a callback that feeds them (they stay silent): "
                           + ", ".join(dict.fromkeys(rule.name for rule in unfed)))
        self._seen = {}
        self._train_fresh = False
        self._bad_loss = self._bad_grad = self._first_bad = None

    def _flag(self, bad: Tensor, step: int) -> None:
        """Remember the first step with a non-finite value, on the device (no host sync)."""
        at = torch.where(bad, float(step), math.inf)
        self._first_bad = at if self._first_bad is None else torch.minimum(self._first_bad, at)

    # --------------------------------------------------------------------------------------- hooks
    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer) -> None:
        if not any(r.check_gradients for r in self._nonfinite_rules) or str(trainer.precision).startswith("16"):
            return
        grads = [p.grad.detach() for p in pl_module.parameters() if p.grad is not None]
        if grads:
            bad = ~torch.isfinite(torch.nn.utils.get_total_norm(grads, norm_type=2.0))
            self._bad_grad = bad if self._bad_grad is None else self._bad_grad | bad
            self._flag(bad, trainer.global_step + 1)  # the step this optimizer update completes

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if self._nonfinite_rules and isinstance(loss, Tensor):
            bad = ~torch.isfinite(loss.detach()).all()  # no sync: read at the next check
            self._bad_loss = bad if self._bad_loss is None else self._bad_loss | bad
            self._flag(bad, trainer.global_step)
        if is_logging_step(trainer):  # the module logged train/* at this step
            self._train_fresh = True
        every = self.check_every_n_steps or max(int(trainer.log_every_n_steps), 1)
        if due(trainer, every):
            for producer in self._producers:  # this step's values, if the producer has not run yet
                producer.produce(trainer, pl_module, outputs)
            self._check(trainer, pl_module)

    # --------------------------------------------------------------------------------------- check
    def _fresh_values(self, trainer: Trainer) -> dict[str, float]:
        """The values the rules read at this check: each published value once (the first check after the step it
        belongs to), ``train/...`` when the module logged since the previous check, anything else as logged."""
        published: dict[str, tuple[int, Tensor]] = {}
        declared: set[str] = set()
        for producer in self._producers:
            published.update(producer.published)
            declared.update(producer.publishes)
        metrics = trainer.callback_metrics
        train_fresh, self._train_fresh = self._train_fresh, False
        values: dict[str, float] = {}
        for key in self._metric_keys:
            if key in declared:
                if key in published and published[key][0] > self._seen.get(key, -1):
                    step, value = published[key]
                    values[key] = float(value)
                    self._seen[key] = step
            elif is_train_metric(key):
                if train_fresh and key in metrics:
                    values[key] = float(metrics[key])
            elif key in metrics:  # logged by something that does not publish
                values[key] = float(metrics[key])
        return values

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
        return {NONFINITE_LOSS_RANKS: loss_ranks, NONFINITE_GRAD_RANKS: grad_ranks, FIRST_NONFINITE_STEP: float(first)}

    def _check(self, trainer: Trainer, pl_module: LightningModule) -> None:
        step = trainer.global_step
        counts = self._nonfinite_counts(trainer, pl_module) if self._nonfinite_rules else {}
        values = {**self._fresh_values(trainer), **counts}
        fired: list[Alert] = []
        for rule in self.rules:
            if rule.checked_during_warmup or step >= self.warmup_steps:
                alert = rule.update(values, step)
                fired += [alert] if alert else []

        for alert in fired:
            self._report(trainer, alert)
        self._draw_thresholds(trainer, step)
        # the values are global, but agree anyway (float differences, one rank's flags): all ranks, same steps
        stop = trainer.strategy.reduce_boolean_decision(any(a.action in STOPPING_ACTIONS for a in fired), all=False)
        if not stop:
            return
        do_raise = trainer.strategy.reduce_boolean_decision(any(a.action == "raise" for a in fired), all=False)
        if self._log_dir is None:
            rank_zero_warn(f"CollapseAlert: stopping at step {step} under fast_dev_run: no alert checkpoint")
        elif weights_are_finite(pl_module):
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

    def _draw_thresholds(self, trainer: Trainer, step: int) -> None:
        """Each rule's fixed lines as ``thresholds/<metric>`` scalars (rank 0), beside the metric on the dashboard."""
        if not trainer.is_global_zero:
            return
        writers = tensorboard_writers(trainer)
        for rule in self.rules:
            for metric, limit in rule.limits().items():
                for writer in writers:
                    writer.add_scalar(threshold_tag(metric), limit, global_step=step)

    def _report(self, trainer: Trainer, alert: Alert) -> None:
        self.alerts.append(alert)
        rank_zero_warn(alert.message)
        if not trainer.is_global_zero:  # writing only below: no collective
            return
        for writer in tensorboard_writers(trainer):
            writer.add_text(f"alerts/{alert.rule}", alert.message, global_step=alert.step)
            writer.flush()
        if self._log_dir is None:  # fast_dev_run: no run directory to write into
            return
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
