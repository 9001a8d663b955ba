"""`InfluenceArtifact`: the simulated responses as a Hugging Face object (DESIGN §6).

    attribution_config.json              settings, subspace description, fingerprints, fidelity
    documents.jsonl                      document_id, source, n_tokens, metadata (row order = tensor order)
    responses-0000i-of-0000M.safetensors the responses u_b, sharded   (+ responses.safetensors.index.json)
    source_responses.safetensors         the summed response of each source
    readout_basis.safetensors            optional compressed readout basis
    README.md                            model card rendered from model_cards/

Safetensors and JSON only: nothing in an artifact can execute code.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .. import __version__
from ..errors import ArtifactError, FingerprintMismatchError, SubspaceError
from ..estimator.config import AttributionConfig, ReadoutMode
from ..estimator.documents import DocumentSet
from ..estimator.subspace import AttributionSubspace, SubspaceSpec
from .permissions import give_default_mode
from .shards import (
    ComposedResponses,
    InMemoryResponses,
    ShardedResponses,
    ShardWriter,
    write_json_atomic,
)
from .table import DOCUMENTS_NAME, DocumentTable, sum_by_source

logger = logging.getLogger(__name__)

CONFIG_NAME = "attribution_config.json"
SOURCES_NAME = "source_responses.safetensors"
BASIS_NAME = "readout_basis.safetensors"
CARD_NAME = "README.md"
FORMAT_VERSION = 1
_KNOWN_KEYS = {
    "format_version", "library_version", "estimator", "subspace", "fingerprints", "base_model", "num_documents",
    "dim", "dtype", "simulation", "fidelity", "sources",
}


def summed_responses(table: DocumentTable, store, source_names: Sequence[str], chunk_rows: int = 4096) -> torch.Tensor:
    """[len(source_names), dim]: each source's summed response, streamed over the rows of `store` (float64 sums)."""
    positions = table.source_positions(source_names)
    sums = torch.zeros(len(source_names), store.dim, dtype=torch.float64)
    if len(source_names):
        row = 0
        for block in store.iter_chunks(chunk_rows):
            sums += sum_by_source(block.to(torch.float64), positions[row : row + len(block)], len(source_names))
            row += len(block)
    return sums.to(store.dtype)


def artifact_settings(config: AttributionConfig, subspace_spec: SubspaceSpec, model_fingerprint: str, subspace_fingerprint: str) -> dict:
    """The settings an artifact is made with; a folder holding other settings is not overwritten."""
    return {
        "estimator": config.to_dict(),
        "subspace": subspace_spec.to_dict(),
        "fingerprints": {"model": model_fingerprint, "subspace": subspace_fingerprint},
    }


def shard_identity(settings: dict, document_ids: Sequence[str]) -> dict:
    """What determines the response rows; a save resumes only into shards of the same identity."""
    return {**settings, "documents_sha256": hashlib.sha256("\n".join(document_ids).encode()).hexdigest()}


