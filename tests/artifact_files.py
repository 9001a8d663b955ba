"""Test helpers that edit an artifact's files the way a buggy writer or a careless hand would, and re-seal them so that
the structural checks under the digests can be tested too."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from hf_fwdattr.storage.artifact import SEAL_KEY
from hf_fwdattr.storage.atomic import CONFIG_NAME
from hf_fwdattr.storage.integrity import FileRecord, seal_json


def reseal(directory: Path) -> None:
    """Record the current size and SHA-256 of every file the config lists, and seal the config again: what a writer
    that updates digests blindly would leave."""
    meta = json.loads((directory / CONFIG_NAME).read_text())
    meta.pop(SEAL_KEY, None)
    meta["files"] = {name: FileRecord.of_path(directory / name).to_dict() for name in meta["files"]}
    (directory / CONFIG_NAME).write_text(seal_json(meta, SEAL_KEY))


def edit_config(directory: Path, edit) -> None:
    """Apply `edit(meta)` to the config and seal it again."""
    meta = json.loads((directory / CONFIG_NAME).read_text())
    meta.pop(SEAL_KEY, None)
    edit(meta)
    (directory / CONFIG_NAME).write_text(seal_json(meta, SEAL_KEY))


def flip_bit(path: Path, position: int, bit: int = 0) -> None:
    """Flip one bit of the byte at `position` of `path`, in place."""
    data = bytearray(path.read_bytes())
    data[position] ^= 1 << bit
    path.write_bytes(bytes(data))


def tree_digest(directory: Path) -> dict:
    """SHA-256 of every file in `directory` (not recursive)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()}
