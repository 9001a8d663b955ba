"""The attribution methods compared, all scoring the same queries with the same sign convention.

Positive score = proponent: training on the point raises the query's margin. Every method returns a
[n_queries, n_train] score matrix.

- ours: `simulate_responses` + `ForwardReadout` (the library's public API), every solver, K ∈ {1, 5, 20, 100};
- exact damped influence: −∇f_qᵀ (H + λI)⁻¹ g_b with H an explicit [p, p] Hessian or GGN (own autograd code);
- gradient dot product and cosine: −∇f_qᵀ g_b (one gradient step on b moves f_q by −η ∇f_qᵀ g_b);
- TRAK through the `traker` package.

The hyper-parameter sweeps of the linearised solver use its closed form in the curvature's eigenbasis
(exact for the full-batch recursion with a fixed η, DESIGN §4); the chosen settings are then run through
the library itself, and the two are compared.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap

from hf_fwdattr import (
    AttributionConfig,
    AttributionSubspace,
    ClassificationTask,
    DocumentSet,
    ForwardReadout,
    document_gradients,
    query_gradients,
    simulate_responses,
)
from hf_fwdattr.estimator.eigenbasis import horizon_filter

TASK = ClassificationTask(measurement="margin")


def examples(x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype) -> list:
    """(input, label) pairs as `ClassificationTask` takes them."""
    return [(x[i].to(dtype), y[i]) for i in range(len(y))]


@dataclass
class ExplicitCurvature:
    """Explicit curvature of the mean training cross-entropy at θ* and its eigen-decomposition, by plain autograd: a
    reference computed independently of the library's `ExplicitEigenbasis`."""

    matrix: torch.Tensor
    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor

    @classmethod
    def of(cls, matrix: torch.Tensor) -> "ExplicitCurvature":
        matrix = (matrix + matrix.T) / 2
        values, vectors = torch.linalg.eigh(matrix)
        return cls(matrix, values, vectors)

    @property
    def top(self) -> float:
        return float(self.eigenvalues.abs().max())


def explicit_curvatures(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, ExplicitCurvature]:
    """Hessian and Gauss–Newton matrices of the mean cross-entropy (no weight decay) at θ*, by plain autograd."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def unflat(v):
        out, offset = {}, 0
        for name, shape in zip(names, shapes):
            out[name] = v[offset : offset + shape.numel()].reshape(shape)
            offset += shape.numel()
        return out

    def logits_of(v, inputs):
        return functional_call(model, unflat(v), (inputs,))

    hessian = torch.func.hessian(lambda v: nn.functional.cross_entropy(logits_of(v, x), y))(flat)
    jacobian = vmap(jacrev(lambda v, xi: logits_of(v, xi[None])[0]), in_dims=(None, 0))(flat, x)  # [n, C, p]
    probs = torch.softmax(logits_of(flat, x), dim=1)
    output_hessian = torch.diag_embed(probs) - probs[:, :, None] * probs[:, None, :]
    ggn = torch.einsum("ncp,ncd,ndq->pq", jacobian, output_hessian, jacobian) / len(y)
    return {"hessian": ExplicitCurvature.of(hessian.detach()), "ggn": ExplicitCurvature.of(ggn.detach())}


def filter_factors(eigenvalues: torch.Tensor, damping: float, step_size: Optional[float], horizon: Optional[int]) -> torch.Tensor:
    """Response factor per eigendirection, the library's `horizon_filter` (−1/(h+λ) for horizon None) on this
    benchmark's independently computed eigenvalues."""
    return horizon_filter(step_size or 0.0, horizon, damping)(eigenvalues)


class EigenScorer:
    """Scores −∇f_qᵀ V F Vᵀ g_b for any filter F, with ∇f_q V and G V computed once."""

    def __init__(self, curvature: ExplicitCurvature, query_grads: torch.Tensor, train_grads: torch.Tensor):
        self.curvature = curvature
        self.query_side = query_grads @ curvature.eigenvectors
        self.train_side = train_grads @ curvature.eigenvectors

    def scores(self, factors: torch.Tensor, rows: slice = slice(None)) -> np.ndarray:
        # score = ∇f_qᵀ u_b with u_b = V F Vᵀ g_b (F already carries the minus sign)
        return ((self.query_side[rows] * factors) @ self.train_side.T).numpy()


