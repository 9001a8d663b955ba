"""From a trained model to a saved influence artifact, in one or several processes.

`build_influence_artifact` is what `ForwardAttributionCallback` runs at the end of training, and what
a user calls directly on a model trained elsewhere. Responses are simulated shard by shard and each
shard is written as soon as it is done, so an interrupted run continues from its finished shards;
under `accelerate launch` / `torchrun` every process simulates its own shards and the main process
writes the artifact.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch

from ..errors import ArtifactError
from ..estimator.config import AttributionConfig
from ..estimator.curvature import estimate_step_size
from ..estimator.documents import DocumentSet
from ..estimator.eigenbasis import describe_eigenbasis, eigenbasis_from_state, eigenbasis_state, estimate_eigenbasis
from ..estimator.gradients import query_gradients
from ..estimator.simulate import simulate_responses
from ..estimator.subspace import AttributionSubspace, SubspaceSpec
from ..estimator.task import CausalLMTask
from ..progress import progress_bar
from ..query.compress import build_readout_basis
from ..storage.artifact import CONFIG_NAME, DocumentTable, InfluenceArtifact, artifact_settings, base_model_of, refuse_foreign_artifact, shard_identity
from ..storage.atomic import PROGRESS_NAME, check_replaceable, prepare_staging, recover, save_lock, staging_dir
from ..storage.compression import CompressionConfig
from ..storage.integrity import content_digest
from ..storage.shards import ShardWriter, write_json_atomic
from ..storage.table import document_digests
from .data import check_document_tokens, vocabulary_size
from .compressed_build import simulate_compressed

logger = logging.getLogger(__name__)


class _Processes:
    """The collective operations the build needs, in one place (accelerate's `PartialState`)."""

    def __init__(self):
        from accelerate import PartialState

        self.state = PartialState()

    @property
    def rank(self) -> int:
        return self.state.process_index

    @property
    def world(self) -> int:
        return self.state.num_processes

    @property
    def is_main(self) -> bool:
        return self.state.is_main_process

    def barrier(self) -> None:
        if self.world > 1:
            self.state.wait_for_everyone()

    def broadcast(self, value: Any) -> Any:
        if self.world == 1:
            return value
        from accelerate.utils import broadcast_object_list

        holder = [value if self.is_main else None]
        broadcast_object_list(holder, from_process=0)
        return holder[0]

    def pending_shards(self, writer) -> list:
        """The shards still to write, as the main process sees them, on every process. Each process reading the folder
        itself would race: a fast process finishes a shard before a slow one lists the folder, the two lists differ,
        and the shards are dealt out by position, so some would be written by no process."""
        return self.broadcast(writer.pending() if self.is_main else None)


def build_influence_artifact(
    model: torch.nn.Module,
    task,
    documents: DocumentSet,
    train_examples: Sequence[Any],
    output_dir: Union[str, Path],
    config: Optional[AttributionConfig] = None,
    subspace: Optional[Union[SubspaceSpec, dict, str]] = None,
    n_tokens: Optional[Sequence[int]] = None,
    metadata: Optional[Sequence[Optional[dict]]] = None,
    max_shard_size: Union[int, str] = "1GB",
    shard_rows: Optional[int] = None,
    base_model: Optional[dict] = None,
    progress: bool = True,
    gradient_method: str = "auto",
    compression: Optional[Union[CompressionConfig, dict, str]] = None,
    **subspace_kwargs,
) -> Optional[InfluenceArtifact]:
    """Simulate every document's response on `model` and save the artifact to `output_dir`.

    Returns the artifact on the main process (None on the others). The model is left as it was:
    a projection adapter is taken out again, training flags and weights are untouched.

    Args:
        model: the trained model (a PEFT model uses its adapter as the subspace by default).
        task: the `AttributionTask` (e.g. `CausalLMTask`).
        documents: the documents to attribute to.
        train_examples: the training examples minibatches are drawn from.
        output_dir: where the artifact is saved. It is written beside the folder (``.<name>.fwdattr-staging``) and
            swapped in when complete, so the folder holds its previous artifact until then; an interrupted build
            resumes from the shards simulated from the same settings, documents (tokens included) and training data.
        config: estimator settings.
        subspace: subspace description or kind (None: the PEFT adapter, else a projection adapter);
            `subspace_kwargs` (e.g. ``rank=16, target_modules=[...]``) fill a kind given as a string.
        n_tokens, metadata: extra columns of the documents table.
        max_shard_size, shard_rows: how responses are split into shards (and units of work/resume).
        compression: exact or compressed response storage (`CompressionConfig`, its dict, or 'auto' / 'exact' /
            'compressed'; None: 'auto', which compresses when N × p would exceed `max_exact_size`). Compressed
            responses are projected on a basis fixed from a sample of them as they are simulated (N × p is never written).
    """
    config = config or AttributionConfig()
    compression = CompressionConfig.coerce(compression)
    processes = _Processes()
    output_dir = Path(os.path.abspath(output_dir))
    start = time.perf_counter()
    documents.validate(task)
    train_examples = list(train_examples)
    # everything that can be refused is refused before the simulation: tokens, ids, metadata
    check_document_tokens(documents, train_examples, vocabulary_size(model), check_labels=isinstance(task, CausalLMTask))
    table = DocumentTable.from_document_set(documents, n_tokens, metadata)
    with save_lock(output_dir) if processes.is_main else contextlib.nullcontext():  # one build writes a folder at a time
        built = AttributionSubspace.build(model, subspace, **subspace_kwargs)
        try:
            return _simulate_and_save(built, model, task, documents, table, train_examples, output_dir, config, processes, start,
                                      max_shard_size, shard_rows, base_model, progress, gradient_method, compression)
        finally:
            built.remove()


def _simulate_and_save(built, model, task, documents, table, train_examples, output_dir, config, processes, start,
                       max_shard_size, shard_rows, base_model, progress, gradient_method, compression) -> Optional[InfluenceArtifact]:
    curvature_start, curvature_cpu = time.perf_counter(), time.process_time()
    eigenbasis = _shared_eigenbasis(built, task, train_examples, config, processes, progress) if config.uses_eigenbasis else None
    curvature = {"curvature_seconds": time.perf_counter() - curvature_start, "curvature_cpu_seconds": time.process_time() - curvature_cpu}
    if eigenbasis is not None:
        curvature["eigenbasis"] = describe_eigenbasis(eigenbasis)
    step_size, top = processes.broadcast(estimate_step_size(built, task, train_examples, config, eigenbasis) if processes.is_main else None)
    compressed, reason = compression.compress(len(table), built.dim, config.torch_dtype)
    if processes.is_main:
        logger.info("Influence artifact with %s.", reason)
    settings = artifact_settings(config, built.spec, built.model_fingerprint, built.fingerprint, compression if compressed else None)
    # what decides the rows: settings, the task's objective, each document's tokens, the training examples and η
    identity = {**shard_identity(settings, table.document_ids, document_digests(documents)),
                "task": task.describe() if hasattr(task, "describe") else {"task": type(task).__qualname__},
                "train_examples_sha256": content_digest(train_examples), "step_size": _identity_float(step_size)}
    inputs_sha256 = content_digest(identity)
    dtype = config.torch_dtype
    existing = _finished_artifact(output_dir, settings, table, inputs_sha256)
    if existing is not None:
        logger.info("%s already holds this artifact (same model, subspace, settings, documents and training data); not simulating again.", output_dir)
        return existing if processes.is_main else None
    staging = staging_dir(output_dir)  # the new artifact is written beside the folder and swapped in when complete
    if processes.is_main:
        recover(output_dir)
        refuse_foreign_artifact(output_dir, settings)
        check_replaceable(output_dir)
        prepare_staging(output_dir)
    if compressed:
        return _simulate_compressed_and_save(built, model, task, documents, table, train_examples, output_dir, staging, config, compression,
                                             processes, start, identity, inputs_sha256, step_size, top, eigenbasis, base_model, progress,
                                             gradient_method, curvature)
    if processes.is_main:
        writer = ShardWriter(staging, identity, len(table), built.dim, dtype, max_shard_size, shard_rows, create=True, replace_foreign=True)
    processes.barrier()
    if not processes.is_main:
        writer = ShardWriter(staging, identity, len(table), built.dim, dtype, max_shard_size, shard_rows, create=False)
    pending = processes.pending_shards(writer)
    mine = [shard for position, shard in enumerate(pending) if position % processes.world == processes.rank]
    if processes.is_main and len(pending) < len(writer.names):
        logger.info("Resuming: %d of %d shards are already simulated in %s.", len(writer.names) - len(pending), len(writer.names), staging)
    bar = progress_bar(total=len(pending), desc="Simulating responses (shards)", enabled=progress and processes.is_main)
    for index, lo, hi in mine:
        result = simulate_responses(built, task, documents, train_examples, config, document_indices=range(lo, hi),
                                    step_size=step_size, gradient_method=gradient_method, eigenbasis=eigenbasis)
        writer.write(index, result.responses)
        bar.update(processes.world if processes.world > 1 else 1)
    bar.close()
    processes.barrier()
    artifact = None
    if processes.is_main:
        store = writer.finish(keep_progress=True)
        artifact = InfluenceArtifact(
            config=config, subspace_spec=built.spec, documents=table, responses=store,
            model_fingerprint=built.model_fingerprint, subspace_fingerprint=built.fingerprint,
            base_model=base_model or base_model_of(model),
            simulation={"step_size": step_size, "top_eigenvalue": top, "seconds": time.perf_counter() - start,
                        "processes": processes.world, "inputs_sha256": inputs_sha256, **curvature},
        )
        if config.readout_basis_rank_for(len(table)) > 0:
            attach_readout_basis(artifact, built, task, heldout_queries(train_examples, config.seed))
        artifact.save_pretrained(output_dir)
    processes.barrier()
    return artifact


def _simulate_compressed_and_save(built, model, task, documents, table, train_examples, output_dir, staging, config, compression, processes,
                                  start, identity, inputs_sha256, step_size, top, eigenbasis, base_model, progress,
                                  gradient_method, curvature) -> Optional[InfluenceArtifact]:
    """The compressed build (`simulate_compressed`) in the staging folder, saved and swapped in like an exact one."""
    if processes.is_main and not (staging / PROGRESS_NAME).is_file():
        # marks the staging folder unfinished from the start, so an interrupted first pass is resumed, not discarded
        write_json_atomic(staging / PROGRESS_NAME, {"plan": "compressed simulation"})
    processes.barrier()
    store, figures = simulate_compressed(built, task, documents, train_examples, config, compression, staging, processes, identity,
                                         step_size, eigenbasis, gradient_method, progress)
    artifact = None
    if processes.is_main:
        artifact = InfluenceArtifact(
            config=config, subspace_spec=built.spec, documents=table, responses=store,
            model_fingerprint=built.model_fingerprint, subspace_fingerprint=built.fingerprint,
            base_model=base_model or base_model_of(model), compression=compression,
            fidelity={f"compression_{k}": v for k, v in figures.items()},
            simulation={"step_size": step_size, "top_eigenvalue": top, "seconds": time.perf_counter() - start,
                        "processes": processes.world, "inputs_sha256": inputs_sha256, **curvature},
        )
        artifact.save_pretrained(output_dir)  # the work folder of the first pass is not kept: the save removes it
    processes.barrier()
    return artifact


def _shared_eigenbasis(built, task, train_examples, config: AttributionConfig, processes: _Processes, progress: bool):
    """The main process estimates the eigenbasis and sends it to the others, so every process filters with the same one
    (an estimate on each process could differ in its last bits: thread counts, devices, kernels)."""
    if processes.world == 1:
        return estimate_eigenbasis(built, task, train_examples, config, progress)
    state = eigenbasis_state(estimate_eigenbasis(built, task, train_examples, config, progress)) if processes.is_main else None
    return eigenbasis_from_state(processes.broadcast(state), built)


def _identity_float(value: Optional[float], digits: int = 6) -> Optional[float]:
    """`value` to `digits` significant digits: what a resumed build re-estimates (η from a power iteration) may differ in
    its last bits on another machine or thread count, and must still resume into the same shards."""
    return None if value is None else float(f"{value:.{digits}g}")


def heldout_queries(train_examples: Sequence[Any], seed: int, count: int = 32) -> list:
    """A seeded sample of training examples used as queries (f_q = their own log-likelihood) to measure fidelity."""
    order = torch.randperm(len(train_examples), generator=torch.Generator().manual_seed(seed + 1))[:count]
    return [train_examples[i] for i in order.tolist()]


def attach_readout_basis(artifact: InfluenceArtifact, subspace: AttributionSubspace, task, queries: Sequence[Any]) -> None:
    """Build the compressed readout basis of `artifact` (rank and fidelity from its config) and record its fidelity."""
    config = artifact.config
    gradients = query_gradients(subspace, task, list(queries), dtype=torch.float64).cpu()  # the stored rows are on the CPU
    # asked for explicitly on an artifact whose config says no basis: full rank, the fidelity target picks k
    max_rank = max(1, min(config.readout_basis_rank_for(artifact.num_documents) or artifact.num_documents, artifact.num_documents, artifact.dim))
    basis, figures = build_readout_basis(artifact.store, gradients, max_rank, config.readout_basis_fidelity, config.seed)
    artifact.set_readout_basis(basis, figures)
    logger.info("Compressed readout basis: rank %d, Spearman %.4f against exact scores on %d held-out queries.",
                figures["readout_basis_rank"], figures["readout_basis_spearman"], figures["readout_basis_heldout_queries"])


def _finished_artifact(directory: Path, settings: dict, table: DocumentTable, inputs_sha256: str) -> Optional[InfluenceArtifact]:
    """The artifact already saved in `directory` if it is exactly the one about to be simulated (same settings, same
    documents table, and the same digest of everything the rows depend on)."""
    if not (directory / CONFIG_NAME).is_file():
        return None
    try:
        artifact = InfluenceArtifact.from_pretrained(directory)
    except ArtifactError:
        return None
    same = artifact.settings() == settings and artifact.documents == table and artifact.simulation.get("inputs_sha256") == inputs_sha256
    return artifact if same else None
