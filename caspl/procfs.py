"""Linux's /proc, read the same way by the study (its trial workers' exit) and by the scripts (node sessions, CPU
by process)."""

from __future__ import annotations

from pathlib import Path


def stat_fields(proc: str | Path) -> list[str]:
    """The fields of `<proc>/stat` after "pid (command name)", so that index 0 is the state (field 3 of proc(5)):
    the name may hold spaces and parentheses, hence the last ")". OSError when the process is gone or unreadable."""
    text = Path(proc, "stat").read_text()
    return text[text.rindex(")") + 2:].split()


def running(pid: int) -> bool:
    """A process that is neither gone nor a zombie (exited, not yet reaped). False without /proc."""
    try:
        return stat_fields(f"/proc/{pid}")[0] not in ("Z", "X")
    except (OSError, ValueError, IndexError):
        return False
