"""The top eigendirections of the true GGN beyond the explicit size: randomized Nyström with power passes.

For a subspace too large for the [p, p] GGN, the closed-form filter needs the curvature only where it matters: along
an eigenvalue h with h ≪ λ (or ηKh ≪ 1) the filter is ≈ −1/λ (≈ −ηK) whatever h is. So the k largest eigenpairs of
the GGN G = (1/n) Σ aᵀa are resolved and the rest of the spectrum gets one value, the complement eigenvalue:

    Ω  → [p, l] Gaussian, orthonormalised                      (l = k + oversampling)
    Q ← orth(G Q)                      `power_passes` times     (one pass over the data each)
    G ≈ (G Q)(Qᵀ G Q)⁺(G Q)ᵀ             Nyström on a last pass; its k largest eigenpairs are kept

Every pass streams the same per-example Jacobian rows a the explicit GGN is built from (`ggn.jacobian_rows`: exact,
or sketched with a fixed seed so that every pass multiplies by the same matrix) and accumulates G Q = Σ aᵀ(a Q) in
float64: memory p × l, never p × p. The trace Σ‖a‖² comes with each pass, so the complement eigenvalue can be the
mean of the spectrum that was not resolved, (tr G − Σ top k) / (p − k), or 0.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from ..progress import progress_bar
from .config import Complement
from .documents import length_batches
from .ggn import jacobian_rows
from .subspace import AttributionSubspace

logger = logging.getLogger(__name__)


@dataclass
class LowRankGGN:
    """The k largest eigenpairs of the GGN and the eigenvalue given to the rest of the space.

    Attributes:
        eigenvalues: [k], descending.
        eigenvectors: [p, k], orthonormal columns.
        complement: eigenvalue of every direction orthogonal to the eigenvectors.
        trace: tr G, from the Jacobian rows' squared norms.
        seconds: wall time of the estimate.
    """

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor
    complement: float
    trace: float
    seconds: float


def oversampling(rank: int) -> int:
    """Extra random directions beyond `rank` (Halko et al.: 5–10 suffice; a tenth of the rank for large ranks)."""
    return max(10, rank // 10)


def ggn_products(subspace: AttributionSubspace, task, examples: Sequence[Any], batch_size: int, vectors: torch.Tensor,
                 samples: Optional[int] = None, seed: int = 0, progress: bool = False) -> tuple[torch.Tensor, float]:
    """(G V, tr G) for the GGN of the mean training loss over `examples` and the columns of `vectors` [p, m], in float64.

    One pass over `examples`: per batch, each backward pass's Jacobian rows a ([B, p]) add aᵀ(a V) / n. `samples`
    sketches the rows as `ggn.gauss_newton` does (the same seed gives the same sketched G on every pass).
    """
    generator = torch.Generator().manual_seed(seed)
    vectors = vectors.to(device=subspace.device, dtype=torch.float64)
    products = torch.zeros_like(vectors)
    trace = 0.0
    for batch in progress_bar(length_batches(task, examples, batch_size), desc="Curvature (low-rank pass)", enabled=progress):
        for rows in jacobian_rows(subspace, task, task.collate(batch), dtype=torch.float64, samples=samples, generator=generator):
            products.addmm_(rows.T, rows @ vectors)
            trace += float((rows * rows).sum())
    return products / len(examples), trace / len(examples)


def nystrom(products: torch.Tensor, basis: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The `rank` largest eigenpairs (descending values, [p, rank] vectors) of the Nyström approximation
    (G Q)(Qᵀ G Q)⁺(G Q)ᵀ of a PSD G, from `products` = G Q and the orthonormal `basis` Q."""
    core = basis.T @ products
    values, vectors = torch.linalg.eigh((core + core.T) / 2)
    keep = values > values.max().clamp_min(0) * 1e-12 * len(values)  # the pseudo-inverse of Qᵀ G Q
    factor = products @ (vectors[:, keep] / values[keep].sqrt())  # G ≈ F Fᵀ
    left, singular, _ = torch.linalg.svd(factor, full_matrices=False)
    return (singular**2)[:rank], left[:, :rank]


def low_rank_ggn(subspace: AttributionSubspace, task, examples: Sequence[Any], batch_size: int, rank: int,
                 power_passes: int = 2, complement: Complement | str = Complement.MEAN, samples: Optional[int] = None,
                 seed: int = 0, progress: bool = False) -> LowRankGGN:
    """The `rank` largest eigenpairs of the GGN over `examples` and one `complement` eigenvalue for the rest:
    `power_passes` + 1 passes over the data (module docstring); float64."""
    start = time.perf_counter()
    complement = Complement(complement)
    p = subspace.dim
    width = min(p, rank + oversampling(rank))
    generator = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(p, width, generator=generator, dtype=torch.float64))[0].to(subspace.device)
    for _ in range(power_passes):
        products, trace = ggn_products(subspace, task, examples, batch_size, basis, samples, seed, progress)
        basis = torch.linalg.qr(products)[0]
    products, trace = ggn_products(subspace, task, examples, batch_size, basis, samples, seed, progress)
    values, vectors = nystrom(products, basis, rank)
    rest = max(trace - float(values.sum()), 0.0) / (p - len(values)) if p > len(values) else 0.0
    value = rest if complement is Complement.MEAN else 0.0
    seconds = time.perf_counter() - start
    logger.info("Low-rank GGN: the %d largest eigenvalues (%.4g … %.4g) of %d coordinates in %d passes over %d examples (%.1f s); "
                "trace %.4g, of which the top %d hold %.1f%%; the other %d directions get eigenvalue %.4g (complement=%r).",
                len(values), float(values[0]) if len(values) else 0.0, float(values[-1]) if len(values) else 0.0, p,
                power_passes + 1, len(examples), seconds, trace, len(values), 100 * float(values.sum()) / trace if trace else 0.0,
                p - len(values), value, complement.value)
    return LowRankGGN(values, vectors, value, trace, seconds)
