"""The rules :class:`callbacks.CollapseAlert` checks: one small class per known failure of encoder-TRM training.

Each rule has its thresholds, a ``patience`` (consecutive checks) and an ``action`` (``warn``, ``stop`` or
``raise``), all typed ``__init__`` arguments, so a YAML list selects and tunes them by ``class_path`` (a short
name such as ``RepresentationCollapse`` resolves) and ``trm fit --help`` documents them. What each reads:

- :class:`RepresentationCollapse` (record name ``representation_collapse``): ``diagnostics/encoder_normalized_var``
  below ``min_normalized_var``, or ``diagnostics/encoder_cross_task_cosine`` above ``max_cross_task_cosine``, while
  the probe tasks are no longer told apart (``probe_retrieval_acc`` at most ``max_probe_retrieval``);
- :class:`ProbeDrift` (``drift``): a jump, ``diagnostics/probe_drift_cosine`` (since the previous probe check)
  above ``max_probe_drift_cosine`` (or ``probe_drift_rel_l2`` above ``max_probe_drift_rel_l2``) and above
  ``jump_ratio`` x the median of the previous ``history`` checks' drift; patience 1;
- :class:`CumulativeDrift` (``cumulative_drift``): ``diagnostics/probe_window_drift_cosine`` (since
  ``drift_window`` probe checks ago) above ``max_window_drift_cosine``: a slow drift;
- :class:`OutputMeanShift` (``output_mean_shift``): ``|encoder_output_mean|`` as a fraction of the values' RMS above
  ``max_mean_fraction``;
- :class:`AccuracyCollapse` (``accuracy_collapse``): ``train/accuracy`` below ``(1 - drop) x`` its running peak,
  once the peak has reached ``min_peak`` (the seed's E0 failure: 0.7 down to 0);
- :class:`QHaltRising` (``q_halt_rising``): ``train/q_halt_loss`` higher than at the previous check, ``patience``
  checks in a row (each rise by more than ``min_rise`` relative);
- :class:`IgnoredEncoder` (``ignored_encoder``): shuffling the contexts across tasks costs less than ``min_drop``
  cell accuracy (ContextReliance, at validations or during training), ``patience`` checks in a row, while the
  training accuracy rises: the TRM memorises tasks from the query alone;
- :class:`NonFinite` (``nonfinite``): a non-finite training loss or gradient on any rank since the previous check
  (CollapseAlert counts them every step). Patience 1; the only rule checked during ``warmup_steps``.

A rule fires when its condition has held for ``patience`` consecutive checks in which its inputs were fresh, then
again only after the condition has cleared. :func:`default_rules` is the list CollapseAlert uses without one.

A new rule is a subclass of :class:`AlertRule` with ``name``, ``keys`` (the metric names it reads),
:meth:`~AlertRule.thresholds`, :meth:`~AlertRule.condition` and :meth:`~AlertRule.describe`.
"""

from __future__ import annotations

import math
import statistics
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from trm_lightning import metric_names as names
from trm_lightning.checks import check_at_least, check_range
from trm_lightning.errors import ConfigError

Action = Literal["warn", "stop", "raise"]
ACTIONS = ("warn", "stop", "raise")
STOPPING_ACTIONS = ("stop", "raise")  # save a checkpoint and end the fit

# the values CollapseAlert gives NonFinite at each check (also the ``values`` of its alert record)
NONFINITE_LOSS_RANKS = "nonfinite_loss_ranks"
NONFINITE_GRAD_RANKS = "nonfinite_grad_ranks"
FIRST_NONFINITE_STEP = "first_nonfinite_step"


@dataclass
class Alert:
    """One firing of a rule (a line of ``alerts.jsonl``)."""

    step: int
    rule: str
    action: str
    values: dict[str, float]
    thresholds: dict[str, float | None]
    patience: int
    message: str = field(default="")


