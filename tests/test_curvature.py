"""The exact GGN from per-example output Jacobians against the curvature-vector-product GGN, and the horizon filter."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, lm_examples, noisy_classification
from torch import nn

from hf_fwdattr import AttributionSubspace, AttributionTask, CausalLMTask, ClassificationTask, CurvatureOperator
from hf_fwdattr.demo.toy import tiny_gpt2, tiny_llama
from hf_fwdattr.estimator.ggn import exact_ggn


def _matvec_ggn(subspace, task, examples) -> torch.Tensor:
    operator = CurvatureOperator(subspace, task, task.collate(examples), "ggn", torch.float64)
    return operator.matvec(torch.eye(subspace.dim, dtype=torch.float64))


class _GenericClassification(ClassificationTask):
    """A classifier task without the closed-form factors: the default output curvature (autograd Hessian) runs."""

    output_curvature = AttributionTask.output_curvature


@pytest.mark.parametrize("task", [ClassificationTask(), _GenericClassification()], ids=["closed_form_softmax", "autograd_hessian"])
def test_exact_ggn_equals_the_product_ggn_on_an_mlp(task):
    inputs, labels = noisy_classification(n=23, dim=4, classes=3, seed=3)
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    examples = [(inputs[i], labels[i]) for i in range(len(labels))]
    subspace = AttributionSubspace.build(model, "trainable")
    expected = _matvec_ggn(subspace, task, examples)
    torch.testing.assert_close(exact_ggn(subspace, task, examples, batch_size=5), expected, rtol=1e-12, atol=1e-14)


def _lm_with_lora(architecture: str):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    if architecture == "gpt2":  # one layer: the product reference costs p vmapped JVP/VJP pairs through GPT-2 attention
        base, targets = tiny_gpt2(VOCAB, layers=1).double(), ["c_attn", "mlp.c_proj"]
    else:
        base, targets = tiny_llama(VOCAB).double(), ["q_proj", "v_proj", "down_proj"]
    config = LoraConfig(r=2, target_modules=targets, init_lora_weights=False, fan_in_fan_out=architecture == "gpt2")
    return get_peft_model(base, config).eval()


@pytest.mark.parametrize("architecture", ["gpt2", "llama"])
def test_exact_ggn_equals_the_product_ggn_on_a_lora_language_model(architecture):
    model = _lm_with_lora(architecture)
    examples = lm_examples(9, seed=4)
    examples[0]["labels"] = [-100, -100] + examples[0]["input_ids"][2:]  # a prompt that is not scored
    task = CausalLMTask(pad_token_id=0)
    subspace = AttributionSubspace.build(model, "peft")
    expected = _matvec_ggn(subspace, task, examples)
    fast = exact_ggn(subspace, task, examples, batch_size=4)  # other batches, other padding: the same matrix
    # GPT-2 in float64 is float64 throughout: round-off. Llama's RMSNorm computes in float32 whatever the model's dtype
    # (transformers upcasts and casts back), so two differentiation orders of it agree to float32's 1e-7 only.
    tolerance = 1e-12 if architecture == "gpt2" else 1e-6
    torch.testing.assert_close(fast, expected, rtol=tolerance, atol=tolerance * float(expected.abs().max()))


def _filter_reference(h: float, step_size: float, horizon: int, shift: float) -> float:
    """−(1 − (1 − η(h + shift))^K) / (h + shift) with 60 significant digits (exact rationals raised by `decimal`)."""
    from decimal import Decimal, getcontext

    getcontext().prec = 60
    s = Decimal(repr(h)) + Decimal(repr(shift))
    if s == 0:
        return -step_size * horizon
    return float(-(1 - (1 - Decimal(repr(step_size)) * s) ** horizon) / s)


@pytest.mark.parametrize("h, step_size, horizon, shift", [
    (1e-10, 0.5, 3000, 0.0),      # float32 cancellation gave 0 instead of −1500
    (1e-7, 0.5, 3000, 0.0),       # ... and a value past the ηK bound
    (0.0, 0.5, 3000, 0.0),        # h + λ = 0: the limit −ηK
    (-1e-3, 0.5, 3000, 1e-3),     # h + λ = 0 from a negative eigenvalue
    (-2e-4, 0.5, 3000, 1e-3),     # negative h above −λ
    (-1e-6, 0.5, 3000, 0.0),      # slightly negative curvature, growing but finite
    (1.0, 1.0, 3000, 1e-3),       # η(h + λ) just above 1: the sign alternates
    (1.9, 1.0, 30, 0.0),          # close to the stability edge
    (3e-4, 0.01, 10**5, 1e-3),    # long horizon
])
def test_horizon_filter_against_a_high_precision_reference(h, step_size, horizon, shift):
    from hf_fwdattr.estimator.eigenbasis import horizon_filter

    for dtype in (torch.float32, torch.float64):
        value = float(horizon_filter(step_size, horizon, shift)(torch.tensor([h], dtype=dtype))[0])
        expected = _filter_reference(float(torch.tensor(h, dtype=dtype)), step_size, horizon, shift)
        assert value == pytest.approx(expected, rel=1e-6 if dtype == torch.float32 else 1e-12, abs=1e-300)
        assert abs(value) <= step_size * horizon * (1 + 1e-12) or h + shift < 0  # the K-step bound |f| <= ηK


def test_a_gauss_newton_of_few_rows_is_decomposed_through_its_gram_matrix():
    """Fewer rows than coordinates: the eigenpairs come from the R × R Gram matrix and the rest of the space has
    eigenvalue 0 — the same filter as the dense eigendecomposition."""
    from hf_fwdattr.estimator.eigenbasis import ExplicitEigenbasis, horizon_filter
    from hf_fwdattr.estimator.ggn import GaussNewton

    rows = torch.randn(7, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    low_rank = ExplicitEigenbasis.from_gauss_newton(GaussNewton(rows=rows))
    dense = ExplicitEigenbasis.from_matrix(rows.T @ rows)
    assert low_rank.eigenvectors.shape == (20, 7) and low_rank.complement == 0.0
    vectors = torch.randn(3, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for factor in (horizon_filter(0.05, 3000, 1e-3), horizon_filter(0.05, None, 1e-2)):
        torch.testing.assert_close(low_rank.filter(vectors, factor), dense.filter(vectors, factor), rtol=1e-9, atol=1e-9)
    assert low_rank.max_eigenvalue == pytest.approx(dense.max_eigenvalue) and low_rank.min_eigenvalue == 0.0


@pytest.mark.parametrize("kind", ["explicit", "kronecker"])
def test_an_eigenbasis_state_rebuilds_the_same_filter(kind, lm_task):
    """What a multi-process build broadcasts from the main process: tensors only, rebuilt on each process's subspace."""
    from conftest import make_lm

    from hf_fwdattr.estimator.eigenbasis import ExplicitEigenbasis, KroneckerEigenbasis, eigenbasis_from_state, eigenbasis_state, horizon_filter

    model, kwargs = make_lm("llama", "peft")
    subspace = AttributionSubspace.build(model, **kwargs)
    train = lm_examples(12, seed=2)
    if kind == "explicit":
        basis = ExplicitEigenbasis.estimate(subspace, lm_task, train, "ggn", 6)
    else:
        basis = KroneckerEigenbasis.estimate(subspace, lm_task, train, 6)
    rebuilt = eigenbasis_from_state(eigenbasis_state(basis), AttributionSubspace.build(model, **kwargs))
    vectors = torch.randn(3, subspace.dim, generator=torch.Generator().manual_seed(0))
    factor = horizon_filter(0.1, 300, 1e-3)
    torch.testing.assert_close(rebuilt.filter(vectors, factor), basis.filter(vectors, factor), rtol=0, atol=0)


