"""`AttributionConfig`: every setting of the estimator, with a lossless JSON round-trip."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional, Union

import torch

from ..errors import AttributionConfigError

logger = logging.getLogger(__name__)


class Solver(str, Enum):
    """How each document's response u_b is simulated (DESIGN §4)."""

    LINEARIZED = "linearized"
    """K steps of u ← u − η[(H_k + λI)u + g_b] with curvature–vector products (the reference)."""
    TWO_TRAJECTORY = "two_trajectory"
    """K optimiser steps with and without document b up-weighted; u_b = (θ⁺_K − θ⁻_K)/ε."""
    SINGLE_TRAJECTORY = "single_trajectory"
    """As two-trajectory but with θ* as the unperturbed end point (exact when θ* is stationary)."""
    CLOSED_FORM = "closed_form"
    """The K-step recursion with full-batch curvature in closed form: −(1 − (1 − η(h+λ))^K)/(h+λ) per eigendirection."""
    CONJUGATE_GRADIENTS = "conjugate_gradients"
    """Damped influence −(H + λI)⁻¹ g_b (K → ∞) by `cg_iterations` conjugate-gradient steps per document with exact
    curvature-vector products over the curvature examples, preconditioned by the closed form's eigenbasis (which it
    estimates as the closed form does): exact where the closed form's basis is an approximation (beyond
    `explicit_max_dim`), at the cost of `cg_iterations` curvature products per document."""
    UNLEARNING = "unlearning"
    """Nonlinear: K Adam steps from θ* that ascend L_b and descend `unlearning_retain` × the minibatch loss (document b
    unlearned, the rest kept); u_b = θ* − θ_K, the finite response to removing b, with the sign of an up-weighting.
    Read out with readout='removal'. Uses `horizon`, `unlearning_rate`, `unlearning_retain`, `batch_size` and `seed`;
    not the damping, curvature or step size of the influence recursion. Adam normalises every coordinate's step, so
    ‖u_b‖ ≈ K · unlearning_rate · √p for every document: the response's direction carries the attribution, its size
    does not (it is not a first-order influence)."""


class Eigenbasis(str, Enum):
    """Where the closed-form solver gets the curvature's eigenbasis."""

    AUTO = "auto"
    """`explicit` when its memory and eigendecomposition stay within `explicit_max_dim` (p <= explicit_max_dim, or an exact GGN
    with at most that many rows); beyond, `low_rank` where the exact GGN's Jacobian rows exist, else `kronecker`; logged
    with the reason."""
    EXPLICIT = "explicit"
    """The full [p, p] curvature matrix, eigendecomposed: exact, for small subspaces. The GGN is built from per-example
    output Jacobians (one backward pass per output-curvature factor), the Hessian from p curvature-vector products."""
    LOW_RANK = "low_rank"
    """The `curvature_rank` largest eigenpairs of the exact GGN (randomized Nyström with `curvature_power_passes` power
    passes over the same per-example Jacobian rows the explicit GGN is built from; memory p × rank) and one eigenvalue,
    `curvature_complement`, for the rest of the space: exact filter on the resolved directions, approximate beyond."""
    KRONECKER = "kronecker"
    """Per-layer Kronecker-factored eigenbases with eigenvalue correction (EK-FAC), GGN only: an approximation (layers
    independent, Kronecker factors, sampled labels), padded positions left out of the factors."""


class Complement(str, Enum):
    """The eigenvalue the low-rank eigenbasis gives every direction outside its `curvature_rank` eigenvectors."""

    MEAN = "mean"
    """(tr G − Σ top k) / (p − k): the mean of the unresolved spectrum (the trace comes from the Jacobian rows' norms)."""
    ZERO = "zero"
    """0: the unresolved directions count as flat (the filter gives them −1/λ, or −ηK at a finite horizon)."""


class Curvature(str, Enum):
    """Which curvature H the linearised recursion multiplies with."""

    GGN = "ggn"
    """Generalised Gauss–Newton JᵀH_ℓJ: positive semi-definite, the safe default."""
    HESSIAN = "hessian"
    """The exact Hessian of the training loss; may have negative eigenvalues."""


