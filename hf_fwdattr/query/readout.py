"""Forward-only readout of scores ∇f_qᵀu_b (DESIGN §5).

No backward pass runs here: difference modes evaluate the model at θ* ± εû, the JVP mode pushes
tangents forward with `torch.func.jvp`, the removal mode evaluates it at θ* − u_b (finite responses of the
unlearning solver); everything runs under `torch.inference_mode`.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional, Sequence, Union

import torch
from torch.func import jvp, vmap

from ..errors import ReadoutError
from ..estimator.config import AttributionConfig, ReadoutMode
from ..estimator.functional import TaskFunction, differentiable_attention, evaluation_mode
from ..estimator.subspace import AttributionSubspace
from ..estimator.task import as_task


def default_epsilon(mode: ReadoutMode, dtype: torch.dtype) -> float:
    """Finite-difference step for a unit direction: ~δ^(1/3) (central) or ~δ^(1/2) (one-sided), δ = machine epsilon.

    The constants were fitted on tiny float32 causal LMs (error against the exact JVP); the JVP mode ignores it.
    """
    machine = torch.finfo(dtype).eps
    return 2 * machine ** (1 / 3) if ReadoutMode(mode) is ReadoutMode.CENTRAL_DIFFERENCE else 10 * machine**0.5


class ForwardReadout:
    """Scores of queries against response directions, with forward passes only.

    Args:
        subspace: the attribution subspace (at θ*).
        task: gives the query measurement f_q (`task.measurement`).
        mode: central_difference | one_sided | jvp | removal (f_q(θ*) − f_q(θ* − u_b), for finite responses).
        epsilon: difference modes: step length along the unit direction u/‖u‖; None picks the step that
            balances truncation and rounding error for the model's dtype (`default_epsilon`).
        chunk_size: directions evaluated together in one vmapped pass.
        vectorize: evaluate a chunk of directions with `torch.func.vmap` (one batched pass); set False
            for models whose forward cannot be vmapped over parameters, to loop instead.
    """

    def __init__(
        self,
        subspace: AttributionSubspace,
        task,
        mode: Union[ReadoutMode, str] = ReadoutMode.JVP,
        epsilon: Optional[float] = None,
        chunk_size: int = 64,
        vectorize: bool = True,
    ):
        self.subspace = subspace
        self.task = as_task(task)
        self.mode = ReadoutMode(mode)
        if epsilon is None:
            epsilon = default_epsilon(self.mode, subspace.parameter_dtype)
        if not epsilon > 0:
            raise ReadoutError(f"`epsilon` must be > 0, got {epsilon!r}.")
        self.epsilon = float(epsilon)
        self.chunk_size = int(chunk_size)
        self.vectorize = vectorize
        self._measure = TaskFunction(subspace, self.task.measurement)

    @classmethod
    def from_config(cls, subspace: AttributionSubspace, task, config: AttributionConfig, **kwargs) -> "ForwardReadout":
        """A readout with the mode, ε and chunk size of `config`."""
        return cls(subspace, task, config.readout, config.epsilon, config.readout_chunk_size, **kwargs)

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
        batch = queries if collated else self.task.collate(list(queries))
        if isinstance(responses, torch.Tensor):
            chunks, num_directions = [responses], responses.shape[0]
        else:
            chunks = responses
        model = self.subspace.model
        blocks: list[torch.Tensor] = []
        out: Optional[torch.Tensor] = None
        row = 0
        with torch.inference_mode(), evaluation_mode(model), differentiable_attention(model):
            base_value = None
            zero = torch.zeros(self.subspace.dim, device=self.subspace.device, dtype=self._dtype())
            if self.mode in (ReadoutMode.ONE_SIDED, ReadoutMode.REMOVAL):
                base_value = self._measure(zero, batch)
            for chunk in chunks:
                if chunk.dim() != 2 or chunk.shape[1] != self.subspace.dim:
                    raise ReadoutError(
                        f"Responses must have shape [n, {self.subspace.dim}] (the subspace dimension), got {tuple(chunk.shape)}. "
                        "They were made for another subspace."
                    )
                for lo in range(0, chunk.shape[0], self.chunk_size):
                    block = chunk[lo : lo + self.chunk_size].to(device=self.subspace.device, dtype=self._dtype())
                    values = self._block_scores(block, batch, zero, base_value)
                    if num_directions is None:
                        blocks.append(values)
                        continue
                    if out is None:
                        out = torch.empty(num_directions, values.shape[1], dtype=values.dtype, device=values.device)
                    if row + len(values) > num_directions:
                        raise ReadoutError(f"More response rows streamed than num_directions={num_directions}.")
                    out[row : row + len(values)] = values
                    row += len(values)
        if num_directions is not None:
            if out is None or row != num_directions:
                raise ReadoutError(f"{row} response rows streamed, num_directions={num_directions} expected.")
            return out.T.contiguous()
        if not blocks:
            raise ReadoutError("No responses to score against.")
        return torch.cat(blocks, dim=0).T.contiguous()

    def _dtype(self) -> torch.dtype:
        dtype = self.subspace.parameter_dtype
        return dtype if dtype in (torch.float32, torch.float64) else torch.float32

    def _evaluate(self, function, arguments: torch.Tensor) -> torch.Tensor:
        if self.vectorize:
            return vmap(function)(arguments)
        return torch.stack([function(a) for a in arguments])

    def _block_scores(self, block: torch.Tensor, batch: Any, zero: torch.Tensor, base_value: Optional[torch.Tensor]) -> torch.Tensor:
        """[len(block), n_queries] scores for one block of directions."""
        if self.mode is ReadoutMode.JVP:
            return self._evaluate(lambda tangent: jvp(lambda x: self._measure(x, batch), (zero,), (tangent,))[1], block)
        if self.mode is ReadoutMode.REMOVAL:
            return base_value[None] - self._evaluate(lambda u: self._measure(-u, batch), block)
        norms = block.norm(dim=1, keepdim=True)
        directions = block / norms.clamp_min(torch.finfo(block.dtype).tiny)
        step = self.epsilon
        plus = self._evaluate(lambda d: self._measure(step * d, batch), directions)
        if self.mode is ReadoutMode.CENTRAL_DIFFERENCE:
            minus = self._evaluate(lambda d: self._measure(-step * d, batch), directions)
            slopes = (plus - minus) / (2 * step)
        else:
            slopes = (plus - base_value[None]) / step
        return slopes * norms
