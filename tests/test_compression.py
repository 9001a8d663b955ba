"""Compressed responses (issue 18): projected while simulated, equal to projecting the exact responses; editing;
half-precision models; the cheap weight fingerprint."""

import json

import pytest
import torch

from hf_fwdattr import (
    ArtifactScorer,
    AttributionConfig,
    AttributionConfigError,
    AttributionSubspace,
    CausalLMTask,
    CompressionConfig,
    DocumentSet,
    FingerprintMismatchError,
    InfluenceArtifact,
    build_influence_artifact,
    model_fingerprint,
    query_gradients,
)
from hf_fwdattr.estimator.subspace import SAMPLED_VALUES, fingerprint_parameters
from hf_fwdattr.integrations.compressed_build import WORK_NAME, plan_documents
from hf_fwdattr.query.compress import gram_basis
from hf_fwdattr.storage.shards import InMemoryResponses
from hf_fwdattr.stats import spearman_rows

from conftest import lm_examples, lm_queries, make_lm

SOURCES = ["wiki", "news", "blog"]
COMPRESSION = dict(storage="compressed", sample_documents=16, validation_documents=8, heldout_documents=12, max_rank=12, queries=4,
                   shard_documents=10, chunk_size=4 * 5 * 1024)  # 5 rows of p <= 1,024 at a time: several chunks and shards
CONFIG = AttributionConfig(damping=1e-2, horizon=50, batch_size=8, eigenbasis="explicit")


