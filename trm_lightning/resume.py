"""The per-rank training state a checkpoint needs beyond Lightning's own, for an exact resume.

Lightning checkpoints the weights, EMA, optimizer, scheduler, loop counters and (through
:class:`~trm_lightning.data.episodes.EpisodeLoader`) the data position. Two things remain, both per rank:

- the random generators (torch CPU and CUDA, numpy, ``random``): ACT's halting exploration draws from them;
- the ACT carry: rows that have not halted continue from their latent states after a resume.

:func:`gather_rank_states` collects them from every rank into the checkpoint (all ranks call it: Lightning
calls ``on_save_checkpoint`` on every rank); :func:`rank_state` picks this rank's on resume.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from trm_lightning.models.trm import ACTCarry


def capture_rng() -> dict[str, Any]:
    """The generators' states, in types ``torch.load(weights_only=True)`` accepts (tensors, ints, tuples)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()  # the current device's generator
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def carry_to_cpu(carry: ACTCarry | None) -> dict[str, Any] | None:
    if carry is None:
        return None
    return {
        "y": carry.y.detach().cpu(),
        "z": carry.z.detach().cpu(),
        "steps": carry.steps.cpu(),
        "halted": carry.halted.cpu(),
        "data": {k: v.cpu() for k, v in carry.data.items()},
    }


def carry_from_cpu(state: dict[str, Any] | None, device: torch.device) -> ACTCarry | None:
    if state is None:
        return None
    return ACTCarry(
        y=state["y"].to(device),
        z=state["z"].to(device),
        steps=state["steps"].to(device),
        halted=state["halted"].to(device),
        data={k: v.to(device) for k, v in state["data"].items()},
    )


def gather_rank_states(local: dict[str, Any], world_size: int) -> list[dict[str, Any]]:
    """Every rank's ``local`` state, in rank order (a collective when ``world_size > 1``)."""
    if world_size <= 1 or not (dist.is_available() and dist.is_initialized()):
        return [local]
    states: list[Any] = [None] * world_size
    dist.all_gather_object(states, local)
    return states


def rank_state(saved: dict[str, Any] | None, world_size: int, rank: int) -> tuple[dict[str, Any] | None, str]:
    """This rank's saved state, or None with the reason it cannot be used."""
    if not saved:
        return None, "the checkpoint holds no carry/RNG state (saved by an older version or on a crash under DDP)"
    if saved["world_size"] != world_size:
        return None, f"the checkpoint was saved by {saved['world_size']} processes, this run has {world_size}"
    return saved["ranks"][rank], ""
