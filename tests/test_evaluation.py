"""LDS and leave-one-out metrics on cases with known answers."""

import numpy as np
import pytest
import torch

from hf_fwdattr.evaluation.metrics import (
    EvaluationError,
    lds,
    leave_one_out,
    leave_one_out_effects,
    pearson_per_row,
    rank_average,
    spearman_per_row,
    split_half_ceiling,
    subset_score_sums,
)

scipy_stats = pytest.importorskip("scipy.stats")


def _linear_world(n_documents=40, n_subsets=60, n_queries=5, seed=0):
    """Scores and subset outputs of an exactly linear datamodel: output = Σ_{b ∈ S} w_qb."""
    rng = np.random.default_rng(seed)
    weights = rng.normal(size=(n_queries, n_documents))
    subsets = rng.random((n_subsets, n_documents)) < 0.5
    outputs = (subsets @ weights.T) + 3.0  # [n_subsets, n_queries]; a shared offset changes no rank
    return weights, subsets, outputs


def test_rank_average_matches_scipy_with_ties():
    values = np.array([[3.0, 1.0, 3.0, 2.0, 1.0, 5.0], [0.0, 0.0, 0.0, 1.0, -1.0, 2.0]])
    expected = np.stack([scipy_stats.rankdata(row) - 1 for row in values])
    np.testing.assert_allclose(rank_average(values), expected)


def test_spearman_known_values():
    # classic textbook case: ranks (1,2,3,4,5) vs (5,6,7,8,7) with a tie -> scipy's value
    a = np.array([[1.0, 2.0, 3.0, 4.0, 5.0]])
    b = np.array([[5.0, 6.0, 7.0, 8.0, 7.0]])
    np.testing.assert_allclose(spearman_per_row(a, b), [scipy_stats.spearmanr(a[0], b[0]).statistic])
    # one swapped pair among n: rho = 1 - 6 * 2 / (n (n^2 - 1)) = 0.9 for n = 5
    np.testing.assert_allclose(spearman_per_row(a, [[1.0, 2.0, 3.0, 5.0, 4.0]]), [0.9])
    # monotone but non-linear: Spearman 1, Pearson below 1
    x = np.linspace(0.1, 3, 20)[None]
    np.testing.assert_allclose(spearman_per_row(x, np.exp(3 * x)), [1.0])
    assert pearson_per_row(x, np.exp(3 * x))[0] < 0.95
    rng = np.random.default_rng(1)
    u, v = rng.normal(size=(7, 30)), rng.normal(size=(7, 30))
    np.testing.assert_allclose(spearman_per_row(u, v), [scipy_stats.spearmanr(p, q).statistic for p, q in zip(u, v)], atol=1e-12)
    np.testing.assert_allclose(pearson_per_row(u, v), [scipy_stats.pearsonr(p, q).statistic for p, q in zip(u, v)], atol=1e-12)


def test_lds_is_one_for_an_exact_linear_datamodel_and_minus_one_for_its_negation():
    weights, subsets, outputs = _linear_world()
    result = lds(weights, subsets, outputs)
    assert result.mean == pytest.approx(1.0) and result.n_queries == 5 and result.n_undefined == 0
    assert result.stderr == pytest.approx(0.0, abs=1e-12)
    assert lds(-weights, subsets, outputs).mean == pytest.approx(-1.0)
    # scale per query and a per-query offset of the scores' sums do not matter (subsets are not all equal size, so
    # an offset per document would; a positive rescaling of a query's scores never does)
    scaled = weights * np.array([[0.1], [2.0], [5.0], [1e-3], [7.0]])
    assert lds(scaled, subsets, outputs).mean == pytest.approx(1.0)
    # torch tensors are accepted
    assert lds(torch.tensor(weights), torch.tensor(subsets), torch.tensor(outputs)).mean == pytest.approx(1.0)


