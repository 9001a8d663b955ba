"""Per-example and per-document gradients in the attribution subspace.

Two exact methods:

- ``linear_hooks``: when every subspace parameter is the weight or bias of an `nn.Linear` (LoRA A/B,
  projection B, MLPs), one batched forward and backward gives every example's gradient: for a
  linear layer the per-example weight gradient is Σ_t δ_t x_tᵀ over the example's positions, built
  from the layer's inputs x and output gradients δ captured by hooks.
- ``loop``: one backward per example; works for any parameter.

A document's gradient is the sum of its examples' (chunks') gradients.
"""

from __future__ import annotations

from enum import Enum
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from ..errors import TaskError
from ..progress import progress_bar
from .documents import DocumentSet, length_order
from .functional import TaskFunction, differentiable_attention, evaluation_mode
from .subspace import AttributionSubspace


class GradientMethod(str, Enum):
    """How per-example gradients are computed."""

    AUTO = "auto"
    LINEAR_HOOKS = "linear_hooks"
    LOOP = "loop"


def linear_owners(subspace: AttributionSubspace) -> Optional[dict[nn.Module, dict[str, str]]]:
    """Map each owning `nn.Linear` to {"weight"|"bias": parameter name}, or None if some parameter is not a Linear's."""
    owners: dict[nn.Module, dict[str, str]] = {}
    for name in subspace.names:
        module_path, _, attr = name.rpartition(".")
        module = subspace.model.get_submodule(module_path) if module_path else subspace.model
        if not isinstance(module, nn.Linear) or attr not in ("weight", "bias"):
            return None
        owners.setdefault(module, {})[attr] = name
    return owners


def resolve_gradient_method(subspace: AttributionSubspace, method: GradientMethod | str = GradientMethod.AUTO) -> GradientMethod:
    """The method `example_gradients` will use for this subspace."""
    method = GradientMethod(method)
    if method is GradientMethod.AUTO:
        return GradientMethod.LINEAR_HOOKS if linear_owners(subspace) is not None else GradientMethod.LOOP
    if method is GradientMethod.LINEAR_HOOKS and linear_owners(subspace) is None:
        raise TaskError("method='linear_hooks' needs every subspace parameter to belong to an nn.Linear; use 'loop'.")
    return method


def coordinate_ranges(subspace: AttributionSubspace) -> dict[str, tuple[int, int]]:
    """Each subspace parameter's [start, end) range in the flat coordinate vector, by name."""
    ranges, start = {}, 0
    for name, count in zip(subspace.names, subspace.numels):
        ranges[name] = (start, start + count)
        start += count
    return ranges


