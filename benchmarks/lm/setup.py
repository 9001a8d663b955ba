"""The model every language-model benchmark attributes: `hf-fwdattr evaluate`'s default fact model, cached."""

from __future__ import annotations

from pathlib import Path

CACHE = Path(__file__).resolve().parent / "cache"
NAME = "facts"


def evaluation_setup(seed: int = 0) -> dict:
    """Build (or reuse) the default fact model under ``cache/facts/fact_model`` and load what the benchmarks need."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_fwdattr import CausalLMTask, InfluenceArtifact
    from hf_fwdattr.evaluation.fact_data import query_examples, tokenized_documents
    from hf_fwdattr.evaluation.fact_tracing import default_fact_model

    model_dir, influence_dir, data = default_fact_model(CACHE / NAME / "fact_model", seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    artifact = InfluenceArtifact.from_pretrained(influence_dir)
    document_set = tokenized_documents(data, tokenizer, artifact)
    documents = [{"document_id": d, "input_ids": e["input_ids"]} for d, e in zip(document_set.document_ids, document_set.examples)]
    return {
        "model_dir": Path(model_dir), "influence_dir": Path(influence_dir), "data": data, "tokenizer": tokenizer,
        "model": AutoModelForCausalLM.from_pretrained(model_dir).eval(), "artifact": artifact, "document_set": document_set,
        "documents": documents, "queries": query_examples(data, tokenizer), "task": CausalLMTask(pad_token_id=tokenizer.pad_token_id),
    }
