"""Eigenbases of the full-batch curvature, for the closed-form horizon filter (DESIGN §4).

With the curvature H = Q diag(h) Qᵀ, K steps of the recursion from u = 0 give, per eigendirection,

    u_b = Q diag(−(1 − (1 − η(h + λ))^K) / (h + λ)) Qᵀ g_b,

so all documents are simulated by one filter applied to their gradients. Three eigenbases, and one shortcut:

- `ExplicitEigenbasis`: the [p, p] matrix (mean over the training examples of the per-example curvature),
  eigendecomposed; exact, for small subspaces; GGN or Hessian.
- the low-rank eigenbasis (`lowrank.low_rank_ggn`, an `ExplicitEigenbasis` with k < p eigenvectors): the k largest
  eigenpairs of the exact GGN and one eigenvalue for the rest of the space; for subspaces beyond the explicit size.
- `KroneckerEigenbasis` (EK-FAC): for each linear layer of the subspace, the eigenbases of the input
  covariance E[x xᵀ] and of the output-gradient covariance E[δ δᵀ] (gradients of the loss with targets
  sampled from the model, whose covariance is the GGN), with eigenvalues corrected to the mean squared
  per-example gradient in that basis. Layers are independent blocks; GGN only.
- `DampedInverse`: at K = ∞ (damped influence, the default horizon) the filter is −1/(h + λ) and needs no
  eigenvectors: −(H + λI)⁻¹ is formed once from a Cholesky factorisation of the explicit matrix (~15× cheaper than
  its `eigh`) and applied as one matrix product per document (the eigenbasis takes two).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from ..errors import SimulationDivergedError, TaskError
from ..progress import progress_bar
from .config import AttributionConfig, Curvature, Eigenbasis, Solver
from .curvature import CurvatureOperator
from .documents import length_batches
from .functional import TaskFunction, differentiable_attention, evaluation_mode
from .ggn import GaussNewton, exact_passes, gauss_newton, supports_exact_ggn
from .gradients import coordinate_ranges, example_gradients, leaf_parameters, linear_owners
from .lowrank import LowRankGGN, low_rank_ggn, oversampling
from .subspace import AttributionSubspace

logger = logging.getLogger(__name__)

Filter = Callable[[torch.Tensor], torch.Tensor]


def curvature_subset(examples: Sequence[Any], count: Optional[int], seed: int) -> list:
    """The seeded random subset of `count` training examples (all when None) the curvature is estimated on, in order."""
    if count is None or count >= len(examples):
        return list(examples)
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed))[:count]
    return [examples[i] for i in sorted(order.tolist())]


class ExplicitEigenbasis:
    """The full curvature matrix H = Q diag(h) Qᵀ in its eigenbasis: exact; memory p², so for small subspaces.

    The closed-form solver filters document gradients in it; the exact damped-influence baseline inverts H + λI
    through it (`damped_inverse`).
    """

    def __init__(self, eigenvalues: torch.Tensor, eigenvectors: torch.Tensor, seconds: Optional[float] = None,
                 complement: Optional[float] = None, resolution: Optional[dict] = None):
        self.eigenvalues, self.eigenvectors = eigenvalues, eigenvectors
        self.seconds = seconds
        self.complement = complement  # eigenvalue of every direction orthogonal to the eigenvectors (when they are fewer than p)
        self.resolution = resolution  # a low-rank basis: how much of the spectrum it resolves (`curvature_resolution`)

    @classmethod
    def from_rows(cls, rows: torch.Tensor, dtype: Optional[torch.dtype] = None, seconds: Optional[float] = None) -> "ExplicitEigenbasis":
        """The eigenbasis of H = AᵀA from its R <= p rows A, through the R × R Gram matrix: the R eigenpairs, and
        eigenvalue 0 on the orthogonal complement (exact: H has rank <= R)."""
        dtype = dtype or rows.dtype
        rows = rows.to(torch.float64)
        values, vectors = torch.linalg.eigh(rows @ rows.T)
        keep = values > 1e-12 * values[-1:].clamp_min(0).max() if len(values) else values > 0
        values, vectors = values[keep], vectors[:, keep]
        basis = (rows.T @ vectors) / values.sqrt()
        return cls(values.to(dtype), basis.to(dtype), seconds, complement=0.0)

    @classmethod
    def from_gauss_newton(cls, gauss_newton, dtype: Optional[torch.dtype] = None, seconds: Optional[float] = None) -> "ExplicitEigenbasis":
        """From a `ggn.GaussNewton`: through its rows when it kept them (fewer than p), else its matrix."""
        if gauss_newton.rows is not None:
            return cls.from_rows(gauss_newton.rows, dtype, seconds)
        return cls.from_matrix(gauss_newton.matrix, dtype, seconds)

    @classmethod
    def from_low_rank(cls, made: LowRankGGN, dtype: Optional[torch.dtype] = None) -> "ExplicitEigenbasis":
        """From a `lowrank.LowRankGGN`: its k eigenpairs, and its complement eigenvalue for the rest of the space."""
        dtype = dtype or made.eigenvectors.dtype
        return cls(made.eigenvalues.to(dtype), made.eigenvectors.to(dtype), made.seconds, complement=made.complement)

    @classmethod
    def from_matrix(cls, matrix: torch.Tensor, dtype: Optional[torch.dtype] = None, seconds: Optional[float] = None) -> "ExplicitEigenbasis":
        """Eigendecompose a symmetric [p, p] curvature matrix (symmetrised, decomposed in float64, kept in `dtype`)."""
        dtype = dtype or matrix.dtype
        eigenvalues, eigenvectors = torch.linalg.eigh(((matrix + matrix.T) / 2).double())
        return cls(eigenvalues.to(dtype), eigenvectors.to(dtype), seconds)

    @classmethod
    def from_operator(cls, operator: CurvatureOperator, chunk_size: int = 64) -> "ExplicitEigenbasis":
        """The curvature of `operator`'s batch, built column block by column block (p products), then `eigh`."""
        start = time.perf_counter()
        identity = torch.eye(operator.subspace.dim, dtype=operator.dtype, device=operator.point.device)
        matrix = torch.cat([operator.matvec(identity[lo : lo + chunk_size]) for lo in range(0, len(identity), chunk_size)])
        return cls.from_matrix(matrix, seconds=time.perf_counter() - start)

    @classmethod
    def estimate(cls, subspace: AttributionSubspace, task, examples: Sequence[Any], kind: Curvature, batch_size: int,
                 dtype: torch.dtype = torch.float32, chunk: int = 256, progress: bool = False, sketch: Optional[int] = None,
                 seed: int = 0) -> "ExplicitEigenbasis":
        """Mean curvature over `examples` (`explicit_curvature`), then `eigh`."""
        start = time.perf_counter()
        made = explicit_curvature(subspace, task, examples, kind, batch_size, dtype, chunk, progress, sketch, seed)
        return cls.from_gauss_newton(made, dtype=dtype, seconds=time.perf_counter() - start)

    def _spectrum(self) -> torch.Tensor:
        extra = [] if self.complement is None else [torch.tensor([self.complement], dtype=self.eigenvalues.dtype)]
        return torch.cat([self.eigenvalues.cpu(), *extra])

    @property
    def max_eigenvalue(self) -> float:
        return float(self._spectrum().abs().max())

    @property
    def min_eigenvalue(self) -> float:
        return float(self._spectrum().min())

    def filter(self, vectors: torch.Tensor, factor: Filter) -> torch.Tensor:
        """Q diag(factor(h)) Qᵀ v for each row v of `vectors` (in `vectors`' dtype), plus factor(complement) times v's
        part outside the eigenvectors' span when they span less than the whole space."""
        basis = self.eigenvectors.to(vectors.device, vectors.dtype)
        coefficients = vectors @ basis
        out = (coefficients * factor(self.eigenvalues.to(vectors.device, torch.float64)).to(vectors.dtype)) @ basis.T
        if self.complement is not None:
            rest = factor(torch.tensor([self.complement], dtype=torch.float64)).item()
            out += rest * (vectors - coefficients @ basis.T)
        return out

    def damped_inverse(self, vectors: torch.Tensor, damping: float) -> torch.Tensor:
        """(H + λI)⁻¹ v for each row v; refuses a λ that leaves H + λI singular or indefinite."""
        shifted_min = self.min_eigenvalue + damping
        if shifted_min <= 0:
            raise ValueError(f"H + λI is not positive definite: its smallest eigenvalue is {shifted_min:.3g} with λ = {damping}.")
        return self.filter(vectors, lambda h: 1.0 / (h + damping))