class AlertRule(ABC):
    """A condition checked on fresh values; fires after ``patience`` consecutive true checks.

    Subclasses set ``name`` (the record's ``rule``) and ``keys`` (the names they read) and define
    :meth:`thresholds`, :meth:`condition` and :meth:`describe`. :meth:`update` returns an :class:`Alert` when the
    rule fires, else None; checks where none of ``keys`` is present are skipped (they neither extend nor break a
    streak).

    Args:
        patience: consecutive checks the condition must hold before the rule fires.
        action: ``warn`` reports; ``stop`` also saves a checkpoint and ends the fit; ``raise`` saves one and aborts.
    """

    name = "rule"
    keys: tuple[str, ...] = ()
    #: checked at every check, also before CollapseAlert's ``warmup_steps``
    checked_during_warmup = False
    #: what the rule remembers between checks (saved in checkpoints, so a resumed run continues its streaks)
    state_attributes: tuple[str, ...] = ("streak",)

    def __init__(self, patience: int = 1, action: Action = "warn") -> None:
        check_at_least(f"{type(self).__name__}.patience", patience, 1)
        if action not in ACTIONS:
            raise ConfigError(f"{type(self).__name__}.action must be one of {ACTIONS}, got {action!r}")
        self.patience = patience
        self.action = action
        self.streak = 0

    def state(self) -> dict[str, float | int | None]:
        return {name: getattr(self, name) for name in self.state_attributes}

    def load_state(self, state: Mapping[str, float | int | None]) -> None:
        for name in self.state_attributes:
            if name in state:
                setattr(self, name, state[name])

    def limits(self) -> dict[str, float]:
        """``{metric: limit}`` for each metric this rule compares with a fixed line (the dashboard draws it)."""
        return {}

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

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.thresholds()}, patience={self.patience}, action={self.action!r})"


def _over(values: Mapping[str, float], key: str, limit: float | None) -> bool:
    return limit is not None and key in values and values[key] > limit


def _under(values: Mapping[str, float], key: str, limit: float | None) -> bool:
    return limit is not None and key in values and values[key] < limit


class RepresentationCollapse(AlertRule):
    """The encoder says the same thing for every task: low normalised variance or high cross-task cosine, while
    the probe tasks are no longer told apart (retrieval at most ``max_probe_retrieval``).

    The retrieval condition separates collapse from a common offset: adding the same vector to every context also
    lowers the normalised variance and raises the cosine, but every task still finds its own other view.

    Args:
        min_normalized_var: fires below this ``diagnostics/encoder_normalized_var`` (None: not tested).
        max_cross_task_cosine: fires above this ``diagnostics/encoder_cross_task_cosine`` (None: not tested).
        max_probe_retrieval: and only while the latest ``diagnostics/probe_retrieval_acc`` is at most this (None, or
            no probe: not required).
        patience: consecutive batch-statistics checks before it fires.
        action: warn, stop or raise.
    """

    name = "representation_collapse"
    keys = (names.ENCODER_NORMALIZED_VAR, names.ENCODER_CROSS_TASK_COSINE, names.PROBE_RETRIEVAL_ACC)
    state_attributes = ("streak", "retrieval")

    def update(self, values, step: int = 0):
        if names.PROBE_RETRIEVAL_ACC in values:
            self.retrieval = float(values[names.PROBE_RETRIEVAL_ACC])
        batch = {k: values[k] for k in self.keys[:2] if k in values}
        return super().update(batch, step) if batch else None  # a probe-only check neither extends nor breaks it

    def __init__(self, min_normalized_var: float | None = 0.01, max_cross_task_cosine: float | None = 0.99,
                 max_probe_retrieval: float | None = 0.5, patience: int = 3, action: Action = "warn") -> None:
        super().__init__(patience, action)
        if min_normalized_var is None and max_cross_task_cosine is None:
            raise ConfigError(f"{type(self).__name__}: both thresholds are None; leave the rule out of the list instead")
        check_at_least(f"{type(self).__name__}.min_normalized_var", min_normalized_var, 0, allow_none=True)
        check_range(f"{type(self).__name__}.max_cross_task_cosine", max_cross_task_cosine, -1.0, 1.0, allow_none=True)
        check_range(f"{type(self).__name__}.max_probe_retrieval", max_probe_retrieval, 0.0, 1.0, allow_none=True)
        self.min_normalized_var = min_normalized_var
        self.max_cross_task_cosine = max_cross_task_cosine
        self.max_probe_retrieval = max_probe_retrieval
        self.retrieval: float | None = None

    def thresholds(self):
        return {"min_normalized_var": self.min_normalized_var, "max_cross_task_cosine": self.max_cross_task_cosine,
                "max_probe_retrieval": self.max_probe_retrieval}

    def limits(self):
        lines = {names.ENCODER_NORMALIZED_VAR: self.min_normalized_var,
                 names.ENCODER_CROSS_TASK_COSINE: self.max_cross_task_cosine,
                 names.PROBE_RETRIEVAL_ACC: self.max_probe_retrieval}
        return {k: v for k, v in lines.items() if v is not None}

    def condition(self, values) -> bool:
        told_apart = (self.max_probe_retrieval is not None and self.retrieval is not None
                      and self.retrieval > self.max_probe_retrieval)
        return not told_apart and (_under(values, names.ENCODER_NORMALIZED_VAR, self.min_normalized_var)
                                   or _over(values, names.ENCODER_CROSS_TASK_COSINE, self.max_cross_task_cosine))

    def describe(self, values) -> str:
        parts = []
        if _under(values, names.ENCODER_NORMALIZED_VAR, self.min_normalized_var):
            parts.append(f"encoder_normalized_var={values[names.ENCODER_NORMALIZED_VAR]:.4g} "
                         f"< {self.min_normalized_var}")
        if _over(values, names.ENCODER_CROSS_TASK_COSINE, self.max_cross_task_cosine):
            parts.append(f"encoder_cross_task_cosine={values[names.ENCODER_CROSS_TASK_COSINE]:.4f} "
                         f"> {self.max_cross_task_cosine}")
        return " and ".join(parts) + " (the encoder says the same thing for every task)"


