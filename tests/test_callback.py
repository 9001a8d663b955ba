"""ForwardAttributionCallback inside real Trainer runs: both subspaces, chunking, 2 processes, bad input."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

from hf_fwdattr import (
    AttributionConfig,
    AttributionSubspace,
    CausalLMTask,
    DocumentSet,
    DocumentsError,
    DuplicateDocumentError,
    EmptyDocumentsError,
    ForwardAttributionCallback,
    ForwardReadout,
    InfluenceArtifact,
    SimulationDivergedError,
    SubspaceError,
    build_influence_artifact,
    simulate_responses,
)
from hf_fwdattr.integrations.data import documents_from_dataset, examples_from_dataset, split_into_chunks
from hf_fwdattr.estimator.subspace import fingerprint_parameters, model_fingerprint
from hf_fwdattr.demo.toy import fact_corpus, tiny_llama, train_tokenizer

ROOT = Path(__file__).resolve().parent.parent
CORPUS = dict(n_entities=5, relations_per_entity=2, n_filler=4, n_distractors=2, pretraining_entities=10)
# Tests of the Trainer integration, not of the estimator's fidelity (tests/test_curvature.py, benchmarks/fidelity): the
# EK-FAC basis builds in a second where the default low-rank basis of these p > explicit_max_dim adapters takes minutes
FAST_BASIS = "kronecker"


def _collator(task):
    return lambda rows: task.collate([{"input_ids": r["input_ids"]} for r in rows])


def _args(output_dir, epochs, learning_rate, **kwargs):
    return TrainingArguments(output_dir=str(output_dir), num_train_epochs=epochs, learning_rate=learning_rate, per_device_train_batch_size=8,
                             save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, seed=0, logging_steps=1000, **kwargs)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny Llama pre-trained from scratch on texts about other invented places, saved with its tokenizer."""
    directory = tmp_path_factory.mktemp("base")
    corpus = fact_corpus(**CORPUS)
    tokenizer = train_tokenizer(corpus["pretraining"] + [d["text"] for d in corpus["documents"]], vocab_size=400)
    task = CausalLMTask(pad_token_id=tokenizer.pad_token_id)
    model = tiny_llama(len(tokenizer), hidden_size=48, heads=4).train()
    texts = Dataset.from_list([{"input_ids": tokenizer(t)["input_ids"] + [tokenizer.eos_token_id]} for t in corpus["pretraining"]])
    Trainer(model=model, args=_args(directory / "run", 30, 3e-3), train_dataset=texts, data_collator=_collator(task)).train()
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def _fact_dataset(tokenizer):
    corpus = fact_corpus(**CORPUS)
    rows = [{"document_id": d["document_id"], "source": d["source"], "input_ids": tokenizer(d["text"])["input_ids"] + [tokenizer.eos_token_id]}
            for d in corpus["documents"]]
    return corpus, Dataset.from_list(rows)


def _top_document_accuracy(artifact, model, tokenizer, questions):
    task = CausalLMTask(pad_token_id=tokenizer.pad_token_id)
    subspace = artifact.bind(model)
    try:
        queries = [CausalLMTask.query_example(tokenizer(q["prompt"])["input_ids"], tokenizer(q["answer"])["input_ids"]) for q in questions]
        readout = ForwardReadout(subspace, task, artifact.config.readout)
        scores = readout.scores(queries, artifact.iter_responses(), num_directions=artifact.num_documents)
    finally:
        subspace.remove()
    top = [artifact.documents.document_ids[i] for i in scores.argmax(dim=1).tolist()]
    return sum(t == q["document_id"] for t, q in zip(top, questions)) / len(questions)


