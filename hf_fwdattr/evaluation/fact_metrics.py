"""Fact-tracing metrics: where does a score matrix rank each query's true document (and source)?

Ties are broken at random and every metric is its expectation over that choice, so a method that gives
every document the same score scores like a random ranking, not like a perfect one.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any, Optional, Sequence

import numpy as np
import torch

from ..storage.table import source_positions, sum_by_source
from .metrics import EvaluationError

__all__ = ["FactTracingResult", "METHODS", "METHOD_LABELS", "Method", "reciprocal_ranks", "recall_at_k", "source_scores_from_documents", "summarize", "top_choice_accuracy", "true_document_ranks"]


class Method(str, Enum):
    """The methods a fact-tracing evaluation compares."""

    OURS = "ours"
    """The artifact's responses read out forward-only (`ArtifactScorer`)."""
    UNLEARNING = "ours_unlearning"
    """The artifact's documents re-simulated with the unlearning solver in the same subspace, removal readout."""
    BM25 = "bm25"
    """Lexical retrieval: the query and answer text against each document's text."""
    GRAD_DOT = "grad_dot"
    """Gradient dot product in the artifact's subspace."""
    INFLUENCE = "influence"
    """Exact damped influence in the artifact's subspace, with the full-batch curvature."""
    RANDOM = "random"
    """A seeded random ranking."""


METHODS = tuple(m.value for m in Method)
METHOD_LABELS = {
    "ours": "ours (forward-only readout)",
    "ours_unlearning": "ours, unlearning solver (forward-only)",
    "bm25": "BM25",
    "grad_dot": "gradient dot product",
    "influence": "exact damped influence",
    "random": "random",
}
@dataclass
class FactTracingResult:
    """Scores and metrics of every method on one fact-tracing set.

    Attributes:
        metrics: method → query kind (and ``"all"``) → recall@1, recall@10, MRR, source accuracy, n_queries.
        scores: method → [n_queries, n_documents] document scores (artifact row order).
        source_scores: method → [n_queries, n_sources] scores summed by source.
        document_ids, source_names: the columns of the two score matrices.
        true_index, true_source: per query, the column of the true document and of its source.
        kinds: per query, its kind.
        seconds: method → wall time of its scores.
        details: solver reports and settings, JSON-serialisable.
    """

    metrics: dict
    scores: dict[str, torch.Tensor]
    source_scores: dict[str, np.ndarray]
    document_ids: list[str]
    source_names: list[str]
    true_index: np.ndarray
    true_source: np.ndarray
    kinds: list[str]
    seconds: dict
    details: dict

    def to_dict(self) -> dict:
        """Metrics, timings and details (not the score matrices), for a JSON file."""
        return {"metrics": self.metrics, "seconds": self.seconds, "details": self.details,
                "n_documents": len(self.document_ids), "n_sources": len(self.source_names), "n_queries": len(self.kinds)}


def true_document_ranks(scores: Any, true_index: Any) -> tuple[np.ndarray, np.ndarray]:
    """The best and worst rank (1-based) the true document can take in each row of `scores`.

    Returns (first, last): the true document ranks first + 0, …, last − first places below first with
    equal probability when ties are broken at random.
    """
    scores = _matrix(scores)
    true_index = np.asarray(true_index, dtype=np.int64)
    if true_index.shape != (scores.shape[0],) or true_index.min(initial=0) < 0 or true_index.max(initial=0) >= scores.shape[1]:
        raise EvaluationError(f"`true_index` must hold one document index in [0, {scores.shape[1]}) per query, got shape {true_index.shape}.")
    true_scores = scores[np.arange(len(true_index)), true_index][:, None]
    above = (scores > true_scores).sum(axis=1)
    tied = (scores == true_scores).sum(axis=1) - 1
    return above + 1, above + 1 + tied


def recall_at_k(scores: Any, true_index: Any, k: int) -> np.ndarray:
    """Per query, the probability that the true document is among the top `k` (ties broken at random)."""
    first, last = true_document_ranks(scores, true_index)
    return np.clip(k - first + 1, 0, None).clip(max=last - first + 1) / (last - first + 1)


def reciprocal_ranks(scores: Any, true_index: Any) -> np.ndarray:
    """Per query, the expected 1 / rank of the true document (ties broken at random); MRR is their mean."""
    first, last = true_document_ranks(scores, true_index)
    return np.array([np.mean(1.0 / np.arange(a, b + 1)) for a, b in zip(first, last)])


def source_scores_from_documents(scores: Any, document_sources: Sequence[Optional[str]], source_names: Sequence[str],
                                 aggregate: str = "sum") -> np.ndarray:
    """[n_queries, n_sources]: each source's score is the sum of its documents' scores (``aggregate="sum"``: the
    counterfactual effect of the whole source, what the per-source readout gives), or their maximum (``"max"``:
    the source of the best document)."""
    scores = _matrix(scores)
    positions = source_positions(document_sources, source_names)
    if aggregate == "max":
        out = np.full((scores.shape[0], len(source_names)), -np.inf)
        for row, position in enumerate(positions.tolist()):
            if position >= 0:
                out[:, position] = np.maximum(out[:, position], scores[:, row])
        return out
    if aggregate != "sum":
        raise EvaluationError(f"`aggregate` must be 'sum' or 'max', got {aggregate!r}.")
    return sum_by_source(torch.from_numpy(scores).T, positions, len(source_names)).T.numpy()


def top_choice_accuracy(scores: Any, true_index: Any) -> np.ndarray:
    """Per row, the probability that the true column has the highest score (ties broken at random)."""
    return recall_at_k(scores, true_index, 1)


def _matrix(values: Any) -> np.ndarray:
    if hasattr(values, "detach"):
        values = values.detach().cpu().double().numpy()
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 2:
        raise EvaluationError(f"Scores must be a [n_queries, n_documents] matrix, got shape {array.shape}.")
    if not np.all(np.isfinite(array)):
        raise EvaluationError("Scores contain NaN or infinite values; a ranking with them is undefined.")
    return array


def summarize(scores: Any, true_index: Sequence[int], groups: dict[str, Any], source_scores: Optional[Any] = None,
              true_source: Optional[Sequence[int]] = None, ks: Sequence[int] = (1, 10), top_document_sources: Optional[Any] = None) -> dict:
    """recall@k, MRR (and source accuracy, when source scores are given) over each group of queries.

    `groups` maps a name to a boolean mask over the queries (e.g. one per query kind, and "all");
    empty groups are left out. `top_document_sources` ([n_queries, n_sources], e.g. max-aggregated scores)
    adds ``source_accuracy_top_document``.
    """
    recalls = {k: recall_at_k(scores, true_index, k) for k in ks}
    reciprocal = reciprocal_ranks(scores, true_index)
    source_hits = None if source_scores is None else top_choice_accuracy(source_scores, true_source)
    top_hits = None if top_document_sources is None else top_choice_accuracy(np.where(np.isfinite(top_document_sources), top_document_sources, -1e300), true_source)
    summary = {}
    for name, mask in groups.items():
        rows = np.asarray(mask, dtype=bool)
        if not rows.any():
            continue
        entry = {f"recall@{k}": float(recalls[k][rows].mean()) for k in ks}
        entry["mrr"] = float(reciprocal[rows].mean())
        if source_hits is not None:
            entry["source_accuracy"] = float(source_hits[rows].mean())
        if top_hits is not None:
            entry["source_accuracy_top_document"] = float(top_hits[rows].mean())
        entry["n_queries"] = int(rows.sum())
        summary[name] = entry
    return summary
