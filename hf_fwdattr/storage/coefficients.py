"""Compressed response storage: each response kept as its coefficients on a fixed basis, u_b ≈ Vᵀ c_b.

An artifact too large to store every response u_b ∈ R^p (N × p) keeps instead

    response_basis.safetensors                 "directions" V [k, p] (orthonormal rows), "singular_values" [k]
    responses-0000i-of-0000M.safetensors       the coefficients c_b = V u_b, [N, k], in the sharded row format

V is fixed before the responses are simulated (from a seeded sample of them) and every response is projected as it
is produced, so N × p is never written. `ProjectedResponses` reads such rows with the interface of every other
response store (`iter_chunks`, `rows`, ... give the projected responses Vᵀ c_b, [·, p]), so the exact readout, the
source sums and editing work unchanged; readouts that know about it use the k directions and the coefficients
directly (a query costs k tangent directions, whatever N is).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import ArtifactError, ArtifactIntegrityError
from .permissions import give_default_mode
from .shards import ComposedResponses, InMemoryResponses
from .table import DocumentTable, sum_by_source

BASIS_FILE = "response_basis.safetensors"


class ProjectedResponses:
    """Responses stored as coefficients on a basis: row b is Vᵀ c_b.

    Args:
        coefficients: a row store of the coefficients ([N, k]: `ShardedResponses`, `InMemoryResponses`, ...).
        directions: V, [k, p], orthonormal rows (kept in their stored dtype; every product runs in float32 or wider).
        singular_values: [k], of the sample V was taken from (recorded, not used by the readout).
    """

    def __init__(self, coefficients: Any, directions: torch.Tensor, singular_values: Optional[torch.Tensor] = None):
        if directions.dim() != 2 or directions.shape[0] != coefficients.dim:
            raise ArtifactError(
                f"A response basis of {coefficients.dim} directions is needed for coefficients of width {coefficients.dim}; "
                f"got directions of shape {tuple(directions.shape)}."
            )
        self.coefficients = coefficients
        self.directions = directions.detach().to("cpu").contiguous()
        self.singular_values = None if singular_values is None else singular_values.detach().to("cpu").contiguous()
        self.dim, self.dtype = self.directions.shape[1], coefficients.dtype

    @property
    def num_rows(self) -> int:
        """Number of responses (documents)."""
        return self.coefficients.num_rows

    @property
    def rank(self) -> int:
        """k, the number of basis directions."""
        return self.directions.shape[0]

    def directories(self) -> set[Path]:
        """Folders whose files this store reads (those of the coefficients)."""
        return self.coefficients.directories()

    def check_unchanged(self) -> None:
        """Refuse to read coefficient files that were replaced since they were opened."""
        if hasattr(self.coefficients, "check_unchanged"):
            self.coefficients.check_unchanged()

    def rows_sha256(self) -> str:
        """Digest of the stored rows: the coefficients (the basis is tied to them by its own record)."""
        return self.coefficients.rows_sha256()

    def close(self) -> None:
        """Close the coefficient files this store keeps open."""
        if hasattr(self.coefficients, "close"):
            self.coefficients.close()

    def _expand(self, block: torch.Tensor, device=None) -> torch.Tensor:
        work = torch.promote_types(block.dtype, torch.float32)
        directions = self.directions.to(device or block.device, work)
        return (block.to(directions.device, work) @ directions).to(self.dtype)

    def iter_chunks(self, chunk_rows: int = 4096, device: Union[str, torch.device, None] = None) -> Iterator[torch.Tensor]:
        """Yield the projected responses Vᵀ c_b, `chunk_rows` at a time, in row order."""
        for block in self.coefficients.iter_chunks(chunk_rows):
            yield self._expand(block, device)

    def iter_coefficients(self, chunk_rows: int = 4096, device: Union[str, torch.device, None] = None) -> Iterator[torch.Tensor]:
        """Yield the coefficient rows c_b ([·, k]), `chunk_rows` at a time, in row order."""
        return self.coefficients.iter_chunks(chunk_rows, device)

    def rows(self, indices: Sequence[int]) -> torch.Tensor:
        """The projected responses at `indices`, [len(indices), p]."""
        return self._expand(self.coefficients.rows(indices))

    def to_tensor(self) -> torch.Tensor:
        """All projected responses in memory (small artifacts only: N × p)."""
        return self._expand(self.coefficients.to_tensor())

    def project(self, responses: torch.Tensor) -> torch.Tensor:
        """Coefficients c = V u of responses `responses` [n, p] on this basis, [n, k], in the store's dtype."""
        if responses.dim() != 2 or responses.shape[1] != self.dim:
            raise ArtifactError(f"Responses to project must have shape [n, {self.dim}], got {tuple(responses.shape)}.")
        return project_responses(responses, self.directions).to(self.dtype)

    def select(self, rows: Sequence[int]) -> "ProjectedResponses":
        """The responses at `rows`, on the same basis (no coefficient is recomputed)."""
        return ProjectedResponses(ComposedResponses([(self.coefficients, torch.as_tensor(list(rows), dtype=torch.long))]),
                                  self.directions, self.singular_values)

    def append(self, responses: torch.Tensor) -> "ProjectedResponses":
        """These responses followed by `responses` [n, p], projected on the stored basis."""
        added = InMemoryResponses(self.project(responses))
        return ProjectedResponses(ComposedResponses([(self.coefficients, None), (added, None)]), self.directions, self.singular_values)

    def summed_by_source(self, table: DocumentTable, source_names: Sequence[str], chunk_rows: int = 4096) -> torch.Tensor:
        """[len(source_names), p]: each source's summed projected response, Vᵀ Σ c_b — equal to the projection of the
        sum of its exact responses (summed in float64 over the coefficients, then expanded once)."""
        positions = table.source_positions(source_names)
        sums = torch.zeros(len(source_names), self.rank, dtype=torch.float64)
        row = 0
        for block in self.coefficients.iter_chunks(chunk_rows):
            sums += sum_by_source(block.to(torch.float64), positions[row : row + len(block)], len(source_names))
            row += len(block)
        return (sums @ self.directions.to(torch.float64)).to(self.dtype)

    def basis_tensors(self) -> dict[str, torch.Tensor]:
        """What `BASIS_FILE` holds."""
        tensors = {"directions": self.directions}
        if self.singular_values is not None:
            tensors["singular_values"] = self.singular_values
        return tensors