class ProbeDrift(AlertRule):
    """The probe tasks' encodings jumped since the previous probe check: the drift is above an absolute limit *and*
    ``jump_ratio`` times the median of the previous ``history`` probe checks' drift (patience 1 by default: a single
    jump fires). Relative to the run's own recent drift because the healthy per-check drift depends on the learning
    rate and the probe interval (the first checks of a run at lr 1e-3 move by 0.3-0.6, a settled one by 0.01-0.1),
    so no absolute line separates a jump from learning. A slow drift never fires here: see :class:`CumulativeDrift`.

    Args:
        max_probe_drift_cosine: the absolute limit on ``diagnostics/probe_drift_cosine`` (mean 1 - cos to the
            previous probe check; None: not tested).
        max_probe_drift_rel_l2: the absolute limit on ``diagnostics/probe_drift_rel_l2`` (None: not tested).
        jump_ratio: a drift must also exceed this multiple of the median of the previous ``history`` drifts (it
            needs two earlier checks); None: the absolute limit alone.
        history: how many previous probe checks the median is taken over.
        patience: consecutive probe checks before it fires.
        action: warn, stop or raise.
    """

    name = "drift"
    keys = (names.PROBE_DRIFT_COSINE, names.PROBE_DRIFT_REL_L2)
    state_attributes = ("streak", "recent")

    def __init__(self, max_probe_drift_cosine: float | None = 0.2, max_probe_drift_rel_l2: float | None = None,
                 jump_ratio: float | None = 3.0, history: int = 5, patience: int = 1, action: Action = "warn") -> None:
        super().__init__(patience, action)
        if max_probe_drift_cosine is None and max_probe_drift_rel_l2 is None:
            raise ConfigError(f"{type(self).__name__}: both thresholds are None; leave the rule out of the list instead")
        check_range(f"{type(self).__name__}.max_probe_drift_cosine", max_probe_drift_cosine, 0.0, 2.0, allow_none=True)
        check_at_least(f"{type(self).__name__}.max_probe_drift_rel_l2", max_probe_drift_rel_l2, 0, allow_none=True)
        check_at_least(f"{type(self).__name__}.jump_ratio", jump_ratio, 1, allow_none=True)
        check_at_least(f"{type(self).__name__}.history", history, 2)
        self.max_probe_drift_cosine = max_probe_drift_cosine
        self.max_probe_drift_rel_l2 = max_probe_drift_rel_l2
        self.jump_ratio, self.history = jump_ratio, history
        self.recent: dict[str, list[float]] = {key: [] for key in self.keys}  # the previous drifts, newest last

    def _limits(self) -> tuple[tuple[str, float | None], ...]:
        return ((names.PROBE_DRIFT_COSINE, self.max_probe_drift_cosine),
                (names.PROBE_DRIFT_REL_L2, self.max_probe_drift_rel_l2))

    def thresholds(self):
        return {"max_probe_drift_cosine": self.max_probe_drift_cosine,
                "max_probe_drift_rel_l2": self.max_probe_drift_rel_l2, "jump_ratio": self.jump_ratio}

    def limits(self):
        return {k: v for k, v in self._limits() if v is not None}

    def _jumped(self, values, key: str, limit: float | None) -> bool:
        if not _over(values, key, limit):
            return False
        if self.jump_ratio is None:
            return True
        previous = self.recent.get(key, [])
        return len(previous) >= 2 and values[key] > self.jump_ratio * statistics.median(previous)

    def condition(self, values) -> bool:
        return any(self._jumped(values, key, limit) for key, limit in self._limits())

    def update(self, values, step: int = 0):
        alert = super().update(values, step)
        for key in self.keys:
            if key in values and math.isfinite(float(values[key])):
                self.recent[key] = (self.recent.get(key, []) + [float(values[key])])[-self.history:]
        return alert

    def describe(self, values) -> str:
        parts = []
        for key, limit in self._limits():
            if self._jumped(values, key, limit):
                typical = (f", {values[key] / statistics.median(self.recent[key]):.1f}x the median of the previous "
                           f"{len(self.recent[key])}" if self.jump_ratio is not None else "")
                parts.append(f"{key.split('/')[-1]}={values[key]:.4g} > {limit}{typical}")
        return " and ".join(parts) + " (the probe tasks' encodings jumped: the TRM sees a shifted input)"


