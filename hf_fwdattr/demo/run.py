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
from ..storage.permissions import give_default_mode

logger = logging.getLogger(__name__)

SCORE_UNIT = ("score: change of the answer's log-likelihood (nats) per unit of up-weighting the document in the training loss, "
              "to first order (positive: the document made the answer more likely).")
SHARE_UNIT = "share: the document's part of all positive scores for that answer, comparable across answers."

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _clusters(n_per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[2.0, 0.0], [-1.0, 1.7], [-1.0, -1.7]])
    inputs = torch.cat([c + 0.9 * torch.randn(n_per_class, 2, generator=generator) for c in centres])
    labels = torch.arange(3).repeat_interleave(n_per_class)
    return inputs, labels


def classifier_demo(output_dir: str | Path | None = None, seed: int = 0, top_k: int = 3) -> dict:
    """Train a small MLP on three noisy clusters, simulate every training point's response, and print the top
    proponents and opponents of a few test queries. Returns the score matrix and data.

    With `output_dir`, the responses are saved there as an influence artifact (``influence/``, loadable with
    `InfluenceArtifact.from_pretrained`) and the query × training-point scores as ``scores.safetensors``.
    """
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
    print(f"\n{SCORE_UNIT.replace('answer', 'query label')}")
    if output_dir is not None:
        _save_classifier_run(Path(output_dir), subspace, documents, config, result, scores, train_y, test_y)
    return {"scores": scores, "train_labels": train_y, "query_labels": test_y}


def _save_classifier_run(output_dir: Path, subspace, documents, config, result, scores, train_y, test_y) -> None:
    from safetensors.torch import save_file

    from ..storage.artifact import DocumentTable, InfluenceArtifact
    from ..storage.permissions import give_default_mode

    artifact = InfluenceArtifact(
        config=config, subspace_spec=subspace.spec, documents=DocumentTable.from_document_set(documents), responses=result.responses,
        model_fingerprint=subspace.model_fingerprint, subspace_fingerprint=subspace.fingerprint,
        simulation={"step_size": result.step_size, "seconds": result.seconds},
    )
    output_dir.mkdir(parents=True, exist_ok=True)
    artifact.save_pretrained(output_dir / "influence", overwrite=True)
    save_file({"scores": scores.contiguous(), "train_labels": train_y.contiguous(), "query_labels": test_y.contiguous()},
              str(output_dir / "scores.safetensors"), metadata={"format": "pt"})
    give_default_mode(output_dir / "scores.safetensors")
    print(f"Artifact: {output_dir / 'influence'}; scores [queries × training points]: {output_dir / 'scores.safetensors'}.")


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
    """Build the demo's models and artifact in `output_dir`, laid out as on the Hub: ``base/`` (the pre-trained model
    and tokenizer), ``model/`` (the LoRA adapter and tokenizer; its ``adapter_config.json`` names ``base/`` by
    absolute path, so `AutoPeftModelForCausalLM.from_pretrained` and `pipeline(model=...)` load base and adapter) and
    ``influence/`` (the artifact).

    The base is a 2-layer Llama `hidden_size` wide, pre-trained from scratch on the corpus's pretraining texts. Its
    generation config is greedy (``do_sample=False``): an attribution explains one answer, and a sampled answer, with
    its top documents, would change from call to call. Returns the corpus, tokenizer, the fine-tuned PEFT model, the
    artifact and the folders.
    """
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Trainer

    from ..integrations.callback import ForwardAttributionCallback
    from .toy import fact_corpus, tiny_llama, train_tokenizer

    output_dir = Path(output_dir)
    base_dir, model_dir = output_dir / "base", output_dir / "model"
    corpus = fact_corpus(seed=seed, **(corpus_kwargs or {}))
    documents = corpus["documents"]
    tokenizer = train_tokenizer(corpus["pretraining"] + [d["text"] for d in documents], vocab_size=600)
    task = CausalLMTask(pad_token_id=tokenizer.pad_token_id)
    encode = lambda text: tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]  # noqa: E731

    print(f"[1/3] Pre-training a tiny Llama from scratch on {len(corpus['pretraining'])} texts about other invented places…")
    base = tiny_llama(len(tokenizer), hidden_size=hidden_size, layers=2, heads=4, seed=seed).train()
    pretraining = Dataset.from_list([{"input_ids": encode(t)} for t in corpus["pretraining"]])
    Trainer(model=base, args=training_arguments(base_dir, pretrain_epochs, 3e-3, 16, seed),
            train_dataset=pretraining, data_collator=collator(task)).train()
    base.generation_config.do_sample = False  # greedy: the same answer, and the same attribution, on every call
    base.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)

    print(f"[2/3] Fine-tuning a LoRA adapter on {len(documents)} documents from {len({d['source'] for d in documents})} sources, "
          "with ForwardAttributionCallback…")
    base = AutoModelForCausalLM.from_pretrained(base_dir.resolve())  # the adapter then records base/ as its base model
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=LORA_TARGETS))
    train = Dataset.from_list([{"document_id": d["document_id"], "source": d["source"], "input_ids": encode(d["text"])} for d in documents])
    callback = ForwardAttributionCallback(
        document_column="document_id", source_column="source",
        config=config or AttributionConfig(damping=1e-3, batch_size=16),  # closed form (K = ∞: damped influence), JVP readout
    )
    trainer = Trainer(
        model=model, args=training_arguments(output_dir, finetune_epochs, 1e-2, 8, seed, remove_unused_columns=False),
        train_dataset=train, data_collator=collator(task), processing_class=tokenizer, callbacks=[callback],
    )
    trainer.train()
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    for folder in (base_dir, model_dir):  # safetensors writes 0600 files; give them the mode of the JSON files next to them
        for path in folder.glob("*.safetensors"):
            give_default_mode(path)
    return {"corpus": corpus, "tokenizer": tokenizer, "model": model.eval(), "artifact": callback.artifact, "task": task,
            "base_dir": base_dir, "model_dir": model_dir, "influence_dir": output_dir / callback.output_subdir}


