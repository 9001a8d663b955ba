"""Content addressing of an artifact's files: digests, confined names, pinned open files and sealed JSON.

An influence artifact is a small Merkle tree. ``attribution_config.json`` is *sealed*: it carries the SHA-256 of
its own bytes, so any changed byte is refused. Its ``files`` manifest records the size and SHA-256 of every other
file the artifact is made of (the documents table, the shard index, the source sums, the readout basis), and the
shard index records the size, header digest and full digest of every shard. Any store of rows that joins the
artifact records its files the same way: its small files in the manifest (read and hashed in full at load), its
bulk files in an index of its own (sizes and headers checked at load, full digests by `verify()`).

A loaded artifact reads through `Folder` and `PinnedFile`: every file is opened once, relative to one opened
directory, and kept open, so a later save over the folder cannot change what a loaded artifact reads; a file
modified in place under it is noticed by `PinnedFile.check_unchanged` (size and modification time).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Union

import torch

from ..errors import ArtifactChangedError, ArtifactError, ArtifactIntegrityError

READ_BLOCK = 1 << 22  # bytes hashed or copied at a time
_ZERO_DIGEST = "0" * 64
_HEX64 = re.compile(r"[0-9a-f]{64}")


def sha256_bytes(data: Union[bytes, bytearray, memoryview]) -> str:
    """Hex SHA-256 of `data`."""
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class FileRecord:
    """What an artifact records about one of its files: its size and the SHA-256 of all its bytes."""

    size: int
    sha256: str

    def to_dict(self) -> dict:
        """JSON form."""
        return {"size": self.size, "sha256": self.sha256}

    @classmethod
    def from_dict(cls, data: Any, name: str, listed_in: str) -> "FileRecord":
        """Parse a record, refusing one of the wrong shape (naming the file and where it is listed)."""
        if not isinstance(data, dict) or not isinstance(data.get("size"), int) or isinstance(data.get("size"), bool) \
                or not isinstance(data.get("sha256"), str) or not _HEX64.fullmatch(data["sha256"]):
            raise ArtifactIntegrityError(f"{listed_in} records {name} as {data!r}; expected {{'size': int, 'sha256': 64 hex digits}}.")
        return cls(data["size"], data["sha256"])

    @classmethod
    def of_bytes(cls, data: Union[bytes, bytearray]) -> "FileRecord":
        """The record of a file holding `data`."""
        return cls(len(data), sha256_bytes(data))

    @classmethod
    def of_path(cls, path: Union[str, Path]) -> "FileRecord":
        """The record of the file at `path` (read once, in blocks)."""
        hasher = hashlib.sha256()
        size = 0
        with open(path, "rb") as handle:
            while block := handle.read(READ_BLOCK):
                hasher.update(block)
                size += len(block)
        return cls(size, hasher.hexdigest())


def plain_name(name: Any, listed_in: str) -> str:
    """`name` if it is a plain file name inside the artifact's folder: no folder part, no ``..``, not absolute."""
    if not isinstance(name, str) or not name or name in (".", "..") or any(c in name for c in "/\\\0") or os.path.isabs(name):
        raise ArtifactIntegrityError(
            f"{listed_in} names the file {name!r}; an artifact's files must be plain names inside its folder "
            "(no '/', no '..', not absolute). The file was edited or made by something else: re-save the artifact."
        )
    return name


def unique_names(names: Iterable[str], listed_in: str) -> None:
    """Refuse a list of file names that repeats one."""
    seen = set()
    for name in names:
        if name in seen:
            raise ArtifactIntegrityError(f"{listed_in} lists the file {name!r} twice; each file may appear once.")
        seen.add(name)


