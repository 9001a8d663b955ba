"""`ArtifactScorer`: scores of queries against an artifact's documents or sources, forward passes only.

Binds the artifact to a model once (fingerprints checked), then answers document-level scores by
streaming the response shards (or through the compressed readout basis when the artifact has one; an artifact
of compressed responses always reads out through its basis: k directions, then its coefficients streamed)
and source-level scores from the per-source summed responses: one direction per source, exact. The removal
readout is nonlinear in u_b, so there a source's score is the sum of its documents' scores instead. The
``*_token_scores`` methods give per-token scores and their sum from the same passes.
"""

from __future__ import annotations

from typing import Any, Iterator, Optional, Sequence, Union

import torch

from ..errors import ReadoutError
from ..estimator.config import ReadoutMode, Solver
from ..estimator.task import AttributionTask
from ..storage.artifact import InfluenceArtifact
from ..storage.table import sum_by_source
from .readout import ForwardReadout, ReadoutEngine, TokenScores


class ArtifactScorer:
    """Scores of query examples against `artifact`, read out on `model`.

    Args:
        artifact: the influence artifact.
        model: the model it was made on (checked by fingerprint; a projection adapter is injected,
            which leaves the outputs unchanged).
        task: the task whose `measurement` is f_q.
        mode: readout mode overriding the artifact's.
        use_basis: use the artifact's compressed readout basis for document scores when present (for compressed
            responses: read out the k basis directions, not the N projected responses, which give the same scores).
        chunk_rows: rows streamed from the shards at a time.
        engine: how blocks of directions are evaluated (`ReadoutEngine`; ``auto`` batches LoRA subspaces).
    """

    def __init__(self, artifact: InfluenceArtifact, model: torch.nn.Module, task: AttributionTask,
                 mode: Optional[ReadoutMode] = None, use_basis: bool = True, chunk_rows: int = 4096,
                 engine: Union[ReadoutEngine, str] = ReadoutEngine.AUTO):
        self.artifact = artifact
        self.subspace = artifact.bind(model)
        config = artifact.config
        if mode is not None and ReadoutMode(mode) is ReadoutMode.REMOVAL and config.solver is not Solver.UNLEARNING:
            raise ReadoutError(f"The removal readout evaluates the model at θ* − u_b, which is meaningful only for the unlearning solver's "
                               f"finite responses; this artifact was simulated with solver={config.solver.value!r}: use jvp, "
                               "central_difference or one_sided.")
        self.readout = ForwardReadout(self.subspace, task, mode or config.readout, config.epsilon, config.readout_chunk_size,
                                      engine=engine)
        self.linear = self.readout.mode is not ReadoutMode.REMOVAL
        self.use_basis = use_basis and self.linear and (artifact.readout_basis is not None or artifact.compressed)
        self.chunk_rows = chunk_rows

    def _basis(self) -> tuple[torch.Tensor, Iterator[torch.Tensor]]:
        """(directions [k, p], coefficient blocks [·, k] in row order): of the compressed responses, or of the readout basis."""
        if self.artifact.compressed:
            store = self.artifact.store
            return store.directions, store.iter_coefficients(self.chunk_rows)  # streamed: memory flat in N
        basis = self.artifact.readout_basis
        return basis["directions"], iter([basis["coefficients"]])

    def _through_basis(self, projected: torch.Tensor) -> torch.Tensor:
        """[..., N]: `projected` [..., k] (∇f_qᵀ v_j) times every document's coefficients."""
        out = torch.empty(*projected.shape[:-1], self.artifact.num_documents, dtype=projected.dtype, device=projected.device)
        row = 0
        for block in self._basis()[1]:
            out[..., row : row + len(block)] = projected @ block.to(projected.device, projected.dtype).T
            row += len(block)
        return out

    def document_scores(self, queries: Sequence[Any]) -> torch.Tensor:
        """[n_queries, n_documents] scores; positive = proponent."""
        if self.use_basis:
            return self._through_basis(self.readout.scores(queries, self._basis()[0]))  # k directions, whatever N is
        artifact = self.artifact
        return self.readout.scores(queries, artifact.iter_responses(self.chunk_rows), num_directions=artifact.num_documents)

    def document_token_scores(self, queries: Sequence[Any], base_values: Optional[torch.Tensor] = None) -> TokenScores:
        """Per-token document scores ([n_queries, n_tokens, n_documents]) and their sum ([n_queries, n_documents]),
        from one readout; `base_values` as in `ForwardReadout.token_scores`."""
        if self.use_basis:
            projected = self.readout.token_scores(queries, self._basis()[0], base_values=base_values)
            return TokenScores(total=self._through_basis(projected.total), tokens=self._through_basis(projected.tokens))
        artifact = self.artifact
        return self.readout.token_scores(queries, artifact.iter_responses(self.chunk_rows), num_directions=artifact.num_documents,
                                         base_values=base_values)

    def source_token_scores(self, queries: Sequence[Any], base_values: Optional[torch.Tensor] = None) -> TokenScores:
        """Per-token source scores ([n_queries, n_tokens, n_sources]) and their sum ([n_queries, n_sources]), from one
        readout (see `source_scores`)."""
        self._check_sources()
        if self.linear:
            return self.readout.token_scores(queries, self.artifact.source_responses, base_values=base_values)
        documents = self.document_token_scores(queries, base_values)
        positions = self.artifact.documents.source_positions(self.artifact.source_names)
        count = len(self.artifact.source_names)
        tokens = sum_by_source(documents.tokens.permute(2, 0, 1), positions, count).permute(1, 2, 0).contiguous()
        return TokenScores(total=tokens.sum(dim=1), tokens=tokens)

    def _check_sources(self) -> None:
        if not self.artifact.source_names:
            raise ReadoutError("The artifact's documents have no sources, so scores cannot be aggregated by source.")

    def source_scores(self, queries: Sequence[Any]) -> torch.Tensor:
        """[n_queries, n_sources] scores: the score of each source's summed response (exact for linear readouts);
        with the removal readout, the sum of the source's document scores."""
        self._check_sources()
        if self.linear:
            return self.readout.scores(queries, self.artifact.source_responses)
        positions = self.artifact.documents.source_positions(self.artifact.source_names)
        return sum_by_source(self.document_scores(queries).T, positions, len(self.artifact.source_names)).T

    def close(self) -> None:
        """Take a projection adapter out of the model again."""
        self.subspace.remove()