def _documents(n: int, seed: int = 0) -> tuple[DocumentSet, list[dict]]:
    examples = lm_examples(n, seed=seed)
    return DocumentSet.from_examples(examples, [f"doc-{i}" for i in range(n)], [SOURCES[i % 3] for i in range(n)]), examples


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(model, documents, examples, compressed artifact, exact artifact) of one tiny Llama with a LoRA adapter (p = 512)."""
    model, _ = make_lm("llama", "peft")
    documents, examples = _documents(40)
    task = CausalLMTask(pad_token_id=0)
    folder = tmp_path_factory.mktemp("compressed")
    compressed = build_influence_artifact(model, task, documents, examples, folder / "compressed", CONFIG, progress=False, compression=COMPRESSION)
    exact = build_influence_artifact(model, task, documents, examples, folder / "exact", CONFIG, progress=False, compression="exact")
    return model, documents, examples, compressed, exact


def test_streaming_compression_equals_projecting_the_exact_responses(built, lm_task):
    model, documents, examples, compressed, exact = built
    assert compressed.compressed and not exact.compressed
    store = compressed.store
    directions = store.directions.double()
    assert 1 <= store.rank <= COMPRESSION["max_rank"] and store.dim == exact.dim
    assert store.directions.dtype == torch.float16  # the basis is stored in float16 (basis_dtype), the coefficients in float32
    torch.testing.assert_close(directions @ directions.T, torch.eye(store.rank, dtype=torch.float64), atol=1e-3, rtol=0)
    responses = exact.responses().double()
    coefficients = store.coefficients.to_tensor().double()
    scale = responses.abs().max()
    torch.testing.assert_close(coefficients, responses @ directions.T, atol=1e-5 * scale, rtol=0)
    torch.testing.assert_close(compressed.responses().double(), (responses @ directions.T) @ directions, atol=1e-5 * scale, rtol=0)
    # the sample fixes V: V spans the sample's exact responses (its top right singular vectors)
    sample = plan_documents(len(documents), CompressionConfig(**COMPRESSION), CONFIG.seed)["sample"]
    _, singular_values, vh = torch.linalg.svd(responses[sample], full_matrices=False)
    top = vh[: store.rank]
    torch.testing.assert_close((directions @ top.T).abs().sum(0), torch.ones(store.rank, dtype=torch.float64), atol=1e-3, rtol=0)
    torch.testing.assert_close(store.singular_values, singular_values[: store.rank], rtol=1e-4, atol=0)
    # readout through the basis: k directions, then the coefficients; equals the exact scores of the projected responses
    queries = lm_queries(examples[:3])
    scores = ArtifactScorer(compressed, model, lm_task).document_scores(queries).double()
    subspace = AttributionSubspace.build(model)
    gradients = query_gradients(subspace, lm_task, queries, dtype=torch.float64)
    expected = (gradients @ directions.T) @ coefficients.T
    torch.testing.assert_close(scores, expected, atol=1e-4 * expected.abs().max(), rtol=0)
    per_token = ArtifactScorer(compressed, model, lm_task).document_token_scores(queries)  # the pipeline's per_token path
    torch.testing.assert_close(per_token.total.double(), expected, atol=1e-4 * expected.abs().max(), rtol=0)
    torch.testing.assert_close(per_token.tokens.sum(dim=1).double(), expected, atol=1e-4 * expected.abs().max(), rtol=0)
    # source sums: the projection of each source's summed exact response
    for position, name in enumerate(compressed.source_names):
        rows = [i for i, s in enumerate(documents.sources) if s == name]
        projected = (responses[rows].sum(0) @ directions.T) @ directions
        torch.testing.assert_close(compressed.source_responses[position].double(), projected, atol=1e-5 * projected.abs().max(), rtol=0)


def test_compressed_artifact_records_its_fidelity_and_round_trips(built, tmp_path):
    _, documents, _, compressed, _ = built
    folder = compressed.path
    assert not (folder / WORK_NAME).exists(), "the work folder (the sample's exact responses) is removed after the save"
    meta = json.loads((folder / "attribution_config.json").read_text())
    assert meta["compression"]["storage"] == "compressed" and meta["compression"]["max_rank"] == COMPRESSION["max_rank"]
    fidelity = meta["fidelity"]
    assert fidelity["compression_rank"] == compressed.store.rank and fidelity["compression_heldout_documents"] == COMPRESSION["heldout_documents"]
    assert -1 <= fidelity["compression_heldout_spearman"] <= 1 and fidelity["compression_sample_documents"] == COMPRESSION["sample_documents"]
    stored = sum(p.stat().st_size for p in folder.glob("responses-*.safetensors"))
    assert stored < len(documents) * (compressed.store.rank + 1) * 4 + 4096, "the shards hold N × k coefficients, not N × p responses"
    loaded = InfluenceArtifact.from_pretrained(folder)
    assert loaded.compressed and loaded.compression == compressed.compression and loaded.settings() == compressed.settings()
    torch.testing.assert_close(loaded.store.coefficients.to_tensor(), compressed.store.coefficients.to_tensor(), rtol=0, atol=0)
    torch.testing.assert_close(loaded.source_responses, compressed.source_responses, rtol=0, atol=0)
    copy = loaded.save_pretrained(tmp_path / "copy")
    assert InfluenceArtifact.from_pretrained(copy).responses().equal(loaded.responses())


def _flip_last_byte(path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damaged", ["coefficients", "basis"])
def test_a_damaged_coefficient_shard_or_response_basis_is_detected_like_a_damaged_response_shard(built, tmp_path, damaged):
    import shutil

    from hf_fwdattr.errors import ArtifactIntegrityError
    from hf_fwdattr.storage.coefficients import BASIS_FILE

    folder = tmp_path / "copy"
    shutil.copytree(built[3].path, folder)
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) == [], "no work folder or staging left in the artifact"
    meta = json.loads((folder / "attribution_config.json").read_text())
    assert BASIS_FILE in meta["files"], "the response basis is recorded (size and SHA-256) in the sealed config"
    if damaged == "basis":  # read whole at load: its digest is checked then
        _flip_last_byte(folder / BASIS_FILE)
        with pytest.raises(ArtifactIntegrityError, match=BASIS_FILE):
            InfluenceArtifact.from_pretrained(folder)
    else:  # shards are hashed by verify(), as for exact responses
        _flip_last_byte(sorted(folder.glob("responses-*.safetensors"))[0])
        InfluenceArtifact.from_pretrained(folder)
        with pytest.raises(ArtifactIntegrityError, match="responses-00001"):
            InfluenceArtifact.from_pretrained(folder, verify=True)


def test_a_second_build_reuses_the_finished_compressed_artifact(built, lm_task, caplog):
    model, documents, examples, compressed, _ = built
    with caplog.at_level("INFO"):
        again = build_influence_artifact(model, lm_task, documents, examples, compressed.path, CONFIG, progress=False, compression=COMPRESSION)
    assert "not simulating again" in caplog.text
    assert again.store.coefficients.to_tensor().equal(compressed.store.coefficients.to_tensor())


def test_add_and_remove_documents_on_a_compressed_artifact(built, lm_task, tmp_path):
    model, documents, examples, compressed, exact = built
    directions = compressed.store.directions.float()
    removed = compressed.remove_documents(["doc-0", "doc-7"])
    keep = [i for i in range(len(documents)) if i not in (0, 7)]
    assert removed.compressed and removed.store.rank == compressed.store.rank
    torch.testing.assert_close(removed.store.coefficients.to_tensor(), compressed.store.coefficients.to_tensor()[keep], rtol=0, atol=0)
    new_documents, new_examples = _documents(3, seed=9)
    new_documents = DocumentSet.from_examples(new_examples, ["new-0", "new-1", "new-2"], ["news", "forum", "forum"])
    from hf_fwdattr import simulate_responses

    subspace = AttributionSubspace.build(model)
    new_responses = simulate_responses(subspace, lm_task, new_documents, examples, CONFIG, step_size=compressed.step_size).responses
    added = removed.add_documents(new_documents, new_responses)
    assert added.compressed and added.num_documents == len(keep) + 3 and added.source_names == ["news", "blog", "wiki", "forum"]
    torch.testing.assert_close(added.store.coefficients.to_tensor()[-3:], new_responses @ directions.T, rtol=1e-5, atol=1e-5)
    # source sums stay those of the projected responses of the documents it holds
    projected = added.responses().double()
    for position, name in enumerate(added.source_names):
        rows = [i for i, s in enumerate(added.documents.sources) if s == name]
        torch.testing.assert_close(added.source_responses[position].double(), projected[rows].sum(0), atol=1e-4, rtol=1e-5)
    assert "compression_heldout_spearman" in added.fidelity
    saved = added.save_pretrained(tmp_path / "edited")
    loaded = InfluenceArtifact.from_pretrained(saved)
    assert loaded.compressed and loaded.documents.document_ids[-3:] == ["new-0", "new-1", "new-2"]
    scores = ArtifactScorer(loaded, model, lm_task).document_scores(lm_queries(examples[:2]))
    reference = ArtifactScorer(added, model, lm_task, use_basis=False).document_scores(lm_queries(examples[:2]))
    torch.testing.assert_close(scores, reference, atol=1e-4 * reference.abs().max(), rtol=0)
    with pytest.raises(Exception, match=r"shape \[1, "):
        loaded.add_documents(DocumentSet.from_examples(new_examples[:1], ["x"]), new_responses[:1, :5])


def test_gram_basis_is_the_top_of_the_svd():
    generator = torch.Generator().manual_seed(0)
    rows = torch.randn(30, 6, generator=generator) @ torch.randn(6, 200, generator=generator) + 1e-3 * torch.randn(30, 200, generator=generator)
    directions, singular_values = gram_basis(InMemoryResponses(rows), max_rank=4, block_rows=7)
    _, expected_values, vh = torch.linalg.svd(rows.double(), full_matrices=False)
    torch.testing.assert_close(singular_values, expected_values[:4], rtol=1e-5, atol=0)
    torch.testing.assert_close((directions.double() @ vh[:4].T).abs(), torch.eye(4, dtype=torch.float64), atol=1e-4, rtol=0)
    directions, _ = gram_basis(InMemoryResponses(rows[:, :1].repeat(1, 3)), max_rank=4, block_rows=7)
    assert directions.shape == (1, 3), "directions beyond the rank of the rows are dropped"

    class BySlabs(InMemoryResponses):  # read in column slabs, as the first pass's shards are
        def columns(self, lo, hi):
            return self.tensor[:, lo:hi]

    by_slabs, values = gram_basis(BySlabs(rows), max_rank=4, block_rows=7)
    torch.testing.assert_close(values, expected_values[:4], rtol=1e-5, atol=0)
    torch.testing.assert_close((by_slabs.double() @ vh[:4].T).abs(), torch.eye(4, dtype=torch.float64), atol=1e-4, rtol=0)


def test_automatic_storage_follows_the_size_and_is_recorded(caplog):
    config = CompressionConfig(max_exact_size="1MB")
    assert config.compress(1000, 250, torch.float32)[0] is False
    compress, reason = config.compress(1000, 251, torch.float32)
    assert compress and "1 MB" in reason and "1,000 × 251" in reason
    assert CompressionConfig(storage="exact").compress(10**6, 10**6, torch.float32)[0] is False
    assert CompressionConfig.from_dict(config.to_dict()) == config
    assert CompressionConfig.coerce("compressed").storage.value == "compressed"
    with pytest.raises(AttributionConfigError, match="`storage`"):
        CompressionConfig(storage="zip")
    with pytest.raises(AttributionConfigError, match="`max_rank`"):
        CompressionConfig(max_rank=0)
    with pytest.raises(AttributionConfigError, match="`max_exact_size`"):
        CompressionConfig(max_exact_size="lots")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_model_builds_and_reads_out(dtype, tmp_path, lm_task):
    """A half-precision model with its adapter in the same dtype: the explicit GGN's rounding used to stop the build."""
    from peft import LoraConfig, get_peft_model

    from hf_fwdattr.demo.toy import tiny_llama

    def model_in(model_dtype):
        base = tiny_llama(256, hidden_size=64).to(model_dtype)
        torch.manual_seed(0)
        return get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
                              autocast_adapter_dtype=False).eval()

    generator = torch.Generator().manual_seed(0)
    examples = [{"input_ids": torch.randint(3, 256, (16,), generator=generator).tolist()} for _ in range(32)]
    documents = DocumentSet.from_examples(examples)
    config = AttributionConfig(damping=1e-3, batch_size=16)  # closed form, explicit eigenbasis (p = 512)
    half = model_in(dtype)
    assert {p.dtype for p in half.parameters()} == {dtype}
    artifact = build_influence_artifact(half, lm_task, documents, examples, tmp_path / "half", config, progress=False)
    scores = ArtifactScorer(InfluenceArtifact.from_pretrained(tmp_path / "half"), half, lm_task).document_scores(examples[:4])
    assert artifact.responses().dtype == torch.float32 and torch.isfinite(scores).all()
    full = model_in(torch.float32)
    reference_artifact = build_influence_artifact(full, lm_task, documents, examples, tmp_path / "full", config, progress=False)
    reference = ArtifactScorer(reference_artifact, full, lm_task).document_scores(examples[:4])
    assert float(spearman_rows(scores.double(), reference.double()).mean()) > 0.8


