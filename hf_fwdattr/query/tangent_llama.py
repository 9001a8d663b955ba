"""The Llama decoder stack carrying every direction's tangent by hand, with its primal computed once.

The batched JVP (`LoRABatchEngine.tangents`) runs a query batch once per direction. Layer by layer
(`tangent_layers`), the linear layers, RMS norms and attention already compute their primal on one copy, but they
pass dual tensors between them whose primal is repeated for every copy, so every operation in between (residual adds,
SiLU·up, rotary embeddings, reshapes) runs its primal once per copy and forward AD's bookkeeping on top. For
transformers' `LlamaModel` (Llama, and the models that reuse its classes), `llama_stack_forward` replaces the whole
decoder stack's forward: hidden states travel as (primal of one copy [rows, length, hidden], tangents [copies, rows,
length, hidden]), each layer's glue is written out

    residual:  (x + y, x_t + y_t)          SiLU·up:  (σ(g) g u,  silu'(g) g_t u + silu(g) u_t)
    rotary:    linear in q and k, so the tangents rotate as the primal does

and only the final hidden states become a dual tensor again (for the output head and the task's log-likelihood,
which forward AD carries as before). `llama_stack_plan` recognises a stack it can write out, strictly: anything else
(another attention, activation, a cache, extra outputs, training mode) keeps the layer-by-layer path, which is exact too.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.autograd.forward_ad as forward_ad
import torch.nn.functional as F
from torch import nn

from .tangent_layers import attention_pair, first_copy, linear_pair, replicate, rms_norm_epsilon, rms_norm_pair

Pair = Callable[[torch.Tensor, Optional[torch.Tensor]], tuple[torch.Tensor, Optional[torch.Tensor]]]

_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")


@dataclass
class _LayerPlan:
    layer: nn.Module
    attention_norm: float  # ε of input_layernorm
    mlp_norm: float  # ε of post_attention_layernorm
    rotary: Callable  # the modeling module's apply_rotary_pos_emb
    # the layer's submodules and constants, looked up once (attribute lookups on modules cost on every readout)
    projections: tuple = field(init=False)  # q, k, v, o, gate, up, down
    norms: tuple = field(init=False)  # input_layernorm, post_attention_layernorm
    head_dim: int = field(init=False)
    scaling: float = field(init=False)
    groups: int = field(init=False)

    def __post_init__(self) -> None:
        attention, mlp = self.layer.self_attn, self.layer.mlp
        self.projections = tuple(getattr(attention, name) for name in _PROJECTIONS) + tuple(getattr(mlp, name) for name in _MLP)
        self.norms = (self.layer.input_layernorm, self.layer.post_attention_layernorm)
        self.head_dim, self.scaling, self.groups = attention.head_dim, attention.scaling, attention.num_key_value_groups


@dataclass
class StackPlan:
    """A Llama decoder stack `llama_stack_forward` can write out, and the ε of its norms."""

    stack: nn.Module
    layers: list[_LayerPlan]
    norm: float
    projections: list[nn.Module] = field(init=False)  # every layer's projections: each needs a (primal, tangents) map

    def __post_init__(self) -> None:
        self.projections = [module for plan in self.layers for module in plan.projections]


def _is_silu(module: nn.Module) -> bool:
    return type(module) is nn.SiLU or type(module).__name__ == "SiLUActivation"


def llama_stack_plan(model: nn.Module) -> Optional[StackPlan]:
    """The model's `LlamaModel` decoder stack if its tangents can be written out by hand, else None.

    Recognised by structure: transformers' Llama classes with an `nn.Embedding`, SiLU MLPs, RMS norms (checked by
    what they compute) and no tensor parallelism. Whether each projection has a (primal, tangents) map is the
    caller's to check (`StackPlan.projections`): it depends on the adapters active at the time.
    """
    for stack in model.modules():
        if type(stack).__name__ != "LlamaModel" or not type(stack).__module__.startswith("transformers."):
            continue
        if type(stack.embed_tokens) is not nn.Embedding:
            return None
        config = stack.config
        if getattr(config, "pretraining_tp", 1) not in (None, 1) or config.hidden_act != "silu":
            return None
        norm = rms_norm_epsilon(stack.norm)
        layers = []
        for layer in stack.layers[: config.num_hidden_layers]:
            attention, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
            if type(layer).__name__ != "LlamaDecoderLayer" or attention is None or mlp is None:
                return None
            if type(attention).__name__ != "LlamaAttention" or type(mlp).__name__ != "LlamaMLP" or not _is_silu(mlp.act_fn):
                return None
            epsilons = rms_norm_epsilon(layer.input_layernorm), rms_norm_epsilon(layer.post_attention_layernorm)
            rotary = getattr(sys.modules[type(attention).__module__], "apply_rotary_pos_emb", None)
            if None in epsilons or rotary is None:
                return None
            layers.append(_LayerPlan(layer, epsilons[0], epsilons[1], rotary))
        if norm is None or not layers:
            return None
        return StackPlan(stack, layers, norm)
    return None


def _add(a: Optional[torch.Tensor], b: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return b if a is None else a if b is None else a + b


def _silu_times(gate: torch.Tensor, gate_t: Optional[torch.Tensor], up: torch.Tensor, up_t: Optional[torch.Tensor]):
    """(silu(g) u, its tangent): d silu(g) = σ(g)(1 + g(1 − σ(g))) g_t."""
    sigma = torch.sigmoid(gate)
    activated = gate * sigma
    tangent = None
    if gate_t is not None:
        tangent = gate_t * (sigma * (1 + gate * (1 - sigma)) * up)
    if up_t is not None:
        tangent = up_t * activated if tangent is None else torch.addcmul(tangent, up_t, activated)
    return activated * up, tangent


def _heads(x: torch.Tensor, head_dim: int, leading: int) -> torch.Tensor:
    """[..., length, heads·head_dim] → [..., heads, length, head_dim], `leading` dimensions before length."""
    x = x.reshape(*x.shape[:-1], -1, head_dim)
    return x.transpose(leading, leading + 1)


def _rotate_tangents(rotary: Callable, q_t: Optional[torch.Tensor], k_t: Optional[torch.Tensor], cos: torch.Tensor,
                     sin: torch.Tensor) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Rotary embeddings are linear in q and k: their tangents ([copies, rows, heads, length, head_dim]) turn as the
    primal does (cos and sin [rows, length, head_dim] broadcast over the copies)."""
    if q_t is not None and k_t is not None:
        return rotary(q_t, k_t, cos, sin)
    if q_t is not None:
        return rotary(q_t, q_t, cos, sin)[0], None
    if k_t is not None:
        return None, rotary(k_t, k_t, cos, sin)[1]
    return None, None


