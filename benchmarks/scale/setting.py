"""Everything the benchmark steps share: cache folder, tokenizer, token ids, queries, the model for a given N."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from hf_fwdattr import DocumentSet

from .corpus import SOURCES, make_corpus, query_examples, tokenize, train_corpus_tokenizer
from .model import base_model, trained_adapter

CACHE = Path(__file__).resolve().parent / "cache"
PRETRAINING_DOCUMENTS = 20_000
N_QUERIES = 64  # 32 to choose the basis rank ("fidelity"), 32 to measure ("test")


def tokenizer():
    """The benchmark's BPE tokenizer (trained once, cached)."""
    from transformers import PreTrainedTokenizerFast

    directory = CACHE / "tokenizer"
    if (directory / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(directory)
    tok = train_corpus_tokenizer()
    tok.save_pretrained(directory)
    return tok


def documents(n: int, tok=None) -> tuple[DocumentSet, list[dict], list[str]]:
    """(DocumentSet, training examples, texts) of the first `n` documents (token ids cached per size)."""
    corpus = make_corpus(n, N_QUERIES)
    path = CACHE / f"tokens-{n}.safetensors"
    if path.is_file():
        saved = load_file(path)
        flat, offsets = saved["ids"].tolist(), saved["offsets"].tolist()
        ids = [flat[offsets[i] : offsets[i + 1]] for i in range(n)]
    else:
        ids = tokenize(tok or tokenizer(), corpus.texts)
        offsets = torch.tensor([0] + [len(x) for x in ids]).cumsum(0)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"ids": torch.tensor([t for x in ids for t in x], dtype=torch.int32), "offsets": offsets}, path)
    examples = [{"input_ids": x} for x in ids]
    document_set = DocumentSet.from_examples(examples, [f"doc-{i:06d}" for i in range(n)], corpus.sources)
    return document_set, examples, corpus.texts


def queries(tok=None) -> tuple[list[dict], list[dict]]:
    """(fidelity queries, test queries): 32 each, fact questions whose answers documents among the first 1,000 state."""
    corpus = make_corpus(1_000, N_QUERIES)
    examples = query_examples(tok or tokenizer(), corpus)
    return examples[: N_QUERIES // 2], examples[N_QUERIES // 2 :]


def query_texts() -> list[str]:
    corpus = make_corpus(1_000, N_QUERIES)
    return [p + a for p, a in zip(corpus.query_prompts, corpus.query_answers)]


def size_dir(n: int) -> Path:
    return CACHE / f"n{n}"


def base(tok=None):
    """The pretrained tiny Llama, without adapter (trained and cached the first time: about a minute)."""
    return base_model(CACHE, tok or tokenizer(), lambda: make_corpus(PRETRAINING_DOCUMENTS, 0, seed=200).texts)


def model(n: int, examples: list[dict] | None = None, tok=None):
    """(the model trained one epoch on the first `n` documents, epoch seconds or None when loaded from the cache)."""
    tok = tok or tokenizer()
    pretrained = base(tok)
    if examples is None:
        examples = documents(n, tok)[1]
    return trained_adapter(size_dir(n), pretrained, examples)


assert len(SOURCES) == 10
