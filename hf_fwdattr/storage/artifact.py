"""`InfluenceArtifact`: the simulated responses as a Hugging Face object (DESIGN §6).

    attribution_config.json              settings, subspace description, fingerprints, fidelity, and the size and
                                         SHA-256 of every file below (sealed: it carries the digest of its own bytes)
    documents.jsonl                      document_id, source, n_tokens, metadata (row order = tensor order)
    responses-0000i-of-0000M.safetensors the responses u_b, sharded   (+ responses.safetensors.index.json, which
                                         records every shard's digest and the digest of all rows); compressed
                                         responses: their coefficients c_b on the response basis, [N, k]
    response_basis.safetensors           compressed responses only: the directions V [k, p] (records the digest of
                                         the coefficients it belongs to)
    source_responses.safetensors         the summed response of each source
    readout_basis.safetensors            optional compressed readout basis (records the rows digest it was built from)
    README.md                            model card rendered from model_cards/ (not recorded: free to edit)

Safetensors and JSON only: nothing in an artifact can execute code. Saving builds the new artifact beside the folder
and swaps it in (`atomic`); loading checks every digest but the shards' full ones, which `verify()` adds (`integrity`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import torch
from safetensors.torch import load as load_safetensors

from .. import __version__
from ..errors import (
    ArtifactError,
    ArtifactIntegrityError,
    FingerprintMismatchError,
    SubspaceError,
    UnfinishedArtifactError,
)
from ..estimator.config import AttributionConfig, ReadoutMode
from ..estimator.documents import DocumentSet
from ..estimator.subspace import AttributionSubspace, SubspaceSpec
from .atomic import (
    CONFIG_NAME,
    PROGRESS_NAME,
    check_replaceable,
    prepare_staging,
    recover,
    recover_for_reading,
    save_lock,
    swap_into_place,
)
from .integrity import (
    FileRecord,
    Folder,
    content_digest,
    parse_json_object,
    plain_name,
    safetensors_header,
    seal_json,
    sealed_digest,
)
from .coefficients import BASIS_FILE, ProjectedResponses, check_basis
from .compression import CompressionConfig, ResponseStorage
from .shards import (
    INDEX_NAME,
    ComposedResponses,
    InMemoryResponses,
    ShardedResponses,
    ShardWriter,
    save_tensors_atomic,
    write_bytes_atomic,
    write_json_atomic,
)
from .table import DOCUMENTS_NAME, DocumentTable, sum_by_source

logger = logging.getLogger(__name__)

SOURCES_NAME = "source_responses.safetensors"
BASIS_NAME = "readout_basis.safetensors"
CARD_NAME = "README.md"
FORMAT_VERSION = 2  # 2: sealed config with a digest of every file; 1: header digests of the shards only
SEAL_KEY = "config_sha256"
_KNOWN_KEYS = {
    "format_version", "library_version", "estimator", "subspace", "fingerprints", "base_model", "num_documents",
    "dim", "dtype", "simulation", "fidelity", "sources", "files", "compression", SEAL_KEY,
}
_DTYPE_NAMES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def summed_responses(table: DocumentTable, store, source_names: Sequence[str], chunk_rows: int = 4096, absolute: bool = False) -> torch.Tensor:
    """[len(source_names), dim]: each source's summed response, streamed over the rows of `store` (float64 sums);
    with `absolute`, the float64 sums of absolute values (the scale a rounding error of the sums is measured against).
    For compressed responses, the sum of the projected responses (summed over the coefficients)."""
    if isinstance(store, ProjectedResponses) and not absolute:
        return store.summed_by_source(table, source_names, chunk_rows)
    positions = table.source_positions(source_names)
    sums = torch.zeros(len(source_names), store.dim, dtype=torch.float64)
    if len(source_names):
        row = 0
        for block in store.iter_chunks(chunk_rows):
            block = block.to(torch.float64)
            sums += sum_by_source(block.abs() if absolute else block, positions[row : row + len(block)], len(source_names))
            row += len(block)
    return sums if absolute else sums.to(store.dtype)


def artifact_settings(config: AttributionConfig, subspace_spec: SubspaceSpec, model_fingerprint: str, subspace_fingerprint: str,
                      compression: Optional[CompressionConfig] = None) -> dict:
    """The settings an artifact is made with; a folder holding other settings is not overwritten. `compression`: the
    settings of compressed response storage (None for exact responses, whose settings have no such entry)."""
    settings = {
        "estimator": config.to_dict(),
        "subspace": subspace_spec.to_dict(),
        "fingerprints": {"model": model_fingerprint, "subspace": subspace_fingerprint},
    }
    if compression is not None:
        settings["compression"] = compression.to_dict()
    return settings


def shard_identity(settings: dict, document_ids: Sequence[str], token_digests: Sequence[str]) -> dict:
    """What determines the response rows: the settings and every document's id and token digest (`document_digests`),
    hashed without separators that could collide. A save resumes only into shards of the same identity."""
    if len(token_digests) != len(document_ids):
        raise ArtifactError(f"{len(token_digests)} token digests for {len(document_ids)} documents.")
    return {**settings, "documents_sha256": content_digest([[d, t] for d, t in zip(document_ids, token_digests)])}


def refuse_foreign_artifact(directory: Path, settings: dict) -> None:
    """Raise if `directory` holds an artifact made with settings other than `settings` (both are shown)."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        return
    try:
        there = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(there, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as err:
        raise ArtifactError(f"{directory} holds an influence artifact whose {CONFIG_NAME} cannot be read ({err}); pass overwrite=True to replace it.") from err
    different = [k for k in settings if there.get(k) != settings[k]]
    if different:
        raise ArtifactError(
            f"{directory} already holds an influence artifact made with other settings:\n"
            + "\n".join(f"  {k}: there {json.dumps(there.get(k), sort_keys=True)}\n  {' ' * len(k)}  now   {json.dumps(settings[k], sort_keys=True)}"
                        for k in different)
            + "\nSave elsewhere, or pass overwrite=True."
        )


class InfluenceArtifact:
    """Per-document responses u_b with everything needed to read scores out of them again.

    Make one with `InfluenceArtifact.from_simulation` (or let `ForwardAttributionCallback` do it), then
    `save_pretrained` / `push_to_hub`; load with `from_pretrained` (a folder or a Hub repo id). Before
    scoring, `bind(model)` rebuilds the attribution subspace on the model and refuses a model whose
    weights, adapter or subspace differ from the ones the responses were made with.
    """

    def __init__(
        self,
        *,
        config: AttributionConfig,
        subspace_spec: SubspaceSpec,
        documents: DocumentTable,
        responses: Any,
        model_fingerprint: str,
        subspace_fingerprint: str,
        base_model: Optional[dict] = None,
        simulation: Optional[dict] = None,
        fidelity: Optional[dict] = None,
        source_names: Optional[list[str]] = None,
        source_responses: Optional[torch.Tensor] = None,
        readout_basis: Optional[dict[str, torch.Tensor]] = None,
        library_version: str = __version__,
        path: Optional[Path] = None,
        readout_basis_rows_sha256: Optional[str] = None,
        compression: Optional[CompressionConfig] = None,
    ):
        self.config = config
        self.subspace_spec = subspace_spec
        self.documents = documents
        self._store = InMemoryResponses(responses) if isinstance(responses, torch.Tensor) else responses
        if self._store.num_rows != len(documents):
            raise ArtifactError(f"{self._store.num_rows} response rows for {len(documents)} documents; they must match row for row.")
        self.model_fingerprint = model_fingerprint
        self.subspace_fingerprint = subspace_fingerprint
        if isinstance(self._store, ProjectedResponses) and compression is None:
            compression = CompressionConfig(storage=ResponseStorage.COMPRESSED)
        self.compression = compression if isinstance(self._store, ProjectedResponses) else None
        self.base_model = dict(base_model or {})
        self.simulation = dict(simulation or {})
        self.fidelity = dict(fidelity or {})
        self.source_names = list(documents.source_names() if source_names is None else source_names)
        if not self.sums_sources:
            source_responses = None  # a nonlinear (removal) readout sums document scores instead
        elif source_responses is None:
            source_responses = summed_responses(documents, self._store, self.source_names)
        self.source_responses = source_responses
        self.readout_basis = None
        self.readout_basis_rows_sha256: Optional[str] = None  # digest of the rows the basis was built from
        if readout_basis is not None:
            self._check_basis_shapes(readout_basis)
            self.readout_basis = dict(readout_basis)
            legacy = isinstance(self._store, ShardedResponses) and not self._store.digested  # format 1: provenance unknown
            self.readout_basis_rows_sha256 = readout_basis_rows_sha256 or (None if legacy else self._store.rows_sha256())
        self.library_version = library_version
        self.path = path

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_simulation(
        cls,
        subspace: AttributionSubspace,
        documents: DocumentSet,
        result,
        config: AttributionConfig,
        n_tokens: Optional[Sequence[int]] = None,
        metadata: Optional[Sequence[dict]] = None,
        base_model: Optional[dict] = None,
        responses: Any = None,
    ) -> "InfluenceArtifact":
        """An artifact from a `SimulationResult` (or from `responses`, e.g. shards already written)."""
        return cls(
            config=config,
            subspace_spec=subspace.spec,
            documents=DocumentTable.from_document_set(documents, n_tokens, metadata),
            responses=result.responses if responses is None else responses,
            model_fingerprint=subspace.model_fingerprint,
            subspace_fingerprint=subspace.fingerprint,
            base_model=base_model or base_model_of(subspace.model),
            simulation={"step_size": result.step_size, "top_eigenvalue": result.top_eigenvalue, "seconds": result.seconds},
        )

    # ------------------------------------------------------------------ reading
    @property
    def num_documents(self) -> int:
        """Number of documents (response rows)."""
        return self._store.num_rows

    @property
    def dim(self) -> int:
        """Dimension of the attribution subspace."""
        return self._store.dim

    @property
    def store(self):
        """Where the response rows are read from (`ShardedResponses`, `InMemoryResponses`, ...)."""
        return self._store

    @property
    def compressed(self) -> bool:
        """Whether the responses are stored as coefficients on a basis (`ProjectedResponses`) rather than exactly."""
        return isinstance(self._store, ProjectedResponses)

    @property
    def sums_sources(self) -> bool:
        """Whether the artifact keeps each source's summed response: for linear readouts a source's score is the score
        of that sum (one direction per source); the removal readout is nonlinear, so there it sums document scores."""
        return self.config.readout is not ReadoutMode.REMOVAL

    def _check_basis_shapes(self, basis: dict[str, torch.Tensor]) -> None:
        directions, coefficients = basis.get("directions"), basis.get("coefficients")
        if not isinstance(directions, torch.Tensor) or not isinstance(coefficients, torch.Tensor) or directions.dim() != 2 \
                or coefficients.dim() != 2 or directions.shape[1] != self.dim or coefficients.shape[0] != self.num_documents \
                or coefficients.shape[1] != directions.shape[0]:
            shapes = {k: tuple(v.shape) for k, v in basis.items() if isinstance(v, torch.Tensor)}
            raise ArtifactError(
                f"A readout basis for this artifact needs directions [k, {self.dim}] and coefficients [{self.num_documents}, k]; got {shapes}. "
                "It was built for other responses: rebuild it (`build_readout_basis`)."
            )

    def set_readout_basis(self, basis: dict[str, torch.Tensor], fidelity: dict[str, Any]) -> None:
        """Attach a compressed readout basis ({"directions": [k, p], "coefficients": [N, k], ...}) built from this
        artifact's responses, and its fidelity figures. The digest of the rows it was built from is recorded with it."""
        self._check_basis_shapes(basis)
        self.readout_basis = dict(basis)
        self.readout_basis_rows_sha256 = self._store.rows_sha256()
        self.fidelity.update(fidelity)

    @property
    def step_size(self) -> Optional[float]:
        """η the responses were simulated with (responses to add must use the same)."""
        return self.simulation.get("step_size")

    def iter_responses(self, chunk_rows: int = 4096, device=None) -> Iterator[torch.Tensor]:
        """Stream the responses in row order, `chunk_rows` at a time (shards are memory-mapped)."""
        return self._store.iter_chunks(chunk_rows, device)

    def responses(self, rows: Optional[Sequence[int]] = None) -> torch.Tensor:
        """Responses as a tensor: all of them (small artifacts) or the given rows."""
        return self._store.to_tensor() if rows is None else self._store.rows(rows)

    def verify(self, chunk_rows: int = 4096) -> None:
        """Check everything, reading every response once (loading already checked the cheap parts: the sealed config,
        the documents table, the source sums, the readout basis, the response basis of compressed responses, the
        shards' sizes and headers).

        Every shard's bytes against its SHA-256 (the coefficients' shards of compressed responses), the rows against
        the digest the readout basis records as its origin, every value finite, and each source's summed response
        against the sum of its documents' responses. Raises `ArtifactIntegrityError` naming the file that does not match.
        """
        rows = self._rows()
        if isinstance(rows, ShardedResponses):
            rows.verify_data(chunk_rows)
        else:
            for block in rows.iter_chunks(chunk_rows):
                if not torch.isfinite(block).all():
                    raise ArtifactIntegrityError("The artifact's responses contain non-finite values.")
        if self.readout_basis is not None and self.readout_basis_rows_sha256 not in (None, rows.rows_sha256()):
            raise ArtifactIntegrityError(f"{BASIS_NAME} was built from other responses than this artifact's.")
        if self.source_responses is not None and self.source_names:
            exact = summed_responses(self.documents, self._store, self.source_names, chunk_rows).to(torch.float64)
            scale = summed_responses(self.documents, self._store, self.source_names, chunk_rows, absolute=True)
            tolerance = 4 * torch.finfo(self._store.dtype).eps * scale + torch.finfo(torch.float64).tiny
            error = (self.source_responses.to(torch.float64) - exact).abs()
            if not bool((error <= tolerance).all()):
                row = int((error - tolerance).amax(dim=1).argmax())
                raise ArtifactIntegrityError(
                    f"{SOURCES_NAME}: the summed response of source {self.source_names[row]!r} is not the sum of its documents' responses."
                )

    def _rows(self):
        """What the response shards hold: the responses, or the coefficients of compressed responses."""
        return self._store.coefficients if self.compressed else self._store

    def close(self) -> None:
        """Close the files a loaded artifact keeps open (reading responses then fails)."""
        rows = self._rows()
        stores = [rows] + [store for store, _ in getattr(rows, "parts", [])]
        for store in stores:
            if hasattr(store, "close"):
                store.close()

    # ------------------------------------------------------------------ model binding
    def check_subspace(self, subspace: AttributionSubspace) -> None:
        """Raise `FingerprintMismatchError` unless `subspace` is the one the responses were made in."""
        problems = []
        if not subspace.matches_model_fingerprint(self.model_fingerprint):
            problems.append(f"model weights: the artifact was made for {self.model_fingerprint[:27]}…, this model is {subspace.model_fingerprint[:27]}…")
        if subspace.fingerprint != self.subspace_fingerprint:
            problems.append(f"attribution subspace: the artifact's is {self.subspace_fingerprint[:16]}…, this one is {subspace.fingerprint[:16]}…")
        if subspace.dim != self.dim:
            problems.append(f"dimension: the artifact's responses have {self.dim}, the subspace has {subspace.dim}")
        if problems:
            made_for = self.base_model.get("name_or_path") or "another model"
            raise FingerprintMismatchError(
                f"This influence artifact does not belong to this model ({made_for!s} was used to make it): "
                + "; ".join(problems)
                + ". Load the exact weights and adapter the artifact was simulated on, or simulate a new artifact."
            )

    def bind(self, model: torch.nn.Module) -> AttributionSubspace:
        """Rebuild the attribution subspace on `model` and check the fingerprints; returns the subspace.

        For a projection subspace the adapter is injected into `model` (outputs unchanged); call
        `remove()` on the returned subspace to take it out.
        """
        spec = SubspaceSpec.from_dict(self.subspace_spec.to_dict())
        try:
            subspace = AttributionSubspace.build(model, spec)
        except SubspaceError as err:
            raise FingerprintMismatchError(f"This influence artifact does not fit this model: {err}") from err
        try:
            self.check_subspace(subspace)
        except FingerprintMismatchError:
            subspace.remove()
            raise
        return subspace

    # ------------------------------------------------------------------ editing
    def add_documents(self, documents: Union[DocumentTable, DocumentSet], responses: torch.Tensor) -> "InfluenceArtifact":
        """A new artifact with `documents` appended. Their `responses` must be simulated in the same subspace
        with the same settings and step size (`self.step_size`); nothing already stored is recomputed."""
        table = documents if isinstance(documents, DocumentTable) else DocumentTable.from_document_set(documents)
        if responses.dim() != 2 or tuple(responses.shape) != (len(table), self.dim):
            raise ArtifactError(f"New responses must have shape [{len(table)}, {self.dim}], got {tuple(responses.shape)}.")
        finite = torch.isfinite(responses).all(dim=1)
        if not bool(finite.all()):
            bad = [table.document_ids[i] for i in torch.nonzero(~finite).flatten().tolist()]
            raise ArtifactError(
                f"The responses of documents {bad[:5]} ({len(bad)} in all) contain NaN or infinite values; they would be ranked "
                "arbitrarily. Simulate them again (a non-finite loss, or a diverging simulation, makes them)."
            )
        if self.compressed:  # projected on the stored basis; only their coefficients are kept
            added = ProjectedResponses(InMemoryResponses(self._store.project(responses)), self._store.directions)
            store = ProjectedResponses(ComposedResponses([(self._store.coefficients, None), (added.coefficients, None)]),
                                       self._store.directions, self._store.singular_values)
        else:
            added = InMemoryResponses(responses)
            store = ComposedResponses([(self._store, None), (added, None)])
        combined_table = self.documents.concat(table)
        names = self.source_names + [name for name in table.source_names() if name not in self.source_names]
        sums = None
        if self.sums_sources:
            sums = summed_responses(table, added, names).to(torch.float64)
            sums[: len(self.source_names)] += self.source_responses.to(torch.float64)
            sums = sums.to(self._store.dtype)
        return self._replace(combined_table, store, names, sums)

    def remove_documents(self, document_ids: Sequence[str]) -> "InfluenceArtifact":
        """A new artifact without the given documents; the rest are kept as stored (source sums recomputed exactly)."""
        if isinstance(document_ids, (str, bytes)):
            raise ArtifactError(
                f"`document_ids` must be a list of ids, got the string {document_ids!r}, which would be read as its characters; "
                f"pass [{document_ids!r}]."
            )
        drop = set(map(str, document_ids))
        unknown = sorted(drop - set(self.documents.document_ids))
        if unknown:
            raise ArtifactError(f"No documents with ids {unknown[:5]} in this artifact.")
        keep = [i for i, d in enumerate(self.documents.document_ids) if d not in drop]
        if not keep:
            raise ArtifactError("Removing these documents would leave the artifact empty.")
        table = self.documents.select(keep)
        store = self._store.select(keep) if self.compressed else ComposedResponses([(self._store, torch.tensor(keep))])
        return self._replace(table, store, None, None)

    def _replace(self, table, store, names, sums) -> "InfluenceArtifact":
        if self.readout_basis is not None:
            logger.warning("The compressed readout basis no longer matches the documents and was dropped; rebuild it.")
        return InfluenceArtifact(
            config=self.config, subspace_spec=self.subspace_spec, documents=table, responses=store,
            model_fingerprint=self.model_fingerprint, subspace_fingerprint=self.subspace_fingerprint,
            base_model=self.base_model, simulation=self.simulation, source_names=names,
            # the compression's fidelity was measured on held-out documents: it describes added documents as well
            fidelity={k: v for k, v in self.fidelity.items() if k.startswith("compression_")},
            source_responses=sums, readout_basis=None, library_version=self.library_version, compression=self.compression,
        )

    # ------------------------------------------------------------------ saving
    def _metadata(self, files: dict[str, FileRecord]) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "library_version": self.library_version,
            **self.settings(),
            "base_model": self.base_model,
            "num_documents": self.num_documents,
            "dim": self.dim,
            "dtype": str(self._store.dtype).replace("torch.", ""),
            "simulation": self.simulation,
            "fidelity": self.fidelity,
            "sources": self.source_names,
            "files": {name: record.to_dict() for name, record in sorted(files.items())},
            **({"compression": self.compression.to_dict()} if self.compressed else {}),
        }

    def settings(self) -> dict:
        """Estimator settings, subspace description and fingerprints (see `artifact_settings`)."""
        return artifact_settings(self.config, self.subspace_spec, self.model_fingerprint, self.subspace_fingerprint, self.compression)

    def save_pretrained(self, save_directory: Union[str, Path], max_shard_size: Union[int, str] = "1GB", overwrite: bool = False) -> Path:
        """Write the artifact to `save_directory`, replacing what is there only once the new artifact is complete.

        The new artifact is written into a sibling folder (``.<name>.fwdattr-staging``, shard by shard, each shard
        through a temporary file and a rename) and then swapped in by renames; until the swap the folder keeps its
        previous artifact, and an interrupted swap is completed (or undone) by the next save or load. An interrupted
        save resumes from its finished shards when called again. One process saves to a folder at a time (a second
        one gets `ArtifactBusyError`). A folder holding an artifact made with other settings is refused unless
        `overwrite=True`; a folder holding anything that is not part of an artifact is always refused.
        """
        target = Path(os.path.abspath(save_directory))
        with save_lock(target):
            recover(target)
            if not overwrite:
                refuse_foreign_artifact(target, self.settings())
            check_replaceable(target)
            staging = prepare_staging(target)
            table = self.documents.to_jsonl().encode("utf-8")
            store = self._write_rows(staging, target, max_shard_size, FileRecord.of_bytes(table).sha256)
            self._write_metadata(staging, store, table)
            (staging / PROGRESS_NAME).unlink(missing_ok=True)
            swap_into_place(staging, target)
        store.directory = target
        rows = self._rows()
        if rows is store or isinstance(rows, ShardedResponses):
            self._store = ProjectedResponses(store, self._store.directions, self._store.singular_values) if self.compressed else store
        self.path = target
        return target

    def _write_rows(self, staging: Path, target: Path, max_shard_size: Union[int, str], table_sha256: str):
        """The response rows (the coefficients of compressed responses) in `staging` (shards and index, the folder
        marked unfinished); returns their store."""
        store = self._rows()
        if isinstance(store, ShardedResponses) and os.path.abspath(store.directory) == str(staging):
            return store  # written there by the simulation (`build_influence_artifact`)
        if isinstance(store, ShardedResponses) and store.digested and os.path.abspath(store.directory) == str(target):
            # saving over the folder the rows are read from (e.g. new metadata): keep the very same shard files
            shutil.rmtree(staging)
            staging.mkdir()
            write_json_atomic(staging / PROGRESS_NAME, {"plan": "same shards"})
            for shard, file in zip(store.shards, store.files):
                _link_or_copy(file, target / shard.filename, staging / shard.filename)
            write_json_atomic(staging / INDEX_NAME, store.index())
            return store
        identity = {**self.settings(), "documents_table_sha256": table_sha256, "rows_sha256": store.rows_sha256()}
        writer = ShardWriter(staging, identity, self.num_documents, store.dim, store.dtype, max_shard_size, replace_foreign=True)
        for index, lo, hi in writer.pending():
            writer.write(index, store.rows(list(range(lo, hi))))
        return writer.finish(keep_progress=True)

    def _write_metadata(self, staging: Path, store, table: bytes) -> None:
        """Source sums, readout basis, response basis (compressed responses), documents table, model card and, last,
        the sealed config recording them all."""
        files = {INDEX_NAME: FileRecord.of_path(staging / INDEX_NAME)}
        if self.compressed:  # the directions the coefficients are taken on, tied to those coefficients by their digest
            save_tensors_atomic(staging / BASIS_FILE, self._store.basis_tensors(), metadata={"coefficients_sha256": store.rows_sha256()})
            files[BASIS_FILE] = FileRecord.of_path(staging / BASIS_FILE)
        if self.source_responses is not None and self.source_names:
            save_tensors_atomic(staging / SOURCES_NAME, {"responses": self.source_responses})
            files[SOURCES_NAME] = FileRecord.of_path(staging / SOURCES_NAME)
        if self.readout_basis is not None:
            if self.readout_basis_rows_sha256 is None:  # loaded from format 1, which did not record it
                self.readout_basis_rows_sha256 = store.rows_sha256()
            if self.readout_basis_rows_sha256 != store.rows_sha256():
                raise ArtifactError("The readout basis was built from other responses than the ones being saved; rebuild it before saving.")
            save_tensors_atomic(staging / BASIS_NAME, self.readout_basis,
                                metadata={"responses_sha256": self.readout_basis_rows_sha256, "num_documents": str(self.num_documents)})
            files[BASIS_NAME] = FileRecord.of_path(staging / BASIS_NAME)
        write_bytes_atomic(staging / DOCUMENTS_NAME, table)
        files[DOCUMENTS_NAME] = FileRecord.of_bytes(table)
        write_bytes_atomic(staging / CARD_NAME, str(self.model_card()).encode("utf-8"))
        keep = set(files) | {CARD_NAME, PROGRESS_NAME, *(shard.filename for shard in store.shards)}
        for entry in staging.iterdir():  # whatever an earlier, abandoned attempt left
            if entry.name not in keep:
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        write_bytes_atomic(staging / CONFIG_NAME, seal_json(self._metadata(files), SEAL_KEY).encode("utf-8"))

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        path_or_repo_id: Union[str, Path],
        revision: Optional[str] = None,
        cache_dir: Optional[Union[str, Path]] = None,
        token: Optional[str] = None,
        local_files_only: bool = False,
        verify: bool = False,
    ) -> "InfluenceArtifact":
        """Load an artifact from a folder, or from a Hub repository (through huggingface_hub's cache).

        Loading checks what is cheap and refuses any mismatch with an `ArtifactError` naming the file: the config's
        own digest and format version, the size and SHA-256 of the documents table, the shard index, the source sums
        and the readout basis (and that the basis was built from these responses), and each shard's name, size and
        header. The shards are opened, not read, and kept open; `verify=True` (or `verify()` later) also hashes every
        shard. A folder holding an unfinished save is refused; one whose save was interrupted during its final swap
        is recovered first.
        """
        directory = Path(path_or_repo_id)
        if not directory.is_dir():
            recover_for_reading(directory)
        if not directory.is_dir():
            from huggingface_hub import snapshot_download

            directory = Path(snapshot_download(
                str(path_or_repo_id), revision=revision, cache_dir=cache_dir, token=token,
                local_files_only=local_files_only, repo_type="model",
            ))
        for attempt in range(3):
            with Folder(directory) as folder:
                try:
                    artifact = cls._load(folder, directory)
                    break
                except ArtifactError:
                    if attempt == 2 or not folder.replaced():
                        raise
                    logger.info("%s was replaced by a save while it was being loaded; loading it again.", directory)
        if verify:
            artifact.verify()
        return artifact

    @classmethod
    def _load(cls, folder: Folder, directory: Path) -> "InfluenceArtifact":
        if folder.exists(PROGRESS_NAME):
            raise UnfinishedArtifactError(
                f"{directory} holds an unfinished save ({PROGRESS_NAME} is there): its files may belong to two different "
                "artifacts. Save again to the same folder to finish it."
            )
        if not folder.exists(CONFIG_NAME):
            raise ArtifactError(f"{directory} has no {CONFIG_NAME}: it is not an influence artifact.")
        meta, files = _read_config(folder.read(CONFIG_NAME), directory)
        legacy = files is None

        def payload(name: str, required: bool = True) -> Optional[bytes]:
            if not legacy and name in files:
                return folder.read(name, files[name], CONFIG_NAME)
            if legacy and folder.exists(name):
                return folder.read(name)
            if required:
                raise ArtifactIntegrityError(f"{directory / name} is missing (or not recorded in {CONFIG_NAME}); the artifact is incomplete.")
            return None

        documents = DocumentTable.from_jsonl(payload(DOCUMENTS_NAME).decode("utf-8"))
        store = ShardedResponses.open(directory, payload(INDEX_NAME), folder, require_digests=not legacy)
        try:
            config = AttributionConfig.from_dict(_entry(meta, "estimator", dict))
            spec = SubspaceSpec.from_dict(_entry(meta, "subspace", dict))
            fingerprints = _entry(meta, "fingerprints", dict)
            model_fingerprint, subspace_fingerprint = str(fingerprints["model"]), str(fingerprints["subspace"])
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            if isinstance(err, ArtifactError):
                raise
            raise ArtifactError(f"{directory / CONFIG_NAME} holds an invalid estimator, subspace or fingerprints entry ({err!r}).") from err
        compression = None
        if meta.get("compression"):  # the shards hold coefficients on the directions of the response basis file
            try:
                compression = CompressionConfig.from_dict(_entry(meta, "compression", dict))
            except (TypeError, ValueError) as err:
                if isinstance(err, ArtifactError):
                    raise
                raise ArtifactError(f"{directory / CONFIG_NAME} holds an invalid compression entry ({err!r}).") from err
            basis_metadata, basis_tensors = _tensors(payload(BASIS_FILE), BASIS_FILE)
            check_basis(basis_tensors, store.dim, meta.get("dim"), BASIS_FILE)
            if not legacy and basis_metadata.get("coefficients_sha256") != store.rows_sha256():
                raise ArtifactIntegrityError(
                    f"{BASIS_FILE} was saved with other coefficients than this artifact's shards hold; the responses would be "
                    "expanded on the wrong directions. Save the artifact again from its source, or rebuild it."
                )
            store = ProjectedResponses(store, basis_tensors["directions"], basis_tensors.get("singular_values"))
        expected = {"num_documents": len(documents), "dim": store.dim, "dtype": str(store.dtype).replace("torch.", "")}
        for key, value in expected.items():
            if key in meta and meta[key] != value:
                raise ArtifactIntegrityError(f"{CONFIG_NAME} records {key} = {meta[key]!r}, but the stored files hold {value!r}.")
        if store.num_rows != len(documents):
            raise ArtifactIntegrityError(f"{DOCUMENTS_NAME} lists {len(documents)} documents for {store.num_rows} response rows.")
        source_names = meta.get("sources") or []
        if not isinstance(source_names, list) or not all(isinstance(n, str) for n in source_names):
            raise ArtifactError(f"{directory / CONFIG_NAME}: `sources` must be a list of source names, got {source_names!r}.")
        source_responses = None
        if source_names and config.readout is not ReadoutMode.REMOVAL:
            source_responses = _tensors(payload(SOURCES_NAME), SOURCES_NAME)[1].get("responses")
            if source_responses is None or tuple(source_responses.shape) != (len(source_names), store.dim):
                shape = None if source_responses is None else tuple(source_responses.shape)
                raise ArtifactIntegrityError(f"{SOURCES_NAME} has shape {shape}, expected [{len(source_names)}, {store.dim}].")
        basis, basis_rows = None, None
        raw_basis = payload(BASIS_NAME, required=False)
        if raw_basis is not None:
            basis_metadata, basis = _tensors(raw_basis, BASIS_NAME)
            basis_rows = basis_metadata.get("responses_sha256")
            if not legacy and basis_rows != store.rows_sha256():
                raise ArtifactIntegrityError(
                    f"{BASIS_NAME} was built from other responses than this artifact's (it records {str(basis_rows)[:16]}…, the "
                    f"shards hold {store.rows_sha256()[:16]}…); it would score through other documents. Rebuild it."
                )
        try:
            return cls(
                config=config, subspace_spec=spec, documents=documents, responses=store,
                model_fingerprint=model_fingerprint, subspace_fingerprint=subspace_fingerprint,
                base_model=meta.get("base_model"), simulation=meta.get("simulation"), fidelity=meta.get("fidelity"),
                source_names=source_names, source_responses=source_responses, readout_basis=basis,
                library_version=str(meta.get("library_version", "unknown")), path=directory, readout_basis_rows_sha256=basis_rows,
                compression=compression,
            )
        except (TypeError, ValueError) as err:
            if isinstance(err, ArtifactError):
                raise
            raise ArtifactError(f"{directory / CONFIG_NAME} holds entries of the wrong type ({err!r}).") from err

    # ------------------------------------------------------------------ the Hub
    def model_card(self, repo_id: Optional[str] = None):
        """The artifact's README as a `huggingface_hub.ModelCard`, rendered from model_cards/influence_artifact.md."""
        from huggingface_hub import ModelCard, ModelCardData

        card_data = ModelCardData(
            library_name="hf_fwdattr",
            tags=["influence-functions", "data-attribution", "hf_fwdattr"],
            base_model=self.base_model.get("name_or_path") or None,
        )
        spec = self.subspace_spec
        return ModelCard.from_template(
            card_data,
            template_path=str(_card_template()),
            repo_id=repo_id,
            base_model_revision=self.base_model.get("revision"),
            num_documents=self.num_documents,
            num_sources=len(self.source_names),
            readout=self.config.readout.value.replace("_", " "),
            subspace_kind=spec.kind.value,
            subspace_rank=spec.rank if spec.kind.value == "projection" else None,
            dim=self.dim,
            solver=self.config.solver.value,
            curvature=self.config.curvature.value,
            horizon=self.config.horizon,
            damping=self.config.damping,
            step_size=self.step_size if self.step_size is not None else f"none: {self.config.horizon} Adam steps at rate {self.config.unlearning_rate}",
            batch_size=self.config.batch_size,
            dtype=str(self._store.dtype).replace("torch.", ""),
            library_version=self.library_version,
            model_fingerprint=self.model_fingerprint,
            subspace_fingerprint=self.subspace_fingerprint,
            fidelity=self.fidelity,
        )

    def push_to_hub(
        self,
        repo_id: str,
        private: Optional[bool] = None,
        commit_message: Optional[str] = None,
        token: Optional[str] = None,
        revision: Optional[str] = None,
        create_pr: bool = False,
        max_shard_size: Union[int, str] = "1GB",
    ) -> str:
        """Create (if needed) the model repo `repo_id` and upload the artifact in one commit; returns the commit URL."""
        from huggingface_hub import HfApi

        api = HfApi(token=token)
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model").repo_id
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / "artifact"
            self.save_pretrained(folder, max_shard_size=max_shard_size)
            (folder / CARD_NAME).write_text(str(self.model_card(repo_id)), encoding="utf-8")
            commit = api.upload_folder(
                repo_id=repo_id,
                folder_path=folder,
                commit_message=commit_message or f"Upload influence artifact ({self.num_documents} documents)",
                revision=revision,
                create_pr=create_pr,
                allow_patterns=["*.json", "*.jsonl", "*.safetensors", CARD_NAME],
            )
        return str(commit)

    def __repr__(self) -> str:
        return (f"InfluenceArtifact(documents={self.num_documents}, sources={len(self.source_names)}, dim={self.dim}, "
                f"subspace={self.subspace_spec.kind.value!r}, solver={self.config.solver.value!r})")


