"""The pure model: EncoderTRM's ACT step and rollout, with no Lightning anywhere in ``models/``."""

from __future__ import annotations

import ast
import copy
from pathlib import Path

import pytest
import torch

from trm_lightning.losses import act_loss
from trm_lightning.models.conditioning import ConditionerShape, PuzzleEmbedding
from trm_lightning.models.encoder import StandardDemoEncoder
from trm_lightning.models.encoder_trm import EncoderTRM
from trm_lightning.models.trm import TinyRecursiveModel

MODELS = Path(__file__).resolve().parents[2] / "trm_lightning" / "models"
S, D, P, K = 5, 32, 2, 3


def _model(conditioner: str = "encoder", seed: int = 0) -> EncoderTRM:
    torch.manual_seed(seed)
    shape = ConditionerShape(hidden_size=D, prefix_len=P, num_heads=4, canvas_size=S, num_puzzle_ids=10)
    cond = StandardDemoEncoder(shape, num_layers=1) if conditioner == "encoder" else PuzzleEmbedding(shape)
    trm = TinyRecursiveModel(seq_len=S * S, hidden_size=D, num_heads=4, num_layers=1, H_cycles=2, L_cycles=1,
                             prefix_len=P, halt_max_steps=3, halt_exploration_prob=0.0)
    return EncoderTRM(cond, trm)


def _batch(B: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tokens = lambda *shape: torch.randint(2, 12, shape, generator=g, dtype=torch.int32)  # noqa: E731
    return {
        "demo_inputs": tokens(B, K, S * S), "demo_outputs": tokens(B, K, S * S),
        "demo_mask": torch.tensor([[1, 1, 0]] * B, dtype=torch.bool),
        "inputs": tokens(B, S * S), "labels": tokens(B, S * S).long(),
        "puzzle_id": torch.arange(1, B + 1), "task_index": torch.arange(B),
    }


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("path", sorted(MODELS.glob("*.py")), ids=lambda p: p.name)
def test_models_import_neither_lightning_nor_data(path):
    bad = {n for n in _imports(path) if n.split(".")[0] in {"lightning", "pytorch_lightning", "torchmetrics"}
           or n.startswith("trm_lightning.data") or n.startswith("callbacks")}
    assert not bad, f"{path.name} imports {sorted(bad)}"


@pytest.mark.parametrize("conditioner", ["encoder", "puzzle_emb"])
def test_act_step_loads_trains_and_halts(conditioner):
    model = _model(conditioner).train()
    batch = _batch()
    carry, out = model.act_step(model.initial_carry(batch), batch)
    assert torch.equal(carry.data["inputs"], batch["inputs"])  # every row loaded at the first step
    assert out.logits.shape == (4, S * S, 12) and out.q_halt.shape == (4,) and out.context.shape == (4, P, D)
    assert carry.steps.tolist() == [1, 1, 1, 1] and not carry.halted.any()  # q_head starts at -5: nobody halts
    loss = act_loss(out.logits, carry.data["labels"], out.q_halt).loss
    loss.backward()
    silent = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert silent == []  # the gradient reaches every trainable parameter, the conditioner's included
    for _ in range(2):
        carry, out = model.act_step(carry, batch)
    assert carry.halted.all()  # halt_max_steps = 3
    with pytest.raises(ValueError, match="constant per-rank batch size"):
        model.act_step(carry, _batch(B=3))


def test_rollout_reuses_a_given_context_and_is_deterministic():
    model = _model().eval()
    batch = _batch()
    with torch.no_grad():
        own = model.rollout(batch)
        again = model.rollout(batch, context=model.encode(batch))
        zero = model.rollout(batch, context=torch.zeros_like(own.context))
    assert torch.equal(own.logits, again.logits) and torch.equal(own.q_halt, again.q_halt)
    assert not torch.equal(zero.logits, own.logits)  # the context is read
    assert torch.equal(zero.context, torch.zeros_like(own.context))


def test_a_copy_adapts_without_touching_the_original():
    """What test-time adaptation needs: deepcopy, fine-tune the copy, the original stays bit-identical."""
    model = _model().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batch = _batch()
    with torch.no_grad():
        reference = model.rollout(batch).logits
    adapted = copy.deepcopy(model).train()
    optimizer = torch.optim.SGD(adapted.parameters(), lr=0.1)
    carry = adapted.initial_carry(batch)
    for _ in range(2):
        carry, out = adapted.act_step(carry, batch)
        act_loss(out.logits, carry.data["labels"], out.q_halt).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(model.rollout(batch).logits, reference)
        assert not torch.equal(adapted.eval().rollout(batch).logits, reference)


def test_context_broadcast_adds_the_mean_context_token_to_every_grid_token():
    """``context_broadcast`` puts the prefix's mean token into every cell's input embedding: with it the grid
    embeddings move by exactly that mean, a zero context leaves them as TRM's, and the model's answer changes."""
    model = _model()
    broadcast = copy.deepcopy(model)
    broadcast.trm.context_broadcast = True
    batch = _batch()
    context = model.encode(batch)
    plain, spread = model.trm.embed(batch["inputs"], context), broadcast.trm.embed(batch["inputs"], context)
    assert torch.equal(plain[:, :P], spread[:, :P])  # the prefix itself is unchanged
    torch.testing.assert_close(spread[:, P:] - plain[:, P:], context.mean(1, keepdim=True).expand(-1, S * S, -1))
    zero = torch.zeros_like(context)
    assert torch.equal(model.trm.embed(batch["inputs"], zero), broadcast.trm.embed(batch["inputs"], zero))
    with torch.no_grad():
        assert not torch.allclose(model.rollout(batch).logits, broadcast.rollout(batch).logits)


def test_rope2d_core_changes_the_answer_and_a_bad_value_is_refused():
    model = _model()
    torch.manual_seed(0)
    grid = TinyRecursiveModel(seq_len=S * S, hidden_size=D, num_heads=4, num_layers=1, H_cycles=2, L_cycles=1,
                              prefix_len=P, halt_max_steps=3, halt_exploration_prob=0.0, pos_encoding="rope2d")
    grid.load_state_dict(model.trm.state_dict())  # same weights: only the positions differ
    batch = _batch()
    with torch.no_grad():
        assert not torch.allclose(model.rollout(batch).logits, EncoderTRM(model.conditioner, grid).rollout(batch).logits)
    with pytest.raises(ValueError, match="pos_encoding"):
        TinyRecursiveModel(seq_len=S * S, hidden_size=D, num_heads=4, pos_encoding="alibi")
    with pytest.raises(ValueError, match="square canvas"):
        TinyRecursiveModel(seq_len=S * S + 1, hidden_size=D, num_heads=4, pos_encoding="rope2d")
