"""Sharded safetensors storage of response rows: atomic, resumable writes and memory-mapped, streamed reads.

Layout (DESIGN §6)::

    responses-00001-of-0000M.safetensors     one tensor "responses" [rows, dim] per shard
    responses.safetensors.index.json         shard list, row counts, sizes and header digests

Loading checks every shard cheaply — the file exists, its size and the SHA-256 of its header match the
index, the header names a [rows, dim] tensor of the indexed dtype — so a truncated, corrupted or
missing shard is refused before any score is computed. `verify_data()` hashes the data sections too.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import ArtifactError
from .permissions import give_default_mode

INDEX_NAME = "responses.safetensors.index.json"
PROGRESS_NAME = ".fwdattr-save-progress.json"
TENSOR_NAME = "responses"
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}
_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}


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


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to `path` through a temporary file and a rename."""
    _write_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def _read_header(path: Path) -> tuple[bytes, dict]:
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) != 8:
            raise ArtifactError(f"{path.name} is truncated: it has no safetensors header.")
        (length,) = struct.unpack("<Q", prefix)
        if length > os.path.getsize(path) - 8:
            raise ArtifactError(f"{path.name} is corrupted or truncated: its header claims {length} bytes.")
        raw = handle.read(length)
    try:
        return prefix + raw, json.loads(raw)
    except ValueError as err:
        raise ArtifactError(f"{path.name} has a corrupted safetensors header ({err}).") from err


@dataclass
class ShardInfo:
    """One shard as the index records it."""

    filename: str
    rows: int
    nbytes: int
    header_sha256: str

    def to_dict(self) -> dict:
        return {"filename": self.filename, "rows": self.rows, "nbytes": self.nbytes, "header_sha256": self.header_sha256}


def _describe_shard(path: Path, rows: int) -> ShardInfo:
    header, _ = _read_header(path)
    return ShardInfo(path.name, rows, os.path.getsize(path), hashlib.sha256(header).hexdigest())


