"""Argument checks with one clear error each: ``ConfigError("<key> must be <allowed range>, got <value>")``.

Used where a value is taken in (the LightningModule, the conditioners, the datamodule, the episode dataset and
sampler, the callbacks), so a value a user can type is either accepted and meaningful or refused in one line that
names the key, the value and what is allowed. Non-finite numbers (nan, inf) are refused by every numeric check.
"""

from __future__ import annotations

import math

from trm_lightning.errors import ConfigError


def _number(key: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{key} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ConfigError(f"{key} must be a finite number, got {value}")
    return value


def check_at_least(name: str, value: float | None, minimum: float, *, allow_none: bool = False) -> None:
    """Raise ``ConfigError("{name} must be >= {minimum}, got {value}")`` unless ``value >= minimum``.

    With ``allow_none`` a None value passes too (and the message says ``>= {minimum} or None``).
    """
    if value is None and allow_none:
        return
    if value is None or _number(name, value) < minimum:
        raise ConfigError(f"{name} must be >= {minimum}{' or None' if allow_none else ''}, got {value}")


def check_greater(name: str, value: float, bound: float) -> None:
    """Raise ``ConfigError("{name} must be > {bound}, got {value}")`` unless ``value > bound``."""
    if _number(name, value) <= bound:
        raise ConfigError(f"{name} must be > {bound}, got {value}")


def check_probability(name: str, value: float) -> None:
    """Raise ``ConfigError("{name} must be in [0, 1], got {value}")`` unless ``0 <= value <= 1``."""
    check_range(name, value, 0.0, 1.0)


def check_range(name: str, value: float | None, low: float, high: float, *, low_open: bool = False,
                high_open: bool = False, allow_none: bool = False) -> None:
    """``low <= value <= high`` (strict at an open end), else ``"{name} must be in [low, high], got v"``; with
    ``allow_none`` None passes too."""
    if value is None and allow_none:
        return
    if (value is None or not low <= _number(name, value) <= high or (low_open and value == low)
            or (high_open and value == high)):
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ConfigError(f"{name} must be in {interval}{' or None' if allow_none else ''}, got {value}")


def check_divisible(name: str, value: int, by_name: str, by: int) -> None:
    """``value % by == 0``, else ``"{name}={value} must be divisible by {by_name}={by}"``."""
    if value % by:
        raise ConfigError(f"{name}={value} must be divisible by {by_name}={by}")
