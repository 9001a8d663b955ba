"""Fact-tracing data: the documents and queries tables, read from files or built from `toy.fact_corpus`.

Documents: ``document_id``, ``source``, ``text`` (or ``input_ids``). Queries: ``query`` (the prompt),
``answer``, ``document_id`` (the one document that states the fact) and optionally ``kind`` (a label to
group the metrics by, e.g. "verbatim" / "paraphrase"). Any datasets-loadable file works: JSON lines,
JSON, CSV, Parquet, or a `save_to_disk` folder.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence, Union

from ..estimator.documents import DocumentSet
from ..estimator.task import CausalLMTask


class FactTracingDataError(ValueError):
    """A documents or queries table that cannot be used for fact tracing (missing columns, unknown ids)."""


@dataclass
class FactTracingSet:
    """Documents and queries of one fact-tracing evaluation.

    Attributes:
        documents: rows ``{"document_id", "source", "text"}`` (optionally ``"input_ids"``), in any order.
        queries: rows ``{"query", "answer", "document_id", "kind"}``: the prompt, the answer whose
            likelihood is attributed, the id of the one document that states the fact, a label to group by.
    """

    documents: list[dict]
    queries: list[dict]
    document_ids: list[str] = field(init=False)

    def __post_init__(self) -> None:
        self.document_ids = [str(d["document_id"]) for d in self.documents]
        known = set(self.document_ids)
        if len(known) != len(self.document_ids):
            raise FactTracingDataError("Document ids must be unique in the documents table.")
        unknown = sorted({str(q["document_id"]) for q in self.queries} - known)
        if unknown:
            raise FactTracingDataError(f"{len(unknown)} queries name documents that are not in the documents table, e.g. {unknown[:3]}.")
        if not self.queries:
            raise FactTracingDataError("The queries table is empty: there is nothing to trace.")

    @classmethod
    def from_corpus(cls, corpus: dict) -> "FactTracingSet":
        """From `toy.fact_corpus` output: one verbatim and one paraphrased query per fact."""
        queries = []
        for kind, key in (("verbatim", "prompt"), ("paraphrase", "paraphrase")):
            queries += [{"query": q[key], "answer": q["answer"], "document_id": q["document_id"], "kind": kind} for q in corpus["questions"]]
        documents = [{"document_id": d["document_id"], "source": d["source"], "text": d["text"]} for d in corpus["documents"]]
        return cls(documents, queries)

    @classmethod
    def from_files(cls, documents_path: Union[str, Path], queries_path: Union[str, Path], id_column: str = "document_id",
                   source_column: str = "source", text_column: str = "text", query_column: str = "query",
                   answer_column: str = "answer", true_column: str = "document_id", kind_column: str = "kind") -> "FactTracingSet":
        """From two datasets-loadable files (JSON lines, JSON, CSV, Parquet, or a `save_to_disk` folder).

        The documents need `id_column` and `text_column` (or ``input_ids``), optionally `source_column`;
        the queries need `query_column`, `answer_column` and `true_column`, optionally `kind_column`.
        """
        documents = []
        for row in load_table(documents_path, required=[id_column], name="documents"):
            if text_column not in row and "input_ids" not in row:
                raise FactTracingDataError(f"The documents table needs a {text_column!r} or an 'input_ids' column; it has {sorted(row)}.")
            entry = {"document_id": str(row[id_column]), "source": row.get(source_column), "text": row.get(text_column)}
            if row.get("input_ids") is not None:
                entry["input_ids"] = list(row["input_ids"])
            documents.append(entry)
        queries = [{"query": row[query_column], "answer": row[answer_column], "document_id": str(row[true_column]),
                    "kind": str(row.get(kind_column) or "query")}
                   for row in load_table(queries_path, required=[query_column, answer_column, true_column], name="queries")]
        return cls(documents, queries)

    def save(self, directory: Union[str, Path]) -> tuple[Path, Path]:
        """Write ``documents.jsonl`` and ``queries.jsonl`` (the format `from_files` reads) to `directory`."""
        import json

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        paths = directory / "documents.jsonl", directory / "queries.jsonl"
        for path, rows in zip(paths, (self.documents, self.queries)):
            path.write_text("".join(json.dumps(row, sort_keys=True) + "\n" for row in rows), encoding="utf-8")
        return paths

    @property
    def kinds(self) -> list[str]:
        return [q.get("kind", "query") for q in self.queries]


def load_table(path: Union[str, Path], required: Sequence[str] = (), name: str = "table") -> list[dict]:
    """Rows of a datasets-loadable file, checked for the `required` columns."""
    import datasets

    path = Path(path)
    if path.is_dir():
        table = datasets.load_from_disk(str(path))
    else:
        builder = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}.get(path.suffix.lower())
        if builder is None:
            raise FactTracingDataError(f"Cannot tell the format of {path}: use .jsonl, .json, .csv, .parquet or a save_to_disk folder.")
        table = datasets.load_dataset(builder, data_files=str(path), split="train")
    missing = [c for c in required if c not in table.column_names]
    if missing:
        raise FactTracingDataError(f"The {name} table {path} has no column(s) {missing}; its columns are {table.column_names}.")
    return [dict(row) for row in table]


def tokenized_documents(data: FactTracingSet, tokenizer, artifact, append_eos: bool = True) -> DocumentSet:
    """The documents as the artifact's `DocumentSet`: rows in the artifact's order, token ids checked.

    Documents without ``input_ids`` are tokenised (plus the end-of-sequence token with `append_eos`, as
    the demo trains). Their token counts must equal those the artifact recorded, or the gradients of the
    peers would be of other texts than the responses were simulated for.
    """
    by_id = {d["document_id"]: d for d in data.documents}
    table = artifact.documents
    missing = [d for d in table.document_ids if d not in by_id]
    if missing:
        raise FactTracingDataError(f"{len(missing)} documents of the artifact are not in the documents table, e.g. {missing[:3]}.")
    examples, mismatched = [], []
    for document_id, recorded in zip(table.document_ids, table.n_tokens):
        row = by_id[document_id]
        ids = row.get("input_ids")
        if ids is None:
            ids = tokenizer(row["text"])["input_ids"] + ([tokenizer.eos_token_id] if append_eos else [])
        if recorded is not None and len(ids) != recorded:
            mismatched.append((document_id, len(ids), recorded))
        examples.append({"input_ids": list(ids)})
    if mismatched:
        document_id, got, recorded = mismatched[0]
        raise FactTracingDataError(
            f"{len(mismatched)} documents tokenise to another length than the artifact recorded (e.g. {document_id!r}: {got} tokens, "
            f"artifact {recorded}). Give the documents' 'input_ids' as trained on, or toggle the end-of-sequence token (--no-append-eos)."
        )
    return DocumentSet(examples, list(range(len(examples))), list(table.document_ids), list(table.sources))


def query_examples(data: FactTracingSet, tokenizer) -> list[dict]:
    """One `CausalLMTask` example per query: f_q = log p(answer | query)."""
    return [CausalLMTask.query_example(tokenizer(q["query"])["input_ids"], tokenizer(q["answer"], add_special_tokens=False)["input_ids"])
            for q in data.queries]
