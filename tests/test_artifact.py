"""The influence artifact: round trips on disk and through the Hub, refusal of bad input, resumable saves."""

import hashlib
import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from hf_fwdattr import (
    ArtifactError,
    AttributionConfig,
    AttributionSubspace,
    DocumentSet,
    DocumentTable,
    DuplicateDocumentError,
    FingerprintMismatchError,
    ForwardReadout,
    InfluenceArtifact,
    simulate_responses,
)
from hf_fwdattr.storage.atomic import staging_dir
from hf_fwdattr.storage.shards import INDEX_NAME

from artifact_files import edit_config, reseal
from conftest import lm_examples, lm_queries, make_lm
from hub_server import RecordingHub

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def made():
    """(model, subspace, task, artifact) for a tiny Llama with a LoRA adapter and 6 documents from 3 sources."""
    from hf_fwdattr import CausalLMTask

    task = CausalLMTask(pad_token_id=0)
    train = lm_examples(12, seed=3)
    documents = DocumentSet(examples=train[:9], example_document=[0, 0, 1, 2, 3, 3, 4, 5, 5],
                            document_ids=[f"doc-{i}" for i in range(6)], sources=["wiki", "news", "wiki", "blog", "news", "wiki"])
    model, kwargs = make_lm("llama", "peft")
    subspace = AttributionSubspace.build(model, **kwargs)
    config = AttributionConfig(damping=1e-2, horizon=3, batch_size=6)
    result = simulate_responses(subspace, task, documents, train, config)
    artifact = InfluenceArtifact.from_simulation(subspace, documents, result, config, metadata=[{"url": f"https://example.org/{i}"} for i in range(6)])
    artifact.base_model = {"name_or_path": "tiny-llama-test", "revision": None}
    return model, subspace, task, artifact


def _small_shards(artifact):
    return 2 * artifact.dim * 4  # two float32 rows per shard


def _tree_digest(directory: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()}


