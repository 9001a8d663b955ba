"""Short-horizon simulation of each document's parameter response u_b (DESIGN §4).

u_b^(0) = 0,  u_b^(k+1) = u_b^(k) − η[(H_k + λI) u_b^(k) + g_b]  ⇒  u_b^(K) → −(H + λI)⁻¹ g_b as K → ∞.

The iterative solvers share the minibatch sequence (step k uses minibatch k of `MinibatchSequence`):

- linearized: the recursion above with curvature–vector products, all documents batched;
- two_trajectory: K real gradient steps on mean minibatch loss + ε_b L_b + (λ/2)‖v‖² (+ the training
  objective's (weight_decay/2)‖θ* + v‖², when `config.weight_decay` is set) from θ*, minus
  the same K steps without document b, divided by ε_b;
- single_trajectory: the same with θ* as the unperturbed end point.

The closed_form solver runs the linearised recursion with the full-batch curvature exactly, as one filter
in the curvature's eigenbasis (see `eigenbasis.py`): one pass of per-document gradients. Where that eigenbasis is an
approximation (beyond `explicit_max_dim`), the conjugate_gradients solver reaches K → ∞ itself, −(H + λI)⁻¹ g_b, by
conjugate gradients with exact curvature-vector products, preconditioned by the closed form.

The unlearning solver leaves the linear regime: K Adam steps from θ* that ascend L_b while descending
`unlearning_retain` × the mean loss of training minibatch k (the model forgets document b and keeps the rest), and
u_b = θ* − θ_K (the sign of an up-weighting). A memorised fact sits where its
loss gradient has vanished, so the first-order response to up-weighting it says little about what removing it
does; the finite removal response, read out as f_q(θ*) − f_q(θ* − u_b), does (benchmarks/RESULTS.md, issue 9).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from ..errors import AttributionConfigError, SimulationDivergedError
from ..progress import progress_bar
from .config import AttributionConfig, Curvature, Solver
from .curvature import CurvatureOperator, estimate_step_size
from .conjugate import conjugate_gradients
from .documents import DocumentSet, MinibatchSequence, length_batches
from .eigenbasis import DampedInverse, curvature_subset, estimate_eigenbasis, horizon_filter, indefinite_curvature_message
from .functional import TaskFunction, differentiable_attention, evaluation_mode
from .gradients import GradientMethod, document_gradients
from .subspace import AttributionSubspace
from .task import as_task

logger = logging.getLogger(__name__)

# A stable recursion keeps ‖u^(k)‖ <= k η ‖g_b‖; allow this factor for minibatch curvature above the estimate.
_DIVERGENCE_FACTOR = 10.0


@dataclass
class SimulationResult:
    """The simulated responses and how they were made.

    Attributes:
        responses: [n_documents, dim] responses u_b, rows in the order of the documents simulated.
        gradients: [n_documents, dim] document gradients g_b (the responses' inputs); None for the unlearning solver,
            whose removal response does not start from them.
        step_size: η used (None for the unlearning solver, which takes Adam steps at `config.unlearning_rate`).
        top_eigenvalue: the h_max estimate η was derived from (None when η was given).
        seconds: wall time of the simulation, gradients included.
    """

    responses: torch.Tensor
    gradients: Optional[torch.Tensor]
    step_size: Optional[float]
    top_eigenvalue: Optional[float]
    seconds: float


def _divergence_error(step: int, document: str, norm: float, bound: float, config: AttributionConfig, step_size: float) -> SimulationDivergedError:
    message = (
        f"The simulation diverged at step {step} for document {document!r}: ‖u‖ = {norm:.3g} exceeds the stable bound "
        f"{bound:.3g} (η = {step_size:.3g}, λ = {config.damping:.3g}, curvature = {config.curvature.value}). "
        "Lower `step_size` (or set it to 'auto' / lower `step_size_fraction`)"
        + (", raise `damping` so that H + λI is positive definite, or use curvature='ggn'." if config.curvature is Curvature.HESSIAN
           else ", or raise `damping`.")
    )
    if config.solver is Solver.SINGLE_TRAJECTORY:
        message += (
            " With solver='single_trajectory' the usual cause is a θ* that is not stationary for the minibatch losses "
            "(the unperturbed run drifts): use solver='two_trajectory' or 'linearized'."
        )
    return SimulationDivergedError(message)


def _check_stable(responses: torch.Tensor, gradient_norms: torch.Tensor, step: int, step_size: float, config, ids: Sequence[str]) -> None:
    norms = responses.norm(dim=1)
    bound = _DIVERGENCE_FACTOR * step * step_size * gradient_norms + 1e-30
    bad = ~torch.isfinite(norms) | (norms > bound)
    if bool(bad.any()):
        row = int(torch.nonzero(bad).flatten()[0])
        raise _divergence_error(step, ids[row], float(norms[row]), float(bound[row]), config, step_size)


def simulate_responses(
    subspace: AttributionSubspace,
    task,
    documents: DocumentSet,
    train_examples: Sequence[Any],
    config: Optional[AttributionConfig] = None,
    document_indices: Optional[Sequence[int]] = None,
    step_size: Optional[float] = None,
    gradient_method: GradientMethod | str = GradientMethod.AUTO,
    progress: bool = False,
    eigenbasis: Any = None,
) -> SimulationResult:
    """Simulate the response u_b of every document (or of `document_indices`) with `config.solver`.

    Args:
        subspace: the attribution subspace at θ*.
        task: the `AttributionTask` giving per-example training losses.
        documents: the documents to attribute to.
        train_examples: the training examples the minibatches are drawn from.
        config: estimator settings.
        document_indices: simulate only these documents (rows of the result in this order).
        step_size: η to use, overriding `config.step_size` (e.g. one estimated once for all processes); ignored by the
            unlearning solver.
        gradient_method: how per-example gradients are computed.
        progress: show progress bars.
        eigenbasis: closed_form and conjugate_gradients solvers: a precomputed `ExplicitEigenbasis` / `KroneckerEigenbasis`
            / `DampedInverse` (estimated from `train_examples` when None).
    """
    task = as_task(task)
    config = config or AttributionConfig()
    rows = list(range(len(documents))) if document_indices is None else list(document_indices)
    documents.validate(task, rows)
    train_examples = list(train_examples)
    sequence = MinibatchSequence(len(train_examples), config.batch_size, config.seed)
    ids = [documents.document_ids[r] for r in rows]
    dtype = config.compute_dtype
    start = time.perf_counter()

    if config.uses_eigenbasis and eigenbasis is None:
        eigenbasis = estimate_eigenbasis(subspace, task, train_examples, config, progress)
    top = None
    if step_size is None:
        step_size, top = estimate_step_size(subspace, task, train_examples, config, eigenbasis)

    if config.solver is Solver.UNLEARNING:
        gradients = None  # the removal response needs no first-order gradient
        responses = _unlearning(subspace, task, documents, rows, train_examples, sequence, dtype, config, progress)
    else:
        gradients = document_gradients(subspace, task, documents, config.simulation_chunk_size, None, gradient_method, dtype, progress, rows)
        if config.solver is Solver.CLOSED_FORM:
            responses = _closed_form(eigenbasis, gradients, config, step_size, ids)
        elif config.solver is Solver.CONJUGATE_GRADIENTS:
            responses = _conjugate_gradients(subspace, task, eigenbasis, gradients, train_examples, config, step_size, ids, progress)
        elif config.solver is Solver.LINEARIZED:
            responses = _linearized(subspace, task, gradients, train_examples, sequence, config, step_size, ids, progress)
        else:
            responses = _trajectories(subspace, task, documents, rows, gradients, train_examples, sequence, config, step_size, progress)
    seconds = time.perf_counter() - start
    responses = responses.to(config.torch_dtype)
    _refuse_non_finite(responses, ids, config)
    return SimulationResult(responses, gradients, step_size, top, seconds)


def _refuse_non_finite(responses: torch.Tensor, ids: Sequence[str], config: AttributionConfig) -> None:
    """Whatever the solver, a NaN or infinite response would be stored and ranked arbitrarily (NaN sorts first)."""
    finite = torch.isfinite(responses).all(dim=1)
    if not bool(finite.all()):
        bad = [ids[i] for i in torch.nonzero(~finite).flatten().tolist()]
        raise SimulationDivergedError(
            f"The {config.solver.value} solver produced NaN or infinite responses for documents {bad[:5]} ({len(bad)} of {len(ids)}). "
            f"Their loss or gradient is not finite (check their tokens and the model's weights), or the responses overflow "
            f"dtype={config.dtype!r}; fix or drop those documents before simulating."
        )


def _closed_form(eigenbasis, gradients: torch.Tensor, config: AttributionConfig, step_size: float, ids) -> torch.Tensor:
    shift = config.curvature_shift
    if isinstance(eigenbasis, DampedInverse):
        if config.steps is not None or eigenbasis.shift != shift:
            raise AttributionConfigError(
                f"This curvature was factored as −(H + {eigenbasis.shift:g}·I)⁻¹, for horizon='inf' with λ + weight_decay = "
                f"{eigenbasis.shift:g}; the config asks for horizon={config.horizon!r} and λ + weight_decay = {shift:g}. "
                "Estimate the eigenbasis with this config (estimate_eigenbasis) instead of reusing it.")
        return eigenbasis.apply(gradients)
    if eigenbasis.min_eigenvalue + shift < 0:
        raise SimulationDivergedError(indefinite_curvature_message(eigenbasis.min_eigenvalue, shift, config.curvature))
    if step_size * (eigenbasis.max_eigenvalue + shift) >= 2:
        raise SimulationDivergedError(
            f"The closed-form simulation would diverge: η(h_max + λ) = {step_size * (eigenbasis.max_eigenvalue + shift):.3g} >= 2 "
            f"(η = {step_size:.4g}, h_max = {eigenbasis.max_eigenvalue:.4g}). Use step_size < {2 / (eigenbasis.max_eigenvalue + shift):.4g} "
            "or step_size='auto'."
        )
    return eigenbasis.filter(gradients, horizon_filter(step_size, config.steps, shift))


def _conjugate_gradients(subspace, task, eigenbasis, gradients, train_examples, config, step_size, ids, progress) -> torch.Tensor:
    """u_b = −(H + λI)⁻¹ g_b, H the curvature of the mean loss over the curvature examples (those the eigenbasis was
    estimated on), by `cg_iterations` CG steps at most for each chunk of documents; the closed form (−filter in the
    eigenbasis) is the preconditioner, so CG's first step is along the closed form's answer and the next ones correct what
    its basis missed."""
    examples = curvature_subset(train_examples, config.curvature_examples, config.seed)
    batches = length_batches(task, examples, config.batch_size)
    shift, chunk = config.curvature_shift, config.simulation_chunk_size

    def curvature(rows: torch.Tensor) -> torch.Tensor:
        # operators are made per product, not kept: each holds its batch's activations for the backward pass
        product = torch.zeros_like(rows)
        for batch in batches:
            operator = CurvatureOperator(subspace, task, task.collate(batch), config.curvature, rows.dtype)
            product += operator.matvec(rows) * (len(batch) / len(examples))
        return product

    def precondition(rows: torch.Tensor) -> torch.Tensor:
        return -_closed_form(eigenbasis, rows, config, step_size, ids)

    responses, iterations, worst = torch.empty_like(gradients), 0, 0.0
    for lo in progress_bar(range(0, len(gradients), chunk), total=-(-len(gradients) // chunk), desc="Simulating (conjugate gradients)",
                           enabled=progress):
        solved = conjugate_gradients(curvature, gradients[lo : lo + chunk], shift, config.cg_tolerance, config.cg_iterations,
                                     precondition, exact_residuals=False)
        responses[lo : lo + chunk] = -solved.solutions
        iterations, worst = max(iterations, solved.iterations), max(worst, float(solved.relative_residuals.max()))
    logger.info("Conjugate gradients: up to %d iterations per document (cg_iterations = %d), largest relative residual %.3g "
                "(cg_tolerance = %g), curvature over %d examples.", iterations, config.cg_iterations, worst, config.cg_tolerance,
                len(examples))
    if worst > 10 * config.cg_tolerance:
        logger.warning("Conjugate gradients stopped at cg_iterations = %d with a relative residual up to %.3g (cg_tolerance = %g): the "
                       "responses are CG's iterate, not yet damped influence itself, and their order can still move (at the fact "
                       "model's whole adapter, 20 and 40 iterations rank documents alike at Spearman 0.57 only; benchmarks/RESULTS.md). "
                       "Raise cg_iterations for closer responses.", config.cg_iterations, worst, config.cg_tolerance)
    return responses


def _linearized(subspace, task, gradients, train_examples, sequence, config, step_size, ids, progress) -> torch.Tensor:
    damping, chunk = config.curvature_shift, config.simulation_chunk_size  # weight decay adds to the curvature as damping does
    gradient_norms = gradients.norm(dim=1)
    responses = -step_size * gradients  # step 0: u = 0, so the curvature term vanishes
    steps = sequence.indices(config.horizon - 1, offset=1)
    for step, batch_indices in enumerate(progress_bar(steps, total=config.horizon - 1, desc="Simulating (linearized)", enabled=progress), start=2):
        batch = task.collate([train_examples[i] for i in batch_indices])
        operator = CurvatureOperator(subspace, task, batch, config.curvature, gradients.dtype)
        for lo in range(0, len(responses), chunk):
            block = responses[lo : lo + chunk]
            curvature = operator.matvec(block)
            responses[lo : lo + chunk] = block - step_size * (curvature + damping * block + gradients[lo : lo + chunk])
        _check_stable(responses, gradient_norms, step, step_size, config, ids)
    return responses


def _unlearning(subspace, task, documents: DocumentSet, rows: Sequence[int], train_examples, sequence, dtype, config,
                progress) -> torch.Tensor:
    """Per document, K Adam steps on −L_b + retain · (mean loss of minibatch k) from θ*; returns θ* − θ_K."""
    function = TaskFunction(subspace, task.train_loss)
    device = subspace.device
    beta1, beta2, tiny = 0.9, 0.999, 1e-8  # torch.optim.Adam's defaults
    rate = config.unlearning_rate
    retain = float(config.unlearning_retain)
    batches = [task.collate([train_examples[i] for i in indices]) for indices in sequence.indices(config.horizon)] if retain else []
    chunks_of = _chunks_by_document(documents, rows)
    responses = torch.zeros(len(rows), subspace.dim, dtype=dtype, device=device)
    with evaluation_mode(subspace.model), differentiable_attention(subspace.model, forward_mode=False), torch.enable_grad():
        for row, doc in enumerate(progress_bar(rows, desc="Simulating (unlearning)", enabled=progress)):
            own = task.collate(chunks_of[doc])
            point = torch.zeros(subspace.dim, dtype=dtype, device=device)
            first, second = torch.zeros_like(point), torch.zeros_like(point)
            for step in range(1, config.horizon + 1):
                point.requires_grad_(True)
                objective = -function(point, own).sum()
                if retain:
                    objective = objective + retain * function(point, batches[step - 1]).mean()
                (direction,) = torch.autograd.grad(objective, point)
                point = point.detach()
                first.mul_(beta1).add_(direction, alpha=1 - beta1)
                second.mul_(beta2).addcmul_(direction, direction, value=1 - beta2)
                denominator = (second / (1 - beta2**step)).sqrt_().add_(tiny)
                point.addcdiv_(first, denominator, value=-rate / (1 - beta1**step))
            if not torch.isfinite(point).all():
                raise SimulationDivergedError(
                    f"Unlearning document {documents.document_ids[doc]!r} produced non-finite parameters after {config.horizon} steps at "
                    f"unlearning_rate={rate:.3g}: lower `unlearning_rate` or `horizon`."
                )
            responses[row] = -point
    return responses


def _chunks_by_document(documents: DocumentSet, rows: Sequence[int]) -> dict[int, list]:
    chunks_of = {r: [] for r in rows}
    for example, doc in zip(documents.examples, documents.example_document):
        if doc in chunks_of:
            chunks_of[doc].append(example)
    return chunks_of


def _trajectory_gradient(function: TaskFunction, task, point: torch.Tensor, examples: list, weights: torch.Tensor) -> torch.Tensor:
    point = point.detach().requires_grad_(True)
    losses = function(point, task.collate(examples))
    (gradient,) = torch.autograd.grad((losses * weights.to(losses.dtype)).sum(), point)
    return gradient.detach()


def _trajectories(subspace, task, documents, rows, gradients, train_examples, sequence, config, step_size, progress) -> torch.Tensor:
    function = TaskFunction(subspace, task.train_loss)
    dtype, device, damping, horizon = gradients.dtype, subspace.device, config.damping, config.horizon
    batches = list(sequence.indices(horizon))
    gradient_norms = gradients.norm(dim=1)

    weight_decay = config.weight_decay
    theta = subspace.base_vector(dtype).to(device) if weight_decay else None

    def run(document_examples: list, weight: float) -> torch.Tensor:
        point = torch.zeros(subspace.dim, dtype=dtype, device=device)
        for batch_indices in batches:
            examples = [train_examples[i] for i in batch_indices]
            weights = [1.0 / len(examples)] * len(examples) + [weight] * len(document_examples)
            gradient = _trajectory_gradient(function, task, point, examples + document_examples, torch.tensor(weights, dtype=dtype, device=device))
            if weight_decay:  # the training objective's (weight_decay / 2)‖θ* + v‖²: θ* is stationary with it
                gradient = gradient + weight_decay * (theta + point)
            point = point - step_size * (gradient + damping * point)
        return point

    responses = torch.zeros_like(gradients)
    with evaluation_mode(subspace.model), differentiable_attention(subspace.model, forward_mode=False), torch.enable_grad():
        baseline = run([], 0.0) if config.solver is Solver.TWO_TRAJECTORY else torch.zeros(subspace.dim, dtype=dtype, device=device)
        chunks_of = _chunks_by_document(documents, rows)
        negligible = float(gradient_norms.max()) * torch.finfo(dtype).eps
        for row, doc in enumerate(progress_bar(rows, desc=f"Simulating ({config.solver.value})", enabled=progress)):
            norm = float(gradient_norms[row])
            if norm <= negligible:
                continue  # u_b = 0 to working precision; up-weighting by ε/‖g_b‖ would overflow
            weight = config.trajectory_epsilon / (step_size * horizon * norm)
            responses[row] = (run(chunks_of[doc], weight) - baseline) / weight
            response_norm = float(responses[row].norm())
            bound = _DIVERGENCE_FACTOR * horizon * step_size * norm
            if not torch.isfinite(responses[row]).all() or response_norm > bound:
                raise _divergence_error(horizon, documents.document_ids[doc], response_norm, bound, config, step_size)
    return responses
