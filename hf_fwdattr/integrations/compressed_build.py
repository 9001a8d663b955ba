"""Compressed simulation: every response projected on a fixed basis as it is produced, so N × p is never written.

Two passes over the documents, both resumable shard by shard and shared out over processes like the exact build:

1. The exact responses of a seeded sample of documents and of a disjoint validation set are simulated and written to a
   work folder (``.fwdattr-compression/`` inside the build's staging folder). The basis V (k × p) is the top right singular vectors of the
   sample's responses (`query.compress.gram_basis`); k is the smallest rank whose scores on the validation documents
   reach `CompressionConfig.fidelity` (mean per-query Spearman against exact scores, for a set of fidelity queries).
2. Every document's response is simulated (or read back, for the first pass's documents), projected, c_b = V u_b, and
   only the coefficients are written (N × k, the artifact's response shards). For a third, held-out set of documents —
   in neither first-pass set — the exact scores of a second set of queries are kept as the responses stream by, so the
   fidelity recorded in the artifact is measured on documents and queries that chose nothing.

Memory: one chunk of responses (`CompressionConfig.chunk_size`), V, the sample's Gram matrix and the query gradients;
nothing grows with N but the documents table and the held-out scores (bounded by `heldout_documents`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..estimator.config import AttributionConfig
from ..estimator.documents import DocumentSet
from ..estimator.gradients import query_gradients
from ..estimator.simulate import simulate_responses
from ..estimator.subspace import AttributionSubspace
from ..query.compress import gram_basis, smallest_sufficient_rank, spearman_at_ranks
from ..stats import pearson_rows, spearman_rows
from ..storage.coefficients import ProjectedResponses, load_basis, project_responses, save_basis
from ..storage.compression import CompressionConfig
from ..storage.shards import TENSOR_NAME, ShardedResponses, ShardWriter

logger = logging.getLogger(__name__)

WORK_NAME = ".fwdattr-compression"
_IDENTITY_KEY = "first_pass_identity_sha256"


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


class DocumentPicker:
    """Small `DocumentSet`s of chosen documents, made in time proportional to their size (not to the corpus)."""

    def __init__(self, documents: DocumentSet):
        self.documents = documents
        self.examples_of: list[list[int]] = [[] for _ in range(len(documents))]
        for position, document in enumerate(documents.example_document):
            self.examples_of[document].append(position)

    def subset(self, rows: Sequence[int]) -> DocumentSet:
        """The documents at `rows`, in that order, with their examples."""
        examples, owners = [], []
        for new, row in enumerate(rows):
            for position in self.examples_of[row]:
                examples.append(self.documents.examples[position])
                owners.append(new)
        return DocumentSet(examples=examples, example_document=owners, document_ids=[self.documents.document_ids[r] for r in rows],
                           sources=[self.documents.sources[r] for r in rows])


class _RowRange:
    """Rows [offset, offset + count) of the first pass's `ShardedResponses`, as a store of their own (for `gram_basis`
    and `spearman_at_ranks`), readable by column slabs straight from the memory-mapped shards."""

    def __init__(self, store: ShardedResponses, offset: int, count: int):
        self.store, self.offset, self.num_rows, self.dim = store, offset, count, store.dim

    def rows(self, indices) -> torch.Tensor:
        return self.store.rows([self.offset + i for i in indices])

    def columns(self, lo: int, hi: int) -> torch.Tensor:
        """All rows, columns lo:hi: [count, hi − lo]."""
        parts = []
        first, last = self.offset, self.offset + self.num_rows
        for shard, start in zip(self.store.shards, self.store.offsets):
            begin, end = max(first, start), min(last, start + shard.rows)
            if begin < end:
                with safe_open(str(self.store.directory / shard.filename), framework="pt") as handle:
                    # a copy: the slice is a view into the shard's whole rows, which would stay in memory until every
                    # shard was read (the basis step's peak then grew with the sample: 8.7 GB at 3,584 documents)
                    parts.append(handle.get_slice(TENSOR_NAME)[begin - start : end - start, lo:hi].clone())
        return torch.cat(parts) if parts else torch.empty(0, hi - lo)


def plan_documents(num_documents: int, compression: CompressionConfig, seed: int) -> dict[str, list[int]]:
    """Disjoint seeded sets of document rows: "sample" (fixes the basis), "validation" (picks k), "heldout" (fidelity)."""
    order = torch.randperm(num_documents, generator=torch.Generator().manual_seed(seed + 3)).tolist()
    n_sample = min(compression.sample_documents, num_documents)
    n_validation = min(compression.validation_documents, num_documents - n_sample)
    n_heldout = min(compression.heldout_documents, num_documents - n_sample - n_validation)
    cuts = [0, n_sample, n_sample + n_validation, n_sample + n_validation + n_heldout]
    names = ("sample", "validation", "heldout")
    return {name: sorted(order[cuts[i] : cuts[i + 1]]) for i, name in enumerate(names)}


def query_sets(train_examples: Sequence[Any], count: int, seed: int) -> tuple[list, list]:
    """(fidelity queries, test queries): disjoint seeded samples of training examples (f_q: their log-likelihood)."""
    order = torch.randperm(len(train_examples), generator=torch.Generator().manual_seed(seed + 4)).tolist()
    count = min(count, max(1, len(order) // 2))
    return [train_examples[i] for i in order[:count]], [train_examples[i] for i in order[count : 2 * count]]


def simulate_compressed(
    subspace: AttributionSubspace,
    task,
    documents: DocumentSet,
    train_examples: Sequence[Any],
    config: AttributionConfig,
    compression: CompressionConfig,
    output_dir: Path,
    processes,
    identity: dict,
    step_size: Optional[float],
    eigenbasis: Any = None,
    gradient_method: str = "auto",
    progress: bool = True,
) -> tuple[Optional[ProjectedResponses], dict]:
    """Simulate every document's response and keep its coefficients on a basis fixed from a sample (module docstring).

    Returns (the coefficient store with its basis, figures) on the main process, (None, {}) on the others. The
    coefficient shards are written into `output_dir` (the build's staging folder, left marked unfinished) like exact
    response shards; the work folder inside it is removed by the artifact's save, which keeps only artifact files.
    """
    start, start_cpu = time.perf_counter(), time.process_time()
    output_dir, work = Path(output_dir), Path(output_dir) / WORK_NAME
    dim, chunk = subspace.dim, compression.chunk_rows(subspace.dim)
    picker = DocumentPicker(documents)
    plan = plan_documents(len(documents), compression, config.seed)
    first = plan["sample"] + plan["validation"]
    fidelity_queries, test_queries = query_sets(train_examples, compression.queries, config.seed)
    show = progress and processes.is_main

    # per-example gradients of at most `chunk` examples at a time too: memory stays within chunk_size whatever p is
    chunk_config = dataclasses.replace(config, simulation_chunk_size=max(1, min(config.simulation_chunk_size, chunk)))

    def simulate(rows: Sequence[int]) -> torch.Tensor:
        result = simulate_responses(subspace, task, picker.subset(rows), train_examples, chunk_config, step_size=step_size,
                                    gradient_method=gradient_method, eigenbasis=eigenbasis)
        return result.responses

    # ---- pass 1: exact responses of the sample and the validation documents
    first_identity = {**identity, "first_pass": _digest(first), "chunk_rows": chunk}
    first_store = _finished_first_pass(work, first_identity)
    if first_store is None:
        if processes.is_main:
            writer = ShardWriter(work, first_identity, len(first), dim, torch.float32, shard_rows=chunk, create=True)
        processes.barrier()
        if not processes.is_main:
            writer = ShardWriter(work, first_identity, len(first), dim, torch.float32, shard_rows=chunk, create=False)
        pending = processes.pending_shards(writer)
        bar = tqdm(total=len(pending), desc="Compressed simulation: sample responses", disable=not show)
        for position, (index, lo, hi) in enumerate(pending):
            if position % processes.world == processes.rank:
                writer.write(index, simulate(first[lo:hi]))
            bar.update(1)
        bar.close()
        processes.barrier()
        if processes.is_main:
            writer.finish({_IDENTITY_KEY: _digest(first_identity)})
        processes.barrier()
        first_store = ShardedResponses.open(work)
    first_seconds, first_cpu = time.perf_counter() - start, time.process_time() - start_cpu

    # ---- the basis and its rank (main process), then shared through the work folder
    figures: dict = {}
    if processes.is_main:
        basis_start = time.perf_counter()
        sample = _RowRange(first_store, 0, len(plan["sample"]))
        directions, singular_values = gram_basis(sample, compression.max_rank, block_rows=chunk)
        directions = directions.to(compression.torch_basis_dtype)  # rounded once: every figure and coefficient uses the stored V
        rank = directions.shape[0]
        if plan["validation"]:
            gradients = query_gradients(subspace, task, fidelity_queries, dtype=torch.float32).cpu()
            spearman_at = spearman_at_ranks(gradients, _RowRange(first_store, len(plan["sample"]), len(plan["validation"])), directions, chunk)
            figures["validation_spearman_by_rank"] = {str(r): spearman_at(r) for r in _ranks_up_to(rank)}
            rank = smallest_sufficient_rank(spearman_at, rank, compression.fidelity)
            figures["validation_spearman"] = spearman_at(rank)
            if figures["validation_spearman"] < compression.fidelity:
                logger.warning("Compressed responses: rank %d (the largest, max_rank=%d or the sample's rank) reaches Spearman %.3f < %.3f "
                               "on the validation documents; raise max_rank / sample_documents, or store exact responses.",
                               rank, compression.max_rank, figures["validation_spearman"], compression.fidelity)
        save_basis(work, {"directions": directions[:rank].contiguous(), "singular_values": singular_values[:rank].contiguous()})
        figures["basis_seconds"] = time.perf_counter() - basis_start
    else:
        rank = None
    rank = processes.broadcast(rank)
    processes.barrier()
    basis = load_basis(work, rank, dim)
    directions = basis["directions"]

    # ---- pass 2: every document projected as it is produced; exact scores of the held-out documents kept
    second_start, second_cpu = time.perf_counter(), time.process_time()
    coefficient_identity = {**identity, "basis_sha256": hashlib.sha256(directions.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()}
    dtype = config.torch_dtype
    if processes.is_main:
        writer = ShardWriter(output_dir, coefficient_identity, len(documents), rank, dtype, shard_rows=compression.shard_documents, create=True,
                             replace_foreign=True)  # output_dir is the build's own staging folder
    processes.barrier()
    if not processes.is_main:
        writer = ShardWriter(output_dir, coefficient_identity, len(documents), rank, dtype, shard_rows=compression.shard_documents, create=False)
    test_gradients = query_gradients(subspace, task, test_queries, dtype=torch.float32)
    in_first = {row: position for position, row in enumerate(first)}
    heldout = set(plan["heldout"])
    pending = processes.pending_shards(writer)
    bar = tqdm(total=len(documents), desc="Compressed simulation: all documents", disable=not show)
    for position, (index, lo, hi) in enumerate(pending):
        if position % processes.world != processes.rank:
            bar.update(hi - lo)
            continue
        coefficients = torch.empty(hi - lo, rank, dtype=torch.float32)
        kept_rows, kept_scores = [], []
        stored = [row for row in range(lo, hi) if row in in_first]
        fresh = [row for row in range(lo, hi) if row not in in_first]
        blocks = [(stored[i : i + chunk], lambda rows: first_store.rows([in_first[r] for r in rows])) for i in range(0, len(stored), chunk)]
        blocks += [(fresh[i : i + chunk], simulate) for i in range(0, len(fresh), chunk)]
        for rows, produce in blocks:
            responses = produce(rows).to(subspace.device, torch.float32)
            coefficients[[r - lo for r in rows]] = project_responses(responses, directions).cpu()
            tested = [i for i, r in enumerate(rows) if r in heldout]
            if tested:
                kept_rows += [rows[i] for i in tested]
                kept_scores.append((test_gradients @ responses[tested].T).cpu())
            bar.update(len(rows))
        _save_heldout(work, index, kept_rows, torch.cat(kept_scores, dim=1) if kept_scores else torch.zeros(len(test_queries), 0))
        writer.write(index, coefficients)
    bar.close()
    processes.barrier()
    if not processes.is_main:
        return None, {}
    store = ProjectedResponses(writer.finish(keep_progress=True), directions, basis.get("singular_values"))
    figures.update(_heldout_fidelity(work, len(writer.names), store, test_gradients.cpu(), directions))
    figures.update({
        "rank": rank, "sample_documents": len(plan["sample"]), "validation_documents": len(plan["validation"]),
        "first_pass_seconds": first_seconds, "second_pass_seconds": time.perf_counter() - second_start,
        "first_pass_cpu_seconds": first_cpu, "second_pass_cpu_seconds": time.process_time() - second_cpu,
        "queries": len(test_queries),
    })
    logger.info("Compressed responses: rank %d of p = %d from %d sampled documents; held-out Spearman %s on %d documents.",
                rank, dim, len(plan["sample"]), _format(figures.get("heldout_spearman")), figures.get("heldout_documents", 0))
    return store, figures


def _finished_first_pass(work: Path, identity: dict) -> Optional[ShardedResponses]:
    index = work / "responses.safetensors.index.json"
    if not index.is_file():
        return None
    try:
        recorded = json.loads(index.read_text(encoding="utf-8"))["metadata"].get(_IDENTITY_KEY)
    except (ValueError, KeyError):
        return None
    return ShardedResponses.open(work) if recorded == _digest(identity) else None


def _save_heldout(work: Path, index: int, rows: list[int], scores: torch.Tensor) -> None:
    path = work / f"heldout-{index:05d}.safetensors"
    tmp = path.with_name(path.name + ".tmp")
    save_file({"rows": torch.tensor(rows, dtype=torch.long), "scores": scores.contiguous()}, str(tmp), metadata={"format": "pt"})
    tmp.replace(path)


def _heldout_fidelity(work: Path, shards: int, store: ProjectedResponses, gradients: torch.Tensor, directions: torch.Tensor) -> dict:
    rows, scores = [], []
    for index in range(shards):
        with safe_open(str(work / f"heldout-{index:05d}.safetensors"), framework="pt") as handle:
            rows.append(handle.get_tensor("rows"))
            scores.append(handle.get_tensor("scores"))
    rows_all = torch.cat(rows)
    if len(rows_all) < 2:
        return {"heldout_documents": int(len(rows_all))}
    exact = torch.cat(scores, dim=1).to(torch.float64)
    approximate = ((gradients @ directions.to(torch.float32).T) @ store.coefficients.rows(rows_all.tolist()).to(torch.float32).T).to(torch.float64)
    return {
        "heldout_documents": int(len(rows_all)),
        "heldout_spearman": float(spearman_rows(exact, approximate).nanmean()),
        "heldout_pearson": float(pearson_rows(exact, approximate).nanmean()),
    }


def _ranks_up_to(rank: int) -> list[int]:
    """1, 2, 4, ... and `rank` itself: where the validation curve is recorded."""
    return sorted({2**i for i in range(rank.bit_length()) if 2**i <= rank} | {rank})


def _format(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.4f}"