def leaf_parameters(subspace: AttributionSubspace, delta: Optional[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The subspace parameters at θ* (+ `delta`) as fresh leaves that require grad, for one backward pass."""
    if delta is None:
        params = subspace.base
    else:
        params = subspace.parameters_at(delta.to(subspace.device))
    return {n: p.detach().clone().requires_grad_(True) for n, p in params.items()}


def _hooked_gradients(function: TaskFunction, batch: Any, n_examples: int, delta, dtype) -> torch.Tensor:
    subspace = function.subspace
    owners = linear_owners(subspace)
    per_example = {n: None for n in subspace.names}

    def accumulate(name: str, value: torch.Tensor) -> None:
        per_example[name] = value if per_example[name] is None else per_example[name] + value

    def forward_hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        if not output.requires_grad:
            return
        inputs = args[0].detach()
        if inputs.shape[0] != n_examples:
            raise TaskError(
                f"A linear layer saw a leading dimension of {inputs.shape[0]} for a batch of {n_examples} examples; "
                "per-example gradients by hooks need batch-first layers. Use method='loop'."
            )
        names = owners[module]

        def on_grad(grad_output: torch.Tensor) -> None:
            # half-precision models: the sums over positions accumulate in float32, not in the model's dtype
            g = grad_output.reshape(n_examples, -1, grad_output.shape[-1]).to(torch.promote_types(grad_output.dtype, torch.float32))
            if "weight" in names:
                x = inputs.reshape(n_examples, -1, inputs.shape[-1]).to(g.dtype)
                accumulate(names["weight"], torch.einsum("bto,bti->boi", g, x))
            if "bias" in names:
                accumulate(names["bias"], g.sum(dim=1))

        output.register_hook(on_grad)

    handles = [module.register_forward_hook(forward_hook) for module in owners]
    try:
        leaves = leaf_parameters(subspace, delta)
        values = function.with_parameters(leaves, batch)
        if values.shape != (n_examples,):
            raise TaskError(f"The task returned shape {tuple(values.shape)} for {n_examples} examples; expected [{n_examples}].")
        torch.autograd.grad(values.sum(), list(leaves.values()), allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()
    parts = []
    for name, shape in zip(subspace.names, subspace.shapes):
        value = per_example[name]
        parts.append(torch.zeros(n_examples, shape.numel(), dtype=dtype, device=subspace.device) if value is None else value.reshape(n_examples, -1).to(subspace.device, dtype))
    return torch.cat(parts, dim=1)


def _looped_gradients(function: TaskFunction, collate, examples, delta, dtype) -> torch.Tensor:
    subspace = function.subspace
    rows = []
    for example in examples:
        leaves = leaf_parameters(subspace, delta)
        value = function.with_parameters(leaves, collate([example]))
        if value.numel() != 1:
            raise TaskError(f"The task returned {value.numel()} values for one example; expected 1.")
        grads = torch.autograd.grad(value.sum(), list(leaves.values()), allow_unused=True)
        rows.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1).to(subspace.device, dtype) for g, p in zip(grads, leaves.values())]))
    return torch.stack(rows)


def example_gradients(
    subspace: AttributionSubspace,
    method_fn: Callable[[nn.Module, Any], torch.Tensor],
    collate: Callable[[Sequence[Any]], Any],
    examples: Sequence[Any],
    delta: Optional[torch.Tensor] = None,
    method: GradientMethod | str = GradientMethod.AUTO,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Gradients of `method_fn` (e.g. ``task.train_loss``) for each example, shape [len(examples), dim].

    Evaluated at θ* + `delta` (θ* when None), in eval mode, returned in `dtype`.
    """
    function = TaskFunction(subspace, method_fn)
    with evaluation_mode(subspace.model), differentiable_attention(subspace.model, forward_mode=False), torch.enable_grad():
        if resolve_gradient_method(subspace, method) is GradientMethod.LINEAR_HOOKS:
            return _hooked_gradients(function, collate(list(examples)), len(examples), delta, dtype)
        return _looped_gradients(function, collate, examples, delta, dtype)


def document_gradients(
    subspace: AttributionSubspace,
    task,
    documents: DocumentSet,
    batch_size: int = 16,
    delta: Optional[torch.Tensor] = None,
    method: GradientMethod | str = GradientMethod.AUTO,
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
    indices: Optional[Sequence[int]] = None,
) -> torch.Tensor:
    """g_b = ∇ L_b for each document (sum over its chunks), shape [n_documents, dim].

    With `indices`, only those documents' gradients are computed (rows in that order).
    """
    rows = list(range(len(documents))) if indices is None else list(indices)
    position = {doc: row for row, doc in enumerate(rows)}
    # chunks of similar length share a batch (less padding); each lands on its document's row whatever its batch
    chunk_ids = length_order(task, documents.examples, [i for i, doc in enumerate(documents.example_document) if doc in position])
    out = torch.zeros(len(rows), subspace.dim, dtype=dtype, device=subspace.device)
    for start in progress_bar(range(0, len(chunk_ids), batch_size), desc="Document gradients", enabled=progress):
        chunk = chunk_ids[start : start + batch_size]
        grads = example_gradients(subspace, task.train_loss, task.collate, [documents.examples[i] for i in chunk], delta, method, dtype)
        target = torch.tensor([position[documents.example_document[i]] for i in chunk], device=out.device)
        out.index_add_(0, target, grads.to(out.device))
    return out


def query_gradients(subspace: AttributionSubspace, task, queries: Sequence[Any], method=GradientMethod.AUTO, dtype=torch.float32) -> torch.Tensor:
    """∇ f_q for each query example by backpropagation, shape [n_queries, dim].

    The classical (backward-based) readout computes scores as these gradients times the responses;
    the library's own readout never calls this.
    """
    return example_gradients(subspace, task.measurement, task.collate, queries, None, method, dtype)