def _answer_of(prompt: str, record: dict) -> str:
    text = record["generated_text"]
    return text[len(prompt):] if text.startswith(prompt) else text


def _print_ranked(title: str, attributions: list[dict], true_id: Optional[str] = None) -> None:
    print(f"   {title}")
    for rank, entry in enumerate(attributions, start=1):
        mark = "  ← states the fact" if entry["document_id"] == true_id else ""
        print(f"     {rank}. {entry['document_id']:<16} {entry['source']:<14} score {entry['score']:+9.2f}   share {entry['share']:6.1%}{mark}")


def fact_demo(output_dir: str | Path = "runs/demo", seed: int = 0, questions: int = 4, top_k: int = 3, max_new_tokens: int = 8) -> dict:
    """The main job on built-in defaults: train, simulate, then show what the model answers to a few fact questions,
    which documents made that answer likely, and, where the answer is wrong, which documents back the correct one.

    Answers are generated greedily by the ``"attributed-text-generation"`` pipeline, up to the first full stop.
    Returns what `train_fact_model` returns plus, per question, the answer and whether it is right.
    """
    from transformers import pipeline

    from ..integrations import pipeline as _registration  # noqa: F401  (registers the task)

    made = train_fact_model(output_dir, seed=seed)
    corpus, artifact = made["corpus"], made["artifact"]
    pipe = pipeline("attributed-text-generation", model=made["model"], tokenizer=made["tokenizer"], influence=artifact)
    print(f"[3/3] Asking the model, then attributing its answers with forward passes only ({artifact.config.readout.value} readout)…\n")
    answers = []
    for question in corpus["questions"][:questions]:
        prompt, truth, true_id = question["prompt"], question["answer"], question["document_id"]
        record = pipe(prompt, max_new_tokens=max_new_tokens, do_sample=False, stop_sequence=".", attribution_top_k=top_k)[0]
        answer = _answer_of(prompt, record)
        right = answer.strip().rstrip(".").strip() == truth.strip()
        verdict = "right" if right else f'WRONG: the training data says "{truth.strip()}"'
        print(f"Q: {prompt} …")
        print(f'   the model answers "{answer.strip()}"  ({verdict}; stated in {true_id}, source {question["source"]})')
        _print_ranked("documents behind the model's answer:", record["attributions"], true_id)
        source = pipe(prompt, response=answer, aggregate="source", attribution_top_k=1)[0]["attributions"][0]
        print(f"   top source: {source['source']} (share {source['share']:.1%})")
        attributed = {"prompt": prompt, "answer": answer, "right": right, "true_document": true_id,
                      "top_document": record["attributions"][0]["document_id"]}
        if not right:
            corrected = pipe(prompt, response=truth + ".", attribution_top_k=top_k)[0]
            _print_ranked(f'documents behind the correct answer "{truth.strip()}.":', corrected["attributions"], true_id)
            attributed["top_document_of_correct_answer"] = corrected["attributions"][0]["document_id"]
        print()
        answers.append(attributed)
    right = [a for a in answers if a["right"]]
    wrong = [a for a in answers if not a["right"]]
    print(f"The model answered {len(right)} of {len(answers)} questions right; the document stating the fact ranked first "
          f"behind {sum(a['top_document'] == a['true_document'] for a in right)} of those answers"
          + (f", and behind the correct answer for {sum(a['top_document_of_correct_answer'] == a['true_document'] for a in wrong)} "
             f"of the {len(wrong)} wrong ones." if wrong else ".")
          + f"\n{SCORE_UNIT}\n{SHARE_UNIT}\n"
          f"Base model: {made['base_dir']}; adapter and tokenizer: {made['model_dir']}; artifact: {made['influence_dir']}.")
    return {**made, "answers": answers}