def explicit_curvature(subspace: AttributionSubspace, task, examples: Sequence[Any], kind: Curvature, batch_size: int,
                       dtype: torch.dtype = torch.float32, chunk: int = 256, progress: bool = False, sketch: Optional[int] = None,
                       seed: int = 0) -> GaussNewton:
    """The mean curvature over `examples`, explicit: a `ggn.GaussNewton` (its rows while fewer than p, else its matrix).

    The GGN is built from per-example output Jacobians (`ggn.gauss_newton`: one backward pass per output-curvature
    factor and batch, or `sketch` sketched passes per batch) when the subspace and task allow it; otherwise — the
    Hessian, or parameters outside linear layers — column block by column block from curvature-vector products
    (p products per batch).
    """
    if Curvature(kind) is Curvature.GGN and supports_exact_ggn(subspace, task):
        return gauss_newton(subspace, task, examples, batch_size, dtype=dtype, progress=progress, samples=sketch, seed=seed)
    p = subspace.dim
    matrix = torch.zeros(p, p, dtype=dtype, device=subspace.device)
    identity = torch.eye(p, dtype=dtype, device=subspace.device)
    for batch in progress_bar(length_batches(task, examples, batch_size), desc="Curvature (explicit)", enabled=progress):
        operator = CurvatureOperator(subspace, task, task.collate(batch), kind, dtype)
        for start_column in range(0, p, chunk):
            matrix[start_column : start_column + chunk] += operator.matvec(identity[start_column : start_column + chunk]) * len(batch)
    return GaussNewton(matrix=matrix / len(examples))


