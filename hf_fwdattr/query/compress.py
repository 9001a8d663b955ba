"""The compressed readout basis U ≈ C Vᵀ (DESIGN §5): k directions per query, whatever N is.

V (the top-k right singular vectors of the response matrix U, N × p) comes from a randomized SVD that
streams the shards twice (sketch, then projection); C = U V is a third streamed pass. A query's scores
are then C (Vᵀ∇f_q): k tangent directions plus an N × k product. The rank is the smallest one whose
scores keep `fidelity` (mean Spearman correlation with exact scores) on held-out queries; exact scores
for that check come from backward passes, which is fine at training time.

For compressed response storage (`integrations/compressed_build.py`) V must be fixed before the responses
exist, from a sample of them: `gram_basis` takes it from the sample's n × n Gram matrix, so that memory is
n² + k × p whatever p is, and `spearman_at_ranks` measures the fidelity of its ranks on other documents.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterator

import torch

from ..errors import ArtifactError
from ..stats import pearson_rows, spearman_rows

logger = logging.getLogger(__name__)


def _chunks(store, chunk_rows: int) -> Iterator[torch.Tensor]:
    for block in store.iter_chunks(chunk_rows):
        yield block.to(torch.float64)


def randomized_basis(store, rank: int, oversample: int = 16, power_iterations: int = 1, seed: int = 0,
                     chunk_rows: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """(V [p, l], singular values [l]) of the rows in `store`, l = min(rank + oversample, N, p), by streaming.

    Halko et al.'s range finder on Uᵀ: Y = U Ω (N × l, kept in memory), orthonormalised, optionally refined
    by power iterations, then the SVD of the small B = Qᵀ U (l × p).
    """
    n, p = store.num_rows, store.dim
    width = min(rank + oversample, n, p)
    generator = torch.Generator().manual_seed(seed)
    omega = torch.randn(p, width, generator=generator, dtype=torch.float64)

    def times(matrix: torch.Tensor) -> torch.Tensor:  # U @ matrix, streamed
        return torch.cat([block @ matrix for block in _chunks(store, chunk_rows)])

    def transposed_times(matrix: torch.Tensor) -> torch.Tensor:  # Uᵀ @ matrix, streamed
        out, row = torch.zeros(p, matrix.shape[1], dtype=torch.float64), 0
        for block in _chunks(store, chunk_rows):
            out += block.T @ matrix[row : row + len(block)]
            row += len(block)
        return out

    q = torch.linalg.qr(times(omega)).Q
    for _ in range(power_iterations):
        q = torch.linalg.qr(times(torch.linalg.qr(transposed_times(q)).Q)).Q
    b = transposed_times(q).T  # l × p
    _, singular_values, vh = torch.linalg.svd(b, full_matrices=False)
    return vh.T.contiguous(), singular_values


def project(store, directions: torch.Tensor, chunk_rows: int = 4096) -> torch.Tensor:
    """C = U V: every row's coordinates on the basis directions, [N, k]."""
    return torch.cat([block @ directions for block in _chunks(store, chunk_rows)])


def smallest_sufficient_rank(fidelity_at: Callable[[int], float], max_rank: int, target: float) -> int:
    """The smallest rank in 1 … `max_rank` whose `fidelity_at(rank)` reaches `target` (`max_rank` if none does).

    Bisection, assuming fidelity grows with the rank: ~log2(k) evaluations of an N × rank product instead of k,
    which matters at N = 10⁵.
    """
    if fidelity_at(max_rank) < target:
        return max_rank
    low, high = 1, max_rank
    while low < high:
        middle = (low + high) // 2
        if fidelity_at(middle) >= target:
            high = middle
        else:
            low = middle + 1
    return low


