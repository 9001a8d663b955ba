"""What the test suite may not do: write inside the repository. A snapshot of the files under the repository root
(path → size and modification time), taken before and after the session, shows every file a test created, changed
or removed there; Python's and pytest's own caches and the virtual environment are not looked at."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOT_LOOKED_AT = {".git", ".venv", "__pycache__", ".pytest_cache"}


def snapshot(root: Path = ROOT) -> dict[str, tuple[int, int]]:
    """Relative path → (size, mtime in ns) of every file under `root`, outside `NOT_LOOKED_AT`."""
    files = {}
    for directory, subdirectories, names in os.walk(root):
        subdirectories[:] = [d for d in subdirectories if d not in NOT_LOOKED_AT]
        for name in names:
            if name in NOT_LOOKED_AT:  # a worktree's .git is a file
                continue
            path = Path(directory) / name
            try:
                stat = path.lstat()
            except FileNotFoundError:  # removed while walking
                continue
            files[str(path.relative_to(root))] = (stat.st_size, stat.st_mtime_ns)
    return files


def changes(before: dict, after: dict) -> list[str]:
    """The files created, changed or removed between two snapshots, sorted, each marked +, ~ or -."""
    created = [f"+ {p}" for p in after.keys() - before.keys()]
    removed = [f"- {p}" for p in before.keys() - after.keys()]
    changed = [f"~ {p}" for p in before.keys() & after.keys() if before[p] != after[p]]
    return sorted(created + removed + changed, key=lambda line: line[2:])
