"""Runnable demonstrations behind `hf-fwdattr demo`.

`fact_demo` (the default) is the product end to end on built-in defaults: a corpus of invented facts
from several sources, a tiny causal LM trained from scratch, a LoRA fine-tune through
`transformers.Trainer` with `ForwardAttributionCallback`, and the top documents and sources of a few
fact questions. `classifier_demo` is the model-agnostic core on a small MLP.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ..estimator.config import AttributionConfig
from ..estimator.documents import DocumentSet
from ..estimator.simulate import simulate_responses
from ..estimator.subspace import AttributionSubspace
from ..estimator.task import CausalLMTask, ClassificationTask
from ..query.readout import ForwardReadout

logger = logging.getLogger(__name__)

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _clusters(n_per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[2.0, 0.0], [-1.0, 1.7], [-1.0, -1.7]])
    inputs = torch.cat([c + 0.9 * torch.randn(n_per_class, 2, generator=generator) for c in centres])
    labels = torch.arange(3).repeat_interleave(n_per_class)
    return inputs, labels


def classifier_demo(output_dir: str | Path | None = None, seed: int = 0, top_k: int = 3) -> dict:
    """Train a small MLP on three noisy clusters, simulate every training point's response, and
    print the top proponents and opponents of a few test queries. Returns the score matrix and data."""
    torch.manual_seed(seed)
    train_x, train_y = _clusters(40, seed)
    test_x, test_y = _clusters(1, seed + 1)
    model = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 3))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.03, weight_decay=1e-3)
    for _ in range(300):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(train_x), train_y).backward()
        optimizer.step()
    model.eval()
    accuracy = (model(train_x).argmax(1) == train_y).float().mean().item()
    print(f"Trained a 2-16-3 MLP on {len(train_y)} points (train accuracy {accuracy:.2f}).")

    task = ClassificationTask()
    train = [(train_x[i], train_y[i]) for i in range(len(train_y))]
    queries = [(test_x[i], test_y[i]) for i in range(len(test_y))]
    documents = DocumentSet.from_examples(train, document_ids=[f"train-{i}" for i in range(len(train))])
    subspace = AttributionSubspace.build(model, "trainable")
    config = AttributionConfig(damping=1e-2, batch_size=32)
    result = simulate_responses(subspace, task, documents, train, config, progress=True)
    scores = ForwardReadout.from_config(subspace, task, config).scores(queries, result.responses)
    print(f"Simulated {len(documents)} responses (K={config.horizon}, η={result.step_size:.3g}) in {result.seconds:.1f}s; "
          f"readout mode {config.readout.value}, forward passes only.\n")
    for q, (x, y) in enumerate(queries):
        order = torch.argsort(scores[q], descending=True)
        print(f"Query {q}: x=({x[0]:+.2f}, {x[1]:+.2f}) label {int(y)}")
        for title, rows in (("proponents", order[:top_k]), ("opponents", order.flip(0)[:top_k])):
            listed = ", ".join(f"{documents.document_ids[r]} (label {int(train_y[r])}, {scores[q, r]:+.3g})" for r in rows.tolist())
            print(f"  top {title}: {listed}")
    return {"scores": scores, "train_labels": train_y, "query_labels": test_y}


# ---------------------------------------------------------------------- the fact demo
def collator(task: CausalLMTask):
    """A Trainer data collator that keeps only `input_ids` of each row (ids and sources stay out of the forward)."""

    def collate(rows):
        return task.collate([{"input_ids": row["input_ids"]} for row in rows])

    return collate


def training_arguments(output_dir: Path, epochs: int, learning_rate: float, batch_size: int, seed: int, **kwargs):
    """The demo's `TrainingArguments`: linear schedule, no checkpoints, no reporting, CPU unless CUDA is there."""
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(output_dir), num_train_epochs=epochs, learning_rate=learning_rate, per_device_train_batch_size=batch_size,
        lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0, logging_steps=50, save_strategy="no",
        report_to=[], use_cpu=not torch.cuda.is_available(), seed=seed, data_seed=seed, disable_tqdm=False, **kwargs,
    )


