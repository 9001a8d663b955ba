"""The Gauss–Newton matrix of the training loss in the subspace, built exactly from per-example output Jacobians.

    GGN = (1/n) Σ_i J_iᵀ (∇²_y ℓ_i) J_i,       J_i = ∂y_i/∂v  (v: subspace coordinates)

y_i are the outputs of example i the loss is a function of: the logits of a classifier, or the last hidden states
of a language model whose output head is outside the subspace (the head then folds into the output curvature, so
a token costs the hidden size in factors, not the vocabulary). The task factors the output curvature at every
output position, ∇²_y ℓ_i = Σ_k f_k f_kᵀ (`AttributionTask.output_curvature`). A factor is a cotangent: one
backward pass from y with it gives, for every example of the batch at once, the row a = J_iᵀ f (per-example
gradients of the subspace's linear layers, from their inputs and the gradients at their outputs). Then
GGN = (1/n) Σ aᵀa over all rows, accumulated in float64.

This costs one backward pass per factor slot and batch — (positions × factors) for a language model, classes for a
classifier — instead of one curvature-vector product per coordinate (p of them) per batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence

import torch
from torch import nn

from ..errors import TaskError
from ..progress import progress_bar
from .documents import length_batches
from .functional import TaskFunction, differentiable_attention, evaluation_mode
from .gradients import coordinate_ranges, leaf_parameters, linear_owners
from .subspace import AttributionSubspace


_CHUNK_BYTES = 256 * 2**20  # rows of one chunk of cotangents: [chunk, batch, p]


def supports_exact_ggn(subspace: AttributionSubspace, task) -> bool:
    """Whether `exact_ggn` can build this subspace's GGN: every parameter a Linear's weight or bias, and a task that
    factors its output curvature."""
    return linear_owners(subspace) is not None and task.supports_output_curvature


def jacobian_rows(subspace: AttributionSubspace, task, batch: Any, delta: Optional[torch.Tensor] = None,
                  dtype: torch.dtype = torch.float64, samples: Optional[int] = None,
                  generator: Optional[torch.Generator] = None, cotangent_chunk: int = 32) -> Iterator[torch.Tensor]:
    """Rows a = J_iᵀ c of every example of `batch` ([B, p] per backward pass), with Σ aᵀa = Σ_i J_iᵀ (∇²_y ℓ_i) J_i.

    Exact (`samples` None): one backward pass per factor slot of `task.output_curvature` (position, factor); rows of
    examples without a factor in a slot are zero. Sketched (`samples` = S): S passes with the random cotangents of
    `task.sketched_output_curvature` (seeded by `generator`): the sum of aᵀa is then an unbiased estimate, whatever
    the number of slots — S backward passes per batch instead of positions × factors. `cotangent_chunk` cotangents
    share one vmapped backward pass.
    """
    owners = linear_owners(subspace)
    if owners is None:
        raise TaskError("The exact GGN needs every subspace parameter to be the weight or bias of an nn.Linear (LoRA and "
                        "projection adapters are); use the curvature-vector-product path for this subspace.")
    calls: list[tuple[nn.Module, torch.Tensor, torch.Tensor]] = []

    def record(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        if output.requires_grad:
            calls.append((module, args[0].detach(), output))

    if samples is None:
        function = TaskFunction(subspace, lambda model, b: task.output_curvature(model, b))
    else:
        function = TaskFunction(subspace, lambda model, b: task.sketched_output_curvature(model, b, samples, generator))
    handles = [module.register_forward_hook(record) for module in owners]
    try:
        with evaluation_mode(subspace.model), differentiable_attention(subspace.model, forward_mode=False), torch.enable_grad():
            outputs, curvature = function.with_parameters(leaf_parameters(subspace, delta), batch)
    finally:
        for handle in handles:
            handle.remove()
    if outputs.dim() != 3:
        raise TaskError(f"output_curvature must return outputs of shape [B, positions, D]; got {tuple(outputs.shape)}.")
    if samples is None:
        if curvature.dim() != 4 or curvature.shape[:2] != outputs.shape[:2] or curvature.shape[3] != outputs.shape[2]:
            raise TaskError(f"output_curvature must return factors [B, positions, K, D] for outputs {tuple(outputs.shape)}; "
                            f"got {tuple(curvature.shape)}.")
        cotangents = _slots(outputs, curvature.detach())
    else:
        cotangents = curvature  # the task's iterator of sketched cotangents
    n = outputs.shape[0]
    offsets = coordinate_ranges(subspace)
    tensors = [output for _, _, output in calls]
    row_bytes = n * subspace.dim * torch.finfo(dtype).bits // 8
    for chunk in _chunks(cotangents, max(1, min(cotangent_chunk, _CHUNK_BYTES // max(row_bytes, 1)))):
        # one vmapped backward pass for a chunk of cotangents: on small models the per-pass overhead is most of the cost
        batched = len(chunk) > 1
        stacked = torch.stack(chunk) if batched else chunk[0]
        grads = torch.autograd.grad(outputs, tensors, stacked, retain_graph=True, allow_unused=True, is_grads_batched=batched)
        rows = torch.zeros(len(chunk), n, subspace.dim, dtype=dtype, device=subspace.device)
        for (module, inputs, _), grad in zip(calls, grads):
            if grad is None:
                continue
            g = grad.reshape(len(chunk), n, -1, grad.shape[-1]).to(dtype)
            names = owners[module]
            if "weight" in names:
                lo, hi = offsets[names["weight"]]
                x = inputs.reshape(n, -1, inputs.shape[-1]).to(dtype)
                rows[:, :, lo:hi] += torch.einsum("cbto,bti->cboi", g, x).reshape(len(chunk), n, -1)
            if "bias" in names:
                lo, hi = offsets[names["bias"]]
                rows[:, :, lo:hi] += g.sum(dim=2)
        yield from rows


def _add_gram(matrix: torch.Tensor, rows: torch.Tensor, blocks: int = 4) -> None:
    """matrix += rowsᵀ rows (in the rows' dtype, added in the matrix's), computing the upper block triangle only and
    mirroring it: 10 of 16 column blocks' products (torch has no symmetric rank-k update)."""
    edges = [round(i * rows.shape[1] / blocks) for i in range(blocks + 1)]
    for i in range(blocks):
        left = rows[:, edges[i] : edges[i + 1]]
        for j in range(i, blocks):
            product = (left.T @ rows[:, edges[j] : edges[j + 1]]).to(matrix.dtype)
            matrix[edges[i] : edges[i + 1], edges[j] : edges[j + 1]] += product
            if j != i:
                matrix[edges[j] : edges[j + 1], edges[i] : edges[i + 1]] += product.T