@dataclass
class OursResult:
    scores: np.ndarray
    simulation_seconds: float
    responses: torch.Tensor
    step_size: float
    readout_seconds: float


def run_ours(model: nn.Module, train: list, queries: list, config: AttributionConfig, documents: Optional[list] = None) -> OursResult:
    """The library's estimator on θ*: simulate every training point's response (or those of `documents`), read the queries out."""
    subspace = AttributionSubspace.build(model, "trainable")
    result = simulate_responses(subspace, TASK, DocumentSet.from_examples(train), train, config, document_indices=documents)
    start = time.perf_counter()
    scores = ForwardReadout.from_config(subspace, TASK, config).scores(queries, result.responses)
    return OursResult(scores.double().numpy(), result.seconds, result.responses, result.step_size, time.perf_counter() - start)


def gradients(model: nn.Module, train: list, queries: list) -> tuple[torch.Tensor, torch.Tensor]:
    """(query margin gradients [Q, p], training loss gradients [n, p]) at θ*, by backpropagation."""
    subspace = AttributionSubspace.build(model, "trainable")
    dtype = subspace.parameter_dtype
    query = query_gradients(subspace, TASK, queries, dtype=dtype)
    train_grads = document_gradients(subspace, TASK, DocumentSet.from_examples(train), batch_size=len(train), dtype=dtype)
    return query, train_grads


def gradient_dot(query: torch.Tensor, train: torch.Tensor, cosine: bool = False) -> np.ndarray:
    """−∇f_qᵀ g_b (or its cosine): the first-order effect of one gradient step on b."""
    if cosine:
        query = query / query.norm(dim=1, keepdim=True).clamp_min(1e-300)
        train = train / train.norm(dim=1, keepdim=True).clamp_min(1e-300)
    return (-(query @ train.T)).numpy()


class TrakRunner:
    """TRAK through the real `traker` package (CPU: BasicProjector, normal projection, float32).

    Features of the training set are computed for each of the `checkpoints` (float32 copies of the
    full-data models), scores for a set of targets are finalised over the first T checkpoints.
    """

    def __init__(self, checkpoints: list[nn.Module], x_train, y_train, proj_dim: int, lambda_reg: float, workdir: Path):
        from trak import TRAKer

        self.checkpoints = [m.float().eval() for m in checkpoints]
        self.x_train, self.y_train = x_train.float(), y_train
        self.workdir = Path(tempfile.mkdtemp(prefix=f"trak_k{proj_dim}_", dir=workdir))
        self.traker = TRAKer(
            model=self.checkpoints[0], task="image_classification", train_set_size=len(y_train), save_dir=str(self.workdir),
            device="cpu", proj_dim=proj_dim, use_half_precision=False, lambda_reg=lambda_reg,
            logging_level=logging.ERROR,
        )
        self._experiments = 0

    def featurize(self) -> float:
        """Features of all checkpoints; returns the seconds spent."""
        start = time.perf_counter()
        for model_id, model in enumerate(self.checkpoints):
            self.traker.load_checkpoint(model.state_dict(), model_id=model_id)
            self.traker.featurize(batch=(self.x_train, self.y_train), num_samples=len(self.y_train))
        self.traker.finalize_features()
        # finalize_features frees BasicProjector's matrix; with one block (proj_dim <= 100) traker regenerates it only on a
        # change of model id, so scoring the last featurised checkpoint would fail: force the regeneration.
        self.traker.projector.model_id = -1
        return time.perf_counter() - start

    def scores(self, x_queries, y_queries, n_checkpoints: int) -> np.ndarray:
        """[Q, n_train] TRAK scores of the queries with the first `n_checkpoints` checkpoints."""
        name = f"queries{self._experiments}"
        self._experiments += 1
        x_queries = x_queries.float()
        for model_id in range(n_checkpoints):
            self.traker.start_scoring_checkpoint(exp_name=name, checkpoint=self.checkpoints[model_id].state_dict(),
                                                 model_id=model_id, num_targets=len(y_queries))
            self.traker.score(batch=(x_queries, y_queries), num_samples=len(y_queries))
        scores = self.traker.finalize_scores(exp_name=name, model_ids=list(range(n_checkpoints)))
        return np.asarray(scores, dtype=np.float64).T.copy()

    def close(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)
