"""Which hyperparameters decide what a model's weights mean, and how a checkpoint's differ from a config's.

Used twice: by the CLI before anything runs (``--ckpt_path`` against the config) and by the LightningModule when a
checkpoint is loaded. The TRM's own keys are listed in :data:`TRM_ARCHITECTURE_KEYS`; the conditioner is compared
as a whole (its class and every constructor argument except the ones its class declares ``runtime_options``), so
a new conditioner class needs no entry here.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Mapping
from typing import Any

# hyperparameters of TRMLitModule that decide the parameters' shapes or meaning (besides ``conditioner``)
TRM_ARCHITECTURE_KEYS = (
    "canvas_size", "hidden_size", "num_heads", "expansion", "L_layers", "puzzle_emb_len", "num_puzzle_ids",
    "context_broadcast", "pos_encoding",
)


def _import(class_path: str) -> type | None:
    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None


def _class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def conditioner_spec(value: Any) -> dict[str, Any]:
    """``{"class_path": ..., "init_args": {...}}`` for a conditioner given as a class, a ``functools.partial`` of
    one, or a (class_path, init_args) mapping / Namespace as LightningCLI stores it. ``init_args`` holds every
    constructor argument after the shape, defaults filled in."""
    if isinstance(value, type):
        cls, given = value, {}
    elif isinstance(value, functools.partial) and isinstance(value.func, type):
        cls, given = value.func, dict(value.keywords)
    elif isinstance(value, functools.partial) and value.args and isinstance(value.args[0], type):
        cls, given = value.args[0], dict(value.keywords)  # jsonargparse's partial(instantiator, cls, **init_args)
    else:
        as_dict = dict(vars(value)) if hasattr(value, "class_path") and not isinstance(value, Mapping) else value
        if not isinstance(as_dict, Mapping) or "class_path" not in as_dict:
            raise TypeError(f"not a conditioner class or spec: {value!r}")
        init = as_dict.get("init_args") or {}
        given = dict(vars(init)) if not isinstance(init, Mapping) else dict(init)
        cls = _import(str(as_dict["class_path"]))
        if cls is None:
            return {"class_path": str(as_dict["class_path"]), "init_args": given}
    defaults = {
        name: p.default
        for name, p in list(inspect.signature(cls.__init__).parameters.items())[2:]  # after self, shape
        if p.default is not inspect.Parameter.empty
    }
    return {"class_path": _class_path(cls), "init_args": {**defaults, **given}}


def _runtime_options(class_path: str) -> tuple[str, ...]:
    cls = _import(class_path)
    return tuple(getattr(cls, "runtime_options", ())) if cls is not None else ()


def architecture_mismatch(saved: Mapping[str, Any], wanted: Mapping[str, Any]) -> list[str]:
    """``key=saved (config: wanted)`` for every architecture setting both know and disagree on."""
    differ = [
        f"{k}={saved[k]!r} (config: {wanted[k]!r})"
        for k in TRM_ARCHITECTURE_KEYS
        if k in saved and wanted.get(k) is not None and saved[k] != wanted[k]
    ]
    if "conditioner" not in saved and "conditioning" in saved:  # written before model.conditioner existed
        return differ + [f"conditioning={saved['conditioning']!r} (a checkpoint of the layout before "
                         "model.conditioner; it cannot be loaded into this version)"]
    if saved.get("conditioner") is None or wanted.get("conditioner") is None:
        return differ
    have, want = conditioner_spec(saved["conditioner"]), conditioner_spec(wanted["conditioner"])
    if have["class_path"] != want["class_path"]:
        return differ + [f"conditioner={have['class_path']} (config: {want['class_path']})"]
    skip = _runtime_options(have["class_path"])
    for key in sorted(set(have["init_args"]) | set(want["init_args"])):
        a, b = have["init_args"].get(key), want["init_args"].get(key)
        if key not in skip and a != b:
            differ.append(f"conditioner.{key}={a!r} (config: {b!r})")
    return differ