class ShardedResponses:
    """Response rows stored in safetensors shards, read through memory maps.

    Build it with `ShardedResponses.open(directory)`; nothing is read into memory until rows are
    asked for, and `iter_chunks` streams them so that rows × dim may exceed RAM.
    """

    def __init__(self, directory: Path, shards: list[ShardInfo], dim: int, dtype: torch.dtype):
        self.directory = Path(directory)
        self.shards = shards
        self.dim = dim
        self.dtype = dtype
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
    def open(cls, directory: Union[str, Path]) -> "ShardedResponses":
        """Open the shards listed by the index in `directory`, checking each one's size and header."""
        directory = Path(directory)
        index_path = directory / INDEX_NAME
        if not index_path.is_file():
            raise ArtifactError(f"{directory} has no {INDEX_NAME}: it is not a finished influence artifact.")
        try:
            index = json.loads(index_path.read_text(encoding="utf-8"))
            meta = index["metadata"]
            dim, dtype = int(meta["dim"]), _DTYPES[meta["dtype"]]
            shards = [ShardInfo(s["filename"], int(s["rows"]), int(s["nbytes"]), s["header_sha256"]) for s in index["shards"]]
        except (ValueError, KeyError, TypeError) as err:
            raise ArtifactError(f"{index_path} is malformed ({err!r}); the artifact cannot be read.") from err
        store = cls(directory, shards, dim, dtype)
        for shard in shards:
            store._check_shard(shard)
        if store.num_rows != int(meta.get("total_rows", store.num_rows)):
            raise ArtifactError(f"{index_path} lists {store.num_rows} rows in its shards but {meta['total_rows']} in total.")
        return store

    def _check_shard(self, shard: ShardInfo) -> None:
        path = self.directory / shard.filename
        if not path.is_file():
            raise ArtifactError(
                f"Shard {shard.filename} named by {INDEX_NAME} is missing from {self.directory}. "
                "Download the artifact again, or re-run the simulation to rewrite it."
            )
        size = os.path.getsize(path)
        if size != shard.nbytes:
            raise ArtifactError(f"Shard {shard.filename} has {size} bytes, the index expects {shard.nbytes}: it is truncated or was replaced.")
        header, parsed = _read_header(path)
        if hashlib.sha256(header).hexdigest() != shard.header_sha256:
            raise ArtifactError(f"The header of shard {shard.filename} does not match its digest in the index: the file is corrupted.")
        entry = parsed.get(TENSOR_NAME, {})
        if entry.get("shape") != [shard.rows, self.dim] or _DTYPES.get(entry.get("dtype")) is not self.dtype:
            raise ArtifactError(f"Shard {shard.filename} holds {entry} instead of [{shard.rows}, {self.dim}] {self.dtype}.")

    def verify_data(self) -> None:
        """Read every shard completely through safetensors (catches corruption that headers cannot show)."""
        for shard in self.shards:
            with safe_open(str(self.directory / shard.filename), framework="pt") as handle:
                block = handle.get_tensor(TENSOR_NAME)
                if not torch.isfinite(block).all():
                    raise ArtifactError(f"Shard {shard.filename} contains non-finite responses.")

    def iter_chunks(self, chunk_rows: int = 4096, device: Union[str, torch.device, None] = None) -> Iterator[torch.Tensor]:
        """Yield consecutive blocks of at most `chunk_rows` rows, in row order, reading lazily."""
        for shard in self.shards:
            with safe_open(str(self.directory / shard.filename), framework="pt") as handle:
                view = handle.get_slice(TENSOR_NAME)
                for lo in range(0, shard.rows, chunk_rows):
                    block = view[lo : min(lo + chunk_rows, shard.rows)]
                    yield block if device is None else block.to(device)

    def rows(self, indices: Sequence[int]) -> torch.Tensor:
        """The rows at `indices`, in that order (each shard is read once, over the span it contributes)."""
        index = torch.as_tensor(list(indices), dtype=torch.long)
        if len(index) and (index.min() < 0 or index.max() >= self.num_rows):
            raise IndexError(f"Row indices must lie in [0, {self.num_rows}).")
        out = torch.empty(len(index), self.dim, dtype=self.dtype)
        bounds = torch.tensor(self.offsets)
        owner = torch.bucketize(index, bounds[1:], right=True)
        for shard_id in owner.unique().tolist():
            positions = torch.nonzero(owner == shard_id).flatten()
            local = index[positions] - self.offsets[shard_id]
            lo, hi = int(local.min()), int(local.max()) + 1
            with safe_open(str(self.directory / self.shards[shard_id].filename), framework="pt") as handle:
                out[positions] = handle.get_slice(TENSOR_NAME)[lo:hi][local - lo]
        return out

    def to_tensor(self) -> torch.Tensor:
        """All rows in memory (for small artifacts)."""
        chunks = list(self.iter_chunks())
        return torch.cat(chunks) if chunks else torch.empty(0, self.dim, dtype=self.dtype)