@pytest.mark.parametrize("architecture", ["mlp", "llama"])
def test_the_sketched_ggn_is_an_unbiased_estimate(architecture):
    """Averaged over independent sketches, the sketched GGN converges to the exact one (error shrinking like 1/√S)."""
    if architecture == "mlp":
        inputs, labels = noisy_classification(n=23, dim=4, classes=3, seed=3)
        torch.manual_seed(3)
        model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
        task, examples, subspace = ClassificationTask(), [(inputs[i], labels[i]) for i in range(23)], None
        subspace = AttributionSubspace.build(model, "trainable")
    else:
        model = _lm_with_lora("llama")
        task, examples = CausalLMTask(pad_token_id=0, reduction="mean"), lm_examples(9, seed=4)
        subspace = AttributionSubspace.build(model, "peft")
    exact = exact_ggn(subspace, task, examples, batch_size=5)
    errors = []
    for samples in (4, 64):
        estimate = exact_ggn(subspace, task, examples, batch_size=5, samples=samples, seed=samples)
        errors.append(float((estimate - exact).norm() / exact.norm()))
    assert errors[1] < errors[0] / 2 and errors[1] < 0.3


def test_auto_sketches_the_ggn_when_the_exact_one_would_take_too_many_passes(lm_task, caplog):
    import logging

    from conftest import make_lm

    from hf_fwdattr import AttributionConfig, DocumentSet, simulate_responses

    model, kwargs = make_lm("llama", "peft")
    subspace = AttributionSubspace.build(model, **kwargs)
    train = lm_examples(16, seed=3)
    documents = DocumentSet.from_examples(train[:4])
    with caplog.at_level(logging.INFO, logger="hf_fwdattr"):
        exact = simulate_responses(subspace, lm_task, documents, train, AttributionConfig(batch_size=8))
        sketched = simulate_responses(subspace, lm_task, documents, train, AttributionConfig(batch_size=8, exact_curvature_max_passes=1,
                                                                                           curvature_sketch=64, horizon=30))
    assert "The exact GGN takes" in caplog.text and "it is sketched with curvature_sketch = 64" in caplog.text
    assert torch.isfinite(exact.responses).all() and torch.isfinite(sketched.responses).all()