def test_round_trip_on_disk_with_shards(made, tmp_path):
    _, _, _, artifact = made
    artifact.save_pretrained(tmp_path, max_shard_size=_small_shards(artifact))
    shards = sorted(p.name for p in tmp_path.glob("responses-*.safetensors"))
    assert shards == [f"responses-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    loaded = InfluenceArtifact.from_pretrained(tmp_path)
    torch.testing.assert_close(loaded.responses(), artifact.responses(), rtol=0, atol=0)
    assert loaded.documents == artifact.documents
    assert loaded.config == artifact.config and loaded.subspace_spec == artifact.subspace_spec
    assert loaded.source_names == ["wiki", "news", "blog"]
    torch.testing.assert_close(loaded.source_responses, artifact.source_responses, rtol=0, atol=0)
    wiki = [i for i, s in enumerate(artifact.documents.sources) if s == "wiki"]
    torch.testing.assert_close(loaded.source_responses[0], artifact.responses(wiki).sum(0), rtol=1e-6, atol=1e-6)
    assert torch.cat(list(loaded.iter_responses(chunk_rows=1))).equal(artifact.responses())
    torch.testing.assert_close(loaded.responses([5, 0, 3]), artifact.responses()[[5, 0, 3]], rtol=0, atol=0)
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    assert index["metadata"]["total_rows"] == 6 and [s["rows"] for s in index["shards"]] == [2, 2, 2]
    meta = json.loads((tmp_path / "attribution_config.json").read_text())
    assert meta["fingerprints"]["model"] == artifact.model_fingerprint and meta["library_version"]
    card = (tmp_path / "README.md").read_text()
    assert "library_name: hf_fwdattr" in card and "6 training documents" in card and "3 sources" in card
    assert not list(tmp_path.glob("*.tmp")) and not (tmp_path / ".fwdattr-save-progress.json").exists()


def test_only_safetensors_and_json_are_written(made, tmp_path):
    _, _, _, artifact = made
    artifact.save_pretrained(tmp_path)
    suffixes = {p.suffix for p in tmp_path.iterdir()}
    assert suffixes <= {".json", ".jsonl", ".safetensors", ".md"}


def test_loaded_artifact_scores_like_the_in_memory_one(made, tmp_path):
    model, subspace, task, artifact = made
    artifact.save_pretrained(tmp_path, max_shard_size=_small_shards(artifact))
    loaded = InfluenceArtifact.from_pretrained(tmp_path)
    bound = loaded.bind(model)
    queries = lm_queries(lm_examples(2, seed=11))
    readout = ForwardReadout(bound, task)
    torch.testing.assert_close(readout.scores(queries, loaded.iter_responses(chunk_rows=4)), readout.scores(queries, artifact.responses()))


def test_push_to_hub_commits_exactly_the_artifact(made, monkeypatch):
    """Pushes to `RecordingHub`, a Hub API server this test runs on 127.0.0.1 (nothing leaves the machine); the repo id
    "me/tiny-influence" exists only there, and the card's `from_pretrained("me/tiny-influence")` line is text it checks."""
    import huggingface_hub.constants

    _, _, _, artifact = made
    with RecordingHub() as hub:
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub.endpoint)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        url = artifact.push_to_hub("me/tiny-influence", private=True, token="hf_test", commit_message="add responses", max_shard_size=_small_shards(artifact))
    assert url.startswith(hub.endpoint) and "me/tiny-influence" in url
    assert hub.repos == [{"name": "tiny-influence", "organization": "me", "visibility": "private", "type": "model"}]
    (commit,) = hub.commits
    assert commit["repo"] == "me/tiny-influence" and commit["summary"] == "add responses"
    assert sorted(commit["files"]) == [
        "README.md", "attribution_config.json", "documents.jsonl",
        "responses-00001-of-00003.safetensors", "responses-00002-of-00003.safetensors", "responses-00003-of-00003.safetensors",
        "responses.safetensors.index.json", "source_responses.safetensors",
    ]
    card = commit["files"]["README.md"].decode()
    assert card.startswith("---\n") and "base_model: tiny-llama-test" in card and 'from_pretrained("me/tiny-influence")' in card
    documents = [json.loads(line) for line in commit["files"]["documents.jsonl"].decode().splitlines()]
    assert [d["document_id"] for d in documents] == artifact.documents.document_ids


def test_from_pretrained_resolves_a_repo_id_through_the_offline_cache(made, tmp_path):
    """The real repo-id code path of `from_pretrained`, with no download: the test writes the artifact into a fresh
    HF_HOME cache as the Hub client lays it out (snapshots/<revision>, refs/main) and resolves "me/tiny-influence" there
    with HF_HUB_OFFLINE=1, in a subprocess (huggingface_hub reads both variables at import)."""
    _, _, _, artifact = made
    hf_home = tmp_path / "hf_home"
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo_cache = hf_home / "hub" / "models--me--tiny-influence"
    artifact.save_pretrained(repo_cache / "snapshots" / revision)
    (repo_cache / "refs").mkdir(parents=True)
    (repo_cache / "refs" / "main").write_text(revision)
    script = textwrap.dedent("""
        from hf_fwdattr import InfluenceArtifact
        artifact = InfluenceArtifact.from_pretrained("me/tiny-influence")
        print(artifact.num_documents, ",".join(artifact.documents.document_ids), artifact.path)
    """)
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == "6" and out[1] == ",".join(artifact.documents.document_ids) and revision in out[2]


def _saved(artifact, directory):
    artifact.save_pretrained(directory, max_shard_size=_small_shards(artifact))
    return directory


def _truncate(directory):
    shard = directory / "responses-00002-of-00003.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])


def _flip_header_byte(directory):
    shard = directory / "responses-00001-of-00003.safetensors"
    data = bytearray(shard.read_bytes())
    position = data.index(b"[2,") + 1  # a digit of the shape in the JSON header
    data[position] = ord("3")
    shard.write_bytes(bytes(data))


def _remove_shard(directory):
    (directory / "responses-00003-of-00003.safetensors").unlink()


