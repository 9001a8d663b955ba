"""The scale setting (issue 8's tiny Llama, LoRA r = 8 on q/v, p = 3,584) at N documents: the closed form in each
eigenbasis against the linearized recursion (the reference: K curvature products on minibatches), and its cost.

    python -m benchmarks.fidelity.scale --n 10000

Reuses benchmarks/scale's cached corpus, base model and adapter (built on first use). All contenders run at the
reference's K, λ and η; agreement is the per-query Spearman (and Pearson) over `--documents` documents.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    from hf_fwdattr import AttributionConfig, AttributionSubspace, estimate_step_size, query_gradients, simulate_responses
    from hf_fwdattr.estimator.eigenbasis import ExplicitEigenbasis, KroneckerEigenbasis, curvature_subset
    from hf_fwdattr.estimator.ggn import exact_ggn
    from hf_fwdattr.estimator.gradients import document_gradients
    from hf_fwdattr.stats import pearson_rows, spearman_rows

    from benchmarks.fidelity.lm import _counting_padding
    from benchmarks.scale import setting
    from benchmarks.scale.model import TASK, train_epoch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--documents", type=int, default=32)
    parser.add_argument("--horizon", type=int, default=100)
    parser.add_argument("--damping", type=float, default=1e-3)
    parser.add_argument("--sketches", type=int, nargs="*", default=[4, 16])
    parser.add_argument("--exact", action="store_true", help="Also build the exact GGN (one backward pass per factor slot).")
    args = parser.parse_args()

    tok = setting.tokenizer()
    documents, examples, _ = setting.documents(args.n, tok)
    model, _ = setting.model(args.n, examples, tok)
    _, test_queries = setting.queries(tok)
    report: dict = {"n": args.n, "documents": args.documents, "horizon": args.horizon, "damping": args.damping, "rows": {}, "cpu_seconds": {}}

    def cpu(name, fn):
        start = time.process_time()
        value = fn()
        report["cpu_seconds"][name] = time.process_time() - start
        print(f"{name}: {report['cpu_seconds'][name]:.1f}s CPU", flush=True)
        return value

    # one epoch of the adapter's training (AdamW, batch 32), timed here in CPU seconds, on a copy
    import copy

    replica = copy.deepcopy(model)
    cpu("epoch", lambda: train_epoch(replica, examples, [p for p in replica.parameters() if p.requires_grad], lr=1e-3, seed=3))
    del replica
    rows = list(range(args.documents))
    linearized = AttributionConfig(solver="linearized", damping=args.damping, horizon=args.horizon, batch_size=32, simulation_chunk_size=64)
    with AttributionSubspace.build(model) as subspace:
        report["dim"] = subspace.dim
        queries = query_gradients(subspace, TASK, test_queries, dtype=torch.float64)
        step, _ = estimate_step_size(subspace, TASK, examples, linearized)
        reference = simulate_responses(subspace, TASK, documents, examples, linearized, document_indices=rows, step_size=step)
        reference_scores = queries @ reference.responses.double().T
        gradients = reference.gradients.double()
        cpu("document_gradients_all", lambda: document_gradients(subspace, TASK, documents, batch_size=256))
        curvature_set = curvature_subset(examples, 1024, 0)

        def agreement(label, basis):
            from hf_fwdattr.estimator.eigenbasis import horizon_filter

            scores = queries @ basis.filter(gradients, horizon_filter(step, args.horizon, args.damping)).T
            report["rows"][label] = {"spearman": float(spearman_rows(reference_scores, scores).nanmean()),
                                     "pearson": float(pearson_rows(reference_scores, scores).nanmean())}
            print(label, report["rows"][label], flush=True)

        other = simulate_responses(subspace, TASK, documents, examples, AttributionConfig(**{**linearized.to_dict(), "seed": 1}),
                                   document_indices=rows, step_size=step)
        report["rows"]["linearized, another minibatch sequence"] = {
            "spearman": float(spearman_rows(reference_scores, queries @ other.responses.double().T).nanmean())}
        agreement("kronecker (padding masked)", cpu("kronecker", lambda: KroneckerEigenbasis.estimate(subspace, TASK, curvature_set, 32, dtype=torch.float64)))
        agreement("kronecker (padding counted)", KroneckerEigenbasis.estimate(subspace, _counting_padding(0), curvature_set, 32, dtype=torch.float64))
        for sketch in args.sketches:
            matrix = cpu(f"sketched_{sketch}_ggn", lambda: exact_ggn(subspace, TASK, curvature_set, 32, samples=sketch))
            agreement(f"explicit, GGN sketched ({sketch} passes per batch)", cpu(f"sketched_{sketch}_eigh", lambda: ExplicitEigenbasis.from_matrix(matrix)))
        if args.exact:
            matrix = cpu("exact_ggn", lambda: exact_ggn(subspace, TASK, curvature_set, 32))
            agreement("explicit, exact GGN", cpu("exact_eigh", lambda: ExplicitEigenbasis.from_matrix(matrix)))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