class CumulativeDrift(AlertRule):
    """The probe tasks' encodings moved far from where they were ``drift_window`` probe checks ago, however slowly,
    **and the move hurts**: the TRM reads the stale context of ``stale_lag`` checks ago better than today's (the
    seed's "distribution shift, not collapse", which one-check drift cannot see).

    A learning encoder drifts far too: in the stable run of docs/diagnostics.md the window drift climbs past 0.3
    by step 200 and keeps climbing while accuracy rises, so the drift alone fired in every run. When the
    keeping-up loss is logged (``EncoderDiagnostics(keeping_up=True)``, the default), the rule also asks
    ``diagnostics/probe_stale_context_gap`` (stale minus today's loss) to be below ``max_stale_context_gap``;
    without it (or with that argument null) the drift alone decides.

    Args:
        max_window_drift_cosine: fires above this ``diagnostics/probe_window_drift_cosine``.
        max_stale_context_gap: ... while the stale-context gap is below this (negative: the old context serves
            the TRM better than today's); null: the drift alone.
        patience: consecutive probe checks before it fires (2: the gap of 16 probe tasks is noisy, +-0.06 in the
            stable run).
        action: warn, stop or raise.
    """

    name = "cumulative_drift"
    keys = (names.PROBE_WINDOW_DRIFT_COSINE, names.PROBE_STALE_CONTEXT_GAP)

    def __init__(self, max_window_drift_cosine: float = 0.3, max_stale_context_gap: float | None = -0.05,
                 patience: int = 2, action: Action = "warn") -> None:
        super().__init__(patience, action)
        check_range(f"{type(self).__name__}.max_window_drift_cosine", max_window_drift_cosine, 0.0, 2.0)
        check_range(f"{type(self).__name__}.max_stale_context_gap", max_stale_context_gap, -10.0, 10.0,
                    allow_none=True)
        self.max_window_drift_cosine = max_window_drift_cosine
        self.max_stale_context_gap = max_stale_context_gap

    def thresholds(self):
        return {"max_window_drift_cosine": self.max_window_drift_cosine,
                "max_stale_context_gap": self.max_stale_context_gap}

    def limits(self):
        lines = {self.keys[0]: self.max_window_drift_cosine, self.keys[1]: self.max_stale_context_gap}
        return {k: v for k, v in lines.items() if v is not None}

    def _hurts(self, values) -> bool:
        return self.max_stale_context_gap is None or self.keys[1] not in values or \
            values[self.keys[1]] < self.max_stale_context_gap

    def condition(self, values) -> bool:
        return _over(values, self.keys[0], self.max_window_drift_cosine) and self._hurts(values)

    def describe(self, values) -> str:
        gap = (f" and probe_stale_context_gap={values[self.keys[1]]:.4g} < {self.max_stale_context_gap}"
               if self.max_stale_context_gap is not None and self.keys[1] in values else "")
        return (f"probe_window_drift_cosine={values[self.keys[0]]:.4g} > {self.max_window_drift_cosine}{gap} (the "
                "probe tasks' encodings drifted away from where the TRM learned them, and the TRM reads the old ones better)")


