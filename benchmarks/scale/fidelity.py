"""Fidelity of the closed form against the iterative reference (the `linearized` solver), and what each costs.

On the first `n_documents` documents of one corpus size: the linearized solver (K = 100 steps of
u ← u − η[(H_k + λI)u + g_b] with GGN–vector products on the minibatch sequence, batch 32, drawn from all N
training documents) is the reference; the closed form with the EK-FAC eigenbasis estimated on
`curvature_examples` ∈ CURVATURE_SUBSETS, all at the same K, λ and η (η from the linearized solver's power
iteration, so that the reference is stable), is compared with it on the test queries. Also shown: the same
linearized recursion on another minibatch sequence (how far the reference is from itself), the rows of the
artifact itself (closed form, its own η from the EK-FAC h_max) and −gradients (no curvature).
"""

from __future__ import annotations

import time

import torch

from hf_fwdattr import AttributionConfig, AttributionSubspace, CurvatureOperator, InfluenceArtifact, estimate_step_size, query_gradients, simulate_responses
from hf_fwdattr.estimator.eigenbasis import estimate_eigenbasis
from hf_fwdattr.stats import pearson_rows, spearman_rows

from .model import TASK
from .ours import DAMPING, HORIZON, closed_form_config

CURVATURE_SUBSETS = (128, 512, 2048, None)


def _correlations(reference: torch.Tensor, other: torch.Tensor) -> dict:
    return {"spearman": float(spearman_rows(reference, other).nanmean()), "pearson": float(pearson_rows(reference, other).nanmean()),
            "pooled_pearson": float(torch.corrcoef(torch.stack([reference.flatten(), other.flatten()]))[0, 1])}


def closed_form_fidelity(model, documents, examples: list[dict], artifact: InfluenceArtifact, test_queries: list, n_documents: int = 32) -> dict:
    rows = list(range(n_documents))
    linearized = AttributionConfig(solver="linearized", curvature="ggn", damping=DAMPING, horizon=HORIZON, batch_size=32, simulation_chunk_size=64)
    out: dict = {"documents": n_documents, "training_examples": len(examples), "horizon": HORIZON, "damping": DAMPING, "rows": {}}
    with AttributionSubspace.build(model) as subspace:
        gradients = query_gradients(subspace, TASK, test_queries, dtype=torch.float64)
        start = time.perf_counter()
        step_size, h_max = estimate_step_size(subspace, TASK, examples, linearized)
        out["power_iteration_seconds"] = time.perf_counter() - start
        out["step_size"], out["h_max_minibatch"] = step_size, h_max
        start = time.perf_counter()
        reference = simulate_responses(subspace, TASK, documents, examples, linearized, document_indices=rows, step_size=step_size)
        out["linearized_seconds"] = time.perf_counter() - start
        out["linearized_seconds_per_document"] = out["linearized_seconds"] / n_documents
        reference_scores = gradients @ reference.responses.to(torch.float64).T
        # the reference's own noise: the same recursion on another minibatch sequence (seed 1)
        other = simulate_responses(subspace, TASK, documents, examples, AttributionConfig(**{**linearized.to_dict(), "seed": 1}),
                                   document_indices=rows, step_size=step_size)
        out["rows"]["linearized, another minibatch sequence (seed 1)"] = _correlations(reference_scores, gradients @ other.responses.to(torch.float64).T)
        # −g_b: the response after one step (u⁽¹⁾ = −η g_b), i.e. no curvature at all — the floor
        out["rows"]["−gradient (no curvature)"] = _correlations(reference_scores, -(gradients @ reference.gradients.to(torch.float64).T))
        for count in CURVATURE_SUBSETS:
            config = closed_form_config(count)
            start = time.perf_counter()
            eigenbasis = estimate_eigenbasis(subspace, TASK, examples, config)
            eigenbasis_seconds = time.perf_counter() - start
            result = simulate_responses(subspace, TASK, documents, examples, config, document_indices=rows, step_size=step_size, eigenbasis=eigenbasis)
            label = f"closed form, EK-FAC on {count or len(examples)} examples"
            out["rows"][label] = {**_correlations(reference_scores, gradients @ result.responses.to(torch.float64).T),
                                  "eigenbasis_seconds": eigenbasis_seconds, "curvature_examples": count or len(examples),
                                  "ekfac_h_max": eigenbasis.max_eigenvalue}
        artifact_rows = artifact.responses(rows).to(torch.float64)
        out["rows"][f"artifact rows (closed form, EK-FAC on {artifact.config.curvature_examples}, own η = {artifact.step_size:.3g})"] = \
            _correlations(reference_scores, gradients @ artifact_rows.T)
        # the explicit eigenbasis needs p curvature–vector products per 32 training examples: time a few to say what it would cost
        operator = CurvatureOperator(subspace, TASK, TASK.collate(examples[:32]), "ggn", torch.float32)
        operator.matvec(torch.randn(8, subspace.dim))
        start = time.perf_counter()
        operator.matvec(torch.randn(32, subspace.dim))
        per_product = (time.perf_counter() - start) / 32
        out["ggn_product_seconds_per_32_examples"] = per_product
        out["explicit_eigenbasis_seconds_estimate_per_1024_examples"] = per_product * subspace.dim * 1024 / 32
        out["dim"] = subspace.dim
    return out