def _index_names_missing_file(directory):
    index = json.loads((directory / INDEX_NAME).read_text())
    index["shards"][1]["filename"] = "responses-00009-of-00009.safetensors"
    (directory / INDEX_NAME).write_text(json.dumps(index))


@pytest.mark.parametrize(
    "damage, message",
    [
        (_truncate, "truncated"),
        (_flip_header_byte, "corrupted|digest"),
        (_remove_shard, "missing"),
        (_index_names_missing_file, "missing|records"),
    ],
)
def test_damaged_artifact_is_refused_at_load_and_nothing_is_lost(made, tmp_path, damage, message):
    _, _, _, artifact = made
    directory = _saved(artifact, tmp_path)
    damage(directory)
    before = _tree_digest(directory)
    with pytest.raises(ArtifactError, match=message):
        InfluenceArtifact.from_pretrained(directory)
    assert _tree_digest(directory) == before


def test_duplicate_document_ids_are_refused(made, tmp_path):
    _, _, _, artifact = made
    directory = _saved(artifact, tmp_path)
    lines = (directory / "documents.jsonl").read_text().splitlines()
    lines[1] = lines[0]
    (directory / "documents.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ArtifactError, match="documents.jsonl does not match"):
        InfluenceArtifact.from_pretrained(directory)
    reseal(directory)  # a writer that records digests of whatever it wrote: the table itself is still refused
    with pytest.raises(DuplicateDocumentError, match="doc-0"):
        InfluenceArtifact.from_pretrained(directory)


def test_newer_config_with_unknown_keys_warns_and_loads(made, tmp_path, caplog):
    _, _, _, artifact = made
    directory = _saved(artifact, tmp_path)

    def newer(meta):
        meta["library_version"] = "9.0.0"
        meta["quantum_readout"] = {"enabled": True}
        meta["estimator"]["warp_factor"] = 3

    edit_config(directory, newer)  # a newer writer seals what it writes
    with caplog.at_level(logging.WARNING):
        loaded = InfluenceArtifact.from_pretrained(directory)
    assert "quantum_readout" in caplog.text and "warp_factor" in caplog.text
    assert loaded.responses().equal(artifact.responses())


def test_artifact_refuses_a_model_that_does_not_match(made):
    _, _, _, artifact = made
    other_weights, _ = make_lm("llama", "peft")
    with torch.no_grad():
        next(p for n, p in other_weights.named_parameters() if "lora_B" in n).add_(0.01)
    with pytest.raises(FingerprintMismatchError, match=f"made for {artifact.model_fingerprint[:16]}"):
        artifact.bind(other_weights)
    other_architecture, _ = make_lm("gpt2", "peft")
    with pytest.raises(FingerprintMismatchError, match="does not fit"):
        artifact.bind(other_architecture)


def test_projection_artifact_refuses_another_projection_seed(tmp_path, lm_task):
    model, kwargs = make_lm("llama", "projection")
    train = lm_examples(6)
    documents = DocumentSet.from_examples(train)
    config = AttributionConfig(horizon=2, batch_size=6)
    with AttributionSubspace.build(model, **kwargs, seed=1) as subspace:
        artifact = InfluenceArtifact.from_simulation(subspace, documents, simulate_responses(subspace, lm_task, documents, train, config), config)
    names = [n for n, _ in model.named_parameters()]
    artifact.subspace_spec.seed = 2  # a description that rebuilds a different projection
    with pytest.raises(FingerprintMismatchError, match="attribution subspace"):
        artifact.bind(model)
    assert [n for n, _ in model.named_parameters()] == names, "a refused bind must take its adapter out again"


def test_add_and_remove_documents_keep_rows_and_source_sums_exact(made, tmp_path):
    _, _, _, artifact = made
    directory = _saved(artifact, tmp_path / "a")
    loaded = InfluenceArtifact.from_pretrained(directory)
    extra = torch.randn(2, artifact.dim)
    grown = loaded.add_documents(DocumentTable(["new-0", "new-1"], ["news", "forum"]), extra)
    shrunk = grown.remove_documents(["doc-1", "doc-4"])
    assert shrunk.documents.document_ids == ["doc-0", "doc-2", "doc-3", "doc-5", "new-0", "new-1"]
    expected = torch.cat([artifact.responses()[[0, 2, 3, 5]], extra])
    torch.testing.assert_close(shrunk.responses(), expected, rtol=0, atol=0)
    assert shrunk.source_names == ["wiki", "blog", "news", "forum"]
    for name, row in zip(shrunk.source_names, shrunk.source_responses):
        members = [i for i, s in enumerate(shrunk.documents.sources) if s == name]
        torch.testing.assert_close(row, expected[members].sum(0), rtol=1e-6, atol=1e-6)
    # saving over the folder the rows are read from rebuilds it aside and swaps it in
    shrunk.save_pretrained(directory, overwrite=True, max_shard_size=_small_shards(artifact))
    torch.testing.assert_close(InfluenceArtifact.from_pretrained(directory).responses(), expected, rtol=0, atol=0)
    with pytest.raises(ArtifactError, match="No documents"):
        shrunk.remove_documents(["never-there"])
    with pytest.raises(DuplicateDocumentError):
        shrunk.add_documents(DocumentTable(["doc-0"]), torch.zeros(1, artifact.dim))
    with pytest.raises(ArtifactError, match="shape"):
        shrunk.add_documents(DocumentTable(["x"]), torch.zeros(1, artifact.dim + 1))


def test_saving_over_an_artifact_with_other_settings_is_refused(made, tmp_path):
    _, _, _, artifact = made
    artifact.save_pretrained(tmp_path)
    other = InfluenceArtifact.from_pretrained(tmp_path)
    other.config = AttributionConfig(**{**artifact.config.to_dict(), "damping": 0.5})
    with pytest.raises(ArtifactError, match="other settings") as info:
        other.save_pretrained(tmp_path)
    assert '"damping": 0.01' in str(info.value) and '"damping": 0.5' in str(info.value)


_INTERRUPTED_SAVE = """
import os, signal, sys
import safetensors.torch
from hf_fwdattr import InfluenceArtifact

source, target, shard_bytes = sys.argv[1], sys.argv[2], int(sys.argv[3])
original = safetensors.torch.save_file
calls = {"n": 0}

def dying_save_file(tensors, filename, metadata=None):
    calls["n"] += 1
    if calls["n"] == 3:  # killed while writing the third shard: half a file on disk
        with open(filename, "wb") as handle:
            handle.write(b"\\x00" * 100)
        os.kill(os.getpid(), signal.SIGKILL)
    return original(tensors, filename, metadata=metadata)

import hf_fwdattr.storage.shards
hf_fwdattr.storage.shards.save_file = dying_save_file
InfluenceArtifact.from_pretrained(source).save_pretrained(target, max_shard_size=shard_bytes)
"""


def test_interrupted_save_resumes_and_produces_the_same_artifact(made, tmp_path):
    _, _, _, artifact = made
    one_row = artifact.dim * 4
    source = _saved(artifact, tmp_path / "source")
    reference = tmp_path / "reference"
    InfluenceArtifact.from_pretrained(source).save_pretrained(reference, max_shard_size=one_row)
    target = tmp_path / "target"
    killed = subprocess.run([sys.executable, "-c", _INTERRUPTED_SAVE, str(source), str(target), str(one_row)], capture_output=True)
    assert killed.returncode != 0
    staging = staging_dir(target)  # the new artifact is written beside the folder and swapped in when complete
    finished = sorted(p.name for p in staging.glob("responses-*.safetensors"))
    assert finished == ["responses-00001-of-00006.safetensors", "responses-00002-of-00006.safetensors"]
    with pytest.raises(ArtifactError, match="interrupted"):
        InfluenceArtifact.from_pretrained(target)
    mtimes = {name: (staging / name).stat().st_mtime_ns for name in finished}
    InfluenceArtifact.from_pretrained(source).save_pretrained(target, max_shard_size=one_row)
    assert {name: (target / name).stat().st_mtime_ns for name in finished} == mtimes, "finished shards were rewritten"
    assert _tree_digest(target) == _tree_digest(reference)
