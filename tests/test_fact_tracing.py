"""Fact tracing: the metrics on known answers, the peers against explicit computations, and `hf-fwdattr evaluate`."""

import hashlib
import json

import numpy as np
import pytest
import torch
from conftest import lm_examples, lm_queries, make_lm

from hf_fwdattr import AttributionSubspace, CausalLMTask
from hf_fwdattr.demo.toy import fact_corpus
from hf_fwdattr.estimator.config import Curvature
from hf_fwdattr.estimator.curvature import CurvatureOperator
from hf_fwdattr.estimator.documents import DocumentSet
from hf_fwdattr.estimator.eigenbasis import ExplicitEigenbasis
from hf_fwdattr.evaluation.baselines import BM25Scores, damped_influence_scores, damped_solve, gradient_dot_scores
from hf_fwdattr.evaluation.fact_data import FactTracingDataError, FactTracingSet, tokenized_documents
from hf_fwdattr.evaluation.fact_metrics import recall_at_k, reciprocal_ranks, source_scores_from_documents, summarize, true_document_ranks


# ---------------------------------------------------------------------- metrics on known answers
def test_ranks_recall_and_mrr_on_a_known_matrix():
    scores = np.array([[0.9, 0.1, 0.5], [0.2, 0.8, 0.3], [0.1, 0.2, 0.3]])
    true = [0, 2, 0]  # ranks 1, 2, 3
    first, last = true_document_ranks(scores, true)
    assert first.tolist() == [1, 2, 3] and last.tolist() == [1, 2, 3]
    assert recall_at_k(scores, true, 1).tolist() == [1.0, 0.0, 0.0]
    assert recall_at_k(scores, true, 2).tolist() == [1.0, 1.0, 0.0]
    np.testing.assert_allclose(reciprocal_ranks(scores, true), [1.0, 0.5, 1 / 3])


def test_ties_count_as_a_random_choice_not_a_win():
    constant = np.zeros((2, 4))
    assert recall_at_k(constant, [0, 3], 1).tolist() == [0.25, 0.25]
    assert recall_at_k(constant, [0, 3], 2).tolist() == [0.5, 0.5]
    np.testing.assert_allclose(reciprocal_ranks(constant, [0, 3]), np.mean(1 / np.arange(1, 5)))
    # the true document tied with one other for first place: rank 1 or 2, each with probability 1/2
    tied = np.array([[2.0, 2.0, 1.0]])
    assert recall_at_k(tied, [1], 1).tolist() == [0.5]
    np.testing.assert_allclose(reciprocal_ranks(tied, [1]), [0.75])


def test_source_scores_sum_documents_and_summary_groups():
    scores = np.array([[1.0, 2.0, -4.0], [0.0, 1.0, 3.0]])
    sums = source_scores_from_documents(scores, ["a", "b", "a"], ["a", "b"])
    np.testing.assert_allclose(sums, [[-3.0, 2.0], [3.0, 1.0]])
    np.testing.assert_allclose(source_scores_from_documents(scores, ["a", "b", "a"], ["a", "b"], "max"), [[1.0, 2.0], [3.0, 1.0]])
    groups = {"x": np.array([True, False]), "empty": np.array([False, False]), "all": np.array([True, True])}
    summary = summarize(scores, [1, 2], groups, sums, [1, 0])
    assert set(summary) == {"x", "all"}
    assert summary["x"] == {"recall@1": 1.0, "recall@10": 1.0, "mrr": 1.0, "source_accuracy": 1.0, "n_queries": 1}
    assert summary["all"]["recall@1"] == 1.0 and summary["all"]["source_accuracy"] == 1.0
    by_top = source_scores_from_documents(scores, ["a", "b", "a"], ["a", "b"], "max")
    assert summarize(scores, [1, 2], groups, sums, [1, 0], top_document_sources=by_top)["x"]["source_accuracy_top_document"] == 1.0


def test_bad_inputs_are_refused():
    from hf_fwdattr.evaluation.metrics import EvaluationError

    with pytest.raises(EvaluationError, match="true_index"):
        recall_at_k(np.zeros((2, 3)), [0, 3], 1)
    with pytest.raises(EvaluationError, match="NaN"):
        reciprocal_ranks(np.array([[np.nan, 1.0]]), [0])


# ---------------------------------------------------------------------- the corpus options
def test_fact_corpus_defaults_are_unchanged_and_options_only_add():
    default = fact_corpus()
    digest = hashlib.md5(json.dumps(default, sort_keys=True).encode()).hexdigest()
    assert digest == "ed069c84a8b04ef99c4cbf6b33c67bb3", "fact_corpus() must keep its output exactly (the demo and tests rely on it)"
    extended = fact_corpus(co_mention_distractors=5, pretraining_paraphrases=0.5)
    assert extended["questions"] == default["questions"]
    assert extended["documents"][: len(default["documents"])] == default["documents"]
    assert extended["pretraining"][: len(default["pretraining"])] == default["pretraining"]
    added = extended["documents"][len(default["documents"]):]
    assert [d["document_id"] for d in added] == [f"co-mention-{i:04d}" for i in range(5)]
    answers = {(q["entity"], q["answer"].strip()) for q in default["questions"]}
    for document in added:  # each names a fact's entity and answer, and states no fact
        assert any(e in document["text"] and v in document["text"] for e, v in answers) and not document["fact"]
    paraphrased = extended["pretraining"][len(default["pretraining"]):]
    assert len(paraphrased) == 12 * 4 and all(" It is " in t or "sold abroad" in t or "established" in t or "banner" in t for t in paraphrased)