class PinnedFile:
    """A file of a loaded artifact, opened once and kept open.

    Reads go through the open descriptor, so renaming or replacing the path afterwards does not change what is read;
    `check_unchanged` refuses further use if the file itself was modified in place (size or modification time).
    """

    def __init__(self, name: str, descriptor: int, path: Path):
        self.name = name
        self.path = path
        self._fd: Optional[int] = descriptor
        status = os.fstat(descriptor)
        self.size = status.st_size
        self.signature = (status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns)

    @property
    def inode(self) -> tuple[int, int]:
        """(device, inode) of the open file."""
        return self.signature[0], self.signature[1]

    def _descriptor(self) -> int:
        if self._fd is None:
            raise ArtifactError(f"{self.name} was closed; load the artifact again.")
        return self._fd

    def check_unchanged(self) -> None:
        """Raise `ArtifactChangedError` if the file was modified since it was opened."""
        status = os.fstat(self._descriptor())
        if (status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns) != self.signature:
            raise ArtifactChangedError(
                f"{self.name} in {self.path.parent} was modified in place after the artifact was loaded "
                f"(size {self.signature[2]} -> {status.st_size}); its rows can no longer be trusted. Load the artifact again."
            )

    def read(self, offset: int, length: int) -> bytes:
        """`length` bytes from `offset` (refusing a short read: the file was truncated)."""
        fd = self._descriptor()
        parts, done = [], 0
        while done < length:
            if hasattr(os, "pread"):
                block = os.pread(fd, min(length - done, 1 << 30), offset + done)
            else:  # pragma: no cover - platforms without pread
                os.lseek(fd, offset + done, os.SEEK_SET)
                block = os.read(fd, min(length - done, 1 << 30))
            if not block:
                raise ArtifactIntegrityError(f"{self.name} ends at byte {offset + done}, before the {length} bytes expected at {offset}: it is truncated.")
            parts.append(block)
            done += len(block)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def read_into(self, offset: int, buffer: bytearray) -> None:
        """Fill `buffer` with the bytes from `offset` (no intermediate copy where the platform has ``preadv``)."""
        if not hasattr(os, "preadv"):  # pragma: no cover
            buffer[:] = self.read(offset, len(buffer))
            return
        fd, view, done = self._descriptor(), memoryview(buffer), 0
        while done < len(buffer):
            count = os.preadv(fd, [view[done : done + (1 << 30)]], offset + done)
            if count == 0:
                raise ArtifactIntegrityError(f"{self.name} ends at byte {offset + done}, before the {len(buffer)} bytes expected at {offset}: it is truncated.")
            done += count

    def read_all(self) -> bytes:
        """The whole file."""
        return self.read(0, self.size)

    def blocks(self, start: int = 0, end: Optional[int] = None) -> Iterable[bytes]:
        """The bytes in [start, end), in blocks of at most `READ_BLOCK`."""
        end = self.size if end is None else end
        for offset in range(start, end, READ_BLOCK):
            yield self.read(offset, min(READ_BLOCK, end - offset))

    def close(self) -> None:
        """Close the descriptor (reads then fail)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:  # pragma: no cover - depends on the garbage collector
        try:
            self.close()
        except OSError:
            pass


_DIR_FD = os.open in os.supports_dir_fd and hasattr(os, "O_DIRECTORY")


class Folder:
    """An artifact folder opened once: every file is opened relative to that directory, so a save that swaps
    another folder in under the same path mid-load cannot mix the two (`replaced()` says when it happened)."""

    def __init__(self, path: Union[str, Path]):
        self.path = Path(path)
        self._fd: Optional[int] = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY) if _DIR_FD else None
        status = os.fstat(self._fd) if self._fd is not None else os.stat(self.path)
        self.identity = (status.st_dev, status.st_ino)

    def replaced(self) -> bool:
        """Whether the path now names another folder (or none) than the one opened."""
        try:
            status = os.stat(self.path)
        except OSError:
            return True
        return (status.st_dev, status.st_ino) != self.identity

    def exists(self, name: str) -> bool:
        """Whether the folder holds a regular file `name`."""
        try:
            status = os.stat(name, dir_fd=self._fd) if self._fd is not None else os.stat(self.path / name)
        except OSError:
            return False
        return stat.S_ISREG(status.st_mode)

    def open(self, name: str) -> PinnedFile:
        """Open `name` for reading and keep it open."""
        try:
            fd = os.open(name, os.O_RDONLY, dir_fd=self._fd) if self._fd is not None else os.open(self.path / name, os.O_RDONLY)
        except FileNotFoundError as err:
            raise ArtifactIntegrityError(f"{name} is missing from {self.path}; the artifact is incomplete. Download or save it again.") from err
        return PinnedFile(name, fd, self.path / name)

    def read(self, name: str, record: Optional[FileRecord] = None, listed_in: str = "") -> bytes:
        """All bytes of `name`, checked against `record` (size, then SHA-256) when given."""
        handle = self.open(name)
        try:
            if record is not None and handle.size != record.size:
                raise ArtifactIntegrityError(
                    f"{name} has {handle.size} bytes, but {listed_in or 'the artifact'} records {record.size}: "
                    "it is truncated or was replaced. Download or save the artifact again."
                )
            data = handle.read_all()
        finally:
            handle.close()
        if record is not None and sha256_bytes(data) != record.sha256:
            raise ArtifactIntegrityError(
                f"{name} does not match the SHA-256 that {listed_in or 'the artifact'} records for it: the file was changed "
                "or corrupted after it was written. Download or save the artifact again."
            )
        return data

    def close(self) -> None:
        """Close the directory descriptor (files already opened stay open)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "Folder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------------- sealed JSON
def seal_json(data: dict, key: str) -> str:
    """`data` as sorted, indented JSON that also carries, under `key`, the SHA-256 of the file's own bytes
    (computed with that value set to 64 zeros). `unseal_json` refuses the text if any byte changed."""
    if key in data:
        raise ValueError(f"`{key}` is reserved for the digest.")
    text = json.dumps({**data, key: _ZERO_DIGEST}, indent=2, sort_keys=True) + "\n"
    marker = f'"{key}": "{_ZERO_DIGEST}"'
    if text.count(marker) != 1:
        raise ValueError(f"The data to seal contains `{key}` more than once.")
    return text.replace(marker, f'"{key}": "{sha256_bytes(text.encode())}"')


