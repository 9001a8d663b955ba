"""Many directions of a LoRA-shaped subspace in one batched forward (DESIGN §5).

When every coordinate of the attribution subspace is a LoRA A or B matrix of PEFT `lora.Linear` layers (a PEFT
LoRA subspace, or the projection subspace's B matrices), moving along a direction changes each such layer by a
rank-r term and nothing else. So many directions run as one ordinary forward: the query batch is repeated once
per direction (rows = directions × queries) and each LoRA layer gives the rows of direction d their own update,
batched over d; everything else in the model runs once, unchanged, on the larger batch.

- `LoRABatchEngine.values`: f at θ* + δ_d for every d (difference and removal readouts), under
  `torch.inference_mode`; layer output = base(x) + s·(x (A + a_d)ᵀ)(B + b_d)ᵀ.
- `LoRABatchEngine.tangents`: the exact directional derivatives ∇fᵀu_d. Each LoRA layer writes its tangent out
  by hand, s·[(x a_dᵀ) Bᵀ + (x Aᵀ) b_dᵀ] plus the incoming tangent through its effective weight W + s·BA; plain
  linear layers and attention carry theirs by hand too (`tangent_layers`); the rest of the network carries it by
  forward-mode AD (`torch.autograd.forward_ad` under `no_grad`). No backward pass and no `torch.func` transform runs.
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import torch
import torch.autograd.forward_ad as forward_ad
import torch.nn.functional as F
from torch import nn

from ..errors import ReadoutError
from ..estimator.functional import pretrained_models
from ..estimator.subspace import AttributionSubspace
from .tangent_llama import StackPlan, llama_stack_forward, llama_stack_plan
from .tangent_layers import (
    attention_with_tangents,
    first_copy,
    is_linear,
    linear_pair,
    linear_tangent_forward,
    linear_weight,
    per_copy,
    replicate,
    rms_norm_epsilon,
    rms_norm_tangent_forward,
    zero_tangent_outputs,
)

_MATRICES = ("lora_A", "lora_B")


@dataclass
class _LoRACoordinates:
    """Where one LoRA layer's A and B sit in the flat subspace vector (None: not part of the subspace)."""

    module: nn.Module
    adapter: str
    a: Optional[slice]
    b: Optional[slice]
    a_columns: int = 0  # A is [r, in]: in
    b_columns: int = 0  # B is [out, r]: r


def _lora_linear_class():
    try:
        from peft.tuners.lora.layer import Linear
    except ImportError:  # PEFT not installed: no LoRA layers to batch
        return None
    return Linear


def _has_variant(module: nn.Module, adapter: str) -> bool:
    if adapter in (getattr(module, "lora_variant", None) or {}):
        return True
    if (getattr(module, "use_dora", None) or {}).get(adapter, False):
        return True
    if (getattr(module, "lora_bias", None) or {}).get(adapter, False):
        return True
    return False