# ---------------------------------------------------------------------- peers
def test_bm25_ranks_the_document_that_shares_rare_words():
    texts = ["The capital of Zorbia is Kelmir.", "Zorbia is a land of many legends.", "Vashtor is famous for exporting copper."]
    scores = BM25Scores(texts).scores(["The capital of Zorbia is Kelmir", "Which goods does Vashtor export? copper", "nothing shared here"])
    assert scores.shape == (3, 3)
    assert scores[0].argmax() == 0 and scores[1].argmax() == 2
    assert torch.all(scores[2] == 0)


@pytest.fixture(scope="module")
def small_lm():
    """A tiny LoRA Llama with a 384-dimensional subspace (the LoRA B matrices), its task and data."""
    model, _ = make_lm("llama", "peft")
    from hf_fwdattr.estimator.subspace import canonical_name

    names = [canonical_name(n) for n, _ in model.named_parameters() if "lora_B" in n]
    subspace = AttributionSubspace.build(model, "trainable", parameter_names=names)
    train = lm_examples(10, seed=1)
    documents = DocumentSet.from_examples(train)
    return model, subspace, CausalLMTask(pad_token_id=0), documents, train, lm_queries(lm_examples(4, seed=2))


def test_conjugate_gradients_and_eigensystem_match_an_explicit_solve(small_lm):
    _, subspace, task, _, train, queries = small_lm
    operator = CurvatureOperator(subspace, task, task.collate(train), Curvature.GGN, torch.float64)
    eigensystem = ExplicitEigenbasis.from_operator(operator)
    dim = subspace.dim
    matrix = operator.matvec(torch.eye(dim, dtype=torch.float64))
    right = torch.randn(3, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    damping = 0.1  # the float32 model bounds the products' precision (~1e-7): keep H + λI well conditioned
    expected = torch.linalg.solve(matrix + damping * torch.eye(dim, dtype=torch.float64), right.T).T
    solved = damped_solve(operator, right, damping, tolerance=1e-6, max_iterations=5000)
    assert solved.converged and solved.iterations < dim
    torch.testing.assert_close(solved.solutions, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(eigensystem.damped_inverse(right, damping), expected, rtol=1e-4, atol=1e-4)


def test_exact_influence_is_the_same_with_either_solver(small_lm):
    _, subspace, task, documents, train, queries = small_lm
    dense, report = damped_influence_scores(subspace, task, queries, documents, train, 0.1, solver="dense")
    cg, cg_report = damped_influence_scores(subspace, task, queries, documents, train, 0.1, solver="cg", tolerance=1e-6, max_iterations=5000)
    assert report.solver == "dense" and cg_report.solver == "cg" and cg_report.summary()["converged"]
    torch.testing.assert_close(cg, dense, rtol=1e-4, atol=1e-4)


def test_gradient_dot_product_has_the_proponent_sign(small_lm):
    """A small gradient step on document b changes f_q by ≈ step · score(b, q): positive = proponent."""
    model, subspace, task, documents, train, queries = small_lm
    scores = gradient_dot_scores(subspace, task, queries, documents)
    from hf_fwdattr.estimator.functional import TaskFunction
    from hf_fwdattr.estimator.gradients import document_gradients

    measure = TaskFunction(subspace, task.measurement)
    step = 1e-3
    with torch.no_grad():
        before = measure(torch.zeros(subspace.dim), task.collate(queries)).double()
        for b in (0, 3):
            g = document_gradients(subspace, task, documents, indices=[b])[0]
            after = measure(-step * g, task.collate(queries)).double()
            torch.testing.assert_close((after - before) / step, scores[:, b], rtol=2e-2, atol=1e-3)


# ---------------------------------------------------------------------- data and the command
def test_tables_are_checked(tmp_path):
    (tmp_path / "documents.jsonl").write_text('{"document_id": "a", "source": "s", "text": "x y"}\n')
    (tmp_path / "queries.jsonl").write_text('{"query": "q", "answer": " x", "document_id": "b"}\n')
    with pytest.raises(FactTracingDataError, match="not in the documents table"):
        FactTracingSet.from_files(tmp_path / "documents.jsonl", tmp_path / "queries.jsonl")
    with pytest.raises(FactTracingDataError, match="no column"):
        FactTracingSet.from_files(tmp_path / "documents.jsonl", tmp_path / "queries.jsonl", answer_column="response")


def test_documents_that_tokenise_differently_from_the_artifact_are_refused(fact_model):
    data = FactTracingSet.from_corpus(fact_model["corpus"])
    tokenized_documents(data, fact_model["tokenizer"], fact_model["artifact"])  # as trained: text + end of sequence
    with pytest.raises(FactTracingDataError, match="tokenise to another length"):
        tokenized_documents(data, fact_model["tokenizer"], fact_model["artifact"], append_eos=False)


def test_evaluate_command_on_own_files(fact_model, tmp_path, capsys):
    from hf_fwdattr.cli import main

    directory = fact_model["directory"]
    documents, queries = FactTracingSet.from_corpus(fact_model["corpus"]).save(tmp_path / "data")
    out = tmp_path / "evaluation"
    main(["evaluate", "--output-dir", str(out), "--model", str(directory / "model"), "--influence", str(directory / "influence"),
          "--documents", str(documents), "--queries", str(queries)])
    report = json.loads((out / "fact_tracing.json").read_text())
    metrics = report["metrics"]
    # p = 16,384 > --influence-max-dim: exact influence is left out by default, and the report says why
    assert set(metrics) == {"ours", "ours_unlearning", "bm25", "grad_dot", "random"} and "16384" in report["skipped"]["influence"]
    for ours in ("ours", "ours_unlearning"):
        assert metrics[ours]["verbatim"]["recall@1"] >= 0.8 and metrics[ours]["verbatim"]["source_accuracy"] >= 0.8
    assert metrics["ours"]["all"]["mrr"] > metrics["random"]["all"]["mrr"]
    assert metrics["ours"]["all"]["n_queries"] == 2 * len(fact_model["corpus"]["questions"])
    for name in ("recall_mrr.png", "score_distributions.png", "token_attribution.png"):
        assert (out / name).stat().st_size > 10_000
    assert "| verbatim" in capsys.readouterr().out


def test_source_readout_equals_summed_document_scores(fact_model):
    from hf_fwdattr.evaluation.fact_tracing import evaluate_fact_tracing

    data = FactTracingSet.from_corpus(fact_model["corpus"])
    data.queries = data.queries[:4]
    result = evaluate_fact_tracing(fact_model["model"], fact_model["tokenizer"], fact_model["artifact"], data, methods=["ours"])
    summed = source_scores_from_documents(result.scores["ours"], fact_model["artifact"].documents.sources, result.source_names)
    np.testing.assert_allclose(result.source_scores["ours"], summed, rtol=1e-3, atol=1e-3)


def test_unlearning_artifact_scores_sources_by_summed_documents(fact_model, tmp_path):
    from hf_fwdattr import ArtifactScorer, AttributionConfig, ReadoutError, build_influence_artifact
    from hf_fwdattr.evaluation.fact_data import query_examples

    model, tokenizer, artifact = fact_model["model"], fact_model["tokenizer"], fact_model["artifact"]
    data = FactTracingSet.from_corpus(fact_model["corpus"])
    documents = tokenized_documents(data, tokenizer, artifact)
    unlearned = build_influence_artifact(model, fact_model["task"], documents, documents.examples, tmp_path / "unlearning",
                                         AttributionConfig(solver="unlearning", horizon=10))
    reloaded = type(unlearned).from_pretrained(tmp_path / "unlearning")
    assert reloaded.config.readout.value == "removal" and reloaded.readout_basis is None
    queries = query_examples(data, tokenizer)[:6]
    scorer = ArtifactScorer(reloaded, model, fact_model["task"])
    try:
        scores = scorer.document_scores(queries).double()
        summed = source_scores_from_documents(scores, reloaded.documents.sources, reloaded.source_names)
        np.testing.assert_allclose(scorer.source_scores(queries).double().numpy(), summed, rtol=1e-6, atol=1e-6)
    finally:
        scorer.close()
    true = torch.tensor([reloaded.documents.document_ids.index(q["document_id"]) for q in data.queries[:6]])
    ranks = (scores > scores.gather(1, true[:, None])).sum(dim=1) + 1
    assert (ranks <= 5).all(), ranks  # of 21 documents (random: 11 on average); quality is checked by the evaluate test
    with pytest.raises(ReadoutError, match="unlearning"):
        ArtifactScorer(artifact, model, fact_model["task"], mode="removal")


@pytest.mark.slow
def test_evaluate_command_on_built_in_defaults(tmp_path):
    """The whole default run: builds the evaluation fact model, then evaluates (minutes)."""
    from hf_fwdattr.cli import main

    main(["evaluate", "--output-dir", str(tmp_path)])
    report = json.loads((tmp_path / "fact_tracing.json").read_text())
    assert (tmp_path / "data" / "queries.jsonl").is_file() and (tmp_path / "token_attribution.png").is_file()
    ours, grad_dot = report["metrics"]["ours"], report["metrics"]["grad_dot"]
    assert ours["verbatim"]["mrr"] >= 0.8 and ours["all"]["mrr"] >= grad_dot["all"]["mrr"]
