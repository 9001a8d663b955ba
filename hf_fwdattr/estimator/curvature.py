"""Curvature of the training loss in the subspace: Hessian / Gauss–Newton products, h_max, step size.

All products are with the curvature of the *mean* per-example training loss of one minibatch,
evaluated at θ* (+ δ), batched over many vectors with `torch.func.vmap`.
"""

from __future__ import annotations

import logging
from typing import Any, Optional, Sequence

import torch
from torch.func import grad, jvp, vjp, vmap

from ..errors import SimulationDivergedError, TaskError
from .config import AttributionConfig, Curvature, Solver
from .documents import MinibatchSequence
from .functional import TaskFunction, differentiable_attention, evaluation_mode
from .subspace import AttributionSubspace

logger = logging.getLogger(__name__)


class CurvatureOperator:
    """Products of the minibatch curvature H (Hessian or GGN) with vectors in the subspace.

    Args:
        subspace: the attribution subspace.
        task: the task; the GGN needs its `outputs` and `loss_from_outputs`.
        batch: a collated minibatch of training examples.
        kind: `Curvature.GGN` or `Curvature.HESSIAN`.
        dtype: dtype of the vectors multiplied (and of the results).
        delta: evaluate at θ* + delta instead of θ*.
    """

    def __init__(self, subspace: AttributionSubspace, task, batch: Any, kind: Curvature, dtype=torch.float32, delta=None):
        self.subspace = subspace
        self.kind = Curvature(kind)
        self.dtype = dtype
        self.batch = batch
        self.point = torch.zeros(subspace.dim, dtype=dtype, device=subspace.device) if delta is None else delta.to(dtype)
        if self.kind is Curvature.GGN:
            if not task.supports_ggn:
                raise TaskError(
                    f"curvature='ggn' needs {type(task).__name__}.outputs and .loss_from_outputs; "
                    "implement them or set curvature='hessian'."
                )
            outputs = TaskFunction(subspace, task.outputs)
            self._outputs = lambda x: outputs(x, batch)
            self._output_loss = lambda z: task.loss_from_outputs(z, batch).mean()
            with evaluation_mode(subspace.model), differentiable_attention(subspace.model), torch.enable_grad():
                self._z0, self._vjp = vjp(self._outputs, self.point)
        else:
            loss = TaskFunction(subspace, task.train_loss)
            self._loss = lambda x: loss(x, batch).mean()

    def _hessian_vector(self, vector: torch.Tensor) -> torch.Tensor:
        return jvp(grad(self._loss), (self.point,), (vector,))[1]

    def _ggn_vector(self, vector: torch.Tensor) -> torch.Tensor:
        jv = jvp(self._outputs, (self.point,), (vector,))[1]
        hjv = jvp(grad(self._output_loss), (self._z0.detach(),), (jv,))[1]
        return self._vjp(hjv)[0]

    def matvec(self, vectors: torch.Tensor) -> torch.Tensor:
        """H v for each row v of `vectors` [m, dim]; returns [m, dim] in `dtype`."""
        product = self._ggn_vector if self.kind is Curvature.GGN else self._hessian_vector
        with evaluation_mode(self.subspace.model), differentiable_attention(self.subspace.model), torch.enable_grad():
            return vmap(product)(vectors.to(device=self.point.device, dtype=self.dtype)).detach()


def top_eigenvalue(operator: CurvatureOperator, iterations: int = 20, seed: int = 0) -> float:
    """Largest-magnitude eigenvalue of `operator` by power iteration (Rayleigh quotient)."""
    generator = torch.Generator().manual_seed(seed)
    vector = torch.randn(operator.subspace.dim, generator=generator, dtype=operator.dtype).to(operator.point.device)
    vector /= vector.norm()
    eigenvalue = 0.0
    for _ in range(iterations):
        product = operator.matvec(vector[None])[0]
        eigenvalue = float(vector @ product)
        norm = product.norm()
        if not torch.isfinite(norm) or norm == 0:
            break
        vector = product / norm
    return eigenvalue


def estimate_step_size(
    subspace: AttributionSubspace,
    task,
    train_examples: Sequence[Any],
    config: AttributionConfig,
    eigenbasis: Any = None,
) -> tuple[Optional[float], Optional[float]]:
    """(η, h_max): the step size the simulation runs with, and the curvature estimate it comes from.

    h_max is the largest eigenvalue of `eigenbasis` when given (the closed form's full-batch curvature), else the
    largest |eigenvalue| found by power iteration over the first minibatches of the simulation's sequence. With
    step_size='auto', η = step_size_fraction / (h_max + λ + weight_decay); a fixed η with η(h_max + λ + weight_decay)
    >= 2 would make the recursion diverge and is refused before any simulation. The unlearning solver takes no
    such step (its Adam rate is `unlearning_rate`): (None, None).
    """
    if config.solver is Solver.UNLEARNING:
        return None, None
    shift = config.curvature_shift
    if eigenbasis is not None:
        h_max = float(eigenbasis.max_eigenvalue)
    else:
        sequence = MinibatchSequence(len(train_examples), config.batch_size, config.seed)
        count = 1 if sequence.full_batch else config.power_iteration_batches
        h_max = 0.0
        for index, batch_indices in enumerate(sequence.indices(count)):
            batch = task.collate([train_examples[i] for i in batch_indices])
            operator = CurvatureOperator(subspace, task, batch, config.curvature, config.compute_dtype)
            h_max = max(h_max, abs(top_eigenvalue(operator, config.power_iterations, seed=config.seed + index)))
        logger.info("Estimated h_max = %.4g over %d minibatch(es).", h_max, count)
    step_size = config.step_size_for(h_max)
    if config.automatic_step_size:
        return step_size, h_max
    if step_size * (h_max + shift) >= 2:
        raise SimulationDivergedError(
            f"step_size = {step_size:.4g} would make the simulation diverge: η(h_max + λ) = {step_size * (h_max + shift):.3g} >= 2 "
            f"(h_max ≈ {h_max:.4g}, λ + weight_decay = {shift:.4g}). Use step_size < {2 / (h_max + shift):.4g}, "
            "step_size='auto', or raise `damping`."
        )
    return step_size, h_max
