"""The methods fact tracing and LDS compare the forward-only readout with (DESIGN §7).

All give a [n_queries, n_documents] score matrix with the library's sign convention (positive = the
document makes the query more likely, for the methods that have a sign):

- `BM25Scores`: lexical retrieval with the `bm25s` package, the query text against each document text;
- `gradient_dot_scores`: ∇f_q · g_b in the attribution subspace (one backward per query and per document);
- `damped_influence_scores`: −∇f_qᵀ(H + λI)⁻¹ g_b with the *full-batch* curvature of the training loss —
  the K → ∞ limit the simulation approaches — solved by conjugate gradients to a stated tolerance, or
  through the eigendecomposition of the explicit curvature matrix (`estimator.eigenbasis.ExplicitEigenbasis`, small subspaces);
- `random_scores`: a seeded random ranking, the floor.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import torch

from ..estimator.config import Curvature
from ..estimator.conjugate import ConjugateGradientResult, conjugate_gradients
from ..estimator.curvature import CurvatureOperator
from ..estimator.documents import DocumentSet
from ..estimator.eigenbasis import ExplicitEigenbasis
from ..estimator.gradients import document_gradients, query_gradients
from ..estimator.subspace import AttributionSubspace

logger = logging.getLogger(__name__)


class BM25Scores:
    """BM25 (Lucene variant, k1 = 1.5, b = 0.75) over the document texts, from the `bm25s` package.

    Texts are lower-cased and split into words; English stop words are dropped.
    """

    def __init__(self, texts: Sequence[str], stopwords: Optional[str] = "en"):
        try:
            import bm25s
        except ImportError as err:
            raise ImportError("The BM25 baseline needs the `bm25s` package: pip install bm25s") from err
        self._bm25s = bm25s
        self.stopwords = stopwords
        self.retriever = bm25s.BM25()
        self.retriever.index(self._tokenize(list(texts)), show_progress=False)
        self.num_documents = len(texts)

    def _tokenize(self, texts: list[str]) -> list[list[str]]:
        return self._bm25s.tokenize(texts, stopwords=self.stopwords, return_ids=False, show_progress=False)

    def scores(self, query_texts: Sequence[str]) -> torch.Tensor:
        """[n_queries, n_documents] BM25 scores of each query text (0 where no word is shared)."""
        rows = [self.retriever.get_scores(words) if words else np.zeros(self.num_documents) for words in self._tokenize(list(query_texts))]
        return torch.tensor(np.stack(rows), dtype=torch.float64)


def gradient_dot_scores(subspace: AttributionSubspace, task, queries: Sequence[Any], documents: DocumentSet,
                        document_grads: Optional[torch.Tensor] = None, batch_size: int = 16) -> torch.Tensor:
    """−∇f_q · g_b for every query and document, in the subspace (float64 result).

    g_b = ∇L_b is a *loss* gradient, so a training step on b changes f_q by −η ∇f_q · g_b: the minus
    sign gives the library's convention, positive = proponent.
    """
    if document_grads is None:
        document_grads = document_gradients(subspace, task, documents, batch_size=batch_size)
    return -(query_gradients(subspace, task, queries).double() @ document_grads.double().T)


def damped_solve(operator: CurvatureOperator, right_hand_sides: torch.Tensor, damping: float, tolerance: float = 1e-4,
                 max_iterations: int = 2000, chunk_size: int = 32) -> ConjugateGradientResult:
    """Solve (H + λI) x = b for each row b by conjugate gradients (`estimator.conjugate`), all rows at once, H from
    `operator`, its products `chunk_size` rows at a time. Each row stops updating once its relative residual is below
    `tolerance`."""

    def curvature(vectors: torch.Tensor) -> torch.Tensor:
        return torch.cat([operator.matvec(vectors[lo : lo + chunk_size]) for lo in range(0, len(vectors), chunk_size)])

    return conjugate_gradients(curvature, right_hand_sides.to(operator.dtype), damping, tolerance, max_iterations)


@dataclass
class InfluenceSolve:
    """How `damped_influence_scores` solved its systems: 'cg' (with its report) or 'dense' (with the eigensystem)."""

    solver: str
    seconds: float
    conjugate_gradient: Optional[ConjugateGradientResult] = None
    eigensystem: Optional[ExplicitEigenbasis] = None

    def summary(self) -> dict:
        """JSON-serialisable description."""
        out = {"solver": self.solver, "seconds": self.seconds}
        if self.conjugate_gradient is not None:
            cg = self.conjugate_gradient
            out.update(iterations=cg.iterations, converged=cg.converged, max_relative_residual=float(cg.relative_residuals.max()))
        if self.eigensystem is not None:
            out.update(smallest_eigenvalue=float(self.eigensystem.eigenvalues[0]), largest_eigenvalue=float(self.eigensystem.eigenvalues[-1]))
        return out


def damped_influence_scores(subspace: AttributionSubspace, task, queries: Sequence[Any], documents: DocumentSet,
                            train_examples: Sequence[Any], damping: float, curvature: Curvature | str = Curvature.GGN,
                            document_grads: Optional[torch.Tensor] = None, solver: str = "auto", tolerance: float = 1e-4,
                            max_iterations: int = 2000, eigensystem: Optional[ExplicitEigenbasis] = None,
                            dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, InfluenceSolve]:
    """−∇f_qᵀ(H + λI)⁻¹g_b with H the curvature of the mean training loss over *all* `train_examples`.

    `solver`: ``"dense"`` builds the explicit curvature (p products) and inverts it through its
    eigendecomposition (or uses `eigensystem` when given); ``"cg"`` runs conjugate gradients on the query
    gradients (one system per query); ``"auto"`` takes ``"dense"`` when p is at most the number of CG
    products a solve would need at the least (20 iterations per query), else ``"cg"``.
    """
    start = time.perf_counter()
    if solver == "auto":
        solver = "dense" if eigensystem is not None or subspace.dim <= 20 * len(queries) else "cg"
    if solver not in ("dense", "cg"):
        raise ValueError(f"`solver` must be 'auto', 'dense' or 'cg', got {solver!r}.")
    if document_grads is None:
        document_grads = document_gradients(subspace, task, documents, dtype=dtype)
    query_grads = query_gradients(subspace, task, queries, dtype=dtype)
    operator = None
    if solver == "cg" or eigensystem is None:
        operator = CurvatureOperator(subspace, task, task.collate(list(train_examples)), Curvature(curvature), dtype)
    if solver == "dense":
        eigensystem = eigensystem or ExplicitEigenbasis.from_operator(operator)
        solutions = eigensystem.damped_inverse(query_grads, damping)
        report = InfluenceSolve("dense", 0.0, eigensystem=eigensystem)
    else:
        solved = damped_solve(operator, query_grads, damping, tolerance, max_iterations)
        if not solved.converged:
            logger.warning("CG stopped after %d iterations with relative residual up to %.2e (tolerance %.0e).",
                           solved.iterations, float(solved.relative_residuals.max()), tolerance)
        solutions, report = solved.solutions, InfluenceSolve("cg", 0.0, conjugate_gradient=solved)
    report.seconds = time.perf_counter() - start
    return -(solutions.to(dtype) @ document_grads.to(dtype).T), report


def random_scores(n_queries: int, n_documents: int, seed: int = 0) -> torch.Tensor:
    """Independent standard normal scores: a random ranking, the floor every method must clear."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n_queries, n_documents, generator=generator, dtype=torch.float64)