def indefinite_curvature_message(lowest: float, shift: float, curvature: Curvature) -> str:
    """Why the closed form refuses a curvature with an eigenvalue below −(λ + weight_decay), and what to change."""
    advice = (f"Raise `damping` above {-lowest:.4g}, or use curvature='ggn'." if Curvature(curvature) is Curvature.HESSIAN else
              f"Raise `damping` above {-lowest:.4g} (e.g. to {-2 * lowest:.2g}): the GGN (curvature='ggn', already set) is positive "
              "semi-definite, so a negative eigenvalue is rounding error of its products, as in a model that computes in bfloat16 "
              "or float16, and the damping absorbs it.")
    return (f"The closed-form simulation would diverge: the curvature has an eigenvalue {lowest:.4g} below "
            f"−(λ + weight_decay) = {-shift:.4g}, so (1 − η(h + λ))^K grows without bound. " + advice)


def _top_eigenvalue(matrix: torch.Tensor, iterations: int, block: int = 4) -> float:
    """The largest eigenvalue of a symmetric positive semi-definite matrix: subspace iteration on `block` vectors in
    float32 (each iteration reads the matrix once: at p = 3,584 a float64 power iteration of 100 single-vector steps
    was half a second of memory traffic), then the Rayleigh–Ritz value in float64."""
    work = matrix.float()
    vectors = torch.randn(len(matrix), block, generator=torch.Generator().manual_seed(0)).to(matrix.device)
    for _ in range(iterations):
        vectors = torch.linalg.qr(work @ vectors).Q
    vectors = vectors.double()
    return float(torch.linalg.eigvalsh(vectors.T @ (matrix @ vectors))[-1])


class DampedInverse:
    """−(H + sI)⁻¹ as one [p, p] matrix (s = λ + weight_decay): the closed form's K = ∞ filter −1/(h + s) without an
    eigendecomposition.

    Factorised in float64 (Cholesky of H + sI, p³/3 operations; `eigh` costs ~15× more at p = 3,584), inverted in the
    compute dtype (float32 at least) and applied as one matrix product per document. Only the largest eigenvalue is
    kept (subspace iteration), for the step size the artifact records; a finite horizon needs the eigenvalues and uses
    `ExplicitEigenbasis`.
    """

    def __init__(self, matrix: torch.Tensor, shift: float, max_eigenvalue: float, seconds: Optional[float] = None):
        self.matrix, self.shift, self.seconds = matrix, float(shift), seconds
        self._max_eigenvalue = float(max_eigenvalue)

    @classmethod
    def from_matrix(cls, curvature: torch.Tensor, shift: float, kind: Curvature = Curvature.GGN, dtype: Optional[torch.dtype] = None,
                    seconds: Optional[float] = None, power_iterations: int = 20) -> "DampedInverse":
        """From the explicit curvature H; refuses (SimulationDivergedError) an H + sI that is not positive definite."""
        start = time.perf_counter()
        dtype = dtype or curvature.dtype
        # H + sI in one float64 copy (p² float64 copies are the memory here); Cholesky reads its lower triangle, so a
        # curvature symmetric up to round-off (curvature-vector products) is taken as that triangle mirrored
        shifted = curvature.to(torch.float64, copy=True)
        shifted.diagonal().add_(shift)
        factor, info = torch.linalg.cholesky_ex(shifted)
        if int(info) != 0:
            lowest = float(torch.linalg.eigvalsh(shifted)[0]) - shift
            raise SimulationDivergedError(indefinite_curvature_message(min(lowest, -shift), shift, kind))
        top = _top_eigenvalue(shifted, power_iterations) - shift  # H + sI is positive definite: its top is H's plus s
        del shifted
        # factorised in float64, inverted in the precision it is applied in (float32 at least): the inverse of a float32
        # build differs from float64's by ~κ(L)·1e-7 relative, as much as applying a float64 inverse in float32 does
        # (2.8e-6 against 2.5e-6 on the scale setting's responses), at half the cost
        inverse = torch.cholesky_inverse(factor.to(torch.promote_types(dtype, torch.float32))).neg_().to(dtype)
        seconds = (seconds or 0.0) + time.perf_counter() - start
        return cls(inverse, shift, top, seconds)

    @property
    def max_eigenvalue(self) -> float:
        """The largest eigenvalue of H (power iteration: a lower bound, close for a separated top eigenvalue)."""
        return self._max_eigenvalue

    def apply(self, vectors: torch.Tensor) -> torch.Tensor:
        """−(H + sI)⁻¹ v for each row v of `vectors` (in `vectors`' dtype)."""
        return vectors @ self.matrix.to(vectors.device, vectors.dtype)


