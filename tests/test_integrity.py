"""Issue 16: no silent wrong attribution, whatever happens to the artifact, the inputs or the process.

Each numbered case of the issue is reproduced here (each test fails on the code before the fix), plus kill -9 at
several points of an overwrite, a flipped bit anywhere, and two writers into one folder.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset

from hf_fwdattr import (
    ArtifactError,
    ArtifactScorer,
    AttributionConfig,
    AttributionSubspace,
    CausalLMTask,
    ClassificationTask,
    DocumentSet,
    DocumentsError,
    DocumentTable,
    ForwardAttributionCallback,
    InfluenceArtifact,
    SimulationDivergedError,
    build_influence_artifact,
    simulate_responses,
)
from hf_fwdattr.errors import ArtifactBusyError, ArtifactChangedError, ArtifactIntegrityError, UnfinishedArtifactError
from hf_fwdattr.estimator.subspace import SubspaceSpec, fingerprint_parameters
from hf_fwdattr.integrations.data import documents_from_dataset
from hf_fwdattr.query.compress import build_readout_basis
from hf_fwdattr.storage.artifact import BASIS_NAME, SOURCES_NAME, shard_identity
from hf_fwdattr.storage.atomic import CONFIG_NAME, PROGRESS_NAME, backup_dir, staging_dir
from hf_fwdattr.storage.shards import INDEX_NAME, shard_name

from artifact_files import edit_config, flip_bit, reseal
from conftest import VOCAB, lm_examples, make_lm

WRITER = Path(__file__).resolve().parent / "scripts" / "artifact_writer.py"
DIM = 8


# ---------------------------------------------------------------------- artifacts without a model
def synthetic(ids, seed=0, sources=None, rows=None) -> InfluenceArtifact:
    """An artifact of random responses (one row per id, a row is a function of its id and `seed`)."""
    if rows is None:
        rows = torch.stack([torch.randn(DIM, generator=torch.Generator().manual_seed(seed * 1000 + int(i[1:]))) for i in ids])
    sources = sources or [f"s{int(i[1:]) % 2}" for i in ids]
    return InfluenceArtifact(
        config=AttributionConfig(horizon=3), subspace_spec=SubspaceSpec(kind="trainable", parameter_names=["w"]),
        documents=DocumentTable(list(ids), sources), responses=rows, model_fingerprint="m" * 64, subspace_fingerprint="s" * 64,
    )


IDS = [f"d{i}" for i in range(6)]
ONE_ROW = DIM * 4


def rows_by_id(artifact) -> dict:
    return {d: row.tolist() for d, row in zip(artifact.documents.document_ids, artifact.responses())}


def same_artifact(loaded, expected) -> bool:
    return loaded.documents == expected.documents and torch.equal(loaded.responses(), expected.responses()) \
        and loaded.source_names == expected.source_names and torch.equal(loaded.source_responses, expected.source_responses)


@pytest.fixture
def old_and_new(tmp_path):
    """X holds artifact A; `new` is B (the same documents in reverse order, each with its own row), saved elsewhere."""
    old, new = synthetic(IDS), synthetic(IDS[::-1])
    assert rows_by_id(old) == rows_by_id(new)  # the same responses per document: only the order differs
    target = tmp_path / "X"
    old.save_pretrained(target, max_shard_size=ONE_ROW)
    new.save_pretrained(tmp_path / "new", max_shard_size=2 * ONE_ROW)
    return target, synthetic(IDS), synthetic(IDS[::-1]), tmp_path / "new"  # in memory: compared with, never read from X


class Writers:
    """The writer server (tests/scripts/artifact_writer.py): every save runs in a forked process of its own."""

    def __init__(self):
        self.process = subprocess.Popen([sys.executable, str(WRITER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.count = 0
        self.lines: dict[str, list[list[str]]] = {}  # what writers said that no one asked for yet

    def send(self, line: str) -> None:
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()

    def expect(self, tag: str, kind: str | None = None) -> list[str]:
        """The next line about writer `tag` (the next of that `kind`, if given), split."""
        while True:
            waiting = self.lines.get(tag, [])
            found = next((i for i, words in enumerate(waiting) if kind in (None, words[0])), None)
            if found is not None:
                return waiting.pop(found)
            line = self.process.stdout.readline()
            assert line, "the writer server died"
            words = line.split()
            assert words[0] != "error", line
            self.lines.setdefault(words[1], []).append(words)

    def start(self, source: Path, target: Path, mode: str = "pause", shard_bytes: int = ONE_ROW) -> tuple[str, int]:
        self.count += 1
        tag = f"w{self.count}"
        self.send(f"save {tag} {source} {target} {shard_bytes} {mode}")
        # a free-running writer may speak before the server has said it started it
        return tag, int(self.expect(tag, "started")[2])

    def run(self, source: Path, target: Path, kill_at=None, mode: str = "pause", shard_bytes: int = ONE_ROW):
        """Run one save; SIGKILL its process at the first step for which `kill_at(words)` is true (words: "step", tag,
        operation, from, to). Returns (steps seen, exit status)."""
        tag, pid = self.start(source, target, mode, shard_bytes)
        steps = []
        while True:
            words = self.expect(tag)
            steps.append(words)
            if words[0] == "step" and mode == "pause":
                if kill_at is not None and kill_at(words):
                    os.kill(pid, 9)  # kill -9: no clean-up of any kind runs
                    break
                self.send(f"go {tag}")
            elif words[0] != "step":
                assert words[0] in ("done", "busy"), words
                break
        self.send(f"reap {tag}")
        return steps, int(self.expect(tag, "exit")[2])

    def close(self) -> None:
        self.send("quit")
        self.process.wait(timeout=60)
        self.process.stdin.close()
        self.process.stdout.close()


@pytest.fixture(scope="module")
def writers():
    server = Writers()
    yield server
    server.close()


# ---------------------------------------------------------------------- case 1: an overwrite killed at any point
KILL_POINTS = {  # words of a step: "step", tag, operation, from, to
    "after the first shard": lambda s: s[2] == "replace" and s[3].startswith(shard_name(1, 6)),
    "before the index": lambda s: s[2] == "replace" and s[3].startswith(INDEX_NAME),
    "before the config (staging all but done)": lambda s: s[2] == "replace" and s[3].startswith(CONFIG_NAME),
    "before the old folder moves aside": lambda s: s[2] == "rename" and s[3] == "X",
    "between the two renames": lambda s: s[2] == "rename" and s[4] == "X",
    "before the backup is removed": lambda s: s[2] == "rmtree" and s[3] == backup_dir("X").name,
}


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_kill_9_during_an_overwrite_leaves_the_old_or_the_new_artifact(old_and_new, writers, point):
    target, old, new, source = old_and_new
    steps, code = writers.run(source, target, KILL_POINTS[point])
    assert code == -9 and steps[-1][0] == "step", (point, steps)
    loaded = InfluenceArtifact.from_pretrained(target)  # recovers an interrupted swap if need be
    assert same_artifact(loaded, old) or same_artifact(loaded, new), point
    loaded.verify()
    # whatever it was killed at, the next save finishes the job
    InfluenceArtifact.from_pretrained(source).save_pretrained(target, max_shard_size=ONE_ROW)
    assert same_artifact(InfluenceArtifact.from_pretrained(target), new)
    assert not staging_dir(target).exists() and not backup_dir(target).exists()


def test_a_progress_file_means_unfinished(old_and_new):
    target, old, _, _ = old_and_new
    (target / PROGRESS_NAME).write_text("{}")  # what an interrupted save into the folder itself (before this fix) left
    with pytest.raises(UnfinishedArtifactError, match="unfinished"):
        InfluenceArtifact.from_pretrained(target)


def test_a_missing_folder_with_a_backup_says_so_or_recovers(old_and_new):
    target, old, _, _ = old_and_new
    os.rename(target, backup_dir(target))  # killed right after moving the old artifact aside, staging unfinished
    staging_dir(target).mkdir()
    (staging_dir(target) / PROGRESS_NAME).write_text("{}")
    assert same_artifact(InfluenceArtifact.from_pretrained(target), old)


# ---------------------------------------------------------------------- two writers
def test_two_writers_into_one_folder_never_mix(tmp_path, writers):
    a, b = synthetic(IDS, seed=1), synthetic(IDS[::-1], seed=2)
    a.save_pretrained(tmp_path / "a")
    b.save_pretrained(tmp_path / "b")
    target = tmp_path / "X"
    # writer 1 stops after its first shard; writer 2 arrives meanwhile and is refused, not interleaved
    first, pid = writers.start(tmp_path / "a", target)
    while True:
        words = writers.expect(first)
        assert words[0] == "step", words
        if words[2] == "replace" and words[3].startswith(shard_name(1, 6)):
            break
        writers.send(f"go {first}")
    steps, code = writers.run(tmp_path / "b", target, mode="run")
    assert code == 3 and steps[-1][0] == "busy"
    with pytest.raises(ArtifactBusyError, match="is saving to"):
        b.save_pretrained(target)
    while True:  # writer 1 goes on to the end
        writers.send(f"go {first}")
        if writers.expect(first)[0] == "done":
            break
    writers.send(f"reap {first}")
    assert writers.expect(first, "exit")[2] == "0"
    assert same_artifact(InfluenceArtifact.from_pretrained(target), a)
    # free-running writers: whichever wins, the folder holds one whole artifact
    racers = [writers.start(tmp_path / name, target, mode="run")[0] for name in ("b", "a")]
    outcomes = []
    for tag in racers:
        while (words := writers.expect(tag))[0] == "step":
            pass
        outcomes.append(words[0])
    for tag in racers:
        writers.send(f"reap {tag}")
        writers.expect(tag, "exit")
    assert set(outcomes) <= {"done", "busy"} and "done" in outcomes
    loaded = InfluenceArtifact.from_pretrained(target)
    assert same_artifact(loaded, a) or same_artifact(loaded, b)
    loaded.verify()


# ---------------------------------------------------------------------- case 2: changed bytes, index entries, rows
def test_a_flipped_bit_anywhere_in_a_shard_is_caught(tmp_path):
    artifact = synthetic(IDS)
    artifact.save_pretrained(tmp_path / "clean", max_shard_size=2 * ONE_ROW)
    shard = tmp_path / "clean" / shard_name(1, 3)
    size = shard.stat().st_size
    header_end = 8 + int.from_bytes(shard.read_bytes()[:8], "little")
    caught_at_load = 0
    for position in range(size):
        flip_bit(shard, position, position % 8)
        try:
            try:
                loaded = InfluenceArtifact.from_pretrained(tmp_path / "clean")
            except ArtifactError:
                caught_at_load += 1
                continue
            assert position >= header_end, f"a flipped header byte {position} loaded"
            with pytest.raises(ArtifactIntegrityError, match=shard.name):
                loaded.verify()
            loaded.close()
        finally:
            flip_bit(shard, position, position % 8)
    assert caught_at_load == header_end  # the header at load, the data by verify()
    InfluenceArtifact.from_pretrained(tmp_path / "clean").verify()


@pytest.mark.parametrize("name", [CONFIG_NAME, "documents.jsonl", INDEX_NAME, SOURCES_NAME])
def test_a_flipped_bit_in_the_config_table_index_or_sums_is_refused_at_load(tmp_path, name):
    artifact = synthetic(IDS)
    artifact.save_pretrained(tmp_path, max_shard_size=2 * ONE_ROW)
    path = tmp_path / name
    for position in range(0, path.stat().st_size, 1 if name in ("documents.jsonl", SOURCES_NAME) else 5):
        flip_bit(path, position, position % 8)
        with pytest.raises(ArtifactError):
            InfluenceArtifact.from_pretrained(tmp_path)
        flip_bit(path, position, position % 8)
    assert same_artifact(InfluenceArtifact.from_pretrained(tmp_path), artifact)


def _edit_index(directory, edit):
    index = json.loads((directory / INDEX_NAME).read_text())
    edit(index["shards"])
    (directory / INDEX_NAME).write_text(json.dumps(index))


@pytest.mark.parametrize("edit, message", [
    (lambda shards: shards.__setitem__(slice(0, 2), [shards[1], shards[0]]), "position"),
    (lambda shards: shards.__setitem__(1, dict(shards[0])), "position|twice"),
    (lambda shards: shards[0].update(filename="../other/" + shards[0]["filename"]), "plain names"),
    (lambda shards: shards[0].update(filename="/tmp/" + shards[0]["filename"]), "plain names"),
])
def test_swapped_duplicated_or_outside_index_entries_are_refused(tmp_path, edit, message):
    synthetic(IDS).save_pretrained(tmp_path, max_shard_size=2 * ONE_ROW)
    _edit_index(tmp_path, edit)
    with pytest.raises(ArtifactIntegrityError, match="records"):  # the config's digest of the index
        InfluenceArtifact.from_pretrained(tmp_path)
    reseal(tmp_path)  # even with digests rewritten to match, the entries themselves are refused
    with pytest.raises(ArtifactIntegrityError, match=message):
        InfluenceArtifact.from_pretrained(tmp_path)


def test_swapped_rows_of_the_table_or_reordered_sources_are_refused(tmp_path):
    synthetic(IDS).save_pretrained(tmp_path)
    table = tmp_path / "documents.jsonl"
    lines = table.read_text().splitlines()
    lines[0], lines[1] = lines[1], lines[0]
    original = table.read_text()
    table.write_text("\n".join(lines) + "\n")
    with pytest.raises(ArtifactIntegrityError, match="documents.jsonl"):
        InfluenceArtifact.from_pretrained(tmp_path)
    table.write_text(original)
    meta = json.loads((tmp_path / CONFIG_NAME).read_text())
    meta["sources"] = meta["sources"][::-1]
    (tmp_path / CONFIG_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    with pytest.raises(ArtifactIntegrityError, match=CONFIG_NAME):
        InfluenceArtifact.from_pretrained(tmp_path)


# ---------------------------------------------------------------------- case 3: stale compressed basis
def _with_basis(artifact):
    gradients = torch.randn(4, DIM, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    basis, figures = build_readout_basis(artifact.store, gradients, max_rank=2, fidelity=0.5)
    artifact.set_readout_basis(basis, figures)
    return artifact


def test_a_basis_of_other_responses_is_never_used(tmp_path):
    with_basis = _with_basis(synthetic(IDS))
    with_basis.save_pretrained(tmp_path / "X")
    smaller = synthetic(IDS[:4], seed=3)  # same settings, no basis, saved over X
    smaller.save_pretrained(tmp_path / "X")
    loaded = InfluenceArtifact.from_pretrained(tmp_path / "X")
    assert loaded.readout_basis is None and not (tmp_path / "X" / BASIS_NAME).exists()
    # a basis of the same shape but other responses, slipped in with digests rewritten: refused by its provenance
    other = _with_basis(synthetic(IDS[:4], seed=4))
    other.save_pretrained(tmp_path / "other")
    (tmp_path / "X" / BASIS_NAME).write_bytes((tmp_path / "other" / BASIS_NAME).read_bytes())
    edit_config(tmp_path / "X", lambda meta: meta["files"].update({BASIS_NAME: {"size": 0, "sha256": "0" * 64}}))
    reseal(tmp_path / "X")
    with pytest.raises(ArtifactIntegrityError, match="built from other responses"):
        InfluenceArtifact.from_pretrained(tmp_path / "X")
    reloaded = InfluenceArtifact.from_pretrained(tmp_path / "other")
    torch.testing.assert_close(reloaded.readout_basis["coefficients"], other.readout_basis["coefficients"], rtol=0, atol=0)


# ---------------------------------------------------------------------- case 4: a loaded artifact goes stale
def test_a_loaded_artifact_keeps_reading_what_it_loaded(old_and_new):
    target, old, _, _ = old_and_new
    loaded = InfluenceArtifact.from_pretrained(target)
    before = rows_by_id(loaded)
    # another process saves an edited artifact in place: remove a document, add another (same shapes)
    edited = InfluenceArtifact.from_pretrained(target).remove_documents(["d0"]).add_documents(DocumentTable(["d9"], ["s1"]), torch.ones(1, DIM))
    edited.save_pretrained(target, max_shard_size=ONE_ROW)
    assert rows_by_id(loaded) == before and loaded.documents.document_ids == IDS
    assert torch.cat(list(loaded.iter_responses(chunk_rows=4))).equal(old.responses())
    assert InfluenceArtifact.from_pretrained(target).documents.document_ids == IDS[1:] + ["d9"]


def test_a_shard_modified_in_place_under_a_loaded_artifact_is_refused(old_and_new):
    target, _, _, _ = old_and_new
    shard = target / shard_name(2, 6)
    os.utime(shard, ns=(10**18, 10**18))  # a file written long before the change below
    loaded = InfluenceArtifact.from_pretrained(target)
    with open(shard, "r+b") as handle:  # in place: same file, other bytes
        handle.seek(-4, os.SEEK_END)
        handle.write(b"\x00\x00\x80\x7f")
    with pytest.raises(ArtifactChangedError, match=shard.name):
        loaded.responses()


# ---------------------------------------------------------------------- builds (a tiny classifier: the model does not matter here)
def classifier_examples(n: int, seed: int) -> list:
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(n, 4, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 3, (n,), generator=generator)
    return [(inputs[i], labels[i]) for i in range(n)]


@pytest.fixture(scope="module")
def build_setup(tmp_path_factory):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3).double().eval()
    train = classifier_examples(10, seed=7)
    documents = DocumentSet(examples=train[:6], example_document=list(range(6)), document_ids=IDS, sources=["a", "b"] * 3)
    config = AttributionConfig(solver="linearized", horizon=3, batch_size=5, damping=1e-2)
    return model, ClassificationTask(), documents, train, config, tmp_path_factory.mktemp("builds")


def _build(setup, documents, out, **kwargs):
    model, task, _, train, config, _ = setup
    return build_influence_artifact(model, task, documents, train, out, config, subspace="trainable", shard_rows=2, progress=False, **kwargs)


def _reversed(documents):
    order = list(range(len(documents)))[::-1]
    return DocumentSet([documents.examples[i] for i in order], list(range(len(order))), [documents.document_ids[i] for i in order],
                       [documents.sources[i] for i in order])


def test_an_interrupted_rebuild_keeps_the_old_artifact_then_resumes(build_setup, monkeypatch):
    _, _, documents, _, _, root = build_setup
    folder = root / "interrupted"
    old = _build(build_setup, documents, folder)
    reference = rows_by_id(old)
    import hf_fwdattr.integrations.build as build

    calls = {"n": 0}
    real = build.simulate_responses

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # the run dies after its first shard
        return real(*args, **kwargs)

    monkeypatch.setattr(build, "simulate_responses", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _build(build_setup, _reversed(documents), folder)
    monkeypatch.setattr(build, "simulate_responses", real)
    still = InfluenceArtifact.from_pretrained(folder)
    assert still.documents.document_ids == IDS and rows_by_id(still) == reference
    resumed = _build(build_setup, _reversed(documents), folder)
    assert resumed.documents.document_ids == IDS[::-1]
    straight = _build(build_setup, _reversed(documents), root / "straight")
    assert rows_by_id(InfluenceArtifact.from_pretrained(folder)) == rows_by_id(straight)


def test_a_running_scorer_is_not_fooled_by_a_save_in_place(build_setup):
    model, task, documents, train, _, root = build_setup
    folder = root / "serving"
    _build(build_setup, documents, folder)
    loaded = InfluenceArtifact.from_pretrained(folder)
    scorer = ArtifactScorer(loaded, model, task)
    queries = train[6:]
    before = scorer.document_scores(queries)
    edited = InfluenceArtifact.from_pretrained(folder).remove_documents(["d1"])
    edited = edited.add_documents(DocumentTable(["d1-new"], ["a"]), edited.responses([0]))
    edited.save_pretrained(folder)
    torch.testing.assert_close(scorer.document_scores(queries), before, rtol=0, atol=0)
    assert loaded.documents.document_ids == IDS


# ---------------------------------------------------------------------- case 5: resume identity
def test_resume_identity_covers_tokens_without_separator_collisions():
    settings = {"estimator": {}}
    assert shard_identity(settings, ["a\nb", "c"], ["x", "x"]) != shard_identity(settings, ["a", "b\nc"], ["x", "x"])
    assert shard_identity(settings, ["a"], ["t1"]) != shard_identity(settings, ["a"], ["t2"])


def test_edited_documents_are_simulated_again(build_setup):
    _, _, documents, _, _, root = build_setup
    folder = root / "edited"
    first = rows_by_id(_build(build_setup, documents, folder))
    examples = list(documents.examples)
    examples[2] = (examples[2][0].flip(0), examples[2][1])  # same id, other contents
    edited = DocumentSet(examples, list(documents.example_document), documents.document_ids, documents.sources)
    again = rows_by_id(_build(build_setup, edited, folder))
    fresh = rows_by_id(_build(build_setup, edited, root / "edited-fresh"))
    assert again == fresh and again["d2"] != first["d2"]


# ---------------------------------------------------------------------- case 6: NaN
@pytest.mark.parametrize("solver", ["closed_form", "linearized", "two_trajectory", "single_trajectory", "unlearning"])
def test_a_document_with_a_nan_loss_is_refused_by_every_solver(solver, build_setup):
    model, task, _, train, _, _ = build_setup
    poisoned = (torch.tensor([0.5, float("nan"), 1.0, 2.0], dtype=torch.float64), torch.tensor(1))
    documents = DocumentSet.from_examples([poisoned] + train[:3], ["nan-doc", "ok-1", "ok-2", "ok-3"])
    config = AttributionConfig(solver=solver, horizon=2, batch_size=10, damping=0.1)
    with AttributionSubspace.build(model, "trainable") as subspace:
        with pytest.raises(SimulationDivergedError, match="nan-doc"):
            simulate_responses(subspace, task, documents, train, config)


def test_add_documents_refuses_nan_rows():
    artifact = synthetic(IDS)
    rows = torch.zeros(2, DIM)
    rows[1, 3] = float("nan")
    with pytest.raises(ArtifactError, match="'d8'"):
        artifact.add_documents(DocumentTable(["d7", "d8"]), rows)


# ---------------------------------------------------------------------- case 7: padded documents
def test_padding_is_not_part_of_a_document():
    padded = Dataset.from_list([
        {"document_id": "a", "input_ids": [5, 6, 7, 0, 0], "attention_mask": [1, 1, 1, 0, 0]},
        {"document_id": "b", "input_ids": [0, 8, 9, 10, 11], "attention_mask": [0, 1, 1, 1, 1]},
    ])
    plain = Dataset.from_list([{"document_id": "a", "input_ids": [5, 6, 7]}, {"document_id": "b", "input_ids": [8, 9, 10, 11]}])
    got, want = documents_from_dataset(padded), documents_from_dataset(plain)
    assert got.documents.examples == want.documents.examples and got.n_tokens == [3, 4]


# ---------------------------------------------------------------------- case 8: projection on a PEFT model
def test_projection_on_a_peft_model_is_a_second_adapter_and_the_users_survives():
    model, _ = make_lm("llama", "peft")  # its own adapter is trained (non-zero B), so it changes the logits
    names = [n for n, _ in model.named_parameters()]
    weights = fingerprint_parameters(list(model.named_parameters()))
    ids = torch.tensor([[5, 6, 7, 8]])
    logits = model(input_ids=ids).logits
    with AttributionSubspace.build(model, "projection", rank=2) as subspace:
        assert subspace.dim > 0 and all(".lora_B.fwdattr_projection" in n for n in subspace.names)
        torch.testing.assert_close(model(input_ids=ids).logits, logits, rtol=0, atol=0)  # B = 0, the user's adapter still on
    assert [n for n, _ in model.named_parameters()] == names
    assert fingerprint_parameters(list(model.named_parameters())) == weights
    torch.testing.assert_close(model(input_ids=ids).logits, logits, rtol=0, atol=0)


# ---------------------------------------------------------------------- cases 9 and 10: the pipeline
@pytest.fixture(scope="module")
def fact_setup(fact_model):
    from transformers import AutoTokenizer

    directory = fact_model["directory"]
    return fact_model, AutoTokenizer.from_pretrained(directory / "model"), fact_model["model"], fact_model["artifact"]


def test_sampling_top_k_reaches_generation(fact_setup):
    from transformers import pipeline, set_seed

    fact_model, tokenizer, model, artifact = fact_setup
    plain = pipeline("text-generation", model=model, tokenizer=tokenizer)
    attributed = pipeline("attributed-text-generation", model=model, tokenizer=tokenizer, influence=artifact)
    for prompt in [q["prompt"] for q in fact_model["corpus"]["questions"][:3]]:
        for settings in ({"top_k": 1, "temperature": 5.0}, {"top_k": 3}):
            set_seed(4)
            expected = plain(prompt, max_new_tokens=6, do_sample=True, **settings)
            set_seed(4)
            with pytest.warns(FutureWarning, match="attribution_top_k"):
                got = attributed(prompt, max_new_tokens=6, do_sample=True, **settings)
            assert [r["generated_text"] for r in got] == [r["generated_text"] for r in expected]
            assert len(got[0]["attributions"]) == min(10, artifact.num_documents)
    (record,) = attributed(prompt, max_new_tokens=2, do_sample=False, attribution_top_k=2)
    assert len(record["attributions"]) == 2
    attributed.scorer.close()


def test_a_literal_bos_and_the_tokenizer_adding_one_attribute_alike(fact_setup):
    from tokenizers.processors import TemplateProcessing
    from transformers import pipeline

    from transformers import AutoTokenizer

    fact_model, _, model, artifact = fact_setup
    tokenizer = AutoTokenizer.from_pretrained(fact_model["directory"] / "model")
    bos = tokenizer.bos_token
    tokenizer._tokenizer.post_processor = TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, tokenizer.bos_token_id)])
    assert tokenizer("x")["input_ids"][0] == tokenizer.bos_token_id  # this tokenizer adds BOS, as Llama's do
    pipe = pipeline("attributed-text-generation", model=model, tokenizer=tokenizer, influence=artifact)
    question = fact_model["corpus"]["questions"][0]
    n = artifact.num_documents
    added = pipe(question["prompt"], response=question["answer"], attribution_top_k=n)[0]["attributions"]
    literal = pipe(bos + question["prompt"], response=question["answer"], attribution_top_k=n)[0]["attributions"]
    explicit = pipe(bos + question["prompt"], response=question["answer"], attribution_top_k=n, add_special_tokens=False)[0]["attributions"]
    assert added == literal == explicit
    generated = [pipe(p, max_new_tokens=3, do_sample=False, attribution_top_k=n)[0] for p in (question["prompt"], bos + question["prompt"])]
    assert generated[0]["attributions"] == generated[1]["attributions"]
    assert generated[1]["generated_text"] == bos + generated[0]["generated_text"]
    pipe.scorer.close()


def test_a_prompt_longer_than_the_context_is_refused(fact_setup):
    from transformers import pipeline

    from hf_fwdattr.integrations.pipeline import AttributionRequestError

    fact_model, tokenizer, model, artifact = fact_setup
    pipe = pipeline("attributed-text-generation", model=model, tokenizer=tokenizer, influence=artifact)
    long_prompt = " ".join(["The capital of Kaven is"] * model.config.max_position_embeddings)
    with pytest.raises(AttributionRequestError, match="context"):
        pipe(long_prompt, max_new_tokens=2, do_sample=False)
    with pytest.raises(AttributionRequestError, match="context"):
        pipe(long_prompt, response=" Kaur")
    pipe.scorer.close()


# ---------------------------------------------------------------------- what a careful operator hits
def test_metadata_that_is_not_json_is_refused_before_the_simulation(build_setup, monkeypatch):
    import hf_fwdattr.integrations.build as build

    _, _, documents, _, _, root = build_setup
    monkeypatch.setattr(build, "simulate_responses", lambda *a, **k: pytest.fail("the simulation ran"))
    metadata = [{"published": datetime.date(2024, 1, i + 1)} for i in range(len(documents))]
    with pytest.raises(DocumentsError, match="'d0'.*JSON"):
        _build(build_setup, documents, root / "metadata", metadata=metadata)
    with pytest.raises(DocumentsError, match="JSON"):
        DocumentTable(["a"], metadata=[{"score": float("nan")}])


def test_none_ids_and_a_bare_string_to_remove_are_refused():
    with pytest.raises(DocumentsError, match="None"):
        DocumentTable(["a", None])
    with pytest.raises(DocumentsError, match="None"):
        documents_from_dataset(Dataset.from_list([{"document_id": None, "input_ids": [1, 2, 3]}]))
    with pytest.raises(ArtifactError, match=r"\['d1'\]"):
        synthetic(IDS).remove_documents("d1")


def _trainer(model, dataset, callback, output_dir):
    from transformers import Trainer, TrainingArguments

    task = CausalLMTask(pad_token_id=0)
    args = TrainingArguments(output_dir=str(output_dir), num_train_epochs=1, per_device_train_batch_size=4, save_strategy="no",
                             report_to=[], use_cpu=True, disable_tqdm=True, remove_unused_columns=False, logging_steps=1000)
    return Trainer(model=model, args=args, train_dataset=dataset, callbacks=[callback],
                   data_collator=lambda rows: task.collate([{"input_ids": r["input_ids"], "labels": r.get("labels")} for r in rows]))


@pytest.mark.parametrize("row, message", [
    ({"input_ids": [5, 6, VOCAB + 3, 7]}, "outside the model's vocabulary"),
    ({"input_ids": [5, 6, 7, 8], "labels": [-100, 6, -7, 8]}, "labels"),
])
def test_bad_token_ids_and_labels_are_refused_before_training(tmp_path, row, message):
    model, _ = make_lm("llama", "peft")
    rows = [{"document_id": f"d{i}", "input_ids": [5 + i, 6, 7, 8], "labels": [-100, 6, 7, 8]} for i in range(4)]
    rows[2] = {"document_id": "bad", "labels": None, **row}
    dataset = Dataset.from_list(rows)
    trainer = _trainer(model, dataset, ForwardAttributionCallback(config=AttributionConfig(horizon=2)), tmp_path)
    with pytest.raises(DocumentsError, match=f"'bad'.*{message}|{message}.*'bad'"):
        trainer.train()
    assert trainer.state.global_step == 0


@pytest.mark.parametrize("edit, message", [
    (lambda meta: meta.update(estimator=[1, 2]), "estimator"),
    (lambda meta: meta.update(subspace="peft"), "subspace"),
    (lambda meta: meta.update(fingerprints=3), "fingerprints"),
    (lambda meta: meta["estimator"].update(solver=7), "solver"),
    (lambda meta: meta["estimator"].update(horizon="many"), "horizon"),
    (lambda meta: meta.update(sources="s0"), "sources"),
    (lambda meta: meta.update(num_documents=99), "num_documents"),
    (lambda meta: meta.update(format_version=3, library_version="9.9"), "format 3.*Upgrade"),
    (lambda meta: meta.update(format_version="2"), "format_version"),
])
def test_a_config_of_wrong_types_or_a_newer_format_is_refused_clearly(tmp_path, edit, message):
    synthetic(IDS).save_pretrained(tmp_path)
    edit_config(tmp_path, edit)
    with pytest.raises(ArtifactError, match=message):
        InfluenceArtifact.from_pretrained(tmp_path)


def test_saving_never_removes_what_is_not_an_artifact(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    with pytest.raises(ArtifactError, match="not part of an influence artifact"):
        synthetic(IDS).save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").read_bytes() == b"weights"


def test_a_bf16_model_builds_and_a_negative_ggn_eigenvalue_is_not_blamed_on_the_curvature(lm_task, build_setup):
    from peft import LoraConfig, get_peft_model

    from hf_fwdattr.demo.toy import tiny_llama
    from hf_fwdattr.estimator.eigenbasis import ExplicitEigenbasis

    model = get_peft_model(tiny_llama(VOCAB, hidden_size=16), LoraConfig(r=1, target_modules=["q_proj"], init_lora_weights=False))
    model = model.to(torch.bfloat16).eval()
    train = lm_examples(12, seed=3)
    with AttributionSubspace.build(model, "peft") as subspace:
        result = simulate_responses(subspace, lm_task, DocumentSet.from_examples(train[:4]), train, AttributionConfig(batch_size=6))
    assert torch.isfinite(result.responses).all() and result.responses.abs().sum() > 0
    # GGN products rounded in bfloat16 (or float64 rounding at damping 0) can leave an eigenvalue a little below 0:
    # the advice must not be "use curvature='ggn'", which is what is already set
    classifier, task, documents, examples, _, _ = build_setup
    with AttributionSubspace.build(classifier, "trainable") as subspace:
        rounded = ExplicitEigenbasis.from_matrix(torch.diag(torch.linspace(-1e-3, 1.0, subspace.dim, dtype=torch.float64)))
        for curvature, damping, advice in (("ggn", 0.0, "curvature='ggn', already set"), ("hessian", 1e-6, "or use curvature='ggn'")):
            config = AttributionConfig(curvature=curvature, damping=damping, step_size=0.5, horizon=5)
            with pytest.raises(SimulationDivergedError, match="Raise `damping` above") as info:
                simulate_responses(subspace, task, documents, examples, config, eigenbasis=rounded)
            assert advice in str(info.value)
            assert curvature == "hessian" or "or use curvature='ggn'" not in str(info.value)


def test_an_artifact_of_format_1_loads_with_a_warning_and_is_upgraded_by_saving(tmp_path, caplog):
    import logging

    from hf_fwdattr.storage.artifact import SEAL_KEY

    artifact = synthetic(IDS)
    artifact.save_pretrained(tmp_path / "old", max_shard_size=2 * ONE_ROW)
    index = json.loads((tmp_path / "old" / INDEX_NAME).read_text())  # what hf_fwdattr 0.1 wrote: no full digests
    index["metadata"].pop("rows_sha256")
    for shard in index["shards"]:
        shard.pop("sha256")
    (tmp_path / "old" / INDEX_NAME).write_text(json.dumps(index))
    meta = json.loads((tmp_path / "old" / CONFIG_NAME).read_text())
    for key in ("files", SEAL_KEY):
        meta.pop(key)
    meta["format_version"] = 1
    (tmp_path / "old" / CONFIG_NAME).write_text(json.dumps(meta))
    with caplog.at_level(logging.WARNING):
        legacy = InfluenceArtifact.from_pretrained(tmp_path / "old", verify=True)
    assert "format 1" in caplog.text and same_artifact(legacy, artifact)
    legacy.save_pretrained(tmp_path / "old")
    assert json.loads((tmp_path / "old" / CONFIG_NAME).read_text())["format_version"] == 2
    InfluenceArtifact.from_pretrained(tmp_path / "old", verify=True)


def test_the_resume_identity_tolerates_a_re_estimated_step_size_in_its_last_bits():
    """η is re-estimated (a power iteration) when a build resumes; another thread count may change its last bits, which
    must not throw the simulated shards away, while a different η must."""
    from hf_fwdattr.integrations.build import _identity_float

    assert _identity_float(0.123456789012) == _identity_float(0.123456789012 * (1 + 1e-12))
    assert _identity_float(0.123456789012) != _identity_float(0.123456789012 * (1 + 1e-4))
    assert _identity_float(None) is None
