"""The two ways out of per-document cost (issue 8): the closed-form horizon filter and the compressed readout,
plus the exact source readout."""

import pytest
import torch
from torch import nn

from hf_fwdattr import (
    ArtifactScorer,
    AttributionConfig,
    AttributionSubspace,
    CausalLMTask,
    CurvatureOperator,
    DocumentSet,
    ForwardReadout,
    InfluenceArtifact,
    SimulationDivergedError,
    TaskError,
    build_influence_artifact,
    build_readout_basis,
    query_gradients,
    simulate_responses,
)
from hf_fwdattr.estimator.eigenbasis import ExplicitEigenbasis, KroneckerEigenbasis, horizon_filter
from hf_fwdattr.storage.shards import InMemoryResponses

from conftest import lm_examples, lm_queries, make_lm


@pytest.mark.parametrize("kind", ["ggn", "hessian"])
def test_closed_form_equals_the_full_batch_recursion_at_every_horizon(mlp_classifier, classification_task, kind):
    model, examples = mlp_classifier
    subspace = AttributionSubspace.build(model, "trainable")
    documents = DocumentSet.from_examples(examples[:10])
    for horizon in (1, 2, 7, 40, 300):
        common = dict(damping=0.02, horizon=horizon, batch_size=len(examples), curvature=kind, dtype="float64")
        iterative = simulate_responses(subspace, classification_task, documents, examples, AttributionConfig(solver="linearized", **common))
        closed = simulate_responses(subspace, classification_task, documents, examples, AttributionConfig(solver="closed_form", **common),
                                    step_size=iterative.step_size)
        torch.testing.assert_close(closed.responses, iterative.responses, rtol=1e-10, atol=1e-12)


def test_closed_form_refuses_negative_curvature_below_the_damping(mlp_classifier, classification_task):
    model, examples = mlp_classifier
    subspace = AttributionSubspace.build(model, "trainable")
    basis = ExplicitEigenbasis.estimate(subspace, classification_task, examples, "hessian", len(examples), torch.float64)
    assert basis.min_eigenvalue < 0, "the fixture's Hessian has a negative direction"
    config = AttributionConfig(solver="closed_form", curvature="hessian", damping=abs(basis.min_eigenvalue) / 10, dtype="float64")
    with pytest.raises(SimulationDivergedError, match="below"):
        simulate_responses(subspace, classification_task, DocumentSet.from_examples(examples[:2]), examples, config, eigenbasis=basis)


def test_automatic_eigenbasis_explains_a_subspace_it_cannot_factor(classification_task):
    """Above explicit_max_dim 'auto' picks EK-FAC; a subspace with non-linear-layer parameters is refused with the ways out."""
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 3))
    examples = [(torch.randn(4), torch.tensor(i % 3)) for i in range(6)]
    subspace = AttributionSubspace.build(model, "trainable")
    config = AttributionConfig(explicit_max_dim=8)
    with pytest.raises(TaskError, match="explicit_max_dim = 8.*solver='linearized'"):
        simulate_responses(subspace, classification_task, DocumentSet.from_examples(examples[:2]), examples, config)
    explicit = simulate_responses(subspace, classification_task, DocumentSet.from_examples(examples[:2]), examples, AttributionConfig())
    assert explicit.responses.shape == (2, subspace.dim) and torch.isfinite(explicit.responses).all()


def _exact_projection(layer, generalized_gauss_newton, dim):
    """diag(Qᵀ G Q) of a layer's Kronecker basis, from the explicit GGN."""
    exact = torch.zeros_like(layer.eigenvalues)
    for i in range(exact.shape[0]):
        for j in range(exact.shape[1]):
            vector = torch.zeros(1, dim, dtype=torch.float64)
            layer.write(vector, torch.outer(layer.output_basis[:, i], layer.input_basis[:, j])[None])
            exact[i, j] = (vector @ generalized_gauss_newton @ vector.T).item()
    return exact


def test_kronecker_eigenvalues_converge_to_the_ggn_in_their_basis(mlp_classifier, classification_task):
    """EK-FAC's corrected eigenvalues are sampled estimates of diag(QᵀGQ): their error shrinks like 1/√samples."""
    model, examples = mlp_classifier
    subspace = AttributionSubspace.build(model, "trainable")
    ggn = CurvatureOperator(subspace, classification_task, classification_task.collate(examples), "ggn", torch.float64).matvec(torch.eye(subspace.dim, dtype=torch.float64))
    errors = []
    for repeats in (1, 40):
        basis = KroneckerEigenbasis.estimate(subspace, classification_task, examples * repeats, batch_size=128, dtype=torch.float64)
        errors.append(max(float((layer.eigenvalues - _exact_projection(layer, ggn, subspace.dim)).norm() / layer.eigenvalues.norm()) for layer in basis.layers))
    assert errors[1] < errors[0] / 2 and errors[1] < 0.2
    # the bases are orthonormal: the identity filter gives the gradients back, through weights and biases
    gradients = torch.randn(3, subspace.dim, dtype=torch.float64)
    torch.testing.assert_close(basis.filter(gradients, torch.ones_like), gradients)


