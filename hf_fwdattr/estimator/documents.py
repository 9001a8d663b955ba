"""Training documents (the units scores are given to) and the minibatch sequence of the simulation."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence

import torch

from ..errors import DuplicateDocumentError, EmptyDocumentsError


@dataclass
class DocumentSet:
    """Training documents, each made of one or more examples (chunks).

    A document's loss is the sum of its examples' losses, so its gradient and response are the sums
    over its chunks. Row b of every response tensor belongs to `document_ids[b]`.

    Args:
        examples: all chunks, in any order; each is something the task's `collate` accepts.
        example_document: for each example, the index of its document in `document_ids`.
        document_ids: unique document ids.
        sources: the source (publisher, repository, author) of each document, or None.
    """

    examples: Sequence[Any]
    example_document: Sequence[int]
    document_ids: Sequence[str]
    sources: Optional[Sequence[Optional[str]]] = None

    def __post_init__(self) -> None:
        self.document_ids = [str(d) for d in self.document_ids]
        self.example_document = [int(i) for i in self.example_document]
        if not self.document_ids:
            raise EmptyDocumentsError("The document set is empty: there is nothing to attribute to. Pass at least one document.")
        if len(self.example_document) != len(self.examples):
            raise EmptyDocumentsError(
                f"`example_document` has {len(self.example_document)} entries for {len(self.examples)} examples; give one document index per example."
            )
        duplicates = sorted(d for d, count in Counter(self.document_ids).items() if count > 1)
        if duplicates:
            raise DuplicateDocumentError(f"Document ids must be unique; repeated: {duplicates[:5]}. De-duplicate them or give each document its own id.")
        n = len(self.document_ids)
        if any(not 0 <= i < n for i in self.example_document):
            raise EmptyDocumentsError(f"`example_document` must index documents 0..{n - 1}.")
        counts = torch.bincount(torch.tensor(self.example_document, dtype=torch.long), minlength=n) if self.examples else torch.zeros(n)
        empty = [self.document_ids[i] for i in torch.nonzero(counts == 0).flatten().tolist()]
        if empty:
            raise EmptyDocumentsError(f"Documents with no examples (no tokens): {empty[:5]}. Remove them or give them text.")
        if self.sources is None:
            self.sources = [None] * n
        elif len(self.sources) != n:
            raise EmptyDocumentsError(f"`sources` has {len(self.sources)} entries for {n} documents.")
        else:
            self.sources = [None if s is None else str(s) for s in self.sources]

    @classmethod
    def from_examples(cls, examples: Sequence[Any], document_ids: Optional[Sequence[str]] = None, sources=None) -> "DocumentSet":
        """One document per example; ids default to the example positions ``"0"``, ``"1"``, …"""
        examples = list(examples)
        ids = [str(i) for i in range(len(examples))] if document_ids is None else list(document_ids)
        return cls(examples=examples, example_document=list(range(len(examples))), document_ids=ids, sources=sources)

    def __len__(self) -> int:
        return len(self.document_ids)

    @property
    def num_examples(self) -> int:
        """Number of chunks over all documents."""
        return len(self.examples)

    def validate(self, task, rows: Optional[Sequence[int]] = None) -> None:
        """Let the task refuse examples that cannot contribute a loss (e.g. documents with no tokens);
        only the examples of documents `rows` when given."""
        selected = None if rows is None else set(rows)
        for example, doc in zip(self.examples, self.example_document):
            if selected is not None and doc not in selected:
                continue
            try:
                task.validate_example(example)
            except EmptyDocumentsError as err:
                raise EmptyDocumentsError(f"Document {self.document_ids[doc]!r}: {err}") from err


class MinibatchSequence:
    """The deterministic sequence of training minibatches the simulation steps through.

    Step k's minibatch depends only on (`seed`, k): every solver, document and process sees the same
    sequence. Indices are drawn epoch by epoch from seeded permutations; a `batch_size` of at least
    the number of examples gives the full batch at every step.
    """

    def __init__(self, num_examples: int, batch_size: int, seed: int):
        if num_examples < 1:
            raise EmptyDocumentsError("The training data for the simulation is empty; pass the examples the model was trained on.")
        self.num_examples = num_examples
        self.batch_size = min(batch_size, num_examples)
        self.seed = seed

    @property
    def full_batch(self) -> bool:
        """Whether every step uses all examples."""
        return self.batch_size == self.num_examples

    def indices(self, steps: int, offset: int = 0) -> Iterator[list[int]]:
        """Index lists of steps offset … offset + steps − 1."""
        if self.full_batch:
            for _ in range(steps):
                yield list(range(self.num_examples))
            return
        generator = torch.Generator().manual_seed(self.seed)
        buffer: list[int] = []
        step = 0
        while step < offset + steps:
            while len(buffer) < self.batch_size:
                buffer.extend(torch.randperm(self.num_examples, generator=generator).tolist())
            batch, buffer = buffer[: self.batch_size], buffer[self.batch_size :]
            if step >= offset:
                yield batch
            step += 1


def length_batches(task, examples: Sequence[Any], batch_size: int) -> list[list[Any]]:
    """`examples` in batches of `batch_size`, examples of similar length together when the task gives lengths
    (`example_length`): per-example results do not depend on the company an example keeps, padding does."""
    order = length_order(task, examples)
    return [[examples[i] for i in order[lo : lo + batch_size]] for lo in range(0, len(order), batch_size)]


def length_order(task, examples: Sequence[Any], indices: Optional[Sequence[int]] = None) -> list[int]:
    """`indices` (default: all) sorted by the task's `example_length` of each example (stable), or as given when the
    task gives no lengths."""
    indices = list(range(len(examples))) if indices is None else list(indices)
    example_length = getattr(task, "example_length", None)
    lengths = [] if example_length is None else [example_length(examples[i]) for i in indices]
    if len(lengths) != len(indices) or any(length is None for length in lengths):
        return indices
    return [index for _, index in sorted(zip(lengths, indices), key=lambda pair: pair[0])]
