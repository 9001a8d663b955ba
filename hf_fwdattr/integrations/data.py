"""Turning a `datasets.Dataset` (or rows of token ids) into documents and training examples.

A document longer than `max_length` tokens is split into chunks that overlap by one token whose
label is masked, so every token after the document's first is predicted exactly once and the
document's loss (and gradient) is the sum over its chunks.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from ..errors import DocumentsError, DuplicateDocumentError, EmptyDocumentsError
from ..estimator.documents import DocumentSet
from ..estimator.task import IGNORE_INDEX

_EXAMPLE_KEYS = ("input_ids", "labels", "attention_mask")
logger = logging.getLogger(__name__)


def without_padding(row: dict) -> dict:
    """`row` with the positions its ``attention_mask`` marks 0 (padding) removed from every token column."""
    mask = row.get("attention_mask")
    if mask is None:
        return row
    keep = [i for i, m in enumerate(mask) if m]
    return {k: ([v[i] for i in keep] if k in _EXAMPLE_KEYS and v is not None else v) for k, v in row.items() if k != "attention_mask"}


def _column_names(dataset: Any) -> list[str]:
    names = getattr(dataset, "column_names", None)
    if names is None and len(dataset):
        first = dataset[0]
        names = list(first.keys()) if isinstance(first, dict) else []
    return list(names or [])


def _rows(dataset: Any, columns: Sequence[str]) -> list[dict]:
    if hasattr(dataset, "select_columns"):  # datasets.Dataset: read only what is needed, column-wise
        table = dataset.select_columns(list(columns)).to_dict()
        return [dict(zip(table, values)) for values in zip(*table.values())]
    return [{c: row.get(c) for c in columns} for row in dataset]


def split_into_chunks(example: dict, max_length: Optional[int]) -> list[dict]:
    """Split a tokenised example into chunks of at most `max_length` tokens (one-token overlap, masked)."""
    ids = list(example["input_ids"])
    labels = list(example["labels"]) if example.get("labels") is not None else list(ids)
    if max_length is None or len(ids) <= max_length:
        return [{"input_ids": ids, "labels": labels}]
    if max_length < 2:
        raise EmptyDocumentsError(f"`max_length` must be at least 2 to split documents into chunks, got {max_length}.")
    chunks, start = [], 0
    while True:
        lo = max(0, start - 1)  # carry one token of context; its label is masked, it was scored in the chunk before
        hi = min(len(ids), lo + max_length)
        chunk_labels = labels[lo:hi]
        if lo > 0:
            chunk_labels[0] = IGNORE_INDEX
        chunks.append({"input_ids": ids[lo:hi], "labels": chunk_labels})
        if hi == len(ids):
            return chunks
        start = hi


@dataclass
class PreparedDocuments:
    """Documents ready for simulation, and the columns of their table."""

    documents: DocumentSet
    n_tokens: list[int]
    metadata: list[Optional[dict]]


def documents_from_dataset(
    dataset: Any,
    document_column: str = "document_id",
    source_column: Optional[str] = None,
    max_length: Optional[int] = None,
    text_column: Optional[str] = None,
    tokenizer: Any = None,
    metadata_columns: Sequence[str] = (),
) -> PreparedDocuments:
    """Documents from a dataset with one row per document: an id column, an optional source column, and
    ``input_ids`` (or a `text_column` tokenised with `tokenizer`). Raises before any computation on an
    empty dataset, a missing column, duplicate ids or a document without tokens."""
    check_documents_dataset(dataset, document_column, source_column, text_column, metadata_columns, tokenizer_available=tokenizer is not None)
    columns = _column_names(dataset)
    read = [c for c in {document_column, source_column, text_column, *_EXAMPLE_KEYS, *metadata_columns} if c is not None and c in columns]
    rows = _rows(dataset, read)
    ids = [str(row[document_column]) for row in rows]
    examples, owners, n_tokens = [], [], []
    for index, row in enumerate(rows):
        if "input_ids" not in row or row["input_ids"] is None:
            row["input_ids"] = tokenizer(row[text_column])["input_ids"]
            row.pop("attention_mask", None)
            row.pop("labels", None)
        row = without_padding(row)  # padding is not part of the document (the training-example path drops it too)
        if len(row["input_ids"]) < 2:
            raise EmptyDocumentsError(f"Document {ids[index]!r} has {len(row['input_ids'])} token(s); a causal LM needs at least 2 to score one.")
        n_tokens.append(len(row["input_ids"]))
        for chunk in split_into_chunks(row, max_length):
            examples.append(chunk)
            owners.append(index)
    sources = [None if source_column is None or row[source_column] is None else str(row[source_column]) for row in rows]
    metadata = [{c: row[c] for c in metadata_columns} if metadata_columns else None for row in rows]
    return PreparedDocuments(DocumentSet(examples, owners, ids, sources), n_tokens, metadata)


def check_documents_dataset(
    dataset: Any,
    document_column: str = "document_id",
    source_column: Optional[str] = None,
    text_column: Optional[str] = None,
    metadata_columns: Sequence[str] = (),
    tokenizer_available: bool = True,
) -> None:
    """Refuse an empty documents dataset, missing columns and duplicate ids, without tokenising anything."""
    if dataset is None or len(dataset) == 0:
        raise EmptyDocumentsError("The documents dataset is empty: there is nothing to attribute to.")
    columns = _column_names(dataset)
    wanted = {document_column: "document id", source_column: "source"}
    for column, role in wanted.items():
        if column is not None and column not in columns:
            raise DocumentsError(
                f"The documents dataset has no {role} column {column!r}; its columns are {columns}. "
                f"Pass the right name (e.g. document_column=...), or add the column."
            )
    missing_meta = [c for c in metadata_columns if c not in columns]
    if missing_meta:
        raise DocumentsError(f"Metadata columns {missing_meta} are not in the dataset (columns: {columns}).")
    if "input_ids" not in columns:
        if text_column is None or text_column not in columns or not tokenizer_available:
            raise DocumentsError(
                f"The documents dataset has no 'input_ids' column (columns: {columns}); tokenise it first, "
                "or pass text_column=... with a tokenizer."
            )
    raw_ids = list(dataset[document_column] if hasattr(dataset, "column_names") else (row[document_column] for row in dataset))
    missing = [row for row, value in enumerate(raw_ids) if value is None]
    if missing:
        raise DocumentsError(f"The document id column {document_column!r} is empty (None) in rows {missing[:5]}; give every document an id.")
    ids = [str(value) for value in raw_ids]
    duplicates = sorted(d for d, count in Counter(ids).items() if count > 1)
    if duplicates:
        raise DuplicateDocumentError(
            f"Document ids must be unique, and {len(duplicates)} repeat (e.g. {duplicates[:3]}). "
            "Give each document one row (long documents are chunked automatically) and its own id."
        )


def examples_from_dataset(dataset: Any, max_length: Optional[int] = None) -> list[dict]:
    """Training examples (``input_ids`` and, if present, ``labels``/``attention_mask``) from dataset rows,
    long ones chunked like documents."""
    if dataset is None or len(dataset) == 0:
        raise EmptyDocumentsError("The training data for the simulation is empty; pass the examples the model was trained on.")
    columns = _column_names(dataset)
    if "input_ids" not in columns:
        raise DocumentsError(f"The training data has no 'input_ids' column (columns: {columns}); tokenise it first.")
    examples = []
    for row in _rows(dataset, [c for c in _EXAMPLE_KEYS if c in columns]):
        row = without_padding(row)
        if len(row["input_ids"]) >= 2:
            examples.extend(split_into_chunks(row, max_length))
    return examples


def rows_as_trained(dataset: Any, collate_fn: Any, keep_columns: Sequence[str] = ()) -> list[dict]:
    """Every row of `dataset` as the training step saw it: passed alone through the trainer's data collator (so labels
    carry its masks — completion-only prompts, padding that equals the end-of-sequence token), padding stripped,
    with `keep_columns` (ids, sources, ...) copied from the row. Falls back to the rows as stored when there is no
    collator or it cannot collate one row into ``input_ids``."""
    stored = [dict(row) for row in _rows(dataset, _column_names(dataset))]
    if collate_fn is None:
        return stored
    rows = []
    for row in stored:
        try:
            batch = collate_fn([dict(row)])
            ids = batch["input_ids"][0]
        except Exception as err:  # a collator that needs other inputs: keep the stored columns, say so once
            logger.warning("The trainer's data collator could not collate one row (%r); using the dataset's own input_ids/labels "
                           "for attribution, which may differ from what training scored.", err)
            return stored
        mask = batch.get("attention_mask")
        keep = mask[0].bool() if mask is not None else torch.ones(len(ids), dtype=torch.bool)
        labels = batch.get("labels")
        collated = {"input_ids": ids[keep].tolist(), "labels": None if labels is None else labels[0][keep].tolist()}
        collated.update({column: row.get(column) for column in keep_columns if column in row})
        rows.append(collated)
    return rows


def vocabulary_size(model: Any) -> Optional[int]:
    """Number of token ids `model` can embed (its input embedding rows), or None when it has no token embedding."""
    embeddings = getattr(model, "get_input_embeddings", None)
    try:
        layer = embeddings() if embeddings is not None else None
    except (NotImplementedError, AttributeError):
        layer = None
    rows = getattr(layer, "num_embeddings", None)
    return int(rows) if rows is not None else getattr(getattr(model, "config", None), "vocab_size", None)


def check_token_ids(examples: Sequence[Any], vocab_size: Optional[int], names: Optional[Sequence[str]] = None,
                    check_labels: bool = True) -> None:
    """Refuse token ids outside [0, vocab_size) and labels that are neither -100 nor a token id, before any work.

    Such ids crash an embedding lookup deep inside training or the simulation (or, on some devices, read other rows
    silently). `names` says what each example is (e.g. "document 'd3'") for the error; examples that are not dicts
    with ``input_ids`` are skipped.
    """
    if vocab_size is None:
        return
    for position, example in enumerate(examples):
        if not isinstance(example, dict) or example.get("input_ids") is None:
            continue
        name = names[position] if names is not None else f"example {position}"
        ids = torch.as_tensor(example["input_ids"]).reshape(-1)
        if len(ids) and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
            bad = ids[(ids < 0) | (ids >= vocab_size)][:5].tolist()
            raise DocumentsError(
                f"The {name} has token ids {bad} outside the model's vocabulary [0, {vocab_size}). Tokenise with the model's "
                "own tokenizer, or resize the model's embeddings (model.resize_token_embeddings) before training."
            )
        labels = example.get("labels")
        if check_labels and labels is not None:
            labels = torch.as_tensor(labels).reshape(-1)
            wrong = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= vocab_size))
            if bool(wrong.any()):
                raise DocumentsError(
                    f"The {name} has labels {labels[wrong][:5].tolist()}: a label must be a token id in [0, {vocab_size}) or "
                    f"{IGNORE_INDEX} (not scored). Mask ignored positions with {IGNORE_INDEX}."
                )


def check_document_tokens(documents: DocumentSet, train_examples: Sequence[Any], vocab_size: Optional[int], check_labels: bool = True) -> None:
    """`check_token_ids` over every chunk of `documents` and every training example, naming the offender."""
    names = [f"document {documents.document_ids[owner]!r}" for owner in documents.example_document]
    check_token_ids(documents.examples, vocab_size, names, check_labels)
    check_token_ids(train_examples, vocab_size, [f"training example {i}" for i in range(len(train_examples))], check_labels)

