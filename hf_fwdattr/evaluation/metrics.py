"""Counterfactual evaluation of attribution scores (DESIGN §7): LDS and leave-one-out correlations.

Both metrics compare scores with the measured output of models actually retrained on changed
training sets, query by query, and average over queries:

- LDS (linear datamodeling score): for each query, the Spearman correlation over random training
  subsets between the summed scores of a subset's documents and the output of a model retrained on
  that subset.
- LOO: for each query, the Spearman and Pearson correlations over removed documents between the
  scores and the measured change when one document is removed and the model retrained.

Sign convention (as everywhere in the library): a positive score means training on the document
makes the query measurement larger, so the leave-one-out effect is measurement(full) −
measurement(without the document), and a good method correlates *positively* with it.

Arrays may be NumPy arrays or torch tensors; results are float64 NumPy. A query whose scores or
measurements are constant has no defined correlation: it is counted in `n_undefined` and left out
of the mean.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Optional

import numpy as np
import torch

from .. import stats

__all__ = [
    "CorrelationSummary",
    "EvaluationError",
    "LeaveOneOutResult",
    "lds",
    "leave_one_out",
    "leave_one_out_effects",
    "pearson_per_row",
    "rank_average",
    "spearman_per_row",
    "split_half_ceiling",
    "subset_score_sums",
]


class EvaluationError(ValueError):
    """Scores and measured outputs that cannot be compared (shapes disagree, values are not finite)."""


def _array(values: Any, name: str, ndim: int) -> np.ndarray:
    if hasattr(values, "detach"):
        values = values.detach().cpu().double().numpy()
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != ndim:
        raise EvaluationError(f"`{name}` must have {ndim} dimensions, got shape {array.shape}.")
    if not np.all(np.isfinite(array)):
        raise EvaluationError(f"`{name}` contains NaN or infinite values; a correlation with them is undefined.")
    return array


def rank_average(values: np.ndarray) -> np.ndarray:
    """Ranks along the last axis (0-based), ties given the average of the ranks they span (as `scipy.stats.rankdata`)."""
    return stats.average_ranks(torch.as_tensor(np.asarray(values, dtype=np.float64))).numpy()


def _checked_pair(a: Any, b: Any) -> tuple[np.ndarray, np.ndarray]:
    a, b = _array(a, "a", 2), _array(b, "b", 2)
    if a.shape != b.shape:
        raise EvaluationError(f"Expected arrays of one shape, got {a.shape} and {b.shape}.")
    if a.shape[1] < 2:
        raise EvaluationError(f"A correlation needs at least 2 values per row, got {a.shape[1]}.")
    return a, b


def pearson_per_row(a: Any, b: Any) -> np.ndarray:
    """Pearson correlation of each row of `a` with the same row of `b` ([R, n] each → [R]); NaN for constant rows."""
    a, b = _checked_pair(a, b)
    return stats.pearson_rows(torch.from_numpy(a), torch.from_numpy(b)).numpy()


def spearman_per_row(a: Any, b: Any) -> np.ndarray:
    """Spearman rank correlation (ties averaged) of each row of `a` with the same row of `b`; NaN for constant rows."""
    a, b = _checked_pair(a, b)
    return stats.spearman_rows(torch.from_numpy(a), torch.from_numpy(b)).numpy()


@dataclass
class CorrelationSummary:
    """A per-query correlation averaged over queries.

    Attributes:
        mean: mean over the queries where the correlation is defined.
        stderr: standard error of that mean (sample standard deviation / √n).
        per_query: the correlation of each query (NaN where undefined).
        n_queries: number of queries the mean is over.
        n_undefined: queries left out because their scores or measurements were constant.
    """

    mean: float
    stderr: float
    per_query: np.ndarray
    n_queries: int
    n_undefined: int

    @classmethod
    def from_per_query(cls, per_query: np.ndarray) -> "CorrelationSummary":
        """Summarise per-query correlations (NaN = undefined)."""
        per_query = np.asarray(per_query, dtype=np.float64)
        defined = per_query[np.isfinite(per_query)]
        n = int(defined.size)
        mean = float(defined.mean()) if n else float("nan")
        stderr = float(defined.std(ddof=1) / np.sqrt(n)) if n > 1 else float("nan")
        return cls(mean, stderr, per_query, n, int(per_query.size - n))

    def to_dict(self, per_query: bool = False) -> dict:
        """JSON-serialisable form (the per-query values only if asked)."""
        data = asdict(self)
        data["per_query"] = [None if not np.isfinite(v) else float(v) for v in self.per_query] if per_query else None
        if not per_query:
            del data["per_query"]
        return data

    def __str__(self) -> str:
        return f"{self.mean:.3f} ± {self.stderr:.3f}"


def subset_score_sums(scores: Any, subsets: Any) -> np.ndarray:
    """Predicted subset outputs: for each subset and query, the sum of the scores of the subset's documents.

    Args:
        scores: [n_queries, n_documents] scores.
        subsets: [n_subsets, n_documents] membership (booleans or 0/1).

    Returns:
        [n_queries, n_subsets] sums.
    """
    scores = _array(scores, "scores", 2)
    subsets = _array(subsets, "subsets", 2)
    if subsets.shape[1] != scores.shape[1]:
        raise EvaluationError(
            f"`subsets` covers {subsets.shape[1]} documents but `scores` has {scores.shape[1]}; "
            "both must index the same training documents in the same order."
        )
    return scores @ subsets.T


def lds(scores: Any, subsets: Any, outputs: Any) -> CorrelationSummary:
    """Linear datamodeling score.

    Args:
        scores: [n_queries, n_documents] attribution scores (positive = proponent).
        subsets: [n_subsets, n_documents] membership of each random training subset (booleans or 0/1).
        outputs: [n_subsets, n_queries] measurement of the model retrained on each subset, at each query
            (averaged over retraining seeds, if several).

    Returns:
        The per-query Spearman correlation between `subset_score_sums(scores, subsets)` and `outputs`,
        averaged over queries, with its standard error.
    """
    predicted = subset_score_sums(scores, subsets)
    outputs = _array(outputs, "outputs", 2)
    if outputs.shape != (predicted.shape[1], predicted.shape[0]):
        raise EvaluationError(
            f"`outputs` must have shape [n_subsets, n_queries] = {(predicted.shape[1], predicted.shape[0])}, got {outputs.shape}."
        )
    return CorrelationSummary.from_per_query(spearman_per_row(predicted, outputs.T))


def leave_one_out_effects(full_outputs: Any, removed_outputs: Any) -> np.ndarray:
    """Measured leave-one-out effects, measurement(full) − measurement(without document), averaged over seeds.

    Args:
        full_outputs: [n_seeds, n_queries] measurement of the model trained on all documents, per seed.
        removed_outputs: [n_seeds, n_removed, n_queries] measurement of the model retrained without each
            removed document, with the same seeds (paired with `full_outputs`).

    Returns:
        [n_removed, n_queries] effects; positive where removing the document lowers the measurement,
        i.e. where the document is a proponent.
    """
    full = _array(full_outputs, "full_outputs", 2)
    removed = _array(removed_outputs, "removed_outputs", 3)
    if removed.shape[0] != full.shape[0] or removed.shape[2] != full.shape[1]:
        raise EvaluationError(
            f"`removed_outputs` {removed.shape} must be [n_seeds, n_removed, n_queries] with the seeds and queries "
            f"of `full_outputs` {full.shape}."
        )
    return (full[:, None, :] - removed).mean(axis=0)


@dataclass
class LeaveOneOutResult:
    """Leave-one-out correlations: Spearman and Pearson, per query, averaged over queries."""

    spearman: CorrelationSummary
    pearson: CorrelationSummary

    def to_dict(self) -> dict:
        """JSON-serialisable form."""
        return {"spearman": self.spearman.to_dict(), "pearson": self.pearson.to_dict()}


def leave_one_out(scores: Any, effects: Any) -> LeaveOneOutResult:
    """Correlation, per query, between scores and measured leave-one-out effects.

    Args:
        scores: [n_queries, n_removed] scores of the removed documents (columns in the order of `effects`).
        effects: [n_removed, n_queries] measurement(full) − measurement(without document), e.g. from
            `leave_one_out_effects`.
    """
    scores = _array(scores, "scores", 2)
    effects = _array(effects, "effects", 2)
    if effects.shape != scores.T.shape:
        raise EvaluationError(f"`effects` must have shape [n_removed, n_queries] = {scores.T.shape}, got {effects.shape}.")
    return LeaveOneOutResult(
        spearman=CorrelationSummary.from_per_query(spearman_per_row(scores, effects.T)),
        pearson=CorrelationSummary.from_per_query(pearson_per_row(scores, effects.T)),
    )


def split_half_ceiling(replicates: Any, metric: str = "spearman", generator: Optional[np.random.Generator] = None, splits: int = 20) -> dict:
    """Seed-to-seed noise ceiling of a measured ground truth, by split halves over seeds.

    `replicates` is [n_seeds, n_items, n_queries]: the same measurement (a subset's output, a
    leave-one-out effect) repeated with independent training seeds. The seeds are split at random
    into two halves; for each query the correlation over items between the two half-averages is the
    half-data reliability r_half. The Spearman–Brown formula r_full = 2 r / (1 + r) extrapolates it
    to the average over all seeds, and √r_full estimates the highest correlation a noise-free
    predictor could reach against that noisy average.

    Returns:
        dict with ``half`` (mean r_half over queries and splits), ``full`` (Spearman–Brown r_full) and
        ``ceiling`` (√r_full, NaN when r_full <= 0).
    """
    replicates = _array(replicates, "replicates", 3)
    n_seeds = replicates.shape[0]
    if n_seeds < 2:
        raise EvaluationError(f"A split-half ceiling needs at least 2 seeds, got {n_seeds}.")
    generator = generator or np.random.default_rng(0)
    correlate = spearman_per_row if metric == "spearman" else pearson_per_row
    values = []
    for _ in range(splits):
        order = generator.permutation(n_seeds)
        first, second = order[: n_seeds // 2], order[n_seeds // 2 : 2 * (n_seeds // 2)]
        r = correlate(replicates[first].mean(axis=0).T, replicates[second].mean(axis=0).T)
        values.append(np.nanmean(r))
    half = float(np.mean(values))
    # the halves hold n_seeds // 2 seeds each; the full average holds n_seeds: factor k = n_seeds / (n_seeds // 2)
    k = n_seeds / (n_seeds // 2)
    full = k * half / (1 + (k - 1) * half)
    return {"half": half, "full": float(full), "ceiling": float(np.sqrt(full)) if full > 0 else float("nan")}
