"""TRMLitModule: trains and evaluates an :class:`~trm_lightning.models.encoder_trm.EncoderTRM` (``self.model``).

The model (conditioner + TRM core, its ACT step and its rollout) is a plain ``nn.Module`` in ``models/``; this module
holds only what Lightning is for: the optimisation (named parameter groups ``encoder``/``trm``, warmup + cosine,
the puzzle table's SignSGD step), the ACT carry between training steps, logging, and the evaluation loops with the
ARC evaluator.

Training (DESIGN §2-3): the ACT carry lives on the module (``self._carry``, a plain attribute). Each step,
``model.act_step`` loads the batch into the rows that halted, re-encodes every row and runs one ACT step; the loss
is ``lm + q_halt_loss_weight * BCE(q_halt, exact)``. Metrics count the rows that halt at this step, summed over
``trainer.log_every_n_steps`` steps and over ranks before they are logged.

Validation/test: ``model.rollout`` per batch (a fresh carry, halting off, exactly ``halt_max_steps`` steps, the
context computed once). Two validation views: ``val/`` (held-out tasks) and ``val_seen/`` (training tasks under
augmentations never drawn in training).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import asdict
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.trainer.states import TrainerStatus
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from trm_lightning import resume
from trm_lightning.architecture import architecture_mismatch, conditioner_spec
from trm_lightning.checks import check_at_least, check_divisible, check_greater, check_probability, check_range
from trm_lightning.errors import ConfigError
from trm_lightning.adaptation import AdaptationConfig, VotingRun, protocol
from trm_lightning.losses import act_loss
from trm_lightning.metric_names import LR, TEST, TRAIN, TRAIN_CONTRASTIVE_LOSS, VAL_VIEWS, pass_at, split_metric
from trm_lightning.metrics import ACTMetrics
from trm_lightning.models.conditioning import ConditionerFactory, ConditionerShape, PuzzleEmbedding
from trm_lightning.models.encoder import StandardDemoEncoder
from trm_lightning.models.encoder_trm import EncoderTRM
from trm_lightning.models.trm import ACTCarry, TinyRecursiveModel
from trm_lightning.optim import TRMSchedule, build_optimizer, named_param_groups
from trm_lightning.pretrained import load_trm_weights, provenance
from trm_lightning.regularisers import contrastive_views, info_nce
from trm_lightning.trainer_state import ignore_in_ddp, is_logging_step
from trm_lightning.vocab import VOCAB_SIZE

POSITIVE_INTS = ("canvas_size", "hidden_size", "num_heads", "L_layers", "H_cycles", "L_cycles", "halt_max_steps",
                 "puzzle_emb_len", "num_puzzle_ids")
NON_NEGATIVE = ("q_halt_loss_weight", "changed_cell_weight", "lr", "encoder_lr_scale", "weight_decay",
                "lr_warmup_steps", "freeze_trm_steps", "freeze_encoder_steps", "puzzle_emb_lr", "puzzle_emb_weight_decay",
                "context_contrastive_weight")


def check_arguments(hp: Mapping[str, Any]) -> None:
    """Every numeric argument of :class:`TRMLitModule` in its allowed range, else one ``ConfigError`` line naming
    ``model.<key>``, the value and the range (before anything is built)."""
    for key in POSITIVE_INTS:
        check_at_least(f"model.{key}", hp[key], 1)
    for key in NON_NEGATIVE:
        check_at_least(f"model.{key}", hp[key], 0)
    check_divisible("model.hidden_size", hp["hidden_size"], "model.num_heads", hp["num_heads"])
    if (hp["hidden_size"] // hp["num_heads"]) % 2:
        raise ConfigError(f"model.hidden_size / model.num_heads = {hp['hidden_size'] // hp['num_heads']} must be even "
                          "(rotary position embeddings rotate pairs of dimensions)")
    if hp["pos_encoding"] == "rope2d" and (hp["hidden_size"] // hp["num_heads"]) % 4:
        raise ConfigError(f"model.pos_encoding=rope2d needs model.hidden_size / model.num_heads divisible by 4, got "
                          f"{hp['hidden_size'] // hp['num_heads']} (half of each head's rotary pairs turn with the row)")
    check_greater("model.expansion", hp["expansion"], 0)
    check_probability("model.halt_exploration_prob", hp["halt_exploration_prob"])
    check_probability("model.lr_min_ratio", hp["lr_min_ratio"])
    check_range("model.beta1", hp["beta1"], 0.0, 1.0, high_open=True)
    check_range("model.beta2", hp["beta2"], 0.0, 1.0, high_open=True)
    check_greater("model.context_contrastive_temperature", hp["context_contrastive_temperature"], 0)


def _adaptation_config(value: AdaptationConfig | Mapping[str, Any] | None) -> AdaptationConfig | None:
    """The adaptation config from what ``__init__`` got (an instance, or a mapping as a checkpoint stores it)."""
    if value is None or isinstance(value, AdaptationConfig):
        return value
    return AdaptationConfig(**dict(vars(value) if hasattr(value, "__dict__") and not isinstance(value, Mapping)
                                   else value))


def _factory(conditioner: ConditionerFactory | Mapping[str, Any]) -> ConditionerFactory:
    """The conditioner factory from what ``__init__`` got: a class or partial, or a stored ``class_path`` spec (a
    checkpoint's hyperparameters loaded without LightningCLI)."""
    if not isinstance(conditioner, Mapping):
        return conditioner
    spec = conditioner_spec(conditioner)
    module, _, name = spec["class_path"].rpartition(".")
    cls = getattr(__import__(module, fromlist=[name]), name)
    return functools.partial(cls, **spec["init_args"])


class TRMLitModule(LightningModule):
    """Encoder-conditioned Tiny Recursive Model.

    Args:
        canvas_size: side of the token canvas (linked from ``data.canvas_size``).
        hidden_size: width D shared by the conditioner and the TRM core.
        num_heads: attention heads in both.
        expansion: SwiGLU expansion factor.
        L_layers: blocks in TRM's single shared net.
        H_cycles: TRM outer cycles per ACT step (the first H_cycles-1 without gradient).
        L_cycles: TRM latent updates per cycle.
        halt_max_steps: ACT steps before a row must halt; evaluation always runs this many.
        halt_exploration_prob: chance a training row gets a random minimum number of steps.
        puzzle_emb_len: context tokens the conditioner emits (the TRM prefix length).
        conditioner: what fills the TRM prefix, a class name with its knobs as ``init_args``:
            ``StandardDemoEncoder`` (the default: the seed's demo encoder; knobs num_layers, pooling_method,
            set_layers, layer_scale_init, norm_style, transform, test_conditioning, crop_buckets, described by
            ``trm fit --model.conditioner.help StandardDemoEncoder``) or ``PuzzleEmbedding`` (the original TRM: a
            learned vector per puzzle id, no demos read; pair it with ``data.train_on_eval_demos`` for TRM's
            protocol, configs/arc1/puzzle_emb_trm.yaml), or any ``Conditioner`` subclass by its import path.
        num_puzzle_ids: rows of the puzzle-id table (linked from ``data.num_puzzle_ids``).
        compile: ``torch.compile`` the TRM core's shared net and the demo encoder's per-bucket encoding (with
            dynamic shapes), never the whole module; for GPUs.
        forward_dtype: the TRM core's activation dtype (TRM's ``forward_dtype``): ``float32``, or ``bfloat16`` as in
            TRM's configs (embeddings, initial states, residual stream and carry in bf16, fp32 master weights,
            norms, RoPE and the loss as TRM computes them). For GPUs, with ``trainer.precision: bf16-mixed``.
        loss_type: token loss, stablemax (TRM, fp64) or softmax.
        q_halt_loss_weight: weight of the halting BCE.
        optimizer: ``adamw`` (torch's AdamW) or ``adam_atan2`` (TRM's AdamATan2: no eps, steps bounded by
            lr x pi/2, about 0.785x AdamW's on a steady gradient, so learning rates do not transfer between them).
        lr: base learning rate (the TRM group).
        encoder_lr_scale: the conditioner's parameters (group ``encoder``) train at lr x this (0 freezes them).
        weight_decay: decoupled weight decay, on all parameters as in TRM.
        beta1: beta1 of the optimizer's first moment.
        beta2: beta2 of its second moment.
        lr_warmup_steps: linear warmup steps; as in TRM the first optimizer step already has 1/lr_warmup_steps of
            the rate.
        lr_min_ratio: cosine floor as a fraction of lr at the last step; 1.0 = constant after warmup.
        freeze_trm_steps: the TRM core's learning rate is 0 for this many first optimizer steps (seed H6: train
            the encoder first); its weights stay bit-identical meanwhile, then follow the normal schedule.
        freeze_encoder_steps: the same for the conditioner (demo encoder or puzzle table).
        trm_init_ckpt: initialise the TRM core (its weights only) from this checkpoint before training. The run
            prints what data that checkpoint was trained on and whether it saw this run's evaluation tasks.
        puzzle_emb_lr: SignSGD learning rate of the puzzle table (TRM ARC: 1e-2), same warmup/cosine shape.
        puzzle_emb_weight_decay: decoupled weight decay of the touched table rows (TRM ARC: 0.1).
        adaptation: test-time adaptation for ``trm test`` and ``trm predict``, none by default: e.g.
            ``--model.adaptation.methods '[context, finetune]'`` adapts every evaluation task on its own demo pairs
            (never its test outputs) and prints each result beside the unadapted one (trm_lightning/adaptation.py).
        context_contrastive_weight: weight of the demo-subset contrastive loss (``trm_lightning.regularisers``: the
            contexts of two disjoint demo subsets of a row must match each other rather than other rows'), a
            regulariser against memorisation; 0 (the default) computes nothing.
        context_contrastive_temperature: its InfoNCE temperature.
        changed_cell_weight: in the training loss, each supervised cell whose target differs from the input's
            token at the same place weighs this much, the others 1 (each row's cross-entropy is the weighted mean).
            1 (the default) is TRM's loss. Against the copy-the-input optimum: on most rules most cells are copied,
            so a model that only copies already gets most of the loss right.
        context_broadcast: the TRM core also adds the mean context token to every grid token's input embedding, so
            each cell reads the conditioning directly at every latent update, not only by attending to the prefix.
            False (the default) is TRM's input.
        pos_encoding: the TRM core's positions: ``rope`` (TRM's 1-D RoPE over the flattened prefix and canvas) or
            ``rope2d`` (axial RoPE: half of each head's frequencies turn with a cell's row, half with its column, the
            prefix at row 0, column 0; the head dimension must be divisible by 4). The demo encoder has its own
            knob, ``model.conditioner.pos_encoding``.
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
        conditioner: ConditionerFactory = StandardDemoEncoder,
        num_puzzle_ids: int = 1,
        compile: bool = False,
        forward_dtype: Literal["float32", "bfloat16"] = "float32",
        loss_type: Literal["stablemax", "softmax"] = "stablemax",
        q_halt_loss_weight: float = 0.5,
        optimizer: Literal["adamw", "adam_atan2"] = "adamw",
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
        puzzle_emb_lr: float = 1e-2,
        puzzle_emb_weight_decay: float = 0.1,
        adaptation: AdaptationConfig | None = None,
        context_contrastive_weight: float = 0.0,
        context_contrastive_temperature: float = 0.1,
        changed_cell_weight: float = 1.0,
        context_broadcast: bool = False,
        pos_encoding: Literal["rope", "rope2d"] = "rope",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        check_arguments(self.hparams)
        self._adaptation = _adaptation_config(self.hparams["adaptation"])
        self.hparams["adaptation"] = asdict(self._adaptation) if self._adaptation is not None else None
        # plain data (class_path + init_args, defaults filled in): checkpoints load with weights_only=True
        self.hparams["conditioner"] = conditioner_spec(self.hparams["conditioner"])
        self.model = self._build_model()
        if context_contrastive_weight > 0 and not self.model.conditioner.reads_demos:
            raise ConfigError("model.context_contrastive_weight needs a conditioner that reads the demos "
                              f"({type(self.model.conditioner).__name__} does not)")
        if isinstance(self.model.conditioner, PuzzleEmbedding):
            # every rank applies the same sign update: DDP must not broadcast the (large) table each step
            ignore_in_ddp(self, ["model.conditioner.weights"])
        # loaded here, not in setup(): EMAWeightAveraging copies the weights in its own setup, which runs first;
        # a resume (--ckpt_path) restores its checkpoint over these afterwards
        self._init_data_hparams = load_trm_weights(self.model.trm, trm_init_ckpt) if trm_init_ckpt else None
        self.train_metrics = ACTMetrics()
        self.train_metrics.persistent(True)  # sums between two log steps survive a resume
        self.val_metrics = torch.nn.ModuleDict({view: ACTMetrics() for view in VAL_VIEWS})
        self.test_metrics = ACTMetrics()
        self._carry: ACTCarry | None = None  # plain attribute: never a buffer, never averaged by EMA
        self._votes: VotingRun | None = None
        self._resumed_state: dict | None = None  # per-rank carry + RNG from a checkpoint, applied at train start
        self._schedule = None  # the lr factor of each optimizer step (configure_optimizers), the table follows it

    def _build_model(self) -> EncoderTRM:
        """The conditioner (built first: its initialisation draws come before the TRM's) and the TRM core."""
        hp = self.hparams
        shape = ConditionerShape(
            hidden_size=hp.hidden_size, prefix_len=hp.puzzle_emb_len, num_heads=hp.num_heads, expansion=hp.expansion,
            canvas_size=hp.canvas_size, vocab_size=VOCAB_SIZE, num_puzzle_ids=hp.num_puzzle_ids, compile=hp.compile,
        )
        conditioner = _factory(hp.conditioner)(shape)
        trm = TinyRecursiveModel(
            vocab_size=VOCAB_SIZE,
            seq_len=hp.canvas_size * hp.canvas_size,
            hidden_size=hp.hidden_size,
            num_heads=hp.num_heads,
            expansion=hp.expansion,
            num_layers=hp.L_layers,
            H_cycles=hp.H_cycles,
            L_cycles=hp.L_cycles,
            prefix_len=hp.puzzle_emb_len,
            halt_max_steps=hp.halt_max_steps,
            halt_exploration_prob=hp.halt_exploration_prob,
            compile=hp.compile,
            forward_dtype=hp.forward_dtype,
            context_broadcast=hp.context_broadcast,
            pos_encoding=hp.pos_encoding,
        )
        return EncoderTRM(conditioner, trm)

    def setup(self, stage: str) -> None:
        if stage == "fit" and self._init_data_hparams is not None:
            dm = self.trainer.datamodule
            line, leak = provenance(self._init_data_hparams, dm.eval_source, dm.eval_tasks)
            message = f"trm_init_ckpt {self.hparams.trm_init_ckpt}: {line}"
            (rank_zero_warn if leak else rank_zero_info)(message)

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
        hp = self.hparams
        if self._carry is None:
            self._carry = self.model.initial_carry(batch)
        contrastive_on = hp.context_contrastive_weight > 0  # off: not computed, no random draw (bit-identical)
        self._carry, out = self.model.act_step(self._carry, batch, contrastive_views if contrastive_on else None)
        data, steps, halted = self._carry.data, self._carry.steps, self._carry.halted
        weight = None
        if hp.changed_cell_weight != 1.0:  # off: TRM's loss, bit for bit
            changed = data["labels"] != data["inputs"]
            weight = torch.where(changed, hp.changed_cell_weight, 1.0).to(torch.float64)
        loss = act_loss(out.logits, data["labels"], out.q_halt, hp.q_halt_loss_weight, hp.loss_type, cell_weight=weight)
        self.train_metrics.update(
            halted & loss.has_labels, loss.token_accuracy, loss.exact, out.q_halt.detach(), steps, loss.lm_loss,
            loss.q_halt_loss,
        )
        total = loss.loss
        logging = is_logging_step(self._trainer)
        if contrastive_on:
            contrastive = info_nce(*out.views, data["task_index"], hp.context_contrastive_temperature)
            total = total + hp.context_contrastive_weight * contrastive
            if logging:
                self.log(TRAIN_CONTRASTIVE_LOSS, contrastive.detach(), on_step=True, on_epoch=False, sync_dist=True)
        if logging:
            values = self.train_metrics.compute()  # all ranks reach this together: the states are summed
            self.train_metrics.reset()
            self.log_dict({split_metric(TRAIN, k): v for k, v in values.items()}, on_step=True, on_epoch=False)
        return {
            "loss": total,
            "context": out.context.detach(),  # (B, P, D) for the diagnostics callbacks
            "task_index": data["task_index"],  # which task each row is solving
            "exact": loss.exact,
            "halted": halted,
        }

    def training_rows(self) -> dict[str, Tensor] | None:
        """The samples the rows of the ACT carry are working on (None before the first training step): what a
        callback can re-run to measure something about the rows in training (ContextReliance's training signal)."""
        return None if self._carry is None else self._carry.data

    # --------------------------------------------------------------------------------------- evaluation
    def _eval_step(self, batch: dict[str, Tensor], metrics: ACTMetrics) -> dict[str, Tensor]:
        logits, q_halt, context = self.model.rollout(batch)
        out = act_loss(logits, batch["labels"], q_halt, self.hparams.q_halt_loss_weight, self.hparams.loss_type)
        steps = torch.full_like(out.lm_loss, float(self.hparams.halt_max_steps))
        metrics.update(out.has_labels, out.token_accuracy, out.exact, q_halt, steps, out.lm_loss, out.q_halt_loss)
        return {"predictions": out.predictions, "q_halt_logits": q_halt, "exact": out.exact, "context": context}

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor]:
        return self._eval_step(batch, self.val_metrics[VAL_VIEWS[dataloader_idx]])

    def on_validation_epoch_end(self) -> None:
        for view, metrics in self.val_metrics.items():
            if metrics.update_called:
                values = metrics.compute()
                self.log_dict({split_metric(view, k): v for k, v in values.items()}, on_epoch=True)
            metrics.reset()

    def _start_votes(self) -> None:
        dm = self.trainer.datamodule
        # a new evaluator per run: votes never pool across checkpoints or runs; the adaptation's buffers (weights
        # copies, moments) must be ordinary tensors, which Lightning's inference mode here would not make
        with torch.inference_mode(False):
            self._votes = VotingRun(self.model, dm.eval_tasks, dm.test_aug_indices, dm.seed, dm.task_demos,
                                    self._adaptation, progress=self.trainer.is_global_zero)

    def on_test_epoch_start(self) -> None:
        self._start_votes()

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        out = self._eval_step(batch, self.test_metrics)
        self._votes.add_batch(batch, out["predictions"], out["q_halt_logits"])
        return out

    def on_test_epoch_end(self) -> None:
        values = self.test_metrics.compute()
        self.log_dict({split_metric(TEST, k): v for k, v in values.items()}, on_epoch=True)
        self.test_metrics.reset()
        votes = self._finish_votes()
        for method, evaluator in votes.evaluators.items():
            self.log_dict({pass_at(k, method): torch.tensor(r.percent) for k, r in evaluator.results().items()},
                          on_epoch=True)
        written = self._write_votes(votes)
        if self.trainer.is_global_zero:
            for r in votes.evaluators[None].results().values():
                print(r, flush=True)
            if votes.methods:
                print(votes.cost(), flush=True)
                print(votes.side_by_side(2), flush=True)
            print(f"votes from {len(votes.final)} rows; {written}", flush=True)

    def _finish_votes(self) -> VotingRun:
        votes, self._votes = self._votes, None
        votes.gather(self.trainer.strategy)  # every rank: one all_gather of the votes per evaluator
        return votes

    def _write_votes(self, votes: VotingRun) -> str:
        """Write ``submission.json`` (the last method's votes) and ``eval_details.json`` (with every result's
        protocol) into the run directory (rank 0); say where. Every rank calls this (``trainer.log_dir`` is a
        broadcast under DDP). A run without a directory (``fast_dev_run``) writes nothing rather than into the
        working directory."""
        out_dir = self.trainer.log_dir
        if not self.trainer.is_global_zero:
            return ""
        if out_dir is None:
            return "nothing written (this run has no run directory)"
        train_on_eval = bool(self.trainer.datamodule.train_on_eval_demos)
        final = votes.methods[-1] if votes.methods else None
        extra = {"protocol": protocol(self._adaptation, final, train_on_eval), "results": votes.record(train_on_eval)}
        paths = votes.final.write(out_dir, extra)
        return f"wrote {paths['submission']} and {paths['details']}"

    # ---------------------------------------------------------------------------------------- prediction
    def on_predict_epoch_start(self) -> None:
        self._start_votes()

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        """Votes only: nothing is returned, so Lightning keeps no predictions in memory."""
        logits, q_halt, _ = self.model.rollout(batch)
        self._votes.add_batch(batch, logits.argmax(-1), q_halt)

    def on_predict_epoch_end(self) -> None:
        votes = self._finish_votes()
        written = self._write_votes(votes)
        if self.trainer.is_global_zero:
            tasks = len(votes.final.evaluated_task_indices)
            print(f"predict: {tasks} tasks, votes from {len(votes.final)} rows; {written}", flush=True)

    # ---------------------------------------------------------------------------------------- optimiser
    def on_before_optimizer_step(self, optimizer) -> None:
        """The puzzle table's SignSGD step, with the same schedule as the optimizer's groups (TRM's warmup then
        cosine of ``puzzle_emb_lr``), frozen with the conditioner (``freeze_encoder_steps``)."""
        table = self.model.conditioner
        if not isinstance(table, PuzzleEmbedding):
            return
        hp = self.hparams
        lr = self._schedule.lr_at(hp.puzzle_emb_lr, self.global_step, hp.freeze_encoder_steps)
        gather = None
        if self._trainer is not None and self.trainer.world_size > 1:
            gather = lambda t: self.all_gather(t).flatten(0, 1)  # noqa: E731  (world, n, ...) -> (world*n, ...)
        table.sign_update(lr, hp.puzzle_emb_weight_decay, gather)

    def configure_optimizers(self):
        hp = self.hparams
        modules = {"encoder": self.model.conditioner, "trm": self.model.trm}  # a group only with trainable parameters
        groups = named_param_groups(modules, {"encoder": hp.lr * hp.encoder_lr_scale, "trm": hp.lr})
        optimizer = build_optimizer(hp.optimizer, groups, hp.lr, (hp.beta1, hp.beta2), hp.weight_decay)
        total = int(self.trainer.estimated_stepping_batches)
        frozen = {"encoder": hp.freeze_encoder_steps, "trm": hp.freeze_trm_steps}
        schedule = self._schedule = TRMSchedule(optimizer, hp.lr_warmup_steps, total, hp.lr_min_ratio,
                                                [frozen[g["name"]] for g in groups])
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step", "name": LR}}
