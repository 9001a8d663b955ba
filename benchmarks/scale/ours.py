"""Our side of the scale benchmark: closed-form simulation, compressed basis, and per-query readout timings.

For one N: the artifact is built with the closed-form solver (EK-FAC eigenbasis on `curvature_examples`
training examples, then one pass of per-document gradients through the horizon filter), timed against the
epoch; the compressed basis is built on the 32 "fidelity" queries; readouts are timed on the 32 "test"
queries, contenders interleaved query by query.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Callable, Iterator

import torch

from hf_fwdattr import ArtifactScorer, AttributionConfig, AttributionSubspace, DocumentSet, InfluenceArtifact, build_influence_artifact, query_gradients
from hf_fwdattr.estimator.eigenbasis import estimate_eigenbasis
from hf_fwdattr.query.compress import project, randomized_basis, smallest_sufficient_rank
from hf_fwdattr.stats import pearson_rows, spearman_rows

from .model import TASK

DAMPING, HORIZON = 1e-3, 100
MAX_RANK = 1024
FIDELITY_TARGET = 0.99
SWEEP_RANKS = (8, 16, 32, 64, 128, 256, 512, 768, 1024)
FIXED_RANK = 256  # the compressed readout is also timed at this rank at every N, to separate N from k
READOUT_MODES = ("jvp", "central_difference", "one_sided")


def closed_form_config(curvature_examples: int | None) -> AttributionConfig:
    """The estimator of the scale benchmark: closed form, EK-FAC, K = 100, λ = 1e-3, η automatic."""
    return AttributionConfig(solver="closed_form", eigenbasis="kronecker", curvature_examples=curvature_examples,
                             damping=DAMPING, horizon=HORIZON, batch_size=32, simulation_chunk_size=256)


def build_artifact(model, documents: DocumentSet, examples: list[dict], directory: Path, curvature_examples: int) -> dict:
    """Build the artifact (timed, the whole `build_influence_artifact` call) and time its EK-FAC estimate alone."""
    config = closed_form_config(curvature_examples)
    start, cpu = time.perf_counter(), time.process_time()
    artifact = build_influence_artifact(model, TASK, documents, examples, directory, config, progress=False, max_shard_size="256MB")
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
    with AttributionSubspace.build(model) as subspace:
        start, cpu = time.perf_counter(), time.process_time()
        estimate_eigenbasis(subspace, TASK, examples, config)
        eigenbasis_seconds, eigenbasis_cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
    return {"simulation_seconds": seconds, "simulation_cpu_seconds": cpu_seconds, "eigenbasis_seconds": eigenbasis_seconds,
            "eigenbasis_cpu_seconds": eigenbasis_cpu_seconds, "curvature_examples": min(curvature_examples, len(examples)),
            "step_size": artifact.step_size, "top_eigenvalue": artifact.simulation.get("top_eigenvalue"), "dim": artifact.dim,
            "responses_mib": artifact.num_documents * artifact.dim * 4 / 2**20}


def streamed_scores(gradients: torch.Tensor, artifact: InfluenceArtifact, chunk_rows: int = 4096, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """[Q, N] exact scores ∇f_qᵀu_b from query gradients, streaming the responses, computed in `dtype`
    (float64 for the fidelity figures; the gradient-based readout contender uses the stored float32)."""
    out = torch.empty(len(gradients), artifact.num_documents, dtype=dtype)
    gradients, row = gradients.to(dtype), 0
    for block in artifact.iter_responses(chunk_rows):
        out[:, row : row + len(block)] = gradients @ block.to(dtype).T
        row += len(block)
    return out


def attach_basis(artifact: InfluenceArtifact, model, fidelity_queries: list, test_queries: list) -> tuple[dict, torch.Tensor]:
    """Build the compressed basis (rank ≤ MAX_RANK: the smallest rank whose mean Spearman against exact scores on the
    fidelity queries reaches FIDELITY_TARGET), save it with the artifact, and measure it on the test queries.

    The basis is exactly what `build_readout_basis(store, gradients, MAX_RANK, FIDELITY_TARGET)` computes — the same
    randomized SVD (`randomized_basis`, seed 0), projection (`project`) and rank bisection
    (`smallest_sufficient_rank`) — taken apart to time each step and to sweep the test fidelity over ranks.
    Bisection assumes the fidelity grows with the rank; `sweep` shows it does on this data.
    Returns (figures, exact scores of the test queries)."""
    with AttributionSubspace.build(model) as subspace:
        fidelity_gradients = query_gradients(subspace, TASK, fidelity_queries, dtype=torch.float64)
        test_gradients = query_gradients(subspace, TASK, test_queries, dtype=torch.float64)
    start, cpu = time.perf_counter(), time.process_time()
    directions, singular_values = randomized_basis(artifact.store, MAX_RANK)
    directions, singular_values = directions[:, :MAX_RANK], singular_values[:MAX_RANK]
    coefficients = project(artifact.store, directions)
    svd_seconds, svd_cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
    start = time.perf_counter()
    exact_fidelity = streamed_scores(fidelity_gradients, artifact)
    on_fidelity = fidelity_gradients @ directions

    def spearman(rank: int) -> float:
        return float(spearman_rows(exact_fidelity, on_fidelity[:, :rank] @ coefficients[:, :rank].T).nanmean())

    top = directions.shape[1]
    chosen = smallest_sufficient_rank(spearman, top, FIDELITY_TARGET)
    select_seconds = time.perf_counter() - start
    exact_test = streamed_scores(test_gradients, artifact)
    on_test = test_gradients @ directions
    sweep = {}
    for rank in sorted({r for r in SWEEP_RANKS if r <= top} | {chosen, top}):
        approximate = on_test[:, :rank] @ coefficients[:, :rank].T
        sweep[str(rank)] = {"fidelity_spearman": spearman(rank), "test_spearman": float(spearman_rows(exact_test, approximate).nanmean()),
                            "test_pearson": float(pearson_rows(exact_test, approximate).nanmean()),
                            "test_top10_overlap": top_overlap(exact_test, approximate, 10)}
    dtype = artifact.store.dtype
    basis = {"directions": directions[:, :chosen].T.contiguous().to(dtype), "coefficients": coefficients[:, :chosen].contiguous().to(dtype),
             "singular_values": singular_values[:chosen].contiguous().to(dtype)}
    artifact.set_readout_basis(basis, {"readout_basis_rank": chosen, "readout_basis_spearman": sweep[str(chosen)]["fidelity_spearman"],
                                       "readout_basis_pearson": float(pearson_rows(exact_fidelity, on_fidelity[:, :chosen] @ coefficients[:, :chosen].T).nanmean()),
                                       "readout_basis_target": FIDELITY_TARGET, "readout_basis_heldout_queries": len(fidelity_queries)})
    artifact.save_pretrained(artifact.path)
    figures = {"svd_seconds": svd_seconds, "svd_cpu_seconds": svd_cpu_seconds, "rank_selection_seconds": select_seconds, "basis_seconds": svd_seconds + select_seconds,
               "rank": chosen, "max_rank": top, "target": FIDELITY_TARGET, **{f"at_chosen_{k}": v for k, v in sweep[str(chosen)].items()},
               "sweep": sweep, "singular_values": singular_values.tolist()}
    return figures, exact_test


def top_overlap(exact: torch.Tensor, approximate: torch.Tensor, k: int) -> float:
    """Mean fraction of each query's top-k documents (by exact score) that the approximation also ranks in its top k."""
    a, b = exact.topk(k, dim=1).indices, approximate.topk(k, dim=1).indices
    return float(sum(len(set(x.tolist()) & set(y.tolist())) for x, y in zip(a, b)) / (k * len(a)))


