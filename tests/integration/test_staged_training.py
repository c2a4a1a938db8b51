"""Co-adaptation options (seed H6): freezing one part through its learning rate, and a pretrained TRM core."""

from __future__ import annotations

import pytest
import torch

from tests.integration.helpers import build_tiny, tiny_args
from trm_lightning.cli import main


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("frozen", ["trm", "encoder"])
def test_frozen_part_is_bit_identical_and_the_other_trains(frozen, tmp_path, synthetic_task_dir, synthetic_eval_dir):
    cli = build_tiny(synthetic_task_dir, synthetic_eval_dir, tmp_path, "--trainer.max_steps=3",
                     "--model.lr_warmup_steps=0", f"--model.freeze_{frozen}_steps=3")
    parts = {"trm": cli.model.model.trm, "encoder": cli.model.model.conditioner}
    before = {name: _snapshot(m) for name, m in parts.items()}
    cli.trainer.fit(cli.model, cli.datamodule)
    after = {name: _snapshot(m) for name, m in parts.items()}
    other = "encoder" if frozen == "trm" else "trm"
    assert all(torch.equal(before[frozen][k], after[frozen][k]) for k in before[frozen])
    assert any(not torch.equal(before[other][k], after[other][k]) for k in before[other])
    lrs = {g["name"]: g["lr"] for g in cli.trainer.optimizers[0].param_groups}
    assert lrs[frozen] > 0  # unfrozen after its steps: the schedule's value again


def test_trm_init_ckpt_loads_the_core_and_reports_its_data(tmp_path, synthetic_task_dir, synthetic_eval_dir):
    main(["fit", *tiny_args(synthetic_task_dir, synthetic_eval_dir, tmp_path / "pre", "--trainer.max_steps=2",
                            "--data.train_on_eval_demos=true")])
    ckpt = next((tmp_path / "pre").rglob("last.ckpt"))
    saved = torch.load(ckpt, weights_only=False)["state_dict"]
    with pytest.warns(UserWarning, match=r"train_on_eval_demos=True: it trained on its evaluation tasks' demos \(LEAK\)"):
        cli = build_tiny(synthetic_task_dir, synthetic_eval_dir, tmp_path / "post", "--trainer.max_steps=1",
                         f"--model.trm_init_ckpt={ckpt}", "--model.freeze_trm_steps=1")
        for k, v in cli.model.model.trm.state_dict().items():
            assert torch.equal(v, saved[f"model.trm.{k}"]), k
        cli.trainer.fit(cli.model, cli.datamodule)
    for k, v in cli.model.model.trm.state_dict().items():  # frozen for the one step: still the loaded weights
        assert torch.equal(v, saved[f"model.trm.{k}"]), k
