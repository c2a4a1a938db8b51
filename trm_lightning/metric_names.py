"""The names of logged metrics that more than one file uses, each written once.

Producers log under these names, :class:`callbacks.CollapseAlert` and ``trm report`` read them; all of them import
the names from here. They are public (TensorBoard dashboards, ``docs/diagnostics.md``, old runs the report reads),
so renaming one is a breaking change; ``tests/unit/test_metric_names.py`` lists them.

- ``<split>/<key>``: :class:`~trm_lightning.module.TRMLitModule` logs the keys of
  :meth:`trm_lightning.metrics.ACTMetrics.compute` under each split (``train``, ``val``, ``val_seen``, ``test``):
  :func:`split_metric`;
- ``ARC/pass@<k>``: the ARC voting evaluator's results after ``trm test``: :func:`pass_at`;
- ``lr/<param group>``: ``LearningRateMonitor`` names each series after the scheduler (:data:`LR`) and the group;
- ``diagnostics/...``: :class:`callbacks.EncoderDiagnostics` (definitions in ``docs/diagnostics.md``).

The gradient-norm (``grad/...``, ``update_ratio/...``), context-reliance (``val/..._context``, ``val/reliance_...``)
and overfit-gate (``overfit/...``) names are read by no other source file, so they stay in their callbacks.
"""

from __future__ import annotations

# ------------------------------------------------------------------ ACT metrics (keys of ACTMetrics.compute())
ACCURACY = "accuracy"  # mean per-row fraction of supervised cells right
EXACT_ACCURACY = "exact_accuracy"  # fraction of rows whose whole grid is right
Q_HALT_ACCURACY = "q_halt_accuracy"  # fraction of rows where (q_halt >= 0) == exact
STEPS = "steps"  # mean ACT steps of the counted rows
LM_LOSS = "lm_loss"
Q_HALT_LOSS = "q_halt_loss"
COUNT = "count"  # rows counted; 0 at a training log step means no row halted (no accuracy was measured)
ACT_METRIC_KEYS = (ACCURACY, EXACT_ACCURACY, Q_HALT_ACCURACY, STEPS, LM_LOSS, Q_HALT_LOSS, COUNT)

# ------------------------------------------------------------------ splits (the part before the slash)
TRAIN = "train"
VAL = "val"  # held-out tasks (generalisation)
VAL_SEEN = "val_seen"  # training tasks under augmentations training never draws (memorisation)
TEST = "test"
VAL_VIEWS = (VAL, VAL_SEEN)  # the validation dataloaders, in order


def split_metric(split: str, key: str) -> str:
    """``train/accuracy`` from ``("train", "accuracy")``: the name a split's ACT metric is logged under."""
    return f"{split}/{key}"


TRAIN_ACCURACY = split_metric(TRAIN, ACCURACY)
TRAIN_EXACT_ACCURACY = split_metric(TRAIN, EXACT_ACCURACY)
TRAIN_Q_HALT_LOSS = split_metric(TRAIN, Q_HALT_LOSS)
TRAIN_COUNT = split_metric(TRAIN, COUNT)
TRAIN_CONTRASTIVE_LOSS = split_metric(TRAIN, "contrastive_loss")  # model.context_contrastive_weight > 0 only
VAL_ACCURACY = split_metric(VAL, ACCURACY)
VAL_EXACT_ACCURACY = split_metric(VAL, EXACT_ACCURACY)  # what the best-validation checkpoint monitors
VAL_Q_HALT_LOSS = split_metric(VAL, Q_HALT_LOSS)


def is_train_metric(name: str) -> bool:
    """True for the names the LightningModule logs during training (``train/...``, at every logging step)."""
    return name.startswith(split_metric(TRAIN, ""))


# ------------------------------------------------------------------ ARC evaluation
ARC_PASS_PREFIX = "ARC/pass@"


def pass_at(k: int, adaptation: str | None = None) -> str:
    """``ARC/pass@2``: the percentage of evaluated tasks solved within ``k`` attempts; ``ARC/pass@2_context`` with
    test-time adaptation ``context`` (``trm_lightning.adaptation``)."""
    return f"{ARC_PASS_PREFIX}{k}" + (f"_{adaptation}" if adaptation else "")


# ------------------------------------------------------------------ learning rates
LR = "lr"  # the scheduler's name: LearningRateMonitor logs ``lr/<param group name>``
LR_PREFIX = f"{LR}/"

