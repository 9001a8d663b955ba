"""Many small MLPs trained at once: one batched, deterministic, full-batch tensor program.

Model m is an `nn.Sequential(Linear(d, h), activation, Linear(h, c))` whose initial weights are those
torch draws after `torch.manual_seed(seed_m)`. It minimises the *mean* cross-entropy over the
training examples it is given (a 0/1 weight per example) plus (weight_decay / 2)‖θ‖² over all its
parameters: full-batch Adam with a cosine learning rate, then L-BFGS in float64 with a line search
of its own per model. Nothing in the recipe is random once the seed is fixed, so a model is a
deterministic function of (seed, training subset). Parameters are kept flat, [M, p], in the order
of `nn.Sequential.named_parameters()`.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

_ACTIVATIONS = {"relu": (nn.ReLU, F.relu), "tanh": (nn.Tanh, torch.tanh), "gelu": (nn.GELU, F.gelu)}


@dataclass(frozen=True)
class MLPSpec:
    """Architecture of the benchmark MLPs."""

    in_features: int
    hidden: int
    classes: int
    activation: str = "tanh"

    def module(self, seed: int, dtype: torch.dtype = torch.float32) -> nn.Sequential:
        """The torch module with the initial weights of `seed`."""
        torch.manual_seed(seed)
        layer = _ACTIVATIONS[self.activation][0]
        return nn.Sequential(nn.Linear(self.in_features, self.hidden), layer(), nn.Linear(self.hidden, self.classes)).to(dtype)

    @property
    def shapes(self) -> list[tuple[int, ...]]:
        d, h, c = self.in_features, self.hidden, self.classes
        return [(h, d), (h,), (c, h), (c,)]

    @property
    def num_parameters(self) -> int:
        return sum(math.prod(s) for s in self.shapes)

    def unflatten(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Views [M, *shape] of a flat [M, p] parameter tensor."""
        out, offset = [], 0
        for shape in self.shapes:
            size = math.prod(shape)
            out.append(flat[:, offset : offset + size].reshape(flat.shape[0], *shape))
            offset += size
        return out


@dataclass(frozen=True)
class TrainingRecipe:
    """The fixed full-batch training recipe (the objective and how it is minimised)."""

    weight_decay: float = 1e-2
    adam_steps: int = 400
    adam_lr: float = 1e-2
    adam_dtype: str = "float32"
    lbfgs_iterations: int = 600
    lbfgs_history: int = 20
    lbfgs_tolerance: float = 1e-9
    dtype: str = "float64"

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


