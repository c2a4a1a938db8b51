"""RunStatus: an end marker in the run directory, so a report can tell finished, crashed and running runs apart.

``<log_dir>/status.json`` holds one record per stage the trainer ran in that directory (``fit``, ``validate``,
``test``, ``predict``), each written on rank 0:

- at ``setup``: ``{"status": "running", "start_time": <unix s>, "pid": ..., "host": ...}``;
- at ``teardown`` (the stage returned normally): ``"finished"``, ``end_time``, ``global_step``,
  ``should_stop`` (True when a callback stopped the run early: a ``stop`` alert, the overfit gate) and, when a
  callback gave one (the overfit gate), ``verdicts`` (``{"OverfitGate": "PASS ..."}``);
- at ``on_exception``: ``"interrupted"`` with ``signal`` (``SIGINT`` or ``SIGTERM``) when a signal stopped it,
  else ``"crashed"``, each with ``error`` = ``"<Type>: <message>"``.

During ``fit`` it also handles Ctrl-C: the first SIGINT stops training at the end of the current step, exactly as
SIGTERM does (:mod:`trm_lightning.lifecycle`), so the ``last.ckpt`` written then is a finished step's; a second
Ctrl-C interrupts at once.

A record still saying ``running`` after its process died (killed, out of memory) is what ``trm report`` calls
crashed without an end marker. The file is replaced atomically, so a reader never sees half of it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from pathlib import Path

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from trm_lightning import lifecycle
from trm_lightning.run_files import STATUS_FILE
from trm_lightning.trainer_state import stop_at_step_end


def read_status(run_dir: str | os.PathLike) -> dict[str, dict]:
    """The records of ``<run_dir>/status.json`` by stage; ``{}`` when the file is absent or unreadable."""
    path = Path(run_dir) / STATUS_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


class RunStatus(Callback):
    """Writes ``status.json`` into the run directory when a stage starts, ends, or raises (see module doc)."""

    def __init__(self) -> None:
        self._log_dir: str | None = None
        self._stage: str | None = None
        self._previous_sigint = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # trainer.log_dir broadcasts under DDP: read it on every rank here, never in on_exception
        self._log_dir = None if trainer.fast_dev_run else trainer.log_dir
        self._stage = stage
        lifecycle.reset()
        if stage == "fit" and threading.current_thread() is threading.main_thread():
            self._previous_sigint = signal.signal(signal.SIGINT, self._make_sigint_handler(trainer))
        self._write(trainer, {"status": "running", "start_time": time.time(), "pid": os.getpid(),
                              "host": socket.gethostname()}, fresh=True)

    def _make_sigint_handler(self, trainer: Trainer):
        def on_sigint(signum, frame) -> None:
            if lifecycle.stop_signal() is not None:  # the second Ctrl-C: stop now
                self._restore_sigint()
                raise KeyboardInterrupt
            lifecycle.note_stop_signal("SIGINT")
            stop_at_step_end(trainer)
            rank_zero_warn("Ctrl-C: training stops after this step and saves last.ckpt; Ctrl-C again to stop now "
                           "(without a checkpoint)")
        return on_sigint

    def _restore_sigint(self) -> None:
        if self._previous_sigint is not None:
            signal.signal(signal.SIGINT, self._previous_sigint)
            self._previous_sigint = None

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._restore_sigint()
        verdicts = {type(cb).__name__: cb.verdict for cb in trainer.callbacks if getattr(cb, "verdict", None)}
        self._write(trainer, {"status": "finished", "end_time": time.time(), "global_step": int(trainer.global_step),
                              "should_stop": bool(trainer.should_stop), **({"verdicts": verdicts} if verdicts else {})})

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._restore_sigint()
        fields = {"status": "crashed"}
        if isinstance(exception, (SIGTERMException, KeyboardInterrupt)):
            # SIGTERMException also ends the first Ctrl-C (stopped at a step's end); a bare KeyboardInterrupt is
            # Ctrl-C outside training or a second one
            default = "SIGTERM" if isinstance(exception, SIGTERMException) else "SIGINT"
            lifecycle.note_stop_signal(default)
            fields = {"status": "interrupted", "signal": lifecycle.stop_signal()}
        self._write(trainer, {**fields, "end_time": time.time(), "global_step": int(trainer.global_step),
                              "error": f"{type(exception).__name__}: {exception}"})

    def _write(self, trainer: Trainer, fields: dict, fresh: bool = False) -> None:
        """Merge ``fields`` into this stage's record (``fresh``: start a new record) and replace the file."""
        if self._log_dir is None or self._stage is None or not trainer.is_global_zero:
            return
        records = read_status(self._log_dir)
        records[self._stage] = fields if fresh else {**records.get(self._stage, {}), **fields}
        os.makedirs(self._log_dir, exist_ok=True)
        path = os.path.join(self._log_dir, STATUS_FILE)
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            json.dump(records, f, indent=1, default=str)
        os.replace(tmp, path)