class ShardWriter:
    """Writes response rows into `directory` shard by shard, atomically and resumably.

    The shard plan and an `identity` (anything that determines the rows: settings, fingerprints,
    document ids) are recorded in a progress file when the save starts. A shard counts as finished
    when its file exists (it only gets its name by an atomic rename after a complete write) and its
    header is a [rows, dim] tensor of the planned dtype. A writer created again on the same directory
    with the same identity and plan keeps every finished shard, so an interrupted save or simulation
    continues where it stopped; a different identity is refused rather than mixed in. Several
    processes may write disjoint shards of one plan: one creates it (`create=True`), the others
    join it (`create=False`), and one calls `finish()` after all are done.

    Args:
        directory: target folder (created if needed).
        identity: JSON-serialisable description of what the rows are.
        num_rows, dim, dtype: shape and dtype of the full response matrix.
        max_shard_size: bytes per shard (int or "500MB"-style string).
        shard_rows: explicit rows per shard (overrides `max_shard_size`).
        create: start (or resume) the plan; False joins a plan another process created.
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
            self._start_or_resume()
        else:
            self._check_plan()

    def _progress_path(self) -> Path:
        return self.directory / PROGRESS_NAME

    def _check_plan(self) -> None:
        path = self._progress_path()
        if not path.is_file():
            raise ArtifactError(f"No save in progress in {self.directory}: the process that starts it must create the plan first.")
        there = json.loads(path.read_text(encoding="utf-8")).get("plan")
        if there != self.plan:
            raise ArtifactError(
                f"{self.directory} holds an unfinished save with other settings.\n  there: {json.dumps(there, sort_keys=True)[:2000]}\n"
                f"  now:   {json.dumps(self.plan, sort_keys=True)[:2000]}\nSave to another directory, or delete {path.name} and its shards to start over."
            )

    def _start_or_resume(self) -> None:
        if self._progress_path().is_file():
            self._check_plan()
            return
        for stale in self.directory.glob("responses-*-of-*.safetensors*"):  # shards of a finished or foreign save
            stale.unlink()
        write_json_atomic(self._progress_path(), {"plan": self.plan})

    def _is_finished(self, index: int) -> bool:
        path = self.directory / self.names[index]
        if not path.is_file():
            return False
        try:
            raw, header = _read_header(path)
        except ArtifactError:
            return False
        entry = header.get(TENSOR_NAME, {})
        rows = self.offsets[index + 1] - self.offsets[index]
        complete = os.path.getsize(path) == len(raw) + entry.get("data_offsets", [0, -1])[1]
        return entry.get("shape") == [rows, self.dim] and entry.get("dtype") == self.plan["dtype"] and complete

    def pending(self) -> list[tuple[int, int, int]]:
        """(shard index, first row, end row) of every shard not yet written."""
        return [(i, self.offsets[i], self.offsets[i + 1]) for i in range(len(self.names)) if not self._is_finished(i)]

    def write(self, index: int, rows: torch.Tensor) -> None:
        """Write shard `index` (its rows, shape [count, dim]) through a temporary file and a rename."""
        expected = (self.offsets[index + 1] - self.offsets[index], self.dim)
        if tuple(rows.shape) != expected:
            raise ArtifactError(f"Shard {index} needs rows of shape {expected}, got {tuple(rows.shape)}.")
        path = self.directory / self.names[index]
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        save_file({TENSOR_NAME: rows.detach().to("cpu", self.dtype).contiguous()}, str(tmp), metadata={"format": "pt"})
        give_default_mode(tmp)
        os.replace(tmp, path)

    def write_all(self, responses: Union[torch.Tensor, "ShardedResponses"]) -> None:
        """Write every pending shard from an in-memory tensor or another store."""
        for index, lo, hi in self.pending():
            block = responses[lo:hi] if isinstance(responses, torch.Tensor) else responses.rows(list(range(lo, hi)))
            self.write(index, block)

    def finish(self, extra_metadata: Optional[dict] = None) -> ShardedResponses:
        """Write the index (the commit point), remove the progress file and stale files, and open the store."""
        missing = self.pending()
        if missing:
            raise ArtifactError(f"{len(missing)} shard(s) are not written yet (first: {self.names[missing[0][0]]}); cannot finish the save.")
        shards = [_describe_shard(self.directory / name, self.offsets[i + 1] - self.offsets[i]) for i, name in enumerate(self.names)]
        metadata = {"dim": self.dim, "dtype": _DTYPE_NAMES[self.dtype], "total_rows": self.offsets[-1],
                    "total_size": sum(s.nbytes for s in shards), **(extra_metadata or {})}
        write_json_atomic(self.directory / INDEX_NAME, {"metadata": metadata, "shards": [s.to_dict() for s in shards]})
        keep = set(self.names)
        for stale in self.directory.glob("responses-*-of-*.safetensors*"):
            if stale.name not in keep:
                stale.unlink()
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
        return self.tensor.shape[0]

    def directories(self) -> set[Path]:
        return set()

    def iter_chunks(self, chunk_rows: int = 4096, device=None) -> Iterator[torch.Tensor]:
        for lo in range(0, self.num_rows, chunk_rows):
            block = self.tensor[lo : lo + chunk_rows]
            yield block if device is None else block.to(device)

    def rows(self, indices: Sequence[int]) -> torch.Tensor:
        return self.tensor[torch.as_tensor(list(indices), dtype=torch.long)]

    def to_tensor(self) -> torch.Tensor:
        return self.tensor


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
        return sum(self.lengths)

    def directories(self) -> set[Path]:
        return set().union(*(store.directories() for store, _ in self.parts))

    def iter_chunks(self, chunk_rows: int = 4096, device=None) -> Iterator[torch.Tensor]:
        for store, rows in self.parts:
            if rows is None:
                for block in store.iter_chunks(chunk_rows):
                    yield block.to(self.dtype) if device is None else block.to(device, self.dtype)
            else:
                for lo in range(0, len(rows), chunk_rows):
                    block = store.rows(rows[lo : lo + chunk_rows].tolist()).to(self.dtype)
                    yield block if device is None else block.to(device)

    def rows(self, indices: Sequence[int]) -> torch.Tensor:
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
        chunks = list(self.iter_chunks())
        return torch.cat(chunks) if chunks else torch.empty(0, self.dim, dtype=self.dtype)
