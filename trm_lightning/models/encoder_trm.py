"""EncoderTRM: a conditioner (demo encoder or puzzle table) in front of the TRM core, as one plain ``nn.Module``.

This is the model a researcher thinks about, with no training machinery around it::

    context = conditioner(batch)                      # (B, P, D): the demos (or the puzzle id) -> prefix tokens
    carry, out = model.act_step(carry, batch)         # training: one ACT step on the rows in the carry
    out = model.rollout(batch)                        # evaluation: exactly halt_max_steps steps, halting off

``act_step`` follows TRM's ACT wrapper (``forward(carry, batch) -> (carry, outputs)``, ``reference/trm.md`` §1.4):
rows that halted at the previous step load the batch's row at the same index with fresh states; every row in the
carry is then re-encoded (the encoder gets gradient from every row, every step) and takes one ACT step; the
halting decision (q_halt > 0, at most ``halt_max_steps``, with exploration) is drawn for the next step. The loss
is not part of the model (``trm_lightning.losses.act_loss``), so training, test-time adaptation and benchmarks
put their own objective on the same outputs.

``rollout`` computes the context once per batch and reuses it for every step; a given ``context`` replaces the
conditioner's (ablations: shuffled or zeroed contexts; test-time adaptation: an optimised one).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

from torch import Tensor, nn

from trm_lightning.models.trm import ACTCarry, TinyRecursiveModel


# what ``act_step`` may be given besides the batch: the rows' data -> demo masks whose contexts it also returns
ViewMasks = Callable[[Mapping[str, Tensor]], Sequence[Tensor]]


class StepOutput(NamedTuple):
    """What one ACT step gives besides the new carry."""

    logits: Tensor  # (B, S*S, V) token logits of the answer state
    q_halt: Tensor  # (B,) fp32 halting logit ("the answer is right now")
    context: Tensor  # (B, P, D) the prefix the TRM read (with gradient to the conditioner)
    views: tuple[Tensor, ...] = ()  # (B, P, D) each: the contexts of the demo subsets asked for (``act_step``)


class RolloutOutput(NamedTuple):
    """The evaluation rollout's last step."""

    logits: Tensor  # (B, S*S, V)
    q_halt: Tensor  # (B,)
    context: Tensor  # (B, P, D) the context used


class EncoderTRM(nn.Module):
    """A conditioner and the TRM core.

    Args:
        conditioner: any module with ``forward(batch) -> (B, trm.prefix_len, trm.hidden_size)``
            (:class:`~trm_lightning.models.encoder.StandardDemoEncoder`,
            :class:`~trm_lightning.models.conditioning.PuzzleEmbedding`, ...).
        trm: the TRM core (shared net, H/L recursion, heads, halting).
    """

    def __init__(self, conditioner: nn.Module, trm: TinyRecursiveModel) -> None:
        super().__init__()
        self.conditioner = conditioner
        self.trm = trm

    def encode(self, batch: Mapping[str, Tensor]) -> Tensor:
        """Context tokens (B, P, D) for the rows of ``batch``."""
        return self.conditioner(batch)

    def initial_carry(self, batch: Mapping[str, Tensor]) -> ACTCarry:
        """A carry of ``batch``'s size with every row halted, so the first :meth:`act_step` loads the whole batch."""
        return self.trm.initial_carry(batch)

    def act_step(
        self,
        carry: ACTCarry,
        batch: Mapping[str, Tensor],
        views: ViewMasks | None = None,
    ) -> tuple[ACTCarry, StepOutput]:
        """One training ACT step (``carry, batch -> carry, outputs``); the new carry's ``data`` holds the rows'
        samples (labels included) and its ``halted`` the rows that finish at this step.

        The batch must have the carry's number of rows (a constant per-rank batch size, ``drop_last=True``).
        ``views``, given the rows' data, returns demo masks ((B, K) bool, within ``demo_mask``); the contexts of
        the rows read with only those demos come back in ``StepOutput.views``, computed with the step's own
        context from one encoding of the demos (``Conditioner.encode_views``; the demo-subset contrastive loss).
        """
        rows = batch["inputs"].shape[0]
        if carry.halted.shape[0] != rows:
            raise ValueError(
                f"the ACT carry holds {carry.halted.shape[0]} rows and the batch {rows}: the carry needs a constant "
                "per-rank batch size (drop_last=True)"
            )
        carry = self.trm.reset_carry(carry, batch)
        data = carry.data
        if views is None:
            context, extra = self.encode(data), ()  # every row, every step, with gradient
        else:
            context, *extra = self.conditioner.encode_views(data, views(data))
        x = self.trm.embed(data["inputs"], context)
        y, z, logits, q = self.trm(carry.y, carry.z, x)
        steps = carry.steps + 1
        q_halt = q[:, 0]
        halted = self.trm.halt(steps, q_halt.detach())
        outputs = StepOutput(logits, q_halt, context, tuple(extra))
        return ACTCarry(y=y, z=z, steps=steps, halted=halted, data=data), outputs

    def forward(
        self,
        carry: ACTCarry,
        batch: Mapping[str, Tensor],
        views: ViewMasks | None = None,
    ) -> tuple[ACTCarry, StepOutput]:
        """The ACT step (:meth:`act_step`), as TRM's wrapper defines ``forward``."""
        return self.act_step(carry, batch, views)

    def rollout(self, batch: Mapping[str, Tensor], context: Tensor | None = None) -> RolloutOutput:
        """Evaluation: encode once (unless ``context`` is given), then exactly ``halt_max_steps`` ACT steps from
        fresh states with halting off; returns the last step's logits and halting logit."""
        if context is None:
            context = self.encode(batch)
        x = self.trm.embed(batch["inputs"], context)
        y, z = self.trm.initial_states(batch["inputs"])
        for _ in range(self.trm.halt_max_steps):
            y, z, logits, q = self.trm(y, z, x)
        return RolloutOutput(logits, q[:, 0], context)
