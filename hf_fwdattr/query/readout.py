"""Forward-only readout of scores ∇f_qᵀu_b (DESIGN §5).

No backward pass runs here: difference modes evaluate the model at θ* ± εû, the JVP mode pushes
tangents forward, the removal mode evaluates it at θ* − u_b (finite responses of the unlearning solver).

Two engines evaluate a block of directions:

- ``lora_batch`` (`LoRABatchEngine`), for subspaces made of LoRA A/B weights: one ordinary forward over
  directions × queries rows, each LoRA layer applying its own update per direction; the JVP writes each LoRA
  layer's tangent out by hand and lets `torch.autograd.forward_ad` carry it through the rest.
- ``functional``, for any subspace: `torch.func.functional_call` at θ* + δ, vmapped over directions (`jvp`
  inside for the JVP mode), under `torch.inference_mode`.

`ForwardReadout.token_scores` reads per-output scores (per token, for a causal LM) from the same passes: a pass
gives the directional derivative (or difference) of every output at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import torch
from torch.func import jvp, vmap

from ..errors import ReadoutError
from ..estimator.config import AttributionConfig, ReadoutMode
from ..estimator.functional import TaskFunction, differentiable_attention, evaluation_mode
from ..estimator.subspace import AttributionSubspace
from ..estimator.task import as_task
from .lora_batch import LoRABatchEngine


def default_epsilon(mode: ReadoutMode, dtype: torch.dtype) -> float:
    """Finite-difference step for a unit direction: ~δ^(1/3) (central) or ~δ^(1/2) (one-sided), δ = machine epsilon.

    The constants were fitted on tiny float32 causal LMs (error against the exact JVP); the JVP mode ignores it.
    """
    machine = torch.finfo(dtype).eps
    return 2 * machine ** (1 / 3) if ReadoutMode(mode) is ReadoutMode.CENTRAL_DIFFERENCE else 10 * machine**0.5


class ReadoutEngine(str, Enum):
    """How a block of directions is evaluated."""

    AUTO = "auto"
    """``lora_batch`` when every subspace coordinate is a LoRA A/B weight of a PEFT LoRA Linear, else ``functional``."""
    LORA_BATCH = "lora_batch"
    """One batched forward over directions × queries, each LoRA layer applying its own update per direction."""
    FUNCTIONAL = "functional"
    """`torch.func.functional_call` at θ* + δ, vmapped over directions (any subspace)."""


@dataclass
class TokenScores:
    """Per-output scores and their sum, read from the same passes.

    Attributes:
        total: [n_queries, n_directions], the score of the whole measurement (the sum over outputs).
        tokens: [n_queries, n_outputs, n_directions]; for a causal LM output t is token t of the collated batch
            (0 where the token is not scored).
    """

    total: torch.Tensor
    tokens: torch.Tensor


class _FunctionalEngine:
    """f at θ* + δ through `functional_call`, vmapped over directions (or looped, with `vectorize=False`)."""

    def __init__(self, subspace: AttributionSubspace, vectorize: bool):
        self.subspace = subspace
        self.vectorize = vectorize
        self._functions: dict[Callable, TaskFunction] = {}

    def _function(self, method):
        if method not in self._functions:
            self._functions[method] = TaskFunction(self.subspace, method)
        return self._functions[method]

    def _map(self, function, arguments: torch.Tensor) -> torch.Tensor:
        if self.vectorize:
            return vmap(function)(arguments)
        return torch.stack([function(a) for a in arguments])

    def values(self, method, batch, directions: torch.Tensor, scales: torch.Tensor, index: Optional[torch.Tensor], rows: int) -> torch.Tensor:
        measure = self._function(method)
        deltas = (directions if index is None else directions[index]) * scales[:, None]
        with torch.inference_mode(), differentiable_attention(self.subspace.model):
            return self._map(lambda delta: measure(delta, batch), deltas)

    def tangents(self, method, batch, directions: torch.Tensor, rows: int) -> torch.Tensor:
        measure = self._function(method)
        zero = torch.zeros(self.subspace.dim, device=directions.device, dtype=directions.dtype)
        with torch.inference_mode(), differentiable_attention(self.subspace.model):
            return self._map(lambda tangent: jvp(lambda x: measure(x, batch), (zero,), (tangent,))[1], directions)


class ForwardReadout:
    """Scores of queries against response directions, with forward passes only.

    Args:
        subspace: the attribution subspace (at θ*).
        task: gives the query measurement f_q (`task.measurement`; `task.token_measurement` for `token_scores`).
        mode: central_difference | one_sided | jvp | removal (f_q(θ*) − f_q(θ* − u_b), for finite responses).
        epsilon: difference modes: step length along the unit direction u/‖u‖; None picks the step that
            balances truncation and rounding error for the model's dtype (`default_epsilon`).
        chunk_size: directions evaluated together in one batched pass.
        vectorize: functional engine: evaluate a chunk of directions with `torch.func.vmap` (one batched pass); set
            False for models whose forward cannot be vmapped over parameters, to loop instead.
        engine: ``auto`` (default), ``lora_batch`` or ``functional`` (`ReadoutEngine`).
    """

    def __init__(
        self,
        subspace: AttributionSubspace,
        task,
        mode: Union[ReadoutMode, str] = ReadoutMode.JVP,
        epsilon: Optional[float] = None,
        chunk_size: int = 64,
        vectorize: bool = True,
        engine: Union[ReadoutEngine, str] = ReadoutEngine.AUTO,
    ):
        self.subspace = subspace
        self.task = as_task(task)
        self.mode = ReadoutMode(mode)
        if epsilon is None:
            epsilon = default_epsilon(self.mode, subspace.parameter_dtype)
        if not epsilon > 0:
            raise ReadoutError(f"`epsilon` must be > 0, got {epsilon!r}.")
        self.epsilon = float(epsilon)
        if isinstance(chunk_size, bool) or int(chunk_size) != chunk_size or chunk_size < 1:
            raise ReadoutError(f"`chunk_size` must be a positive integer, got {chunk_size!r}.")
        self.chunk_size = int(chunk_size)
        self.vectorize = vectorize
        try:
            engine = ReadoutEngine(engine)
        except ValueError as err:
            choices = ", ".join(repr(e.value) for e in ReadoutEngine)
            raise ReadoutError(f"`engine` must be one of {choices}, got {engine!r}.") from err
        if engine is ReadoutEngine.AUTO:
            engine = ReadoutEngine.LORA_BATCH if vectorize and LoRABatchEngine.supports(subspace) else ReadoutEngine.FUNCTIONAL
        self.engine = engine
        self._engine = LoRABatchEngine(subspace) if engine is ReadoutEngine.LORA_BATCH else _FunctionalEngine(subspace, vectorize)

    @classmethod
    def from_config(cls, subspace: AttributionSubspace, task, config: AttributionConfig, **kwargs) -> "ForwardReadout":
        """A readout with the mode, ε and chunk size of `config`."""
        return cls(subspace, task, config.readout, config.epsilon, config.readout_chunk_size, **kwargs)

    @property
    def needs_base_value(self) -> bool:
        """Whether the mode uses f_q(θ*) (one-sided and removal), which `token_scores` can take as `base_values`."""
        return self.mode in (ReadoutMode.ONE_SIDED, ReadoutMode.REMOVAL)

    def scores(
        self,
        queries: Union[Sequence[Any], Any],
        responses: Union[torch.Tensor, Iterable[torch.Tensor]],
        collated: bool = False,
        num_directions: Optional[int] = None,
    ) -> torch.Tensor:
        """Score matrix [n_queries, n_directions]: entry (q, b) = ∇f_q(θ*)ᵀ u_b (removal mode: f_q(θ*) − f_q(θ* − u_b));
        positive = proponent.

        Args:
            queries: query examples (collated by the task), or a collated batch with `collated=True`.
            responses: [n, dim] tensor, or an iterable of such chunks (streamed, e.g. from shards).
            num_directions: total rows of a streamed `responses`, if known: the result is then
                allocated once, which keeps memory flat however many chunks stream by.
        """
        batch, rows = self._batch(queries, collated)
        return self._read(self.task.measurement, batch, rows, responses, num_directions, None).T.contiguous()

    def token_scores(
        self,
        queries: Union[Sequence[Any], Any],
        responses: Union[torch.Tensor, Iterable[torch.Tensor]],
        collated: bool = False,
        num_directions: Optional[int] = None,
        base_values: Optional[torch.Tensor] = None,
    ) -> TokenScores:
        """Per-output scores (per token, for a causal LM) and their sum, from the same passes as the sum alone.

        Reads `task.token_measurement` ([n_queries, n_outputs] parts of f_q). Arguments as in `scores`, plus
        `base_values`: f at θ* per output, [n_queries, n_outputs], for the one-sided and removal modes (e.g. the
        log-probabilities a generation already computed); without them one extra copy of the batch gives them.
        """
        batch, rows = self._batch(queries, collated)
        if base_values is not None and not self.needs_base_value:
            base_values = None  # the other modes do not use f(θ*)
        tokens = self._read(self.task.token_measurement, batch, rows, responses, num_directions, base_values)  # [n, Q, T]
        tokens = tokens.permute(1, 2, 0).contiguous()
        return TokenScores(total=tokens.sum(dim=1), tokens=tokens)

    # ------------------------------------------------------------------ internals
    def _batch(self, queries, collated: bool) -> tuple[Any, int]:
        examples = None if collated else list(queries)
        batch = queries if collated else self.task.collate(examples)
        rows = len(examples) if examples is not None else _leading_rows(batch)
        return batch, rows

    def _dtype(self) -> torch.dtype:
        dtype = self.subspace.parameter_dtype
        return dtype if dtype in (torch.float32, torch.float64) else torch.float32

    def _read(self, method, batch, rows: int, responses, num_directions: Optional[int], base: Optional[torch.Tensor]) -> torch.Tensor:
        """[n_directions, rows, ...]: the scores of every output of `method` against every response."""
        if isinstance(responses, torch.Tensor):
            chunks, num_directions = [responses], responses.shape[0]
        else:
            chunks = responses
        if base is not None:
            base = base.to(device=self.subspace.device, dtype=self._dtype())
        blocks: list[torch.Tensor] = []
        out: Optional[torch.Tensor] = None
        row = 0
        with evaluation_mode(self.subspace.model):
            for chunk in chunks:
                if chunk.dim() != 2 or chunk.shape[1] != self.subspace.dim:
                    raise ReadoutError(
                        f"Responses must have shape [n, {self.subspace.dim}] (the subspace dimension), got {tuple(chunk.shape)}. "
                        "They were made for another subspace."
                    )
                for lo in range(0, chunk.shape[0], self.chunk_size):
                    block = chunk[lo : lo + self.chunk_size].to(device=self.subspace.device, dtype=self._dtype())
                    values, base = self._block_scores(method, block, batch, rows, base)
                    if num_directions is None:
                        blocks.append(values)
                        continue
                    if out is None:
                        out = torch.empty(num_directions, *values.shape[1:], dtype=values.dtype, device=values.device)
                    if row + len(values) > num_directions:
                        raise ReadoutError(f"More response rows streamed than num_directions={num_directions}.")
                    out[row : row + len(values)] = values
                    row += len(values)
        if num_directions is not None:
            if out is None or row != num_directions:
                raise ReadoutError(f"{row} response rows streamed, num_directions={num_directions} expected.")
            return out
        if not blocks:
            raise ReadoutError("No responses to score against.")
        return torch.cat(blocks, dim=0)

    def _block_scores(self, method, block: torch.Tensor, batch: Any, rows: int,
                      base: Optional[torch.Tensor]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Scores [len(block), rows, ...] for one block of directions, and f(θ*) where the mode uses it."""
        engine = self._engine
        if self.mode is ReadoutMode.JVP:
            return engine.tangents(method, batch, block, rows).to(block.dtype), base
        count = len(block)
        index = None
        if self.mode is ReadoutMode.REMOVAL:  # θ* − u_b
            scales = -torch.ones(count, dtype=block.dtype, device=block.device)
        else:  # θ* ± ε u_b / ‖u_b‖
            norms = block.norm(dim=1)
            scales = self.epsilon / norms.clamp_min(torch.finfo(block.dtype).tiny)
            if self.mode is ReadoutMode.CENTRAL_DIFFERENCE:
                scales = torch.cat([scales, -scales])
                index = torch.arange(count, device=block.device).repeat(2)
        with_base = self.needs_base_value and base is None
        if with_base:  # f(θ*) rides along as one more copy of the batch (scale 0) in the same pass
            scales = torch.cat([scales.new_zeros(1), scales])
            index = torch.cat([index.new_zeros(1) if index is not None else torch.zeros(1, dtype=torch.long, device=block.device),
                               index if index is not None else torch.arange(count, device=block.device)])
        values = engine.values(method, batch, block, scales, index, rows).to(block.dtype)
        if with_base:
            base, values = values[0], values[1:]
        if self.mode is ReadoutMode.REMOVAL:
            return base[None] - values, base
        norms = norms.reshape(-1, *([1] * (values.dim() - 1)))
        if self.mode is ReadoutMode.CENTRAL_DIFFERENCE:
            plus, minus = values.chunk(2)
            return (plus - minus) / (2 * self.epsilon) * norms, base
        return (values - base[None]) / self.epsilon * norms, base


def _leading_rows(batch: Any) -> int:
    """Examples in a collated batch: the leading size of its first tensor."""
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    items = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (list, tuple)) else []
    for item in items:
        if isinstance(item, torch.Tensor) and item.dim():
            return item.shape[0]
        if isinstance(item, (dict, list, tuple)):
            return _leading_rows(item)
    raise ReadoutError(f"Cannot tell how many examples a collated batch of type {type(batch).__name__} holds.")