def test_auto_takes_the_exact_basis_beyond_explicit_max_dim_when_the_ggn_has_few_rows(caplog, monkeypatch):
    """A classifier with more coordinates than explicit_max_dim but few GGN rows (examples × outputs): 'auto' still
    takes the exact eigenbasis (through the rows' Gram matrix) — the same responses as eigenbasis='explicit' — and
    the low-rank eigenbasis of the exact GGN only when the rows are too many too."""
    import logging

    from hf_fwdattr import AttributionConfig, DocumentSet, simulate_responses

    inputs, labels = noisy_classification(n=16, dim=4, classes=3, seed=5)
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()  # p = 67
    examples = [(inputs[i], labels[i]) for i in range(len(labels))]
    documents = DocumentSet.from_examples(examples[:5])
    task = ClassificationTask()
    subspace = AttributionSubspace.build(model, "trainable")
    assert subspace.dim == 67
    settings = dict(batch_size=4, dtype="float64", curvature_examples=None)
    with caplog.at_level(logging.INFO, logger="hf_fwdattr"):
        auto = simulate_responses(subspace, task, documents, examples, AttributionConfig(explicit_max_dim=64, **settings))
    assert "its rows' 48 × 48 Gram matrix" in caplog.text
    explicit = simulate_responses(subspace, task, documents, examples, AttributionConfig(eigenbasis="explicit", **settings))
    torch.testing.assert_close(auto.responses, explicit.responses, rtol=1e-8, atol=1e-10)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="hf_fwdattr"):
        simulate_responses(subspace, task, documents, examples, AttributionConfig(explicit_max_dim=16, **settings))
    assert "largest eigendirections of the exact GGN (low_rank" in caplog.text
    # past the low-rank factors' memory bound (lowered here to a few bytes): EK-FAC, said so
    import hf_fwdattr.estimator.eigenbasis as eigenbasis

    monkeypatch.setattr(eigenbasis, "LOW_RANK_MAX_BYTES", 1000)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="hf_fwdattr"):
        simulate_responses(subspace, task, documents, examples, AttributionConfig(explicit_max_dim=16, **settings))
    assert "so EK-FAC is used" in caplog.text and "Kronecker-factored (EK-FAC)" in caplog.text


