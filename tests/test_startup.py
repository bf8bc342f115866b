"""caspl.startup: the collector paused while modules load, their objects frozen out of later collections, and the
entry points that use it. Each case runs in a fresh interpreter: freezing would otherwise keep this test process's
own garbage for good."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _python(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, cwd=REPO,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_no_collection_runs_while_modules_load_and_what_they_made_is_frozen():
    _python("""
        import gc
        from caspl.startup import loading_modules

        class Node:
            pass

        def cycles(n):  # what an import does: many objects, some in cycles
            made = []
            for _ in range(n):
                a, b = Node(), Node()
                a.other, b.other = b, a
                made.append(a)
            return made

        assert gc.isenabled()
        before = [s["collections"] for s in gc.get_stats()]
        with loading_modules():
            assert not gc.isenabled()
            kept = cycles(50_000)  # by default: dozens of collections
        assert [s["collections"] for s in gc.get_stats()] == before
        assert gc.isenabled() and gc.get_freeze_count() >= 100_000

        import weakref  # what the process makes afterwards is collected as before
        later = Node()
        later.me = later
        ref = weakref.ref(later)
        del later
        gc.collect()
        assert ref() is None
    """)


def test_a_collector_disabled_by_the_caller_stays_disabled():
    _python("""
        import gc
        from caspl.startup import loading_modules

        gc.disable()
        with loading_modules():
            pass
        assert not gc.isenabled()
    """)


def test_the_console_script_exits_with_the_commands_code():
    """`caspl` runs caspl.cli:run (main, then the quick exit); a usage error keeps its exit code 2."""
    assert 'caspl = "caspl.cli:run"' in (REPO / "pyproject.toml").read_text()
    listed = _python("import sys; sys.argv = ['caspl', 'methods']; from caspl.cli import run; run()")
    assert "coop" in listed and "maple" in listed
    bad = subprocess.run([sys.executable, "-c", "import sys; sys.argv = ['caspl', 'nope']; "
                          "from caspl.cli import run; run()"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert bad.returncode == 2 and "invalid choice" in bad.stderr


def test_a_worker_freezes_what_is_loaded_once():
    """freeze_loaded(): the first call (a reused trial worker's first trial) freezes; later ones leave the next
    trials' objects to the collector."""
    _python("""
        import gc
        from caspl.startup import freeze_loaded

        assert gc.get_freeze_count() == 0
        freeze_loaded()
        first = gc.get_freeze_count()
        assert first > 0
        later = [[i] for i in range(10_000)]
        freeze_loaded()
        assert gc.get_freeze_count() == first
    """)
