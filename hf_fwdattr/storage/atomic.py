"""Saving over an artifact without ever leaving a mix: one writer per folder, build aside, swap in by renames.

    <parent>/<name>                        the artifact: the old one until the swap, the new one after it
    <parent>/.<name>.fwdattr-staging       the new artifact while it is written (resumable; unfinished while it
                                           holds a progress file)
    <parent>/.<name>.fwdattr-backup        the old artifact during the swap
    <parent>/.<name>.fwdattr-lock          locked (``flock``) by the one process saving to <name>, removed when it
                                           is done; the lock dies with its process, ``kill -9`` included

The swap is (1) <name> → backup, (2) staging → <name>, (3) backup removed. The staging is complete before (1), so an
interruption before (1) leaves the old artifact, between (1) and (2) `recover` completes the swap, and after (2) only
the backup is left over. `recover` runs under the lock before every save, and when a load finds the folder missing.
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Iterator, Optional, Union

from ..errors import ArtifactBusyError, ArtifactError, UnfinishedArtifactError

logger = logging.getLogger(__name__)

CONFIG_NAME = "attribution_config.json"
"""The artifact's root file: written last, sealed, it records every other file's digest."""
PROGRESS_NAME = ".fwdattr-save-progress.json"
"""Present in a folder while a save into it is unfinished."""
ARTIFACT_FILE_PATTERNS = [
    CONFIG_NAME, "documents.jsonl", "responses-*-of-*.safetensors", "responses.safetensors.index.json",
    "source_responses.safetensors", "readout_basis.safetensors", "response_basis.safetensors", "README.md", "*.tmp", ".fwdattr-*",
]
"""Names a save may replace in an existing folder; a store of another kind adds its files' patterns here."""

try:  # POSIX
    import fcntl

    def _try_lock(fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def _unlock(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_UN)

except ImportError:  # pragma: no cover - Windows
    import msvcrt

    def _try_lock(fd: int) -> bool:
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True

    def _unlock(fd: int) -> None:
        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)


def _sibling(target: Path, suffix: str) -> Path:
    target = Path(os.path.abspath(target))
    return target.with_name(f".{target.name}.fwdattr-{suffix}")


def staging_dir(target: Union[str, Path]) -> Path:
    """Where a save to `target` writes the new artifact before swapping it in."""
    return _sibling(Path(target), "staging")


def backup_dir(target: Union[str, Path]) -> Path:
    """Where the old artifact at `target` sits during a swap."""
    return _sibling(Path(target), "backup")


def lock_path(target: Union[str, Path]) -> Path:
    """The lock file a save to `target` holds."""
    return _sibling(Path(target), "lock")


_held: dict[str, list] = {}  # lock file -> [descriptor, owning thread, depth]
_held_guard = threading.Lock()


def _holder(path: Path) -> str:
    try:
        pid = path.read_text(encoding="utf-8").strip()
    except OSError:
        return "another process"
    return f"process {pid}" if pid else "another process"


@contextlib.contextmanager
def save_lock(target: Union[str, Path]) -> Iterator[None]:
    """Hold the lock of `target` for the duration (re-entrant within one thread).

    Raises `ArtifactBusyError` at once if another process or thread holds it: two saves into one folder never
    interleave. The lock is an advisory ``flock``, released by the operating system if its process dies.
    """
    path = lock_path(target)
    key = str(path)
    me = threading.get_ident()
    with _held_guard:
        entry = _held.get(key)
        if entry is not None and entry[1] != me:
            raise ArtifactBusyError(f"Another thread of this process is saving to {Path(target)}; wait for it to finish.")
        if entry is not None:
            entry[2] += 1
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            _held[key] = [_lock_file(path, target), me, 1]
    try:
        yield
    finally:
        with _held_guard:
            entry = _held[key]
            entry[2] -= 1
            if entry[2] == 0:
                del _held[key]
                if os.name != "nt":  # removed while still held, so that no one can lock the file this lock was
                    try:
                        os.unlink(path)
                    except FileNotFoundError:
                        pass
                _unlock(entry[0])
                os.close(entry[0])


