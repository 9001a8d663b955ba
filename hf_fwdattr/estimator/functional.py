"""Running a task with substituted subspace parameters, and making forward-mode AD possible.

`TaskFunction` evaluates a task method at θ* + δ through `torch.func.functional_call`, so
gradients, curvature products and readouts can be composed with `torch.func` transforms without
touching the model's own parameters.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch
from torch import nn

from .subspace import AttributionSubspace

_FORWARD_AD_ATTENTION = ("eager", "sdpa")


class _TaskCall(nn.Module):
    """Holds the model as a submodule so that `functional_call` can swap its parameters while any task method runs."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, method: Callable[[nn.Module, Any], torch.Tensor], batch: Any) -> torch.Tensor:
        return method(self.model, batch)


class TaskFunction:
    """Task methods as functions of a flat subspace perturbation δ (parameters θ* + δ).

    Args:
        subspace: the attribution subspace.
        method: a bound task method, e.g. ``task.train_loss`` or ``task.measurement``.
    """

    def __init__(self, subspace: AttributionSubspace, method: Callable[[nn.Module, Any], torch.Tensor]):
        self.subspace = subspace
        self.method = method
        self._call = _TaskCall(subspace.model)

    def __call__(self, delta: torch.Tensor, batch: Any) -> torch.Tensor:
        params = {f"model.{n}": p for n, p in self.subspace.parameters_at(delta).items()}
        return torch.func.functional_call(self._call, params, (self.method, batch), strict=False)

    def with_parameters(self, params: dict[str, torch.Tensor], batch: Any) -> torch.Tensor:
        """Evaluate with explicit parameter tensors (name → tensor, subspace names)."""
        prefixed = {f"model.{n}": p for n, p in params.items()}
        return torch.func.functional_call(self._call, prefixed, (self.method, batch), strict=False)


def pretrained_models(model: nn.Module) -> list[nn.Module]:
    """The transformers models inside `model` (itself included) whose attention implementation can be switched."""
    found = []
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation") and hasattr(module, "set_attn_implementation"):
            found.append(module)
    return found


@contextlib.contextmanager
def differentiable_attention(model: nn.Module, forward_mode: bool = True) -> Iterator[None]:
    """Make attention differentiable (in forward mode too, if asked) without changing the model's outputs.

    A transformers model whose attention implementation is neither 'eager' nor 'sdpa' (e.g.
    flash-attention-2, flex, which lack forward-mode AD and, for flex on CPU, backward) is switched to
    'sdpa' for the duration. With `forward_mode`, SDPA also runs its math kernel: the fused flash /
    memory-efficient kernels have no forward-mode AD. All compute the same attention, so outputs
    agree to floating-point rounding.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    switched = []
    for module in pretrained_models(model):
        implementation = module.config._attn_implementation
        if implementation not in _FORWARD_AD_ATTENTION:
            module.set_attn_implementation("sdpa")
            switched.append((module, implementation))
    try:
        with sdpa_kernel(SDPBackend.MATH) if forward_mode else contextlib.nullcontext():
            yield
    finally:
        for module, implementation in switched:
            module.set_attn_implementation(implementation)


def _modules(model: nn.Module) -> list[nn.Module]:
    """`model.modules()` (each module once) as a list, breadth first: on every readout, the walk through
    `named_modules`' generator per level cost more than the flags it reads."""
    found = [model]
    for module in found:  # the list grows as it is walked
        if module is not None:
            found.extend(module._modules.values())
    return [module for module in dict.fromkeys(found) if module is not None]


# forward hooks that gradient checkpointing (transformers' `enable_input_require_grads`, PEFT) puts on the input embeddings
_INPUT_GRAD_HOOKS = ("make_inputs_require_grads", "make_inputs_require_grad")


@contextlib.contextmanager
def evaluation_mode(model: nn.Module) -> Iterator[None]:
    """Put the model in eval mode (no dropout) and restore each module's training flag afterwards.

    A model prepared for gradient checkpointing carries a hook that makes the embeddings' output require grad; it is
    needed only while checkpointed training runs (eval mode turns checkpointing off) and fails inside `torch.func`
    transforms, so it is taken off for the duration.
    """
    modules = _modules(model)  # one walk: it runs on every readout
    removed = [(module, key, hook) for module in modules if module._forward_hooks
               for key, hook in list(module._forward_hooks.items()) if getattr(hook, "__name__", None) in _INPUT_GRAD_HOOKS]
    if not removed and not any(module.training for module in modules):  # already in eval mode (a pipeline's model)
        yield
        return
    flags = {module: module.training for module in modules}
    for module, key, _ in removed:
        del module._forward_hooks[key]
    model.eval()
    try:
        yield
    finally:
        for module, flag in flags.items():
            module.training = flag
        for module, key, hook in removed:
            module._forward_hooks[key] = hook