def initial_parameters(spec: MLPSpec, seeds: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """Flat initial parameters [M, p] of the models with these seeds."""
    rows = [torch.cat([p.detach().reshape(-1) for p in spec.module(seed, dtype).parameters()]) for seed in seeds]
    return torch.stack(rows)


def logits(spec: MLPSpec, params: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """Logits [M, n, c] of every model on shared inputs [n, d]."""
    w1, b1, w2, b2 = spec.unflatten(params)
    m, h, d = w1.shape
    hidden = (inputs @ w1.reshape(m * h, d).T).reshape(inputs.shape[0], m, h).transpose(0, 1) + b1[:, None, :]
    hidden = _ACTIVATIONS[spec.activation][1](hidden)
    return torch.baddbmm(b2[:, None, :], hidden, w2.transpose(1, 2))


def margins(spec: MLPSpec, params: torch.Tensor, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Correct-class margin z_y − logsumexp_{c≠y} z_c of every model at every example, [M, n]."""
    z = logits(spec, params, inputs.to(params.dtype))
    index = labels[None, :, None].expand(z.shape[0], -1, 1)
    correct = z.gather(2, index).squeeze(2)
    others = z.scatter(2, index, float("-inf"))
    return correct - torch.logsumexp(others, dim=2)


def objective(spec, params, inputs, labels, example_weights, weight_decay) -> torch.Tensor:
    """Per-model objective [M]: weighted mean cross-entropy + (weight_decay / 2)‖θ‖²."""
    z = logits(spec, params, inputs)
    losses = -torch.log_softmax(z, dim=2).gather(2, labels[None, :, None].expand(z.shape[0], -1, 1)).squeeze(2)
    data = (losses * example_weights).sum(1) / example_weights.sum(1)
    return data + 0.5 * weight_decay * (params**2).sum(1)


def value_and_gradient(spec, params, inputs, labels, example_weights, weight_decay) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-model objective [M] and its gradient [M, p]."""
    leaf = params.detach().clone().requires_grad_(True)
    values = objective(spec, leaf, inputs, labels, example_weights, weight_decay)
    (gradient,) = torch.autograd.grad(values.sum(), leaf)
    return values.detach(), gradient


def lbfgs(
    spec, params, inputs, labels, example_weights, weight_decay, iterations: int, history: int = 20, tolerance: float = 1e-9, log=None
) -> torch.Tensor:
    """Batched L-BFGS: every model runs its own two-loop recursion and Armijo backtracking line search.

    A model whose gradient norm is below `tolerance` stops moving; the loop ends when all have.
    """

    def dot(a, b):
        return (a * b).sum(1, keepdim=True)

    x = params.detach()
    f, g = value_and_gradient(spec, x, inputs, labels, example_weights, weight_decay)
    s_list, y_list, rho_list = [], [], []
    for iteration in range(iterations):
        done = g.norm(dim=1) < tolerance
        if bool(done.all()):
            break
        q = g.clone()
        alphas = []
        for s, y, rho in zip(reversed(s_list), reversed(y_list), reversed(rho_list)):
            alpha = rho * dot(s, q)
            q -= alpha * y
            alphas.append(alpha)
        if s_list:
            gamma = dot(s_list[-1], y_list[-1]) / dot(y_list[-1], y_list[-1]).clamp_min(1e-300)
            gamma = torch.where(rho_list[-1] > 0, gamma, 1e-2 / dot(g, g).sqrt().clamp_min(1e-300))
        else:
            gamma = 1e-2 / dot(g, g).sqrt().clamp_min(1e-300)
        r = gamma * q
        for s, y, rho, alpha in zip(s_list, y_list, rho_list, reversed(alphas)):
            r += (alpha - rho * dot(y, r)) * s
        direction = -r
        slope = dot(g, direction)
        uphill = slope >= 0  # a stale curvature pair: fall back to a short steepest-descent step
        direction = torch.where(uphill, -1e-2 * g, direction)
        slope = dot(g, direction).squeeze(1)
        step = torch.where(done, torch.zeros_like(f), torch.ones_like(f))
        with torch.no_grad():
            pending = torch.nonzero(step > 0).flatten()  # only models still searching are evaluated
            for _ in range(30):
                if len(pending) == 0:
                    break
                trial = objective(spec, x[pending] + step[pending, None] * direction[pending], inputs, labels,
                                  example_weights[pending], weight_decay)
                # Armijo, or a change at the rounding level of f (near the tolerance no decrease is measurable)
                accept = (trial <= f[pending] + 1e-4 * step[pending] * slope[pending]) | ((trial - f[pending]).abs() <= 1e-14 * f[pending].abs())
                pending = pending[~accept]
                step[pending] = step[pending] / 2
            step[pending] = 0.0  # no acceptable step found: stay
        new_x = x + step[:, None] * direction
        new_f, new_g = value_and_gradient(spec, new_x, inputs, labels, example_weights, weight_decay)
        s, y = new_x - x, new_g - g
        sy = dot(s, y)
        rho = torch.where(sy > 1e-10 * dot(s, s).sqrt() * dot(y, y).sqrt(), 1.0 / sy, torch.zeros_like(sy))
        s_list.append(s), y_list.append(y), rho_list.append(rho)
        if len(s_list) > history:
            s_list.pop(0), y_list.pop(0), rho_list.pop(0)
        x, f, g = new_x, new_f, new_g
        if log and (iteration + 1) % 200 == 0:
            norms = g.norm(dim=1)
            log(f"    L-BFGS {iteration + 1}: max ‖∇‖ = {float(norms.max()):.2e}, median {float(norms.median()):.2e}")
    return x


def train_ensemble(
    spec: MLPSpec,
    recipe: TrainingRecipe,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    example_weights: torch.Tensor,
    seeds: Sequence[int],
    log: Optional[Callable[[str], None]] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Train one model per row of `example_weights` ([M, n], 0/1) with the matching seed.

    Returns the flat parameters [M, p] (float64) and each model's final gradient norm [M].
    """
    start = time.perf_counter()
    adam_dtype = getattr(torch, recipe.adam_dtype)
    params = initial_parameters(spec, seeds, adam_dtype).requires_grad_(True)
    adam_inputs, adam_weights = inputs.to(adam_dtype), example_weights.to(adam_dtype)
    adam = torch.optim.Adam([params], lr=recipe.adam_lr)
    for step in range(recipe.adam_steps):
        for group in adam.param_groups:
            group["lr"] = recipe.adam_lr * 0.5 * (1 + math.cos(math.pi * step / recipe.adam_steps))
        adam.zero_grad()
        objective(spec, params, adam_inputs, labels, adam_weights, recipe.weight_decay).sum().backward()
        adam.step()
    dtype = recipe.torch_dtype
    inputs, example_weights = inputs.to(dtype), example_weights.to(dtype)
    params = lbfgs(spec, params.detach().to(dtype), inputs, labels, example_weights, recipe.weight_decay,
                   recipe.lbfgs_iterations, recipe.lbfgs_history, recipe.lbfgs_tolerance, log)
    norms = value_and_gradient(spec, params, inputs, labels, example_weights, recipe.weight_decay)[1].norm(dim=1)
    if log:
        log(f"    trained {len(seeds)} models in {time.perf_counter() - start:.1f}s; ‖∇‖ max {float(norms.max()):.1e}, median {float(norms.median()):.1e}")
    return params, norms


def module_from(spec: MLPSpec, params: torch.Tensor, index: int, dtype: torch.dtype = torch.float32) -> nn.Sequential:
    """Model `index` of flat stacked parameters as an `nn.Sequential` in `dtype`, in eval mode."""
    module = spec.module(0, dtype)
    with torch.no_grad():
        for param, value in zip(module.parameters(), spec.unflatten(params[index : index + 1])):
            param.copy_(value[0].to(dtype))
    return module.eval()