def refuse_foreign_artifact(directory: Path, settings: dict) -> None:
    """Raise if `directory` holds an artifact made with settings other than `settings` (both are shown)."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        return
    there = json.loads(path.read_text(encoding="utf-8"))
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
    ):
        self.config = config
        self.subspace_spec = subspace_spec
        self.documents = documents
        self._store = InMemoryResponses(responses) if isinstance(responses, torch.Tensor) else responses
        if self._store.num_rows != len(documents):
            raise ArtifactError(f"{self._store.num_rows} response rows for {len(documents)} documents; they must match row for row.")
        self.model_fingerprint = model_fingerprint
        self.subspace_fingerprint = subspace_fingerprint
        self.base_model = dict(base_model or {})
        self.simulation = dict(simulation or {})
        self.fidelity = dict(fidelity or {})
        self.source_names = list(documents.source_names() if source_names is None else source_names)
        if not self.sums_sources:
            source_responses = None  # a nonlinear (removal) readout sums document scores instead
        elif source_responses is None:
            source_responses = summed_responses(documents, self._store, self.source_names)
        self.source_responses = source_responses
        self.readout_basis = readout_basis
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
    def sums_sources(self) -> bool:
        """Whether the artifact keeps each source's summed response: for linear readouts a source's score is the score
        of that sum (one direction per source); the removal readout is nonlinear, so there it sums document scores."""
        return self.config.readout is not ReadoutMode.REMOVAL

    def set_readout_basis(self, basis: dict[str, torch.Tensor], fidelity: dict[str, Any]) -> None:
        """Attach a compressed readout basis ({"directions": [k, p], "coefficients": [N, k], ...}) and its fidelity figures."""
        if basis["directions"].shape[1] != self.dim or basis["coefficients"].shape[0] != self.num_documents:
            raise ArtifactError(
                f"A readout basis for this artifact needs directions [k, {self.dim}] and coefficients [{self.num_documents}, k]; "
                f"got {tuple(basis['directions'].shape)} and {tuple(basis['coefficients'].shape)}."
            )
        self.readout_basis = dict(basis)
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

    def verify(self) -> None:
        """Read every response once (the cheap header checks already ran at load)."""
        if isinstance(self._store, ShardedResponses):
            self._store.verify_data()

    # ------------------------------------------------------------------ model binding
    def check_subspace(self, subspace: AttributionSubspace) -> None:
        """Raise `FingerprintMismatchError` unless `subspace` is the one the responses were made in."""
        problems = []
        if subspace.model_fingerprint != self.model_fingerprint:
            problems.append(f"model weights: the artifact was made for {self.model_fingerprint[:16]}…, this model is {subspace.model_fingerprint[:16]}…")
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
        added = InMemoryResponses(responses)
        if added.dim != self.dim or added.num_rows != len(table):
            raise ArtifactError(f"New responses must have shape [{len(table)}, {self.dim}], got {tuple(responses.shape)}.")
        combined_table = self.documents.concat(table)
        names = self.source_names + [name for name in table.source_names() if name not in self.source_names]
        sums = None
        if self.sums_sources:
            sums = summed_responses(table, added, names).to(torch.float64)
            sums[: len(self.source_names)] += self.source_responses.to(torch.float64)
            sums = sums.to(self._store.dtype)
        return self._replace(combined_table, ComposedResponses([(self._store, None), (added, None)]), names, sums)

    def remove_documents(self, document_ids: Sequence[str]) -> "InfluenceArtifact":
        """A new artifact without the given documents; the rest are kept as stored (source sums recomputed exactly)."""
        drop = set(map(str, document_ids))
        unknown = sorted(drop - set(self.documents.document_ids))
        if unknown:
            raise ArtifactError(f"No documents with ids {unknown[:5]} in this artifact.")
        keep = [i for i, d in enumerate(self.documents.document_ids) if d not in drop]
        if not keep:
            raise ArtifactError("Removing these documents would leave the artifact empty.")
        table = self.documents.select(keep)
        return self._replace(table, ComposedResponses([(self._store, torch.tensor(keep))]), None, None)

    def _replace(self, table, store, names, sums) -> "InfluenceArtifact":
        if self.readout_basis is not None:
            logger.warning("The compressed readout basis no longer matches the documents and was dropped; rebuild it.")
        return InfluenceArtifact(
            config=self.config, subspace_spec=self.subspace_spec, documents=table, responses=store,
            model_fingerprint=self.model_fingerprint, subspace_fingerprint=self.subspace_fingerprint,
            base_model=self.base_model, simulation=self.simulation, fidelity={}, source_names=names,
            source_responses=sums, readout_basis=None, library_version=self.library_version,
        )

    # ------------------------------------------------------------------ saving
    def _metadata(self) -> dict:
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
        }

    def settings(self) -> dict:
        """Estimator settings, subspace description and fingerprints (see `artifact_settings`)."""
        return artifact_settings(self.config, self.subspace_spec, self.model_fingerprint, self.subspace_fingerprint)

    def save_pretrained(self, save_directory: Union[str, Path], max_shard_size: Union[int, str] = "1GB", overwrite: bool = False) -> Path:
        """Write the artifact to `save_directory`.

        Shards are written atomically (temporary file, then rename) and an interrupted save resumes
        from its finished shards when called again. A folder holding an artifact made with other
        settings is refused unless `overwrite=True`.
        """
        directory = Path(save_directory)
        if not overwrite:
            refuse_foreign_artifact(directory, self.settings())
        if isinstance(self._store, ShardedResponses) and self._store.directory.resolve() == directory.resolve():
            pass  # shards already in place (e.g. written during the simulation)
        elif directory.resolve() in self._store.directories():
            # rewriting a folder the responses are read from: build it aside, then swap it in
            with tempfile.TemporaryDirectory(dir=directory.parent, prefix=f".{directory.name}-") as tmp:
                self.save_pretrained(Path(tmp) / "artifact", max_shard_size, overwrite=True)
                backup = directory.with_name(f".{directory.name}.old")
                shutil.rmtree(backup, ignore_errors=True)
                os.replace(directory, backup)
                os.replace(Path(tmp) / "artifact", directory)
                shutil.rmtree(backup, ignore_errors=True)
            self._store, self.path = ShardedResponses.open(directory), directory  # the old files are gone
            return directory
        else:
            identity = shard_identity(self.settings(), self.documents.document_ids)
            writer = ShardWriter(directory, identity, self.num_documents, self.dim, self._store.dtype, max_shard_size)
            for index, lo, hi in writer.pending():
                writer.write(index, self._store.rows(list(range(lo, hi))))
            writer.finish()
        if self.source_responses is not None and self.source_names:
            save_file({"responses": self.source_responses.contiguous()}, str(directory / (SOURCES_NAME + ".tmp")), metadata={"format": "pt"})
            give_default_mode(directory / (SOURCES_NAME + ".tmp"))
            os.replace(directory / (SOURCES_NAME + ".tmp"), directory / SOURCES_NAME)
        if self.readout_basis is not None:
            save_file({k: v.contiguous() for k, v in self.readout_basis.items()}, str(directory / (BASIS_NAME + ".tmp")), metadata={"format": "pt"})
            give_default_mode(directory / (BASIS_NAME + ".tmp"))
            os.replace(directory / (BASIS_NAME + ".tmp"), directory / BASIS_NAME)
        (directory / (DOCUMENTS_NAME + ".tmp")).write_text(self.documents.to_jsonl(), encoding="utf-8")
        os.replace(directory / (DOCUMENTS_NAME + ".tmp"), directory / DOCUMENTS_NAME)
        write_json_atomic(directory / CONFIG_NAME, self._metadata())
        (directory / CARD_NAME).write_text(str(self.model_card()), encoding="utf-8")
        return directory

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        path_or_repo_id: Union[str, Path],
        revision: Optional[str] = None,
        cache_dir: Optional[Union[str, Path]] = None,
        token: Optional[str] = None,
        local_files_only: bool = False,
    ) -> "InfluenceArtifact":
        """Load an artifact from a folder, or from a Hub repository (through huggingface_hub's cache).

        The shards are memory-mapped, not read; their sizes and headers are checked against the index.
        """
        directory = Path(path_or_repo_id)
        if not directory.is_dir():
            from huggingface_hub import snapshot_download

            directory = Path(snapshot_download(
                str(path_or_repo_id), revision=revision, cache_dir=cache_dir, token=token,
                local_files_only=local_files_only, repo_type="model",
            ))
        config_path = directory / CONFIG_NAME
        if not config_path.is_file():
            partial = (directory / ".fwdattr-save-progress.json").is_file()
            raise ArtifactError(
                f"{directory} has no {CONFIG_NAME}: "
                + ("its save was interrupted; save again to the same folder to resume it." if partial else "it is not an influence artifact.")
            )
        try:
            meta = json.loads(config_path.read_text(encoding="utf-8"))
        except ValueError as err:
            raise ArtifactError(f"{config_path} is not valid JSON ({err}).") from err
        unknown = sorted(set(meta) - _KNOWN_KEYS)
        if unknown or int(meta.get("format_version", 1)) > FORMAT_VERSION:
            logger.warning(
                "This artifact was written by hf_fwdattr %s (format %s); ignoring unknown keys %s.",
                meta.get("library_version"), meta.get("format_version"), unknown,
            )
        documents_path = directory / DOCUMENTS_NAME
        if not documents_path.is_file():
            raise ArtifactError(f"{directory} has no {DOCUMENTS_NAME}; the artifact is incomplete.")
        documents = DocumentTable.from_jsonl(documents_path.read_text(encoding="utf-8"))
        store = ShardedResponses.open(directory)
        try:
            config = AttributionConfig.from_dict(meta["estimator"])
        except KeyError as err:
            raise ArtifactError(f"{config_path} lacks the entry {err}; the artifact is incomplete.") from err
        source_names = meta.get("sources") or []
        source_responses = None
        if source_names and config.readout is not ReadoutMode.REMOVAL:
            source_responses = _load_tensor(directory / SOURCES_NAME, "responses")
            if tuple(source_responses.shape) != (len(source_names), store.dim):
                raise ArtifactError(f"{SOURCES_NAME} has shape {tuple(source_responses.shape)}, expected [{len(source_names)}, {store.dim}].")
        basis = None
        if (directory / BASIS_NAME).is_file():
            with safe_open(str(directory / BASIS_NAME), framework="pt") as handle:
                basis = {k: handle.get_tensor(k) for k in handle.keys()}
        try:
            return cls(
                config=config,
                subspace_spec=SubspaceSpec.from_dict(meta["subspace"]),
                documents=documents,
                responses=store,
                model_fingerprint=meta["fingerprints"]["model"],
                subspace_fingerprint=meta["fingerprints"]["subspace"],
                base_model=meta.get("base_model"),
                simulation=meta.get("simulation"),
                fidelity=meta.get("fidelity"),
                source_names=source_names,
                source_responses=source_responses,
                readout_basis=basis,
                library_version=meta.get("library_version", "unknown"),
                path=directory,
            )
        except KeyError as err:
            raise ArtifactError(f"{config_path} lacks the entry {err}; the artifact is incomplete.") from err

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


def _load_tensor(path: Path, name: str) -> torch.Tensor:
    if not path.is_file():
        raise ArtifactError(f"{path.name} is missing from {path.parent}; the artifact is incomplete.")
    try:
        with safe_open(str(path), framework="pt") as handle:
            return handle.get_tensor(name)
    except Exception as err:  # safetensors raises its own error types for corrupted files
        raise ArtifactError(f"{path.name} cannot be read ({err}).") from err


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
