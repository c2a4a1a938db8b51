"""Recipe-level parity: this project's training of the puzzle-id TRM (``configs/arc1/puzzle_emb_trm.yaml``'s
settings at tiny size: AdamATan2, TRM's schedule, SignSGD on the puzzle table, stablemax + halting loss, ACT carry
with exploration) against TRM's training loop restated here from ``reference/trm.md`` (§1.2, §1.5, §2, §3, §4.1),
written as that page states it and not through this package's module, loss, optimizer or schedule.

Both start from the same weights, random state and batches (captured from the Lightning run) and train 20 steps in
fp32; every loss must be identical. The TRM core's forward itself (``TinyRecursiveModel``) is shared: its parity with
the official code is a separate check (the same parameters and outputs bit for bit, recorded in the project notes).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback

from tests.integration.helpers import build_tiny
from trm_lightning.models.trm import TinyRecursiveModel

STEPS, LR, WARMUP, WD, EMB_LR, EMB_WD, BETAS = 20, 3e-3, 5, 0.1, 1e-2, 0.1, (0.9, 0.95)


class _Capture(Callback):
    def on_train_start(self, trainer, pl_module):
        self.initial = {k: v.detach().clone() for k, v in pl_module.model.state_dict().items()}
        self.rng = torch.get_rng_state()
        self.batches, self.losses = [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.append({k: v.clone() for k, v in batch.items()})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


# ------------------------------------------------------------------- TRM's loop, restated from reference/trm.md
def _trm_lr(base, step, warmup, total):  # §4.1: warmup from 0 counted from step 1, then constant (min_ratio 1)
    if step < warmup:
        return base * float(step) / float(max(1, warmup))
    return base * (1.0 + max(0.0, 0.0 * 0.5 * (1.0 + math.cos(math.pi * 0.5 * 2.0 * (step - warmup) / (total - warmup)))))


def _log_stablemax(x):  # §2, in float64
    s = torch.where(x < 0, 1 / (1 - x.clamp_max(0)), x.clamp_min(0) + 1)
    return torch.log(s / s.sum(dim=-1, keepdim=True))


class TRMLoop:
    def __init__(self, trm: TinyRecursiveModel, table: torch.Tensor, prefix_len: int, batch: int, total: int):
        self.trm, self.table, self.P, self.B, self.total = trm, table, prefix_len, batch, total
        self.step, self.carry = 0, None
        self.adam = {p: (torch.zeros_like(p), torch.zeros_like(p)) for p in trm.parameters()}

    def train_batch(self, batch):
        self.step += 1
        trm, B = self.trm, self.B
        if self.carry is None:  # §1.5 initial carry: every row halted, so the first batch loads everywhere
            L = self.P + batch["inputs"].shape[1]
            self.carry = dict(y=trm.y_init.expand(B, L, -1), z=trm.z_init.expand(B, L, -1),
                              steps=torch.zeros(B, dtype=torch.int32), halted=torch.ones(B, dtype=torch.bool),
                              data={k: torch.zeros_like(v) for k, v in batch.items()})
        c = self.carry
        h = c["halted"]
        y = torch.where(h[:, None, None], trm.y_init, c["y"])
        z = torch.where(h[:, None, None], trm.z_init, c["z"])
        steps = torch.where(h, 0, c["steps"])
        data = {k: torch.where(h.view(-1, *[1] * (v.dim() - 1)), batch[k], c["data"][k]) for k, v in batch.items()}
        # §1.2: the puzzle vector (a local copy that receives the gradient) in prefix slot 0, zeros after, x sqrt(D)
        ids = data["puzzle_id"].long()
        local = self.table[ids].clone().requires_grad_(True)
        D = local.shape[1]
        puzzle = torch.cat([local.unsqueeze(1), local.new_zeros(B, self.P - 1, D)], dim=1)
        tokens = F.embedding(data["inputs"].long(), trm.embed_tokens.weight)
        x = math.sqrt(D) * torch.cat([puzzle, tokens], dim=1)
        y, z, logits, q = trm(y, z, x)
        q_halt = q[:, 0]
        steps = steps + 1
        # §2 loss: token-mean stablemax CE per row + 0.5 BCE(q_halt, exact), summed over rows
        labels = data["labels"]
        mask = labels != -100
        counts = mask.sum(-1)
        divisor = counts.clamp_min(1).unsqueeze(-1)
        exact = (mask & (logits.argmax(-1) == labels)).sum(-1) == counts
        logp = _log_stablemax(logits.to(torch.float64))
        ce = -torch.where(mask, logp.gather(-1, torch.where(mask, labels, 0).unsqueeze(-1)).squeeze(-1), 0)
        lm_loss = (ce / divisor).sum()
        q_halt_loss = F.binary_cross_entropy_with_logits(q_halt, exact.to(q_halt.dtype), reduction="sum")
        loss = lm_loss + 0.5 * q_halt_loss
        # §1.5 halting in training: q_halt > 0 or the last step, with a random minimum for explored rows
        with torch.no_grad():
            halted = (steps >= trm.halt_max_steps) | (q_halt > 0)
            minimum = (torch.rand_like(q_halt) < trm.halt_exploration_prob) * torch.randint_like(
                steps, low=2, high=trm.halt_max_steps + 1)
            halted = halted & (steps >= minimum)
        self.carry = dict(y=y, z=z, steps=steps, halted=halted, data=data)
        ((1 / B) * loss).backward()
        with torch.no_grad():
            # §3: SignSGD with decoupled decay on the touched rows (gradients of one id summed), then §4.1 AdamATan2
            lr = _trm_lr(EMB_LR, self.step, WARMUP, self.total)
            unique, inverse = ids.unique(return_inverse=True)
            grad = torch.zeros(unique.shape[0], D).scatter_add_(0, inverse.unsqueeze(-1).expand(-1, D), local.grad)
            rows = self.table[unique]
            rows = rows * (1.0 - lr * EMB_WD) - lr * torch.sign(grad)
            self.table[unique] = rows
            lr = _trm_lr(LR, self.step, WARMUP, self.total)
            b1, b2 = BETAS
            for p, (m, v) in self.adam.items():
                g = p.grad
                p.mul_(1 - lr * WD)
                m.copy_(torch.lerp(m, g, 1 - b1))
                v.copy_(torch.lerp(v, g * g, 1 - b2))
                p.sub_(lr * torch.atan2(m / (1 - b1**self.step), v.sqrt() / math.sqrt(1 - b2**self.step)))
                p.grad = None
        return ((1 / B) * loss).float().item()


def test_twenty_steps_of_the_puzzle_id_recipe_equal_trms_loop(tmp_path, synthetic_task_dir, synthetic_eval_dir,
                                                               one_thread):
    cli = build_tiny(
        synthetic_task_dir, synthetic_eval_dir, tmp_path, f"--trainer.max_steps={STEPS}", "--trainer.limit_val_batches=0",
        "--trainer.gradient_clip_val=null", "--model.conditioner=PuzzleEmbedding", "--model.optimizer=adam_atan2",
        f"--model.lr={LR}", f"--model.lr_warmup_steps={WARMUP}", "--model.lr_min_ratio=1.0",
        f"--model.weight_decay={WD}", f"--model.puzzle_emb_lr={EMB_LR}", f"--model.puzzle_emb_weight_decay={EMB_WD}",
        "--model.halt_exploration_prob=0.1", "--data.train_on_eval_demos=true", "--data.num_train_augmentations=3",
    )
    capture = _Capture()
    cli.trainer.callbacks.append(capture)
    cli.trainer.fit(cli.model, cli.datamodule)
    assert len(capture.losses) == STEPS

    hp = cli.model.hparams
    trm = TinyRecursiveModel(seq_len=hp.canvas_size**2, hidden_size=hp.hidden_size, num_heads=hp.num_heads,
                             num_layers=hp.L_layers, H_cycles=hp.H_cycles, L_cycles=hp.L_cycles,
                             prefix_len=hp.puzzle_emb_len, halt_max_steps=hp.halt_max_steps,
                             halt_exploration_prob=hp.halt_exploration_prob)
    trm.load_state_dict({k[len("trm."):]: v for k, v in capture.initial.items() if k.startswith("trm.")})
    table = capture.initial["conditioner.weights"].clone()
    loop = TRMLoop(trm, table, hp.puzzle_emb_len, capture.batches[0]["inputs"].shape[0],
                   int(cli.trainer.estimated_stepping_batches))
    torch.set_rng_state(capture.rng)
    losses = [loop.train_batch(b) for b in capture.batches]
    assert losses == capture.losses  # identical, step by step
    assert torch.equal(loop.table, cli.model.model.conditioner.weights)
    final = cli.model.model.trm.state_dict()
    assert all(torch.equal(v, final[k]) for k, v in trm.state_dict().items())