@pytest.mark.parametrize("solver", ["closed_form", "unlearning"])
def test_lora_finetune_writes_an_artifact_whose_top_proponent_states_the_fact(base_dir, tmp_path, solver):
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    corpus, dataset = _fact_dataset(tokenizer)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"]))
    callback = ForwardAttributionCallback(document_column="document_id", source_column="source",
                                          config=AttributionConfig(solver=solver, damping=1e-3, horizon=20, batch_size=8, eigenbasis=FAST_BASIS))
    task = CausalLMTask(pad_token_id=tokenizer.pad_token_id)
    trainer = Trainer(model=model, args=_args(tmp_path, 30, 1e-2, remove_unused_columns=False), train_dataset=dataset,
                      data_collator=_collator(task), processing_class=tokenizer, callbacks=[callback])
    trainer.train()
    artifact = InfluenceArtifact.from_pretrained(tmp_path / "influence")
    assert artifact.num_documents == len(dataset) and artifact.subspace_spec.kind.value == "peft"
    assert artifact.documents.document_ids == dataset["document_id"] and artifact.documents.sources == dataset["source"]
    assert artifact.simulation["cost_vs_training"] > 0
    # the unlearning solver takes Adam steps at unlearning_rate: it has no η of the recursion
    assert artifact.simulation["step_size"] is None if solver == "unlearning" else artifact.simulation["step_size"] > 0
    assert artifact.simulation.get("eigenbasis") == ({"kind": "kronecker"} if solver == "closed_form" else None)  # FAST_BASIS
    assert artifact.config.readout.value == ("removal" if solver == "unlearning" else "jvp")
    assert _top_document_accuracy(artifact, model, tokenizer, corpus["questions"]) >= 0.8


def test_full_finetune_uses_a_projection_adapter_and_leaves_the_model_alone(base_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    corpus, dataset = _fact_dataset(tokenizer)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    callback = ForwardAttributionCallback(document_column="document_id", source_column="source", projection_rank=8,
                                          target_modules=["q_proj", "v_proj", "up_proj", "down_proj"],
                                          config=AttributionConfig(damping=1e-3, horizon=20, batch_size=8, eigenbasis=FAST_BASIS))
    task = CausalLMTask(pad_token_id=tokenizer.pad_token_id)
    trainer = Trainer(model=model, args=_args(tmp_path, 20, 3e-3, remove_unused_columns=False), train_dataset=dataset,
                      data_collator=_collator(task), processing_class=tokenizer, callbacks=[callback])
    trainer.train()
    names = [n for n, _ in model.named_parameters()]
    assert not any("lora" in n for n in names), "the projection adapter must be taken out after the simulation"
    assert all(p.requires_grad for p in model.parameters())
    artifact = InfluenceArtifact.from_pretrained(tmp_path / "influence")
    assert artifact.subspace_spec.kind.value == "projection" and artifact.subspace_spec.rank == 8
    assert artifact.model_fingerprint == model_fingerprint(model)
    assert _top_document_accuracy(artifact, model.eval(), tokenizer, corpus["questions"]) >= 0.8


def test_chunked_document_response_is_the_sum_of_its_chunks(base_dir):
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    task = CausalLMTask(pad_token_id=tokenizer.pad_token_id)
    text = "The capital of Zorbia is Kelvash. " * 4
    ids = tokenizer(text)["input_ids"]
    dataset = Dataset.from_list([{"document_id": "long", "input_ids": ids}, {"document_id": "short", "input_ids": ids[:6]}])
    prepared = documents_from_dataset(dataset, max_length=(len(ids) + 2) // 3 + 1)  # L + 2(L - 1) >= len: three chunks
    chunks = [e for e, d in zip(prepared.documents.examples, prepared.documents.example_document) if d == 0]
    assert len(chunks) == 3
    predicted = sum(sum(label != -100 for label in c["labels"][1:]) for c in chunks)
    assert predicted == len(ids) - 1, "every token after the first is scored exactly once"
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    subspace = AttributionSubspace.build(model)
    train = examples_from_dataset(dataset)
    config = AttributionConfig(damping=1e-2, horizon=5, batch_size=2)  # automatic η: the same for both runs
    whole = simulate_responses(subspace, task, prepared.documents, train, config).responses[0]
    separate = simulate_responses(subspace, task, DocumentSet.from_examples(chunks), train, config).responses
    torch.testing.assert_close(whole, separate.sum(0), rtol=1e-4, atol=1e-6)


@pytest.mark.distributed
@pytest.mark.parametrize("solver, storage", [("closed_form", "exact"), ("linearized", "exact"), ("unlearning", "exact"), ("closed_form", "compressed")])
def test_two_processes_give_the_single_process_artifact(base_dir, tmp_path, solver, storage):
    out = tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "SLOW_SECOND_RANK": "1"}  # rank 1 lists the shards late
    torchrun = Path(sys.executable).with_name("torchrun")
    run = subprocess.run([str(torchrun), "--nproc_per_node", "2", str(ROOT / "tests" / "scripts" / "distributed_finetune.py"), str(base_dir), str(out),
                          solver, storage], env=env, capture_output=True, text=True, timeout=600)
    # a failing rank takes the other down at its next barrier ("Connection closed by peer"): show the first one's own error
    first = [line for line in run.stderr.splitlines() if "Error" in line and "Connection closed by peer" not in line][:20]
    assert run.returncode == 0, "\n".join(first) + "\n...\n" + run.stderr[-3000:]
    assert "processes 2" in run.stdout
    two = InfluenceArtifact.from_pretrained(out / "influence")
    assert two.config.solver.value == solver and two.simulation["processes"] == 2 and len(list((out / "influence").glob("responses-*.safetensors"))) >= 2

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), out / "adapter")
    dataset = Dataset.from_list([{"document_id": d, "input_ids": i} for d, i in zip(
        two.documents.document_ids, [tokenizer(d["text"])["input_ids"] for d in fact_corpus(n_entities=4, relations_per_entity=2, n_filler=3, n_distractors=1, pretraining_entities=6)["documents"]])])
    prepared = documents_from_dataset(dataset, max_length=model.config.max_position_embeddings)
    objective = two.simulation["objective"]  # the callback simulates Trainer's objective: the token mean of the NLL
    task = CausalLMTask(pad_token_id=tokenizer.pad_token_id, reduction=objective["reduction"], tokens_per_example=objective["tokens_per_example"])
    assert two.compressed == (storage == "compressed")
    one = build_influence_artifact(model, task, prepared.documents, examples_from_dataset(dataset), tmp_path / "one", two.config, progress=False,
                                   compression=two.compression or "exact")
    assert one.model_fingerprint == two.model_fingerprint and one.subspace_fingerprint == two.subspace_fingerprint
    assert one.step_size == two.step_size if solver == "unlearning" else one.step_size == pytest.approx(two.step_size, rel=1e-6)
    # each process estimates the eigenbasis itself, with its own thread count: float32 rounding differs slightly
    torch.testing.assert_close(one.responses(), two.responses(), rtol=1e-4, atol=1e-6)


