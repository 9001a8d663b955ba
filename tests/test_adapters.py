"""Directions of an artifact as PEFT LoRA adapters: PEFT reproduces f_q(θ* ± εû) of the readout, the scores follow,
and subspaces that have no adapter form are refused with what to change."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open

from hf_fwdattr import AdapterExportError, AttributionSubspace, CausalLMTask, ForwardReadout, ServingError
from hf_fwdattr.estimator.functional import TaskFunction
from hf_fwdattr.integrations.serving.adapter_set import AdapterSet, adapter_name, smallest_vllm_rank
from hf_fwdattr.integrations.serving.attribution import answer_token_log_likelihoods
from hf_fwdattr.integrations.serving.export import export_adapters, lora_layout

import serving_models
from serving_models import CASES, base_model, make_case, queries, with_user_adapter

ROOT = Path(__file__).resolve().parent.parent
TASK = CausalLMTask(pad_token_id=0)


@pytest.fixture(scope="module")
def vocab():
    return len(serving_models.tokenizer())


@pytest.fixture(scope="module")
def cases(vocab):
    return {case: make_case(case, vocab) for case in CASES}


def peft_values(adapter_set: AdapterSet, vocab: int, batch) -> dict:
    """f_q under every adapter of the set, each loaded with PEFT onto a fresh copy of the served base weights."""
    values = {}
    for entry in adapter_set.entries:
        model = PeftModel.from_pretrained(base_model(vocab), str(adapter_set.path(entry.name))).eval()
        with torch.no_grad():
            values[entry.name] = TASK.measurement(model, batch)
    return values


@pytest.mark.parametrize("case", CASES)
def test_peft_reproduces_the_perturbed_parameters(cases, vocab, tmp_path, case):
    model, artifact = cases[case]
    adapter_set = export_adapters(artifact, model, tmp_path / "set")
    batch = TASK.collate(queries(vocab))
    loaded = peft_values(adapter_set, vocab, batch)
    subspace = artifact.bind(model)
    try:
        function = TaskFunction(subspace, TASK.measurement)
        vectors = artifact.source_responses.float()
        units = vectors / vectors.norm(dim=1, keepdim=True)
        with torch.no_grad():
            for entry in adapter_set.entries:
                delta = torch.zeros(subspace.dim) if entry.direction is None else entry.sign * adapter_set.epsilon * units[entry.direction]
                torch.testing.assert_close(loaded[entry.name], function(delta, batch), rtol=1e-6, atol=2e-6)
        expected = ForwardReadout(subspace, TASK, "central_difference", epsilon=adapter_set.epsilon).scores(queries(vocab), artifact.source_responses)
    finally:
        subspace.remove()
    scores = adapter_set.direction_scores({k: v.double().numpy() for k, v in loaded.items()})
    assert scores.shape == (3, 3) and adapter_set.labels == artifact.source_names
    assert np.abs(scores - expected.double().numpy()).max() < 2e-3 * np.abs(expected.double().numpy()).max()
    assert len(adapter_set.entries) == 1 + 2 * 3 and adapter_set.rank == (8 if case == "concatenated" else 4)


def test_projection_subspace_keeps_the_models_own_adapter(vocab):
    model = with_user_adapter(base_model(vocab))
    batch = TASK.collate(queries(vocab))
    with torch.no_grad():
        before = TASK.measurement(model, batch)
        with AttributionSubspace.build(model, "projection", rank=2, target_modules=["q_proj", "o_proj"]) as subspace:
            torch.testing.assert_close(TASK.measurement(model, batch), before, rtol=0, atol=0)
            moved = TaskFunction(subspace, TASK.measurement)(torch.full((subspace.dim,), 1e-2), batch)
            assert (moved - before).abs().max() > 1e-4  # the projection adapter acts on top of the user's
        torch.testing.assert_close(TASK.measurement(model, batch), before, rtol=0, atol=0)
    assert list(model.peft_config) == ["default"]
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [n for n, _ in model.named_parameters() if ".lora_" in n]
    model.merge_adapter()
    with pytest.raises(Exception, match="merge_and_unload"):
        AttributionSubspace.build(model, "projection", rank=2)


def test_peft_adapter_keeps_its_config_and_peft_names(cases, tmp_path):
    model, artifact = cases["peft"]
    adapter_set = export_adapters(artifact, model, tmp_path / "set", base_model_name_or_path="served/model")
    model.save_pretrained(tmp_path / "own")
    with safe_open(str(tmp_path / "own" / "adapter_model.safetensors"), "pt") as own, \
            safe_open(str(adapter_set.path("base") / "adapter_model.safetensors"), "pt") as exported:
        assert sorted(own.keys()) == sorted(exported.keys())
        for key in own.keys():  # the base adapter is the model's own adapter, bit for bit
            assert torch.equal(own.get_tensor(key), exported.get_tensor(key))
    config = json.loads((adapter_set.path("plus-00000") / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["base_model_name_or_path"]) == (4, 8, "served/model")


def test_concatenated_adapter_folds_both_scalings(cases, tmp_path):
    model, artifact = cases["concatenated"]
    adapter_set = export_adapters(artifact, model, tmp_path / "set", mode="one_sided")
    config = json.loads((adapter_set.path("base") / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (8, 8)
    assert sorted(config["target_modules"]) == ["down_proj", "o_proj", "q_proj", "v_proj"]
    with safe_open(str(adapter_set.path("base") / "adapter_model.safetensors"), "pt") as exported:
        a = exported.get_tensor("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight")
        b = exported.get_tensor("base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight")
        o_a = exported.get_tensor("base_model.model.model.layers.0.self_attn.o_proj.lora_A.weight")
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    torch.testing.assert_close(a[:4], layer.lora_A["default"].weight)
    torch.testing.assert_close(b[:, :4], layer.lora_B["default"].weight * 2.0)  # lora_alpha 8 / r 4
    assert b[:, 4:].abs().max() == 0  # the projection's B is zero at θ*
    assert o_a[:4].abs().max() == 0 and o_a[4:].abs().max() > 0  # o_proj has the projection only: zero rows for the user part
    assert [e.name for e in adapter_set.entries] == ["base", "plus-00000", "plus-00001", "plus-00002"]


def test_one_sided_scores_use_the_base_adapter(cases, vocab, tmp_path):
    model, artifact = cases["projection"]
    adapter_set = export_adapters(artifact, model, tmp_path / "set", mode="one_sided")
    assert not list(tmp_path.glob("set/minus-*"))
    batch = TASK.collate(queries(vocab))
    values = {k: v.double().numpy() for k, v in peft_values(adapter_set, vocab, batch).items()}
    expected = (np.stack([values[adapter_name(j, 1)] for j in range(3)], 1) - values["base"][:, None]) / adapter_set.epsilon
    np.testing.assert_allclose(adapter_set.direction_scores(values), expected * np.asarray(adapter_set.norms)[None], rtol=1e-12)
    with pytest.raises(ServingError, match="base"):
        adapter_set.direction_scores({k: v for k, v in values.items() if k != "base"})


def test_document_and_basis_directions(cases, vocab, tmp_path):
    model, artifact = cases["projection"]
    documents = export_adapters(artifact, model, tmp_path / "documents", directions="documents", document_ids=["doc-4", "doc-1"])
    assert documents.labels == ["doc-4", "doc-1"] and documents.direction_sources == ["river", "river"]
    torch.testing.assert_close(torch.tensor(documents.norms), artifact.responses([4, 1]).norm(dim=1))
    assert documents.ranked([0.5, 2.0], top_k=1) == [{"document_id": "doc-1", "source": "river", "score": 2.0}]
    basis = export_adapters(artifact, model, tmp_path / "basis", directions="basis")
    loaded = AdapterSet.from_pretrained(tmp_path / "basis")
    assert loaded.to_dict() == basis.to_dict() and loaded.set_id == basis.set_id
    np.testing.assert_array_equal(loaded.coefficients, artifact.readout_basis["coefficients"].double().numpy())
    direction_scores = np.arange(loaded.num_directions, dtype=float)[None]
    np.testing.assert_allclose(loaded.document_scores(direction_scores), direction_scores @ loaded.coefficients.T)
    top = loaded.ranked(loaded.document_scores(direction_scores)[0], top_k=2)
    assert [set(r) for r in top] == [{"document_id", "source", "score"}] * 2


def test_removal_adapters_take_the_unlearning_response_away(vocab, tmp_path):
    from hf_fwdattr import AttributionConfig, DocumentSet, InfluenceArtifact, simulate_responses
    from serving_models import examples

    model = base_model(vocab)
    train = examples(vocab, 6, seed=2)
    documents = DocumentSet(examples=train[:3], example_document=[0, 1, 2], document_ids=list("abc"), sources=list("xxy"))
    config = AttributionConfig(solver="unlearning", horizon=3, batch_size=3)
    with AttributionSubspace.build(model, "projection", rank=2, target_modules=["q_proj"]) as subspace:
        artifact = InfluenceArtifact.from_simulation(subspace, documents, simulate_responses(subspace, TASK, documents, train, config), config)
    with pytest.raises(AdapterExportError, match="directions='documents'"):
        export_adapters(artifact, model, tmp_path / "sources")
    adapter_set = export_adapters(artifact, model, tmp_path / "set", directions="documents", document_ids=["c", "a"])
    assert adapter_set.mode.value == "removal" and [e.name for e in adapter_set.entries] == ["base", "minus-00000", "minus-00001"]
    batch = TASK.collate(queries(vocab))
    values = {k: v.double().numpy() for k, v in peft_values(adapter_set, vocab, batch).items()}
    with artifact.bind(model) as subspace:
        expected = ForwardReadout(subspace, TASK, "removal").scores(queries(vocab), artifact.responses([2, 0]))
    np.testing.assert_allclose(adapter_set.direction_scores(values), expected.double().numpy(), rtol=1e-5, atol=1e-5)
    with pytest.raises(AdapterExportError, match="unlearning"):
        export_adapters(make_case("projection", vocab)[1], model, tmp_path / "other", mode="removal")


def test_bad_requests_say_what_to_change(cases, tmp_path, vocab):
    model, artifact = cases["projection"]
    export_adapters(artifact, model, tmp_path / "set")
    with pytest.raises(AdapterExportError, match="overwrite=True"):
        export_adapters(artifact, model, tmp_path / "set")
    with pytest.raises(AdapterExportError, match="doc-99"):
        export_adapters(artifact, model, tmp_path / "other", directions="documents", document_ids=["doc-99"])
    with pytest.raises(AdapterExportError, match="document_ids"):
        export_adapters(artifact, model, tmp_path / "other", directions="documents")
    artifact_without_basis = artifact.remove_documents(["doc-0"])  # drops the basis
    with pytest.raises(AdapterExportError, match="readout_basis_rank"):
        export_adapters(artifact_without_basis, model, tmp_path / "other", directions="basis")
    (tmp_path / "set" / "minus-00001" / "adapter_config.json").unlink()
    with pytest.raises(AdapterExportError, match="minus-00001"):
        AdapterSet.from_pretrained(tmp_path / "set")


def test_subspaces_without_an_adapter_form_are_refused(vocab):
    with AttributionSubspace.build(base_model(vocab), "trainable") as subspace:
        with pytest.raises(AdapterExportError, match="subspace='projection'"):
            lora_layout(subspace)
    dora = get_peft_model(base_model(vocab), LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(AdapterExportError, match="use_dora"):
        lora_layout(AttributionSubspace.build(dora, "peft"))
    # a 'trainable' subspace that is exactly one adapter's LoRA matrices is that adapter
    lora = with_user_adapter(base_model(vocab))
    layout = lora_layout(AttributionSubspace.build(lora, "trainable"))
    assert layout.adapters == ["default"] and layout.rank == 4


def test_vllm_ranks_and_arithmetic_without_a_server():
    assert [smallest_vllm_rank(r) for r in (1, 4, 8, 12, 320)] == [1, 8, 8, 16, 320]
    with pytest.raises(ServingError, match="512"):
        smallest_vllm_rank(600)
    logprobs = [None, {7: -0.5}, {9: -1.0, 3: -2.0}, {4: -0.25}]
    assert answer_token_log_likelihoods(logprobs, [1, 7, 9, 4], prompt_length=2) == [-1.0, -0.25]
    with pytest.raises(ServingError, match="prompt_logprobs"):
        answer_token_log_likelihoods([None, None, {5: -1.0}], [1, 2, 3], prompt_length=1)


def test_client_side_runs_without_torch(cases, tmp_path):
    """What a client of a server runs (the set, the arithmetic, the HTTP client) works with torch unimportable."""
    model, artifact = cases["projection"]
    export_adapters(artifact, model, tmp_path / "set", directions="basis")
    script = f"""
