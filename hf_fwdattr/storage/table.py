"""`DocumentTable`: one row per document of an artifact (id, source, token count, metadata), in response-row order."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from ..errors import ArtifactError, DocumentsError, DuplicateDocumentError
from ..estimator.documents import DocumentSet
from .integrity import content_digest, sha256_bytes

DOCUMENTS_NAME = "documents.jsonl"


@dataclass
class DocumentTable:
    """One row per document, in response-row order: id, source, token count and free metadata."""

    document_ids: list[str]
    sources: list[Optional[str]] = field(default_factory=list)
    n_tokens: list[Optional[int]] = field(default_factory=list)
    metadata: list[Optional[dict]] = field(default_factory=list)

    def __post_init__(self) -> None:
        missing = [row for row, d in enumerate(self.document_ids) if d is None]
        if missing:
            raise DocumentsError(f"Document ids must not be None (rows {missing[:5]}); give every document an id of its own.")
        self.document_ids = [str(d) for d in self.document_ids]
        n = len(self.document_ids)
        self.sources = list(self.sources) or [None] * n
        self.n_tokens = list(self.n_tokens) or [None] * n
        self.metadata = list(self.metadata) or [None] * n
        if not len(self.sources) == len(self.n_tokens) == len(self.metadata) == n:
            raise ArtifactError("The document table's columns (ids, sources, n_tokens, metadata) differ in length.")
        duplicates = sorted(d for d, count in Counter(self.document_ids).items() if count > 1)
        if duplicates:
            raise DuplicateDocumentError(f"Document ids must be unique; repeated: {duplicates[:5]}.")
        for document_id, metadata in zip(self.document_ids, self.metadata):
            if metadata is None:
                continue
            try:
                json.dumps(metadata, allow_nan=False, sort_keys=True)
            except (TypeError, ValueError) as err:
                raise DocumentsError(
                    f"The metadata of document {document_id!r} cannot be stored as JSON ({err}): {str(metadata)[:200]}. "
                    "Give metadata as strings, numbers, booleans, lists and dicts (no NaN), e.g. convert dates with str()."
                ) from err

    def __len__(self) -> int:
        return len(self.document_ids)

    @classmethod
    def from_document_set(cls, documents: DocumentSet, n_tokens: Optional[Sequence[int]] = None, metadata=None) -> "DocumentTable":
        """The table of a `DocumentSet` (token counts, if not given, are summed from `input_ids` of its chunks)."""
        if n_tokens is None:
            counts = [0] * len(documents)
            for example, doc in zip(documents.examples, documents.example_document):
                ids = example.get("input_ids") if isinstance(example, dict) else None
                counts[doc] += len(ids) if ids is not None else 0
            n_tokens = [c or None for c in counts]
        return cls(list(documents.document_ids), list(documents.sources), list(n_tokens), list(metadata or []))

    def select(self, rows: Sequence[int]) -> "DocumentTable":
        """The rows at `rows`, in that order."""
        return DocumentTable([self.document_ids[r] for r in rows], [self.sources[r] for r in rows],
                             [self.n_tokens[r] for r in rows], [self.metadata[r] for r in rows])

    def concat(self, other: "DocumentTable") -> "DocumentTable":
        """This table followed by `other` (ids must stay unique)."""
        return DocumentTable(self.document_ids + other.document_ids, self.sources + other.sources,
                             self.n_tokens + other.n_tokens, self.metadata + other.metadata)

    def source_names(self) -> list[str]:
        """Distinct sources in order of first appearance (documents without a source are left out)."""
        return list(dict.fromkeys(s for s in self.sources if s is not None))

    def source_positions(self, source_names: Sequence[str]) -> torch.Tensor:
        """For each document, the position of its source in `source_names` (-1: no source, or one not listed)."""
        return source_positions(self.sources, source_names)

    def sha256(self) -> str:
        """SHA-256 of the table as `documents.jsonl` (ids, sources, token counts, metadata, in row order)."""
        return sha256_bytes(self.to_jsonl().encode("utf-8"))

    def to_jsonl(self) -> str:
        """The table as JSON lines (`documents.jsonl`), one row per document in tensor-row order."""
        rows = zip(self.document_ids, self.sources, self.n_tokens, self.metadata)
        return "".join(json.dumps({"document_id": d, "source": s, "n_tokens": t, "metadata": m}, sort_keys=True) + "\n" for d, s, t, m in rows)

    @classmethod
    def from_jsonl(cls, text: str) -> "DocumentTable":
        """Parse `to_jsonl` output; a malformed line is refused with its number, duplicate ids by the constructor."""
        ids, sources, tokens, metadata = [], [], [], []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                ids.append(row["document_id"])
            except (ValueError, KeyError) as err:
                raise ArtifactError(f"{DOCUMENTS_NAME} line {number} is not a document row ({err!r}).") from err
            sources.append(row.get("source"))
            tokens.append(row.get("n_tokens"))
            metadata.append(row.get("metadata"))
        return cls(ids, sources, tokens, metadata)


def source_positions(document_sources: Sequence[Optional[str]], source_names: Sequence[str]) -> torch.Tensor:
    """[N] long: the position of each document's source in `source_names`, -1 where it has none listed."""
    position = {name: i for i, name in enumerate(source_names)}
    return torch.tensor([position.get(source, -1) for source in document_sources], dtype=torch.long)


def sum_by_source(values: torch.Tensor, positions: torch.Tensor, num_sources: int) -> torch.Tensor:
    """Rows of `values` [N, ...] summed into [num_sources, ...] by `positions` (`source_positions`); rows at -1 are
    left out. Scores and responses are linear in up-weighting, so this is a source's score or summed response."""
    positions = positions.to(values.device)
    keep = positions >= 0
    summed = torch.zeros(num_sources, *values.shape[1:], dtype=values.dtype, device=values.device)
    return summed.index_add_(0, positions[keep], values[keep])


def document_digests(documents: DocumentSet) -> list[str]:
    """For each document of `documents`, the collision-free digest of its examples (token ids, labels, masks, in
    chunk order): what decides its response, so a save resumes only into responses of the same tokens."""
    chunks: list[list] = [[] for _ in range(len(documents))]
    for example, owner in zip(documents.examples, documents.example_document):
        chunks[owner].append(example)
    return [content_digest(examples) for examples in chunks]

