"""Exactness of the simulation against explicit small-matrix computations."""

import pytest
import torch
from torch import nn
from torch.func import functional_call

from hf_fwdattr import (
    AttributionConfig,
    AttributionSubspace,
    CurvatureOperator,
    DocumentSet,
    EmptyDocumentsError,
    SimulationDivergedError,
    document_gradients,
    simulate_responses,
)
from hf_fwdattr.estimator.curvature import top_eigenvalue

from conftest import lm_examples, make_lm


def _explicit_curvature(model, subspace, examples, kind):
    """Hessian or GGN of the mean cross-entropy as an explicit [p, p] matrix, by plain autograd."""
    inputs = torch.stack([x for x, _ in examples])
    labels = torch.stack([y for _, y in examples])

    def logits_of(flat):
        return functional_call(model, subspace.parameters_at(flat), (inputs,))

    zero = torch.zeros(subspace.dim, dtype=torch.float64)
    if kind == "hessian":
        return torch.autograd.functional.hessian(lambda v: nn.functional.cross_entropy(logits_of(v), labels), zero)
    jacobian = torch.autograd.functional.jacobian(logits_of, zero)  # [n, C, p]
    probs = torch.softmax(logits_of(zero), dim=1)
    output_hessian = torch.diag_embed(probs) - probs[:, :, None] * probs[:, None, :]
    return torch.einsum("ncp,ncd,ndq->pq", jacobian, output_hessian, jacobian) / len(examples)


@pytest.fixture(params=["softmax_regression", "mlp_classifier"])
def classifier(request):
    return request.getfixturevalue(request.param)


@pytest.mark.parametrize("kind", ["ggn", "hessian"])
def test_curvature_products_match_explicit_matrix(classifier, classification_task, kind):
    model, examples = classifier
    subspace = AttributionSubspace.build(model, "trainable")
    explicit = _explicit_curvature(model, subspace, examples, kind)
    operator = CurvatureOperator(subspace, classification_task, classification_task.collate(examples), kind, torch.float64)
    vectors = torch.randn(4, subspace.dim, dtype=torch.float64)
    torch.testing.assert_close(operator.matvec(vectors), vectors @ explicit.T, rtol=1e-9, atol=1e-11)
    top = torch.linalg.eigvalsh(explicit).abs().max()
    assert abs(top_eigenvalue(operator, iterations=200) - top) / top < 1e-3


