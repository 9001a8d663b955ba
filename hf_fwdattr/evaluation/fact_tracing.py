"""Fact tracing (DESIGN §7): does an attribution method find the one document that states a fact?

A fact-tracing set is a table of documents (id, source, text) and a table of queries (a prompt, the
answer, the id of the one document that states the fact, and optionally a kind such as "verbatim" or
"paraphrase"). Every method scores every (query, document) pair — the query measurement is
f_q = log p(answer | prompt) — and is judged by where it ranks the true document:

- recall@k: the fraction of queries whose true document is among the k highest scores;
- MRR: the mean of 1 / rank of the true document;
- source accuracy: the fraction of queries whose true document's source has the highest score after
  the document scores are summed by source (scores are linear in up-weighting, so a source's score is
  the score of its summed response: exactly what the artifact's per-source readout gives, with one
  direction per source); and, for comparison, the fraction whose top-scoring document comes from the
  true source (``source_accuracy_top_document``: needs every document's score).

Queries are also grouped by whether the model *answers* them (each answer token is the model's most
likely next token): attributing an answer the model would not give asks which documents would teach
it, a different question.

`evaluate_fact_tracing` runs the forward-only readout and the baselines of `baselines.py` on one set in one run;
`run_evaluation` adds the default model, the JSON and the figures; `hf-fwdattr evaluate` is its command
line. The tables are read by `fact_data.py`, the methods, metrics and result are in `fact_metrics.py`, the figures in
`plots.py`.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch

from ..estimator.documents import DocumentSet
from ..estimator.task import IGNORE_INDEX, CausalLMTask
from ..progress import progress_bar
from .fact_data import FactTracingDataError, FactTracingSet, query_examples, tokenized_documents
from .fact_metrics import METHOD_LABELS, METHODS, FactTracingResult, Method, source_scores_from_documents, summarize

logger = logging.getLogger(__name__)


# The corpus `hf-fwdattr evaluate` builds by default: the demo's facts, one co-mention distractor per fact (a
# document naming the fact's entity and answer without stating it), and pretraining that shows the paraphrased
# question form on other entities, so that a paraphrased query asks the model something it can know.
EVALUATION_CORPUS = {"co_mention_distractors": 48, "pretraining_paraphrases": 1.0, "pretraining_entities": 192}
# The model it trains (`demo.train_fact_model`). A wider model on more pretraining entities answers more
# paraphrases but does not attribute better overall (benchmarks/RESULTS.md, issue 9, Table 7).
EVALUATION_MODEL = {"hidden_size": 64}


# ---------------------------------------------------------------------- the evaluation
def evaluate_fact_tracing(model: torch.nn.Module, tokenizer, artifact, data: FactTracingSet, methods: Sequence[str] = METHODS,
                          append_eos: bool = True, influence_solver: str = "auto", influence_tolerance: float = 1e-4,
                          influence_max_iterations: int = 2000, influence_eigensystem=None, seed: int = 0) -> FactTracingResult:
    """Score every query of `data` against the artifact's documents with each of `methods` and rank the true ones.

    ``ours`` is the artifact read out forward-only (`ArtifactScorer`: document scores from the responses,
    source scores from the per-source summed responses). ``ours_unlearning`` simulates the documents' responses
    again with ``solver="unlearning"`` (library defaults otherwise; the documents are the training set its retain
    minibatches are drawn from) in the artifact's subspace and reads them out with the removal readout; its source
    scores sum document scores. The gradient peers work in the artifact's own
    subspace on the same model; exact influence uses the artifact's damping and curvature kind, with the
    documents as the full training batch (`influence_eigensystem`: an `ExplicitEigenbasis` of that
    curvature, already built, for the dense solver).
    """
    from ..query.scoring import ArtifactScorer
    from .baselines import BM25Scores, gradient_dot_scores, random_scores

    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"Unknown method(s) {unknown}; choose from {list(METHODS)}.")
    methods = [Method(m) for m in methods]
    documents = tokenized_documents(data, tokenizer, artifact, append_eos)
    queries = query_examples(data, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    task = CausalLMTask(pad_token_id=pad if pad is not None else 0)
    ids, sources = list(artifact.documents.document_ids), list(artifact.documents.sources)
    source_names = list(artifact.source_names)
    true_index = np.array([ids.index(q["document_id"]) for q in data.queries])
    true_source = np.array([source_names.index(sources[i]) if sources[i] in source_names else -1 for i in true_index])
    config = artifact.config
    damping = float(getattr(config, "curvature_shift", config.damping))
    scores, source_scores, seconds, details = {}, {}, {}, {"damping": damping, "curvature": config.curvature.value,
                                                            "horizon": config.horizon, "subspace_dim": artifact.dim}
    scorer = ArtifactScorer(artifact, model, task)
    peers = _Peers(scorer.subspace, task, documents, queries, damping, config.curvature,
                   {"solver": influence_solver, "tolerance": influence_tolerance, "max_iterations": influence_max_iterations,
                    "eigensystem": influence_eigensystem})
    try:
        for method in methods:
            start = time.perf_counter()
            if method is Method.OURS:
                scores[method.value] = _in_query_chunks(scorer.document_scores, queries, "Scoring (ours)").double()
                if source_names:  # the exact per-source readout: one direction per source
                    source_scores[method.value] = scorer.source_scores(queries).double().numpy()
            elif method is Method.UNLEARNING:
                scores[method.value], details["ours_unlearning"] = _unlearning_scores(scorer.subspace, task, documents, queries, config)
            elif method is Method.BM25:
                by_id = {d["document_id"]: d for d in data.documents}
                bm25 = BM25Scores([by_id[i]["text"] or "" for i in ids])
                scores[method.value] = bm25.scores([f"{q['query']} {q['answer'].strip()}" for q in data.queries])
            elif method is Method.RANDOM:
                scores[method.value] = random_scores(len(queries), len(ids), seed)
            elif method is Method.GRAD_DOT:
                scores[method.value] = gradient_dot_scores(scorer.subspace, task, queries, documents, peers.document_gradients())
            else:
                scores[method.value], solve = peers.influence()
                details["influence"] = solve.summary()
            if method.value not in source_scores and source_names:
                source_scores[method.value] = source_scores_from_documents(scores[method.value], sources, source_names)
            seconds[method.value] = time.perf_counter() - start
            logger.info("%s: scores in %.1fs", method.value, seconds[method.value])
    finally:
        scorer.close()
    kinds = data.kinds
    log_probs, answered = answer_statistics(model, task, queries)
    details["answers"] = {kind: {"mean_log_prob": float(log_probs[mask].mean()), "answered": float(answered[mask].mean())}
                          for kind, mask in query_groups(kinds).items()}
    groups = query_groups(kinds, answered)
    metrics = {}
    for m in scores:
        by_top_document = source_scores_from_documents(scores[m], sources, source_names, "max") if source_names else None
        metrics[m] = summarize(scores[m], true_index, groups, source_scores.get(m) if source_names else None,
                               true_source if source_names else None, top_document_sources=by_top_document)
    return FactTracingResult(metrics, scores, source_scores, ids, source_names, true_index, true_source, kinds, seconds, details)


def _unlearning_scores(subspace, task, documents: DocumentSet, queries: list, artifact_config) -> tuple[torch.Tensor, dict]:
    from ..estimator.config import AttributionConfig
    from ..estimator.simulate import simulate_responses
    from ..query.readout import ForwardReadout

    config = AttributionConfig(solver="unlearning", readout_chunk_size=artifact_config.readout_chunk_size)
    simulated = simulate_responses(subspace, task, documents, documents.examples, config, progress=True)
    responses, rows = simulated.responses, simulated.responses.shape[0]
    chunks = progress_bar((responses[lo : lo + 32] for lo in range(0, rows, 32)), total=-(-rows // 32), desc="Scoring (ours_unlearning)")
    scores = ForwardReadout.from_config(subspace, task, config).scores(queries, chunks, num_directions=rows).double()
    return scores, {"horizon": config.horizon, "unlearning_rate": config.unlearning_rate, "unlearning_retain": config.unlearning_retain,
                    "batch_size": config.batch_size, "simulation_seconds": simulated.seconds}


class _Peers:
    """The gradient peers on one subspace, sharing the document gradients."""

    def __init__(self, subspace, task, documents: DocumentSet, queries: list, damping: float, curvature, influence_options: dict):
        self.subspace, self.task, self.documents, self.queries = subspace, task, documents, queries
        self.damping, self.curvature, self.influence_options = damping, curvature, influence_options
        self._document_gradients = None

    def document_gradients(self) -> torch.Tensor:
        if self._document_gradients is None:
            from ..estimator.gradients import document_gradients

            self._document_gradients = document_gradients(self.subspace, self.task, self.documents, dtype=torch.float64, progress=True)
        return self._document_gradients

    def influence(self):
        from .baselines import damped_influence_scores

        return damped_influence_scores(self.subspace, self.task, self.queries, self.documents, self.documents.examples, self.damping,
                                       self.curvature, self.document_gradients(), **self.influence_options)


def _in_query_chunks(score, queries: list, desc: str, chunk: int = 16) -> torch.Tensor:
    """`score(queries)` computed `chunk` queries at a time, with a progress bar."""
    return torch.cat([score(queries[lo : lo + chunk]) for lo in progress_bar(range(0, len(queries), chunk), desc=desc)])


def query_groups(kinds: Sequence[str], answered: Optional[np.ndarray] = None) -> dict[str, np.ndarray]:
    """Masks over the queries: one per kind, then (with `answered`) each kind's answered ones, then all."""
    kinds = np.asarray(list(kinds), dtype=object)
    groups = {kind: kinds == kind for kind in dict.fromkeys(kinds.tolist())}
    if answered is not None:
        groups.update({f"{kind}, answered": mask & answered for kind, mask in list(groups.items())})
    groups["all"] = np.ones(len(kinds), dtype=bool)
    return groups


