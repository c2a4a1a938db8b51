"""IgnoredEncoder through the real CLI: a TRM whose context is zeroed inside the model (it cannot read its demos)
fires it; the same run with the real encoder, on tasks whose answer only the demos give, does not.

The tasks: every query input is blank (all background) and the answer fills its grid with the task's colour, which
only the demo outputs show. A TRM that reads the context learns it within a few hundred steps (the
training-time reliance drop then stays well above 0); one that cannot read it stays at drop 0 while its training
accuracy reaches 0.2 (the EOS border and the background are learnable without the demos). Measured: the real
encoder's drop is 0.24-0.55 from step 250 on; the zeroed one's is 0.0 at every check.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import numpy as np
import pytest
from torch import Tensor

from tests.integration.helpers import tiny_args
from trm_lightning.cli import main
from trm_lightning.models.encoder import StandardDemoEncoder

pytestmark = pytest.mark.slow


class ZeroContext(StandardDemoEncoder):
    """Test-only: the seed's encoder with its output zeroed inside the model (the graph still reaches it)."""

    def forward(self, batch: Mapping[str, Tensor]) -> Tensor:
        return 0.0 * super().forward(batch)


def _paint_tasks(directory, seed: int, count: int):
    directory.mkdir()
    rng = np.random.default_rng(seed)
    for t in range(count):
        colour = int(rng.integers(1, 10))

        def pair():
            h, w = (int(x) for x in rng.integers(2, 5, size=2))
            return {"input": [[0] * w for _ in range(h)], "output": [[colour] * w for _ in range(h)]}

        (directory / f"paint{t:03d}.json").write_text(json.dumps({"train": [pair() for _ in range(3)],
                                                                    "test": [pair()]}))
    return directory


def _alert_overlay(path):
    path.write_text(json.dumps({"trainer": {"callbacks": [
        {"class_path": "callbacks.ContextReliance", "init_args": {"train_every_n_steps": 25, "train_rows": 16}},
        {"class_path": "callbacks.CollapseAlert", "init_args": {
            "check_every_n_steps": 25, "warmup_steps": 250,
            "rules": [{"class_path": "IgnoredEncoder", "init_args": {
                "key": "train/reliance_drop_shuffled_cell", "min_drop": 0.02, "patience": 5}}]}}]}}))
    return path


@pytest.mark.parametrize("conditioner, fires", [(f"{__name__}.ZeroContext", True), ("StandardDemoEncoder", False)])
def test_ignored_encoder_fires_only_when_the_context_is_not_read(conditioner, fires, tmp_path, one_thread):
    train, heldout = _paint_tasks(tmp_path / "train", 0, 24), _paint_tasks(tmp_path / "heldout", 1, 6)
    main(["fit", *tiny_args(train, heldout, tmp_path / "runs", "--config", str(_alert_overlay(tmp_path / "a.yaml")),
                            "--trainer.max_steps=500", "--trainer.limit_val_batches=0", "--model.lr=3e-3",
                            "--data.global_batch_size=16", "--data.episodes_per_epoch=64",
                            f"--model.conditioner={conditioner}")])
    run = next((tmp_path / "runs").rglob("config.yaml")).parent
    alerts = [json.loads(line) for line in (run / "alerts.jsonl").open()] if (run / "alerts.jsonl").exists() else []
    assert bool([a for a in alerts if a["rule"] == "ignored_encoder"]) == fires, alerts
    if fires:
        assert alerts[0]["values"] == {"train/reliance_drop_shuffled_cell": 0.0}
        assert alerts[0]["thresholds"]["peak"] >= 0.2
