"""`AttributionConfig.weight_decay`: the (wd/2)‖θ‖² term of the training objective in the simulation."""

import pytest
import torch
from torch import nn

from hf_fwdattr import AttributionConfig, AttributionConfigError, AttributionSubspace, ClassificationTask, DocumentSet, SimulationDivergedError, simulate_responses

from conftest import newton_polish, noisy_classification

WEIGHT_DECAY = 0.05


@pytest.fixture(scope="module")
def decayed_regression():
    """A softmax regression at an exact stationary point of mean cross-entropy + (wd/2)‖θ‖² (Newton-polished, float64)."""
    inputs, labels = noisy_classification(n=80, seed=3)
    model = nn.Linear(3, 3).double()
    with torch.no_grad():
        for param in model.parameters():
            param.zero_()
    newton_polish(model, inputs, labels, steps=30, weight_decay=WEIGHT_DECAY)
    objective = nn.functional.cross_entropy(model(inputs), labels) + 0.5 * WEIGHT_DECAY * sum((p**2).sum() for p in model.parameters())
    assert torch.cat([g.reshape(-1) for g in torch.autograd.grad(objective, list(model.parameters()))]).norm() < 1e-12
    return model.eval(), [(inputs[i], labels[i]) for i in range(len(labels))]


def test_weight_decay_round_trips_and_is_validated():
    config = AttributionConfig(weight_decay=1e-2)
    assert AttributionConfig.from_dict(config.to_dict()) == config
    assert AttributionConfig.from_dict({"damping": 0.1}).weight_decay == 0.0  # files written before the field existed
    with pytest.raises(AttributionConfigError, match="`weight_decay` must be >= 0"):
        AttributionConfig(weight_decay=-1.0)
    AttributionConfig(curvature="hessian", damping=0.0, weight_decay=1e-3)  # weight decay alone regularises the Hessian
    with pytest.raises(AttributionConfigError, match="`damping` must be > 0"):
        AttributionConfig(curvature="hessian", damping=0.0)


def test_linearized_weight_decay_acts_as_damping(decayed_regression):
    model, examples = decayed_regression
    subspace = AttributionSubspace.build(model, "trainable")
    documents = DocumentSet.from_examples(examples[:6])
    common = dict(solver="linearized", horizon=30, batch_size=len(examples), curvature="hessian", dtype="float64")
    task = ClassificationTask()
    split = simulate_responses(subspace, task, documents, examples, AttributionConfig(damping=0.01, weight_decay=WEIGHT_DECAY, **common))
    merged = simulate_responses(subspace, task, documents, examples, AttributionConfig(damping=0.01 + WEIGHT_DECAY, **common))
    assert split.step_size == pytest.approx(merged.step_size)
    torch.testing.assert_close(split.responses, merged.responses, rtol=1e-12, atol=1e-14)


def test_trajectories_at_a_weight_decayed_optimum(decayed_regression):
    """θ* minimises CE + (wd/2)‖θ‖², not CE: the trajectories need the weight decay to see a stationary point."""
    model, examples = decayed_regression
    subspace = AttributionSubspace.build(model, "trainable")
    documents = DocumentSet.from_examples(examples[:5])
    task = ClassificationTask()
    common = dict(damping=0.0, weight_decay=WEIGHT_DECAY, horizon=40, batch_size=len(examples), curvature="hessian", dtype="float64", trajectory_epsilon=1e-6)
    reference = simulate_responses(subspace, task, documents, examples, AttributionConfig(solver="linearized", **common))
    for solver in ("single_trajectory", "two_trajectory"):
        result = simulate_responses(subspace, task, documents, examples, AttributionConfig(solver=solver, **common), step_size=reference.step_size)
        torch.testing.assert_close(result.responses, reference.responses, rtol=1e-4, atol=1e-7)
    # without the weight decay the unperturbed run drifts away from θ*, and the single trajectory says so
    without = {**common, "weight_decay": 0.0, "damping": WEIGHT_DECAY}
    with pytest.raises(SimulationDivergedError, match="not stationary"):
        simulate_responses(subspace, task, documents, examples, AttributionConfig(solver="single_trajectory", **without), step_size=reference.step_size)
