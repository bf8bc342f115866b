"""Interrupts of a study (SIGINT from Ctrl-C, SIGTERM from `kill` or `ray job stop`): noted, never mistaken for an end.

Inside `Tuner.fit` Tune catches SIGINT, stops gracefully (saving its state) and returns as if the study had ended.
`InterruptWatch`, a Tune callback whose `setup` runs inside `fit` after Tune installed its handler, wraps that
handler so the signal is noted, and routes SIGTERM to the same graceful stop; a second signal stops at once.
Outside `fit` a signal raises `Interrupted` (a KeyboardInterrupt). `handled()` installs this and restores the
previous handlers afterwards.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Iterator

from ray.tune import Callback

SIGNALS = (signal.SIGINT, signal.SIGTERM)
_noted: list[int] = []  # module state: Tune restores its callbacks from tuner.pkl as new objects


class Interrupted(KeyboardInterrupt):
    """A study stopped by a signal; `exit_code` is the shell's 128 + signal number."""

    def __init__(self, signum: int):
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def _raise(signum, frame) -> None:
    raise Interrupted(signum)


class Interrupts:
    """What `handled()` yields: the signal noted during `fit` (if any), and `rearm()` to restore raising after it."""

    @property
    def signum(self) -> int | None:
        return _noted[0] if _noted else None

    def rearm(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                signal.signal(signum, _raise)


@contextmanager
def handled() -> Iterator[Interrupts]:
    """Raise `Interrupted` on SIGINT/SIGTERM (noted instead inside `fit`); the previous handlers come back after."""
    if threading.current_thread() is not threading.main_thread():
        yield Interrupts()
        return
    previous = {signum: signal.getsignal(signum) for signum in SIGNALS}
    _noted.clear()
    interrupts = Interrupts()
    interrupts.rearm()
    try:
        yield interrupts
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


class InterruptWatch(Callback):
    """Notes SIGINT/SIGTERM during `Tuner.fit` and hands them to Tune's graceful stop."""

    def setup(self, **info) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        tune_handler = signal.getsignal(signal.SIGINT)

        def note(signum, frame) -> None:
            if _noted:  # a second signal: do not wait for the graceful stop
                raise Interrupted(signum)
            _noted.append(signum)
            if callable(tune_handler) and tune_handler is not _raise:
                tune_handler(signal.SIGINT, frame)  # Tune stops after this step, saving its state
            else:
                raise Interrupted(signum)

        for signum in SIGNALS:
            signal.signal(signum, note)
