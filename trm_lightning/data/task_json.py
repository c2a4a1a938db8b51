"""Tasks written as ARC JSON: one task's ``{"train": [...], "test": [...]}``, a directory of ``<task_id>.json``."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from trm_lightning.data.arc import ArcTask


def task_to_json(task: ArcTask) -> dict:
    """The task in ARC JSON form (``{"train": [...], "test": [...]}``); unknown test outputs are left out."""

    def pair(inp: np.ndarray, out: np.ndarray | None) -> dict:
        item = {"input": inp.tolist()}
        if out is not None:
            item["output"] = out.tolist()
        return item

    return {"train": [pair(i, o) for i, o in task.train], "test": [pair(i, o) for i, o in task.test]}


def write_task_dir(tasks: Sequence[ArcTask], directory: str | Path) -> Path:
    """Write ``<task_id>.json`` for every task into ``directory`` (created if needed) and return it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for task in tasks:
        (directory / f"{task.task_id}.json").write_text(json.dumps(task_to_json(task)), encoding="utf-8")
    return directory
