"""The attributed-text-generation pipeline: forward passes only, right answers, same text as text-generation."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline, set_seed

import hf_fwdattr  # noqa: F401  (registers the task)
from hf_fwdattr import (
    ArtifactError,
    ArtifactScorer,
    AttributedTextGenerationPipeline,
    AttributionConfig,
    CausalLMTask,
    FingerprintMismatchError,
    InfluenceArtifact,
    build_influence_artifact,
)
from hf_fwdattr.integrations.data import documents_from_dataset, examples_from_dataset
from hf_fwdattr.integrations.pipeline import AttributionRequestError

from conftest import backward_forbidden


@pytest.fixture(scope="module")
def fact_pipe(fact_model):
    directory = fact_model["directory"]
    return pipeline("attributed-text-generation", model=str(directory / "model"), influence=str(directory / "influence"))


def _questions(fact_model):
    return fact_model["corpus"]["questions"]


def test_pipeline_loads_what_the_demo_leaves(fact_pipe):
    assert isinstance(fact_pipe, AttributedTextGenerationPipeline)
    assert any("lora_A" in n for n, _ in fact_pipe.model.named_parameters()), "the adapter saved next to the base is loaded"


def test_true_document_and_source_win_on_fact_questions(fact_pipe, fact_model):
    questions = _questions(fact_model)
    top_document = top_source = 0
    for question in questions:
        (record,) = fact_pipe(question["prompt"], response=question["answer"], attribution_top_k=3)
        assert [a["score"] for a in record["attributions"]] == sorted((a["score"] for a in record["attributions"]), reverse=True)
        top_document += record["attributions"][0]["document_id"] == question["document_id"]
        (by_source,) = fact_pipe(question["prompt"], response=question["answer"], attribution_top_k=2, aggregate="source")
        top_source += by_source["attributions"][0]["source"] == question["source"]
    assert top_document / len(questions) >= 0.8
    assert top_source / len(questions) >= 0.8


def test_generated_text_equals_plain_text_generation(fact_pipe, fact_model):
    directory = fact_model["directory"]
    plain = pipeline("text-generation", model=str(directory / "model"))
    prompts = [q["prompt"] for q in _questions(fact_model)[:3]]
    for settings in ({"do_sample": False}, {"do_sample": True, "temperature": 0.9, "top_p": 0.9}):
        for prompt in prompts:
            set_seed(3)
            expected = plain(prompt, max_new_tokens=6, **settings)
            set_seed(3)
            attributed = fact_pipe(prompt, max_new_tokens=6, **settings)
            assert [r["generated_text"] for r in attributed] == [r["generated_text"] for r in expected]
            assert attributed[0]["attributions"]


def test_scores_equal_the_library_readout_and_batches_agree(fact_pipe, fact_model):
    tokenizer = fact_pipe.tokenizer
    prompts = [q["prompt"] for q in _questions(fact_model)[:3]]
    one_by_one = [fact_pipe(p, max_new_tokens=4, do_sample=False, attribution_top_k=50)[0] for p in prompts]
    batched = fact_pipe(prompts, max_new_tokens=4, do_sample=False, attribution_top_k=50, batch_size=3)
    for single, group in zip(one_by_one, batched):
        assert group[0]["generated_text"] == single["generated_text"]
        a = {x["document_id"]: x["score"] for x in single["attributions"]}
        b = {x["document_id"]: x["score"] for x in group[0]["attributions"]}
        assert a.keys() == b.keys() and all(abs(a[k] - b[k]) <= 1e-3 * (1 + abs(a[k])) for k in a)
    # the same query through the library: the pipeline's f_q is log p(continuation | prompt)
    prompt = prompts[0]
    continuation = one_by_one[0]["generated_text"][len(prompt):]
    prompt_ids = tokenizer(prompt)["input_ids"]
    continuation_ids = tokenizer(prompt + continuation)["input_ids"][len(prompt_ids):]
    scorer = ArtifactScorer(fact_pipe.influence, fact_pipe.model, CausalLMTask(pad_token_id=tokenizer.pad_token_id))
    library = scorer.document_scores([CausalLMTask.query_example(prompt_ids, continuation_ids)])[0]
    ids = fact_pipe.influence.documents.document_ids
    for entry in one_by_one[0]["attributions"]:
        assert entry["score"] == pytest.approx(float(library[ids.index(entry["document_id"])]), rel=1e-4, abs=1e-5)


def test_per_token_attributions_cover_each_generated_token(fact_pipe, fact_model):
    question = _questions(fact_model)[0]
    (record,) = fact_pipe(question["prompt"], response=question["answer"], per_token=True, attribution_top_k=2)
    tokens = record["token_attributions"]
    answer_ids = fact_pipe.tokenizer(question["answer"], add_special_tokens=False)["input_ids"]
    assert [t["token_id"] for t in tokens] == answer_ids
    assert all(len(t["attributions"]) == 2 for t in tokens)
    # log-likelihoods add over tokens, so do the exact scores of any one document
    scorer = fact_pipe.scorer
    prompt_ids = fact_pipe.tokenizer(question["prompt"])["input_ids"]
    whole = scorer.document_scores([CausalLMTask.query_example(prompt_ids, answer_ids)])[0]
    single = scorer.document_scores([{"input_ids": prompt_ids + answer_ids[: i + 1], "labels": [-100] * (len(prompt_ids) + i) + [answer_ids[i]]}
                                     for i in range(len(answer_ids))])
    torch.testing.assert_close(single.sum(0), whole, rtol=1e-3, atol=1e-3)
    # every token's scores come from the one readout of the whole answer, and equal that token's own readout
    ids = fact_pipe.influence.documents.document_ids
    for position, token in enumerate(tokens):
        for entry in token["attributions"]:
            assert entry["score"] == pytest.approx(float(single[position, ids.index(entry["document_id"])]), rel=1e-4, abs=1e-4)
    (plain,) = fact_pipe(question["prompt"], response=question["answer"], attribution_top_k=2)
    assert [(a["document_id"], pytest.approx(a["score"], rel=1e-5)) for a in plain["attributions"]] == \
        [(a["document_id"], a["score"]) for a in record["attributions"]]


def test_one_sided_base_value_comes_from_generation_logits(fact_model):
    """The one-sided readout takes f_q(θ*) per token from generate's logits: equal to a forward's, and not left in the records."""
    directory = fact_model["directory"]
    pipe = pipeline("attributed-text-generation", model=str(directory / "model"), influence=str(directory / "influence"), readout="one_sided")
    seen = []
    original = pipe.scorer.readout.token_scores

    def spy(queries, responses, *args, **kwargs):
        seen.append((queries, kwargs.get("base_values")))
        return original(queries, responses, *args, **kwargs)

    pipe.scorer.readout.token_scores = spy
    prompts = [q["prompt"] for q in _questions(fact_model)[:2]]
    records = pipe(prompts, max_new_tokens=5, do_sample=False, attribution_top_k=2, batch_size=2)
    assert all("logits" not in r[0] for r in records) and len(seen) == 1
    queries, base = seen[0]
    task = pipe.attribution_task
    with torch.no_grad():
        expected = task.token_measurement(pipe.model, task.collate(queries))
    torch.testing.assert_close(base, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("readout", ["jvp", "central_difference", "one_sided"])
def test_pipeline_runs_without_any_backward_pass_on_a_peft_model(fact_model, readout):
    directory = fact_model["directory"]
    pipe = pipeline("attributed-text-generation", model=str(directory / "model"), influence=str(directory / "influence"), readout=readout)
    prompt = _questions(fact_model)[0]["prompt"]
    with backward_forbidden() as saved:
        records = pipe(prompt, max_new_tokens=4, do_sample=False, attribution_top_k=3)
        by_source = pipe(prompt, max_new_tokens=4, do_sample=False, attribution_top_k=2, aggregate="source", per_token=True)
    assert saved["count"] == 0
    assert len(records[0]["attributions"]) == 3 and by_source[0]["token_attributions"]


@pytest.fixture(scope="module")
def projection_setup(fact_model, tmp_path_factory):
    """A fully fine-tuned model (no adapter) with a projection-adapter artifact."""
    directory = fact_model["directory"]
    tokenizer = AutoTokenizer.from_pretrained(directory / "model")
    model = fact_model["model"].merge_and_unload() if hasattr(fact_model["model"], "merge_and_unload") else fact_model["model"]
    from datasets import Dataset

    rows = [{"document_id": d["document_id"], "source": d["source"], "input_ids": tokenizer(d["text"])["input_ids"]} for d in fact_model["corpus"]["documents"]]
    dataset = Dataset.from_list(rows)
    prepared = documents_from_dataset(dataset, source_column="source")
    out = tmp_path_factory.mktemp("projection") / "influence"
    artifact = build_influence_artifact(model, CausalLMTask(pad_token_id=tokenizer.pad_token_id), prepared.documents, examples_from_dataset(dataset), out,
                                        AttributionConfig(horizon=5, batch_size=8), subspace="projection", rank=4, target_modules=["q_proj", "v_proj"], progress=False)
    return model, tokenizer, artifact


@pytest.mark.parametrize("readout", ["jvp", "central_difference", "one_sided"])
def test_pipeline_runs_without_any_backward_pass_on_a_projection_model(projection_setup, fact_model, readout):
    model, tokenizer, artifact = projection_setup
    pipe = pipeline("attributed-text-generation", model=model, tokenizer=tokenizer, influence=artifact, readout=readout)
    try:
        with backward_forbidden() as saved:
            records = pipe(_questions(fact_model)[1]["prompt"], max_new_tokens=4, do_sample=False, attribution_top_k=3)
        assert saved["count"] == 0 and len(records[0]["attributions"]) == 3
    finally:
        pipe.scorer.close()


class _CountingGenerate:
    def __init__(self, model):
        self.model, self.calls, self.original = model, 0, model.generate

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.original(*args, **kwargs)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"attribution_top_k": 0}, AttributionRequestError, "attribution_top_k"),
        ({"attribution_top_k": -3}, AttributionRequestError, "attribution_top_k"),
        ({"aggregate": "publisher"}, AttributionRequestError, "aggregate"),
    ],
)
def test_bad_call_arguments_are_refused_before_generation(fact_pipe, fact_model, kwargs, error, message):
    counter = _CountingGenerate(fact_pipe.model)
    fact_pipe.model.generate = counter
    try:
        with pytest.raises(error, match=message):
            fact_pipe(_questions(fact_model)[0]["prompt"], max_new_tokens=4, **kwargs)
        with pytest.raises(AttributionRequestError, match="empty"):
            fact_pipe("   ", max_new_tokens=4)
    finally:
        del fact_pipe.model.generate
    assert counter.calls == 0


def test_artifact_of_another_model_is_refused(fact_model):
    directory = fact_model["directory"]
    other = AutoModelForCausalLM.from_pretrained(directory / "model")
    with torch.no_grad():
        next(p for n, p in other.named_parameters() if "lora_B" in n).mul_(1.5)
    tokenizer = AutoTokenizer.from_pretrained(directory / "model")
    with pytest.raises(FingerprintMismatchError, match="does not belong to this model"):
        pipeline("attributed-text-generation", model=other, tokenizer=tokenizer, influence=str(directory / "influence"))


def test_artifact_missing_shards_is_refused(fact_model, tmp_path):
    import shutil

    directory = fact_model["directory"]
    broken = tmp_path / "influence"
    shutil.copytree(directory / "influence", broken)
    next(broken.glob("responses-*.safetensors")).unlink()
    with pytest.raises(ArtifactError, match="missing"):
        pipeline("attributed-text-generation", model=str(directory / "model"), influence=str(broken))


def test_missing_influence_argument_is_refused(fact_model):
    with pytest.raises(AttributionRequestError, match="influence"):
        pipeline("attributed-text-generation", model=str(fact_model["directory"] / "model"))


def test_command_line_attribute(fact_model, capsys):
    from hf_fwdattr.cli import main

    directory = fact_model["directory"]
    question = _questions(fact_model)[0]
    main(["attribute", "--model", str(directory / "model"), "--influence", str(directory / "influence"), question["prompt"],
          "--response", question["answer"], "--top-k", "2"])
    out = capsys.readouterr().out
    assert question["prompt"] in out and question["document_id"] in out.splitlines()[1]