def _layer(plan: _LayerPlan, pairs: dict[nn.Module, Pair], x: torch.Tensor, x_t: Optional[torch.Tensor],
           position: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj = (pairs[module] for module in plan.projections)
    attention_norm, mlp_norm = plan.norms
    h, h_t = rms_norm_pair(attention_norm.weight, plan.attention_norm, x, x_t)
    (q, q_t), (k, k_t), (v, v_t) = q_proj(h, h_t), k_proj(h, h_t), v_proj(h, h_t)
    head_dim = plan.head_dim
    q, k, v = (_heads(t, head_dim, 1) for t in (q, k, v))  # [rows, heads, length, head_dim]
    q_t, k_t, v_t = (None if t is None else _heads(t, head_dim, 2) for t in (q_t, k_t, v_t))
    cos, sin = position
    if q_t is not None and k_t is not None:  # primal and tangents turned in one call (cos and sin broadcast)
        turned_q, turned_k = plan.rotary(torch.cat((q.unsqueeze(0), q_t)), torch.cat((k.unsqueeze(0), k_t)), cos, sin)
        q, q_t, k, k_t = turned_q[0], turned_q[1:], turned_k[0], turned_k[1:]
    else:
        q, k = plan.rotary(q, k, cos, sin)
        q_t, k_t = _rotate_tangents(plan.rotary, q_t, k_t, cos, sin)
    out, out_t = attention_pair(q, q_t, k, k_t, v, v_t, mask, plan.scaling, plan.groups)
    out = out.transpose(1, 2).reshape(*x.shape[:-1], -1)
    if q_t is None and k_t is None and v_t is None:
        out_t = None
    else:
        out_t = out_t.transpose(2, 3).reshape(out_t.shape[0], *x.shape[:-1], -1)
    y, y_t = o_proj(out, out_t)
    x, x_t = x + y, _add(x_t, y_t)
    h, h_t = rms_norm_pair(mlp_norm.weight, plan.mlp_norm, x, x_t)
    (gate, gate_t), (up, up_t) = gate_proj(h, h_t), up_proj(h, h_t)
    y, y_t = down_proj(*_silu_times(gate, gate_t, up, up_t))
    return x + y, _add(x_t, y_t)


def llama_stack_forward(plan: StackPlan, pairs: dict[nn.Module, Pair], copies: int, original: Callable):
    """A forward for `plan.stack` on `copies` identical copies of a batch: the primal on the first copy, the tangents of
    every copy by hand (`pairs`: each projection's (primal, tangents) map); `original` runs whatever it does not write
    out (a cache, embeddings given as input, extra outputs, training mode)."""
    stack = plan.stack

    def forward(input_ids: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None, cache: Any = None, inputs_embeds: Optional[torch.Tensor] = None,
                use_cache: Optional[bool] = None, **kwargs):
        extra = {name: value for name, value in kwargs.items() if value not in (None, False) and name != "return_dict"}
        if input_ids is None or inputs_embeds is not None or cache is not None or use_cache or extra or stack.training \
                or input_ids.shape[0] % copies or (attention_mask is not None and attention_mask.dim() != 2):
            return original(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                            inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)
        from transformers.modeling_outputs import BaseModelOutputWithPast

        ids = first_copy(input_ids, copies)
        x = F.embedding(ids, stack.embed_tokens.weight, stack.embed_tokens.padding_idx)
        length = ids.shape[1]
        if position_ids is None:
            positions = torch.arange(length, device=ids.device).unsqueeze(0)
        else:
            positions = first_copy(position_ids, copies) if position_ids.shape[0] == input_ids.shape[0] else position_ids
        rotary = stack.rotary_emb
        position = type(rotary).forward(rotary, x, positions)  # its own forward: the engine gives it a dual one
        mask = torch.ones(length, length, dtype=torch.bool, device=ids.device).tril()[None, None]
        if attention_mask is not None:
            mask = mask & first_copy(attention_mask, copies).bool()[:, None, None, :]
        # additive, and shaped as `attention_pair` groups the scores ([rows, kv heads, groups, length, keys]): once for
        # every layer
        mask = torch.zeros(mask.shape, dtype=x.dtype, device=x.device).masked_fill_(~mask, float("-inf")).unsqueeze(2)
        x_t = None
        for layer in plan.layers:
            x, x_t = _layer(layer, pairs, x, x_t, position, mask)
        x, x_t = rms_norm_pair(stack.norm.weight, plan.norm, x, x_t)
        out = replicate(x, copies)
        if x_t is not None:
            out = forward_ad.make_dual(out, x_t.reshape(out.shape))
        return BaseModelOutputWithPast(last_hidden_state=out)

    return forward
