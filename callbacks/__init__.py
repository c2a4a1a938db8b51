"""Lightning callbacks of ``trm`` (a top-level package so configs can say ``callbacks.RunSummary``)."""

from callbacks.alert_rules import (
    AccuracyCollapse,
    AlertRule,
    CumulativeDrift,
    IgnoredEncoder,
    NonFinite,
    OutputMeanShift,
    ProbeDrift,
    QHaltRising,
    RepresentationCollapse,
)
from callbacks.collapse_alert import CollapseAlert, CollapseAlertError
from callbacks.context_reliance import ContextReliance
from callbacks.dashboard import Dashboard
from callbacks.ema import EMA
from callbacks.encoder_diagnostics import EncoderDiagnostics
from callbacks.grad_norms import GradNorms
from callbacks.grid_images import GridImages
from callbacks.last_checkpoint import LastCheckpoint
from callbacks.lr_monitor import LearningRates
from callbacks.run_status import RunStatus
from callbacks.run_summary import RunSummary

__all__ = ["AccuracyCollapse", "AlertRule", "CollapseAlert", "CollapseAlertError", "ContextReliance", "CumulativeDrift", "Dashboard", "EMA",
           "EncoderDiagnostics", "GradNorms", "GridImages", "IgnoredEncoder", "LastCheckpoint", "LearningRates", "NonFinite", "OutputMeanShift", "ProbeDrift", "QHaltRising",
           "RepresentationCollapse", "RunStatus", "RunSummary"]
