"""LDS and fact tracing of every contender on the fact model of one corpus seed (the held-out one: 1).

    python -m benchmarks.fidelity.lm --seed 1 --ground-truth                       # the retrainings (cached)
    python -m benchmarks.fidelity.lm --seed 1 --contenders --modules q_proj v_proj # exact influence in the q/v subspace
    python -m benchmarks.fidelity.lm_report --seed 1

Contenders in the adapter's q/v subspace (p = 3,584, where exact damped influence is computable: the exact GGN over
the training documents) come from the scores `--contenders` cached; the artifact (the callback's, full adapter),
the unlearning solver, gradient dot product and BM25 are scored by `evaluate_fact_tracing`.
"""

from __future__ import annotations

import argparse
import json

import torch


def main() -> None:
    from safetensors.torch import load_file

    from hf_fwdattr import AttributionSubspace
    from hf_fwdattr.estimator.eigenbasis import KroneckerEigenbasis, horizon_filter
    from hf_fwdattr.estimator.gradients import document_gradients, query_gradients
    from hf_fwdattr.estimator.subspace import canonical_name
    from hf_fwdattr.evaluation.fact_tracing import evaluate_fact_tracing
    from hf_fwdattr.evaluation.metrics import lds, split_half_ceiling
    from hf_fwdattr.stats import spearman_rows

    from benchmarks.fidelity.lm import CACHE, ground_truth, setup

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--modules", nargs="*", default=["q_proj", "v_proj"])
    args = parser.parse_args()
    made = setup(args.seed)
    truth = ground_truth(made)
    subsets, outputs = truth["subsets"].numpy(), truth["outputs"].numpy().mean(0)
    scores = {k: v.double() for k, v in load_file(CACHE / f"lm-seed{args.seed}" / f"scores-{'-'.join(args.modules)}.safetensors").items()}

    # EK-FAC at K → ∞ in the same subspace (the cached run has K = 3000)
    model, task, documents = made["model"], made["task"], made["document_set"]
    names = [canonical_name(n) for n, _ in model.named_parameters() if "lora_" in n and any(f".{m}." in n for m in args.modules)]
    with AttributionSubspace.build(model, "trainable", parameter_names=names) as subspace:
        g = document_gradients(subspace, task, documents, dtype=torch.float64)
        q = query_gradients(subspace, task, made["queries"], dtype=torch.float64)
        kronecker = KroneckerEigenbasis.estimate(subspace, task, list(documents.examples), 16, dtype=torch.float64)
        scores["kronecker_Kinf"] = q @ kronecker.filter(g, horizon_filter(0.0, None, 1e-3)).T
        scores["grad_dot_qv"] = -(q @ g.T)

    result = evaluate_fact_tracing(model, made["tokenizer"], made["artifact"], made["data"],
                                   methods=["ours", "ours_unlearning", "grad_dot", "bm25"])
    for method, values in result.scores.items():
        scores[f"full adapter: {method}"] = torch.as_tensor(values).double()

    report = {"seed": args.seed, "lds": {}, "spearman_vs_exact": {}, "fact_tracing": result.metrics,
              "noise_ceiling": split_half_ceiling(truth["outputs"].numpy())}
    for name, values in scores.items():
        summary = lds(values.numpy(), subsets, outputs)
        report["lds"][name] = {"mean": summary.mean, "stderr": summary.stderr}
        if values.shape == scores["exact"].shape:
            report["spearman_vs_exact"][name] = float(spearman_rows(scores["exact"], values).nanmean())
    print(json.dumps(report, indent=1, default=float))


if __name__ == "__main__":
    main()
