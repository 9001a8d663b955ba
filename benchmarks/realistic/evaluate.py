"""Compressed against exact scores on held-out documents, and the per-query cost of the readout, in a fresh process.

    python -m benchmarks.realistic.evaluate --preset full [--heldout 256]

Held-out documents: documents of the artifact that neither fixed its basis (sample) nor chose its rank (validation),
a seeded subset of `--heldout`. Their exact responses are simulated again here (the same closed form, eigenbasis and
step size as the build) and scored by backward passes: s = ∇f_qᵀu_b. The compressed scores are what the artifact gives
with forward passes only (k tangent directions, then the stored coefficients). Queries: the 64 fact questions of the
corpus (f_q = log p(answer | prompt)), read out through `ArtifactScorer` (checked against ∇f_qᵀVᵀc_b from backward
passes), and 32 training documents read as queries (f_q = their log-likelihood; ∇f_qᵀVᵀc_b from backward passes).
Readout time: one query alone (median of 5) through `ArtifactScorer` (documents, sources) and through the
`attributed-text-generation` pipeline next to plain `text-generation` of the same 4 tokens.
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def _median_seconds(function, repeats: int = 5) -> dict:
    wall, cpu = [], []
    function()  # warm-up
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        function()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return {"wall": statistics.median(wall), "cpu": statistics.median(cpu)}


def _agreement(exact: torch.Tensor, approximate: torch.Tensor) -> dict:
    from hf_fwdattr.stats import pearson_rows, spearman_rows

    exact, approximate = exact.double(), approximate.double()
    top = 10
    overlap = [len(set(exact[q].topk(top).indices.tolist()) & set(approximate[q].topk(top).indices.tolist())) / top for q in range(len(exact))]
    spearman = spearman_rows(exact, approximate)
    return {"spearman": float(spearman.nanmean()), "spearman_min": float(spearman.min()), "pearson": float(pearson_rows(exact, approximate).nanmean()),
            "top10_overlap": sum(overlap) / len(overlap), "queries": len(exact), "documents": exact.shape[1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="full")
    parser.add_argument("--heldout", type=int, default=256, help="held-out documents whose exact responses are simulated again")
    parser.add_argument("--fidelity-only", action="store_true",
                        help="compressed scores from query gradients (backward) instead of the forward readout, and no timings")
    args = parser.parse_args()

    from transformers import pipeline

    import hf_fwdattr  # noqa: F401  (registers the pipeline)
    from hf_fwdattr import ArtifactScorer, DocumentSet, query_gradients, simulate_responses
    from hf_fwdattr.estimator.eigenbasis import estimate_eigenbasis

    from . import setting

    preset = setting.PRESETS[args.preset]
    made = setting.heldout_setting(preset, args.heldout)
    model, tok, artifact, task, rows = made["model"], made["tokenizer"], made["artifact"], made["task"], made["rows"]
    examples, heldout = made["examples"], made["heldout"]
    generator = torch.Generator().manual_seed(12)
    train_queries = [examples[i] for i in torch.randperm(len(rows), generator=generator)[:32].tolist()]
    fact_queries = setting.fact_queries(preset, tok)

    result = {"preset": preset.name, "heldout_documents": len(heldout), "rank": artifact.store.rank if artifact.compressed else None}
    scorer = ArtifactScorer(artifact, model, task)
    subspace = scorer.subspace
    gradients = {name: query_gradients(subspace, task, queries) for name, queries in (("fact", fact_queries), ("training", train_queries))}
    coefficients = artifact.store.coefficients.rows(heldout).to(torch.float32)
    # the artifact's scores ∇f_qᵀVᵀc_b with ∇f_q by backward passes; the forward readout gives the same (checked on the fact queries)
    basis = artifact.store.directions.to(torch.float32)
    through_gradients = {name: (g @ basis.T) @ coefficients.T for name, g in gradients.items()}
    if args.fidelity_only:
        compressed = through_gradients
    else:
        start = time.perf_counter()
        compressed = {"fact": scorer.document_scores(fact_queries)[:, heldout], "training": through_gradients["training"]}
        result["forward_readout_seconds_for_64_queries"] = time.perf_counter() - start
        result["forward_against_backward_max_relative_difference"] = float(
            (compressed["fact"] - through_gradients["fact"]).abs().max() / through_gradients["fact"].abs().max())

    # exact responses of the held-out documents: the build's closed form again, scored by backward passes
    start = time.perf_counter()
    eigenbasis = estimate_eigenbasis(subspace, task, examples, artifact.config)
    exact = {name: [] for name in gradients}
    picked = DocumentSet.from_examples([examples[i] for i in heldout], [rows[i]["document_id"] for i in heldout])
    differences, by_rank = [], {name: {} for name in gradients}
    ranks = sorted({2**i for i in range(3, 12)} | {artifact.store.rank}) if artifact.compressed else []
    ranks = [r for r in ranks if r <= (artifact.store.rank if artifact.compressed else 0)]
    for lo in range(0, len(heldout), 128):
        responses = simulate_responses(subspace, task, picked, examples, artifact.config, document_indices=range(lo, min(lo + 128, len(heldout))),
                                       step_size=artifact.step_size, eigenbasis=eigenbasis).responses
        for name, g in gradients.items():
            exact[name].append(g @ responses.T)
            for r in ranks:  # the same exact responses through the first r directions of the stored basis
                directions = basis[:r]
                by_rank[name].setdefault(r, []).append((g @ directions.T) @ (responses @ directions.T).T)
        if artifact.compressed:  # the build's coefficients are the projection of these very responses
            stored = artifact.store.coefficients.rows(heldout[lo : lo + 128])
            projected = responses @ basis.T
            differences.append(float((stored - projected).abs().max() / projected.abs().max()))
    result["stored_vs_recomputed_coefficients_max_relative_difference"] = max(differences) if differences else None
    result["exact_seconds"] = time.perf_counter() - start
    for name in exact:
        exact_scores = torch.cat(exact[name], dim=1)
        result[f"{name}_queries"] = _agreement(exact_scores, compressed[name])
        result[f"{name}_queries"]["spearman_by_rank"] = {r: _agreement(exact_scores, torch.cat(parts, dim=1))["spearman"] for r, parts in by_rank[name].items()}

    if args.fidelity_only:
        print(json.dumps(result, default=float))
        return
    # per-query readout cost, one query alone
    one = fact_queries[:1]
    result["document_readout"] = _median_seconds(lambda: scorer.document_scores(one))
    result["source_readout"] = _median_seconds(lambda: scorer.source_scores(one))
    prompt = setting.fact_prompts(preset)[0]
    generate = pipeline("text-generation", model=model, tokenizer=tok)
    attributed = pipeline("attributed-text-generation", model=model, tokenizer=tok, influence=artifact)
    generation = dict(max_new_tokens=4, do_sample=False)
    result["text_generation"] = _median_seconds(lambda: generate(prompt, **generation))
    result["attributed_generation_documents"] = _median_seconds(lambda: attributed(prompt, top_k=5, **generation))
    result["attributed_generation_sources"] = _median_seconds(lambda: attributed(prompt, top_k=5, aggregate="source", **generation))
    result["example"] = attributed(prompt, top_k=3, **generation)[0]
    result["threads"] = torch.get_num_threads()
    print(json.dumps(result, default=float))


if __name__ == "__main__":
    main()