def _lock_file(path: Path, target: Union[str, Path]) -> int:
    """A descriptor of `path`, created if need be and locked; raises `ArtifactBusyError` if another holder has it."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        if not _try_lock(fd):
            os.close(fd)
            raise ArtifactBusyError(
                f"{_holder(path)} is saving to {Path(target)} right now (it holds {path.name}); two saves into one folder "
                "would mix their files. Wait for it to finish, or save elsewhere."
            )
        try:
            status = os.stat(path)
            current = (status.st_dev, status.st_ino) == (os.fstat(fd).st_dev, os.fstat(fd).st_ino)
        except FileNotFoundError:
            current = False
        if current or os.name == "nt":
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            return fd
        os.close(fd)  # the previous holder removed this file as it finished: lock the one at the path now


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in `path` durable (a no-op where directories cannot be synced)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def is_complete(folder: Path) -> bool:
    """Whether `folder` holds a finished save: its root file is written and no progress file is left."""
    return (folder / CONFIG_NAME).is_file() and not (folder / PROGRESS_NAME).exists()


def recover(target: Union[str, Path]) -> Optional[str]:
    """Bring `target` back to a whole artifact after an interrupted swap; returns what was done (None: nothing).

    Call it holding `save_lock(target)`. A complete staging left with no artifact in place is swapped in (the
    interrupted save had finished writing); otherwise the backup of the old artifact is put back.
    """
    target = Path(os.path.abspath(target))
    staging, backup = staging_dir(target), backup_dir(target)
    if target.exists():
        if backup.exists():
            shutil.rmtree(backup)  # the swap finished; only its clean-up was interrupted
            return f"removed the backup {backup.name} of a finished swap"
        return None
    if is_complete(staging):
        os.rename(staging, target)
        fsync_dir(target.parent)
        if backup.exists():
            shutil.rmtree(backup)
        logger.warning("%s: completed a save whose final swap was interrupted.", target)
        return "completed the interrupted swap"
    if backup.exists():
        os.rename(backup, target)
        fsync_dir(target.parent)
        logger.warning("%s: put the previous artifact back after an interrupted save.", target)
        return "restored the previous artifact"
    return None


def recover_for_reading(target: Union[str, Path], attempts: int = 40, pause: float = 0.05) -> None:
    """For a load of `target` that found no folder there: recover an interrupted swap, or say why nothing is there.

    Raises `UnfinishedArtifactError` when the save into `target` is unfinished (or running now); returns quietly when
    there is nothing of a save there at all (the caller then tries the Hub) or when the folder is whole again.
    """
    target = Path(os.path.abspath(target))
    staging, backup = staging_dir(target), backup_dir(target)
    if not (staging.exists() or backup.exists()):
        return
    for _ in range(attempts):
        try:
            with save_lock(target):
                recover(target)
                if target.is_dir():
                    return
                raise UnfinishedArtifactError(
                    f"{target} does not exist yet: a save into it was interrupted before it finished (its unfinished files are in "
                    f"{staging}). Save again to the same folder to resume it."
                )
        except ArtifactBusyError:
            time.sleep(pause)  # a running save swaps within milliseconds; a long one is reported below
        except OSError as err:
            raise UnfinishedArtifactError(
                f"{target} is missing and could not be recovered ({err}). Its previous version is in {backup}, the new one in "
                f"{staging}: rename one of them to {target.name}."
            ) from err
    raise UnfinishedArtifactError(f"{target} is being saved by {_holder(lock_path(target))} right now; load it when the save has finished.")


def check_replaceable(target: Path) -> None:
    """Refuse to save over `target` if that would remove anything that is not part of an influence artifact."""
    target = Path(os.path.abspath(target))
    here = Path(os.path.abspath(os.getcwd()))
    if target == here or target in here.parents:
        raise ArtifactError(f"Cannot save an artifact to {target}: it is the working directory (or holds it). Save to a folder of its own.")
    if not target.exists():
        return
    if not target.is_dir():
        raise ArtifactError(f"{target} is a file, not a folder; save the artifact to a folder.")
    foreign = [entry.name for entry in target.iterdir()
               if entry.is_dir() or not any(fnmatch.fnmatchcase(entry.name, pattern) for pattern in ARTIFACT_FILE_PATTERNS)]
    if foreign:
        raise ArtifactError(
            f"{target} holds files that are not part of an influence artifact ({sorted(foreign)[:5]}); saving replaces the whole "
            "folder, so save the artifact to a folder of its own (e.g. a subfolder 'influence')."
        )


def prepare_staging(target: Union[str, Path]) -> Path:
    """The staging folder of `target`, kept if it holds an unfinished save (to resume), emptied otherwise."""
    staging = staging_dir(target)
    if staging.exists() and not (staging / PROGRESS_NAME).is_file():
        shutil.rmtree(staging)
    staging.mkdir(parents=True, exist_ok=True)
    return staging


def swap_into_place(staging: Path, target: Union[str, Path]) -> None:
    """Replace `target` with the complete folder `staging` (holding `save_lock(target)`): old and new never mix."""
    target = Path(os.path.abspath(target))
    if not is_complete(staging):
        raise ArtifactError(f"{staging} is not a finished artifact; it cannot replace {target}.")
    fsync_dir(staging)
    backup = backup_dir(target)
    if backup.exists():
        shutil.rmtree(backup)
    if target.exists():
        os.rename(target, backup)
        fsync_dir(target.parent)
    os.rename(staging, target)
    fsync_dir(target.parent)
    if backup.exists():
        shutil.rmtree(backup)