def test_kronecker_closed_form_on_a_lora_model_tracks_the_iterative_solver(lm_task):
    model, kwargs = make_lm("llama", "peft")
    subspace = AttributionSubspace.build(model, **kwargs)
    train = lm_examples(48, seed=5)
    documents = DocumentSet.from_examples(train[:12])
    common = dict(damping=1e-2, horizon=20, batch_size=len(train))
    iterative = simulate_responses(subspace, lm_task, documents, train, AttributionConfig(solver="linearized", **common))
    closed = simulate_responses(subspace, lm_task, documents, train, AttributionConfig(solver="closed_form", eigenbasis="kronecker", **common),
                                step_size=iterative.step_size)
    queries = lm_queries(lm_examples(8, seed=6))
    gradients = query_gradients(subspace, lm_task, queries)
    a, b = gradients @ iterative.responses.T, gradients @ closed.responses.T
    correlation = torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1]
    assert correlation > 0.8  # EK-FAC drops cross-layer curvature and samples the GGN: close, not equal


def test_compressed_readout_at_full_rank_equals_exact_readout(lm_task):
    model, kwargs = make_lm("llama", "projection")
    with AttributionSubspace.build(model, **kwargs) as subspace:
        train = lm_examples(20, seed=7)
        documents = DocumentSet.from_examples(train[:12])
        responses = simulate_responses(subspace, lm_task, documents, train, AttributionConfig(horizon=3, batch_size=10)).responses
        queries = lm_queries(lm_examples(4, seed=8))
        heldout = query_gradients(subspace, lm_task, queries, dtype=torch.float64)
        basis, figures = build_readout_basis(InMemoryResponses(responses), heldout, max_rank=12, fidelity=1.0)
        assert figures["readout_basis_rank"] == 12 and figures["readout_basis_pearson"] > 1 - 1e-6
        readout = ForwardReadout(subspace, lm_task, "jvp")
        exact = readout.scores(queries, responses)
        compressed = readout.scores(queries, basis["directions"]) @ basis["coefficients"].T
        torch.testing.assert_close(compressed, exact, rtol=1e-4, atol=1e-4)
        small, small_figures = build_readout_basis(InMemoryResponses(responses), heldout, max_rank=12, fidelity=0.9)
        assert small_figures["readout_basis_rank"] <= 12 and small_figures["readout_basis_spearman"] >= 0.9


def test_source_readout_is_the_sum_of_its_documents_scores(lm_task):
    model, kwargs = make_lm("gpt2", "peft")
    subspace = AttributionSubspace.build(model, **kwargs)
    train = lm_examples(16, seed=9)
    documents = DocumentSet.from_examples(train[:10], sources=["a", "b", "a", "c", "b", "a", "c", "c", "a", "b"])
    config = AttributionConfig(horizon=3, batch_size=8)
    artifact = InfluenceArtifact.from_simulation(subspace, documents, simulate_responses(subspace, lm_task, documents, train, config), config)
    scorer = ArtifactScorer(artifact, model, lm_task, use_basis=False)
    queries = lm_queries(lm_examples(3, seed=10))
    per_document = scorer.document_scores(queries)
    per_source = scorer.source_scores(queries)
    for column, name in enumerate(artifact.source_names):
        members = [i for i, s in enumerate(artifact.documents.sources) if s == name]
        torch.testing.assert_close(per_source[:, column], per_document[:, members].sum(1), rtol=1e-4, atol=1e-4)


def test_build_with_closed_form_and_compressed_basis(tmp_path, lm_task):
    model, kwargs = make_lm("llama", "peft")
    train = lm_examples(40, seed=11)
    distinct = lm_examples(8, seed=13)
    documents = DocumentSet.from_examples([distinct[i % 8] for i in range(40)], sources=[f"s{i % 4}" for i in range(40)])  # rank(U) <= 8
    config = AttributionConfig(solver="closed_form", horizon=50, batch_size=16, readout_basis_rank=24, readout_basis_fidelity=0.99)
    build_influence_artifact(model, lm_task, documents, train, tmp_path / "influence", config, subspace=kwargs["spec"], progress=False)
    loaded = InfluenceArtifact.from_pretrained(tmp_path / "influence")
    assert loaded.readout_basis is not None and loaded.fidelity["readout_basis_spearman"] >= 0.99
    k = loaded.fidelity["readout_basis_rank"]
    assert k <= 8, "the smallest rank that keeps the fidelity target is kept"
    assert loaded.readout_basis["directions"].shape == (k, loaded.dim) and loaded.readout_basis["coefficients"].shape == (40, k)
    queries = lm_queries(lm_examples(4, seed=12))
    compressed = ArtifactScorer(loaded, model, lm_task).document_scores(queries)
    exact = ArtifactScorer(loaded, model, lm_task, use_basis=False).document_scores(queries)
    torch.testing.assert_close(compressed, exact, rtol=1e-3, atol=1e-3)