def build_readout_basis(store, query_gradients: torch.Tensor, max_rank: int, fidelity: float = 0.99, seed: int = 0,
                        chunk_rows: int = 4096) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The compressed basis for the rows of `store` and its fidelity on held-out queries.

    Args:
        store: response rows (`ShardedResponses`, `InMemoryResponses`, ...).
        query_gradients: [Q, p] ∇f_q of held-out queries (backward passes, at training time).
        max_rank: the largest rank considered.
        fidelity: the smallest rank whose mean Spearman correlation with exact scores reaches this is kept
            (max_rank if none does; the figures say so).

    Returns:
        ({"directions": V [k, p], "coefficients": C [N, k], "singular_values": [k]}, fidelity figures).
    """
    if max_rank < 1:
        raise ArtifactError(f"`max_rank` must be >= 1, got {max_rank}.")
    directions, singular_values = randomized_basis(store, max_rank, seed=seed, chunk_rows=chunk_rows)
    directions, singular_values = directions[:, :max_rank], singular_values[:max_rank]
    coefficients = project(store, directions, chunk_rows)
    gradients = query_gradients.to(torch.float64)
    exact = torch.cat([gradients @ block.T for block in _chunks(store, chunk_rows)], dim=1)  # [Q, N]
    on_basis = gradients @ directions  # [Q, k]

    def spearman_at(rank: int) -> float:
        return float(spearman_rows(exact, on_basis[:, :rank] @ coefficients[:, :rank].T).nanmean())

    chosen = smallest_sufficient_rank(spearman_at, directions.shape[1], fidelity)
    spearman = spearman_at(chosen)
    approximate = on_basis[:, :chosen] @ coefficients[:, :chosen].T
    figures = {
        "readout_basis_rank": chosen,
        "readout_basis_spearman": spearman,
        "readout_basis_pearson": float(pearson_rows(exact, approximate).nanmean()),
        "readout_basis_target": fidelity,
        "readout_basis_heldout_queries": int(len(gradients)),
    }
    if figures["readout_basis_spearman"] < fidelity:
        logger.warning("The compressed basis reaches Spearman %.3f < %.3f at its largest rank %d; raise readout_basis_rank.",
                       figures["readout_basis_spearman"], fidelity, chosen)
    dtype = store.dtype
    basis = {
        "directions": directions[:, :chosen].T.contiguous().to(dtype),
        "coefficients": coefficients[:, :chosen].contiguous().to(dtype),
        "singular_values": singular_values[:chosen].contiguous().to(dtype),
    }
    return basis, figures


def gram_basis(store, max_rank: int, block_rows: int = 256, relative_tolerance: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """(V [k, p] float32 with orthonormal rows, singular values [k] float64): the top right singular vectors of the rows of
    `store` (n × p, n small: a sample of responses), k = min(`max_rank`, n, rank), from their n × n Gram matrix.

    Memory: the n × n Gram matrix, one slab of the rows and V itself — never a p × (k + oversampling) sketch, which
    is what matters when p is in the millions. A store with a `columns(lo, hi)` method (all n rows, columns lo:hi) is
    read twice in column slabs of `block_rows` × p values (Gram matrix, then V); any other store is read in blocks of
    `block_rows` rows, pairwise for the Gram matrix. Cost: n² p, then n k p. The products run in float32 (accumulated
    in float64), so directions whose singular value is below `relative_tolerance` × the largest — where the Gram
    matrix's rounding reaches them — are dropped, and V's rows are orthonormalised once more at the end (in order:
    the first keeps its direction).
    """
    n, dim = store.num_rows, store.dim
    gram = torch.zeros(n, n, dtype=torch.float64)
    width = max(1, block_rows * dim // max(n, 1))  # a column slab holds as many values as `block_rows` rows
    slabs = [(lo, min(lo + width, dim)) for lo in range(0, dim, width)]
    bounds = [(lo, min(lo + block_rows, n)) for lo in range(0, n, block_rows)]
    by_columns = hasattr(store, "columns")
    if by_columns:
        for lo, hi in slabs:
            slab = store.columns(lo, hi).to(torch.float32)
            gram += (slab @ slab.T).to(torch.float64)
    else:
        for position, (lo, hi) in enumerate(bounds):
            first = store.rows(range(lo, hi)).to(torch.float32)
            for other_lo, other_hi in bounds[position:]:
                second = first if other_lo == lo else store.rows(range(other_lo, other_hi)).to(torch.float32)
                block = (first @ second.T).to(torch.float64)
                gram[lo:hi, other_lo:other_hi] = block
                gram[other_lo:other_hi, lo:hi] = block.T
    eigenvalues, vectors = torch.linalg.eigh(gram)
    eigenvalues, vectors = eigenvalues.flip(0).clamp(min=0), vectors.flip(1)
    kept = int((eigenvalues > eigenvalues[0] * relative_tolerance**2).sum()) if n else 0
    rank = max(1, min(max_rank, kept))
    singular_values = eigenvalues[:rank].sqrt()
    weights = (vectors[:, :rank] / singular_values.clamp(min=torch.finfo(torch.float64).tiny)).to(torch.float32)  # V = Σ⁻¹ Wᵀ R
    directions = torch.zeros(rank, dim, dtype=torch.float32)
    if by_columns:
        for lo, hi in slabs:
            directions[:, lo:hi] = weights.T @ store.columns(lo, hi).to(torch.float32)
    else:
        for lo, hi in bounds:
            directions += weights[lo:hi].T @ store.rows(range(lo, hi)).to(torch.float32)
    overlap = (directions @ directions.T).to(torch.float64)  # ≈ I; L⁻¹ V makes it I (Cholesky: Gram–Schmidt in order)
    factor = torch.linalg.cholesky(overlap)
    for lo in range(0, dim, 65_536):  # by column blocks: no float64 copy of V
        block = directions[:, lo : lo + 65_536].to(torch.float64)
        directions[:, lo : lo + 65_536] = torch.linalg.solve_triangular(factor, block, upper=False).to(torch.float32)
    return directions, singular_values


def spearman_at_ranks(query_gradients: torch.Tensor, store, directions: torch.Tensor, block_rows: int = 256) -> Callable[[int], float]:
    """rank ↦ mean per-query Spearman correlation between the exact scores of the rows of `store` (against
    `query_gradients` [Q, p]) and their scores through the first `rank` rows of `directions` V [k, p].

    The rows are streamed once, `block_rows` at a time: only [Q, n] scores and [n, k] coefficients are kept.
    """
    gradients = query_gradients.to(torch.float32)
    basis = directions.to(torch.float32)
    exact, coefficients = [], []
    for lo in range(0, store.num_rows, block_rows):
        block = store.rows(range(lo, min(lo + block_rows, store.num_rows))).to(torch.float32)
        exact.append((gradients @ block.T).to(torch.float64))
        coefficients.append((block @ basis.T).to(torch.float64))
    exact_scores, coefficient_rows = torch.cat(exact, dim=1), torch.cat(coefficients)
    on_basis = (gradients @ basis.T).to(torch.float64)  # [Q, k]
    return lambda rank: float(spearman_rows(exact_scores, on_basis[:, :rank] @ coefficient_rows[:, :rank].T).nanmean())