def _chunks(items: Iterator[torch.Tensor], size: int) -> Iterator[list[torch.Tensor]]:
    chunk: list[torch.Tensor] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _slots(outputs: torch.Tensor, factors: torch.Tensor) -> Iterator[torch.Tensor]:
    """One cotangent per (position, factor) slot that some example has a factor in."""
    present = factors.abs().amax(dim=(0, 3)) > 0  # [positions, K]
    for position, k in present.nonzero().tolist():
        cotangent = torch.zeros_like(outputs)
        cotangent[:, position] = factors[:, position, k]
        yield cotangent


@dataclass
class GaussNewton:
    """The GGN of the mean training loss, as its [p, p] matrix or — while it has fewer rows than coordinates — as its
    rows A ([R, p], scaled so that GGN = AᵀA), which keeps a low-rank GGN exact at R·p memory."""

    matrix: Optional[torch.Tensor] = None
    rows: Optional[torch.Tensor] = None

    def dense(self) -> torch.Tensor:
        """The [p, p] matrix."""
        return self.matrix if self.matrix is not None else self.rows.T @ self.rows


def exact_passes(subspace: AttributionSubspace, task, examples: Sequence[Any], batch_size: int) -> int:
    """Backward passes the exact GGN over `examples` takes: the output-curvature factor slots (positions × factors
    some example has) summed over the batches `gauss_newton` forms — counted by the task from the labels when it can
    (`output_curvature_slots`), else those of the first batch, from its factors, times the number of batches."""
    batches = length_batches(task, examples, batch_size)
    count = getattr(task, "output_curvature_slots", None)
    counted = [None] if count is None else [count(subspace.model, task.collate(batch)) for batch in batches]
    if all(slots is not None for slots in counted):
        return sum(counted)
    first = task.collate(batches[0])
    function = TaskFunction(subspace, lambda model, b: task.output_curvature(model, b))
    with torch.no_grad(), evaluation_mode(subspace.model):
        _, factors = function(torch.zeros(subspace.dim, device=subspace.device, dtype=subspace.parameter_dtype), first)
    slots = int((factors.abs().amax(dim=(0, 3)) > 0).sum())
    return slots * len(batches)