def _trainer(model, dataset, tokenizer, callback, output_dir):
    task = CausalLMTask(pad_token_id=tokenizer.pad_token_id)
    return Trainer(model=model, args=_args(output_dir, 1, 1e-3, remove_unused_columns=False), train_dataset=dataset,
                   data_collator=_collator(task), processing_class=tokenizer, callbacks=[callback])


def _lora(base_dir):
    return get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))


def test_bad_documents_are_refused_before_training(base_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    _, dataset = _fact_dataset(tokenizer)
    with pytest.raises(DocumentsError, match="no document id column 'doc'.*document_column"):
        ForwardAttributionCallback(documents=dataset, document_column="doc")
    with pytest.raises(EmptyDocumentsError, match="empty"):
        ForwardAttributionCallback(documents=dataset.select([]))
    duplicated = Dataset.from_list([dataset[0], dataset[1], dataset[0]])
    with pytest.raises(DuplicateDocumentError, match=dataset[0]["document_id"]):
        ForwardAttributionCallback(documents=duplicated)
    # the trainer's own dataset is checked when training begins: no step is taken
    model = _lora(base_dir)
    before = fingerprint_parameters(list(model.named_parameters()))
    trainer = _trainer(model, duplicated, tokenizer, ForwardAttributionCallback(), tmp_path)
    with pytest.raises(DuplicateDocumentError):
        trainer.train()
    assert trainer.state.global_step == 0 and fingerprint_parameters(list(model.named_parameters())) == before
    assert not (tmp_path / "influence").exists()


def test_model_without_parameters_in_the_subspace_is_refused_before_training(base_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    _, dataset = _fact_dataset(tokenizer)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    model.requires_grad_(False)
    model.model.norm.weight.requires_grad_(True)  # Trainer needs something to train
    trainer = _trainer(model, dataset, tokenizer, ForwardAttributionCallback(subspace="projection", target_modules=["no_such_layer"]), tmp_path)
    with pytest.raises(SubspaceError):
        trainer.train()
    assert trainer.state.global_step == 0


def test_diverging_solver_is_refused_instead_of_a_wasted_simulation(base_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    _, dataset = _fact_dataset(tokenizer)
    model = _lora(base_dir)
    (tmp_path / "checkpoint-1").mkdir()
    (tmp_path / "checkpoint-1" / "marker").write_text("keep me")
    callback = ForwardAttributionCallback(config=AttributionConfig(step_size=1e4, horizon=50))
    trainer = _trainer(model, dataset, tokenizer, callback, tmp_path)
    with pytest.raises(SimulationDivergedError, match="η\\(h_max \\+ λ\\)"):
        trainer.train()
    trained = fingerprint_parameters(list(model.named_parameters()))
    assert trainer.state.global_step > 0
    assert not any("fwdattr" in n for n, _ in model.named_parameters())
    assert fingerprint_parameters(list(model.named_parameters())) == trained
    assert (tmp_path / "checkpoint-1" / "marker").read_text() == "keep me"
    assert not list((tmp_path / "influence").glob("responses-*")) if (tmp_path / "influence").exists() else True


_KILLED_AFTER_ONE_SHARD = """
import os, signal, sys
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer
import hf_fwdattr.storage.shards
from hf_fwdattr import AttributionConfig, CausalLMTask, build_influence_artifact
from hf_fwdattr.integrations.data import documents_from_dataset, examples_from_dataset

base, out, kill = sys.argv[1], sys.argv[2], sys.argv[3] == "kill"
original = hf_fwdattr.storage.shards.ShardWriter.write
def write_then_die(self, index, rows):
    original(self, index, rows)
    print("wrote", index, flush=True)
    if kill:
        os.kill(os.getpid(), signal.SIGKILL)
hf_fwdattr.storage.shards.ShardWriter.write = write_then_die
tokenizer = AutoTokenizer.from_pretrained(base)
torch.manual_seed(0)
model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
texts = ["The capital of Zorbia is Kelvash.", "Zorbia was founded by Vashmir.", "The flag of Quelan is teal.", "Quelan is famous for exporting salt."]
dataset = Dataset.from_list([{"document_id": f"d{i}", "input_ids": tokenizer(t)["input_ids"]} for i, t in enumerate(texts)])
prepared = documents_from_dataset(dataset)
build_influence_artifact(model, CausalLMTask(pad_token_id=0), prepared.documents, examples_from_dataset(dataset), out,
                         AttributionConfig(horizon=4, batch_size=2), shard_rows=1, progress=False)
"""


def test_interrupted_simulation_resumes_from_its_finished_shards(base_dir, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = lambda out, mode: subprocess.run([sys.executable, "-c", _KILLED_AFTER_ONE_SHARD, str(base_dir), str(out), mode],  # noqa: E731
                                           env=env, capture_output=True, text=True, timeout=300)
    killed = run(tmp_path / "resumed", "kill")
    assert killed.returncode != 0 and killed.stdout.split() == ["wrote", "0"]
    with pytest.raises(Exception, match="interrupted"):
        InfluenceArtifact.from_pretrained(tmp_path / "resumed")
    resumed = run(tmp_path / "resumed", "finish")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert resumed.stdout.split() == ["wrote", "1", "wrote", "2", "wrote", "3"], "the finished shard must not be simulated again"
    assert run(tmp_path / "straight", "finish").returncode == 0
    a, b = InfluenceArtifact.from_pretrained(tmp_path / "resumed"), InfluenceArtifact.from_pretrained(tmp_path / "straight")
    torch.testing.assert_close(a.responses(), b.responses(), rtol=0, atol=0)
    assert a.documents == b.documents and a.settings() == b.settings()


def test_callback_pushes_the_artifact_to_the_hub(base_dir, tmp_path, monkeypatch):
    import huggingface_hub.constants

    from hub_server import RecordingHub

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    _, dataset = _fact_dataset(tokenizer)
    callback = ForwardAttributionCallback(push_to_hub=True, hub_repo_id="me/facts-influence", config=AttributionConfig(horizon=2, batch_size=4))
    with RecordingHub() as hub:
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub.endpoint)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        _trainer(_lora(base_dir), dataset, tokenizer, callback, tmp_path).train()
    (commit,) = hub.commits
    assert commit["repo"] == "me/facts-influence"
    assert {"attribution_config.json", "documents.jsonl", "README.md", "responses.safetensors.index.json"} <= set(commit["files"])
