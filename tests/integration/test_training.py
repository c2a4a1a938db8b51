"""Training through the real CLI on synthetic tasks: gradients, optimizer groups, logs, checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from lightning.pytorch import Callback

from tests.integration.helpers import build_tiny, run_tiny
from trm_lightning.models.conditioning import PuzzleEmbedding


def _last_ckpt(cli) -> str:
    """The run's last.ckpt (written by the ``last_checkpoint`` callback)."""
    from callbacks.last_checkpoint import LastCheckpoint

    (last,) = [c for c in cli.trainer.callbacks if isinstance(c, LastCheckpoint)]
    return last.last_model_path


class GradRecorder(Callback):
    """Keeps, for the first optimizer step, which parameters got a non-zero gradient (before clipping)."""

    def __init__(self):
        self.zero_grad_params: list[str] | None = None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if self.zero_grad_params is None:
            self.zero_grad_params = [
                n for n, p in pl_module.named_parameters()
                if p.requires_grad and (p.grad is None or p.grad.abs().sum().item() == 0)
            ]


@pytest.mark.parametrize(
    "variant",
    [
        [],
        ["--model.conditioner.pooling_method=attention", "--model.conditioner.norm_style=pre",
         "--model.conditioner.layer_scale_init=1e-4"],
        ["--model.conditioner.pooling_method=weighted", "--model.conditioner.set_layers=2", "--model.conditioner.num_layers=2"],
    ],
    ids=["seed-default", "attention-pre-layerscale", "weighted-2set"],
)
def test_every_trainable_parameter_gets_gradient(synthetic_task_dir, synthetic_eval_dir, tmp_path, variant):
    cli = build_tiny(synthetic_task_dir, synthetic_eval_dir, tmp_path, "--trainer.max_steps=1", *variant)
    recorder = GradRecorder()
    cli.trainer.callbacks.append(recorder)
    cli.trainer.fit(cli.model, cli.datamodule)
    assert recorder.zero_grad_params == []
    n_params = sum(1 for p in cli.model.parameters() if p.requires_grad)
    assert n_params > 20


def test_optimizer_groups_and_lr_ratio(synthetic_task_dir, synthetic_eval_dir, tmp_path):
    cli = build_tiny(synthetic_task_dir, synthetic_eval_dir, tmp_path, "--trainer.max_steps=3",
                     "--model.encoder_lr_scale=0.1", "--model.lr_warmup_steps=0")
    cli.trainer.fit(cli.model, cli.datamodule)
    groups = {g["name"]: g for g in cli.trainer.optimizers[0].param_groups}
    assert set(groups) == {"encoder", "trm"}
    assert groups["encoder"]["lr"] == pytest.approx(0.1 * groups["trm"]["lr"])
    assert groups["trm"]["lr"] == pytest.approx(1e-3)
    enc_ids = {id(p) for p in cli.model.model.conditioner.parameters()}
    assert {id(p) for p in groups["encoder"]["params"]} == enc_ids
    assert groups["trm"]["betas"] == (0.9, 0.95)