def answer_statistics(model: torch.nn.Module, task: CausalLMTask, queries: Sequence[dict], batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Per query, log p(answer | prompt) and whether every answer token is the model's most likely next token."""
    from ..estimator.functional import evaluation_mode

    log_probs, answered = [], []
    with torch.inference_mode(), evaluation_mode(model):
        for lo in range(0, len(queries), batch_size):
            batch = task.collate(list(queries[lo : lo + batch_size]))
            outputs = task.outputs(model, batch)
            labels = batch["labels"][:, 1:].to(outputs.device)
            log_probs.append((-task.loss_from_outputs(outputs, batch)).double().cpu().numpy())
            hits = (outputs[:, :-1].argmax(-1) == labels) | (labels == IGNORE_INDEX)
            answered.append(hits.all(dim=1).cpu().numpy())
    return np.concatenate(log_probs), np.concatenate(answered)


def token_attributions(model: torch.nn.Module, tokenizer, artifact, query: str, answer: str) -> tuple[list[str], torch.Tensor]:
    """Per-token document scores of one answer: row i is log p(answer token i | query, earlier tokens) attributed
    to every document, forward-only (the pipeline's ``per_token=True``). Returns the tokens and [n_tokens, n_documents]."""
    from ..query.scoring import ArtifactScorer

    prompt = tokenizer(query)["input_ids"]
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    examples = [{"input_ids": prompt + answer_ids[: i + 1], "labels": [IGNORE_INDEX] * (len(prompt) + i) + [answer_ids[i]]}
                for i in range(len(answer_ids))]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    scorer = ArtifactScorer(artifact, model, CausalLMTask(pad_token_id=pad))
    try:
        return [tokenizer.decode([t]) for t in answer_ids], scorer.document_scores(examples).double()
    finally:
        scorer.close()


def format_table(result: FactTracingResult, groups: Optional[Sequence[str]] = None) -> str:
    """The metrics as a Markdown table: one row per query group (all groups, or `groups`) and method."""
    lines = ["| queries | method | recall@1 | recall@10 | MRR | source accuracy (sum) | source of top document |", "|---|---|---|---|---|---|---|"]
    names = list(next(iter(result.metrics.values()))) if groups is None else list(groups)
    for kind in names:
        for method, by_kind in result.metrics.items():
            if kind not in by_kind:
                continue
            m = by_kind[kind]
            source = f"{m['source_accuracy']:.3f}" if "source_accuracy" in m else "–"
            top = f"{m['source_accuracy_top_document']:.3f}" if "source_accuracy_top_document" in m else "–"
            lines.append(f"| {kind} ({m['n_queries']}) | {METHOD_LABELS.get(method, method)} | {m['recall@1']:.3f} | "
                         f"{m['recall@10']:.3f} | {m['mrr']:.3f} | {source} | {top} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------- the command
def run_evaluation(output_dir: Union[str, Path], model_path: Optional[str] = None, influence_path: Optional[str] = None,
                   documents_path: Optional[str] = None, queries_path: Optional[str] = None, methods: Optional[Sequence[str]] = None,
                   seed: int = 0, append_eos: bool = True, columns: Optional[dict] = None, plots: bool = True,
                   influence_max_dim: int = 4096, **evaluation_kwargs) -> FactTracingResult:
    """What `hf-fwdattr evaluate` does: evaluate, then write ``fact_tracing.json`` and the figures to `output_dir`.

    Without `model_path`, the fact model is built on `EVALUATION_CORPUS` with `demo.train_fact_model` into
    ``output_dir/fact_model`` (or reused from there), and its documents and queries are written to
    ``output_dir/data`` in the format a user's own files take. With `model_path`, `influence_path`,
    `documents_path` and `queries_path` are required; `columns` renames the columns read (see
    `FactTracingSet.from_files`). `methods` None means all of them, except exact influence when the subspace
    has more than `influence_max_dim` dimensions (it needs up to p curvature–vector products: hours for the
    default model on a CPU); name it in `methods` to run it anyway.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..storage.artifact import InfluenceArtifact

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if model_path is None:
        model_path, influence_path, data = default_fact_model(output_dir / "fact_model", seed)
        data.save(output_dir / "data")
    else:
        missing = [name for name, value in (("influence", influence_path), ("documents", documents_path), ("queries", queries_path)) if value is None]
        if missing:
            raise FactTracingDataError(f"With a model of your own, also give --{' --'.join(missing)} (the artifact, and the two tables).")
        data = FactTracingSet.from_files(documents_path, queries_path, **(columns or {}))
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path).eval()
    artifact = InfluenceArtifact.from_pretrained(influence_path)
    skipped = {}
    if methods is None:
        methods = [m for m in METHODS if m != "influence" or artifact.dim <= influence_max_dim]
        if "influence" not in methods:
            skipped["influence"] = (f"the subspace has p = {artifact.dim} > {influence_max_dim} dimensions; exact influence needs up to "
                                    "p curvature-vector products. Name it in --methods to run it anyway.")
            logger.warning("Exact influence left out: %s", skipped["influence"])
    result = evaluate_fact_tracing(model, tokenizer, artifact, data, methods, append_eos, seed=seed, **evaluation_kwargs)
    report = {**result.to_dict(), "model": str(model_path), "influence": str(influence_path), "methods": list(methods),
              "skipped": skipped, "seed": seed}
    (output_dir / "fact_tracing.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    if plots:
        _figures(result, model, tokenizer, artifact, data, output_dir)
    return result


def default_fact_model(directory: Union[str, Path], seed: int = 0) -> tuple[str, str, FactTracingSet]:
    """The fact model on `EVALUATION_CORPUS` in `directory` (built with `demo.train_fact_model` and `EVALUATION_MODEL`
    unless one built with the same recipe is there): its model folder, its artifact folder, and the fact-tracing set of its corpus."""
    from ..demo.toy import fact_corpus
    from ..storage.artifact import InfluenceArtifact

    directory = Path(directory)
    corpus = fact_corpus(seed=seed, **EVALUATION_CORPUS)
    model_dir, influence_dir, recipe_path = directory / "model", directory / "influence", directory / "recipe.json"
    recipe = {"corpus": EVALUATION_CORPUS, "model": EVALUATION_MODEL, "seed": seed}
    reusable = False
    if (model_dir / "adapter_config.json").is_file() and influence_dir.is_dir() and recipe_path.is_file():
        try:
            same_documents = InfluenceArtifact.from_pretrained(influence_dir).documents.document_ids == [d["document_id"] for d in corpus["documents"]]
            reusable = same_documents and json.loads(recipe_path.read_text()) == recipe
        except Exception:  # an interrupted or foreign build: train again
            reusable = False
    if reusable:
        logger.info("Reusing the fact model in %s.", directory)
    else:
        from ..demo.run import train_fact_model

        recipe_path.unlink(missing_ok=True)
        train_fact_model(directory, seed=seed, corpus_kwargs=EVALUATION_CORPUS, **EVALUATION_MODEL)
        recipe_path.write_text(json.dumps(recipe, sort_keys=True) + "\n", encoding="utf-8")
    return str(model_dir), str(influence_dir), FactTracingSet.from_corpus(corpus)


def _figures(result: FactTracingResult, model, tokenizer, artifact, data: FactTracingSet, output_dir: Path) -> None:
    from .plots import plot_recall_mrr, plot_score_distributions, plot_token_attribution

    plot_recall_mrr(result, output_dir / "recall_mrr.png")
    plot_score_distributions(result, output_dir / "score_distributions.png")
    if "ours" in result.scores:
        kinds = data.kinds
        index = kinds.index("paraphrase") if "paraphrase" in kinds else 0
        query = data.queries[index]
        tokens, scores = token_attributions(model, tokenizer, artifact, query["query"], query["answer"])
        plot_token_attribution(tokens, scores, result.document_ids, f"{query['query']} →{query['answer']}  (forward-only, per token)",
                               output_dir / "token_attribution.png", highlight=query["document_id"])
