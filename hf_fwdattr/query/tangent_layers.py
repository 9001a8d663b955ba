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

The batched readout runs the same query batch once per direction, so every copy of the batch has the same primal
(θ*'s forward): given `copies`, these layers compute their primal on the first copy's rows only and repeat it,
which leaves a JVP direction paying for its tangent, not for a forward too.
"""

from __future__ import annotations

import contextlib
import contextvars
import weakref
from typing import Iterator, Optional

import torch
import torch.autograd.forward_ad as forward_ad
import torch.nn.functional as F
from torch import nn


TANGENT_ATTENTION = "fwdattr_tangent_sdpa"
_UNWRITTEN = ("softcap", "position_bias", "s_aux", "sinks")


_COPIES: contextvars.ContextVar[int] = contextvars.ContextVar("fwdattr_tangent_copies", default=1)


def first_copy(x: torch.Tensor, copies: int) -> torch.Tensor:
    """The rows of the first of `copies` identical copies of a batch stacked copy-major along dim 0."""
    return x if copies == 1 else x.reshape(copies, -1, *x.shape[1:])[0]


def replicate(x: torch.Tensor, copies: int) -> torch.Tensor:
    """`x` stacked `copies` times along dim 0 (a real copy: forward AD wants a primal with its own memory)."""
    return x if copies == 1 else x.repeat(copies, *([1] * (x.dim() - 1)))


def per_copy(x: torch.Tensor, copies: int) -> torch.Tensor:
    """[copies · rows, ...] as [copies, rows, ...], to broadcast against one copy's primal."""
    return x.reshape(copies, -1, *x.shape[1:])


def is_linear(module: nn.Module) -> bool:
    """Whether `module` is a plain linear layer: an `nn.Linear`, or transformers' `Conv1D` (GPT-2's, weight [in, out])."""
    if type(module) is nn.Linear:
        return True
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return False
    return type(module) is Conv1D


def linear_weight(module: nn.Module) -> torch.Tensor:
    """A linear layer's (`is_linear`) weight as [out, in] (GPT-2's Conv1D keeps [in, out])."""
    return module.weight if type(module) is nn.Linear else module.weight.T


def linear_pair(weight: torch.Tensor, bias: Optional[torch.Tensor], x: torch.Tensor, x_t: Optional[torch.Tensor]):
    """(x Wᵀ + b, x_t Wᵀ): a linear layer on one copy's primal and every copy's tangent (None: no tangent)."""
    return F.linear(x, weight, bias), None if x_t is None else F.linear(x_t, weight)


def linear_tangent_forward(module: nn.Module, copies: int = 1):
    """A linear layer's forward (`is_linear`) carrying its tangent by hand (x_t Wᵀ): forward AD's numbers, without its
    overhead for a weight that has no tangent; with `copies`, the primal of a dual input is computed once."""
    weight = linear_weight(module)

    def forward(x: torch.Tensor) -> torch.Tensor:
        primal, incoming = forward_ad.unpack_dual(x)
        if incoming is None:
            return F.linear(primal, weight, module.bias)
        out, tangent = linear_pair(weight, module.bias, first_copy(primal, copies), incoming)
        return forward_ad.make_dual(replicate(out, copies), tangent)

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
    h = x if x.dtype == torch.float32 else x.float()
    r = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + epsilon)
    normed = h * r
    return weight * (normed if normed.dtype == x.dtype else normed.to(x.dtype)), h, r


def rms_norm_pair(weight: torch.Tensor, epsilon: float, x: torch.Tensor, x_t: Optional[torch.Tensor]):
    """An RMS normalisation on one copy's primal `x` and the tangents `x_t` ([copies, *x.shape] or None):
    d(w ⊙ x r) = w ⊙ r (x_t − x r² mean(x x_t))."""
    out, h, r = _rms_norm(x, weight, epsilon)
    if x_t is None:
        return out, None
    h_t = x_t if x_t.dtype == torch.float32 else x_t.float()
    scaled = weight * r if weight.dtype == torch.float32 else weight.float() * r  # w r and w r³ x: the primal's side, once
    tangent = torch.addcmul(scaled * h_t, scaled * (r * r) * h, (h * h_t).mean(-1, keepdim=True), value=-1.0)
    return out, tangent if tangent.dtype == x.dtype else tangent.to(x.dtype)


