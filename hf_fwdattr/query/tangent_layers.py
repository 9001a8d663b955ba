"""Layers that carry forward-mode tangents by hand, for the batched JVP readout (`LoRABatchEngine.tangents`).

Forward-mode AD in eager PyTorch costs several operations per operation of the forward, and more where an operand
has no tangent (a weight, a mask: its zero tangent is materialised through Python meta functions). The layers that
dominate a transformer are simple enough to write their tangents out: a linear layer's is x_t Wᵀ, attention's is

    dS = scale·(Q_t Kᵀ + Q K_tᵀ),   dP = P ⊙ (dS − rowsum(P ⊙ dS)),   dO = dP V + P V_t,

with P = softmax(scale·Q Kᵀ + mask), and an RMS norm's is w ⊙ r (x_t − x r² mean(x x_t)), r = 1/√(mean(x²) + ε).
`linear_tangent_forward` and `rms_norm_tangent_forward` give those layers such forwards, and `tangent_attention`
registers an attention function with transformers' `AttentionInterface` (the documented way to plug in an
attention kernel) that `attention_with_tangents` selects for the duration. Both fall back to the plain computation
(and forward AD) whenever their inputs carry no tangent of `torch.autograd.forward_ad` or use a feature they do not
write out (soft-capping, position biases, attention sinks, dropout).
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
import torch.autograd.forward_ad as forward_ad
import torch.nn.functional as F
from torch import nn

from ..estimator.functional import pretrained_models

TANGENT_ATTENTION = "fwdattr_tangent_sdpa"
_UNWRITTEN = ("softcap", "position_bias", "s_aux", "sinks")


def is_linear(module: nn.Module) -> bool:
    """Whether `module` is a plain linear layer: an `nn.Linear`, or transformers' `Conv1D` (GPT-2's, weight [in, out])."""
    if type(module) is nn.Linear:
        return True
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return False
    return type(module) is Conv1D


def linear_tangent_forward(module: nn.Module):
    """A linear layer's forward (`is_linear`) carrying its tangent by hand (x_t Wᵀ): forward AD's numbers, without its
    overhead for a weight that has no tangent."""
    weight = module.weight if type(module) is nn.Linear else module.weight.T  # Conv1D keeps [in, out]

    def forward(x: torch.Tensor) -> torch.Tensor:
        primal, incoming = forward_ad.unpack_dual(x)
        out = F.linear(primal, weight, module.bias)
        if incoming is None:
            return out
        return forward_ad.make_dual(out, F.linear(incoming, weight))

    return forward


def rms_norm_epsilon(module: nn.Module) -> Optional[float]:
    """ε if `module` computes RMS normalisation, w ⊙ x / √(mean(x²) + ε) over the last dimension, else None.

    Recognised by what it computes, not by its class: a leaf module with a 1-D `weight`, no bias and an ε attribute
    (``variance_epsilon`` or ``eps``) whose output on a probe input equals the formula's.
    """
    weight = getattr(module, "weight", None)
    epsilon = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    if next(module.children(), None) is not None or getattr(module, "bias", None) is not None:
        return None
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1 or not weight.is_floating_point() or not isinstance(epsilon, float):
        return None
    generator = torch.Generator().manual_seed(0)
    probe = torch.randn(2, 3, weight.shape[0], generator=generator).to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        try:
            actual = module(probe)
        except Exception:  # not a module of one tensor argument
            return None
        expected = _rms_norm(probe, weight, epsilon)[0]
    same = isinstance(actual, torch.Tensor) and actual.shape == expected.shape and torch.allclose(actual, expected, rtol=1e-5, atol=1e-6)
    return epsilon if same else None


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, epsilon: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(w ⊙ x r, x in float32, r) with r = 1/√(mean(x²) + ε), computed in float32 as transformers' RMS norms do."""
    h = x.float()
    r = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + epsilon)
    return weight * (h * r).to(x.dtype), h, r


