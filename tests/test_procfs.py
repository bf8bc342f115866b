"""caspl.procfs: /proc/<pid>/stat read past a command name with spaces and parentheses; zombies are not running."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from caspl.procfs import running, stat_fields


def test_stat_fields_start_at_the_state_whatever_the_command_name(tmp_path):
    odd = tmp_path / "a (b) c"  # the kernel's name of the process is its program's file name
    odd.symlink_to(sys.executable)
    proc = subprocess.Popen([str(odd), "-c", "import time; time.sleep(30)"])
    try:
        time.sleep(0.3)
        fields = stat_fields(f"/proc/{proc.pid}")
        assert fields[0] in "RSD" and int(fields[1]) == os.getpid()  # state, then the parent's pid
        assert running(proc.pid)
    finally:
        proc.kill()
        proc.wait()
    assert not running(proc.pid)


def test_a_zombie_is_not_running():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    time.sleep(1.0)  # exited; not reaped until wait()
    assert stat_fields(f"/proc/{proc.pid}")[0] == "Z" and not running(proc.pid)
    proc.wait()