def gauss_newton(subspace: AttributionSubspace, task, examples: Sequence[Any], batch_size: int, dtype: torch.dtype = torch.float64,
                 chunk_rows: int = 2048, progress: bool = False, samples: Optional[int] = None, seed: int = 0) -> GaussNewton:
    """The GGN of the mean training loss over `examples`, from per-example output Jacobians (float64 sums).

    Rows are computed in `dtype`; while there are at most p of them they are kept (the GGN is then exactly AᵀA of
    rank <= R), beyond they are gathered `chunk_rows` at a time: each chunk's product AᵀA in `dtype` (a float32
    product of float32 rows adds ~1e-6 relative round-off, no more than the rows carry, at half the cost of float64),
    summed over chunks in a float64 [p, p] matrix so round-off does not grow with the number of rows. With `samples`,
    each batch takes that many sketched passes (`jacobian_rows`): an unbiased estimate instead of the exact matrix.
    """
    generator = torch.Generator().manual_seed(seed)
    p, scale = subspace.dim, len(examples) ** -0.5
    kept: list[torch.Tensor] = []
    kept_rows = 0
    dense = False  # past p rows: the [p, p] matrix is the smaller form, for good
    matrix: Optional[torch.Tensor] = None
    pending: list[torch.Tensor] = []
    pending_rows = 0

    def flush() -> None:
        nonlocal matrix, pending_rows
        if pending:
            block = torch.cat(pending) * scale
            if matrix is None:
                matrix = torch.zeros(p, p, dtype=torch.float64, device=block.device)
            _add_gram(matrix, block)
            pending.clear()
            pending_rows = 0

    for batch in progress_bar(length_batches(task, examples, batch_size), desc="Curvature (exact GGN)", enabled=progress):
        for rows in jacobian_rows(subspace, task, task.collate(batch), dtype=dtype, samples=samples, generator=generator):
            rows = rows[rows.abs().amax(dim=1) > 0]  # examples without a factor in this slot
            if not dense and kept_rows + len(rows) <= p:
                kept.append(rows)
                kept_rows += len(rows)
                continue
            if not dense:
                dense = True
                pending.extend(kept)
                pending_rows += kept_rows
                kept.clear()
            pending.append(rows)
            pending_rows += len(rows)
            if pending_rows >= chunk_rows:
                flush()
    flush()
    if not dense:
        return GaussNewton(rows=torch.cat(kept).to(torch.float64) * scale if kept else torch.zeros(0, p, dtype=torch.float64, device=subspace.device))
    return GaussNewton(matrix=matrix)


def exact_ggn(subspace: AttributionSubspace, task, examples: Sequence[Any], batch_size: int, dtype: torch.dtype = torch.float64,
              chunk_rows: int = 2048, progress: bool = False, samples: Optional[int] = None, seed: int = 0) -> torch.Tensor:
    """The [p, p] GGN of the mean training loss over `examples` (`gauss_newton`, made dense)."""
    return gauss_newton(subspace, task, examples, batch_size, dtype, chunk_rows, progress, samples, seed).dense()