def rms_norm_tangent_forward(module: nn.Module, epsilon: float):
    """An RMS normalisation forward carrying its tangent by hand: d(w ⊙ x r) = w ⊙ r (x_t − x r² mean(x x_t))."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        primal, incoming = forward_ad.unpack_dual(x)
        out, h, r = _rms_norm(primal, module.weight, epsilon)
        if incoming is None:
            return out
        h_t = incoming.float()
        tangent = module.weight * (r * (h_t - h * (r * r) * (h * h_t).mean(-1, keepdim=True))).to(primal.dtype)
        return forward_ad.make_dual(out, tangent.to(out.dtype))

    return forward


def zero_tangent_outputs(module: nn.Module):
    """The module's forward, its floating-point outputs that carry no tangent given a zero one (e.g. rotary position
    embeddings): forward AD then multiplies them with dual tensors on its plain path, not through zero-tensor meta
    functions in Python."""
    original = type(module).forward

    def dual(value):
        if isinstance(value, torch.Tensor) and value.is_floating_point() and forward_ad.unpack_dual(value).tangent is None:
            return forward_ad.make_dual(value, torch.zeros_like(value))
        if isinstance(value, tuple) and not hasattr(value, "_fields"):
            return tuple(dual(v) for v in value)
        return value

    def forward(*args, **kwargs):
        return dual(original(module, *args, **kwargs))

    return forward


def _expand_heads(tensor: Optional[torch.Tensor], groups: int) -> Optional[torch.Tensor]:
    """Grouped-query attention: each key/value head serves `groups` query heads."""
    if tensor is None or groups == 1:
        return tensor
    return tensor.repeat_interleave(groups, dim=1)


def _sdpa_attention():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward


def tangent_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: Optional[torch.Tensor], dropout: float = 0.0, scaling: Optional[float] = None,
                      is_causal: Optional[bool] = None, **kwargs):
    """Scaled dot-product attention (transformers' attention-function contract) whose forward-AD tangent is written out.

    Inputs are [batch, heads, length, head_dim]; the output is [batch, length, heads, head_dim] and no attention weights.
    """
    q, q_t = forward_ad.unpack_dual(query)
    k, k_t = forward_ad.unpack_dual(key)
    v, v_t = forward_ad.unpack_dual(value)
    unwritten = dropout or any(kwargs.get(name) is not None for name in _UNWRITTEN)
    if (q_t is None and k_t is None and v_t is None) or unwritten:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.MATH):  # the kernel forward AD goes through
            return _sdpa_attention()(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                     is_causal=is_causal, **kwargs)
    if isinstance(attention_mask, torch.Tensor):
        attention_mask = forward_ad.unpack_dual(attention_mask).primal  # a mask has no tangent (it may carry a zero one)
    groups = getattr(module, "num_key_value_groups", 1) or 1
    k, k_t, v, v_t = (_expand_heads(t, groups) for t in (k, k_t, v, v_t))
    length, keys = q.shape[-2], k.shape[-2]
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if attention_mask is None:
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        if causal and length > 1:
            allowed = torch.ones(length, keys, dtype=torch.bool, device=q.device).tril(diagonal=keys - length)
            scores = scores.masked_fill(~allowed, float("-inf"))
    elif attention_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attention_mask[..., :keys], float("-inf"))
    else:
        scores = scores + attention_mask[..., :keys]
    weights = torch.softmax(scores.float(), dim=-1).nan_to_num(0.0).to(q.dtype)  # a query with no key to attend to reads 0
    out = torch.matmul(weights, v)
    d_scores = None
    if q_t is not None:
        d_scores = torch.matmul(q_t, k.transpose(-1, -2))
    if k_t is not None:
        term = torch.matmul(q, k_t.transpose(-1, -2))
        d_scores = term if d_scores is None else d_scores + term
    tangent = None
    if d_scores is not None:
        d_scores = d_scores * scale
        d_weights = weights * (d_scores - (weights * d_scores).sum(dim=-1, keepdim=True))
        tangent = torch.matmul(d_weights, v)
    if v_t is not None:
        term = torch.matmul(weights, v_t)
        tangent = term if tangent is None else tangent + term
    return forward_ad.make_dual(out.transpose(1, 2).contiguous(), tangent.transpose(1, 2).contiguous()), None


def _register() -> bool:
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError:  # transformers without pluggable attention: forward AD carries attention as it is
        return False
    AttentionInterface.register(TANGENT_ATTENTION, tangent_attention)
    AttentionMaskInterface.register(TANGENT_ATTENTION, sdpa_mask)
    return True


_REGISTERED = _register()


@contextlib.contextmanager
def attention_with_tangents(model: nn.Module) -> Iterator[None]:
    """Run the model's attention through `tangent_attention` for the duration (transformers models whose attention
    goes through `AttentionInterface`, with 'eager' or 'sdpa' attention; others are left as they are)."""
    switched = []
    if _REGISTERED:
        for module in pretrained_models(model):
            implementation = module.config._attn_implementation
            can_switch = getattr(module, "_can_set_attn_implementation", lambda: True)
            if implementation in ("eager", "sdpa") and can_switch():
                module.set_attn_implementation(TANGENT_ATTENTION)
                switched.append((module, implementation))
    try:
        yield
    finally:
        for module, implementation in switched:
            module.set_attn_implementation(implementation)
