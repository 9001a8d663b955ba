"""Tiny served models with influence artifacts, for the adapter-export and vLLM tests.

A Llama with head_dim 32 (vLLM's CPU attention rejects 16), a tokenizer trained locally, and three ways of
carrying the attribution subspace: the model's own LoRA adapter ('peft'), a projection adapter on the bare model
('projection'), and a projection adapter on a model that keeps its own LoRA adapter ('concatenated').
"""

from __future__ import annotations

from pathlib import Path

import torch

from hf_fwdattr import AttributionConfig, AttributionSubspace, CausalLMTask, DocumentSet, InfluenceArtifact, simulate_responses
from hf_fwdattr.demo.toy import tiny_llama, train_tokenizer
from hf_fwdattr.estimator.gradients import query_gradients
from hf_fwdattr.query.compress import build_readout_basis

CASES = ("peft", "projection", "concatenated")
TEXTS = ["the capital of zorbia is vashmir", "merchants of kel trade copper and silk", "the river runs green in spring",
         "old chronicles speak of amber roads", "a violet banner flies over the port"] * 8
HIDDEN, HEADS, LAYERS = 64, 2, 2  # head_dim 32
SOURCES = ["atlas", "river", "forum"]


def tokenizer():
    """A byte-level BPE tokenizer trained on a few sentences (pad 0, bos 1, eos 2)."""
    return train_tokenizer(TEXTS, vocab_size=128)


def base_model(vocab_size: int):
    """θ*'s base weights (seeded): the model a server serves."""
    return tiny_llama(vocab_size, hidden_size=HIDDEN, heads=HEADS, layers=LAYERS, seed=0)


def with_user_adapter(model, seed: int = 1):
    """The base model with a trained-looking LoRA adapter on q_proj and v_proj (random A and B, lora_alpha 8)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)).eval()


def examples(vocab_size: int, n: int, seed: int, min_len: int = 5, max_len: int = 12) -> list[dict]:
    """Random token sequences (ids >= 3, so no special tokens)."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(min_len, max_len, (1,), generator=generator))
        out.append({"input_ids": torch.randint(3, vocab_size, (length,), generator=generator).tolist()})
    return out


def queries(vocab_size: int, n: int = 3, seed: int = 11) -> list[dict]:
    """(prompt, answer) queries: the first 3 tokens are the prompt."""
    return [CausalLMTask.query_example(e["input_ids"][:3], e["input_ids"][3:]) for e in examples(vocab_size, n, seed, 7, 11)]


def make_case(case: str, vocab_size: int, basis_rank: int = 4):
    """(model, artifact) for `case`; the model carries the subspace's adapter when the artifact is read."""
    task = CausalLMTask(pad_token_id=0)
    model = base_model(vocab_size)
    if case in ("peft", "concatenated"):
        model = with_user_adapter(model)
    spec = {"spec": "peft"} if case == "peft" else {"spec": "projection", "rank": 4, "target_modules": ["q_proj", "o_proj", "down_proj"]}
    train = examples(vocab_size, 16, seed=2)
    documents = DocumentSet(examples=train[:12], example_document=[i // 2 for i in range(12)],
                            document_ids=[f"doc-{i}" for i in range(6)], sources=[SOURCES[i % 3] for i in range(6)])
    subspace = AttributionSubspace.build(model, **spec)
    config = AttributionConfig(damping=1e-2, horizon=5, batch_size=8)
    result = simulate_responses(subspace, task, documents, train, config)
    artifact = InfluenceArtifact.from_simulation(subspace, documents, result, config)
    gradients = query_gradients(subspace, task, queries(vocab_size, 4, seed=5))
    basis, fidelity = build_readout_basis(artifact.store, gradients, max_rank=basis_rank)
    artifact.set_readout_basis(basis, fidelity)
    subspace.remove()
    return model, artifact


def save_base(directory: Path, tok) -> Path:
    """Write the base model and the tokenizer where a server can load them."""
    model = base_model(len(tok))
    model.generation_config.do_sample = False
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory
