"""A diagnostic conditioner for the few-shot benchmark: a perfect demo reader whose context is factorised by
construction (issue 16). Not a model to train for ARC.

:class:`RulePartOracle` reads a row's demos the way a perfect encoder would: it finds the few-shot rule
``family(s, c)`` that maps every demo input to its output, by trying every rule of its families
(:func:`~trm_lightning.data.fewshot_rules.explaining_rules`, held-out rules included: reading a rule off its demos
needs no training on it). Its context is then two learned vectors, one for the operation ``(family, s)`` in slot
0 and one for the colour ``c`` in slot 1 (the other slots zero). A held-out rule is an unseen combination of a seen
operation and a seen colour, so both of its vectors were trained on other rules. With this conditioner the only
thing left to learn is the decoder: a TRM that still fails the held-out rules cannot compose an operation with a
colour even when it is told both apart, and the bottleneck is the decoder; one that solves them says the
encoder's context is what fails.

Rows whose demos no rule explains (or that no demo shows) get a learned ``unknown`` vector in both slots.
The search runs on the CPU in numpy and is cached by the demos' bytes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from trm_lightning.data.arc import ArcTask
from trm_lightning.data.fewshot_rules import FEWSHOT_FAMILIES, FewshotRule, explaining_rules, rule_params
from trm_lightning.data.tokenize import crop_canvas
from trm_lightning.models.conditioning import Conditioner, ConditionerShape


class RulePartOracle(Conditioner):
    """The context a perfect, factorised demo encoder would give (module docstring): slot 0 the operation
    ``(family, s)`` of the rule the demos show, slot 1 its colour ``c``, each a learned vector.

    Args:
        shape: the sizes (``prefix_len`` >= 2 slots of ``hidden_size``).
        families: the rule families to search (default: all of them).
    """

    reads_demos = True

    def __init__(self, shape: ConditionerShape, families: Sequence[str] | None = None) -> None:
        super().__init__()
        families = list(families or FEWSHOT_FAMILIES)
        unknown = [f for f in families if f not in FEWSHOT_FAMILIES]
        if unknown or not families:
            raise ValueError(f"families must be a non-empty list of {list(FEWSHOT_FAMILIES)}, got {families}")
        if shape.prefix_len < 2:
            raise ValueError(f"RulePartOracle needs prefix_len >= 2 (an operation and a colour slot), got "
                             f"{shape.prefix_len}")
        self.prefix_len = shape.prefix_len
        self.rules = [FewshotRule(f, s, c) for f in families for s, c in rule_params(f)]
        self.operations = sorted({(r.family, r.s) for r in self.rules}, key=lambda op: (families.index(op[0]), op[1]))
        self._operation_index = {op: i for i, op in enumerate(self.operations)}
        # one row per operation / colour 0..9, and a last one for "no rule explains the demos"
        self.operation = nn.Parameter(torch.randn(len(self.operations) + 1, shape.hidden_size))
        self.colour = nn.Parameter(torch.randn(10 + 1, shape.hidden_size))  # unit entries, as TRM's scaled embeddings
        self._cache: dict[bytes, tuple[int, int]] = {}  # unbounded: one entry per distinct demo set seen

    def rule_parts(self, demo_inputs: Tensor, demo_outputs: Tensor, demo_mask: Tensor) -> tuple[Tensor, Tensor]:
        """(operation index, colour index) per row, (B,) each; the last index of each when no rule explains."""
        inputs, outputs, mask = (t.detach().cpu().numpy() for t in (demo_inputs, demo_outputs, demo_mask))
        ops, colours = [], []
        for row in range(inputs.shape[0]):
            slots = np.flatnonzero(mask[row])
            key = inputs[row, slots].tobytes() + b"|" + outputs[row, slots].tobytes()
            if key not in self._cache:
                self._cache[key] = self._search(inputs[row, slots], outputs[row, slots])
            op, colour = self._cache[key]
            ops.append(op)
            colours.append(colour)
        return torch.tensor(ops), torch.tensor(colours)

    def _search(self, inputs: np.ndarray, outputs: np.ndarray) -> tuple[int, int]:
        none = (len(self.operations), 10)
        if len(inputs) == 0:
            return none
        pairs = tuple((crop_canvas(i), crop_canvas(o)) for i, o in zip(inputs, outputs))
        found = explaining_rules(ArcTask("oracle", pairs, (), "oracle"), self.rules)
        if not found:
            return none
        rule = found[0]  # ties (e.g. both modes of `fill` on some grids): the first
        return self._operation_index[(rule.family, rule.s)], rule.c

    def forward(self, batch: Mapping[str, Tensor]) -> Tensor:
        ops, colours = self.rule_parts(batch["demo_inputs"], batch["demo_outputs"], batch["demo_mask"])
        device = self.operation.device
        first = self.operation[ops.to(device)]
        second = self.colour[colours.to(device)]
        rest = first.new_zeros(first.shape[0], self.prefix_len - 2, first.shape[-1])
        return torch.cat([first[:, None], second[:, None], rest], dim=1)
