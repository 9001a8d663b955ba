"""The usual permissions for files written through safetensors.

safetensors 0.8 writes every file through a temporary file created with mode 0600 and renames it into place,
so the result ignores the process umask (safetensors issue #782): a model or artifact saved by one user is then
unreadable by the others sharing it, unlike the JSON files next to it. `give_default_mode` sets the mode an
ordinary new file gets (0666 less the umask).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Union


def current_umask() -> int:
    """The process umask, read without changing it where the system says it (Linux), else set and restored."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def give_default_mode(path: Union[str, Path]) -> None:
    """Give `path` the mode a file created with `open(path, "w")` would have (0666 less the umask); no-op on Windows."""
    if os.name == "posix":
        os.chmod(path, 0o666 & ~current_umask())
