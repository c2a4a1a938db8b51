"""The conditioner extension point: a new encoder class, defined here (not shipped), used through the real CLI
with no change to the LightningModule: its knob is a config key, it trains, it is checkpointed and checked."""

from __future__ import annotations

from collections.abc import Mapping

import pytest
import torch
import torch.nn.functional as F
import yaml
from lightning.pytorch import Callback
from torch import Tensor, nn

from tests.integration.helpers import build_tiny, tiny_args
from trm_lightning.cli import build_cli, main
from trm_lightning.models.conditioning import Conditioner, ConditionerShape

CLASS = f"{__name__}.ColourHistogramEncoder"


class ColourHistogramEncoder(Conditioner):
    """A test-only conditioner: the colour histogram of each row's demo outputs, projected to the prefix.

    Args:
        shape: the sizes shared with the TRM.
        scale: multiplies the context.
    """

    def __init__(self, shape: ConditionerShape, scale: float = 1.0) -> None:
        super().__init__()
        self.scale = scale
        self.vocab, self.tokens, self.width = shape.vocab_size, shape.prefix_len, shape.hidden_size
        self.proj = nn.Linear(shape.vocab_size, shape.prefix_len * shape.hidden_size)

    def forward(self, batch: Mapping[str, Tensor]) -> Tensor:
        counts = F.one_hot(batch["demo_outputs"].long(), self.vocab).float()  # (B, K, T, V)
        counts = (counts * batch["demo_mask"][:, :, None, None]).sum((1, 2))
        hist = counts / counts.sum(-1, keepdim=True).clamp_min(1)
        return self.scale * self.proj(hist).view(-1, self.tokens, self.width)


class _Grads(Callback):
    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.names = [n for n, p in pl_module.named_parameters() if p.grad is not None and p.grad.any()]
        self.groups = {g["name"]: len(g["params"]) for g in optimizer.param_groups}


def test_a_new_encoder_class_trains_through_the_cli(tmp_path, synthetic_task_dir, synthetic_eval_dir):
    cli = build_tiny(synthetic_task_dir, synthetic_eval_dir, tmp_path, "--trainer.max_steps=2",
                     f"--model.conditioner={CLASS}", "--model.conditioner.scale=2.0")
    model = cli.model.model
    assert isinstance(model.conditioner, ColourHistogramEncoder) and model.conditioner.scale == 2.0
    grads = _Grads()
    cli.trainer.callbacks.append(grads)
    cli.trainer.fit(cli.model, cli.datamodule)
    assert {"model.conditioner.proj.weight", "model.conditioner.proj.bias"} <= set(grads.names)
    assert grads.groups == {"encoder": 2, "trm": len(list(model.trm.parameters()))}  # its own lr group
    saved = torch.load(next(tmp_path.rglob("last.ckpt")), weights_only=True)  # plain data: loads weights_only
    assert saved["hyper_parameters"]["conditioner"] == {"class_path": CLASS, "init_args": {"scale": 2.0}}


def test_its_knob_is_a_documented_config_key(tmp_path, synthetic_task_dir, synthetic_eval_dir, capsys):
    args = tiny_args(synthetic_task_dir, synthetic_eval_dir, tmp_path, f"--model.conditioner={CLASS}",
                     "--model.conditioner.scale=3.0")
    with pytest.raises(SystemExit):
        build_cli(["fit", *args, "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)["model"]["conditioner"]
    assert printed == {"class_path": CLASS, "init_args": {"scale": 3.0}}
    with pytest.raises(SystemExit):
        build_cli(["fit", "--model.conditioner.help", CLASS])
    assert "multiplies the context. (type: float, default: 1.0)" in " ".join(capsys.readouterr().out.split())


def test_a_checkpoint_with_another_knob_value_is_refused(tmp_path, synthetic_task_dir, synthetic_eval_dir, capsys):
    main(["fit", *tiny_args(synthetic_task_dir, synthetic_eval_dir, tmp_path / "a", "--trainer.max_steps=1",
                            f"--model.conditioner={CLASS}")])
    last = next((tmp_path / "a").rglob("last.ckpt"))
    with pytest.raises(SystemExit):
        main(["fit", *tiny_args(synthetic_task_dir, synthetic_eval_dir, tmp_path / "b", f"--ckpt_path={last}",
                                f"--model.conditioner={CLASS}", "--model.conditioner.scale=5.0")])
    assert "conditioner.scale=1.0 (config: 5.0)" in capsys.readouterr().err