@dataclass
class _Layer:
    """One linear layer of the subspace: where its weight (and bias) sit in the flat vector, and its eigenbasis."""

    module: nn.Module
    weight: tuple[int, int]  # flat slice
    bias: Optional[tuple[int, int]]
    shape: tuple[int, int]  # [d_out, d_in] of the weight
    input_factor: torch.Tensor  # Σ x xᵀ over positions, [d_in(+1), d_in(+1)]
    output_factor: torch.Tensor  # Σ δ δᵀ over positions, [d_out, d_out]
    input_basis: Optional[torch.Tensor] = None  # eigenvectors of input_factor
    output_basis: Optional[torch.Tensor] = None  # eigenvectors of output_factor
    eigenvalues: Optional[torch.Tensor] = None  # [d_out, d_in(+1)], corrected

    def matrix(self, flat: torch.Tensor) -> torch.Tensor:
        """[n, d_out, d_in(+1)] view of the layer's coordinates in rows of `flat` ([W | b])."""
        weight = flat[:, self.weight[0] : self.weight[1]].reshape(-1, *self.shape)
        if self.bias is None:
            return weight
        return torch.cat([weight, flat[:, self.bias[0] : self.bias[1]][:, :, None]], dim=2)

    def write(self, flat: torch.Tensor, matrix: torch.Tensor) -> None:
        flat[:, self.weight[0] : self.weight[1]] = matrix[:, :, : self.shape[1]].reshape(len(flat), -1)
        if self.bias is not None:
            flat[:, self.bias[0] : self.bias[1]] = matrix[:, :, self.shape[1]]


class KroneckerEigenbasis:
    """EK-FAC eigenbases of the GGN, one block per linear layer of the subspace."""

    def __init__(self, layers: list[_Layer]):
        self.layers = layers

    @classmethod
    def estimate(cls, subspace: AttributionSubspace, task, examples: Sequence[Any], batch_size: int, seed: int = 0,
                 dtype: torch.dtype = torch.float32, progress: bool = False) -> "KroneckerEigenbasis":
        """Two passes over `examples`: Kronecker factors (then their eigenbases), then eigenvalue corrections."""
        basis = cls(_layers(subspace, dtype))
        layers = basis.layers
        generator = torch.Generator(device=subspace.device).manual_seed(seed)
        sampled = lambda model, batch: task.sampled_loss_from_outputs(task.outputs(model, batch), batch, generator)  # noqa: E731
        batches = length_batches(task, examples, batch_size)
        for batch in progress_bar(batches, desc="Curvature (Kronecker factors)", enabled=progress):
            collated = task.collate(batch)
            basis._accumulate_factors(subspace, sampled, collated, task.position_mask(collated))
        for layer in layers:
            layer.input_basis = torch.linalg.eigh(layer.input_factor.double())[1].to(dtype)
            layer.output_basis = torch.linalg.eigh(layer.output_factor.double())[1].to(dtype)
            layer.eigenvalues = torch.zeros(len(layer.output_basis), len(layer.input_basis), dtype=dtype, device=subspace.device)
        for batch in progress_bar(batches, desc="Curvature (eigenvalue correction)", enabled=progress):
            gradients = example_gradients(subspace, sampled, task.collate, batch, dtype=dtype)
            for layer in layers:
                rotated = layer.output_basis.T @ layer.matrix(gradients) @ layer.input_basis
                layer.eigenvalues += (rotated**2).sum(dim=0)
        for layer in layers:
            layer.eigenvalues /= len(examples)
        return basis

    def _accumulate_factors(self, subspace: AttributionSubspace, sampled, batch, mask: Optional[torch.Tensor]) -> None:
        by_module = {layer.module: layer for layer in self.layers}

        def positions(values: torch.Tensor) -> torch.Tensor:
            """[positions, features] rows of a layer's input or output gradient, padding left out (as Kronfluence does)."""
            if mask is not None and values.dim() == 3 and values.shape[:2] == mask.shape:
                return values[mask.to(values.device)]
            return values.reshape(-1, values.shape[-1])

        def forward_hook(module, args, output):
            if not output.requires_grad:
                return
            layer = by_module[module]
            x = positions(args[0].detach()).to(layer.input_factor.dtype)
            if layer.bias is not None:
                x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype, device=x.device)], dim=1)
            layer.input_factor += x.T @ x

            def on_grad(grad: torch.Tensor) -> None:  # must return None: a returned tensor would replace the gradient
                layer.output_factor.add_(_gram(positions(grad), layer.output_factor.dtype))

            output.register_hook(on_grad)

        handles = [layer.module.register_forward_hook(forward_hook) for layer in self.layers]
        try:
            function = TaskFunction(subspace, sampled)
            with evaluation_mode(subspace.model), differentiable_attention(subspace.model, forward_mode=False), torch.enable_grad():
                leaves = leaf_parameters(subspace, None)
                values = function.with_parameters(leaves, batch)
                torch.autograd.grad(values.sum(), list(leaves.values()), allow_unused=True)
        finally:
            for handle in handles:
                handle.remove()

    @property
    def max_eigenvalue(self) -> float:
        return max(float(layer.eigenvalues.max()) for layer in self.layers)

    @property
    def min_eigenvalue(self) -> float:
        return min(float(layer.eigenvalues.min()) for layer in self.layers)

    def filter(self, gradients: torch.Tensor, factor: Filter) -> torch.Tensor:
        """Per layer: Q_out (factor(λ) ⊙ (Q_outᵀ G Q_in)) Q_inᵀ for each row's layer matrix G."""
        out = torch.zeros_like(gradients)
        for layer in self.layers:
            q_in = layer.input_basis.to(gradients.device, gradients.dtype)
            q_out = layer.output_basis.to(gradients.device, gradients.dtype)
            rotated = q_out.T @ layer.matrix(gradients) @ q_in
            filtered = q_out @ (rotated * factor(layer.eigenvalues.to(gradients.device, torch.float64)).to(gradients.dtype)) @ q_in.T
            layer.write(out, filtered)
        return out