class OutputMeanShift(AlertRule):
    """The context's values moved off zero as a whole: ``|encoder_output_mean|`` as a fraction of their RMS
    (``sqrt(mean^2 + std^2)``, so any scale of the context reads the same) above a limit.

    Args:
        max_mean_fraction: fires above this fraction (0: centred; 1: every value equal and non-zero).
        patience: consecutive batch-statistics checks before it fires.
        action: warn, stop or raise.
    """

    name = "output_mean_shift"
    keys = (names.ENCODER_OUTPUT_MEAN, names.ENCODER_OUTPUT_STD)

    def __init__(self, max_mean_fraction: float = 0.5, patience: int = 3, action: Action = "warn") -> None:
        super().__init__(patience, action)
        check_range(f"{type(self).__name__}.max_mean_fraction", max_mean_fraction, 0.0, 1.0)
        self.max_mean_fraction = max_mean_fraction

    def thresholds(self):
        return {"max_mean_fraction": self.max_mean_fraction}

    @staticmethod
    def fraction(values) -> float | None:
        mean, std = values.get(names.ENCODER_OUTPUT_MEAN), values.get(names.ENCODER_OUTPUT_STD)
        if mean is None or std is None:
            return None
        rms = math.sqrt(mean * mean + std * std)
        return abs(mean) / rms if rms > 0 else 0.0

    def condition(self, values) -> bool:
        fraction = self.fraction(values)
        return fraction is not None and fraction > self.max_mean_fraction

    def describe(self, values) -> str:
        return (f"|encoder_output_mean| / RMS = {self.fraction(values):.3f} > {self.max_mean_fraction} (the context "
                "moved off zero as a whole)")


class IgnoredEncoder(AlertRule):
    """The TRM does not read the encoder: shuffling the contexts across tasks costs (almost) nothing, check after
    check, while the TRM learns (its training accuracy has reached ``min_train_accuracy``). A TRM that learns
    without reading its demos memorises the tasks from the query alone (the meta-learning shortcut).

    Args:
        key: the accuracy drop it reads: ``val/reliance_drop_shuffled_cell`` (ContextReliance, at each validation)
            or ``train/reliance_drop_shuffled_cell`` (ContextReliance's ``train_every_n_steps`` signal).
        min_drop: the drop (real minus shuffled-context cell accuracy) below which the encoder counts as ignored.
        min_train_accuracy: armed once ``train/accuracy``'s running peak reached this (log steps where no row
            halted, ``train/count`` 0, do not count): a TRM that learns nothing is not memorising.
        patience: consecutive checks of ``key`` below ``min_drop`` (once armed) before it fires.
        action: warn, stop or raise.
    """

    name = "ignored_encoder"
    state_attributes = ("streak", "peak")

    def __init__(self, key: str = names.VAL_RELIANCE_DROP_SHUFFLED_CELL, min_drop: float = 0.02,
                 min_train_accuracy: float = 0.2, patience: int = 3, action: Action = "warn") -> None:
        super().__init__(patience, action)
        check_range(f"{type(self).__name__}.min_train_accuracy", min_train_accuracy, 0.0, 1.0)
        self.key, self.min_drop, self.min_train_accuracy = key, min_drop, min_train_accuracy
        self.keys = (key, names.TRAIN_ACCURACY, names.TRAIN_COUNT)
        self.peak: float | None = None

    def thresholds(self):
        return {"min_drop": self.min_drop, "min_train_accuracy": self.min_train_accuracy, "peak": self.peak}

    def limits(self):
        return {self.key: self.min_drop}

    def update(self, values, step: int = 0):
        measured = values.get(names.TRAIN_COUNT, 1.0) > 0  # some row halted since the last log
        accuracy = values.get(names.TRAIN_ACCURACY)
        if accuracy is not None and measured and math.isfinite(accuracy):
            self.peak = accuracy if self.peak is None else max(self.peak, float(accuracy))
        if self.key not in values:  # a check without a new drop neither extends nor breaks the streak
            return None
        return super().update({self.key: values[self.key]}, step)

    def condition(self, values) -> bool:
        armed = self.peak is not None and self.peak >= self.min_train_accuracy
        return armed and values[self.key] < self.min_drop

    def describe(self, values) -> str:
        return (f"{self.key}={values[self.key]:.4f} < {self.min_drop} while the train accuracy reached "
                f"{self.peak:.3f} (the TRM answers without reading its demos)")


