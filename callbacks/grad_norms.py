"""GradNorms: per-module gradient norms before clipping, the clip ratio, and update/weight ratios.

``on_before_optimizer_step`` runs after the backward pass (and, under DDP, after the gradient
all-reduce, so the norms are global and equal on every rank), after AMP unscaling, and before Lightning
clips the gradients. Logged every ``every_n_steps`` optimizer steps:

- ``grad/<group>_norm``: the L2 norm of the gradients of the group's parameters (default groups:
  ``encoder`` = ``model.conditioner``; ``trm_core`` = ``model.trm.layers`` + ``model.trm.embed_tokens``; ``heads`` =
  ``model.trm.lm_head`` + ``model.trm.q_head``); a group without trainable parameters (the puzzle table's
  conditioner) is not logged;
- ``grad/total_norm``: the L2 norm over every parameter of the module with a gradient (what clipping sees);
- ``grad/clip_ratio = min(1, gradient_clip_val / total_norm)``: the factor norm clipping multiplies the
  gradients by (1.0 when clipping is off or clips by value);
- ``update_ratio/<group> = ||w_after - w_before|| / ||w_before||`` across the optimizer step.
"""

from __future__ import annotations

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor, nn

from trm_lightning.checks import check_at_least
from trm_lightning.errors import ConfigError

DEFAULT_GROUPS = {
    "encoder": ["model.conditioner"],
    "trm_core": ["model.trm.layers", "model.trm.embed_tokens"],
    "heads": ["model.trm.lm_head", "model.trm.q_head"],
}


def total_norm(tensors: list[Tensor]) -> Tensor:
    """L2 norm of the concatenation of ``tensors`` (float32 0-d tensor; 0 for an empty list)."""
    if not tensors:
        return torch.zeros(())
    return torch.nn.utils.get_total_norm([t.detach().float() for t in tensors], norm_type=2.0)


def clip_ratio(norm: Tensor, clip_val: float | None) -> Tensor:
    """The factor norm clipping applies: min(1, clip_val / (norm + 1e-6)) as ``clip_grad_norm_`` does."""
    if not clip_val:
        return torch.ones_like(norm)
    return (clip_val / (norm + 1e-6)).clamp(max=1.0)


def _resolve(module: nn.Module, path: str) -> nn.Module:
    try:
        return module.get_submodule(path)
    except AttributeError:
        raise ConfigError(f"GradNorms: the module has no submodule '{path}'") from None


class GradNorms(Callback):
    """Per-module gradient norms (before clipping), clip ratio and update/weight ratios.

    Args:
        every_n_steps: optimizer steps between measurements; None uses ``trainer.log_every_n_steps``.
        groups: group name -> submodule paths of the LightningModule whose parameters form the group;
            None gives ``encoder`` (model.conditioner), ``trm_core`` (model.trm.layers + model.trm.embed_tokens)
            and ``heads`` (model.trm.lm_head + model.trm.q_head).
        update_ratios: also log ``update_ratio/<group>`` (copies the group weights on measured steps).
    """

    def __init__(
        self,
        every_n_steps: int | None = None,
        groups: dict[str, list[str]] | None = None,
        update_ratios: bool = True,
    ) -> None:
        check_at_least("GradNorms.every_n_steps", every_n_steps, 1, allow_none=True)
        self.every_n_steps = every_n_steps
        self.groups = dict(DEFAULT_GROUPS if groups is None else groups)
        self.update_ratios = update_ratios
        self._params: dict[str, list[nn.Parameter]] = {}
        self._before: dict[str, list[Tensor]] | None = None

    def _every(self, trainer: Trainer) -> int:
        return self.every_n_steps if self.every_n_steps is not None else max(int(trainer.log_every_n_steps), 1)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._params = {}
        for name, paths in self.groups.items():
            params = {id(p): p for path in paths for p in _resolve(pl_module, path).parameters()}
            trainable = [p for p in params.values() if p.requires_grad]
            if trainable:
                self._params[name] = trainable

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer) -> None:
        # global_step is incremented after this optimizer step: k = global_step + 1 is the step being taken
        if (trainer.global_step + 1) % self._every(trainer):
            return
        values = {}
        for name, params in self._params.items():
            values[f"grad/{name}_norm"] = total_norm([p.grad for p in params if p.grad is not None])
        every = [p.grad for p in pl_module.parameters() if p.grad is not None]
        total = total_norm(every)
        values["grad/total_norm"] = total
        clip_val = trainer.gradient_clip_val
        by_norm = (trainer.gradient_clip_algorithm or "norm") == "norm"
        values["grad/clip_ratio"] = clip_ratio(total, clip_val if by_norm else None)
        for key, value in values.items():
            pl_module.log(key, value, on_step=True, on_epoch=False, batch_size=1)
        if self.update_ratios:
            self._before = {name: [p.detach().clone() for p in params] for name, params in self._params.items()}

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        if self._before is None:
            return
        before, self._before = self._before, None
        for name, params in self._params.items():
            old = before[name]
            delta = total_norm([p.detach() - w for p, w in zip(params, old)])
            ratio = delta / total_norm(old).clamp_min(1e-30)
            pl_module.log(f"update_ratio/{name}", ratio, on_step=True, on_epoch=False, batch_size=1)