def _rows(artifact: InfluenceArtifact, limit: int, chunk_rows: int = 4096) -> Iterator[torch.Tensor]:
    seen = 0
    for block in artifact.iter_responses(chunk_rows):
        take = min(len(block), limit - seen)
        yield block[:take]
        seen += take
        if seen >= limit:
            return


def readout_contenders(artifact: InfluenceArtifact, model, exact_rows: int) -> tuple[dict[str, Callable], Callable]:
    """name → f(queries) giving that readout's scores; plus a close() for the scorers' subspaces.

    "exact (jvp)" streams only the first `exact_rows` responses (its time is scaled by N / exact_rows afterwards).
    """
    scorers = {mode: ArtifactScorer(artifact, model, TASK, mode=mode) for mode in READOUT_MODES}
    n = artifact.num_documents
    contenders = {}
    for mode, scorer in scorers.items():
        contenders[f"compressed ({mode})"] = scorer.document_scores
        contenders[f"source ({mode})"] = scorer.source_scores
    exact_scorer = scorers["jvp"]
    basis = artifact.readout_basis
    fixed = min(FIXED_RANK, basis["directions"].shape[0])
    fixed_directions, fixed_coefficients = basis["directions"][:fixed], basis["coefficients"][:, :fixed]
    contenders["compressed, fixed k (jvp)"] = lambda queries: exact_scorer.readout.scores(queries, fixed_directions) @ fixed_coefficients.T.to(torch.float32)
    contenders["exact streamed (jvp)"] = lambda queries: exact_scorer.readout.scores(queries, _rows(artifact, exact_rows), num_directions=min(exact_rows, n))
    subspace = exact_scorer.subspace

    def gradient_based(queries):  # one backward per query (batched), then dot products with every stored response
        return streamed_scores(query_gradients(subspace, TASK, queries), artifact, dtype=torch.float32)

    contenders["gradient-based (backward + N dot products)"] = gradient_based

    def close():
        for scorer in scorers.values():
            scorer.close()

    return contenders, close


