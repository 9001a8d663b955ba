"""Language-model attribution quality: fact tracing and LDS on `hf-fwdattr evaluate`'s default fact model.

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.lm.run [--subsets 64 --seeds 2]

One command, everything cached under benchmarks/lm/cache/facts/ (rerunning reuses what is there):

1. the fact model (the default of `hf-fwdattr evaluate`: LoRA r = 8 on every projection, p = 16,384) and
   its artifact (the callback's, with the library's default configuration when the model is built; Table 1 of
   benchmarks/RESULTS.md was measured on one built when that default was the linearized solver, K = 30);
2. fact tracing in that subspace: ours (forward-only), BM25, gradient dot product, random — exact
   influence there needs p = 16,384 curvature products, hours on this machine, so:
3. the same comparison with exact damped influence in a *smaller subspace of the same model*: the LoRA B
   matrices of the two MLP down-projections (p = 1,024), where the explicit full-batch curvature is built
   (p products) and eigendecomposed; ours is re-simulated there with the artifact's settings;
4. the LDS ground truth (`ground_truth.py`: the LoRA fine-tune retrained on random halves) and the LDS
   of every method, with a split-half noise ceiling;
5. the horizon / damping sweep in the small subspace: the K-step filter applied in the eigenbasis
   (the full-batch version of the simulation) for several K and λ, against exact influence;
6. the horizon in the full LoRA subspace: ours with the library's closed-form solver on a
   Kronecker-factored (EK-FAC) eigenbasis, which makes any K cost the same (K = 30, 300, 3000);
7. ours with the unlearning solver (nonlinear removal response, removal readout) in the LoRA subspace,
   in the fact-tracing table and the LDS.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from benchmarks.lm.ground_truth import generate
from benchmarks.lm.setup import CACHE, NAME, evaluation_setup
from hf_fwdattr import ArtifactError, InfluenceArtifact, build_influence_artifact
from hf_fwdattr.estimator.curvature import CurvatureOperator
from hf_fwdattr.estimator.eigenbasis import ExplicitEigenbasis, horizon_filter
from hf_fwdattr.estimator.subspace import SubspaceSpec, canonical_name
from hf_fwdattr.evaluation.fact_metrics import reciprocal_ranks, source_scores_from_documents, top_choice_accuracy
from hf_fwdattr.evaluation.fact_tracing import evaluate_fact_tracing, format_table
from hf_fwdattr.evaluation.metrics import lds, split_half_ceiling

SMALL_SUBSPACE = "lora_B of mlp.down_proj (both layers)"


def small_subspace_names(model) -> list[str]:
    return [canonical_name(n) for n, _ in model.named_parameters() if "down_proj.lora_B" in n]


def small_artifact(setup: dict, log) -> InfluenceArtifact:
    """Ours in the small subspace: the artifact's estimator settings, simulated on the same model and documents."""
    directory = CACHE / NAME / "small_influence"
    artifact, model, documents = setup["artifact"], setup["model"], setup["document_set"]
    start = time.perf_counter()
    small = build_influence_artifact(model, setup["task"], documents, documents.examples, directory, artifact.config,
                                     subspace=SubspaceSpec(kind="trainable", parameter_names=small_subspace_names(model)), progress=False)
    log(f"small-subspace artifact (p = {small.dim}) ready in {time.perf_counter() - start:.0f}s")
    return small


def small_eigensystem(setup: dict, small: InfluenceArtifact, log) -> ExplicitEigenbasis:
    """The explicit full-batch curvature (the artifact's kind) in the small subspace, eigendecomposed; cached."""
    path = CACHE / NAME / f"small_{small.config.curvature.value}_eigensystem.safetensors"
    if path.is_file():
        tensors = load_file(path)
        return ExplicitEigenbasis(tensors["eigenvalues"], tensors["eigenvectors"], float(tensors["seconds"]))
    subspace = small.bind(setup["model"])
    task, examples = setup["task"], setup["document_set"].examples
    operator = CurvatureOperator(subspace, task, task.collate(list(examples)), small.config.curvature, torch.float64)
    system = ExplicitEigenbasis.from_operator(operator)
    save_file({"eigenvalues": system.eigenvalues, "eigenvectors": system.eigenvectors.contiguous(),
               "seconds": torch.tensor(system.seconds)}, str(path), metadata={"format": "pt"})
    log(f"explicit curvature (p = {subspace.dim}) built and eigendecomposed in {system.seconds:.0f}s")
    return system


