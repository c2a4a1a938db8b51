"""Initialising the TRM core from another run's checkpoint (``model.trm_init_ckpt``), with its provenance.

A decoder pretrained on the evaluation tasks' demos (TRM's protocol) or on a training set that holds them
(ARC-AGI-2 training holds 376 ARC-AGI-1 evaluation tasks) leaks: held-out scores after such an
initialisation are not few-shot. :func:`provenance` says, from the checkpoint's own recorded data config,
whether that can have happened for this run's evaluation tasks, and counts the overlap when it can be checked.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from trm_lightning.data.arc import ArcTask, load_source
from trm_lightning.errors import ConfigError, DataError


TRM_PREFIX = "model.trm."  # where TRMLitModule keeps the TRM core's weights in its state dict


def load_trm_weights(trm: nn.Module, path: str) -> dict:
    """Copy the TRM core's weights (``model.trm.*``) of checkpoint ``path`` into ``trm``; returns the checkpoint's
    data hparams."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ConfigError(f"model.trm_init_ckpt {path}: no such file") from None
    except Exception as err:  # noqa: BLE001  (any unreadable file: one clear line)
        raise ConfigError(f"model.trm_init_ckpt {path}: not a readable checkpoint ({type(err).__name__})") from None
    state = {k[len(TRM_PREFIX):]: v for k, v in ckpt.get("state_dict", {}).items() if k.startswith(TRM_PREFIX)}
    if not state:
        raise ConfigError(f"model.trm_init_ckpt {path}: the checkpoint holds no TRM core weights ({TRM_PREFIX}*)")
    own = trm.state_dict()
    differ = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if differ or set(own) != set(state):
        raise ConfigError(
            f"model.trm_init_ckpt {path}: its TRM core has another shape ("
            + ", ".join(differ[:3] or sorted(set(own) ^ set(state))[:3]) + "); match hidden_size, num_heads, "
            "L_layers, puzzle_emb_len and canvas_size"
        )
    trm.load_state_dict(state)
    return dict(ckpt.get("datamodule_hyper_parameters", {}))


def provenance(data_hparams: dict, eval_source: str, eval_tasks: Sequence[ArcTask]) -> tuple[str, bool]:
    """(one line for the log, whether the checkpoint may have seen this run's evaluation tasks)."""
    if not data_hparams:
        return "its data config is not recorded: it may have seen this run's evaluation tasks", True
    train_source = data_hparams.get("train_source")
    seen = f"trained on {train_source} (evaluated on {data_hparams.get('eval_source')})"
    if data_hparams.get("train_on_eval_demos"):
        return f"{seen} with train_on_eval_demos=True: it trained on its evaluation tasks' demos (LEAK)", True
    if data_hparams.get("eval_source") == eval_source:
        return f"{seen}: the firewall kept this run's evaluation tasks out of its training", False
    try:
        theirs = load_source(str(train_source))
    except (DataError, ConfigError, OSError):
        return f"{seen}: its training tasks cannot be read here to check the overlap", True
    ids = {t.task_id for t in theirs}
    hashes = set().union(*(t.pair_hashes() for t in theirs)) if theirs else set()
    shared = [t.task_id for t in eval_tasks if t.task_id in ids or t.pair_hashes() & hashes]
    if shared:
        return f"{seen}: {len(shared)} of this run's {len(eval_tasks)} evaluation tasks were in its training (LEAK)", True
    return f"{seen}: none of this run's {len(eval_tasks)} evaluation tasks were in its training", False
