"""Sharded safetensors storage of response rows: atomic, resumable writes and pinned, streamed reads.

Layout (DESIGN §6)::

    responses-00001-of-0000M.safetensors     one tensor "responses" [rows, dim] per shard
    responses.safetensors.index.json         shard list: rows, size, header digest and full digest of each shard,
                                             and the digest of all rows in order (whatever the sharding)

Loading opens every shard once and keeps it open (a later save over the folder does not change what is read) and
checks it cheaply: the name is the one its position dictates, the size, the SHA-256 of the header and the header's
[rows, dim] dtype match the index. `verify_data()` hashes every byte and checks that every value is finite.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import torch
from safetensors.torch import save_file

from ..errors import ArtifactError, ArtifactIntegrityError
from .atomic import PROGRESS_NAME
from .integrity import (
    Folder,
    PinnedFile,
    parse_json_object,
    plain_name,
    rows_hasher,
    safetensors_header,
    sha256_bytes,
    tensor_bytes,
    unique_names,
)
from .permissions import give_default_mode

logger = logging.getLogger(__name__)

INDEX_NAME = "responses.safetensors.index.json"
TENSOR_NAME = "responses"
INDEX_FORMAT = 2  # 2: full digests of every shard and of the rows; 1: header digests only
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}
_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}
_HEADER_PROBE = 1 << 16  # bytes read at once to find a shard's header


def parse_size(size: Union[int, str]) -> int:
    """Bytes in `size`: an int, or a string like ``"500MB"`` / ``"2GiB"`` (transformers' convention)."""
    if isinstance(size, int):
        return size
    text = str(size).strip().upper()
    for unit in sorted(_UNITS, key=len, reverse=True):
        if text.endswith(unit):
            try:
                return int(float(text[: -len(unit)]) * _UNITS[unit])
            except ValueError:
                break
    raise ArtifactError(f"Cannot read the shard size {size!r}; pass bytes as an int or a string like '500MB'.")


def shard_name(index: int, count: int) -> str:
    """File name of shard `index` (0-based) of `count`."""
    return f"responses-{index + 1:05d}-of-{count:05d}.safetensors"


def fsync_file(path: Path) -> None:
    """Flush a written file to disk (so that a rename after it is durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a flushed temporary file and a rename."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to `path` through a temporary file and a rename."""
    write_bytes_atomic(Path(path), (json.dumps(data, indent=2, sort_keys=True) + "\n").encode("utf-8"))


def save_tensors_atomic(path: Path, tensors: dict[str, torch.Tensor], metadata: Optional[dict[str, str]] = None) -> None:
    """`safetensors.torch.save_file` through a flushed temporary file and a rename."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp), metadata={"format": "pt", **(metadata or {})})
    give_default_mode(tmp)  # safetensors creates its files 0600, whatever the umask
    fsync_file(tmp)
    os.replace(tmp, path)


def _header_of(file: PinnedFile) -> tuple[bytes, int, dict]:
    """(raw header bytes with the 8-byte prefix, data start, parsed header) of an open safetensors file."""
    probe = file.read(0, min(file.size, _HEADER_PROBE))
    if len(probe) >= 8:
        length = int.from_bytes(probe[:8], "little")
        if 8 + length > len(probe) and 8 + length <= file.size:
            probe = file.read(0, 8 + length)
    start, header = safetensors_header(probe, file.name)
    return probe[:start], start, header


@dataclass
class ShardInfo:
    """One shard as the index records it (`sha256`: digest of all its bytes; None in indexes of format 1)."""

    filename: str
    rows: int
    nbytes: int
    header_sha256: str
    sha256: Optional[str] = None

    def to_dict(self) -> dict:
        """JSON form."""
        data = {"filename": self.filename, "rows": self.rows, "nbytes": self.nbytes, "header_sha256": self.header_sha256}
        if self.sha256 is not None:
            data["sha256"] = self.sha256
        return data


def _int(value: Any, what: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ArtifactIntegrityError(f"{INDEX_NAME}: {what} must be an integer >= {minimum}, got {value!r}.")
    return value


def _parse_index(index: dict) -> tuple[int, torch.dtype, list[ShardInfo], Optional[str]]:
    """(dim, dtype, shards, rows digest) from an index, refusing malformed, swapped, duplicated or outside entries."""
    meta, entries = index.get("metadata"), index.get("shards")
    if not isinstance(meta, dict) or not isinstance(entries, list) or not entries:
        raise ArtifactIntegrityError(f"{INDEX_NAME} needs a 'metadata' object and a non-empty 'shards' list; the file is malformed.")
    dim = _int(meta.get("dim"), "metadata.dim", 1)
    if meta.get("dtype") not in _DTYPES:
        raise ArtifactIntegrityError(f"{INDEX_NAME}: metadata.dtype must be one of {sorted(_DTYPES)}, got {meta.get('dtype')!r}.")
    rows_sha256 = meta.get("rows_sha256")
    if rows_sha256 is not None and not (isinstance(rows_sha256, str) and len(rows_sha256) == 64):
        raise ArtifactIntegrityError(f"{INDEX_NAME}: metadata.rows_sha256 must be 64 hex digits, got {rows_sha256!r}.")
    shards = []
    for position, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise ArtifactIntegrityError(f"{INDEX_NAME}: shard entry {position} is {entry!r}, not an object.")
        name = plain_name(entry.get("filename"), INDEX_NAME)
        expected = shard_name(position, len(entries))
        if name != expected:
            raise ArtifactIntegrityError(
                f"{INDEX_NAME} lists {name!r} at position {position + 1} of {len(entries)}, where {expected!r} belongs: "
                "entries were reordered, duplicated or renamed, which would give rows to the wrong documents."
            )
        digests = [entry.get("header_sha256"), entry.get("sha256")]
        if not isinstance(digests[0], str) or not (digests[1] is None or isinstance(digests[1], str)):
            raise ArtifactIntegrityError(f"{INDEX_NAME}: shard {name} lacks its digests.")
        shards.append(ShardInfo(name, _int(entry.get("rows"), f"rows of {name}", 1), _int(entry.get("nbytes"), f"nbytes of {name}", 8),
                                digests[0], digests[1]))
    unique_names([s.filename for s in shards], INDEX_NAME)
    total = sum(s.rows for s in shards)
    if _int(meta.get("total_rows", total), "metadata.total_rows", 1) != total:
        raise ArtifactIntegrityError(f"{INDEX_NAME} lists {total} rows in its shards but {meta['total_rows']} in total.")
    return dim, _DTYPES[meta["dtype"]], shards, rows_sha256


class ShardedResponses:
    """Response rows stored in safetensors shards, each opened once and read through its open descriptor.

    Build it with `ShardedResponses.open(directory)`; nothing is read into memory until rows are asked for, and
    `iter_chunks` streams them so that rows × dim may exceed RAM. Every pass first checks that no shard was
    modified in place since it was opened (`ArtifactChangedError`).
    """

    def __init__(self, directory: Path, shards: list[ShardInfo], dim: int, dtype: torch.dtype, files: list[PinnedFile],
                 data_starts: list[int], rows_sha256: Optional[str] = None):
        self.directory = Path(directory)
        self.shards = shards
        self.dim = dim
        self.dtype = dtype
        self.files = files
        self.data_starts = data_starts
        self.recorded_rows_sha256 = rows_sha256
        self.digested = rows_sha256 is not None and all(shard.sha256 is not None for shard in shards)
        self.row_bytes = dim * torch.empty(0, dtype=dtype).element_size()
        self.offsets = [0]
        for shard in shards:
            self.offsets.append(self.offsets[-1] + shard.rows)

    @property
    def num_rows(self) -> int:
        """Total number of rows over all shards."""
        return self.offsets[-1]

    def directories(self) -> set[Path]:
        """Folders whose files this store reads."""
        return {self.directory.resolve()}

    @classmethod
    def open(cls, directory: Union[str, Path], index_bytes: Optional[bytes] = None, folder: Optional[Folder] = None,
             require_digests: bool = True) -> "ShardedResponses":
        """Open the shards listed by the index in `directory`, checking each one's name, size and header.

        Args:
            index_bytes: the index's bytes, already checked against the artifact's record of it (read from the
                folder when None).
            folder: the opened folder to read from (one is opened when None).
            require_digests: refuse an index without full shard digests (format 1).
        """
        own = folder is None
        folder = Folder(directory) if own else folder
        try:
            if index_bytes is None:
                if not folder.exists(INDEX_NAME):
                    raise ArtifactError(f"{directory} has no {INDEX_NAME}: it is not a finished influence artifact.")
                index_bytes = folder.read(INDEX_NAME)
            dim, dtype, shards, rows_sha256 = _parse_index(parse_json_object(index_bytes, INDEX_NAME))
            if require_digests and (rows_sha256 is None or any(s.sha256 is None for s in shards)):
                raise ArtifactIntegrityError(f"{INDEX_NAME} records no full digests of the shards; re-save the artifact with this version.")
            files, starts = [], []
            try:
                for shard in shards:
                    file, start = cls._open_shard(folder, shard, dim, dtype)
                    files.append(file)
                    starts.append(start)
            except Exception:
                for file in files:
                    file.close()
                raise
        finally:
            if own:
                folder.close()
        return cls(Path(directory), shards, dim, dtype, files, starts, rows_sha256)

    @staticmethod
    def _open_shard(folder: Folder, shard: ShardInfo, dim: int, dtype: torch.dtype) -> tuple[PinnedFile, int]:
        if not folder.exists(shard.filename):
            raise ArtifactIntegrityError(
                f"Shard {shard.filename} named by {INDEX_NAME} is missing from {folder.path}. "
                "Download the artifact again, or re-run the simulation to rewrite it."
            )
        file = folder.open(shard.filename)
        try:
            if file.size != shard.nbytes:
                raise ArtifactIntegrityError(
                    f"Shard {shard.filename} has {file.size} bytes, the index expects {shard.nbytes}: it is truncated or was replaced.")
            raw, start, header = _header_of(file)
            if sha256_bytes(raw) != shard.header_sha256:
                raise ArtifactIntegrityError(f"The header of shard {shard.filename} does not match its digest in the index: the file is corrupted.")
            entry = header.get(TENSOR_NAME) if isinstance(header.get(TENSOR_NAME), dict) else {}
            length = shard.rows * dim * torch.empty(0, dtype=dtype).element_size()
            if entry.get("shape") != [shard.rows, dim] or _DTYPES.get(entry.get("dtype")) is not dtype \
                    or entry.get("data_offsets") != [0, length] or start + length != file.size:
                raise ArtifactIntegrityError(f"Shard {shard.filename} holds {entry} instead of [{shard.rows}, {dim}] {dtype}.")
        except Exception:
            file.close()
            raise
        return file, start

    # ------------------------------------------------------------------ reading
    def check_unchanged(self) -> None:
        """Raise `ArtifactChangedError` if a shard was modified in place since it was opened."""
        for file in self.files:
            file.check_unchanged()

    def _block(self, shard_id: int, lo: int, hi: int) -> torch.Tensor:
        """Rows [lo, hi) of shard `shard_id`."""
        if hi <= lo:
            return torch.empty(0, self.dim, dtype=self.dtype)
        buffer = bytearray((hi - lo) * self.row_bytes)
        self.files[shard_id].read_into(self.data_starts[shard_id] + lo * self.row_bytes, buffer)
        return torch.frombuffer(buffer, dtype=self.dtype).reshape(hi - lo, self.dim)

    def iter_chunks(self, chunk_rows: int = 4096, device: Union[str, torch.device, None] = None) -> Iterator[torch.Tensor]:
        """Yield consecutive blocks of at most `chunk_rows` rows, in row order, reading lazily."""
        self.check_unchanged()
        for shard_id, shard in enumerate(self.shards):
            for lo in range(0, shard.rows, chunk_rows):
                block = self._block(shard_id, lo, min(lo + chunk_rows, shard.rows))
                self.files[shard_id].check_unchanged()  # nothing read can have changed under the read
                yield block if device is None else block.to(device)

    def rows(self, indices: Sequence[int]) -> torch.Tensor:
        """The rows at `indices`, in that order (each shard is read once, over the span it contributes)."""
        index = torch.as_tensor(list(indices), dtype=torch.long)
        if len(index) and (index.min() < 0 or index.max() >= self.num_rows):
            raise IndexError(f"Row indices must lie in [0, {self.num_rows}).")
        self.check_unchanged()
        out = torch.empty(len(index), self.dim, dtype=self.dtype)
        bounds = torch.tensor(self.offsets)
        owner = torch.bucketize(index, bounds[1:], right=True)
        for shard_id in owner.unique().tolist():
            positions = torch.nonzero(owner == shard_id).flatten()
            local = index[positions] - self.offsets[shard_id]
            lo, hi = int(local.min()), int(local.max()) + 1
            out[positions] = self._block(shard_id, lo, hi)[local - lo]
            self.files[shard_id].check_unchanged()
        return out

    def to_tensor(self) -> torch.Tensor:
        """All rows in memory (for small artifacts)."""
        chunks = list(self.iter_chunks())
        return torch.cat(chunks) if chunks else torch.empty(0, self.dim, dtype=self.dtype)

    # ------------------------------------------------------------------ digests
    def rows_sha256(self) -> str:
        """Digest of all rows in order (dtype and shape included): what names these responses whatever the sharding."""
        if self.recorded_rows_sha256 is None:  # an index of format 1: computed once, by reading every row
            hasher = rows_hasher(self.dtype, self.num_rows, self.dim)
            for block in self.iter_chunks():
                hasher.update(tensor_bytes(block))
            self.recorded_rows_sha256 = hasher.hexdigest()
        return self.recorded_rows_sha256

    def verify_data(self, chunk_rows: int = 4096) -> None:
        """Hash every byte of every shard against the index, and the rows against the index's rows digest; refuse
        non-finite values. Raises `ArtifactIntegrityError` naming the first file that does not match."""
        self.check_unchanged()
        rows = rows_hasher(self.dtype, self.num_rows, self.dim)
        for shard_id, (shard, file) in enumerate(zip(self.shards, self.files)):
            whole = hashlib.sha256(file.read(0, self.data_starts[shard_id]))
            finite = True
            for lo in range(0, shard.rows, chunk_rows):
                hi = min(lo + chunk_rows, shard.rows)
                data = file.read(self.data_starts[shard_id] + lo * self.row_bytes, (hi - lo) * self.row_bytes)
                whole.update(data)
                rows.update(data)
                block = torch.frombuffer(bytearray(data), dtype=self.dtype)
                finite = finite and bool(torch.isfinite(block).all())
            file.check_unchanged()
            if shard.sha256 is not None and whole.hexdigest() != shard.sha256:
                raise ArtifactIntegrityError(f"Shard {shard.filename} does not match its SHA-256 in {INDEX_NAME}: its bytes were changed or corrupted.")
            if not finite:
                raise ArtifactIntegrityError(f"Shard {shard.filename} contains non-finite responses.")
        if self.recorded_rows_sha256 is not None and rows.hexdigest() != self.recorded_rows_sha256:
            raise ArtifactIntegrityError(f"The rows of the shards do not match the rows digest in {INDEX_NAME}.")

    def index(self) -> dict:
        """The index these shards were opened from."""
        return _index(self.shards, self.dim, self.dtype, self.recorded_rows_sha256)

    def close(self) -> None:
        """Close the shards (reading then fails)."""
        for file in self.files:
            file.close()


def _index(shards: list[ShardInfo], dim: int, dtype: torch.dtype, rows_sha256: Optional[str], extra: Optional[dict] = None) -> dict:
    metadata = {"format": INDEX_FORMAT, "dim": dim, "dtype": _DTYPE_NAMES[dtype], "total_rows": sum(s.rows for s in shards),
                "total_size": sum(s.nbytes for s in shards), **({"rows_sha256": rows_sha256} if rows_sha256 else {}), **(extra or {})}
    return {"metadata": metadata, "shards": [s.to_dict() for s in shards]}


class ShardWriter:
    """Writes response rows into `directory` shard by shard, atomically and resumably.

    The shard plan and an `identity` (anything that determines the rows: settings, fingerprints, the documents'
    tokens) are recorded in a progress file when the save starts; while it exists the folder is an unfinished save,
    which loading refuses. A shard counts as finished when its file exists (it only gets its name by an atomic rename
    after a complete write) and its header is a [rows, dim] tensor of the planned dtype. A writer created again on the
    same directory with the same identity and plan keeps every finished shard, so an interrupted save or simulation
    continues where it stopped; a different identity is refused rather than mixed in (or, with
    `replace_foreign=True`, for a folder only this save writes to, discarded). Several processes may write disjoint
    shards of one plan: one creates it (`create=True`), the others join it (`create=False`), and one calls
    `finish()` after all are done.

    Args:
        directory: target folder (created if needed).
        identity: JSON-serialisable description of what the rows are.
        num_rows, dim, dtype: shape and dtype of the full response matrix.
        max_shard_size: bytes per shard (int or "500MB"-style string).
        shard_rows: explicit rows per shard (overrides `max_shard_size`).
        create: start (or resume) the plan; False joins a plan another process created.
        replace_foreign: discard an unfinished save of another identity instead of refusing.
    """

    def __init__(
        self,
        directory: Union[str, Path],
        identity: dict,
        num_rows: int,
        dim: int,
        dtype: torch.dtype,
        max_shard_size: Union[int, str] = "1GB",
        shard_rows: Optional[int] = None,
        create: bool = True,
        replace_foreign: bool = False,
    ):
        if num_rows < 1:
            raise ArtifactError("An artifact needs at least one response row; there is nothing to save.")
        self.directory = Path(directory)
        self.dim, self.dtype = dim, dtype
        itemsize = torch.empty(0, dtype=dtype).element_size()
        per_shard = shard_rows or max(1, parse_size(max_shard_size) // max(1, dim * itemsize))
        counts = [min(per_shard, num_rows - lo) for lo in range(0, num_rows, per_shard)]
        self.plan = {"identity": identity, "rows": counts, "dim": dim, "dtype": _DTYPE_NAMES[dtype]}
        self.names = [shard_name(i, len(counts)) for i in range(len(counts))]
        self.offsets = [0]
        for count in counts:
            self.offsets.append(self.offsets[-1] + count)
        if create:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._start_or_resume(replace_foreign)
        else:
            self._check_plan()

    def _progress_path(self) -> Path:
        return self.directory / PROGRESS_NAME

    def _plan_there(self) -> Any:
        try:
            return json.loads(self._progress_path().read_text(encoding="utf-8")).get("plan")
        except (OSError, ValueError, AttributeError):
            return None

    def _check_plan(self) -> None:
        path = self._progress_path()
        if not path.is_file():
            raise ArtifactError(f"No save in progress in {self.directory}: the process that starts it must create the plan first.")
        there = self._plan_there()
        if there != self.plan:
            raise ArtifactError(
                f"{self.directory} holds an unfinished save with other settings.\n  there: {json.dumps(there, sort_keys=True)[:2000]}\n"
                f"  now:   {json.dumps(self.plan, sort_keys=True)[:2000]}\nSave to another directory, or delete {path.name} and its shards to start over."
            )

    def _start_or_resume(self, replace_foreign: bool) -> None:
        if self._progress_path().is_file():
            if self._plan_there() == self.plan:
                return
            if not replace_foreign:
                self._check_plan()
            logger.warning("%s held an unfinished save of other documents or settings; starting over.", self.directory)
        for stale in self.directory.glob("responses-*-of-*.safetensors*"):  # shards of a finished or foreign save
            stale.unlink()
        (self.directory / INDEX_NAME).unlink(missing_ok=True)
        write_json_atomic(self._progress_path(), {"plan": self.plan})

    def _is_finished(self, index: int) -> bool:
        path = self.directory / self.names[index]
        if not path.is_file():
            return False
        try:
            with open(path, "rb") as handle:
                start, header = safetensors_header(handle.read(_HEADER_PROBE), path.name)
        except (OSError, ArtifactError):
            return False
        entry = header.get(TENSOR_NAME, {})
        rows = self.offsets[index + 1] - self.offsets[index]
        complete = os.path.getsize(path) == start + (entry.get("data_offsets") or [0, -1])[1]
        return entry.get("shape") == [rows, self.dim] and entry.get("dtype") == self.plan["dtype"] and complete

    def pending(self) -> list[tuple[int, int, int]]:
        """(shard index, first row, end row) of every shard not yet written."""
        return [(i, self.offsets[i], self.offsets[i + 1]) for i in range(len(self.names)) if not self._is_finished(i)]

    def write(self, index: int, rows: torch.Tensor) -> None:
        """Write shard `index` (its rows, shape [count, dim]) through a temporary file and a rename."""
        expected = (self.offsets[index + 1] - self.offsets[index], self.dim)
        if tuple(rows.shape) != expected:
            raise ArtifactError(f"Shard {index} needs rows of shape {expected}, got {tuple(rows.shape)}.")
        save_tensors_atomic(self.directory / self.names[index], {TENSOR_NAME: rows.detach().to("cpu", self.dtype)})

    def write_all(self, responses: Union[torch.Tensor, "ShardedResponses"]) -> None:
        """Write every pending shard from an in-memory tensor or another store."""
        for index, lo, hi in self.pending():
            block = responses[lo:hi] if isinstance(responses, torch.Tensor) else responses.rows(list(range(lo, hi)))
            self.write(index, block)

    def finish(self, extra_metadata: Optional[dict] = None, keep_progress: bool = False) -> ShardedResponses:
        """Hash every shard, write the index, remove stale files and (unless `keep_progress`) the progress file,
        and open the store. With `keep_progress` the folder stays "unfinished" until the caller removes the file."""
        missing = self.pending()
        if missing:
            raise ArtifactError(f"{len(missing)} shard(s) are not written yet (first: {self.names[missing[0][0]]}); cannot finish the save.")
        rows = rows_hasher(self.dtype, self.offsets[-1], self.dim)
        shards = []
        with Folder(self.directory) as folder:
            for i, name in enumerate(self.names):
                file = folder.open(name)
                try:
                    raw, start, _ = _header_of(file)
                    whole = hashlib.sha256(raw)
                    for block in file.blocks(start):
                        whole.update(block)
                        rows.update(block)
                    shards.append(ShardInfo(name, self.offsets[i + 1] - self.offsets[i], file.size, sha256_bytes(raw), whole.hexdigest()))
                finally:
                    file.close()
        write_json_atomic(self.directory / INDEX_NAME, _index(shards, self.dim, self.dtype, rows.hexdigest(), extra_metadata))
        keep = set(self.names)
        for stale in self.directory.glob("responses-*-of-*.safetensors*"):
            if stale.name not in keep:
                stale.unlink()
        if not keep_progress:
            self._progress_path().unlink(missing_ok=True)
        return ShardedResponses.open(self.directory)


class InMemoryResponses:
    """Response rows held in a tensor, with the same reading interface as `ShardedResponses`."""

    def __init__(self, tensor: torch.Tensor):
        if tensor.dim() != 2:
            raise ArtifactError(f"Responses must be a [n_documents, dim] matrix, got shape {tuple(tensor.shape)}.")
        self.tensor = tensor.detach().to("cpu").contiguous()
        self.dim, self.dtype = self.tensor.shape[1], self.tensor.dtype

    @property
    def num_rows(self) -> int:
        """Number of rows."""
        return self.tensor.shape[0]

    def directories(self) -> set[Path]:
        """No folder: the rows are in memory."""
        return set()

    def check_unchanged(self) -> None:
        """Nothing on disk to have changed."""

    def iter_chunks(self, chunk_rows: int = 4096, device=None) -> Iterator[torch.Tensor]:
        """Consecutive blocks of at most `chunk_rows` rows."""
        for lo in range(0, self.num_rows, chunk_rows):
            block = self.tensor[lo : lo + chunk_rows]
            yield block if device is None else block.to(device)

    def rows(self, indices: Sequence[int]) -> torch.Tensor:
        """The rows at `indices`."""
        return self.tensor[torch.as_tensor(list(indices), dtype=torch.long)]

    def to_tensor(self) -> torch.Tensor:
        """All rows."""
        return self.tensor

    def rows_sha256(self) -> str:
        """Digest of all rows in order (as `ShardedResponses.rows_sha256`)."""
        hasher = rows_hasher(self.dtype, self.num_rows, self.dim)
        hasher.update(tensor_bytes(self.tensor))
        return hasher.hexdigest()


class ComposedResponses:
    """Rows selected from, and concatenated over, other stores — how adding and removing documents
    builds a new artifact without touching (or recomputing) the stored responses."""

    def __init__(self, parts: list[tuple[Any, Optional[torch.Tensor]]]):
        self.parts = [(store, None if rows is None else torch.as_tensor(rows, dtype=torch.long)) for store, rows in parts]
        first = self.parts[0][0]
        self.dim, self.dtype = first.dim, first.dtype
        if any(store.dim != self.dim for store, _ in self.parts):
            raise ArtifactError("Cannot combine responses of different dimensions: they come from different subspaces.")
        self.lengths = [store.num_rows if rows is None else len(rows) for store, rows in self.parts]

    @property
    def num_rows(self) -> int:
        """Number of rows over all parts."""
        return sum(self.lengths)

    def directories(self) -> set[Path]:
        """Folders any part reads from."""
        return set().union(*(store.directories() for store, _ in self.parts))

    def check_unchanged(self) -> None:
        """Raise if a file any part reads was modified in place."""
        for store, _ in self.parts:
            store.check_unchanged()

    def iter_chunks(self, chunk_rows: int = 4096, device=None) -> Iterator[torch.Tensor]:
        """Consecutive blocks of at most `chunk_rows` rows, part by part."""
        for store, rows in self.parts:
            if rows is None:
                for block in store.iter_chunks(chunk_rows):
                    yield block.to(self.dtype) if device is None else block.to(device, self.dtype)
            else:
                for lo in range(0, len(rows), chunk_rows):
                    block = store.rows(rows[lo : lo + chunk_rows].tolist()).to(self.dtype)
                    yield block if device is None else block.to(device)

    def rows(self, indices: Sequence[int]) -> torch.Tensor:
        """The rows at `indices`."""
        index = torch.as_tensor(list(indices), dtype=torch.long)
        out = torch.empty(len(index), self.dim, dtype=self.dtype)
        start = 0
        for (store, rows), length in zip(self.parts, self.lengths):
            mask = (index >= start) & (index < start + length)
            if mask.any():
                local = index[mask] - start
                out[mask] = store.rows((local if rows is None else rows[local]).tolist()).to(self.dtype)
            start += length
        return out

    def to_tensor(self) -> torch.Tensor:
        """All rows in memory."""
        chunks = list(self.iter_chunks())
        return torch.cat(chunks) if chunks else torch.empty(0, self.dim, dtype=self.dtype)

    def rows_sha256(self) -> str:
        """Digest of all rows in order (as `ShardedResponses.rows_sha256`)."""
        hasher = rows_hasher(self.dtype, self.num_rows, self.dim)
        for block in self.iter_chunks():
            hasher.update(tensor_bytes(block))
        return hasher.hexdigest()
