"""What the code needs to know about a running Trainer that Lightning (or torch) keeps behind private names.

Every use of a private Lightning or torch API is in this module, each with the reason no public one serves, so an
upgrade that breaks one breaks it here, in one line.
"""

from __future__ import annotations

from collections.abc import Iterable

from typing import Any

from lightning.pytorch import Trainer
from torch import nn


def is_logging_step(trainer: Trainer | None) -> bool:
    """True at the optimizer steps where Lightning writes step-level logs (every ``log_every_n_steps``).

    Private: ``_logger_connector.should_update_logs`` is the Trainer's own test; re-deriving it from
    ``log_every_n_steps`` would get ``fast_dev_run``, ``should_stop`` and the last step wrong."""
    return trainer is not None and bool(trainer._logger_connector.should_update_logs)


def is_accumulating(trainer: Trainer) -> bool:
    """True while gradients accumulate (this micro-batch does not step the optimizer).

    Private: ``_should_accumulate()`` is the loop's own decision, which also knows the epoch's last batch."""
    return bool(trainer.fit_loop.epoch_loop._should_accumulate())


def batches_done_this_epoch(trainer: Trainer) -> int:
    """Batches of the current training epoch whose step finished (what a resumed run must not repeat).

    Internal (no public accessor): the loop's progress counter, which Lightning itself checkpoints."""
    return int(trainer.fit_loop.epoch_loop.batch_progress.current.processed)


def ignore_in_ddp(module: nn.Module, names: Iterable[str]) -> None:
    """Keep the named parameters/buffers of ``module`` out of DDP's broadcast and gradient reduction.

    Private torch API (no public one exists): used for the puzzle-id table, which every rank updates identically
    by the same sign step, so broadcasting it (hundreds of MB) at every step would only cost time."""
    nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, list(names))


def explicit_logger_version(logger: Any) -> int | str | None:
    """The version a logger was told to use (``trainer.logger.init_args.version``), None when it picks a new one.

    Private: reading the public ``logger.version`` would make the logger choose (and create) a new version
    directory, which is what this question must not do."""
    return getattr(logger, "_version", None)


def stop_at_step_end(trainer: Trainer) -> None:
    """Ask the training loop to stop after the current optimizer step, as it does on SIGTERM (every rank at the same
    step under DDP; ``on_exception`` then sees a ``SIGTERMException`` and ``last.ckpt`` is saved from that step).

    Private: the flag of Lightning's signal connector is the only way into that path; ``trainer.should_stop`` would
    also run the end-of-training hooks (a final validation, the last checkpoint as if the run had finished)."""
    trainer._signal_connector.received_sigterm = True