def _read_config(raw: bytes, directory: Path) -> tuple[dict, Optional[dict[str, FileRecord]]]:
    """(config, manifest of recorded files) from the bytes of `attribution_config.json`; the manifest is None for an
    artifact of format 1, which records no digests."""
    where = directory / CONFIG_NAME
    meta = parse_json_object(raw, str(where))
    seal = sealed_digest(raw, SEAL_KEY)
    if seal is not None and seal[0] != seal[1]:
        raise ArtifactIntegrityError(
            f"{where} does not match its own SHA-256 ({SEAL_KEY}): it was changed or corrupted after it was written. "
            "Download or save the artifact again."
        )
    version = meta.get("format_version", 1)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ArtifactIntegrityError(f"{where}: `format_version` must be a positive integer, got {version!r}.")
    if version > FORMAT_VERSION:
        raise ArtifactError(
            f"{where} is in format {version}, written by hf_fwdattr {meta.get('library_version', '?')}; this hf_fwdattr "
            f"({__version__}) reads formats up to {FORMAT_VERSION}. Upgrade it: pip install -U hf_fwdattr."
        )
    unknown = sorted(set(meta) - _KNOWN_KEYS)
    if unknown:
        logger.warning("This artifact was written by hf_fwdattr %s (format %s); ignoring unknown keys %s.",
                       meta.get("library_version"), version, unknown)
    if version == 1 and seal is None:
        logger.warning("%s was written before artifacts recorded digests of their files (format 1): only the shards' sizes and "
                       "headers can be checked. Save it again to record them.", directory)
        return meta, None
    if seal is None:
        raise ArtifactIntegrityError(f"{where} carries no digest of its own ({SEAL_KEY}); the file was edited or corrupted.")
    listed = meta.get("files")
    if not isinstance(listed, dict):
        raise ArtifactIntegrityError(f"{where} has no `files` record of the artifact's files.")
    files = {plain_name(name, str(where)): FileRecord.from_dict(record, name, str(where)) for name, record in listed.items()}
    return meta, files