def test_gradient_checkpointing_leaves_the_responses_unchanged(tmp_path, lm_task):
    model, _ = make_lm("llama", "peft")
    documents, examples = _documents(12)
    config = AttributionConfig(damping=1e-2, horizon=20, batch_size=6)
    plain = build_influence_artifact(model, lm_task, documents, examples, tmp_path / "plain", config, progress=False)
    model.base_model.model.activation_checkpointing_enable()
    model.train()  # as the Trainer leaves it; the simulation runs in eval mode whatever the flags
    checkpointed = build_influence_artifact(model, lm_task, documents, examples, tmp_path / "checkpointed", config, progress=False)
    torch.testing.assert_close(checkpointed.responses(), plain.responses(), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------- the cheap weight fingerprint


def _sampled_positions(model, name: str) -> torch.Tensor:
    """The positions `model_fingerprint` hashes in parameter `name` (seeded by its ordinal and shape)."""
    from hf_fwdattr.estimator.subspace import _stable_seed

    ordinal, param = next((i, p) for i, (n, p) in enumerate(model.named_parameters()) if n == name)
    generator = torch.Generator().manual_seed(_stable_seed(ordinal, f"{param.numel()}:{tuple(param.shape)}"))
    return torch.randint(param.numel(), (SAMPLED_VALUES,), generator=generator)


def test_cheap_fingerprint_detects_a_changed_adapter_value_and_a_sampled_base_weight():
    from hf_fwdattr.demo.toy import tiny_llama
    from peft import LoraConfig, get_peft_model

    def model():
        torch.manual_seed(0)
        base = tiny_llama(64, hidden_size=192)  # mlp weights of 192 × 384 > 65,536 values: sampled
        return get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)).eval()

    reference = model()
    fingerprint = model_fingerprint(reference)
    assert fingerprint.startswith("sampled-v1:") and model_fingerprint(model()) == fingerprint
    large = [n for n, p in reference.named_parameters() if p.numel() > 65_536 and "lora" not in n]
    assert large, "the test model must have tensors that are sampled, not hashed in full"

    changed_adapter = model()
    with torch.no_grad():
        next(p for n, p in changed_adapter.named_parameters() if "lora_A" in n).view(-1)[5] += 1e-3
    assert model_fingerprint(changed_adapter) != fingerprint

    name = large[0]
    sampled = model()
    with torch.no_grad():
        dict(sampled.named_parameters())[name].view(-1)[_sampled_positions(sampled, name)[0]] += 1e-3
    assert model_fingerprint(sampled) != fingerprint

    # documented limit: one changed value at a position that is not sampled goes unseen (the full hash sees it)
    unsampled = model()
    positions = set(_sampled_positions(unsampled, name).tolist())
    free = next(i for i in range(dict(unsampled.named_parameters())[name].numel()) if i not in positions)
    with torch.no_grad():
        dict(unsampled.named_parameters())[name].view(-1)[free] += 1e-3
    assert model_fingerprint(unsampled) == fingerprint
    assert fingerprint_parameters(list(unsampled.named_parameters())) != fingerprint_parameters(list(reference.named_parameters()))