def _layers(subspace: AttributionSubspace, dtype: torch.dtype) -> list[_Layer]:
    """One empty `_Layer` (zero factors) per linear layer of the subspace, in parameter order."""
    owners = linear_owners(subspace)
    if owners is None:
        raise TaskError(
            "eigenbasis='kronecker' needs every subspace parameter to be the weight or bias of an nn.Linear "
            "(LoRA and projection adapters are); use eigenbasis='explicit' or another solver for this subspace."
        )
    offsets = coordinate_ranges(subspace)
    layers = []
    for module, names in owners.items():
        weight_name = names.get("weight")
        if weight_name is None:
            raise TaskError("eigenbasis='kronecker' needs the weight of every linear layer whose bias is in the subspace.")
        d_out, d_in = module.weight.shape
        extra = 1 if "bias" in names else 0
        layers.append(_Layer(module, offsets[weight_name], offsets.get(names.get("bias")), (d_out, d_in),
                             torch.zeros(d_in + extra, d_in + extra, dtype=dtype, device=subspace.device),
                             torch.zeros(d_out, d_out, dtype=dtype, device=subspace.device)))
    return layers


def eigenbasis_state(basis) -> dict:
    """The tensors an eigenbasis is made of (no module references), to send to other processes: `eigenbasis_from_state`
    rebuilds it on their own copy of the subspace, so that every process filters with the main process's estimate."""
    if isinstance(basis, DampedInverse):
        return {"kind": "damped_inverse", "matrix": basis.matrix.cpu(), "shift": basis.shift, "max_eigenvalue": basis.max_eigenvalue,
                "seconds": basis.seconds}
    if isinstance(basis, ExplicitEigenbasis):
        return {"kind": "explicit", "eigenvalues": basis.eigenvalues.cpu(), "eigenvectors": basis.eigenvectors.cpu(),
                "complement": basis.complement, "seconds": basis.seconds, "resolution": basis.resolution}
    return {"kind": "kronecker", "layers": [{"input_basis": layer.input_basis.cpu(), "output_basis": layer.output_basis.cpu(),
                                             "eigenvalues": layer.eigenvalues.cpu()} for layer in basis.layers]}


def describe_eigenbasis(basis) -> dict:
    """What the closed form's eigenbasis is, for the artifact's record: 'explicit' (the exact curvature), 'low_rank' (with
    how much of the spectrum it resolves, `curvature_resolution`) or 'kronecker' (EK-FAC, an approximation)."""
    if isinstance(basis, ExplicitEigenbasis) and basis.resolution is not None:
        return dict(basis.resolution)
    if isinstance(basis, (ExplicitEigenbasis, DampedInverse)):
        return {"kind": "explicit"}
    return {"kind": "kronecker"}