def closed_form_artifacts(setup: dict, horizons=(30, 300, 3000), log=print) -> dict[int, InfluenceArtifact]:
    """Ours in the full LoRA subspace with the closed-form solver (EK-FAC eigenbasis) for several horizons K."""
    from hf_fwdattr import AttributionConfig

    model, documents = setup["model"], setup["document_set"]
    made = {}
    for horizon in horizons:
        config = AttributionConfig(damping=setup["artifact"].config.damping, horizon=horizon, batch_size=16, readout="jvp",
                                   solver="closed_form", eigenbasis="kronecker")
        start = time.perf_counter()
        directory = CACHE / NAME / f"closed_form_K{horizon}"
        try:
            made[horizon] = build_influence_artifact(model, setup["task"], documents, documents.examples, directory, config, progress=False)
        except ArtifactError:  # cached with other settings (an older configuration): a cache, so build it again
            shutil.rmtree(directory)
            made[horizon] = build_influence_artifact(model, setup["task"], documents, documents.examples, directory, config, progress=False)
        log(f"closed-form artifact K = {horizon}: {time.perf_counter() - start:.0f}s")
    return made


def lds_table(named_scores: dict[str, torch.Tensor], truth: dict, kinds: list[str]) -> dict:
    """LDS of each method, over all queries and per query kind; plus the split-half ceiling of the ground truth."""
    subsets, replicates = truth["subsets"].numpy(), truth["outputs"].numpy()
    outputs = replicates.mean(axis=0)
    kinds = np.array(kinds)
    table = {}
    for name, scores in named_scores.items():
        row = {"all": lds(scores.numpy(), subsets, outputs).to_dict()}
        for kind in dict.fromkeys(kinds.tolist()):
            mask = kinds == kind
            row[kind] = lds(scores.numpy()[mask], subsets, outputs[:, mask]).to_dict()
        table[name] = row
    ceiling = {"all": split_half_ceiling(replicates) if replicates.shape[0] > 1 else None}
    return {"methods": table, "ceiling": ceiling}