class AccuracyCollapse(AlertRule):
    """The training accuracy falls below ``(1 - drop) x`` its running peak, once the peak reached ``min_peak``.

    Args:
        drop: the fraction of the peak lost before it counts, in (0, 1).
        min_peak: the rule is armed once the peak reaches this.
        patience: consecutive checks below the floor before it fires.
        action: warn, stop or raise.
        key: the accuracy it follows (a ``train/`` metric the module logs).
    """

    name = "accuracy_collapse"

    state_attributes = ("streak", "peak")

    def __init__(self, drop: float = 0.5, min_peak: float = 0.2, patience: int = 3, action: Action = "warn",
                 key: str = names.TRAIN_ACCURACY) -> None:
        super().__init__(patience, action)
        check_range(f"{type(self).__name__}.drop", drop, 0.0, 1.0, low_open=True, high_open=True)
        check_range(f"{type(self).__name__}.min_peak", min_peak, 0.0, 1.0)
        self.drop = drop
        self.min_peak = min_peak
        self.key = key
        self.keys = (key,)
        self.peak = -math.inf

    def thresholds(self):
        return {"drop": self.drop, "min_peak": self.min_peak, "peak": self.peak,
                "floor": (1 - self.drop) * self.peak}

    def limits(self):  # the floor moves with the peak; drawn once the rule is armed
        return {self.key: (1 - self.drop) * self.peak} if self.peak >= self.min_peak else {}

    def condition(self, values) -> bool:
        value = values[self.key]
        if math.isfinite(value):
            self.peak = max(self.peak, value)
        return self.peak >= self.min_peak and value < (1 - self.drop) * self.peak

    def describe(self, values) -> str:
        return (f"{self.key}={values[self.key]:.4f} < (1 - {self.drop}) x peak {self.peak:.4f} "
                f"(training accuracy collapsed)")


class QHaltRising(AlertRule):
    """The halting loss rose at each of the last ``patience`` checks: the halting head is losing calibration.

    A weak detector on small, noisy batches (a slow rise under noise rarely rises at every check), so it only warns
    by default.

    Args:
        patience: consecutive rising checks before it fires.
        min_rise: a check counts as rising when the loss grew by more than this fraction.
        action: warn, stop or raise.
        key: the loss it follows (a ``train/`` metric the module logs).
    """

    name = "q_halt_rising"

    state_attributes = ("streak", "previous")

    def __init__(self, patience: int = 8, min_rise: float = 0.0, action: Action = "warn",
                 key: str = names.TRAIN_Q_HALT_LOSS) -> None:
        super().__init__(patience, action)
        check_at_least(f"{type(self).__name__}.min_rise", min_rise, 0)
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


class NonFinite(AlertRule):
    """A non-finite loss or gradient on any rank since the previous check (its values: counts of ranks).

    CollapseAlert tests ``outputs["loss"]`` (per rank) at every step and, with ``check_gradients``, the gradients
    before clipping; the counts are summed over ranks at each check. Patience 1, checked during warmup too.

    Args:
        action: warn, stop or raise.
        check_gradients: also test the gradients at every step (skipped under 16-mixed precision, whose GradScaler
            skips such steps by design).
    """

    name = "nonfinite"
    keys = (NONFINITE_LOSS_RANKS, NONFINITE_GRAD_RANKS, FIRST_NONFINITE_STEP)
    checked_during_warmup = True

    def __init__(self, action: Action = "stop", check_gradients: bool = True) -> None:
        super().__init__(1, action)
        self.check_gradients = check_gradients

    def thresholds(self):
        return {"max_nonfinite_ranks": 0}

    def condition(self, values) -> bool:
        return values.get(NONFINITE_LOSS_RANKS, 0) > 0 or values.get(NONFINITE_GRAD_RANKS, 0) > 0

    def describe(self, values) -> str:
        first = values.get(FIRST_NONFINITE_STEP, math.inf)
        where = f", first at step {int(first)}" if math.isfinite(first) else ""
        return (f"non-finite loss on {int(values.get(NONFINITE_LOSS_RANKS, 0))} rank(s), "
                f"non-finite gradients on {int(values.get(NONFINITE_GRAD_RANKS, 0))} rank(s){where}")


def default_rules() -> list[AlertRule]:
    """What CollapseAlert checks without a ``rules`` list, in this order (thresholds from measured runs,
    ``docs/diagnostics.md``): :class:`NonFinite` (stop), :class:`RepresentationCollapse`, :class:`ProbeDrift` (a jump),
    :class:`CumulativeDrift`, :class:`OutputMeanShift`, :class:`AccuracyCollapse`, :class:`QHaltRising` and
    :class:`IgnoredEncoder` on the validation and on the training-time reliance; all but NonFinite only warn."""
    return [NonFinite(), RepresentationCollapse(), ProbeDrift(), CumulativeDrift(), OutputMeanShift(),
            AccuracyCollapse(), QHaltRising(), IgnoredEncoder(),
            IgnoredEncoder(key=names.TRAIN_RELIANCE_DROP_SHUFFLED_CELL, patience=5)]
