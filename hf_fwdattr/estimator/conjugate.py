"""Conjugate gradients for (H + λI) x = b, many right-hand sides at once, optionally preconditioned.

One implementation for the library's `conjugate_gradients` solver (the documents' responses, preconditioned by the
closed form) and for the evaluation's exact damped-influence baselines (the queries' solves).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..errors import SimulationDivergedError

logger = logging.getLogger(__name__)

Product = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class ConjugateGradientResult:
    """Solutions of (H + λI) x = b for a block of right-hand sides.

    Attributes:
        solutions: [m, dim] the x's.
        iterations: CG iterations run.
        relative_residuals: [m] final ‖(H + λI)x − b‖ / ‖b‖ (recomputed with one more product unless
            `exact_residuals=False` asked for the recursion's own estimate).
        converged: whether every relative residual is <= 10 × the tolerance.
        seconds: wall time.
    """

    solutions: torch.Tensor
    iterations: int
    relative_residuals: torch.Tensor
    converged: bool
    seconds: float


def conjugate_gradients(curvature: Product, right_hand_sides: torch.Tensor, damping: float, tolerance: float = 1e-4,
                        max_iterations: int = 2000, precondition: Optional[Product] = None,
                        on_iteration: Optional[Callable[[int, torch.Tensor, torch.Tensor], None]] = None,
                        exact_residuals: bool = True) -> ConjugateGradientResult:
    """Solve (H + λI) x = b for each row b of `right_hand_sides` [m, dim]; `curvature` maps rows v to rows H v.

    Each row has its own step sizes and stops updating once its relative residual ‖r‖/‖b‖ is below `tolerance`; the
    loop ends when every row has, or after `max_iterations`. `precondition` (rows r ↦ M⁻¹ r, M symmetric positive
    definite, e.g. an approximate (H + λI)⁻¹) changes how fast CG converges, not what it converges to. `on_iteration`
    sees the iteration number, the current x and every row's relative residual (the recursion's) after each iteration.
    The final residuals are recomputed with one more product (`exact_residuals`), or taken from the recursion. Refuses
    (SimulationDivergedError) an H + λI that is not positive definite along a search direction (a Hessian with λ below
    its most negative eigenvalue).
    """
    start = time.perf_counter()
    precondition = precondition or (lambda rows: rows)
    b = right_hand_sides
    x = torch.zeros_like(b)
    r = b.clone()
    z = precondition(r)
    d = z.clone()
    rz = (r * z).sum(1)
    norms = b.norm(dim=1).clamp_min(torch.finfo(b.dtype).tiny)
    active = r.norm(dim=1) > tolerance * norms
    iteration = 0
    while bool(active.any()) and iteration < max_iterations:
        rows = torch.nonzero(active).flatten()
        q = curvature(d[rows]) + damping * d[rows]
        curvature_along = (d[rows] * q).sum(1)
        if bool((curvature_along <= 0).any()):
            raise SimulationDivergedError(
                f"Conjugate gradients met a direction of non-positive curvature (dᵀ(H + λI)d = {float(curvature_along.min()):.3g}): "
                f"H + λI is not positive definite at λ = {damping:g}. Use curvature='ggn' (positive semi-definite) or a larger damping.")
        alpha = rz[rows] / curvature_along
        x[rows] += alpha[:, None] * d[rows]
        r[rows] -= alpha[:, None] * q
        z = precondition(r[rows])
        new = (r[rows] * z).sum(1)
        d[rows] = z + (new / rz[rows])[:, None] * d[rows]
        rz[rows] = new
        active[rows] = r[rows].norm(dim=1) > tolerance * norms[rows]
        iteration += 1
        if on_iteration is not None:
            on_iteration(iteration, x, r.norm(dim=1) / norms)
        if iteration % 50 == 0:
            logger.info("CG iteration %d: %d of %d systems still above tolerance.", iteration, int(active.sum()), len(b))
    residuals = ((curvature(x) + damping * x - b) if exact_residuals else r).norm(dim=1) / norms
    return ConjugateGradientResult(x, iteration, residuals, bool((residuals <= 10 * tolerance).all()), time.perf_counter() - start)