def horizon_sweep(setup: dict, small: InfluenceArtifact, system: ExplicitEigenbasis, result, truth: dict) -> list[dict]:
    """MRR and LDS of the K-step filter (−(1 − (1 − η(h + λ))^K)/(h + λ) per eigenvalue h) for several K and λ."""
    from hf_fwdattr.estimator.gradients import document_gradients, query_gradients

    subspace = small.bind(setup["model"])
    task = setup["task"]
    g_docs = document_gradients(subspace, task, setup["document_set"], dtype=torch.float64)
    g_queries = query_gradients(subspace, task, setup["queries"], dtype=torch.float64)
    step = small.step_size
    kinds = np.array(result.kinds)
    sources = small.documents.sources
    rows = []
    for damping in (1e-3, 1e-2, 1e-1, 1.0):
        for horizon in (1, 10, 30, 100, 300, 1000, None):
            scores = system.filter(g_queries, horizon_filter(step, horizon, damping)) @ g_docs.T
            entry = {"damping": damping, "horizon": horizon or "inf"}
            reciprocal = reciprocal_ranks(scores.numpy(), result.true_index)
            for kind in dict.fromkeys(kinds.tolist()):
                entry[f"mrr_{kind}"] = float(reciprocal[kinds == kind].mean())
            by_source = source_scores_from_documents(scores.numpy(), sources, result.source_names)
            entry["source_accuracy"] = float(top_choice_accuracy(by_source, result.true_source).mean())
            if truth is not None:
                entry["lds"] = lds(scores.numpy(), truth["subsets"].numpy(), truth["outputs"].numpy().mean(0)).mean
            rows.append(entry)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description="Fact tracing and LDS on the default fact model.")
    parser.add_argument("--subsets", type=int, default=64)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--skip-lds", action="store_true")
    args = parser.parse_args()
    log = lambda message: print(message, flush=True)  # noqa: E731
    torch.set_num_threads(1)
    start = time.perf_counter()
    setup = evaluation_setup()
    model, tokenizer, data = setup["model"], setup["tokenizer"], setup["data"]
    log(f"fact model ready ({time.perf_counter() - start:.0f}s): {setup['artifact']}")

    full = evaluate_fact_tracing(model, tokenizer, setup["artifact"], data, methods=["ours", "ours_unlearning", "bm25", "grad_dot", "random"])
    log("\n## Fact tracing, LoRA subspace (p = 16,384)\n" + format_table(full))
    small = small_artifact(setup, log)
    system = small_eigensystem(setup, small, log)
    reduced = evaluate_fact_tracing(model, tokenizer, small, data, methods=["ours", "grad_dot", "influence"],
                                    influence_solver="dense", influence_eigensystem=system)
    log(f"\n## Fact tracing, small subspace ({SMALL_SUBSPACE}, p = {small.dim})\n" + format_table(reduced))

    closed_form = {}
    for horizon, artifact in closed_form_artifacts(setup, log=log).items():
        closed_form[horizon] = evaluate_fact_tracing(model, tokenizer, artifact, data, methods=["ours"])
        log(f"\n## Fact tracing, LoRA subspace, ours with the closed-form solver (EK-FAC), K = {horizon}\n"
            + format_table(closed_form[horizon], ["verbatim", "paraphrase", "all"]))

    truth = None
    if not args.skip_lds:
        truth = generate(NAME, setup["model_dir"], setup["documents"], setup["queries"], setup["task"], args.subsets, args.seeds, log=log)
    report = {"fact_tracing": {"lora": {**full.to_dict()}, "small": {**reduced.to_dict(), "subspace": SMALL_SUBSPACE},
                               **{f"lora_closed_form_K{k}": r.to_dict() for k, r in closed_form.items()}},
              "seconds": {"total": time.perf_counter() - start}}
    if truth is not None:
        named = {f"lora/{m}": full.scores[m] for m in ("ours", "ours_unlearning", "grad_dot", "random")}
        named.update({f"lora/ours closed-form K={k}": r.scores["ours"] for k, r in closed_form.items()})
        named.update({f"small/{m}": reduced.scores[m] for m in ("ours", "grad_dot", "influence")})
        report["lds"] = lds_table(named, truth, full.kinds)
        report["lds"]["ground_truth_seconds"] = truth["seconds"]
        full_spread = truth["full_outputs"].numpy()
        report["lds"]["full_data_retrain_vs_theta_star"] = {
            "mean_abs_difference_between_seeds": float(np.abs(full_spread[0] - full_spread[-1]).mean()) if len(full_spread) > 1 else None}
        log("\n## LDS\n" + json.dumps(report["lds"]["methods"], indent=1)[:4000])
    report["sweep"] = horizon_sweep(setup, small, system, reduced, truth)
    report["small_eigenvalues"] = {"min": float(system.eigenvalues[0]), "median": float(system.eigenvalues.median()),
                                   "max": float(system.eigenvalues[-1]), "step_size": small.step_size, "build_seconds": system.seconds}
    log("\n## Horizon / damping sweep (small subspace)\n" + "\n".join(json.dumps(r) for r in report["sweep"]))
    (CACHE / NAME / "results.json").write_text(json.dumps(report, indent=1, sort_keys=True) + "\n")
    log(f"\nwritten {CACHE / NAME / 'results.json'} ({time.perf_counter() - start:.0f}s)")


if __name__ == "__main__":
    main()
