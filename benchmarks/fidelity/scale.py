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
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


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
    parser.add_argument("--sketches", type=int, nargs="*", default=[1, 2, 4, 8])
    parser.add_argument("--exact", action="store_true", help="Also build the exact GGN (one backward pass per factor slot).")
    parser.add_argument("--defaults-build", action="store_true",
                        help="Also time the defaults' whole build, AttributionConfig() over all N documents: curvature, its "
                             "factorisation and every document's response (what the callback runs after training).")
    parser.add_argument("--timing-only", action="store_true",
                        help="Only the epoch, the document gradients and the defaults' build (no reference, no contenders): "
                             "the cost at N where the reference would take hours.")
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
    adapter = [param.requires_grad_(True) for name, param in replica.named_parameters() if "lora_" in name]
    cpu("epoch", lambda: train_epoch(replica, examples, adapter, lr=1e-3, seed=3))
    del replica

    def defaults_build(subspace) -> None:
        import logging

        logging.basicConfig(format="%(name)s: %(message)s")
        logging.getLogger("hf_fwdattr").setLevel(logging.INFO)  # which basis 'auto' chose, and why
        cpu("defaults_build", lambda: simulate_responses(subspace, TASK, documents, examples, AttributionConfig()))
        report["defaults_build_vs_epoch"] = report["cpu_seconds"]["defaults_build"] / report["cpu_seconds"]["epoch"]
        print(f"defaults' build: {report['defaults_build_vs_epoch']:.2f}× an epoch", flush=True)
    rows = list(range(args.documents))
    if args.timing_only:
        with AttributionSubspace.build(model) as subspace:
            report["dim"] = subspace.dim
            cpu("document_gradients_all", lambda: document_gradients(subspace, TASK, documents, batch_size=256))
            defaults_build(subspace)
        print(json.dumps(report, indent=1))
        return
    linearized = AttributionConfig(solver="linearized", damping=args.damping, horizon=args.horizon, batch_size=32, simulation_chunk_size=64)
    with AttributionSubspace.build(model) as subspace:
        report["dim"] = subspace.dim
        queries = query_gradients(subspace, TASK, test_queries, dtype=torch.float64)
        cache = Path(__file__).resolve().parent / "cache" / f"scale-n{args.n}-d{args.documents}-K{args.horizon}-reference.safetensors"
        if cache.is_file():  # the reference costs minutes per document: computed once
            saved = load_file(cache)
            step, reference_scores, other_scores, gradients = float(saved["step"]), saved["scores"], saved["other"], saved["gradients"]
        else:
            step, _ = estimate_step_size(subspace, TASK, examples, linearized)
            reference = simulate_responses(subspace, TASK, documents, examples, linearized, document_indices=rows, step_size=step)
            reference_scores = queries @ reference.responses.double().T
            gradients = reference.gradients.double()
            other = simulate_responses(subspace, TASK, documents, examples, AttributionConfig(**{**linearized.to_dict(), "seed": 1}),
                                       document_indices=rows, step_size=step)
            other_scores = queries @ other.responses.double().T
            cache.parent.mkdir(parents=True, exist_ok=True)
            save_file({"step": torch.tensor(step), "scores": reference_scores, "other": other_scores, "gradients": gradients}, str(cache))
        cpu("document_gradients_all", lambda: document_gradients(subspace, TASK, documents, batch_size=256))
        curvature_set = curvature_subset(examples, 1024, 0)

        def agreement(label, basis):
            from hf_fwdattr.estimator.eigenbasis import horizon_filter

            scores = queries @ basis.filter(gradients, horizon_filter(step, args.horizon, args.damping)).T
            report["rows"][label] = {"spearman": float(spearman_rows(reference_scores, scores).nanmean()),
                                     "pearson": float(pearson_rows(reference_scores, scores).nanmean())}
            print(label, report["rows"][label], flush=True)

        report["rows"]["linearized, another minibatch sequence"] = {"spearman": float(spearman_rows(reference_scores, other_scores).nanmean())}
        agreement("kronecker (padding masked)", cpu("kronecker", lambda: KroneckerEigenbasis.estimate(subspace, TASK, curvature_set, 32, dtype=torch.float64)))
        agreement("kronecker (padding counted)", KroneckerEigenbasis.estimate(subspace, _counting_padding(0), curvature_set, 32, dtype=torch.float64))
        for sketch in args.sketches:
            matrix = cpu(f"sketched_{sketch}_ggn", lambda: exact_ggn(subspace, TASK, curvature_set, 32, samples=sketch))
            agreement(f"explicit, GGN sketched ({sketch} passes per batch)", cpu(f"sketched_{sketch}_eigh", lambda: ExplicitEigenbasis.from_matrix(matrix)))
        if args.exact:
            matrix = cpu("exact_ggn", lambda: exact_ggn(subspace, TASK, curvature_set, 32))
            agreement("explicit, exact GGN", cpu("exact_eigh", lambda: ExplicitEigenbasis.from_matrix(matrix)))
        if args.defaults_build:
            defaults_build(subspace)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