def sealed_digest(raw: bytes, key: str) -> Optional[tuple[str, str]]:
    """(recorded, actual) digest of a sealed JSON text, or None if it carries no digest under `key`."""
    matches = list(re.finditer(rb'"' + re.escape(key.encode()) + rb'": "([^"]*)"', raw))
    if not matches:
        return None
    if len(matches) > 1:
        return "several digests", ""
    match = matches[0]
    zeroed = raw[: match.start(1)] + _ZERO_DIGEST.encode() + raw[match.end(1):]
    return match.group(1).decode("utf-8", "replace"), sha256_bytes(zeroed)


def parse_json_object(raw: bytes, name: str) -> dict:
    """Parse `raw` as a JSON object, refusing anything else with an error naming `name`."""
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise ArtifactIntegrityError(f"{name} is not valid JSON ({err}); the file is corrupted. Download or save the artifact again.") from err
    if not isinstance(data, dict):
        raise ArtifactIntegrityError(f"{name} holds a JSON {type(data).__name__}, not an object; the file is corrupted or is not an artifact's.")
    return data


# ---------------------------------------------------------------------- safetensors headers
def safetensors_header(raw: bytes, name: str) -> tuple[int, dict]:
    """(length of the 8-byte prefix plus the JSON header, parsed header) of a safetensors file's first bytes."""
    if len(raw) < 8:
        raise ArtifactIntegrityError(f"{name} is truncated: it has no safetensors header.")
    (length,) = struct.unpack("<Q", raw[:8])
    if length > len(raw) - 8:
        raise ArtifactIntegrityError(f"{name} is corrupted or truncated: its header claims {length} bytes.")
    try:
        header = json.loads(raw[8 : 8 + length])
    except ValueError as err:
        raise ArtifactIntegrityError(f"{name} has a corrupted safetensors header ({err}).") from err
    if not isinstance(header, dict):
        raise ArtifactIntegrityError(f"{name} has a corrupted safetensors header (not a JSON object).")
    return 8 + length, header


def rows_hasher(dtype: torch.dtype, num_rows: int, dim: int) -> "hashlib._Hash":
    """A SHA-256 primed with the dtype and shape of a [num_rows, dim] row matrix; feed it the rows' bytes in
    row order (as safetensors stores them) to get the digest that names those responses whatever their sharding."""
    hasher = hashlib.sha256()
    hasher.update(f"{str(dtype).replace('torch.', '')}:{num_rows}x{dim};".encode())
    return hasher


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The bytes of a CPU tensor in row-major order (no copy when it is contiguous)."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


# ---------------------------------------------------------------------- content digests of Python values
def _feed(hasher: "hashlib._Hash", value: Any) -> None:
    """Feed `value` to `hasher` with a type tag and a length prefix for every part, so that no two different values
    (e.g. ``["a\\nb", "c"]`` and ``["a", "b\\nc"]``) produce the same byte stream."""
    if value is None:
        hasher.update(b"N")
    elif isinstance(value, bool):
        hasher.update(b"T" if value else b"F")
    elif isinstance(value, int):
        text = str(value).encode()
        hasher.update(b"I" + struct.pack("<Q", len(text)) + text)
    elif isinstance(value, float):
        hasher.update(b"R" + struct.pack("<d", value))
    elif isinstance(value, str):
        data = value.encode("utf-8", "surrogatepass")
        hasher.update(b"S" + struct.pack("<Q", len(data)) + data)
    elif isinstance(value, (bytes, bytearray)):
        hasher.update(b"B" + struct.pack("<Q", len(value)) + bytes(value))
    elif isinstance(value, torch.Tensor):
        header = f"{value.dtype}:{tuple(value.shape)}".encode()
        data = tensor_bytes(value)
        hasher.update(b"X" + struct.pack("<Q", len(header)) + header + struct.pack("<Q", data.nbytes))
        hasher.update(data)
    elif isinstance(value, (list, tuple)):
        hasher.update(b"L" + struct.pack("<Q", len(value)))
        if value and all(type(v) is int for v in value):  # token ids: one pass through a typed array
            try:
                hasher.update(b"i" + torch.tensor(value, dtype=torch.int64).numpy().tobytes())
                return
            except (OverflowError, RuntimeError):
                pass
        for item in value:
            _feed(hasher, item)
    elif isinstance(value, dict):
        hasher.update(b"D" + struct.pack("<Q", len(value)))
        for key in sorted(value, key=str):
            _feed(hasher, str(key))
            _feed(hasher, value[key])
    elif hasattr(value, "__array__"):  # numpy arrays and the like
        _feed(hasher, torch.as_tensor(value))
    else:  # anything else by its repr: an unstable repr only makes identities differ (safe: nothing is reused)
        _feed(hasher, f"{type(value).__qualname__}:{value!r}")


def content_digest(value: Any) -> str:
    """Collision-free SHA-256 of a nested value of lists, dicts, strings, numbers and tensors."""
    hasher = hashlib.sha256()
    _feed(hasher, value)
    return hasher.hexdigest()