# ------------------------------------------------------------------ encoder diagnostics (EncoderDiagnostics)
DIAGNOSTICS_PREFIX = "diagnostics/"
# the seed's three (scale-dependent)
ENCODER_CROSS_SAMPLE_VAR = DIAGNOSTICS_PREFIX + "encoder_cross_sample_var"
ENCODER_OUTPUT_MEAN = DIAGNOSTICS_PREFIX + "encoder_output_mean"
ENCODER_OUTPUT_STD = DIAGNOSTICS_PREFIX + "encoder_output_std"
# scale-invariant batch statistics
ENCODER_NORMALIZED_VAR = DIAGNOSTICS_PREFIX + "encoder_normalized_var"
ENCODER_L2N_STD = DIAGNOSTICS_PREFIX + "encoder_l2n_std"
ENCODER_CROSS_TASK_COSINE = DIAGNOSTICS_PREFIX + "encoder_cross_task_cosine"  # absent when the batch holds one task
ENCODER_EFFECTIVE_RANK = DIAGNOSTICS_PREFIX + "encoder_effective_rank"
# the probe set: task specificity, then drift since the previous probe check (from the second check on)
PROBE_SAME_TASK_COSINE = DIAGNOSTICS_PREFIX + "probe_same_task_cosine"
PROBE_DIFF_TASK_COSINE = DIAGNOSTICS_PREFIX + "probe_diff_task_cosine"
PROBE_RETRIEVAL_ACC = DIAGNOSTICS_PREFIX + "probe_retrieval_acc"
PROBE_DRIFT_COSINE = DIAGNOSTICS_PREFIX + "probe_drift_cosine"
PROBE_DRIFT_REL_L2 = DIAGNOSTICS_PREFIX + "probe_drift_rel_l2"
# drift against the probe encoding `drift_window` checks ago (cumulative drift, which one-check drift misses)
PROBE_WINDOW_DRIFT_COSINE = DIAGNOSTICS_PREFIX + "probe_window_drift_cosine"
# is the TRM keeping up with the encoder? its loss on the probe queries with today's context, with the context of
# `stale_lag` checks ago, and their difference (stale - today; below 0: the TRM still reads the old encodings better)
PROBE_CONTEXT_LOSS = DIAGNOSTICS_PREFIX + "probe_context_loss"
PROBE_STALE_CONTEXT_LOSS = DIAGNOSTICS_PREFIX + "probe_stale_context_loss"
PROBE_STALE_CONTEXT_GAP = DIAGNOSTICS_PREFIX + "probe_stale_context_gap"
# a TensorBoard histogram, not a scalar
ENCODER_CONTEXT_HISTOGRAM = DIAGNOSTICS_PREFIX + "encoder_context"

BATCH_DIAGNOSTICS = (ENCODER_CROSS_SAMPLE_VAR, ENCODER_OUTPUT_MEAN, ENCODER_OUTPUT_STD, ENCODER_NORMALIZED_VAR,
                     ENCODER_L2N_STD, ENCODER_CROSS_TASK_COSINE, ENCODER_EFFECTIVE_RANK)
PROBE_DIAGNOSTICS = (PROBE_SAME_TASK_COSINE, PROBE_DIFF_TASK_COSINE, PROBE_RETRIEVAL_ACC)
DRIFT_DIAGNOSTICS = (PROBE_DRIFT_COSINE, PROBE_DRIFT_REL_L2, PROBE_WINDOW_DRIFT_COSINE)
KEEPING_UP_DIAGNOSTICS = (PROBE_CONTEXT_LOSS, PROBE_STALE_CONTEXT_LOSS, PROBE_STALE_CONTEXT_GAP)
SCALAR_DIAGNOSTICS = BATCH_DIAGNOSTICS + PROBE_DIAGNOSTICS + DRIFT_DIAGNOSTICS + KEEPING_UP_DIAGNOSTICS


# ------------------------------------------------------------------ context reliance (ContextReliance)
# held-out validation re-run with the contexts shuffled across tasks / zeroed: real minus ablated accuracy
VAL_RELIANCE_DROP_SHUFFLED = split_metric(VAL, "reliance_drop_shuffled")
VAL_RELIANCE_DROP_SHUFFLED_CELL = split_metric(VAL, "reliance_drop_shuffled_cell")
# the cheap training-time version: a few of the rows in training, every `train_every_n_steps` steps
TRAIN_RELIANCE_DROP_SHUFFLED = split_metric(TRAIN, "reliance_drop_shuffled")
TRAIN_RELIANCE_DROP_SHUFFLED_CELL = split_metric(TRAIN, "reliance_drop_shuffled_cell")
RELIANCE_DIAGNOSTICS = (VAL_RELIANCE_DROP_SHUFFLED, VAL_RELIANCE_DROP_SHUFFLED_CELL, TRAIN_RELIANCE_DROP_SHUFFLED,
                        TRAIN_RELIANCE_DROP_SHUFFLED_CELL)