def test_bind_refuses_a_changed_adapter_and_accepts_legacy_full_fingerprints(built):
    model, _, _, _, exact = built
    import copy

    other = copy.deepcopy(model)
    with torch.no_grad():
        next(p for n, p in other.named_parameters() if "lora_B" in n).view(-1)[3] += 1e-4
    with pytest.raises(FingerprintMismatchError, match="model weights"):
        exact.bind(other)
    legacy = copy.copy(exact)
    legacy.model_fingerprint = fingerprint_parameters(list(model.named_parameters()))  # what artifacts recorded before
    legacy.bind(model).remove()
    with pytest.raises(FingerprintMismatchError, match="model weights"):
        legacy.bind(other)


def test_subspace_computes_the_fingerprint_only_when_asked():
    model, kwargs = make_lm("llama", "projection")
    with AttributionSubspace.build(model, **kwargs) as subspace:
        assert subspace._model_fingerprint is None  # building (as the callback does before training) hashes nothing
        value = subspace.model_fingerprint
    assert value == model_fingerprint(model), "the projection adapter is not part of θ*"


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/clear_refs"), reason="needs Linux's peak-RSS reset")
def test_reading_a_column_slab_of_the_sample_holds_one_shard_at_a_time(tmp_path):
    """The basis step reads the first pass's responses in column slabs; each shard's rows are read whole (safetensors
    slices rows), and must be let go before the next shard is read: memory then follows one shard, not the sample.
    Before, the slab kept a view into every shard's mapping until all were read — the build's peak grew with the sample
    (8.7 GB at the realistic run's 3,584 sampled documents)."""
    from hf_fwdattr.integrations.compressed_build import _RowRange
    from hf_fwdattr.storage.shards import ShardedResponses, ShardWriter

    rows, dim, shard_rows = 256, 65_536, 8  # 64 MiB in 32 shards of 2 MiB
    writer = ShardWriter(tmp_path, {"test": 1}, rows, dim, torch.float32, shard_rows=shard_rows, create=True)
    generator = torch.Generator().manual_seed(0)
    for index, lo in enumerate(range(0, rows, shard_rows)):
        writer.write(index, torch.randn(shard_rows, dim, generator=generator))
    store = _RowRange(ShardedResponses.open(writer.finish().directory), 0, rows)

    def peak_mib() -> float:
        return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM")) / 1024

    expected = torch.cat([store.store.rows(range(lo, lo + shard_rows))[:, 100:612] for lo in range(0, rows, shard_rows)])
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # the peak mark restarts from the current RSS
    before = peak_mib()
    slab = store.columns(100, 612)  # 0.5 MiB of values
    grown = peak_mib() - before
    torch.testing.assert_close(slab, expected, rtol=0, atol=0)
    assert grown < 24, f"reading a 0.5 MiB column slab raised the peak RSS by {grown:.0f} MiB (the whole sample is 64 MiB)"
