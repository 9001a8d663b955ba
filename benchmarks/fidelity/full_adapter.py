"""The fact model's whole adapter (LoRA r = 8 on all seven linear layers, p = 16,384: past explicit_max_dim) on corpus
seed 1: LDS of the defaults (auto: the low-rank eigenbasis), EK-FAC at K = ∞ and low-rank at rank 1,024, in one harness.

    python -m benchmarks.fidelity.full_adapter

Needs the fact model and LDS ground truth of `python -m benchmarks.fidelity.lm --seed 1 --ground-truth`.
"""


def main() -> None:
    import json
    import time

    import torch

    from hf_fwdattr import AttributionConfig, AttributionSubspace, simulate_responses
    from hf_fwdattr.estimator.gradients import query_gradients
    from hf_fwdattr.evaluation.metrics import lds

    from benchmarks.fidelity.lm import ground_truth, setup

    made = setup(1)
    truth = ground_truth(made)
    model, task, documents = made["model"], made["task"], made["document_set"]
    train = list(documents.examples)
    out = {}
    with AttributionSubspace.build(model, "peft") as subspace:
        q = query_gradients(subspace, task, made["queries"], dtype=torch.float64)
        for name, config in [("defaults (auto: low-rank 256)", AttributionConfig()), ("EK-FAC, K = inf", AttributionConfig(eigenbasis="kronecker")),
                             ("low-rank 1024", AttributionConfig(eigenbasis="low_rank", curvature_rank=1024))]:
            t = time.process_time()
            r = simulate_responses(subspace, task, documents, train, config)
            s = (q @ r.responses.double().T).numpy()
            fit = lds(s, truth["subsets"].numpy(), truth["outputs"].numpy().mean(0))
            out[name] = {"lds": fit.mean, "stderr": fit.stderr, "cpu_s": time.process_time() - t}
            print(name, out[name], flush=True)
    print(json.dumps({"dim": subspace.dim, **out}))


if __name__ == "__main__":
    main()