def _mlp_setting():
    inputs, labels = noisy_classification(n=23, dim=4, classes=3, seed=3)
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    return model, ClassificationTask(), [(inputs[i], labels[i]) for i in range(23)], AttributionSubspace.build(model, "trainable")


@pytest.mark.parametrize("architecture", ["mlp", "llama"])
def test_the_low_rank_basis_equals_the_explicit_one_when_its_rank_covers_the_ggn(architecture):
    """Rank >= rank(GGN): the Nyström approximation is exact, so the low-rank basis filters as the explicit one does (the
    complement, the mean of an all-zero rest of the spectrum, is 0 up to round-off)."""
    from hf_fwdattr.estimator.eigenbasis import ExplicitEigenbasis, horizon_filter
    from hf_fwdattr.estimator.lowrank import low_rank_ggn

    if architecture == "mlp":  # p = 51, GGN rank <= 23 examples × 2 independent logit directions = 46
        model, task, examples, subspace = _mlp_setting()
        rank = 46
    else:  # GGN rank <= 6 scored tokens × hidden size 32 = 192, below p
        model = _lm_with_lora("llama")
        task, examples = CausalLMTask(pad_token_id=0), lm_examples(2, seed=4, min_len=4, max_len=5)
        subspace = AttributionSubspace.build(model, "peft")
        rank = 200
    explicit = ExplicitEigenbasis.estimate(subspace, task, examples, "ggn", 5, dtype=torch.float64)
    rank_ggn = int((explicit.eigenvalues > 1e-10 * explicit.eigenvalues.max()).sum())
    assert rank_ggn <= rank < subspace.dim
    made = low_rank_ggn(subspace, task, examples, 5, rank, power_passes=1)
    basis = ExplicitEigenbasis.from_low_rank(made)
    assert subspace.dim > rank >= basis.eigenvectors.shape[1] >= rank_ggn  # numerically null directions are left to the complement
    assert abs(made.complement) < 1e-10 * float(explicit.eigenvalues.max())
    torch.testing.assert_close(made.eigenvalues[:rank_ggn], explicit.eigenvalues.flip(0)[:rank_ggn], rtol=1e-8, atol=1e-12)
    assert made.trace == pytest.approx(float(explicit.eigenvalues.sum()), rel=1e-9)
    vectors = torch.randn(3, subspace.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for factor in (horizon_filter(0.0, None, 1e-3), horizon_filter(0.5 / explicit.max_eigenvalue, 300, 1e-3)):
        torch.testing.assert_close(basis.filter(vectors, factor), explicit.filter(vectors, factor), rtol=1e-6, atol=1e-6)


def test_the_low_rank_complement_is_the_mean_of_the_unresolved_spectrum():
    """Below the GGN's rank: the k largest eigenvalues match the explicit ones, and the complement is the mean of the
    others (trace from the Jacobian rows), or 0."""
    from hf_fwdattr.estimator.eigenbasis import ExplicitEigenbasis, horizon_filter
    from hf_fwdattr.estimator.lowrank import low_rank_ggn

    model, task, examples, subspace = _mlp_setting()
    explicit = ExplicitEigenbasis.estimate(subspace, task, examples, "ggn", 5, dtype=torch.float64)
    spectrum = explicit.eigenvalues.flip(0)
    rank = 8
    made = low_rank_ggn(subspace, task, examples, 5, rank, power_passes=3)
    torch.testing.assert_close(made.eigenvalues, spectrum[:rank], rtol=1e-6, atol=0)
    expected = float(spectrum[rank:].sum()) / (subspace.dim - rank)
    assert made.complement == pytest.approx(expected, rel=1e-6)
    zero = low_rank_ggn(subspace, task, examples, 5, rank, power_passes=3, complement="zero")
    assert zero.complement == 0.0 and zero.trace == pytest.approx(made.trace)
    # the filter: the explicit filter on the top-k directions, and the complement value on the rest
    basis = ExplicitEigenbasis.from_low_rank(made)
    vector = torch.randn(1, subspace.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    top = explicit.eigenvectors.flip(1)[:, :rank]
    inside, outside = (vector @ top) @ top.T, vector - (vector @ top) @ top.T
    factor = horizon_filter(0.0, None, 1e-2)
    expected_filtered = explicit.filter(inside, factor) - outside / (expected + 1e-2)
    torch.testing.assert_close(basis.filter(vector, factor), expected_filtered, rtol=1e-5, atol=1e-8)


def test_auto_resolves_the_top_of_the_exact_ggn_beyond_the_explicit_size_and_says_so(lm_task, caplog):
    import logging

    from conftest import make_lm

    from hf_fwdattr import AttributionConfig, DocumentSet, simulate_responses
    from hf_fwdattr.estimator.eigenbasis import estimate_eigenbasis

    model, kwargs = make_lm("llama", "peft")
    subspace = AttributionSubspace.build(model, **kwargs)
    train = lm_examples(16, seed=3)
    config = AttributionConfig(batch_size=8, explicit_max_dim=subspace.dim - 1, curvature_rank=16)
    with caplog.at_level(logging.INFO, logger="hf_fwdattr"):
        basis = estimate_eigenbasis(subspace, lm_task, train, config)
        result = simulate_responses(subspace, lm_task, DocumentSet.from_examples(train[:4]), train, config, eigenbasis=basis)
    assert "eigenbasis='auto'" in caplog.text and "curvature_rank = 16 largest eigendirections of the exact GGN" in caplog.text
    assert basis.eigenvectors.shape == (subspace.dim, 16) and basis.complement > 0
    assert torch.isfinite(result.responses).all()
    kronecker = AttributionConfig(batch_size=8, explicit_max_dim=subspace.dim - 1, eigenbasis="kronecker")
    assert type(estimate_eigenbasis(subspace, lm_task, train, kronecker)).__name__ == "KroneckerEigenbasis"  # still selectable


def test_a_low_rank_basis_records_what_it_resolves_and_warns_when_the_filter_is_not_flat_beyond(lm_task, caplog):
    import logging

    from conftest import make_lm

    from hf_fwdattr import AttributionConfig
    from hf_fwdattr.estimator.eigenbasis import (describe_eigenbasis, eigenbasis_from_state, eigenbasis_state, estimate_eigenbasis,
                                                 horizon_filter)

    model, kwargs = make_lm("llama", "peft")
    subspace = AttributionSubspace.build(model, **kwargs)
    train = lm_examples(16, seed=3)
    small = AttributionConfig(batch_size=8, explicit_max_dim=subspace.dim - 1, curvature_rank=16, damping=1e-3)
    with caplog.at_level(logging.WARNING, logger="hf_fwdattr"):
        basis = estimate_eigenbasis(subspace, lm_task, train, small)
    resolution = basis.resolution
    assert resolution["kind"] == "low_rank" and resolution["rank"] == 16 and resolution["sketched"] is False  # few exact rows here
    assert resolution["smallest_resolved_eigenvalue"] == pytest.approx(float(basis.eigenvalues[-1]))
    assert resolution["complement_eigenvalue"] == pytest.approx(basis.complement) and 0 < resolution["resolved_trace_fraction"] < 1
    # K → ∞: the filter is −1/(h + λ), so the ratio is (complement + λ) / (smallest + λ)
    assert resolution["filter_ratio"] == pytest.approx((basis.complement + 1e-3) / (float(basis.eigenvalues[-1]) + 1e-3), rel=1e-6)
    assert resolution["filter_ratio"] < 0.5 and "The low-rank eigenbasis resolves the GGN's 16 largest eigendirections" in caplog.text
    assert describe_eigenbasis(basis) == resolution
    assert eigenbasis_from_state(eigenbasis_state(basis), subspace).resolution == resolution  # what other processes and the artifact get

    # a damping far above the unresolved eigenvalues flattens the filter there: nothing to warn about
    caplog.clear()
    flat = AttributionConfig(batch_size=8, explicit_max_dim=subspace.dim - 1, curvature_rank=16, damping=1e3)
    with caplog.at_level(logging.WARNING, logger="hf_fwdattr"):
        calm = estimate_eigenbasis(subspace, lm_task, train, flat)
    assert calm.resolution["filter_ratio"] > 0.99 and "The low-rank eigenbasis resolves" not in caplog.text
    # a finite horizon: the ratio of the K-step filter at the two eigenvalues
    short = AttributionConfig(batch_size=8, explicit_max_dim=subspace.dim - 1, curvature_rank=16, damping=1e-3, horizon=10, step_size=0.01)
    finite = estimate_eigenbasis(subspace, lm_task, train, short).resolution
    values = horizon_filter(0.01, 10, 1e-3)(torch.tensor([finite["smallest_resolved_eigenvalue"], finite["complement_eigenvalue"]], dtype=torch.float64))
    assert finite["filter_ratio"] == pytest.approx(float(values[0] / values[1]), rel=1e-9)
    assert describe_eigenbasis(estimate_eigenbasis(subspace, lm_task, train, AttributionConfig(batch_size=8))) == {"kind": "explicit"}
    # sketched Jacobian rows: the share of the trace is the sketch's, and the warning says so
    caplog.clear()
    sketch = AttributionConfig(batch_size=8, explicit_max_dim=subspace.dim - 1, curvature_rank=16, exact_curvature_max_passes=1)
    with caplog.at_level(logging.WARNING, logger="hf_fwdattr"):
        assert estimate_eigenbasis(subspace, lm_task, train, sketch).resolution["sketched"] is True
    assert "of the sketched GGN's trace" in caplog.text


def test_the_default_horizon_applies_the_damped_inverse_without_an_eigendecomposition(lm_task):
    """horizon='inf' (the default) with the explicit curvature: −(H + λI)⁻¹g from a Cholesky factorisation equals the
    eigendecomposition's damped inverse; it travels between processes as its matrix, and refuses another config."""
    from conftest import make_lm

    from hf_fwdattr import AttributionConfig, DocumentSet, simulate_responses
    from hf_fwdattr.errors import AttributionConfigError
    from hf_fwdattr.estimator.eigenbasis import DampedInverse, ExplicitEigenbasis, eigenbasis_from_state, eigenbasis_state, estimate_eigenbasis
    from hf_fwdattr.estimator.gradients import document_gradients

    model, kwargs = make_lm("llama", "peft")
    subspace = AttributionSubspace.build(model, **kwargs)
    train = lm_examples(12, seed=2)
    config = AttributionConfig(damping=1e-2, weight_decay=1e-3, batch_size=6, dtype="float64")
    basis = estimate_eigenbasis(subspace, lm_task, train, config)
    assert isinstance(basis, DampedInverse) and basis.shift == pytest.approx(1.1e-2)
    documents = DocumentSet.from_examples(train[:4], [f"d{i}" for i in range(4)])
    result = simulate_responses(subspace, lm_task, documents, train, config, eigenbasis=basis)
    exact = ExplicitEigenbasis.from_matrix(exact_ggn(subspace, lm_task, train, batch_size=6))
    gradients = document_gradients(subspace, lm_task, documents, dtype=torch.float64)
    torch.testing.assert_close(result.responses, -exact.damped_inverse(gradients, 1.1e-2), rtol=1e-7, atol=1e-9)
    assert basis.max_eigenvalue == pytest.approx(exact.max_eigenvalue, rel=1e-3)

    rebuilt = eigenbasis_from_state(eigenbasis_state(basis), AttributionSubspace.build(model, **kwargs))
    torch.testing.assert_close(rebuilt.apply(gradients), basis.apply(gradients), rtol=0, atol=0)
    with pytest.raises(AttributionConfigError, match="horizon='inf'"):
        simulate_responses(subspace, lm_task, documents, train, AttributionConfig(damping=1e-2, horizon=300, batch_size=6), eigenbasis=basis)


def test_the_damped_inverse_refuses_an_indefinite_curvature():
    from hf_fwdattr.errors import SimulationDivergedError
    from hf_fwdattr.estimator.eigenbasis import DampedInverse

    matrix = torch.diag(torch.tensor([2.0, 0.5, -0.1], dtype=torch.float64))
    with pytest.raises(SimulationDivergedError, match=r"eigenvalue -0\.1 below .*Raise `damping` above 0\.1"):
        DampedInverse.from_matrix(matrix, 1e-3)
    inverse = DampedInverse.from_matrix(matrix, 0.2)
    torch.testing.assert_close(inverse.matrix, -torch.diag(1 / torch.tensor([2.2, 0.7, 0.1], dtype=torch.float64)))
    assert inverse.max_eigenvalue == pytest.approx(2.0)


@pytest.mark.parametrize("architecture", ["llama", "gpt2"])
def test_the_exact_pass_count_from_the_labels_equals_the_count_from_the_factors(architecture):
    """`CausalLMTask.output_curvature_slots` counts the exact GGN's backward passes from the labels (no forward): the
    same count as the factors `output_curvature` computes give, on batches with padding and an unscored prompt."""
    from hf_fwdattr.estimator.documents import length_batches
    from hf_fwdattr.estimator.functional import TaskFunction
    from hf_fwdattr.estimator.ggn import exact_passes

    model = _lm_with_lora(architecture)
    task = CausalLMTask(pad_token_id=0)
    subspace = AttributionSubspace.build(model, "peft")
    examples = lm_examples(9, seed=4)
    examples[0]["labels"] = [-100, -100, -100] + examples[0]["input_ids"][3:]
    function = TaskFunction(subspace, lambda m, b: task.output_curvature(m, b))
    from_factors = []
    for batch in length_batches(task, examples, 4):
        collated = task.collate(batch)
        with torch.no_grad():
            _, factors = function(torch.zeros(subspace.dim, dtype=torch.float64), collated)
        from_factors.append(int((factors.abs().amax(dim=(0, 3)) > 0).sum()))
        assert task.output_curvature_slots(model, collated) == from_factors[-1]
    assert exact_passes(subspace, task, examples, 4) == sum(from_factors)


def test_per_example_work_batches_examples_of_similar_length():
    """Batches for per-example work hold examples of similar length (less padding), each example once; a task that
    gives no lengths keeps the given order."""
    from hf_fwdattr.estimator.documents import length_batches

    examples = [{"input_ids": list(range(1, n + 1))} for n in (9, 3, 7, 3, 12, 5, 4, 10)]
    batches = length_batches(CausalLMTask(pad_token_id=0), examples, 3)
    lengths = [[len(e["input_ids"]) for e in batch] for batch in batches]
    assert lengths == [[3, 3, 4], [5, 7, 9], [10, 12]]
    assert length_batches(AttributionTask(), examples, 3) == [examples[0:3], examples[3:6], examples[6:8]]
