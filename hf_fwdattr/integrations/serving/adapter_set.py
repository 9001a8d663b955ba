"""`AdapterSet`: a folder of PEFT LoRA adapters for θ* and θ* ± εû_j, and how their log-likelihoods become scores.

    fwdattr_adapters.json      what the directions are (sources, basis rows or documents), ε, the difference
                               mode, the norms ‖u_j‖, the adapters' rank and target modules, the artifact's fingerprints
    coefficients.safetensors   basis directions only: C [N, k]; document scores = (slope_j ‖v_j‖)_j Cᵀ
    base/                      θ* as an adapter (the model's own adapter, or a zero update of the projection)
    plus-00000/, minus-00000/  θ* + εû_j and θ* − εû_j, standard PEFT folders (no minus-* for one-sided sets;
                               removal sets: minus-* only, at θ* − u_j)

A direction's score is its directional derivative times ‖u_j‖: [f(θ*+εû) − f(θ*−εû)] / 2ε · ‖u‖ (central) or
[f(θ*+εû) − f(θ*)] / ε · ‖u‖ (one-sided), f the answer's summed log-likelihood; for the unlearning solver's
finite responses, f(θ*) − f(θ* − u) (removal). Positive = proponent, as everywhere in the library. Nothing here imports torch: a client that reads log-probabilities from a server
needs json and numpy only.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np

from ... import __version__
from ...errors import AdapterExportError, ServingError

MANIFEST_NAME = "fwdattr_adapters.json"
COEFFICIENTS_NAME = "coefficients.safetensors"
BASE_ADAPTER = "base"
FORMAT_VERSION = 1
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""The values vLLM accepts for `max_lora_rank` (vllm.config.lora.MaxLoRARanks, vLLM 0.32)."""


class DirectionKind(str, Enum):
    """Which directions of an artifact an adapter set carries."""

    SOURCES = "sources"
    """One per source: its summed response; source scores, exact."""
    BASIS = "basis"
    """The compressed readout basis rows v_j; document scores through the coefficients C."""
    DOCUMENTS = "documents"
    """Chosen documents' responses u_b; their scores, exact."""


class DifferenceMode(str, Enum):
    """The finite difference an adapter set is made for (the names of `ReadoutMode`'s forward-evaluation modes)."""

    CENTRAL = "central_difference"
    """plus and minus adapters at θ* ± εû."""
    ONE_SIDED = "one_sided"
    """plus adapters at θ* + εû; θ* from `base`."""
    REMOVAL = "removal"
    """minus adapters at θ* − u (the whole finite response of the unlearning solver); θ* from `base`."""


@dataclass(frozen=True)
class AdapterEntry:
    """One adapter folder of a set: θ* (`direction` None) or θ* + sign·εû_direction."""

    name: str
    direction: Optional[int]
    sign: int


def adapter_name(direction: int, sign: int) -> str:
    """Folder name of θ* + sign·εû_direction."""
    return f"{'plus' if sign > 0 else 'minus'}-{direction:05d}"


def smallest_vllm_rank(rank: int) -> int:
    """The smallest `max_lora_rank` vLLM accepts that holds adapters of rank `rank`."""
    for allowed in VLLM_MAX_LORA_RANKS:
        if allowed >= rank:
            return allowed
    raise ServingError(f"vLLM serves LoRA ranks up to {VLLM_MAX_LORA_RANKS[-1]}; these adapters have rank {rank}. "
                       "Use a projection subspace of smaller rank.")