def project_responses(responses: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """c = V u for each row u of `responses` [n, p] on `directions` V [k, p]: [n, k] in float32 or wider.

    Computed on the responses' device, so a GPU simulation projects there and only the coefficients travel.
    """
    work = torch.promote_types(responses.dtype, torch.float32)
    return responses.to(work) @ directions.to(responses.device, work).T


def save_basis(directory: Union[str, Path], tensors: dict[str, torch.Tensor]) -> Path:
    """Write `BASIS_FILE` into `directory` through a temporary file and a rename; returns its path."""
    path = Path(directory) / BASIS_FILE
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"})
    give_default_mode(tmp)
    os.replace(tmp, path)
    return path


def load_basis(directory: Union[str, Path], rank: int, dim: int) -> dict[str, torch.Tensor]:
    """Read `BASIS_FILE` from `directory` (a build's work folder) and check that it holds [`rank`, `dim`] directions."""
    path = Path(directory) / BASIS_FILE
    if not path.is_file():
        raise ArtifactError(f"{path.name} is missing from {path.parent}: this compressed artifact is incomplete.")
    try:
        with safe_open(str(path), framework="pt") as handle:
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    except Exception as err:  # safetensors raises its own error types for corrupted files
        raise ArtifactIntegrityError(f"{path.name} cannot be read ({err}).") from err
    check_basis(tensors, rank, dim, path.name)
    return tensors


def check_basis(tensors: dict[str, torch.Tensor], rank: int, dim: Any, name: str = BASIS_FILE) -> None:
    """Refuse a response basis that does not hold [`rank`, `dim`] finite directions (and, if any, [`rank`] singular values)."""
    directions, singular_values = tensors.get("directions"), tensors.get("singular_values")
    if directions is None or tuple(directions.shape) != (rank, dim):
        raise ArtifactIntegrityError(
            f"{name} must hold directions of shape [{rank}, {dim}] (the coefficients' width and the subspace dimension); "
            f"it holds {None if directions is None else tuple(directions.shape)}."
        )
    if singular_values is not None and tuple(singular_values.shape) != (rank,):
        raise ArtifactIntegrityError(f"{name} holds singular values of shape {tuple(singular_values.shape)}, expected [{rank}].")
    if not bool(torch.isfinite(directions).all()):
        raise ArtifactIntegrityError(f"{name} holds non-finite directions.")
