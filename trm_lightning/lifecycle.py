"""How a run ends: the signals that stop it at a step boundary, and the exit status of each ending.

``docs/lifecycle.md`` has the whole table (status record, checkpoint kept, how to resume). The exit statuses:

- 0: finished (also a run a ``stop`` alert or a passing gate ended early);
- 1: a gate's FAIL verdict (``make overfit``), after the run finished normally;
- 2: a user-facing error (``trm: error: ...``), an alert whose action is ``raise``;
- 128 + signal number: stopped by a signal, like a shell reports it: 130 for SIGINT (Ctrl-C), 143 for SIGTERM.

SIGTERM (a scheduler's preemption) and the first Ctrl-C both stop training at the end of the current optimizer
step (Lightning's SIGTERM path: every rank stops at the same step), so ``last.ckpt`` is written from a finished
step and a resume continues bit for bit. A second Ctrl-C stops at once, and then no checkpoint is written: the
periodic ``last.ckpt`` is the state to resume from.
"""

from __future__ import annotations

import signal

_stop_signal: str | None = None  # the signal that is stopping this process, once one arrived


def note_stop_signal(name: str) -> None:
    """Remember that signal ``name`` (``"SIGINT"``, ``"SIGTERM"``) is ending this process (the first one wins)."""
    global _stop_signal
    if _stop_signal is None:
        _stop_signal = name


def stop_signal() -> str | None:
    return _stop_signal


def reset() -> None:
    """Forget the signal (a new run in the same process, as tests start them)."""
    global _stop_signal
    _stop_signal = None


def exit_status(name: str) -> int:
    """128 + the signal's number, as shells report a process a signal ended."""
    return 128 + int(signal.Signals[name])