def lora_coordinates(subspace: AttributionSubspace) -> tuple[Optional[list[_LoRACoordinates]], Optional[str]]:
    """The subspace's LoRA layers, or (None, why not) when some coordinate is not a plain LoRA A/B weight."""
    linear = _lora_linear_class()
    if linear is None:
        return None, "PEFT is not installed"
    layers: dict[nn.Module, _LoRACoordinates] = {}
    offset = 0
    for name, numel in zip(subspace.names, subspace.numels):
        span = slice(offset, offset + numel)
        offset += numel
        parts = name.split(".")
        if len(parts) < 4 or parts[-1] != "weight" or parts[-3] not in _MATRICES:
            return None, f"{name!r} is not a LoRA A or B weight"
        module = subspace.model.get_submodule(".".join(parts[:-3]))
        adapter = parts[-2]
        if not isinstance(module, linear):
            return None, f"{name!r} belongs to a {type(module).__name__}, not a PEFT LoRA Linear"
        if _has_variant(module, adapter):
            return None, f"{name!r} belongs to a LoRA variant (DoRA, LoRA bias, ...), which is not a plain rank-r update"
        weight = getattr(module.get_base_layer(), "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point():
            return None, f"the layer of {name!r} has no plain floating-point base weight (quantized?)"
        entry = layers.setdefault(module, _LoRACoordinates(module, adapter, None, None))
        if entry.adapter != adapter:
            return None, f"the layer of {name!r} holds subspace coordinates of two adapters"
        if parts[-3] == "lora_A":
            entry.a, entry.a_columns = span, module.lora_A[adapter].weight.shape[1]
        else:
            entry.b, entry.b_columns = span, module.lora_B[adapter].weight.shape[1]
    return list(layers.values()), None


def _applies(module: nn.Module, adapter: str) -> bool:
    """Whether the layer's forward uses `adapter` now (active, not merged, adapters enabled)."""
    return not module.disable_adapters and not module.merged and adapter in module.active_adapters and adapter in module.lora_A


def _repeat_batch(batch: Any, copies: int) -> Any:
    """The batch repeated `copies` times along its leading dimension, copy-major (tensors inside dicts, lists, tuples)."""
    if isinstance(batch, torch.Tensor):
        return batch.repeat(copies, *([1] * (batch.dim() - 1))) if batch.dim() else batch
    if isinstance(batch, dict):
        return type(batch)({k: _repeat_batch(v, copies) for k, v in batch.items()})
    if isinstance(batch, (list, tuple)):
        return type(batch)(_repeat_batch(v, copies) for v in batch)
    return batch


def _effective_weight(module: nn.Module) -> torch.Tensor:
    """W + Σ s·BA over the layer's active adapters, as [out, in]."""
    weight = module.get_base_layer().weight
    effective = weight.detach() + sum(module.get_delta_weight(name).detach() for name in module.active_adapters if name in module.lora_A)
    return effective.T if module.fan_in_fan_out else effective  # GPT-2's Conv1D keeps [in, out]


def _weights_state(module: nn.Module) -> tuple:
    """What the layer's forward and effective weight depend on: whether adapters run (enabled, not merged), the active
    adapters, the tensors' identities and in-place versions, and the scalings. Read through the modules' own
    registries (`_modules`, `_parameters`): it runs for every layer on every readout."""
    lora_a, lora_b = module._modules["lora_A"]._modules, module._modules["lora_B"]._modules
    names = tuple(name for name in module.active_adapters if name in lora_a)
    base = module
    while "base_layer" in base._modules:  # `get_base_layer`, without attribute misses
        base = base._modules["base_layer"]
    weight = base._parameters.get("weight")
    tensors = (base.weight if weight is None else weight,
               *(matrices[name]._parameters["weight"] for name in names for matrices in (lora_a, lora_b)))
    return (module.disable_adapters, module.merged, names, tuple(map(id, tensors)), tuple(t._version for t in tensors),
            tuple(module.scaling[name] for name in names))


class LoRABatchEngine:
    """Evaluates a task method for many directions of a LoRA-shaped subspace in one batched forward.

    Args:
        subspace: the attribution subspace; every coordinate must be a LoRA A or B weight of a PEFT `lora.Linear`
            (`lora_coordinates` says why not otherwise).

    Raises:
        ReadoutError: if the subspace is not LoRA-shaped.
    """

    def __init__(self, subspace: AttributionSubspace):
        layers, reason = lora_coordinates(subspace)
        if layers is None:
            raise ReadoutError(f"The batched LoRA readout needs a subspace of LoRA A/B weights; here {reason}. Use engine='functional'.")
        self.subspace = subspace
        self.layers = layers
        self._effective: dict[nn.Module, tuple[tuple, torch.Tensor]] = {}
        self._plan: Optional[list[tuple[nn.Module, str, Optional[float]]]] = None
        self._stack: Optional[tuple[Optional[StackPlan]]] = None  # (the Llama stack written out, or None), once found
        self._stack_modules: Optional[set[nn.Module]] = None
        self._frozen: Optional[list[nn.Module]] = None
        self._plain_linear: Optional[list[nn.Module]] = None
        self._patches: Optional[tuple] = None  # (key, the forwards of the last batched JVP, its directions' owner, weakly)
        self._lora_modules = {layer.module for layer in layers}
        self._lora_modules_in_order = [layer.module for layer in layers]
        self._models = pretrained_models(subspace.model)  # whose attention the JVP switches to `tangent_attention`

    @staticmethod
    def supports(subspace: AttributionSubspace) -> bool:
        """Whether the subspace is LoRA-shaped (every coordinate a plain LoRA A or B weight)."""
        return lora_coordinates(subspace)[0] is not None

    # ------------------------------------------------------------------ values: f at θ* + δ_c
    def values(self, method: Callable[[nn.Module, Any], torch.Tensor], batch: Any, directions: torch.Tensor,
               scales: torch.Tensor, index: Optional[torch.Tensor], rows: int) -> torch.Tensor:
        """[len(scales), rows, ...]: `method(model, batch)` at θ* + δ_c for each copy c, δ_c = scales[c] · directions[index[c]]
        (index None: copy c takes direction c); `rows` examples in `batch`."""
        copies = len(scales)
        with torch.inference_mode(), self._perturbed(directions, scales, index, rows):
            out = method(self.subspace.model, _repeat_batch(batch, copies))
        return out.reshape(copies, rows, *out.shape[1:])

    @contextlib.contextmanager
    def _perturbed(self, directions: torch.Tensor, scales: torch.Tensor, index: Optional[torch.Tensor], rows: int) -> Iterator[None]:
        count, copies = len(directions), len(scales)
        scales = scales.reshape(copies, 1, 1)
        patched = []
        for layer in self.layers:
            module = layer.module
            if not _applies(module, layer.adapter):
                continue  # the layer ignores the adapter now, so its coordinates change nothing (as θ* + δ would)
            matrices = []
            for span, weight in ((layer.a, module.lora_A[layer.adapter].weight), (layer.b, module.lora_B[layer.adapter].weight)):
                if span is None:
                    matrices.append(weight.expand(copies, *weight.shape))
                    continue
                moved = directions[:, span].reshape(count, *weight.shape)
                moved = moved if index is None else moved[index]
                matrices.append(torch.addcmul(weight, scales.to(weight.dtype), moved.to(weight.dtype)))  # W + s_c · w_c, one pass
            a, b = matrices
            patched.append((module, self._values_forward(module, layer.adapter, a.transpose(1, 2), b.transpose(1, 2), copies * rows)))
        with _patched_forwards(patched):
            yield

    @staticmethod
    def _values_forward(module: nn.Module, adapter: str, a_t: torch.Tensor, b_t: torch.Tensor, batch_rows: int):
        """PEFT's LoRA Linear forward with the adapter's (A, B) replaced by one pair per copy of the batch."""
        copies = a_t.shape[0]
        scaling = module.scaling[adapter]

        def forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            _check_rows(x, batch_rows)
            result = module.base_layer(x, *args, **kwargs)
            dtype = result.dtype
            for name in module.active_adapters:
                if name not in module.lora_A:
                    continue
                h = x.to(module.lora_A[name].weight.dtype)
                if name == adapter:
                    update = torch.bmm(torch.bmm(h.reshape(copies, -1, h.shape[-1]), a_t), b_t)
                    result = result + update.reshape(*result.shape[:-1], update.shape[-1]) * scaling
                else:
                    result = result + module.lora_B[name](module.lora_A[name](module.lora_dropout[name](h))) * module.scaling[name]
            return result.to(dtype)

        return forward

    # ------------------------------------------------------------------ tangents: ∇fᵀu_d
    def tangents(self, method: Callable[[nn.Module, Any], torch.Tensor], batch: Any, directions: torch.Tensor, rows: int) -> torch.Tensor:
        """[len(directions), rows, ...]: the exact directional derivative of `method(model, batch)` at θ* along each row."""
        copies = len(directions)
        model = self.subspace.model
        # forward AD records its tangents outside inference mode (dual tensors there silently lose them); no_grad keeps
        # autograd from recording anything for a backward pass
        with torch.inference_mode(False), torch.no_grad(), forward_ad.dual_level(), attention_with_tangents(self._models, copies), \
                self._tangent_layers(directions, rows):
            out = method(model, _repeat_batch(batch, copies))
            tangent = forward_ad.unpack_dual(out).tangent
        if tangent is None:  # f does not depend on the subspace here
            tangent = torch.zeros_like(out)
        return tangent.reshape(copies, rows, *out.shape[1:])

    def _other_layers(self) -> list[tuple[nn.Module, str, Optional[float]]]:
        """The layers outside the subspace's LoRA layers that the batched JVP gives a forward of their own: linear layers
        and RMS norms carry their tangents by hand, layers without parameters give their outputs zero tangents (the
        rest is left to forward AD). Classified once: the model's structure is that of the subspace."""
        if self._plan is None:
            lora_layers = {layer.module for layer in self.layers}
            plan, skip = [], set()
            for name, module in self.subspace.model.named_modules():
                if any(name.startswith(prefix) for prefix in skip):
                    continue
                if module in lora_layers:
                    skip.add(name + ".")  # its own forward replaces its children's
                    continue
                if is_linear(module):
                    plan.append((module, "linear", None))
                elif not isinstance(module, nn.Embedding) and (epsilon := rms_norm_epsilon(module)) is not None:
                    plan.append((module, "rms_norm", epsilon))
                elif next(module.children(), None) is None and next(module.parameters(), None) is None:
                    plan.append((module, "parameter_free", None))
            self._plan = plan
        return self._plan

    def _effective_weight(self, module: nn.Module) -> torch.Tensor:
        """`_effective_weight`, recomputed only when a weight, the active adapters or a scaling changed."""
        return self._layer_weights(module)[0]

    def _layer_weights(self, module: nn.Module, adapter: Optional[str] = None) -> tuple:
        """(W_eff, s·Aᵀ, s·Bᵀ of `adapter`) as `lora_pair` uses them, recomputed only when a weight, the active adapters
        or a scaling changed (every readout would otherwise pay a few operations per layer for them)."""
        state = (_weights_state(module), adapter)
        cached = self._effective.get(module)
        if cached is None or cached[0] != state:
            effective = _effective_weight(module)
            factors = (None, None)
            if adapter is not None:
                factors = ((module.lora_A[adapter].weight.detach() * module.scaling[adapter]).T.to(effective.dtype),  # [in, r]
                           (module.lora_B[adapter].weight.detach() * module.scaling[adapter]).T.to(effective.dtype))  # [r, out]
            cached = (state, (effective, *factors))
            self._effective[module] = cached
        return cached[1]

    def _stack_plan(self) -> Optional[StackPlan]:
        """The model's Llama decoder stack, if `tangent_llama` can write it out (looked for once)."""
        if self._stack is None:
            self._stack = (llama_stack_plan(self.subspace.model),)
            self._stack_modules = set() if self._stack[0] is None else set(self._stack[0].stack.modules())
        return self._stack[0]

    def _frozen_lora_pair(self, module: nn.Module):
        """A PEFT LoRA layer outside the subspace as a plain linear map (its weight as its forward applies it), or None
        for a LoRA variant, which is not one."""
        if any(_has_variant(module, name) for name in module.active_adapters if name in module.lora_A):
            return None
        base = module.get_base_layer()
        if module.merged or module.disable_adapters:
            weight = base.weight.T if module.fan_in_fan_out else base.weight
        else:
            weight = self._effective_weight(module)
        return functools.partial(linear_pair, weight.detach(), base.bias)

    def _layers_state(self) -> tuple:
        """What the batched JVP's layer maps depend on besides the directions: the state (`_weights_state`) of every LoRA
        layer of the subspace and every frozen LoRA projection of the decoder stack, and which weight and bias tensors
        the plain linear layers hold (their maps keep them; a change in place needs no rebuild)."""
        if self._plain_linear is None:
            self._plain_linear = [module for module, kind, _ in self._other_layers() if kind == "linear"]
        return tuple(_weights_state(module) for module in self._lora_modules_in_order + self._frozen_lora()) + tuple(
            (id(module._parameters.get("weight")), id(module._parameters.get("bias"))) for module in self._plain_linear)

    def _frozen_lora(self) -> list[nn.Module]:
        """The decoder stack's PEFT LoRA projections outside the subspace (found once)."""
        stack = self._stack_plan()
        if self._frozen is None:
            linear = _lora_linear_class()
            self._frozen = [] if stack is None or linear is None else [
                module for module in stack.projections if module not in self._lora_modules and isinstance(module, linear)]
        return self._frozen

    @contextlib.contextmanager
    def _tangent_layers(self, directions: torch.Tensor, rows: int) -> Iterator[None]:
        # a server reads the same directions (sources, a basis) for every query: the layer maps built for them (with
        # each layer's blocks of the directions, copied as the products want them) are kept until the next readout,
        # and reused while the directions (the same memory, unchanged in place), the rows and the weights stay the same.
        # The tensor the directions belong to is only watched (a weak reference): while it lives its memory cannot
        # be reused by another tensor, so an equal key means equal directions.
        owner = directions if directions._base is None else directions._base
        key = (_tensor_identity(directions), rows, self._layers_state())
        if self._patches is None or self._patches[0] != key or self._patches[2]() is not owner:
            self._patches = None  # the old maps' memory is free before the new ones are built
            self._patches = (key, self._tangent_patches(directions, rows), weakref.ref(owner))
        with _patched_forwards(self._patches[1]):
            yield

    def _tangent_patches(self, directions: torch.Tensor, rows: int) -> list:
        """The forwards the batched JVP gives the model's modules for these directions: the Llama decoder stack written
        out whole when it can be, else every LoRA layer, linear layer and RMS norm layer by layer."""
        copies = len(directions)
        batch_rows = copies * rows
        pairs = {}
        for layer in self.layers:
            module = layer.module
            if not _applies(module, layer.adapter):
                continue
            if any(_has_variant(module, name) for name in module.active_adapters if name in module.lora_A):
                raise ReadoutError("A layer with the subspace's adapter also runs a LoRA variant (DoRA, LoRA bias, ...) of another active "
                                   "adapter; the batched JVP writes out plain LoRA layers only. Use engine='functional'.")
            weights = self._layer_weights(module, layer.adapter)
            pairs[module] = lora_pair(module, *weights, *_layer_sides(directions, layer, weights[0].dtype), copies)
        for module, kind, _ in self._other_layers():
            if kind == "linear":
                pairs[module] = functools.partial(linear_pair, linear_weight(module), module.bias)

        def layer_forwards(inside: Optional[bool]) -> list:
            """The layer-by-layer forwards on dual tensors, of the modules inside the decoder stack (or outside; None:
            all)."""
            patched = []
            for module, pair in pairs.items():
                if module in self._lora_modules and (inside is None or (module in self._stack_modules) == inside):
                    patched.append((module, _tangent_forward(pair, copies, batch_rows)))
            for module, kind, epsilon in self._other_layers():
                if inside is not None and (module in self._stack_modules) != inside:
                    continue
                if kind == "linear":
                    patched.append((module, linear_tangent_forward(module, copies)))
                elif kind == "rms_norm":
                    patched.append((module, rms_norm_tangent_forward(module, epsilon, copies)))
                else:
                    patched.append((module, zero_tangent_outputs(module)))
            return patched

        stack = self._stack_plan()
        if stack is not None:
            for module in self._frozen_lora():
                if module not in pairs:
                    pairs[module] = self._frozen_lora_pair(module)
            if not all(pairs.get(module) is not None for module in stack.projections):
                stack = None
        if stack is None:
            return layer_forwards(None)
        # the whole decoder stack by hand; what it hands back to the model's own forward (a cache, extra outputs, ...)
        # runs on the layer-by-layer forwards, patched only then
        original = type(stack.stack).forward.__get__(stack.stack)

        def fallback(**kwargs):
            with _patched_forwards(layer_forwards(True)):
                return original(**kwargs)

        return layer_forwards(False) + [(stack.stack, llama_stack_forward(stack, pairs, copies, fallback))]


def _tensor_identity(tensor: torch.Tensor) -> tuple:
    """Which memory a tensor reads and its in-place version: equal for the same tensor unchanged (and for a view of
    it taken the same way), as long as the tensor owning that memory lives (no other tensor can have it then)."""
    return (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.stride(), tensor.dtype,
            tensor.device, tensor._version)


def lora_pair(module: nn.Module, effective: torch.Tensor, scaled_a_t: torch.Tensor, scaled_b_t: torch.Tensor,
              a_columns: Optional[torch.Tensor], b_columns: Optional[torch.Tensor], copies: int):
    """The LoRA layer as a (primal, tangents) map: the primal x W_effᵀ + bias (W_eff = W + Σ s·BA, the merged weight) of
    one copy's input x [rows, ..., in], and for every direction d the tangent x_t W_effᵀ (the incoming one, [copies,
    rows, ..., in] or None) plus the layer's own s·[(x a_dᵀ) Bᵀ + (x Aᵀ) b_dᵀ]. `scaled_a_t` is s·Aᵀ [in, r] and
    `scaled_b_t` s·Bᵀ [r, out], in W_eff's dtype; `a_columns` [in, copies·r] holds every direction's a_dᵀ side by side
    and `b_columns` [r, copies·out] every b_dᵀ (`_layer_sides`; None: that matrix is not in the subspace), so each term
    is one matrix product for all directions, position-major ([positions, copies, out]) until the tangent is added."""
    dtype = effective.dtype
    bias = module.get_base_layer().bias
    out_features = effective.shape[0]
    rank = scaled_b_t.shape[0]

    def pair(x: torch.Tensor, x_t: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        h = x if x.dtype == dtype else x.to(dtype)
        out = F.linear(h, effective, bias)
        h = h.reshape(-1, h.shape[-1])
        positions = h.shape[0]
        own = None  # [positions, copies·out]
        if a_columns is not None:  # (x a_dᵀ) s·Bᵀ
            own = h.mm(a_columns).view(-1, rank).mm(scaled_b_t).view(positions, -1)
        if b_columns is not None:  # (x s·Aᵀ) b_dᵀ
            moved = h.mm(scaled_a_t)
            own = moved.mm(b_columns) if own is None else torch.addmm(own, moved, b_columns)
        own = own.view(positions, copies, out_features).transpose(0, 1)  # [copies, positions, out], a view
        if x_t is None:
            tangent = own.contiguous()
        else:
            incoming = x_t if x_t.dtype == dtype else x_t.to(dtype)
            tangent = incoming.reshape(copies, positions, -1).matmul(effective.t()).add_(own)
        tangent = tangent.view(copies, *x.shape[:-1], out_features)
        if out.dtype != x.dtype:
            out, tangent = out.to(x.dtype), tangent.to(x.dtype)
        return out, tangent

    return pair


def _layer_sides(directions: torch.Tensor, layer: _LoRACoordinates, dtype: torch.dtype) -> tuple:
    """One layer's blocks of every direction as `lora_pair` multiplies them: a_columns [in, copies·r] (column d·r + j is
    row j of direction d's A block) and b_columns [r, copies·out] (column d·out + o is row o of direction d's B block);
    None for a matrix outside the subspace."""
    return tuple(None if span is None else directions[:, span].to(dtype).reshape(-1, columns).t().contiguous()
                 for span, columns in ((layer.a, layer.a_columns), (layer.b, layer.b_columns)))


def _tangent_forward(pair, copies: int, batch_rows: int):
    """A LoRA layer's forward on dual tensors through its `lora_pair`: the primal on the first copy of the batch,
    repeated (every copy's primal is θ*'s)."""

    def forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        _check_rows(x, batch_rows)
        primal, incoming = forward_ad.unpack_dual(x)
        out, tangent = pair(first_copy(primal, copies), None if incoming is None else per_copy(incoming, copies))
        return forward_ad.make_dual(replicate(out, copies), tangent.reshape(*primal.shape[:-1], tangent.shape[-1]))

    return forward


def _check_rows(x: torch.Tensor, batch_rows: int) -> None:
    if x.dim() < 2 or x.shape[0] != batch_rows:
        raise ReadoutError(
            f"A LoRA layer saw inputs of shape {tuple(x.shape)}, not {batch_rows} batch rows first (directions × queries); "
            "the batched LoRA readout needs batch-first layers. Use engine='functional'."
        )


@contextlib.contextmanager
def _patched_forwards(patched: list) -> Iterator[None]:
    """Give each module an instance-level `forward` for the duration (nn.Module.__call__ calls it)."""
    try:
        for module, forward in patched:
            module.__dict__["forward"] = forward  # what nn.Module.__setattr__ does for a plain attribute, without its checks
        yield
    finally:
        for module, _ in patched:
            module.__dict__.pop("forward", None)