def test_fit_logs_required_tags_and_checkpoints(synthetic_task_dir, synthetic_eval_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cli = run_tiny("fit", synthetic_task_dir, synthetic_eval_dir, tmp_path, "--trainer.max_steps=6")
    log_dir = cli.trainer.log_dir
    ea = EventAccumulator(log_dir)
    ea.Reload()
    tags = set(ea.Tags()["scalars"])
    for tag in ["train/lm_loss", "train/accuracy", "train/exact_accuracy", "train/q_halt_loss", "train/steps",
                "val/exact_accuracy", "val_seen/exact_accuracy", "lr/encoder", "lr/trm"]:
        assert tag in tags, (tag, sorted(tags))
    import os

    ckpts = os.listdir(os.path.join(log_dir, "checkpoints"))
    assert "last.ckpt" in ckpts
    assert os.path.exists(os.path.join(log_dir, "config.yaml"))
    # the saved config runs validate/test again with the checkpoint
    cli2 = run_tiny("test", synthetic_task_dir, synthetic_eval_dir, tmp_path,
                    f"--ckpt_path={os.path.join(log_dir, 'checkpoints', 'last.ckpt')}")
    metrics = cli2.trainer.callback_metrics
    assert "test/exact_accuracy" in metrics and "ARC/pass@2" in metrics
    test_dir = cli2.trainer.log_dir
    assert os.path.exists(os.path.join(test_dir, "submission.json"))
    details = json.loads(open(os.path.join(test_dir, "eval_details.json")).read())
    assert details["tasks_evaluated"] == 6 and details["protocol"] == "held-out"  # every held-out task, no adaptation


def test_fast_dev_run_writes_nothing(synthetic_task_dir, synthetic_eval_dir, tmp_path, monkeypatch):
    """A fast_dev_run has no run directory (Lightning replaces the loggers by a dummy): it saves no checkpoint, status
    or alert record, in the current directory or anywhere, as Lightning's ModelCheckpoint means it. A ``stop`` alert
    still warns and stops."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    always = {"class_path": "RepresentationCollapse", "init_args": {"min_normalized_var": 1.1, "patience": 1,
                                                                     "action": "stop"}}
    overlay = tmp_path / "alert.yaml"
    overlay.write_text(json.dumps({"trainer": {"callbacks": [  # JSON is YAML
        {"class_path": "callbacks.EncoderDiagnostics", "init_args": {"every_n_steps": 1, "probe_tasks": 6}},
        {"class_path": "callbacks.CollapseAlert", "init_args": {"check_every_n_steps": 1, "rules": [always]}}]}}))
    with pytest.warns(UserWarning, match="under fast_dev_run: no alert checkpoint"):
        cli = run_tiny("fit", synthetic_task_dir, synthetic_eval_dir, tmp_path / "runs", "--config", str(overlay),
                       "--trainer.fast_dev_run=3", "--last_checkpoint.every_n_train_steps=1")
    assert cli.trainer.global_step == 1 and cli.trainer.should_stop
    assert list(cwd.iterdir()) == [] and not (tmp_path / "runs").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["alert.yaml", "cwd"]


def test_train_metrics_count_only_halted_rows(synthetic_task_dir, synthetic_eval_dir, tmp_path):
    # halt_max_steps 3 and q_head bias -5: no row halts before step 3, so steps 1-2 count nothing
    cli = build_tiny(synthetic_task_dir, synthetic_eval_dir, tmp_path, "--trainer.max_steps=3",
                     "--trainer.log_every_n_steps=100", "--model.halt_exploration_prob=0.0")
    counts = []

    class Spy(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            counts.append(int(outputs["halted"].sum()))

    cli.trainer.callbacks.append(Spy())
    cli.trainer.fit(cli.model, cli.datamodule)
    assert counts == [0, 0, 4]
    assert cli.model.train_metrics.count.item() == 4


def test_seed_knobs_reach_the_model_through_the_cli(synthetic_task_dir, synthetic_eval_dir, tmp_path):
    base = build_tiny(synthetic_task_dir, synthetic_eval_dir, tmp_path).model.model
    cases = {
        "conditioner.num_layers=3": lambda m: len(m.conditioner.grid_encoder.layers) == 3,
        "puzzle_emb_len=5": lambda m: m.conditioner.set_encoder.queries.shape[0] == 5 and m.trm.prefix_len == 5,
        "conditioner.pooling_method=attention": lambda m: hasattr(m.conditioner.grid_encoder, "pool_attn"),
        "conditioner.set_layers=2": lambda m: len(m.conditioner.set_encoder.layers) == 2,
        "conditioner.layer_scale_init=0.001": lambda m: any(n.endswith("gamma") for n, _ in m.conditioner.named_parameters()),
        "conditioner.norm_style=pre": lambda m: m.conditioner.grid_encoder.layers[0].norm_style == "pre",
        "H_cycles=3": lambda m: m.trm.H_cycles == 3,
    }
    for arg, check in cases.items():
        model = build_tiny(synthetic_task_dir, synthetic_eval_dir, tmp_path, f"--model.{arg}").model.model
        assert check(model), arg
        assert not check(base), arg


def test_canvas_size_is_linked_from_data(synthetic_task_dir, synthetic_eval_dir, tmp_path):
    cli = build_tiny(synthetic_task_dir, synthetic_eval_dir, tmp_path, "--data.canvas_size=7")
    assert cli.model.hparams.canvas_size == 7
    assert cli.model.model.trm.rope.cos.shape[0] == 2 + 49


def test_validation_rollout_is_deterministic(synthetic_task_dir, synthetic_eval_dir, tmp_path):
    cli = build_tiny(synthetic_task_dir, synthetic_eval_dir, tmp_path)
    cli.datamodule.setup("validate")
    batch = next(iter(cli.datamodule.val_dataloader()[0]))
    model = cli.model.eval()
    with torch.no_grad():
        a = model.model.rollout(batch).logits
        b = model.model.rollout(batch).logits
    assert torch.equal(a, b)


def test_ema_weights_are_evaluated_and_checkpointed(synthetic_task_dir, synthetic_eval_dir, tmp_path):
    cli = build_tiny(synthetic_task_dir, synthetic_eval_dir, tmp_path, "--trainer.max_steps=6",
                     "--trainer.callbacks+=callbacks.EMA", "--trainer.callbacks.decay=0.9")
    seen = {}

    class WeightSpy(Callback):
        def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
            seen["val"] = pl_module.model.trm.lm_head.weight.detach().clone()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen["train"] = pl_module.model.trm.lm_head.weight.detach().clone()

    cli.trainer.callbacks.append(WeightSpy())
    cli.trainer.fit(cli.model, cli.datamodule)
    ckpt = torch.load(_last_ckpt(cli), weights_only=False)
    ema, live = ckpt["state_dict"]["model.trm.lm_head.weight"], ckpt["current_model_state"]["model.trm.lm_head.weight"]
    assert not torch.equal(ema, live)  # the checkpoint keeps both: EMA as state_dict, live weights beside it
    assert "averaging_state" in ckpt
    assert not torch.equal(seen["val"], seen["train"])  # validation ran on the averaged weights


def test_ema_averages_parameters_only_and_keeps_the_live_buffers(synthetic_task_dir, synthetic_eval_dir, tmp_path):
    """TRM's EMA: the puzzle table (a buffer) is not averaged, and no constant buffer drifts by rounding."""
    cli = build_tiny(synthetic_task_dir, synthetic_eval_dir, tmp_path, "--trainer.max_steps=6", "--model.lr_warmup_steps=0",
                     "--model.conditioner=PuzzleEmbedding", "--data.train_on_eval_demos=true",
                     "--data.num_train_augmentations=3", "--trainer.callbacks+=callbacks.EMA", "--trainer.callbacks.decay=0.5")
    rope = cli.model.model.trm.rope.cos.clone()
    seen = {}

    class Spy(Callback):
        def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
            seen["rope"] = pl_module.model.trm.rope.cos.clone()  # with the averaged weights swapped in

    cli.trainer.callbacks.append(Spy())
    cli.trainer.fit(cli.model, cli.datamodule)
    ckpt = torch.load(_last_ckpt(cli), weights_only=False)
    averaged, live = ckpt["state_dict"], ckpt["current_model_state"]
    assert not torch.equal(averaged["model.trm.lm_head.weight"], live["model.trm.lm_head.weight"])
    table = live["model.conditioner.weights"]
    assert table.abs().sum() > 0 and torch.equal(averaged["model.conditioner.weights"], table)  # the live table
    assert torch.equal(seen["rope"], rope)  # exact constants in validation, however many updates


def test_puzzle_emb_baseline_trains_its_table_by_sign_steps(synthetic_task_dir, synthetic_eval_dir, tmp_path):
    cli = build_tiny(
        synthetic_task_dir, synthetic_eval_dir, tmp_path, "--trainer.max_steps=4", "--model.lr_warmup_steps=0",
        "--model.conditioner=PuzzleEmbedding", "--model.puzzle_emb_lr=0.01", "--model.puzzle_emb_weight_decay=0.0",
        "--data.train_on_eval_demos=true", "--data.num_train_augmentations=3",
    )
    model, dm = cli.model, cli.datamodule
    table = model.model.conditioner
    assert isinstance(table, PuzzleEmbedding)
    n_tasks = len(dm.train_tasks) + len(dm.eval_tasks)
    assert table.num_ids == 1 + n_tasks * 3 == dm.num_puzzle_ids
    recorder = GradRecorder()
    cli.trainer.callbacks.append(recorder)
    cli.trainer.fit(model, dm)
    assert recorder.zero_grad_params == []  # every TRM parameter is reached through the puzzle prefix
    groups = {g["name"] for g in cli.trainer.optimizers[0].param_groups}
    assert groups == {"trm"}  # the table is never an AdamW parameter
    table = table.weights
    touched = table.abs().sum(1) > 0
    assert touched.sum() > 0 and not touched[0]  # trained rows, and the blank id stays zero
    # SignSGD with lr 0.01, no decay, 4 steps: every entry is a multiple of 0.01 of magnitude <= 0.04
    values = table[touched]
    assert torch.allclose(values / 0.01, (values / 0.01).round(), atol=1e-4) and values.abs().max() <= 0.04 + 1e-6
    ckpt = torch.load(_last_ckpt(cli), weights_only=False)
    saved = ckpt["state_dict"]["model.conditioner.weights"]  # the table is checkpointed (a persistent buffer)
    assert saved.shape == table.shape and saved.abs().sum() > 0


def test_the_first_three_learning_rates_are_trms(synthetic_task_dir, synthetic_eval_dir, tmp_path):
    """TRM counts steps from 1: lr 1e-4, warmup 2000 gives 5e-8, 1e-7, 1.5e-7 (not 0, 5e-8, 1e-7), for the encoder
    group (x encoder_lr_scale), the TRM group and the puzzle table (x puzzle_emb_lr / lr)."""
    seen: dict[str, list[float]] = {"encoder": [], "trm": [], "table": []}

    class Spy(Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            for g in optimizer.param_groups:
                seen[g["name"]].append(g["lr"])

    for conditioner in ("StandardDemoEncoder", "PuzzleEmbedding"):
        cli = build_tiny(synthetic_task_dir, synthetic_eval_dir, tmp_path / conditioner, "--trainer.max_steps=3",
                         "--model.lr=1e-4", "--model.lr_warmup_steps=2000", "--model.encoder_lr_scale=0.5",
                         "--model.puzzle_emb_lr=1e-2", "--model.optimizer=adam_atan2",
                         f"--model.conditioner={conditioner}", "--data.train_on_eval_demos=true",
                         "--data.num_train_augmentations=2")
        table = cli.model.model.conditioner
        if isinstance(table, PuzzleEmbedding):
            real = table.sign_update
            table.sign_update = lambda lr, wd, gather=None: (seen["table"].append(lr), real(lr, wd, gather))[1]
        cli.trainer.callbacks.append(Spy())
        cli.trainer.fit(cli.model, cli.datamodule)
        assert type(cli.trainer.optimizers[0]).__name__ == "AdamATan2"
    assert seen["trm"] == pytest.approx([5e-8, 1e-7, 1.5e-7] * 2)
    assert seen["encoder"] == pytest.approx([2.5e-8, 5e-8, 7.5e-8])
    assert seen["table"] == pytest.approx([5e-6, 1e-5, 1.5e-5])