def eigenbasis_from_state(state: dict, subspace: AttributionSubspace):
    """Inverse of `eigenbasis_state`, on `subspace` (the same description as the one the state was made on)."""
    device = subspace.device
    if state["kind"] == "damped_inverse":
        return DampedInverse(state["matrix"].to(device), state["shift"], state["max_eigenvalue"], state["seconds"])
    if state["kind"] == "explicit":
        return ExplicitEigenbasis(state["eigenvalues"].to(device), state["eigenvectors"].to(device), state["seconds"], state["complement"],
                                  state.get("resolution"))
    layers = _layers(subspace, state["layers"][0]["eigenvalues"].dtype)
    if len(layers) != len(state["layers"]):
        raise TaskError(f"The eigenbasis was made for {len(state['layers'])} linear layers; this subspace has {len(layers)}.")
    for layer, tensors in zip(layers, state["layers"]):
        layer.input_basis, layer.output_basis = tensors["input_basis"].to(device), tensors["output_basis"].to(device)
        layer.eigenvalues = tensors["eigenvalues"].to(device)
    return KroneckerEigenbasis(layers)


def _gram(grad: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    flat = grad.detach().reshape(-1, grad.shape[-1]).to(dtype)
    return flat.T @ flat


def estimate_eigenbasis(subspace: AttributionSubspace, task, train_examples: Sequence[Any], config: AttributionConfig, progress: bool = False):
    """The eigenbasis `config` asks for (explicit, low-rank or Kronecker), on `config.curvature_examples` training examples.

    `eigenbasis='auto'` takes the explicit (exact) eigenbasis when its memory and eigendecomposition stay within
    `explicit_max_dim`: p <= explicit_max_dim (a p × p matrix), or an exact GGN of R <= explicit_max_dim rows with
    R·p <= 4·explicit_max_dim² (kept as its rows, decomposed through the R × R Gram matrix: a classifier with few
    outputs); beyond, the low-rank eigenbasis of the exact GGN (`curvature_rank` eigendirections) where the GGN's Jacobian
    rows exist, EK-FAC where they do not. The choice and its reason are logged.
    """
    examples = curvature_subset(train_examples, config.curvature_examples, config.seed)
    exact_ggn = config.curvature is Curvature.GGN and supports_exact_ggn(subspace, task)
    passes = exact_passes(subspace, task, examples, config.batch_size) if exact_ggn else None
    choice = config.eigenbasis
    if choice is Eigenbasis.AUTO:
        choice = _auto_eigenbasis(subspace, config, passes, len(examples))
    if choice is Eigenbasis.LOW_RANK:
        return _low_rank(subspace, task, examples, config, passes, progress)
    if choice is Eigenbasis.EXPLICIT:
        sketch = None
        if passes is not None:
            if passes > config.exact_curvature_max_passes:
                sketch = config.curvature_sketch
                logger.info("The exact GGN would take %d backward passes (more than exact_curvature_max_passes = %d): it is sketched "
                            "with curvature_sketch = %d passes per batch (%d in all), an unbiased estimate.", passes,
                            config.exact_curvature_max_passes, sketch, sketch * -(-len(examples) // config.batch_size))
            else:
                logger.info("The exact GGN takes %d backward passes.", passes)
        start = time.perf_counter()
        made = explicit_curvature(subspace, task, examples, config.curvature, config.batch_size, config.compute_dtype,
                                  progress=progress, sketch=sketch, seed=config.seed)
        if config.steps is None and made.rows is None:
            logger.info("horizon='inf': the closed form applies −(H + λI)⁻¹ itself, formed from a Cholesky factorisation "
                        "(no eigendecomposition).")
            return DampedInverse.from_matrix(made.matrix, config.curvature_shift, config.curvature, config.compute_dtype,
                                             seconds=time.perf_counter() - start)
        return ExplicitEigenbasis.from_gauss_newton(made, dtype=config.compute_dtype, seconds=time.perf_counter() - start)
    if config.curvature is Curvature.HESSIAN:
        raise TaskError("The Kronecker eigenbasis approximates the GGN only; use curvature='ggn' or eigenbasis='explicit'.")
    return KroneckerEigenbasis.estimate(subspace, task, examples, config.batch_size, config.seed, config.compute_dtype, progress)


LOW_RANK_MAX_BYTES = 4 * 10**9  # auto's bound on the low-rank eigenbasis' factors (p × width float64, ~4 copies); EK-FAC beyond


def _auto_eigenbasis(subspace: AttributionSubspace, config: AttributionConfig, passes: Optional[int], n_examples: int) -> Eigenbasis:
    """`eigenbasis='auto'`'s choice for this subspace (see `estimate_eigenbasis`), logged with its reason."""
    dim, limit = subspace.dim, config.explicit_max_dim
    if dim <= limit:
        how = "exact GGN from per-example output Jacobians" if passes is not None else f"exact {config.curvature.value} from curvature-vector products"
        logger.info("eigenbasis='auto': explicit eigenbasis (%s), since the subspace's %d coordinates are at most explicit_max_dim = %d.",
                    how, dim, limit)
        return Eigenbasis.EXPLICIT
    batches = -(-n_examples // config.batch_size)
    rows = None if passes is None else passes // batches * n_examples  # an upper bound: slots × examples
    if rows is not None and passes <= config.exact_curvature_max_passes and rows <= limit and rows * dim <= 4 * limit * limit:
        logger.info("eigenbasis='auto': explicit eigenbasis (the exact GGN, of rank at most %d: its rows' %d × %d Gram matrix is "
                    "decomposed), since it has at most explicit_max_dim = %d rows.", rows, rows, rows, limit)
        return Eigenbasis.EXPLICIT
    low_rank_bytes = 4 * dim * (config.curvature_rank + oversampling(config.curvature_rank)) * 8  # float64 [p, width] copies
    if passes is not None and low_rank_bytes <= LOW_RANK_MAX_BYTES:
        return _auto_low_rank(dim, config)
    if passes is not None:
        logger.info("eigenbasis='auto': the low-rank eigenbasis of %d coordinates at curvature_rank = %d would hold ~%.1f GB of "
                    "float64 factors (more than %.0f GB), so EK-FAC is used; set eigenbasis='low_rank' (or lower curvature_rank) "
                    "to have it anyway.", dim, config.curvature_rank, low_rank_bytes / 1e9, LOW_RANK_MAX_BYTES / 1e9)
    if linear_owners(subspace) is None:
        raise TaskError(
            f"The closed-form solver needs an eigenbasis: this subspace has {dim:,} coordinates, more than "
            f"explicit_max_dim = {limit:,}, so eigenbasis='auto' chose 'kronecker' (EK-FAC), which needs "
            "every subspace parameter to be the weight or bias of an nn.Linear (LoRA and projection adapters are). "
            "Use a LoRA or projection subspace, solver='linearized', or raise explicit_max_dim (the explicit eigenbasis "
            "takes p² memory and an eigendecomposition of p × p)."
        )
    logger.warning("eigenbasis='auto': the subspace has %d coordinates, more than explicit_max_dim = %d, so the closed form runs in "
                   "the Kronecker-factored (EK-FAC) eigenbasis — an approximation of the GGN (per-layer blocks, Kronecker "
                   "factors). Raise explicit_max_dim (p² memory, an eigendecomposition of p × p) for the exact curvature.",
                   dim, limit)
    return Eigenbasis.KRONECKER


def _auto_low_rank(dim: int, config: AttributionConfig) -> Eigenbasis:
    """eigenbasis='auto' past the explicit size, where the GGN's Jacobian rows exist: the low-rank eigenbasis; logged."""
    logger.info("eigenbasis='auto': the subspace has %d coordinates, more than explicit_max_dim = %d, so the closed form resolves "
                "the curvature_rank = %d largest eigendirections of the exact GGN (low_rank: randomized Nyström, %d power passes) "
                "and gives the other directions one eigenvalue (curvature_complement=%r): exact where the spectrum is resolved, "
                "an approximation beyond.", dim, config.explicit_max_dim, config.curvature_rank,
                config.curvature_power_passes, config.curvature_complement.value)
    return Eigenbasis.LOW_RANK


def _low_rank(subspace: AttributionSubspace, task, examples: Sequence[Any], config: AttributionConfig, passes: Optional[int],
              progress: bool) -> ExplicitEigenbasis:
    """The low-rank eigenbasis of the GGN over `examples`, its Jacobian rows exact or sketched as the explicit GGN's are."""
    if passes is None:
        raise TaskError(
            "eigenbasis='low_rank' resolves the GGN from per-example Jacobian rows: it needs curvature='ggn', every subspace "
            "parameter the weight or bias of an nn.Linear (LoRA and projection adapters are) and a task with `output_curvature`. "
            "Use eigenbasis='explicit' (small subspaces) or 'kronecker', or solver='linearized'."
        )
    passes *= config.curvature_power_passes + 1
    sketch = None
    if passes > config.exact_curvature_max_passes:
        sketch = config.curvature_sketch
        logger.info("The low-rank GGN's %d passes over the data with exact Jacobian rows would take %d backward passes (more than "
                    "exact_curvature_max_passes = %d): its rows are sketched with curvature_sketch = %d passes per batch, the same "
                    "sketch on every pass.", config.curvature_power_passes + 1, passes, config.exact_curvature_max_passes, sketch)
    made = low_rank_ggn(subspace, task, examples, config.batch_size, config.curvature_rank, config.curvature_power_passes,
                        config.curvature_complement, sketch, config.seed, progress)
    basis = ExplicitEigenbasis.from_low_rank(made, config.compute_dtype)
    basis.resolution = curvature_resolution(made, config, sketched=sketch is not None)
    if basis.resolution["filter_ratio"] < UNRESOLVED_FILTER_RATIO and config.solver is not Solver.CONJUGATE_GRADIENTS:
        logger.warning(unresolved_spectrum_message(basis.resolution, config))  # conjugate gradients corrects what it misses
    return basis


UNRESOLVED_FILTER_RATIO = 0.5  # below: the directions the low-rank basis leaves flat span more than a 2× range of the filter


def curvature_resolution(made: LowRankGGN, config: AttributionConfig, sketched: bool = False) -> dict:
    """How much of the spectrum a low-rank eigenbasis resolves, for the artifact and the warning: its rank, the smallest
    eigenvalue it resolves, the complement eigenvalue every other direction gets, the share of tr G its eigenvalues hold (of
    the sketched G's trace when the Jacobian rows were `sketched`), and
    `filter_ratio` = filter(smallest resolved) / filter(complement). The unresolved directions have eigenvalues between the
    complement's and the smallest resolved one, so a ratio near 1 means the filter is flat there (nothing lost) and a small
    one means the response along them is off by up to 1/ratio (the filter at K → ∞ is −1/(h + λ); at a finite horizon it
    flattens to −ηK below h ≈ 1/(ηK), so a short horizon needs fewer directions)."""
    shift = config.curvature_shift
    smallest = float(made.eigenvalues[-1]) if len(made.eigenvalues) else 0.0
    step_size = 0.0 if config.steps is None else config.step_size_for(float(made.eigenvalues[0]))
    factor = horizon_filter(step_size, config.steps, shift)
    values = factor(torch.tensor([smallest, made.complement], dtype=torch.float64))
    return {"kind": "low_rank", "rank": len(made.eigenvalues), "smallest_resolved_eigenvalue": smallest,
            "complement_eigenvalue": made.complement, "curvature_shift": shift,
            "resolved_trace_fraction": float(made.eigenvalues.sum()) / made.trace if made.trace else 1.0, "sketched": sketched,
            "filter_ratio": float(values[0] / values[1]) if float(values[1]) != 0 else 1.0}


def unresolved_spectrum_message(resolution: dict, config: AttributionConfig) -> str:
    """The warning a low-rank eigenbasis gives when it leaves part of the filter's range unresolved."""
    shift = resolution["curvature_shift"]
    trace = ("the sketched GGN's trace (the true GGN has more rank than its sketch, so more of it is unresolved)"
             if resolution.get("sketched") else "the GGN's trace")
    return (f"The low-rank eigenbasis resolves the GGN's {resolution['rank']} largest eigendirections, down to eigenvalue "
            f"{resolution['smallest_resolved_eigenvalue']:.3g} (= {resolution['smallest_resolved_eigenvalue'] / shift:.3g} × "
            f"(damping + weight_decay)); every other direction gets eigenvalue {resolution['complement_eigenvalue']:.3g}. "
            f"The filter differs by up to {1 / resolution['filter_ratio']:.3g}× across that unresolved range, which holds "
            f"{100 * (1 - resolution['resolved_trace_fraction']):.1f}% of {trace}: the responses are exact damped influence "
            "along the resolved directions only, and the order of weakly related documents can differ from exact influence "
            "(per-query Spearman 0.4–0.5 against exact at p = 131,072 in benchmarks/RESULTS.md, issue 15). For exact damped "
            f"influence: solver='conjugate_gradients' (preconditioned by this basis; cg_iterations = {config.cg_iterations} "
            "curvature-vector products per document), or a subspace of at most "
            f"explicit_max_dim = {config.explicit_max_dim} coordinates; for a flatter filter: a larger damping or a finite "
            f"horizon. Raising curvature_rank (now {config.curvature_rank}) helps slowly.")


def horizon_filter(step_size: float, horizon: Optional[int], shift: float) -> Filter:
    """h ↦ −(1 − (1 − η(h + shift))^K) / (h + shift): K recursion steps from u = 0, per eigendirection
    (horizon None: the K → ∞ limit −1 / (h + shift), damped influence).

    Evaluated in float64 as expm1(K·log1p(−ηs)) / s (s = h + shift), which keeps its value where 1 − (1 − ηs)^K
    cancels (ηKs ≪ 1: the value tends to −ηK); the result is cast back to the eigenvalues' dtype.
    """

    def factor(eigenvalues: torch.Tensor) -> torch.Tensor:
        shifted = eigenvalues.to(torch.float64) + shift
        if horizon is None:
            return (-1.0 / shifted).to(eigenvalues.dtype)
        rate = step_size * shifted
        small = rate < 1  # log1p(−ηs) exists; beyond, (1 − ηs)^K has no cancellation to guard against
        decay = torch.where(small, torch.expm1(horizon * torch.log1p(-rate.clamp(max=1.0))), (1 - rate) ** horizon - 1)
        safe = torch.where(shifted == 0, torch.ones_like(shifted), shifted)
        values = torch.where(shifted == 0, torch.full_like(shifted, -step_size * horizon), decay / safe)
        return values.to(eigenvalues.dtype)

    return factor
