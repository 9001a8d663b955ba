import json
import logging

import pytest
import torch

from hf_fwdattr import AttributionConfig, AttributionConfigError, Curvature, ReadoutMode, Solver


def test_defaults_round_trip():
    config = AttributionConfig()
    assert AttributionConfig.from_dict(config.to_dict()) == config
    assert AttributionConfig.from_json_string(config.to_json_string()) == config


def test_non_default_round_trip_is_lossless():
    config = AttributionConfig(
        damping=0.25,
        step_size=0.125,
        step_size_fraction=1.5,
        horizon=7,
        solver="two_trajectory",
        curvature="hessian",
        batch_size=3,
        seed=11,
        readout="one_sided",
        epsilon=1e-4,
        trajectory_epsilon=1e-5,
        dtype="float64",
    )
    text = config.to_json_string()
    assert json.loads(text)["solver"] == "two_trajectory"
    restored = AttributionConfig.from_json_string(text)
    assert restored == config
    assert restored.solver is Solver.TWO_TRAJECTORY and restored.curvature is Curvature.HESSIAN
    assert restored.readout is ReadoutMode.ONE_SIDED and restored.torch_dtype is torch.float64
    assert restored.step_size == 0.125 and isinstance(restored.step_size, float)


def test_json_is_sorted():
    keys = list(json.loads(AttributionConfig().to_json_string()))
    assert keys == sorted(keys)


def test_unknown_keys_warn_and_load(caplog):
    data = AttributionConfig().to_dict() | {"from_the_future": 1}
    with caplog.at_level(logging.WARNING):
        config = AttributionConfig.from_dict(data)
    assert config == AttributionConfig()
    assert "from_the_future" in caplog.text


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"damping": -1.0}, "`damping`"),
        ({"damping": float("nan")}, "`damping`"),
        ({"damping": 0.0, "curvature": "hessian"}, "`damping`"),
        ({"step_size": 0.0}, "`step_size`"),
        ({"step_size": "fast"}, "`step_size`"),
        ({"step_size_fraction": 2.0}, "`step_size_fraction`"),
        ({"horizon": 0}, "`horizon`"),
        ({"horizon": 2.5}, "`horizon`"),
        ({"solver": "newton"}, "`solver`"),
        ({"curvature": "fisher"}, "`curvature`"),
        ({"batch_size": 0}, "`batch_size`"),
        ({"seed": "zero"}, "`seed`"),
        ({"power_iterations": 0}, "`power_iterations`"),
        ({"readout": "backward"}, "`readout`"),
        ({"epsilon": 0.0}, "`epsilon`"),
        ({"trajectory_epsilon": -1e-3}, "`trajectory_epsilon`"),
        ({"unlearning_rate": 0.0}, "`unlearning_rate`"),
        ({"readout": "removal"}, "unlearning"),
        ({"solver": "unlearning", "readout_basis_rank": 8}, "readout_basis_rank=0"),
        ({"readout_chunk_size": 0}, "`readout_chunk_size`"),
        ({"dtype": "int8"}, "`dtype`"),
    ],
)
def test_validation_names_the_field(kwargs, field):
    with pytest.raises(AttributionConfigError, match=field):
        AttributionConfig(**kwargs)


def test_horizon_defaults_per_solver_and_round_trips():
    # the closed form defaults to the K → ∞ limit, damped influence itself (issue 15)
    assert AttributionConfig().solver is Solver.CLOSED_FORM and AttributionConfig().horizon == "inf" and AttributionConfig().steps is None
    assert AttributionConfig(horizon=3000).steps == 3000
    with pytest.raises(AttributionConfigError, match="damping"):
        AttributionConfig(damping=0.0)
    with pytest.raises(AttributionConfigError, match="closed_form"):
        AttributionConfig(solver="linearized", horizon="inf")
    assert AttributionConfig(solver="linearized").horizon == 100
    assert AttributionConfig(solver="linearized", horizon=7).horizon == 7
    restored = AttributionConfig.from_dict(AttributionConfig(solver="two_trajectory").to_dict())
    assert restored.horizon == 100 and restored.solver is Solver.TWO_TRAJECTORY


def test_unlearning_defaults_to_the_removal_readout_without_a_basis():
    config = AttributionConfig(solver="unlearning")
    assert config.horizon == 20 and config.readout.value == "removal" and config.readout_basis_rank_for(10**6) == 0
    assert AttributionConfig.from_json_string(config.to_json_string()) == config
    assert AttributionConfig().readout.value == "jvp" and AttributionConfig(solver="unlearning", readout="jvp").readout.value == "jvp"


def test_readout_basis_rank_auto_depends_on_the_number_of_documents():
    config = AttributionConfig()
    assert config.readout_basis_rank == "auto"
    assert config.readout_basis_rank_for(9_999) == 0 and config.readout_basis_rank_for(10_000) == 1024
    assert AttributionConfig(readout_basis_rank=16).readout_basis_rank_for(5) == 16
    assert AttributionConfig.from_json_string(config.to_json_string()).readout_basis_rank == "auto"
    for bad in ("big", -1, True, 2.5):
        with pytest.raises(AttributionConfigError, match="`readout_basis_rank`"):
            AttributionConfig(readout_basis_rank=bad)
