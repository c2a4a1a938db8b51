"""``model.compile``: the compiled TRM net and demo encoder give the eager numbers (forward and gradient), on the
CPU through inductor. Slow: compiling takes about a minute."""

from __future__ import annotations

import pytest
import torch

from tests.integration.helpers import build_tiny

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("attention", ["buckets", "packed"])
def test_compiled_model_matches_eager(tmp_path, synthetic_task_dir, synthetic_eval_dir, one_thread, attention):
    layout = f"--model.conditioner.attention={attention}"
    eager = build_tiny(synthetic_task_dir, synthetic_eval_dir, tmp_path / "a", layout)
    compiled = build_tiny(synthetic_task_dir, synthetic_eval_dir, tmp_path / "b", "--model.compile=true", layout)
    assert compiled.model.model.conditioner.grid_encoder.attention == attention
    assert compiled.model.model.trm.use_compile and compiled.model.model.conditioner.grid_encoder.use_compile
    compiled.model.load_state_dict(eager.model.state_dict())
    eager.datamodule.setup("fit")
    batch = next(iter(eager.datamodule.train_dataloader()))
    assert int(batch["demo_mask"].sum()) > batch["demo_mask"].shape[0]  # several demos, several bucket widths

    for cli in (eager, compiled):
        cli.model.eval()
    with torch.no_grad():
        want, want_q, _ = eager.model.model.rollout(batch)
        got, got_q, _ = compiled.model.model.rollout(batch)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got_q, want_q, rtol=1e-4, atol=1e-4)

    grads = []
    for cli in (eager, compiled):
        cli.model.zero_grad()
        context = cli.model.model.encode(batch)
        (context * torch.linspace(-1, 1, context.numel()).view_as(context)).sum().backward()
        grads.append({n: p.grad.clone() for n, p in cli.model.model.conditioner.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for name, want_grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], want_grad, rtol=1e-4, atol=1e-5, msg=name)