def train_fact_model(output_dir: str | Path, seed: int = 0, pretrain_epochs: int = 40, finetune_epochs: int = 30,
                     config: Optional[AttributionConfig] = None, corpus_kwargs: Optional[dict] = None, hidden_size: int = 64) -> dict:
    """Build the demo's model and artifact in `output_dir`: ``model/`` (base, adapter, tokenizer) and ``influence/``.

    The base is a 2-layer Llama `hidden_size` wide, pre-trained from scratch on the corpus's pretraining texts.
    Returns the corpus, tokenizer, the fine-tuned PEFT model and the artifact.
    """
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Trainer

    from ..integrations.callback import ForwardAttributionCallback
    from .toy import fact_corpus, tiny_llama, train_tokenizer

    output_dir = Path(output_dir)
    corpus = fact_corpus(seed=seed, **(corpus_kwargs or {}))
    documents = corpus["documents"]
    tokenizer = train_tokenizer(corpus["pretraining"] + [d["text"] for d in documents], vocab_size=600)
    task = CausalLMTask(pad_token_id=tokenizer.pad_token_id)
    encode = lambda text: tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]  # noqa: E731

    print(f"[1/3] Pre-training a tiny Llama from scratch on {len(corpus['pretraining'])} texts about other invented places…")
    base = tiny_llama(len(tokenizer), hidden_size=hidden_size, layers=2, heads=4, seed=seed).train()
    pretraining = Dataset.from_list([{"input_ids": encode(t)} for t in corpus["pretraining"]])
    Trainer(model=base, args=training_arguments(output_dir / "pretraining", pretrain_epochs, 3e-3, 16, seed),
            train_dataset=pretraining, data_collator=collator(task)).train()
    model_dir = output_dir / "model"
    base.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)

    print(f"[2/3] Fine-tuning a LoRA adapter on {len(documents)} documents from {len({d['source'] for d in documents})} sources, "
          "with ForwardAttributionCallback…")
    base = AutoModelForCausalLM.from_pretrained(model_dir)  # the adapter then records model/ as its base
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=LORA_TARGETS))
    train = Dataset.from_list([{"document_id": d["document_id"], "source": d["source"], "input_ids": encode(d["text"])} for d in documents])
    callback = ForwardAttributionCallback(
        document_column="document_id", source_column="source",
        config=config or AttributionConfig(damping=1e-3, batch_size=16),  # closed form, K = 3000, JVP readout
    )
    trainer = Trainer(
        model=model, args=training_arguments(output_dir, finetune_epochs, 1e-2, 8, seed, remove_unused_columns=False),
        train_dataset=train, data_collator=collator(task), processing_class=tokenizer, callbacks=[callback],
    )
    trainer.train()
    model.save_pretrained(model_dir)
    return {"corpus": corpus, "tokenizer": tokenizer, "model": model.eval(), "artifact": callback.artifact, "task": task}


def fact_demo(output_dir: str | Path = "runs/demo", seed: int = 0, questions: int = 4, top_k: int = 3) -> dict:
    """The main job on built-in defaults: train, simulate, then attribute a few fact questions."""
    made = train_fact_model(output_dir, seed=seed)
    corpus, tokenizer, model, artifact, task = made["corpus"], made["tokenizer"], made["model"], made["artifact"], made["task"]
    print(f"[3/3] Attributing answers with forward passes only ({artifact.config.readout.value} readout)…\n")
    subspace = artifact.bind(model)
    readout = ForwardReadout.from_config(subspace, task, artifact.config)
    table = artifact.documents
    hits = 0
    chosen = corpus["questions"][:questions]
    for question in chosen:
        query = CausalLMTask.query_example(tokenizer(question["prompt"])["input_ids"], tokenizer(question["answer"])["input_ids"])
        scores = readout.scores([query], artifact.iter_responses(), num_directions=artifact.num_documents)[0]
        source_scores = readout.scores([query], artifact.source_responses)[0]
        order = torch.argsort(scores, descending=True)[:top_k].tolist()
        hits += table.document_ids[order[0]] == question["document_id"]
        print(f"Q: {question['prompt']}…{question['answer']}   (stated in {question['document_id']}, source {question['source']})")
        for rank, row in enumerate(order, start=1):
            print(f"   {rank}. {table.document_ids[row]:<16} {table.sources[row]:<14} score {scores[row]:+.3f}")
        best = int(torch.argmax(source_scores))
        print(f"   top source: {artifact.source_names[best]} (score {source_scores[best]:+.3f})\n")
    print(f"The true document ranked first for {hits} of {len(chosen)} questions. "
          f"Model and tokenizer: {Path(output_dir) / 'model'}; artifact: {Path(output_dir) / 'influence'}.")
    return {**made, "top1_hits": hits}
