"""The fact model's whole adapter (LoRA r = 8 on all seven linear layers, p = 16,384: past explicit_max_dim) on corpus
seed 1: LDS of the defaults (auto: the low-rank eigenbasis), EK-FAC at K = ∞, low-rank at rank 1,024 and exact damped
influence by the conjugate_gradients solver (cg_iterations = 20, preconditioned by the defaults' basis), in one harness,
with each one's per-query Spearman against the last.

    python -m benchmarks.fidelity.full_adapter
    python -m benchmarks.fidelity.full_adapter --cg-iterations 20 40   # the solver's convergence here

Needs the fact model and LDS ground truth of `python -m benchmarks.fidelity.lm --seed 1 --ground-truth`.
"""


def main() -> None:
    import argparse
    import json
    import time

    import torch

    from hf_fwdattr import AttributionConfig, AttributionSubspace, simulate_responses
    from hf_fwdattr.estimator.gradients import query_gradients
    from hf_fwdattr.evaluation.metrics import lds
    from hf_fwdattr.stats import spearman_rows

    from benchmarks.fidelity.lm import ground_truth, setup

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cg-iterations", type=int, nargs="*",
                        help="Only the conjugate_gradients solver, at these cg_iterations (its convergence; against the last).")
    args = parser.parse_args()
    made = setup(1)
    truth = ground_truth(made)
    model, task, documents = made["model"], made["task"], made["document_set"]
    train = list(documents.examples)
    out = {}
    with AttributionSubspace.build(model, "peft") as subspace:
        q = query_gradients(subspace, task, made["queries"], dtype=torch.float64)
        contenders = [("defaults (auto: low-rank 256)", AttributionConfig()), ("EK-FAC, K = inf", AttributionConfig(eigenbasis="kronecker")),
                      ("low-rank 1024", AttributionConfig(eigenbasis="low_rank", curvature_rank=1024)),
                      ("conjugate_gradients (exact damped influence)", AttributionConfig(solver="conjugate_gradients"))]
        if args.cg_iterations:
            contenders = [(f"conjugate_gradients, {n} iterations", AttributionConfig(solver="conjugate_gradients", cg_iterations=n))
                          for n in args.cg_iterations]
        for name, config in contenders:
            t = time.process_time()
            r = simulate_responses(subspace, task, documents, train, config)
            s = (q @ r.responses.double().T).numpy()
            fit = lds(s, truth["subsets"].numpy(), truth["outputs"].numpy().mean(0))
            out[name] = {"lds": fit.mean, "stderr": fit.stderr, "cpu_s": time.process_time() - t, "scores": torch.from_numpy(s)}
            print(name, {k: v for k, v in out[name].items() if k != "scores"}, flush=True)
    exact = out[contenders[-1][0]]["scores"]
    for name, row in out.items():
        row["spearman_vs_cg"] = float(spearman_rows(exact, row.pop("scores")).nanmean())
    print(json.dumps({"dim": subspace.dim, **out}))


if __name__ == "__main__":
    main()
