"""Resolved configs as flat dotted keys, and what one run changed relative to another.

``trainer.callbacks`` (a list of ``class_path``/``init_args`` entries) is keyed by class name
(``trainer.callbacks.CollapseAlert.init_args.warmup_steps``) so that adding a callback does not shift the others;
a subtree one side lacks entirely shows as one change (``trainer.callbacks.CollapseAlert: added``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

ABSENT = object()  # the key is not in that config
_SUBTREE = object()  # a whole section added or removed (shown as one change)

#: keys that differ between any two runs without saying anything about the experiment: where the logs go, and the
#: arguments of the subcommand itself (``trm test --ckpt_path ...``)
IGNORED_KEYS = (
    "trainer.logger.init_args.save_dir",
    "trainer.logger.init_args.name",
    "trainer.logger.init_args.version",
    "trainer.logger.init_args.sub_dir",
    "trainer.default_root_dir",
    "checkpoint.dirpath",
    "ckpt_path",
    "weights_only",
    "verbose",
    "return_predictions",
)


def _is_class_entry(value: Any) -> bool:
    return isinstance(value, Mapping) and "class_path" in value


def flatten_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"model": {"lr": 1e-3}}`` -> ``{"model.lr": 1e-3}``; lists of classes keyed by class name, other lists
    kept whole as values."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten_config(value, f"{name}."))
        elif isinstance(value, list) and value and all(_is_class_entry(v) for v in value):
            seen: dict[str, int] = {}
            for entry in value:
                cls = str(entry["class_path"]).rsplit(".", 1)[-1]
                seen[cls] = seen.get(cls, 0) + 1
                label = cls if seen[cls] == 1 else f"{cls}#{seen[cls]}"
                out.update(flatten_config(entry, f"{name}.{label}."))
        else:
            out[name] = value
    return out


@dataclass(frozen=True)
class Change:
    """One key that differs: ``before`` is the baseline's value, ``after`` this run's (either may be ABSENT)."""

    key: str
    before: Any
    after: Any

    def __str__(self) -> str:
        if self.before is ABSENT:
            return f"{self.key}: added" if self.after is _SUBTREE else f"{self.key}: (absent) → {format_value(self.after)}"
        if self.after is ABSENT:
            return f"{self.key}: removed" if self.before is _SUBTREE else f"{self.key}: {format_value(self.before)} → (absent)"
        return f"{self.key}: {format_value(self.before)} → {format_value(self.after)}"


def format_value(value: Any) -> str:
    """Short, stable text for a config value (``3e-05``, ``true``, ``null``, JSON for lists)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, dict)):
        return json.dumps(value, separators=(",", ":"), default=str)
    return str(value)


def _ignored(key: str, ignore: Iterable[str]) -> bool:
    return any(fnmatchcase(key, pattern) for pattern in ignore)


def _subtree_root(key: str, other_keys: set[str]) -> str:
    """The shortest dotted prefix of ``key`` that no key of the other side starts with."""
    parts = key.split(".")
    for n in range(1, len(parts) + 1):
        prefix = ".".join(parts[:n])
        if not any(k == prefix or k.startswith(prefix + ".") for k in other_keys):
            return prefix
    return key


def config_diff(baseline: Mapping[str, Any], run: Mapping[str, Any], ignore: Iterable[str] = IGNORED_KEYS) -> list[Change]:
    """Changes from ``baseline`` to ``run`` (both flat), in ``run``'s key order, then keys only the baseline has."""
    ignore = tuple(ignore)
    base_keys, run_keys = set(baseline), set(run)
    changes: list[Change] = []
    emitted: set[str] = set()

    def add_missing(key: str, other: set[str], added: bool) -> None:
        root = _subtree_root(key, other)
        if root in emitted:
            return
        emitted.add(root)
        if root == key:
            changes.append(Change(key, ABSENT, run[key]) if added else Change(key, baseline[key], ABSENT))
        else:
            changes.append(Change(root, ABSENT, _SUBTREE) if added else Change(root, _SUBTREE, ABSENT))

    for key, value in run.items():
        if _ignored(key, ignore):
            continue
        if key not in baseline:
            add_missing(key, base_keys, added=True)
        elif baseline[key] != value:
            changes.append(Change(key, baseline[key], value))
    for key in baseline:
        if key not in run and not _ignored(key, ignore):
            add_missing(key, run_keys, added=False)
    return changes