def test_one_step_is_minus_eta_gradient(mlp_classifier, classification_task):
    model, examples = mlp_classifier
    subspace = AttributionSubspace.build(model, "trainable")
    documents = DocumentSet.from_examples(examples[:6])
    config = AttributionConfig(solver="linearized", horizon=1, step_size=0.3, dtype="float64", batch_size=8)
    result = simulate_responses(subspace, classification_task, documents, examples, config)
    gradients = torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(
        nn.functional.cross_entropy(model(x[None]), y[None]), list(model.parameters()))]) for x, y in examples[:6]])
    torch.testing.assert_close(result.responses, -0.3 * gradients, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("kind", ["ggn", "hessian"])
def test_long_horizon_converges_to_damped_influence(classifier, classification_task, kind):
    model, examples = classifier
    subspace = AttributionSubspace.build(model, "trainable")
    explicit = _explicit_curvature(model, subspace, examples, kind)
    damping = 0.05 * float(torch.linalg.eigvalsh(explicit).max())
    documents = DocumentSet.from_examples(examples[:8])
    config = AttributionConfig(solver="linearized", damping=damping, horizon=600, batch_size=len(examples), curvature=kind, dtype="float64")
    result = simulate_responses(subspace, classification_task, documents, examples, config)
    expected = -torch.linalg.solve(explicit + damping * torch.eye(subspace.dim, dtype=torch.float64), result.gradients.T).T
    torch.testing.assert_close(result.responses, expected, rtol=1e-7, atol=1e-9)
    # the horizon filter: after K steps each eigencomponent has the factor −(1 − (1 − η(h+λ))^K)/(h+λ)
    short = simulate_responses(subspace, classification_task, documents, examples, config.__class__(**{**config.to_dict(), "horizon": 5}))
    values, vectors = torch.linalg.eigh(explicit)
    shifted = values + damping
    factor = -(1 - (1 - short.step_size * shifted) ** 5) / shifted
    filtered = (result.gradients @ vectors) * factor @ vectors.T
    torch.testing.assert_close(short.responses, filtered, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("solver", ["two_trajectory", "single_trajectory"])
def test_trajectories_match_hessian_recursion_at_a_stationary_point(softmax_regression, classification_task, solver):
    """At a stationary θ* with the full batch, both trajectories linearise to the Hessian recursion."""
    model, examples = softmax_regression
    subspace = AttributionSubspace.build(model, "trainable")
    documents = DocumentSet.from_examples(examples[:5])
    common = dict(damping=0.02, horizon=60, batch_size=len(examples), curvature="hessian", dtype="float64", trajectory_epsilon=1e-5)
    reference = simulate_responses(subspace, classification_task, documents, examples, AttributionConfig(solver="linearized", **common))
    result = simulate_responses(subspace, classification_task, documents, examples, AttributionConfig(solver=solver, **common), step_size=reference.step_size)
    torch.testing.assert_close(result.responses, reference.responses, rtol=1e-4, atol=1e-6)


def test_two_trajectory_tracks_the_minibatch_recursion(softmax_regression, classification_task):
    """With minibatches θ* is not stationary for each step; two trajectories cancel the drift, one does not."""
    model, examples = softmax_regression
    subspace = AttributionSubspace.build(model, "trainable")
    documents = DocumentSet.from_examples(examples[:5])
    common = dict(damping=0.02, horizon=40, batch_size=10, curvature="hessian", dtype="float64", trajectory_epsilon=1e-6, step_size=0.2)
    reference = simulate_responses(subspace, classification_task, documents, examples, AttributionConfig(solver="linearized", **common)).responses
    two = simulate_responses(subspace, classification_task, documents, examples, AttributionConfig(solver="two_trajectory", **common)).responses
    assert (two - reference).norm() / reference.norm() < 0.05
    # the unperturbed drift, divided by the tiny up-weight, swamps the single-trajectory estimate
    with pytest.raises(SimulationDivergedError, match="not stationary"):
        simulate_responses(subspace, classification_task, documents, examples, AttributionConfig(solver="single_trajectory", **common))


def test_lm_recursion_matches_explicit_solve(lm_task):
    """The batched recursion on a tiny causal LM (projection subspace) against an explicit GGN solve."""
    model, kwargs = make_lm("llama", "projection")
    with AttributionSubspace.build(model, target_modules=["v_proj"], **kwargs) as subspace:
        train = lm_examples(6, seed=1)
        documents = DocumentSet.from_examples(train[:3])
        operator = CurvatureOperator(subspace, lm_task, lm_task.collate(train), "ggn", torch.float32)
        explicit = operator.matvec(torch.eye(subspace.dim)).double()
        explicit = (explicit + explicit.T) / 2
        damping = 0.1 * float(torch.linalg.eigvalsh(explicit).max())
        config = AttributionConfig(solver="linearized", damping=damping, horizon=200, batch_size=len(train))
        result = simulate_responses(subspace, lm_task, documents, train, config)
        expected = -torch.linalg.solve(explicit + damping * torch.eye(subspace.dim, dtype=torch.float64), result.gradients.double().T).T
        torch.testing.assert_close(result.responses.double(), expected, rtol=2e-3, atol=1e-5)


def test_divergent_step_size_stops_with_an_error(mlp_classifier, classification_task):
    model, examples = mlp_classifier
    subspace = AttributionSubspace.build(model, "trainable")
    documents = DocumentSet.from_examples(examples[:4])
    operator = CurvatureOperator(subspace, classification_task, classification_task.collate(examples), "ggn", torch.float64)
    too_large = 5.0 / top_eigenvalue(operator, 50)
    config = AttributionConfig(solver="linearized", step_size=too_large, horizon=200, batch_size=len(examples), dtype="float64")
    with pytest.raises(SimulationDivergedError, match="step_size.*damping"):
        simulate_responses(subspace, classification_task, documents, examples, config)
    with pytest.raises(SimulationDivergedError):
        simulate_responses(subspace, classification_task, documents, examples, AttributionConfig(**{**config.to_dict(), "solver": "two_trajectory"}))


def test_empty_document_set_is_refused():
    with pytest.raises(EmptyDocumentsError, match="empty"):
        DocumentSet(examples=[], example_document=[], document_ids=[])


def test_document_without_tokens_is_refused(lm_task):
    model, kwargs = make_lm("llama", "peft")
    subspace = AttributionSubspace.build(model, **kwargs)
    documents = DocumentSet.from_examples([{"input_ids": [5, 6, 7]}, {"input_ids": [9]}], document_ids=["ok", "empty"])
    with pytest.raises(EmptyDocumentsError, match="'empty'.*no token"):
        simulate_responses(subspace, lm_task, documents, lm_examples(4))
    with pytest.raises(EmptyDocumentsError, match="no examples"):
        DocumentSet(examples=[{"input_ids": [5, 6]}], example_document=[0], document_ids=["a", "b"])


def test_unlearning_is_adam_on_the_document_ascended_and_the_training_set_retained(mlp_classifier, classification_task):
    """u_b = θ* − θ_K after K steps of torch.optim.Adam on −L_b + retain · mean training loss, from θ*."""
    import copy

    model, examples = mlp_classifier
    train = examples[:10]
    subspace = AttributionSubspace.build(model, "trainable")
    documents = DocumentSet.from_examples(examples[:3])
    for retain in (0.0, 3.0):
        config = AttributionConfig(solver="unlearning", horizon=6, unlearning_rate=0.02, unlearning_retain=retain,
                                   batch_size=len(train), dtype="float64")
        result = simulate_responses(subspace, classification_task, documents, train, config)
        assert result.step_size is None and result.gradients is None and config.readout.value == "removal"
        inputs, labels = torch.stack([x for x, _ in train]), torch.stack([y for _, y in train])
        for row, (x, y) in enumerate(examples[:3]):
            copied = copy.deepcopy(model)
            optimizer = torch.optim.Adam(copied.parameters(), lr=0.02)
            for _ in range(6):
                optimizer.zero_grad()
                objective = -nn.functional.cross_entropy(copied(x[None]), y[None]) + retain * nn.functional.cross_entropy(copied(inputs), labels)
                objective.backward()
                optimizer.step()
            moved = torch.cat([(p - q).reshape(-1) for p, q in zip(copied.parameters(), model.parameters())]).detach()
            torch.testing.assert_close(result.responses[row], -moved, rtol=1e-10, atol=1e-12)
