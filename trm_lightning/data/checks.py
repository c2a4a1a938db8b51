"""Argument checks shared by the datamodule and the episode dataset / sampler: one ``ConfigError`` line each."""

from __future__ import annotations

from trm_lightning.errors import ConfigError


def check_at_least(name: str, value: float | None, minimum: float, *, allow_none: bool = False) -> None:
    """Raise ``ConfigError("{name} must be >= {minimum}, got {value}")`` unless ``value >= minimum``.

    With ``allow_none`` a None value passes too (and the message says ``>= {minimum} or None``).
    """
    if value is None and allow_none:
        return
    if value is None or value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}{' or None' if allow_none else ''}, got {value}")


def check_probability(name: str, value: float) -> None:
    """Raise ``ConfigError("{name} must be in [0, 1], got {value}")`` unless ``0 <= value <= 1``."""
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"{name} must be in [0, 1], got {value}")
