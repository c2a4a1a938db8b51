"""TRMLitModule: a demo encoder + the TRM core, trained one ACT step per ``training_step``.

Training (DESIGN §2-3): the ACT carry lives on the module (``self._carry``, a plain attribute). Each step,
halted rows load the batch's row at the same index, the encoder re-encodes the demos of *every* row in the
carry (so it gets gradient from every row), the TRM runs one ACT step, and the loss is
``lm + q_halt_loss_weight * BCE(q_halt, exact)``. Metrics count the rows that halt at this step, summed over
``trainer.log_every_n_steps`` steps and over ranks before they are logged.

Validation/test: a fresh carry per batch, halting off, exactly ``halt_max_steps`` steps, the context computed
once per batch. Two validation views: ``val/`` (held-out tasks) and ``val_seen/`` (training tasks under
augmentations never drawn in training).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.trainer.states import TrainerStatus
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from trm_lightning import resume
from trm_lightning.vocab import VOCAB_SIZE
from trm_lightning.errors import ConfigError
from trm_lightning.evaluation import ARCVoteEvaluator
from trm_lightning.losses import act_loss
from trm_lightning.metrics import ACTMetrics
from trm_lightning.models.conditioning import PuzzleEmbedding
from trm_lightning.models.encoder import StandardDemoEncoder
from trm_lightning.models.trm import ACTCarry, TinyRecursiveModel
from trm_lightning.optim import frozen_then, named_param_groups, warmup_cosine
from trm_lightning.pretrained import load_trm_weights, provenance

VAL_VIEWS = ("val", "val_seen")

# hyperparameters that decide the parameters' shapes or meaning: a checkpoint must agree on all of them
ARCHITECTURE_KEYS = (
    "canvas_size", "hidden_size", "num_heads", "expansion", "L_layers", "puzzle_emb_len", "conditioning",
    "num_puzzle_ids", "encoder_num_layers", "encoder_pooling_method", "encoder_set_layers",
    "encoder_layer_scale_init", "encoder_norm_style", "encoder_transform", "encoder_test_conditioning",
)


def architecture_mismatch(saved: dict, wanted: dict) -> list[str]:
    """``key=saved (config: wanted)`` for every architecture key both know and disagree on."""
    return [
        f"{k}={saved[k]!r} (config: {wanted[k]!r})"
        for k in ARCHITECTURE_KEYS
        if k in saved and wanted.get(k) is not None and saved[k] != wanted[k]
    ]


class TRMLitModule(LightningModule):
    """Encoder-conditioned Tiny Recursive Model.

    Args:
        canvas_size: side of the token canvas (linked from ``data.canvas_size``).
        hidden_size: width D shared by the encoder and the TRM core.
        num_heads: attention heads in both.
        expansion: SwiGLU expansion factor.
        L_layers: blocks in TRM's single shared net.
        H_cycles: TRM outer cycles per ACT step (the first H_cycles-1 without gradient).
        L_cycles: TRM latent updates per cycle.
        halt_max_steps: ACT steps before a row must halt; evaluation always runs this many.
        halt_exploration_prob: chance a training row gets a random minimum number of steps.
        puzzle_emb_len: context tokens the encoder emits (the TRM prefix length).
        encoder_num_layers: transformer layers of the per-demo grid encoder.
        encoder_pooling_method: how a demo's tokens become one vector: mean, attention or weighted.
        encoder_set_layers: cross-attention layers of the set encoder over the demos.
        encoder_layer_scale_init: CaiT layer-scale init of the encoder's residual branches (0 = off).
        encoder_norm_style: encoder blocks with post-norm (TRM style) or pre-norm.
        encoder_transform: what the encoder reads of a demo pair (seed §1): ``concat`` ([input; output], the
            seed's), ``diff`` (plus per-cell "colour in -> colour out" tokens) or ``cross`` (each grid attends
            within itself, then to the input grid; the output grid is pooled).
        encoder_test_conditioning: the set encoder also attends to the encoded test input (the context then
            depends on the query, not only on the task's demos).
        encoder_crop_buckets: encode only the real cells of each demo pair, sorted into this many length
            buckets (0 = the whole canvas; the output is the same, only the compute differs). 16 measured
            fastest on an H200 at the ARC config (benchmarks/RESULTS.md: 2, 4, 8, 16, 32).
        loss_type: token loss, stablemax (TRM, fp64) or softmax.
        q_halt_loss_weight: weight of the halting BCE.
        lr: base learning rate (the TRM group).
        encoder_lr_scale: the encoder group's lr is lr x this (0 freezes the encoder's updates).
        weight_decay: AdamW decoupled weight decay, on all parameters as in TRM.
        beta1: AdamW beta1.
        beta2: AdamW beta2.
        lr_warmup_steps: linear warmup steps from 0.
        lr_min_ratio: cosine floor as a fraction of lr at the last step; 1.0 = constant after warmup.
        freeze_trm_steps: the TRM core's learning rate is 0 for this many first optimizer steps (seed H6: train
            the encoder first); its weights stay bit-identical meanwhile, then follow the normal schedule.
        freeze_encoder_steps: the same for the conditioner (demo encoder or puzzle table).
        trm_init_ckpt: initialise the TRM core (``trm.*`` weights) from this checkpoint before training. The
            run prints what data that checkpoint was trained on and whether it saw this run's evaluation tasks.
        compile: ``torch.compile`` the TRM core's shared net and the demo encoder's per-bucket encoding (with
            dynamic shapes), never the whole module; for GPUs.
        conditioning: what fills the TRM prefix: ``encoder`` (the demo encoder) or ``puzzle_emb`` (the
            original TRM: a learned vector per puzzle id, no demos read; pair it with
            ``data.train_on_eval_demos`` for TRM's protocol, configs/arc1/puzzle_emb_trm.yaml).
        num_puzzle_ids: rows of the puzzle-id table (linked from ``data.num_puzzle_ids``).
        puzzle_emb_lr: SignSGD learning rate of the puzzle table (TRM ARC: 1e-2), same warmup/cosine shape.
        puzzle_emb_weight_decay: decoupled weight decay of the touched table rows (TRM ARC: 0.1).
    """

    def __init__(
        self,
        canvas_size: int = 30,
        hidden_size: int = 512,
        num_heads: int = 8,
        expansion: float = 4.0,
        L_layers: int = 2,
        H_cycles: int = 3,
        L_cycles: int = 4,
        halt_max_steps: int = 16,
        halt_exploration_prob: float = 0.1,
        puzzle_emb_len: int = 16,
        encoder_num_layers: int = 2,
        encoder_pooling_method: Literal["mean", "attention", "weighted"] = "mean",
        encoder_set_layers: int = 1,
        encoder_layer_scale_init: float = 0.0,
        encoder_norm_style: Literal["post", "pre"] = "post",
        encoder_transform: Literal["concat", "diff", "cross"] = "concat",
        encoder_test_conditioning: bool = False,
        encoder_crop_buckets: int = 16,
        loss_type: Literal["stablemax", "softmax"] = "stablemax",
        q_halt_loss_weight: float = 0.5,
        lr: float = 1e-4,
        encoder_lr_scale: float = 1.0,
        weight_decay: float = 0.1,
        beta1: float = 0.9,
        beta2: float = 0.95,
        lr_warmup_steps: int = 2000,
        lr_min_ratio: float = 1.0,
        freeze_trm_steps: int = 0,
        freeze_encoder_steps: int = 0,
        trm_init_ckpt: str | None = None,
        compile: bool = False,
        conditioning: Literal["encoder", "puzzle_emb"] = "encoder",
        num_puzzle_ids: int = 1,
        puzzle_emb_lr: float = 1e-2,
        puzzle_emb_weight_decay: float = 0.1,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.encoder: StandardDemoEncoder | None = None
        self.puzzle_emb: PuzzleEmbedding | None = None
        if conditioning == "puzzle_emb":
            self.puzzle_emb = PuzzleEmbedding(num_puzzle_ids, hidden_size, puzzle_emb_len)
            # every rank applies the same sign update: DDP must not broadcast the (large) table each step
            torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
                self, ["puzzle_emb.weights"]
            )
        elif conditioning == "encoder":
            self.encoder = self._build_encoder()
        else:
            raise ValueError(f"conditioning must be 'encoder' or 'puzzle_emb', got {conditioning!r}")
        self.trm = TinyRecursiveModel(
            vocab_size=VOCAB_SIZE,
            seq_len=canvas_size * canvas_size,
            hidden_size=hidden_size,
            num_heads=num_heads,
            expansion=expansion,
            num_layers=L_layers,
            H_cycles=H_cycles,
            L_cycles=L_cycles,
            prefix_len=puzzle_emb_len,
            halt_max_steps=halt_max_steps,
            halt_exploration_prob=halt_exploration_prob,
            compile=compile,
        )
        # loaded here, not in setup(): EMAWeightAveraging copies the weights in its own setup, which runs first;
        # a resume (--ckpt_path) restores its checkpoint over these afterwards
        self._init_data_hparams = load_trm_weights(self.trm, trm_init_ckpt) if trm_init_ckpt else None
        self.train_metrics = ACTMetrics()
        self.train_metrics.persistent(True)  # sums between two log steps survive a resume
        self.val_metrics = torch.nn.ModuleDict({view: ACTMetrics() for view in VAL_VIEWS})
        self.test_metrics = ACTMetrics()
        self._carry: ACTCarry | None = None  # plain attribute: never a buffer, never averaged by EMA
        self._evaluator: ARCVoteEvaluator | None = None
        self._resumed_state: dict | None = None  # per-rank carry + RNG from a checkpoint, applied at train start

    def _build_encoder(self) -> StandardDemoEncoder:
        hp = self.hparams
        return StandardDemoEncoder(
            hidden_size=hp.hidden_size,
            num_heads=hp.num_heads,
            num_layers=hp.encoder_num_layers,
            output_tokens=hp.puzzle_emb_len,
            pooling=hp.encoder_pooling_method,
            set_layers=hp.encoder_set_layers,
            layer_scale_init=hp.encoder_layer_scale_init,
            norm_style=hp.encoder_norm_style,
            canvas_size=hp.canvas_size,
            vocab_size=VOCAB_SIZE,
            expansion=hp.expansion,
            crop_buckets=hp.encoder_crop_buckets,
            transform=hp.encoder_transform,
            test_conditioning=hp.encoder_test_conditioning,
            compile=hp.compile,
        )

    def setup(self, stage: str) -> None:
        if stage == "fit" and self._init_data_hparams is not None:
            dm = self.trainer.datamodule
            line, leak = provenance(self._init_data_hparams, dm.eval_source, dm.eval_tasks)
            message = f"trm_init_ckpt {self.hparams.trm_init_ckpt}: {line}"
            (rank_zero_warn if leak else rank_zero_info)(message)

    # ------------------------------------------------------------------------------------------- pieces
    def encode(self, data: dict[str, Tensor]) -> Tensor:
        """Context tokens (B, puzzle_emb_len, D) for the rows in ``data``: the demo encoder's, or the
        puzzle-id prefix (``conditioning: puzzle_emb``)."""
        if self.puzzle_emb is not None:
            return self.puzzle_emb(data["puzzle_id"])
        query = data["inputs"] if self.hparams.encoder_test_conditioning else None
        return self.encoder(data["demo_inputs"], data["demo_outputs"], data["demo_mask"], query)

    def rollout(
        self, batch: dict[str, Tensor], context_fn: Callable[[Tensor], Tensor] | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Evaluation: encode once, run exactly ``halt_max_steps`` ACT steps with halting off.

        ``context_fn`` (optional) transforms the context before the TRM sees it (ablations: shuffled or zeroed
        context). Returns the last step's logits (B, S*S, V), q logits (B, 2) and the context used.
        """
        context = self.encode(batch)
        if context_fn is not None:
            context = context_fn(context)
        x = self.trm.embed(batch["inputs"], context)
        carry = self.trm.initial_carry(batch)
        y, z = carry.y, carry.z
        for _ in range(self.trm.halt_max_steps):
            y, z, logits, q = self.trm(y, z, x)
        return logits, q, context

    # ----------------------------------------------------------------------------------------- training
    def on_train_start(self) -> None:
        self._carry = None
        if self._resumed_state is None:
            return
        saved, self._resumed_state = self._resumed_state, None
        state, why = resume.rank_state(saved, self.trainer.world_size, self.global_rank)
        if state is None:
            rank_zero_warn(f"resume: ACT carry and random generators start fresh ({why}); the run continues "
                           "from the checkpoint but not bit for bit as an uninterrupted run would")
            return
        resume.restore_rng(state["rng"])
        self._carry = resume.carry_from_cpu(state["carry"], self.device)

    # ---------------------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Add every rank's ACT carry and RNG states (Lightning calls this on all ranks)."""
        world = self.trainer.world_size
        if world > 1 and self.trainer.state.status == TrainerStatus.INTERRUPTED:
            return  # a crash may have stopped one rank only: no collective here, resume will start these fresh
        local = {"rng": resume.capture_rng(), "carry": resume.carry_to_cpu(self._carry)}
        checkpoint["trm_rank_states"] = {"world_size": world, "ranks": resume.gather_rank_states(local, world)}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Refuse a checkpoint of another architecture with one clear message; keep the per-rank state."""
        differ = architecture_mismatch(checkpoint.get("hyper_parameters", {}), dict(self.hparams))
        if differ:
            raise ConfigError(
                "the checkpoint was trained with another model configuration: " + ", ".join(differ)
                + "; pass the run's own config.yaml with --config"
            )
        self._resumed_state = checkpoint.get("trm_rank_states")

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        if self._carry is None or self._carry.halted.shape[0] != batch["inputs"].shape[0]:
            if self._carry is not None:
                raise RuntimeError("the ACT carry needs a constant per-rank batch size (drop_last=True)")
            self._carry = self.trm.initial_carry(batch)
        carry = self.trm.reset_carry(self._carry, batch)
        data = carry.data
        context = self.encode(data)  # every row, every step, with gradient
        x = self.trm.embed(data["inputs"], context)
        y, z, logits, q = self.trm(carry.y, carry.z, x)
        steps = carry.steps + 1
        q_halt = q[:, 0]
        out = act_loss(logits, data["labels"], q_halt, self.hparams.q_halt_loss_weight, self.hparams.loss_type)
        halted = self.trm.halt(steps, q_halt.detach())
        self._carry = ACTCarry(y=y, z=z, steps=steps, halted=halted, data=data)

        self.train_metrics.update(
            halted & out.has_labels, out.token_accuracy, out.exact, q_halt.detach(), steps, out.lm_loss, out.q_halt_loss
        )
        if self._is_logging_step():
            values = self.train_metrics.compute()  # all ranks reach this together: the states are summed
            self.train_metrics.reset()
            self.log_dict({f"train/{k}": v for k, v in values.items()}, on_step=True, on_epoch=False)
        return {
            "loss": out.loss,
            "context": context.detach(),  # (B, P, D) for the diagnostics callbacks
            "task_index": data["task_index"],  # which task each row is solving
            "exact": out.exact,
            "halted": halted,
        }

    def _is_logging_step(self) -> bool:
        """True at the steps where Lightning writes step-level logs (every ``log_every_n_steps``); False
        without a Trainer (benchmarks call ``training_step`` directly)."""
        return self._trainer is not None and self.trainer._logger_connector.should_update_logs

    # --------------------------------------------------------------------------------------- evaluation
    def _eval_step(self, batch: dict[str, Tensor], metrics: ACTMetrics) -> dict[str, Tensor]:
        logits, q, context = self.rollout(batch)
        out = act_loss(logits, batch["labels"], q[:, 0], self.hparams.q_halt_loss_weight, self.hparams.loss_type)
        steps = torch.full_like(out.lm_loss, float(self.trm.halt_max_steps))
        metrics.update(out.has_labels, out.token_accuracy, out.exact, q[:, 0], steps, out.lm_loss, out.q_halt_loss)
        return {"predictions": out.predictions, "q_halt_logits": q[:, 0], "exact": out.exact, "context": context}

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor]:
        return self._eval_step(batch, self.val_metrics[VAL_VIEWS[dataloader_idx]])

    def on_validation_epoch_end(self) -> None:
        for view, metrics in self.val_metrics.items():
            if metrics.update_called:
                values = metrics.compute()
                self.log_dict({f"{view}/{k}": v for k, v in values.items()}, on_epoch=True)
            metrics.reset()

    def on_test_epoch_start(self) -> None:
        dm = self.trainer.datamodule
        # a new evaluator per test run: votes never pool across checkpoints or runs
        self._evaluator = ARCVoteEvaluator(dm.eval_tasks, seed=dm.seed)

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        out = self._eval_step(batch, self.test_metrics)
        self._evaluator.add_batch(
            batch["task_index"], batch["query_index"], batch["aug_index"], out["predictions"], out["q_halt_logits"]
        )
        return out

    def on_test_epoch_end(self) -> None:
        values = self.test_metrics.compute()
        self.log_dict({f"test/{k}": v for k, v in values.items()}, on_epoch=True)
        self.test_metrics.reset()
        evaluator, self._evaluator = self._evaluator, None
        evaluator.gather(self.trainer.strategy)  # every rank: one all_gather of the votes
        results = evaluator.results()
        out_dir = self.trainer.log_dir or "."  # a broadcast under DDP: every rank, never under is_global_zero
        self.log_dict({f"ARC/pass@{k}": torch.tensor(r.percent) for k, r in results.items()}, on_epoch=True)
        if self.trainer.is_global_zero:
            paths = evaluator.write(out_dir)
            for r in results.values():
                print(r, flush=True)
            print(f"votes from {len(evaluator)} rows; wrote {paths['submission']} and {paths['details']}", flush=True)

    # ---------------------------------------------------------------------------------------- prediction
    def on_predict_epoch_start(self) -> None:
        dm = self.trainer.datamodule
        self._evaluator = ARCVoteEvaluator(dm.eval_tasks, seed=dm.seed)

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        """Votes only: nothing is returned, so Lightning keeps no predictions in memory."""
        logits, q, _ = self.rollout(batch)
        self._evaluator.add_batch(
            batch["task_index"], batch["query_index"], batch["aug_index"], logits.argmax(-1), q[:, 0]
        )

    def on_predict_epoch_end(self) -> None:
        evaluator, self._evaluator = self._evaluator, None
        evaluator.gather(self.trainer.strategy)  # every rank: one all_gather of the votes
        out_dir = self.trainer.log_dir or "."  # a broadcast under DDP: every rank
        if self.trainer.is_global_zero:
            paths = evaluator.write(out_dir)
            tasks = len(evaluator.evaluated_task_indices)
            print(f"predict: {tasks} tasks, votes from {len(evaluator)} rows; wrote {paths['submission']} "
                  f"and {paths['details']}", flush=True)

    # ---------------------------------------------------------------------------------------- optimiser
    def on_before_optimizer_step(self, optimizer) -> None:
        """The puzzle table's SignSGD step, at the lr factor the scheduler gives the TRM group now."""
        if self.puzzle_emb is None:
            return
        hp = self.hparams
        trm_lr = next(g["lr"] for g in optimizer.param_groups if g.get("name") == "trm")
        lr = hp.puzzle_emb_lr * trm_lr / hp.lr if hp.lr > 0 else 0.0
        if self.global_step < hp.freeze_encoder_steps:
            lr = 0.0
        gather = None
        if self._trainer is not None and self.trainer.world_size > 1:
            gather = lambda t: self.all_gather(t).flatten(0, 1)  # noqa: E731  (world, n, ...) -> (world*n, ...)
        self.puzzle_emb.sign_update(lr, hp.puzzle_emb_weight_decay, gather)

    def configure_optimizers(self):
        hp = self.hparams
        modules = {"trm": self.trm} if self.encoder is None else {"encoder": self.encoder, "trm": self.trm}
        groups = named_param_groups(modules, {"encoder": hp.lr * hp.encoder_lr_scale, "trm": hp.lr})
        optimizer = torch.optim.AdamW(groups, lr=hp.lr, betas=(hp.beta1, hp.beta2), weight_decay=hp.weight_decay)
        total = int(self.trainer.estimated_stepping_batches)
        base = warmup_cosine(hp.lr_warmup_steps, total, hp.lr_min_ratio)
        frozen = {"encoder": hp.freeze_encoder_steps, "trm": hp.freeze_trm_steps}
        # one factor per group, in the groups' order: 0 while the group is frozen, the schedule after
        factors = [frozen_then(base, frozen[g["name"]]) for g in groups]
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factors)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step", "name": "lr"}}
