"""Conjugate gradients: the shared solver, and the `conjugate_gradients` simulation solver against exact damped influence."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import lm_examples

from hf_fwdattr import AttributionConfig, AttributionSubspace, DocumentSet, simulate_responses
from hf_fwdattr.errors import AttributionConfigError, SimulationDivergedError
from hf_fwdattr.estimator.conjugate import conjugate_gradients


def _spd(dim: int, seed: int) -> torch.Tensor:
    factor = torch.randn(dim, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return factor @ factor.T / dim


def test_conjugate_gradients_solve_every_row_and_a_preconditioner_changes_only_the_speed():
    matrix, damping = _spd(30, 0), 1e-2
    rows = torch.randn(4, 30, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    exact = torch.linalg.solve(matrix + damping * torch.eye(30, dtype=torch.float64), rows.T).T
    plain = conjugate_gradients(lambda v: v @ matrix, rows, damping, tolerance=1e-10, max_iterations=500)
    torch.testing.assert_close(plain.solutions, exact, rtol=1e-7, atol=1e-9)
    assert plain.converged and plain.iterations > 1 and plain.relative_residuals.max() < 1e-9
    inverse = torch.linalg.inv(matrix + damping * torch.eye(30, dtype=torch.float64))
    seen = []
    preconditioned = conjugate_gradients(lambda v: v @ matrix, rows, damping, tolerance=1e-10, precondition=lambda r: r @ inverse,
                                         on_iteration=lambda iteration, x, residuals: seen.append((iteration, float(residuals.max()))))
    torch.testing.assert_close(preconditioned.solutions, exact, rtol=1e-7, atol=1e-9)
    assert preconditioned.iterations == 1 and len(seen) == 1 and seen[0][0] == 1 and seen[0][1] < 1e-10  # the exact inverse: one step
    capped = conjugate_gradients(lambda v: v @ matrix, rows, damping, tolerance=1e-10, max_iterations=2)
    assert capped.iterations == 2 and not capped.converged


def test_conjugate_gradients_refuse_a_curvature_that_is_not_positive_definite():
    indefinite = torch.diag(torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64))
    with pytest.raises(SimulationDivergedError, match="not positive definite"):
        conjugate_gradients(lambda v: v @ indefinite, torch.ones(1, 3, dtype=torch.float64), 1e-3)


def test_the_solver_equals_exact_damped_influence_where_the_closed_form_basis_is_an_approximation(lm_task, caplog):
    from conftest import make_lm

    model, kwargs = make_lm("llama", "peft")
    subspace = AttributionSubspace.build(model, **kwargs)
    train = lm_examples(16, seed=3)
    documents = DocumentSet.from_examples(train[:5])
    common = dict(batch_size=8, damping=1e-2, dtype="float64")
    exact = simulate_responses(subspace, lm_task, documents, train, AttributionConfig(**common)).responses  # explicit GGN, p <= 6,144
    beyond = dict(common, explicit_max_dim=subspace.dim - 1, curvature_rank=8)
    low_rank = simulate_responses(subspace, lm_task, documents, train, AttributionConfig(**beyond)).responses
    assert (low_rank - exact).norm() / exact.norm() > 0.05  # the rank-8 closed form alone is far from exact here
    assert "The low-rank eigenbasis resolves" in caplog.text  # and says so
    caplog.clear()
    for eigenbasis in ("auto", "kronecker"):  # preconditioned by the low-rank basis, or by EK-FAC
        config = AttributionConfig(solver="conjugate_gradients", eigenbasis=eigenbasis, cg_iterations=300, cg_tolerance=1e-7, **beyond)
        with caplog.at_level(logging.INFO, logger="hf_fwdattr"):
            solved = simulate_responses(subspace, lm_task, documents, train, config).responses
        torch.testing.assert_close(solved, exact, rtol=1e-5, atol=1e-5 * float(exact.abs().max()))
    assert "Conjugate gradients: up to" in caplog.text
    assert "The low-rank eigenbasis resolves" not in caplog.text  # the closed form's warning: CG corrects what the basis misses
    few = AttributionConfig(solver="conjugate_gradients", cg_iterations=3, **beyond)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hf_fwdattr"):
        three = simulate_responses(subspace, lm_task, documents, train, few).responses
    assert "Conjugate gradients stopped at cg_iterations = 3" in caplog.text  # not converged, and it says so
    error = float((three - exact).norm() / exact.norm())
    assert error < float((low_rank - exact).norm() / exact.norm())  # three corrections already move it towards exact


def test_the_solver_solves_for_damped_influence_only():
    assert AttributionConfig(solver="conjugate_gradients").horizon == "inf"
    with pytest.raises(AttributionConfigError, match="damped influence itself"):
        AttributionConfig(solver="conjugate_gradients", horizon=50)
    with pytest.raises(AttributionConfigError, match="cg_tolerance"):
        AttributionConfig(solver="conjugate_gradients", cg_tolerance=0)
    with pytest.raises(AttributionConfigError, match="cg_iterations"):
        AttributionConfig(solver="conjugate_gradients", cg_iterations=0)
    config = AttributionConfig(solver="conjugate_gradients", cg_iterations=7)
    assert AttributionConfig.from_json_string(config.to_json_string()) == config


def test_an_artifact_built_with_the_solver_keeps_its_settings_and_the_basis_it_was_preconditioned_by(tmp_path, lm_task):
    from conftest import make_lm

    from hf_fwdattr import InfluenceArtifact, build_influence_artifact

    model, kwargs = make_lm("llama", "peft")
    train = lm_examples(12, seed=4)
    documents = DocumentSet.from_examples(train, [f"doc-{i}" for i in range(12)])
    dim = AttributionSubspace.build(model, **kwargs).dim
    config = AttributionConfig(solver="conjugate_gradients", cg_iterations=8, batch_size=6, damping=1e-2, explicit_max_dim=dim - 1,
                               curvature_rank=8)
    built = build_influence_artifact(model, lm_task, documents, train, tmp_path / "cg", config, progress=False, compression="exact")
    loaded = InfluenceArtifact.from_pretrained(tmp_path / "cg")
    assert loaded.config == config and loaded.simulation["eigenbasis"]["kind"] == "low_rank"
    assert loaded.simulation["eigenbasis"]["rank"] == 8
    with AttributionSubspace.build(model, **kwargs) as subspace:
        direct = simulate_responses(subspace, lm_task, documents, train, config).responses
    torch.testing.assert_close(loaded.store.rows(range(12)).to(direct.dtype), direct, rtol=1e-4, atol=1e-6 * float(direct.abs().max()))
    assert built.num_documents == 12
