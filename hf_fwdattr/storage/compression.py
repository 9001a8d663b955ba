"""`CompressionConfig`: whether an artifact stores exact responses (N × p) or coefficients on a basis (N × k + k × p).

Exact responses are the default for small artifacts; above `max_exact_size` ('auto') the responses are projected
on a basis fixed from a seeded sample of them while they are simulated (`integrations/compressed_build.py`), so the
full N × p matrix is never written. The choice is logged and recorded in the artifact.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional, Union

import torch

from ..errors import AttributionConfigError
from ..estimator.config import known_fields
from .shards import parse_size


_BASIS_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ResponseStorage(str, Enum):
    """How an artifact keeps its responses."""

    AUTO = "auto"
    """`exact` while N × p × bytes per value <= `max_exact_size`, else `compressed`."""
    EXACT = "exact"
    """Every response u_b, [N, p]."""
    COMPRESSED = "compressed"
    """Coefficients on a basis of k directions fixed from a sample of the responses: [N, k] + [k, p]."""


@dataclass
class CompressionConfig:
    """Settings of compressed response storage (see the module docstring); JSON round-trip with `to_dict` / `from_dict`."""

    storage: ResponseStorage = field(default=ResponseStorage.AUTO, metadata={"help": "auto | exact | compressed."})
    max_exact_size: Union[int, str] = field(
        default="4GB",
        metadata={"help": "storage='auto' keeps exact responses while N × p × bytes per value stays at or below this (bytes, or '4GB')."},
    )
    max_rank: int = field(default=512, metadata={"help": "The largest number k of basis directions."})
    sample_documents: int = field(
        default=2048,
        metadata={"help": "Documents (a seeded random sample) whose exact responses fix the basis; their Gram matrix costs sample² × p."},
    )
    validation_documents: int = field(
        default=512, metadata={"help": "Other documents whose exact responses choose the rank k (smallest reaching `fidelity`)."}
    )
    heldout_documents: int = field(
        default=1024,
        metadata={"help": "Further documents, in neither set, on which the fidelity against exact scores is measured and recorded."},
    )
    fidelity: float = field(
        default=0.95,
        metadata={"help": "k is the smallest rank whose scores reach this mean per-query Spearman correlation with exact scores "
                  "on the validation documents (fidelity queries: training examples)."},
    )
    queries: int = field(default=32, metadata={"help": "Queries (training examples) in each of the two query sets: rank choice, recorded fidelity."})
    chunk_size: Union[int, str] = field(
        default="256MB", metadata={"help": "Memory for the responses simulated at once while streaming (rows = this // (p × 4)); the "
                  "per-example gradients and the filter take a few times this."}
    )
    shard_documents: int = field(default=4096, metadata={"help": "Documents per coefficient shard (the unit of resumption and of work per process)."})
    basis_dtype: str = field(
        default="float16",
        metadata={"help": "dtype the basis V (k × p, most of a compressed artifact when p > N) is stored in; coefficients are computed "
                  "with the stored (rounded) V, so the rounding costs no consistency, and float16 moved the scores' fidelity by < 1e-4."},
    )

    def __post_init__(self) -> None:
        try:
            self.storage = ResponseStorage(self.storage)
        except ValueError as err:
            choices = ", ".join(repr(s.value) for s in ResponseStorage)
            raise AttributionConfigError(f"`storage` must be one of {choices}, got {self.storage!r}.") from err
        for name in ("max_rank", "sample_documents", "validation_documents", "heldout_documents", "queries", "shard_documents"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise AttributionConfigError(f"`{name}` must be an integer >= 1, got {value!r}.")
        if isinstance(self.fidelity, bool) or not isinstance(self.fidelity, (int, float)) or not 0 < self.fidelity <= 1:
            raise AttributionConfigError(f"`fidelity` must lie in (0, 1], got {self.fidelity!r}.")
        if self.basis_dtype not in _BASIS_DTYPES:
            raise AttributionConfigError(f"`basis_dtype` must be one of {', '.join(map(repr, _BASIS_DTYPES))}, got {self.basis_dtype!r}.")
        for name in ("max_exact_size", "chunk_size"):
            try:
                if parse_size(getattr(self, name)) < 1:
                    raise ValueError
            except Exception as err:
                raise AttributionConfigError(f"`{name}` must be a positive size in bytes or a string like '4GB', got {getattr(self, name)!r}.") from err

    def compress(self, num_documents: int, dim: int, dtype: torch.dtype) -> tuple[bool, str]:
        """(whether to store compressed responses, why) for N = `num_documents` responses of dimension `dim` in `dtype`."""
        exact = num_documents * dim * torch.empty(0, dtype=dtype).element_size()
        if self.storage is ResponseStorage.EXACT:
            return False, f"exact responses ({_size(exact)}): storage='exact'"
        if self.storage is ResponseStorage.COMPRESSED:
            return True, f"compressed responses (exact ones would take {_size(exact)}): storage='compressed'"
        limit = parse_size(self.max_exact_size)
        if exact <= limit:
            return False, f"exact responses: N × p = {num_documents:,} × {dim:,} takes {_size(exact)} <= max_exact_size {_size(limit)}"
        return True, f"compressed responses: N × p = {num_documents:,} × {dim:,} would take {_size(exact)} > max_exact_size {_size(limit)}"

    @property
    def torch_basis_dtype(self) -> torch.dtype:
        """`basis_dtype` as a `torch.dtype`."""
        return _BASIS_DTYPES[self.basis_dtype]

    def chunk_rows(self, dim: int) -> int:
        """Responses of dimension `dim` simulated and projected at once."""
        return max(1, parse_size(self.chunk_size) // (4 * dim))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict."""
        return {f.name: (v.value if isinstance(v := getattr(self, f.name), Enum) else v) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CompressionConfig":
        """Inverse of `to_dict`; unknown keys are ignored with a warning."""
        return cls(**known_fields(cls, data))

    @classmethod
    def coerce(cls, value: Optional[Union["CompressionConfig", dict, str]]) -> "CompressionConfig":
        """A config from None (defaults), a dict, a storage name ('exact', 'compressed', 'auto') or a config."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            return cls.from_dict(value)
        if isinstance(value, (str, ResponseStorage)):
            return cls(storage=value)
        raise AttributionConfigError(f"`compression` must be a CompressionConfig, its dict or a storage name, got {type(value).__name__}.")


def _size(nbytes: int) -> str:
    for unit, scale in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.3g} {unit}"
    return f"{nbytes} B"
