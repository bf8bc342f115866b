"""Start-up and exit of a process that loads the study stack (torch, open_clip, Ray, MLflow, Optuna).

Python's cyclic garbage collector walks every object it tracks at each full collection. Loading the stack leaves
about 0.7 million such objects, module-level and alive until the process ends, so walking them can free nothing:
yet the collector runs nine full collections while the modules load, and the interpreter's shutdown spends about
2 s in collections over them again (`python studies/bench_startup.py`; numbers in the README). Freezing keeps the
cyclic garbage that the imports left (about 10 MB of a driver's 980 MB here) for the life of the process.

A Ray worker (a trial, a teacher actor) has its modules loaded by Ray, which imports our code as it unpickles it:
there `freeze_loaded()` is all that applies. Ray ends such a worker with an exit like any other (an actor dropped by
its pool, Tune's `__ray_terminate__`), so its shutdown walked the whole stack too.
"""

from __future__ import annotations

import gc
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NoReturn

_frozen_once = False


@contextmanager
def loading_modules() -> Iterator[None]:
    """Import inside this block: no cyclic collection while the modules load, and everything alive at its end is
    frozen out of later collections (`gc.freeze`), which then walk only what the process creates afterwards."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if enabled:
            gc.enable()


def before_exit() -> None:
    """Freeze what is alive as the process ends, so that the interpreter's shutdown does not walk it (about 2 s for
    a process that loaded the study stack). Objects still alive are freed by the operating system; files and streams
    are flushed by their own atexit handlers and by reference counting, as before."""
    gc.freeze()


def exit_with(code: int) -> NoReturn:
    """End a command's process: `if __name__ == "__main__": exit_with(main())`."""
    before_exit()
    sys.exit(code)


def freeze_loaded() -> None:
    """Freeze what is alive now, the first time in this process (later calls do nothing, so that each trial of a
    reused worker does not freeze the garbage of the one before): for a worker whose modules are already loaded."""
    global _frozen_once
    if not _frozen_once:
        _frozen_once = True
        gc.freeze()