def rms_norm_tangent_forward(module: nn.Module, epsilon: float, copies: int = 1):
    """An RMS normalisation forward carrying its tangent by hand (`rms_norm_pair`); with `copies`, the primal of a dual
    input is computed once."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        primal, incoming = forward_ad.unpack_dual(x)
        if incoming is None:
            return _rms_norm(primal, module.weight, epsilon)[0]
        out, tangent = rms_norm_pair(module.weight, epsilon, first_copy(primal, copies), per_copy(incoming, copies))
        return forward_ad.make_dual(replicate(out, copies), tangent.reshape(incoming.shape))

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
    copies = _COPIES.get()
    if q.shape[0] % copies or (attention_mask is not None and attention_mask.shape[0] not in (1, q.shape[0])):
        copies = 1
    if attention_mask is not None and attention_mask.shape[0] > 1:
        attention_mask = first_copy(attention_mask, copies)
    # primal on the first copy of the batch; tangents as [copies, rows, heads, length, head_dim]
    out, tangent = attention_pair(
        first_copy(q, copies), None if q_t is None else per_copy(q_t, copies),
        first_copy(k, copies), None if k_t is None else per_copy(k_t, copies),
        first_copy(v, copies), None if v_t is None else per_copy(v_t, copies),
        attention_mask, scaling if scaling is not None else q.shape[-1] ** -0.5,
        getattr(module, "num_key_value_groups", 1) or 1,
        is_causal if is_causal is not None else getattr(module, "is_causal", True))
    tangent = tangent.expand(copies, *tangent.shape[1:]).reshape(-1, *tangent.shape[2:])
    out = replicate(out, copies)
    return forward_ad.make_dual(out.transpose(1, 2).contiguous(), tangent.transpose(1, 2).contiguous()), None


def attention_pair(q: torch.Tensor, q_t: Optional[torch.Tensor], k: torch.Tensor, k_t: Optional[torch.Tensor], v: torch.Tensor,
                   v_t: Optional[torch.Tensor], attention_mask: Optional[torch.Tensor], scale: float, groups: int = 1,
                   causal: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled dot-product attention on one copy's primal (q [rows, heads, length, head_dim]; k and v with heads/`groups`
    key-value heads) and every copy's tangents ([copies, *shape], or None for none): (out, tangent) in those layouts
    (a tangent of leading size 1 when no input had one).

    `attention_mask`: None (then causal if `causal`), boolean (True: may attend) or additive, broadcastable to the scores
    [rows, heads, length, keys], or with 5 dimensions to the grouped scores [rows, kv heads, groups, length, keys]:
    grouped-query attention stacks the `groups` query heads of each key/value head along the length instead of
    repeating keys and values.
    """
    rows, heads, length, head_dim = q.shape
    kv_heads, keys = k.shape[-3], k.shape[-2]
    stacked = (rows, kv_heads, groups * length, head_dim)  # query head j·groups + g reads key/value head j
    q = q.reshape(stacked)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    scores = scores.view(rows, kv_heads, groups, length, keys)
    mask = attention_mask
    if mask is not None and mask.dim() == 4:
        mask = mask[..., :keys]
        mask = mask.unsqueeze(2) if mask.shape[1] == 1 else mask.reshape(mask.shape[0], kv_heads, groups, *mask.shape[2:])
    elif mask is not None:
        mask = mask[..., :keys]
    if mask is None:
        if causal and length > 1:
            allowed = torch.ones(length, keys, dtype=torch.bool, device=q.device).tril(diagonal=keys - length)
            scores = scores.masked_fill(~allowed, float("-inf"))
    elif mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask, float("-inf"))
    else:
        scores = scores + mask
    weights = torch.softmax(scores if scores.dtype == torch.float32 else scores.float(), dim=-1).nan_to_num(0.0)
    weights = weights if weights.dtype == q.dtype else weights.to(q.dtype)  # a query with no key to attend to reads 0
    weights = weights.view(rows, kv_heads, groups * length, keys)
    out = torch.matmul(weights, v).view(rows, heads, length, head_dim)
    d_scores = None
    if q_t is not None:
        d_scores = torch.matmul(q_t.reshape(q_t.shape[0], *stacked), k.transpose(-1, -2))
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
    if tangent is None:
        return out, torch.zeros((1, *out.shape), dtype=out.dtype, device=out.device)
    return out, tangent.view(tangent.shape[0], rows, heads, length, head_dim)


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


# models whose attention implementation is one config attribute (no sub-configs, every sub-model on the same config)
_ONE_CONFIG: "weakref.WeakKeyDictionary[nn.Module, bool]" = weakref.WeakKeyDictionary()


def _set_attention(module: nn.Module, implementation: str) -> None:
    """`module.set_attn_implementation(implementation)`, which walks every submodule (a millisecond per readout on a
    small model): done so the first time, then, for a model whose implementation is one config attribute, by setting
    that attribute as `set_attn_implementation` itself does."""
    one_config = _ONE_CONFIG.get(module)
    if one_config:
        module.config._attn_implementation_internal = implementation
        return
    module.set_attn_implementation(implementation)
    if one_config is None:
        from transformers import PreTrainedModel

        _ONE_CONFIG[module] = not getattr(module.config, "sub_configs", None) and all(
            sub.config is module.config for sub in module.modules() if isinstance(sub, PreTrainedModel))


@contextlib.contextmanager
def attention_with_tangents(models: list[nn.Module], copies: int = 1) -> Iterator[None]:
    """Run attention through `tangent_attention` for the duration, in each of `models` (transformers models, e.g.
    `pretrained_models(model)`) that can switch its attention implementation; the batch is `copies` identical copies
    of one batch, so the primal is computed on the first. Attention that cannot switch runs SDPA's math kernel,
    which forward AD goes through."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    switched = []
    token = _COPIES.set(copies)
    try:
        if _REGISTERED:
            for module in models:
                implementation = module.config._attn_implementation
                can_switch = getattr(module, "_can_set_attn_implementation", lambda: True)
                if implementation != TANGENT_ATTENTION and can_switch():
                    _set_attention(module, TANGENT_ATTENTION)
                    switched.append((module, implementation))
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        _COPIES.reset(token)
        for module, implementation in reversed(switched):
            _set_attention(module, implementation)
