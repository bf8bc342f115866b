"""A benchmark's work folders: made in the system's temporary folder, deleted when the benchmark ends, kept (and
listed) with --keep. Left behind, they filled /tmp: CI's smoke test of the study benchmark alone makes 23 MB."""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path


class ScratchFolders:
    def __init__(self, keep: bool = False) -> None:
        self.keep = keep
        self.paths: list[Path] = []

    def make(self, prefix: str) -> Path:
        path = Path(tempfile.mkdtemp(prefix=prefix)).resolve()
        self.paths.append(path)
        return path

    def summary(self) -> dict:
        """For the benchmark's JSON line: which folders it made, and whether they stay."""
        return {"folders": [str(path) for path in self.paths], "kept": self.keep}

    def __enter__(self) -> "ScratchFolders":
        return self

    def __exit__(self, *exc) -> None:
        for path in self.paths:  # only folders this object made
            if self.keep:
                print(f"[bench] kept {path}", file=sys.stderr)
            else:
                shutil.rmtree(path, ignore_errors=True)