import sys
class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers", "peft", "vllm"):
            raise ImportError(name + " is blocked")
sys.meta_path.insert(0, NoTorch())
from hf_fwdattr.integrations.serving.adapter_set import AdapterSet
from hf_fwdattr.integrations.serving.client import VLLMServerReadout
adapters = AdapterSet.from_pretrained({str(tmp_path / "set")!r})
values = {{e.name: [float(i), 2.0 * i] for i, e in enumerate(adapters.scoring_entries)}}
scores = adapters.document_scores(adapters.direction_scores(values))
print(scores.shape, adapters.ranked(scores[0], 1)[0]["document_id"])
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[:2] == ["(2,", "6)"]


def test_cli_exports_and_help_stays_light(cases, tmp_path):
    from hf_fwdattr.cli import main

    model, artifact = cases["peft"]
    base_model(model.config.vocab_size).save_pretrained(tmp_path / "model")
    model.save_pretrained(tmp_path / "model")  # the adapter next to its base, as the Trainer leaves it
    artifact.save_pretrained(tmp_path / "influence")
    assert main(["export-adapters", "--model", str(tmp_path / "model"), "--influence", str(tmp_path / "influence"),
                 "--output-dir", str(tmp_path / "set"), "--directions", "documents", "--document-ids", "doc-2", "--one-sided"]) == 0
    exported = AdapterSet.from_pretrained(tmp_path / "set")
    assert exported.labels == ["doc-2"] and exported.mode.value == "one_sided"
    from hf_fwdattr.integrations.serving.engine import VLLMReadout
    from hf_fwdattr.integrations.serving.export import copy_served_weights

    with pytest.raises(ServingError, match="--served-dir"):  # vLLM would read the adapter as model weights
        VLLMReadout.from_pretrained(tmp_path / "model", exported)
    served = copy_served_weights(tmp_path / "model", tmp_path / "served")
    assert not list(served.glob("adapter_*")) and (served / "config.json").is_file() and (served / "model.safetensors").is_file()
    model.save_pretrained(tmp_path / "adapter-only")  # the Hub layout: an adapter folder naming its base folder
    config_path = tmp_path / "adapter-only" / "adapter_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "base_model_name_or_path": str(tmp_path / "served")}))
    again = copy_served_weights(tmp_path / "adapter-only", tmp_path / "served-again")
    assert sorted(p.name for p in again.iterdir()) == sorted(p.name for p in served.iterdir())
    probe = ("import sys; from hf_fwdattr.cli import build_parser; build_parser(); "
             "print(sorted(m for m in sys.modules if m.split('.')[0] == 'vllm' or m.startswith('hf_fwdattr.integrations.serving')))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=tmp_path)
    assert out.stdout.strip() == "[]"