class ReadoutMode(str, Enum):
    """How ∇f_qᵀu_b is read out with forward passes only (DESIGN §5)."""

    CENTRAL_DIFFERENCE = "central_difference"
    """[f(θ* + εû) − f(θ* − εû)] / 2ε · ‖u‖: two forwards per direction."""
    ONE_SIDED = "one_sided"
    """[f(θ* + εû) − f(θ*)] / ε · ‖u‖: one forward per direction."""
    JVP = "jvp"
    """The exact directional derivative by forward-mode AD (torch.func.jvp), vmapped."""
    REMOVAL = "removal"
    """f_q(θ*) − f_q(θ* − u_b): the exact change of f_q when a finite (unlearning) response is taken away; no ε."""


INFINITE_HORIZON = "inf"
DEFAULT_HORIZONS = {"closed_form": INFINITE_HORIZON, "conjugate_gradients": INFINITE_HORIZON, "linearized": 100, "two_trajectory": 100, "single_trajectory": 100, "unlearning": 20}
"""K when `horizon` is None. The closed form costs the same at any K and defaults to the K → ∞ limit, damped influence
itself: with an exact eigenbasis K = 3000 still agreed with it at per-query Spearman 0.93 only (benchmarks/RESULTS.md,
issue 15); the iterative solvers cost K curvature products; unlearning costs K backward passes per document (20 Adam
steps at rate 1e-3 unlearn a fact document; issue 9, Table 8)."""
DEFAULT_READOUTS = {"unlearning": "removal"}
"""`readout` when None: the removal readout for finite responses, the JVP otherwise."""
CG_ITERATIONS = 20
"""`cg_iterations`' default (chosen on one seed of the p = 131,072 benchmark, benchmarks/RESULTS.md, issue 15)."""
AUTO_BASIS_RANK = 1024
AUTO_BASIS_MIN_DOCUMENTS = 10_000
"""readout_basis_rank='auto' builds a basis of rank <= AUTO_BASIS_RANK from this many documents on: there the exact
readout (N directions) costs 18x the compressed one per query, at Spearman >= 0.99 (benchmarks/RESULTS.md, issue 8)."""

_DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def known_fields(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    """The entries of `data` that are fields of the dataclass `cls`; unknown keys (written by a newer version)
    are dropped with a warning, as PEFT's configs do."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        logger.warning("Ignoring unknown %s keys %s (written by a newer hf_fwdattr?).", cls.__name__, unknown)
    return {k: v for k, v in data.items() if k in known}


def _enum_value(enum_cls: type[Enum], value: Any, name: str) -> Enum:
    if isinstance(value, enum_cls):
        return value
    try:
        return enum_cls(value)
    except ValueError as err:
        choices = ", ".join(repr(m.value) for m in enum_cls)
        raise AttributionConfigError(f"`{name}` must be one of {choices}, got {value!r}.") from err


@dataclass
class AttributionConfig:
    """Settings of the short-horizon influence estimator and its forward-only readout.

    Every field has a JSON form; `AttributionConfig.from_dict(config.to_dict()) == config`.
    The quantities are those of DESIGN §2–§5: responses u_b ≈ −(H + λI)⁻¹g_b simulated with
    `horizon` damped steps of size `step_size`, read out as ∇f_qᵀu_b. The `unlearning` solver instead simulates the
    finite response to removing each document (K Adam steps at `unlearning_rate` ascending L_b, descending
    `unlearning_retain` × the training minibatch loss), read out as
    f_q(θ*) − f_q(θ* − u_b).
    """

    damping: float = field(
        default=1e-3,
        metadata={
            "help": "λ, added to the curvature: u_b = −(H + λI)⁻¹ g_b. Must be >= 0 (> 0 for the Hessian). Its unit is that of H, the "
            "curvature of the mean per-example training loss as the task reduces it (with the callback's token-mean objective: "
            "per-token curvature), in the subspace's coordinates."
        },
    )
    weight_decay: float = field(
        default=0.0,
        metadata={
            "help": "An L2 term (weight_decay / 2)‖θ‖² of the training objective, on the subspace coordinates (the trainable "
            "or PEFT parameters themselves). This is coupled weight decay (a term of the loss); AdamW's decoupled decay "
            "(TrainingArguments.weight_decay) is not one and is not copied here. A model trained with an L2 term is stationary only with it: the linearised "
            "recursion adds weight_decay·u (as damping does), the trajectory solvers add weight_decay·(θ* + v) to the gradient. "
            "Must be >= 0."
        },
    )
    step_size: Union[float, str] = field(
        default="auto",
        metadata={"help": "η of the simulation, or 'auto' to pick η = step_size_fraction / (h_max + λ) by power iteration."},
    )
    step_size_fraction: float = field(
        default=1.0,
        metadata={"help": "With step_size='auto', η(h_max + λ + weight_decay) equals this; must lie in (0, 2)."},
    )
    horizon: Union[int, str, None] = field(
        default=None,
        metadata={
            "help": "K, the number of simulated steps (K → ∞ gives damped influence), or 'inf' (closed_form and conjugate_gradients: "
            "the limit itself, −(H + λI)⁻¹ g_b, which needs λ + weight_decay > 0; conjugate_gradients takes only 'inf'); None: 'inf' "
            "for closed_form (any K costs the same there) and conjugate_gradients, 100 for the iterative solvers (their cost "
            "grows with K), 20 for unlearning."
        },
    )
    solver: Solver = field(
        default=Solver.CLOSED_FORM,
        metadata={"help": "closed_form | conjugate_gradients | linearized | two_trajectory | single_trajectory | unlearning (see `Solver`; "
                  "closed_form is the one that scales, conjugate_gradients exact damped influence beyond explicit_max_dim, unlearning "
                  "the nonlinear removal response that traces facts best)."},
    )
    cg_iterations: int = field(
        default=CG_ITERATIONS,
        metadata={"help": "conjugate_gradients solver: the most CG steps per document (each one curvature-vector product per document "
                  "over the curvature examples); it stops earlier at `cg_tolerance`."},
    )
    cg_tolerance: float = field(
        default=1e-3,
        metadata={"help": "conjugate_gradients solver: a document's CG stops at this relative residual ‖(H + λI)u + g_b‖ / ‖g_b‖."},
    )
    curvature: Curvature = field(default=Curvature.GGN, metadata={"help": "ggn | hessian (used by the linearized and conjugate_gradients solvers, and the explicit eigenbasis)."})
    batch_size: int = field(
        default=32,
        metadata={"help": "Training examples per simulated step; a value >= the training set size uses the full batch."},
    )
    seed: int = field(default=0, metadata={"help": "Seed of the minibatch sequence (shared by all documents and solvers)."})
    power_iterations: int = field(default=20, metadata={"help": "Power-iteration steps used to estimate h_max."})
    power_iteration_batches: int = field(default=3, metadata={"help": "Minibatches on which h_max is estimated (max taken)."})
    unlearning_rate: float = field(
        default=1e-3,
        metadata={"help": "unlearning solver: the Adam learning rate of the K steps (in the subspace coordinates)."},
    )
    unlearning_retain: float = field(
        default=3.0,
        metadata={
            "help": "unlearning solver: weight of the mean training-minibatch loss descended while L_b is ascended, so that "
            "forgetting b does not break what the other documents taught (0: ascend L_b alone). See benchmarks/RESULTS.md, issue 9."
        },
    )
    trajectory_epsilon: float = field(
        default=1e-3,
        metadata={
            "help": "Trajectory solvers: size of the parameter perturbation the up-weighted run may make; "
            "document b is up-weighted by trajectory_epsilon / (η K ‖g_b‖)."
        },
    )
    eigenbasis: Eigenbasis = field(default=Eigenbasis.AUTO, metadata={"help": "closed_form solver: auto | explicit | kronecker."})
    explicit_max_dim: int = field(
        default=6144,
        metadata={"help": "eigenbasis='auto' uses the explicit eigenbasis up to this subspace dimension: p² memory and one p × p "
                  "eigendecomposition, whose cost grows like p³ (14 s of one CPU core at p = 3,584, about a minute at 6,144, "
                  "3 minutes at 8,192; benchmarks/RESULTS.md, issue 15); also beyond it when the exact GGN has at most this many "
                  "rows R (R·p memory, an R × R eigendecomposition: classifiers with few outputs)."},
    )
    curvature_rank: int = field(
        default=256,
        metadata={"help": "eigenbasis='low_rank' (auto's choice above explicit_max_dim): how many of the GGN's largest eigendirections "
                  "are resolved exactly (float64 memory p × (rank + oversampling)); the filter gives the rest one value, see "
                  "`curvature_complement`. At p = 131,072: per-query Spearman ~0.4-0.5 against exact damped influence (EK-FAC "
                  "0.2-0.4; rank 64: 0.3-0.4), ~120 epochs of a tiny LoRA to build (benchmarks/RESULTS.md, issue 15)."},
    )
    curvature_power_passes: int = field(
        default=2,
        metadata={"help": "eigenbasis='low_rank': power passes of the randomized eigensolver, each one more pass over the curvature "
                  "examples (0: single-pass Nyström); more passes sharpen the resolved directions when the spectrum decays slowly."},
    )
    curvature_complement: Complement = field(
        default=Complement.MEAN,
        metadata={"help": "eigenbasis='low_rank': the eigenvalue of the unresolved directions: 'mean' (of the unresolved spectrum, "
                  "from the trace) | 'zero'."},
    )
    curvature_sketch: int = field(
        default=8,
        metadata={
            "help": "Explicit GGN: when building it exactly would take more than `exact_curvature_max_passes` backward passes "
            "(batches × output-curvature factors: a language model has tokens × hidden size factors per example), it is "
            "sketched with this many backward passes per batch instead — an unbiased estimate whose error shrinks like "
            "1/√passes."
        },
    )
    exact_curvature_max_passes: int = field(
        default=20_000,
        metadata={"help": "The explicit GGN is built exactly (one backward pass per output-curvature factor and batch) up to this "
                  "many backward passes, sketched beyond (see `curvature_sketch`); counted on the first batch."},
    )
    curvature_examples: Optional[int] = field(
        default=1024,
        metadata={
            "help": "closed_form and conjugate_gradients solvers: training examples the curvature is estimated on (a seeded random "
            "subset); None uses all. "
            "1,024 keeps the estimate a fixed cost: 128 to 10,000 examples moved the scores' fidelity by 0.02 (benchmarks/RESULTS.md, issue 8)."
        },
    )
    readout_basis_rank: Union[int, str] = field(
        default="auto",
        metadata={
            "help": "Largest rank k of the compressed readout basis U ≈ C Vᵀ (0: no basis, exact readout only); 'auto': "
            f"{AUTO_BASIS_RANK} for artifacts of at least {AUTO_BASIS_MIN_DOCUMENTS:,} documents, none below."
        },
    )
    readout_basis_fidelity: float = field(
        default=0.99,
        metadata={"help": "The basis keeps the smallest rank whose scores reach this mean Spearman correlation with exact scores on held-out queries."},
    )
    readout: Optional[ReadoutMode] = field(
        default=None,
        metadata={"help": "central_difference | one_sided | jvp | removal; None: removal for the unlearning solver, jvp otherwise."},
    )
    epsilon: Optional[float] = field(
        default=None,
        metadata={
            "help": "Difference readouts: step length along the unit direction u_b/‖u_b‖ in parameter space; "
            "None picks 2·δ^(1/3) (central) or 10·δ^(1/2) (one-sided) for the model's machine epsilon δ."
        },
    )
    readout_chunk_size: int = field(default=64, metadata={"help": "Directions evaluated together in one vmapped pass."})
    simulation_chunk_size: int = field(default=256, metadata={"help": "Documents simulated together in one batched pass."})
    dtype: str = field(
        default="float32",
        metadata={"help": "dtype the responses are accumulated and stored in (float64 | float32 | bfloat16 | float16)."},
    )

    def __post_init__(self) -> None:
        self.solver = _enum_value(Solver, self.solver, "solver")
        if self.horizon is None:
            self.horizon = DEFAULT_HORIZONS[self.solver.value]
        self.curvature = _enum_value(Curvature, self.curvature, "curvature")
        if self.readout is None:
            self.readout = DEFAULT_READOUTS.get(self.solver.value, ReadoutMode.JVP.value)
        self.readout = _enum_value(ReadoutMode, self.readout, "readout")
        self.eigenbasis = _enum_value(Eigenbasis, self.eigenbasis, "eigenbasis")
        self.curvature_complement = _enum_value(Complement, self.curvature_complement, "curvature_complement")
        self._validate()

    def _validate(self) -> None:
        def fail(message: str) -> None:
            raise AttributionConfigError(message)

        def finite_number(name: str) -> float:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                fail(f"`{name}` must be a finite number, got {value!r}.")
            return float(value)

        def positive_int(name: str) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                fail(f"`{name}` must be an integer >= 1, got {value!r}.")

        if finite_number("damping") < 0:
            fail(f"`damping` must be >= 0, got {self.damping!r}; it is the λ of (H + λI).")
        if finite_number("weight_decay") < 0:
            fail(f"`weight_decay` must be >= 0, got {self.weight_decay!r}; it is the coefficient of (weight_decay / 2)‖θ‖².")
        if self.curvature is Curvature.HESSIAN and self.damping + self.weight_decay == 0:
            fail("`damping` must be > 0 with curvature='hessian' (and no weight_decay): the Hessian can be singular. Set e.g. damping=1e-3.")
        if isinstance(self.step_size, str):
            if self.step_size != "auto":
                fail(f"`step_size` must be a positive number or 'auto', got {self.step_size!r}.")
        elif finite_number("step_size") <= 0:
            fail(f"`step_size` must be > 0 or 'auto', got {self.step_size!r}.")
        fraction = finite_number("step_size_fraction")
        if not 0 < fraction < 2:
            fail(f"`step_size_fraction` must lie in (0, 2) so that η(h_max + λ) < 2, got {fraction!r}; 1.0 is safe.")
        if self.solver is Solver.CONJUGATE_GRADIENTS and self.horizon != INFINITE_HORIZON:
            fail(f"solver='conjugate_gradients' solves for damped influence itself (horizon='inf'), got horizon={self.horizon!r}; leave "
                 "`horizon` unset, or use solver='closed_form' for a finite horizon.")
        if self.horizon == INFINITE_HORIZON:
            if self.solver not in (Solver.CLOSED_FORM, Solver.CONJUGATE_GRADIENTS):
                fail(f"horizon='inf' (the K → ∞ limit) is computed by solver='closed_form' or 'conjugate_gradients' only; "
                     f"{self.solver.value!r} runs K steps: give `horizon` as an integer.")
            if self.curvature_shift <= 0:
                fail("horizon='inf' is damped influence −(H + λI)⁻¹ g_b, which needs `damping` (or `weight_decay`) > 0: flat "
                     "directions would get an infinite response. Set damping > 0, or a finite horizon.")
        else:
            positive_int("horizon")
        for name in ("batch_size", "power_iterations", "power_iteration_batches", "readout_chunk_size",
                     "simulation_chunk_size", "explicit_max_dim", "curvature_sketch", "exact_curvature_max_passes",
                     "curvature_rank", "cg_iterations"):
            positive_int(name)
        if not finite_number("cg_tolerance") > 0:
            fail(f"`cg_tolerance` must be > 0, got {self.cg_tolerance!r}.")
        power_passes = self.curvature_power_passes
        if isinstance(power_passes, bool) or not isinstance(power_passes, int) or power_passes < 0:
            fail(f"`curvature_power_passes` must be an integer >= 0, got {power_passes!r}.")
        if self.curvature_examples is not None:
            positive_int("curvature_examples")
        rank = self.readout_basis_rank
        if rank != "auto" and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 0):
            fail(f"`readout_basis_rank` must be an integer >= 0 (0 turns the compressed basis off) or 'auto', got {rank!r}.")
        if not 0 < finite_number("readout_basis_fidelity") <= 1:
            fail(f"`readout_basis_fidelity` must lie in (0, 1], got {self.readout_basis_fidelity!r}.")
        if self.uses_eigenbasis and self.eigenbasis is Eigenbasis.KRONECKER and self.curvature is Curvature.HESSIAN:
            fail("`eigenbasis` 'kronecker' (EK-FAC) approximates the GGN only; use curvature='ggn', or eigenbasis='explicit' for the Hessian.")
        if self.uses_eigenbasis and self.eigenbasis is Eigenbasis.LOW_RANK and self.curvature is Curvature.HESSIAN:
            fail("`eigenbasis` 'low_rank' resolves the GGN's eigendirections from its Jacobian rows; use curvature='ggn', or "
                 "eigenbasis='explicit' for the Hessian.")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            fail(f"`seed` must be an integer, got {self.seed!r}.")
        if finite_number("trajectory_epsilon") <= 0:
            fail(f"`trajectory_epsilon` must be > 0, got {self.trajectory_epsilon!r}.")
        if finite_number("unlearning_rate") <= 0:
            fail(f"`unlearning_rate` must be > 0, got {self.unlearning_rate!r}.")
        if finite_number("unlearning_retain") < 0:
            fail(f"`unlearning_retain` must be >= 0, got {self.unlearning_retain!r}.")
        if self.readout is ReadoutMode.REMOVAL:
            if self.solver is not Solver.UNLEARNING:
                fail(f"readout='removal' evaluates the model at θ* − u_b, which is meaningful for the finite responses of "
                     f"solver='unlearning' only; the {self.solver.value!r} solver's responses are derivatives: read them with "
                     "readout='jvp', 'central_difference' or 'one_sided'.")
            if rank not in ("auto", 0):
                fail(f"readout='removal' is nonlinear in u_b, so a compressed readout basis cannot serve it: set readout_basis_rank=0 "
                     f"(got {rank!r}) or read the responses linearly with readout='jvp'.")
        if self.epsilon is not None and finite_number("epsilon") <= 0:
            fail(f"`epsilon` must be > 0 or None (automatic), got {self.epsilon!r}.")
        if self.dtype not in _DTYPES:
            fail(f"`dtype` must be one of {', '.join(map(repr, _DTYPES))}, got {self.dtype!r}.")

    @property
    def steps(self) -> Optional[int]:
        """K as a number of steps, None for horizon='inf' (the K → ∞ limit)."""
        return None if self.horizon == INFINITE_HORIZON else int(self.horizon)

    @property
    def torch_dtype(self) -> torch.dtype:
        """`dtype` as a `torch.dtype`."""
        return _DTYPES[self.dtype]

    @property
    def compute_dtype(self) -> torch.dtype:
        """dtype the simulation's recursions run in: float64 if asked for, float32 otherwise."""
        return torch.float64 if self.dtype == "float64" else torch.float32

    @property
    def curvature_shift(self) -> float:
        """What the recursion adds to the loss curvature: damping + weight_decay."""
        return float(self.damping) + float(self.weight_decay)

    def readout_basis_rank_for(self, num_documents: int) -> int:
        """The largest basis rank to build for an artifact of `num_documents` documents (0: none)."""
        if self.readout is ReadoutMode.REMOVAL:
            return 0  # a linear basis cannot serve a nonlinear readout
        if self.readout_basis_rank != "auto":
            return int(self.readout_basis_rank)
        return AUTO_BASIS_RANK if num_documents >= AUTO_BASIS_MIN_DOCUMENTS else 0

    @property
    def uses_eigenbasis(self) -> bool:
        """Whether the solver needs the curvature's eigenbasis: the closed form filters in it, conjugate gradients is
        preconditioned by it."""
        return self.solver in (Solver.CLOSED_FORM, Solver.CONJUGATE_GRADIENTS)

    @property
    def automatic_step_size(self) -> bool:
        """Whether η is estimated from the curvature."""
        return self.step_size == "auto"

    def step_size_for(self, h_max: float) -> float:
        """η for a curvature whose largest eigenvalue is `h_max`: step_size_fraction / (h_max + λ + weight_decay) with
        step_size='auto', else the fixed `step_size`."""
        return self.step_size_fraction / (h_max + self.curvature_shift) if self.automatic_step_size else float(self.step_size)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (enums as their string values)."""
        return {f.name: (v.value if isinstance(v := getattr(self, f.name), Enum) else v) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AttributionConfig":
        """Build a config from `to_dict()` output; unknown keys (from a newer version) are ignored with a warning."""
        return cls(**known_fields(cls, data))

    def to_json_string(self) -> str:
        """The config as sorted JSON."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json_string(cls, text: str) -> "AttributionConfig":
        """Inverse of `to_json_string`."""
        return cls.from_dict(json.loads(text))