def time_readouts(artifact: InfluenceArtifact, model, test_queries: list, singles: int = 9, batch: int = 16, exact_rows: int = 2048) -> dict:
    """Per-query seconds of every readout: median over `singles` queries alone, and a batch of `batch` queries / batch.
    Contenders are interleaved query by query. Also: fidelity of the difference modes against the JVP."""
    n = artifact.num_documents
    exact_rows = min(exact_rows, n)
    contenders, close = readout_contenders(artifact, model, exact_rows)
    try:
        for run in contenders.values():  # warm up kernels and page in the first shard
            run(test_queries[:1])
        alone = {name: [] for name in contenders}
        alone_cpu = {name: [] for name in contenders}
        for q in test_queries[:singles]:
            for name, run in contenders.items():
                start, cpu = time.perf_counter(), time.process_time()
                run([q])
                alone[name].append(time.perf_counter() - start)
                alone_cpu[name].append(time.process_time() - cpu)
        batched, batched_cpu, scores = {}, {}, {}
        for name, run in contenders.items():
            start, cpu = time.perf_counter(), time.process_time()
            scores[name] = run(test_queries[:batch])
            batched[name] = (time.perf_counter() - start) / batch
            batched_cpu[name] = (time.process_time() - cpu) / batch
    finally:
        close()
    scale = n / exact_rows
    out = {}
    for name in contenders:
        factor = scale if name.startswith("exact") else 1.0
        out[name] = {"alone_seconds": statistics.median(alone[name]) * factor, "batched_seconds_per_query": batched[name] * factor,
                     "alone_cpu_seconds": statistics.median(alone_cpu[name]) * factor, "batched_cpu_seconds_per_query": batched_cpu[name] * factor,
                     "extrapolated_from_rows": exact_rows if factor != 1.0 else None}
    modes = {}
    for kind in ("compressed", "source"):
        reference = scores[f"{kind} (jvp)"].to(torch.float64)
        for mode in READOUT_MODES[1:]:
            other = scores[f"{kind} ({mode})"].to(torch.float64)
            modes[f"{kind} ({mode})"] = {"spearman_vs_jvp": float(spearman_rows(reference, other).nanmean()) if reference.shape[1] > 1 else None,
                                         "pearson_vs_jvp": float(pearson_rows(reference, other).nanmean()),
                                         "max_relative_error": float(((other - reference).abs().max() / reference.abs().max()))}
    exact_jvp = scores["exact streamed (jvp)"].to(torch.float64)
    gradient = scores["gradient-based (backward + N dot products)"][:, :exact_rows]
    modes["gradient-based vs exact jvp"] = {"max_relative_error": float((gradient - exact_jvp).abs().max() / exact_jvp.abs().max())}
    return {"per_query": out, "mode_fidelity": modes, "queries_alone": singles, "batch": batch, "fixed_rank": fixed_rank(artifact),
            "chosen_rank": artifact.readout_basis["directions"].shape[0]}


def fixed_rank(artifact: InfluenceArtifact) -> int:
    return min(FIXED_RANK, artifact.readout_basis["directions"].shape[0])