def _entry(meta: dict, key: str, kind: type) -> Any:
    if key not in meta:
        raise ArtifactError(f"{CONFIG_NAME} lacks the entry '{key}'; the artifact is incomplete.")
    if not isinstance(meta[key], kind):
        raise ArtifactError(f"{CONFIG_NAME}: '{key}' must be a {kind.__name__}, got {type(meta[key]).__name__}.")
    return meta[key]


def _tensors(raw: bytes, name: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(metadata, tensors) of a safetensors file's bytes."""
    try:
        _, header = safetensors_header(raw, name)
        return dict(header.get("__metadata__") or {}), load_safetensors(raw)
    except ArtifactError:
        raise
    except Exception as err:  # safetensors raises its own error types for corrupted files
        raise ArtifactIntegrityError(f"{name} cannot be read ({err}).") from err


def _link_or_copy(file, source: Path, destination: Path) -> None:
    """Put the bytes of the open `file` at `destination`: a hard link to `source` when it is still that very file,
    else a copy read through the open descriptor (so what was loaded is what is saved)."""
    try:
        status = os.stat(source)
        if (status.st_dev, status.st_ino) == file.inode:
            os.link(source, destination)
            return
    except OSError:
        pass
    tmp = destination.with_name(destination.name + ".tmp")
    with open(tmp, "wb") as handle:
        for block in file.blocks():
            handle.write(block)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, destination)


def _card_template() -> Path:
    name = "influence_artifact.md"
    candidates = [Path(__file__).resolve().parents[2] / "model_cards" / name,
                  Path(sys.prefix) / "share" / "hf_fwdattr" / "model_cards" / name]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise ArtifactError(f"The model card template {name} is not installed (looked in {[str(c) for c in candidates]}).")


def base_model_of(model: torch.nn.Module) -> dict:
    """{"name_or_path", "revision"} of the base model under `model` (a PEFT model's base), recorded in an artifact."""
    config = getattr(model, "config", None)
    base = getattr(model, "get_base_model", None)
    if base is not None:
        config = getattr(base(), "config", config)
    name = getattr(config, "_name_or_path", None) or getattr(config, "name_or_path", None)
    return {"name_or_path": name or None, "revision": getattr(config, "_commit_hash", None)}