def test_lds_known_value_and_standard_error():
    weights, subsets, outputs = _linear_world(n_queries=3)
    noisy_scores = weights + np.random.default_rng(5).normal(scale=1.0, size=weights.shape)
    predicted = subset_score_sums(noisy_scores, subsets)
    expected = np.array([scipy_stats.spearmanr(predicted[q], outputs[:, q]).statistic for q in range(3)])
    result = lds(noisy_scores, subsets, outputs)
    np.testing.assert_allclose(result.per_query, expected, atol=1e-12)
    assert result.mean == pytest.approx(expected.mean())
    assert result.stderr == pytest.approx(expected.std(ddof=1) / np.sqrt(3))
    assert 0.2 < result.mean < 0.95


def test_lds_leaves_out_queries_with_constant_outputs():
    weights, subsets, outputs = _linear_world(n_queries=3)
    outputs[:, 1] = 0.5
    result = lds(weights, subsets, outputs)
    assert result.n_undefined == 1 and result.n_queries == 2 and result.mean == pytest.approx(1.0)
    assert np.isnan(result.per_query[1])


def test_lds_checks_shapes():
    weights, subsets, outputs = _linear_world()
    with pytest.raises(EvaluationError, match="same training documents"):
        lds(weights[:, :-1], subsets, outputs)
    with pytest.raises(EvaluationError, match="n_subsets, n_queries"):
        lds(weights, subsets, outputs.T)
    with pytest.raises(EvaluationError, match="NaN"):
        lds(weights * np.nan, subsets, outputs)


def test_leave_one_out_sign_convention():
    """Removing a proponent lowers the measurement: its effect full − without is positive, as is its score."""
    full = np.array([[1.0, 2.0], [1.4, 2.6]])  # [seeds, queries]: the seeds disagree on the level
    # document 0 is a proponent of query 0 (removing it lowers f_0), document 1 an opponent, document 2 neutral
    change = np.array([[0.5, 0.0], [-0.3, -0.05], [0.0, 0.1]])  # [removed, queries]
    removed = full[:, None, :] - change[None]  # paired seeds: each seed's level cancels
    effects = leave_one_out_effects(full, removed)
    np.testing.assert_allclose(effects, change)
    scores = np.array([[2.0, -1.0, 0.1], [0.0, -0.3, 1.0]])  # proponent positive, opponent negative
    result = leave_one_out(scores, effects)
    assert result.spearman.mean == pytest.approx(1.0) and result.pearson.per_query[0] > 0.99
    assert leave_one_out(-scores, effects).spearman.mean == pytest.approx(-1.0)


def test_leave_one_out_known_values():
    rng = np.random.default_rng(3)
    effects = rng.normal(size=(25, 4))
    scores = effects.T + rng.normal(scale=0.5, size=(4, 25))
    result = leave_one_out(scores, effects)
    expected_s = [scipy_stats.spearmanr(scores[q], effects[:, q]).statistic for q in range(4)]
    expected_p = [scipy_stats.pearsonr(scores[q], effects[:, q]).statistic for q in range(4)]
    np.testing.assert_allclose(result.spearman.per_query, expected_s, atol=1e-12)
    np.testing.assert_allclose(result.pearson.per_query, expected_p, atol=1e-12)
    with pytest.raises(EvaluationError, match="n_removed, n_queries"):
        leave_one_out(scores, effects.T)


def test_split_half_ceiling():
    rng = np.random.default_rng(0)
    signal = rng.normal(size=(50, 6))  # [items, queries]
    noiseless = np.broadcast_to(signal, (4, 50, 6))
    exact = split_half_ceiling(noiseless)
    assert exact["half"] == pytest.approx(1.0) and exact["ceiling"] == pytest.approx(1.0)
    # noise with the variance of the signal: each half-average (2 seeds) has reliability 1 / (1 + 1/2) = 2/3 in Pearson
    noisy = signal[None] + rng.normal(size=(400, 50, 6))[:4]
    result = split_half_ceiling(noisy, metric="pearson", splits=10)
    assert 0.4 < result["half"] < 0.85
    assert result["full"] == pytest.approx(2 * result["half"] / (1 + result["half"]))
    assert result["ceiling"] == pytest.approx(np.sqrt(result["full"]))
    with pytest.raises(EvaluationError, match="at least 2 seeds"):
        split_half_ceiling(noiseless[:1])
