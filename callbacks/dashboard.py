"""Dashboard: the TensorBoard page a researcher opens first (TensorBoard's "Custom Scalars" tab).

At the start of a fit, rank 0 writes one custom-scalars layout: encoder health, drift (and whether the TRM keeps up
with the encoder), context reliance, ACT, learning rates per group and gradient norms, each chart holding the
metrics it is about and, where a :class:`~callbacks.CollapseAlert` rule bounds one of them, the rule's threshold
as its own line (``thresholds/<metric>``, written by CollapseAlert at every check). The alerts themselves are text
under ``alerts/<rule>`` (TensorBoard's Text tab), and GridImages' pictures carry their captions.
"""

from __future__ import annotations

from lightning.pytorch import Callback, LightningModule, Trainer

from callbacks.helpers import tensorboard_writers
from trm_lightning import metric_names as names

THRESHOLD_PREFIX = "thresholds/"  # + the metric a rule bounds; CollapseAlert writes these


def threshold_tag(metric: str) -> str:
    return THRESHOLD_PREFIX + metric


def _chart(*metrics: str) -> list:
    """A multi-line chart of ``metrics`` and their threshold lines (exact tags, as regular expressions)."""
    tags = [t for m in metrics for t in (m, threshold_tag(m))]
    return ["Multiline", [f"^{tag}$" for tag in tags]]


def layout() -> dict[str, dict[str, list]]:
    """The dashboard's categories and charts (TensorBoard's custom-scalars layout)."""
    train, val = names.TRAIN, names.VAL
    act = {k: names.split_metric(train, k) for k in names.ACT_METRIC_KEYS}
    return {
        "1 encoder health": {
            "normalised variance": _chart(names.ENCODER_NORMALIZED_VAR),
            "cross-task cosine": _chart(names.ENCODER_CROSS_TASK_COSINE),
            "effective rank": _chart(names.ENCODER_EFFECTIVE_RANK),
            "probe: same vs other task, retrieval": _chart(names.PROBE_SAME_TASK_COSINE, names.PROBE_DIFF_TASK_COSINE,
                                                          names.PROBE_RETRIEVAL_ACC),
            "the seed's three (scale-dependent)": _chart(names.ENCODER_CROSS_SAMPLE_VAR, names.ENCODER_OUTPUT_MEAN,
                                                        names.ENCODER_OUTPUT_STD),
        },
        "2 drift": {
            "since the previous probe check (a jump)": _chart(names.PROBE_DRIFT_COSINE, names.PROBE_DRIFT_REL_L2),
            "since drift_window checks ago (a slow drift)": _chart(names.PROBE_WINDOW_DRIFT_COSINE),
            "is the TRM keeping up? probe loss today vs stale context": _chart(*names.KEEPING_UP_DIAGNOSTICS),
        },
        "3 context reliance": {
            "held-out: real minus shuffled context": _chart(names.VAL_RELIANCE_DROP_SHUFFLED,
                                                           names.VAL_RELIANCE_DROP_SHUFFLED_CELL),
            "in training: real minus shuffled context": _chart(names.TRAIN_RELIANCE_DROP_SHUFFLED,
                                                              names.TRAIN_RELIANCE_DROP_SHUFFLED_CELL),
        },
        "4 ACT": {
            "accuracy": _chart(act["accuracy"], act["exact_accuracy"], names.VAL_ACCURACY, names.VAL_EXACT_ACCURACY),
            "losses": _chart(act["lm_loss"], act["q_halt_loss"], names.VAL_Q_HALT_LOSS),
            "halting": _chart(act["steps"], act["q_halt_accuracy"]),
        },
        "5 learning rates": {"per parameter group": ["Multiline", [f"^{names.LR_PREFIX}"]]},
        "6 gradients": {
            "norms before clipping": ["Multiline", [r"^grad/.*_norm$"]],
            "clip ratio": ["Multiline", [r"^grad/clip_ratio$"]],
            "update / weight ratio": ["Multiline", [r"^update_ratio/"]],
        },
    }


class Dashboard(Callback):
    """Writes the custom-scalars layout (:func:`layout`) to every TensorBoard logger at the start of a fit."""

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        for writer in tensorboard_writers(trainer):
            writer.add_custom_scalars(layout())
            writer.flush()