@dataclass
class AdapterSet:
    """The adapters of some directions of an influence artifact, and the arithmetic that turns log-likelihoods
    under them into scores. Made by `export_adapters`; loaded with `AdapterSet.from_pretrained(folder)`.

    Args:
        directory: the folder holding the manifest and the adapter folders.
        kind: which directions (sources, basis rows, documents).
        labels: one name per direction (source names, ``basis-00000``..., document ids).
        norms: ‖u_j‖ of each direction (the adapters step along û_j = u_j/‖u_j‖).
        mode: central_difference (plus and minus adapters) or one_sided (plus adapters; θ* from `base`).
        epsilon: step length along û_j.
        rank: LoRA rank of every adapter of the set.
        target_modules: module-name suffixes the adapters touch (for vLLM's `lora_target_modules`).
        direction_sources: the source of each direction's document (documents), or of each source (sources).
        document_ids: basis sets: the documents the coefficients' rows belong to (with `document_sources`).
        fingerprints: the artifact's model and subspace fingerprints.
        base_model: the served model the adapters belong to (name_or_path, revision).
        basis_coefficients: basis sets: C [N, k] (read from coefficients.safetensors when not given).
    """

    directory: Path
    kind: DirectionKind
    labels: list[str]
    norms: list[float]
    mode: DifferenceMode
    epsilon: float
    rank: int
    target_modules: list[str]
    direction_sources: list[Optional[str]] = field(default_factory=list)
    document_ids: list[str] = field(default_factory=list)
    document_sources: list[Optional[str]] = field(default_factory=list)
    fingerprints: dict = field(default_factory=dict)
    base_model: dict = field(default_factory=dict)
    library_version: str = __version__
    basis_coefficients: Optional[np.ndarray] = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.directory = Path(self.directory)
        self.kind = DirectionKind(self.kind)
        self.mode = DifferenceMode(self.mode)
        if len(self.labels) != len(self.norms):
            raise AdapterExportError(f"{len(self.labels)} direction labels for {len(self.norms)} norms; they must match.")
        if not self.labels:
            raise AdapterExportError("An adapter set needs at least one direction.")
        if not self.epsilon > 0:
            raise AdapterExportError(f"`epsilon` must be > 0, got {self.epsilon!r}.")
        self.direction_sources = list(self.direction_sources) or [None] * len(self.labels)

    # ------------------------------------------------------------------ what is in the set
    @property
    def num_directions(self) -> int:
        """Number of directions (sources, basis rows or documents)."""
        return len(self.labels)

    @property
    def signs(self) -> tuple[int, ...]:
        """The perturbation signs exported per direction."""
        return {DifferenceMode.CENTRAL: (1, -1), DifferenceMode.ONE_SIDED: (1,), DifferenceMode.REMOVAL: (-1,)}[self.mode]

    @property
    def steps_along_units(self) -> bool:
        """Whether the adapters step ε along û_j (difference modes) or take the whole u_j away (removal)."""
        return self.mode is not DifferenceMode.REMOVAL

    @property
    def entries(self) -> list[AdapterEntry]:
        """Every adapter of the set: `base` first, then plus (and minus) per direction."""
        out = [AdapterEntry(BASE_ADAPTER, None, 0)]
        for j in range(self.num_directions):
            out.extend(AdapterEntry(adapter_name(j, s), j, s) for s in self.signs)
        return out

    @property
    def scoring_entries(self) -> list[AdapterEntry]:
        """The adapters a readout needs: plus/minus per direction, and `base` for one-sided and removal sets."""
        return [e for e in self.entries if e.direction is not None or self.mode is not DifferenceMode.CENTRAL]

    def path(self, name: str) -> Path:
        """Folder of the adapter `name`."""
        return self.directory / name

    @property
    def set_id(self) -> str:
        """A short id of this set's content, used to name its adapters on a server."""
        key = json.dumps([self.fingerprints, self.kind.value, self.labels, self.norms, self.mode.value, self.epsilon],
                         sort_keys=True)
        return hashlib.sha256(key.encode()).hexdigest()[:12]

    def served_name(self, name: str) -> str:
        """The name adapter `name` is registered under on a server (unique per set)."""
        return f"fwdattr-{self.set_id}-{name}"

    @property
    def vllm_max_lora_rank(self) -> int:
        """The smallest vLLM `max_lora_rank` that serves this set."""
        return smallest_vllm_rank(self.rank)

    @property
    def coefficients(self) -> np.ndarray:
        """Basis sets: the coefficients C [N, k] of the documents on the basis directions."""
        if self.kind is not DirectionKind.BASIS:
            raise AdapterExportError(f"Only basis adapter sets carry coefficients; this one holds {self.kind.value}.")
        if self.basis_coefficients is None:
            from safetensors.numpy import load_file

            self.basis_coefficients = load_file(str(self.directory / COEFFICIENTS_NAME))["coefficients"]
        return self.basis_coefficients

    # ------------------------------------------------------------------ scores
    def direction_scores(self, values: Mapping[str, Sequence[float]]) -> np.ndarray:
        """[n_queries, n_directions] scores ∇f_qᵀu_j (removal sets: f_q(θ*) − f_q(θ* − u_j)) from `values`:
        adapter name → f_q under it, one per query.

        Positive = training along u_j makes the answer more likely (a proponent).
        """
        def column(name: str) -> np.ndarray:
            if name not in values:
                raise ServingError(f"No log-likelihoods under adapter {name!r}; the readout needs every adapter of the set.")
            return np.asarray(values[name], dtype=np.float64)

        if self.mode is DifferenceMode.REMOVAL:
            minus = np.stack([column(adapter_name(j, -1)) for j in range(self.num_directions)], axis=1)
            return column(BASE_ADAPTER)[:, None] - minus
        norms = np.asarray(self.norms, dtype=np.float64)
        plus = np.stack([column(adapter_name(j, 1)) for j in range(self.num_directions)], axis=1)
        if self.mode is DifferenceMode.CENTRAL:
            minus = np.stack([column(adapter_name(j, -1)) for j in range(self.num_directions)], axis=1)
            slopes = (plus - minus) / (2 * self.epsilon)
        else:
            slopes = (plus - column(BASE_ADAPTER)[:, None]) / self.epsilon
        return slopes * norms[None, :]

    def document_scores(self, direction_scores: np.ndarray) -> np.ndarray:
        """Basis sets: [n_queries, N] document scores C (Vᵀ∇f_q) from the basis directions' scores."""
        if self.kind is not DirectionKind.BASIS:
            raise AdapterExportError(f"Only basis adapter sets have document scores through coefficients; this one holds {self.kind.value}.")
        return np.asarray(direction_scores, dtype=np.float64) @ self.coefficients.astype(np.float64).T

    def ranked(self, scores: Sequence[float], top_k: int = 5) -> list[dict]:
        """The `top_k` largest of one query's scores as records, like the attributed pipeline's:
        ``{"source", "score"}`` for source sets, ``{"document_id", "source", "score"}`` for the others
        (basis sets: `scores` are document scores, see `document_scores`)."""
        scores = np.asarray(scores, dtype=np.float64)
        order = np.argsort(-scores, kind="stable")[: max(0, int(top_k))]
        if self.kind is DirectionKind.SOURCES:
            return [{"source": self.labels[i], "score": float(scores[i])} for i in order]
        if self.kind is DirectionKind.BASIS:
            return [{"document_id": self.document_ids[i], "source": self.document_sources[i], "score": float(scores[i])} for i in order]
        return [{"document_id": self.labels[i], "source": self.direction_sources[i], "score": float(scores[i])} for i in order]

    # ------------------------------------------------------------------ saving, loading
    def to_dict(self) -> dict[str, Any]:
        """The manifest's content."""
        return {
            "format_version": FORMAT_VERSION,
            "library_version": self.library_version,
            "kind": self.kind.value,
            "labels": self.labels,
            "norms": [float(n) for n in self.norms],
            "mode": self.mode.value,
            "epsilon": float(self.epsilon),
            "rank": int(self.rank),
            "target_modules": list(self.target_modules),
            "direction_sources": self.direction_sources,
            "document_ids": self.document_ids,
            "document_sources": self.document_sources,
            "fingerprints": self.fingerprints,
            "base_model": self.base_model,
            "adapters": [{"name": e.name, "direction": e.direction, "sign": e.sign} for e in self.entries],
        }

    def save_manifest(self) -> Path:
        """Write fwdattr_adapters.json (atomically) and, for basis sets, the coefficients."""
        self.directory.mkdir(parents=True, exist_ok=True)
        if self.kind is DirectionKind.BASIS and self.basis_coefficients is not None:
            from safetensors.numpy import save_file

            save_file({"coefficients": np.ascontiguousarray(self.basis_coefficients)}, str(self.directory / COEFFICIENTS_NAME),
                      metadata={"format": "np"})
        path = self.directory / MANIFEST_NAME
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True), encoding="utf-8")
        os.replace(tmp, path)
        return path

    @classmethod
    def from_pretrained(cls, directory: Union[str, Path]) -> "AdapterSet":
        """Load the set written by `export_adapters` into `directory`."""
        directory = Path(directory)
        path = directory / MANIFEST_NAME
        if not path.is_file():
            raise AdapterExportError(f"{directory} has no {MANIFEST_NAME}; it is not an adapter set written by `export_adapters`.")
        data = json.loads(path.read_text(encoding="utf-8"))
        known = {"kind", "labels", "norms", "mode", "epsilon", "rank", "target_modules", "direction_sources", "document_ids",
                 "document_sources", "fingerprints", "base_model", "library_version"}
        adapter_set = cls(directory=directory, **{k: v for k, v in data.items() if k in known})
        missing = [e.name for e in adapter_set.entries if not (directory / e.name / "adapter_config.json").is_file()]
        if missing:
            raise AdapterExportError(f"{directory} lacks the adapter folders {missing[:3]} (of {len(missing)}); export the set again.")
        return adapter_set
