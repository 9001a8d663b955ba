"""The language-model fact benchmark (`hf-fwdattr evaluate`'s fact model) on a given corpus seed, with LDS ground truth.

    python -m benchmarks.fidelity.lm --seed 1 --ground-truth     # build the model and its retrainings (resumable)

Seed 0 chose the estimator's settings; seed 1 reports them. Each seed has its own cache folder, model and ground truth.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional, Sequence

CACHE = Path(__file__).resolve().parent / "cache"


def setup(seed: int) -> dict:
    """The fact model of corpus `seed` (built once under cache/lm-seed<seed>/) and what the benchmark needs of it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_fwdattr import CausalLMTask, InfluenceArtifact
    from hf_fwdattr.evaluation.fact_data import query_examples, tokenized_documents
    from hf_fwdattr.evaluation.fact_tracing import default_fact_model

    model_dir, influence_dir, data = default_fact_model(CACHE / f"lm-seed{seed}" / "fact_model", seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    artifact = InfluenceArtifact.from_pretrained(influence_dir)
    document_set = tokenized_documents(data, tokenizer, artifact)
    documents = [{"document_id": d, "input_ids": e["input_ids"]} for d, e in zip(document_set.document_ids, document_set.examples)]
    return {
        "seed": seed, "model_dir": Path(model_dir), "data": data, "tokenizer": tokenizer,
        "model": AutoModelForCausalLM.from_pretrained(model_dir).eval(), "artifact": artifact, "document_set": document_set,
        "documents": documents, "queries": query_examples(data, tokenizer), "task": CausalLMTask(pad_token_id=tokenizer.pad_token_id),
    }


def ground_truth(setup: dict, n_subsets: int = 64, seeds: int = 2) -> dict:
    """LDS ground truth: the fine-tune retrained on `n_subsets` random halves × `seeds` (benchmarks.lm.ground_truth)."""
    from benchmarks.lm.ground_truth import generate

    return generate(f"fidelity-lm-seed{setup['seed']}", setup["model_dir"], setup["documents"], setup["queries"], setup["task"],
                    n_subsets, seeds)


def summary(scores: dict, reference: str = "exact") -> dict:
    """Per-query Spearman of every contender against `reference` (mean, min)."""
    from hf_fwdattr.stats import spearman_rows

    out = {}
    for name, values in scores.items():
        rho = spearman_rows(scores[reference], values)
        out[name] = {"spearman_mean": float(rho.nanmean()), "spearman_min": float(rho.min())}
    return out


def main() -> None:
    import json

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--ground-truth", action="store_true", help="Build the model and its LDS ground truth (cached).")
    parser.add_argument("--contenders", action="store_true", help="Score every contender and print their agreement with exact influence.")
    parser.add_argument("--modules", nargs="*", help="Restrict the subspace to the adapter's A/B of these projections (e.g. q_proj v_proj).")
    parser.add_argument("--no-defaults", action="store_true", help="Leave out the library defaults (whatever 'auto' picks).")
    parser.add_argument("--defaults-only", action="store_true",
                        help="With --contenders: score the library defaults only, into the scores saved by an earlier run (after a change of defaults).")
    args = parser.parse_args()
    made = setup(args.seed)
    if args.ground_truth:
        ground_truth(made)
    if args.contenders:
        from safetensors.torch import load_file, save_file

        name = "-".join(args.modules) if args.modules else "adapter"
        path = CACHE / f"lm-seed{args.seed}" / f"scores-{name}.safetensors"
        result = contenders(made, modules=args.modules, defaults=not args.no_defaults, only_defaults=args.defaults_only)
        if args.defaults_only:
            from hf_fwdattr.evaluation.metrics import lds

            truth = ground_truth(made)
            fit = lds(result["scores"]["defaults"].numpy(), truth["subsets"].numpy(), truth["outputs"].numpy().mean(0))
            print(json.dumps({"defaults_lds": fit.mean, "stderr": fit.stderr}))
            result["scores"] = {**(load_file(str(path)) if path.is_file() else {}), **result["scores"]}
        save_file({k: v.contiguous() for k, v in result["scores"].items()}, str(path), metadata={"format": "pt"})
        print(json.dumps({"dim": result["dim"], "seconds": result["seconds"], "cpu_seconds": result["cpu_seconds"],
                          "agreement": summary(result["scores"]), "spectrum": result["spectrum"]}, indent=1))



def _counting_padding(pad_token_id: int):
    from hf_fwdattr import CausalLMTask

    class CountingPadding(CausalLMTask):
        """CausalLMTask whose Kronecker factors count padded positions, as they did before issue 15."""

        def position_mask(self, batch):
            return None

    return CountingPadding(pad_token_id)


def contenders(setup: dict, damping: float = 1e-3, horizon: int = 3000, samples=(16, 256), log=print,
               modules: Optional[Sequence[str]] = None, defaults: bool = True, only_defaults: bool = False) -> dict:
    """Scores [Q, N] of every contender in the fact model's LoRA subspace, with the wall and CPU time each took.

    exact: −∇f_qᵀ(H + λI)⁻¹g_b with H the exact full-batch GGN over the training documents (K → ∞);
    exact_K: the closed form at horizon K in that exact eigenbasis; kronecker: the closed form in the EK-FAC
    eigenbasis; sketched_S: the closed form in the eigenbasis of the GGN sketched with S passes per batch;
    defaults: `simulate_responses` with `AttributionConfig()` (whatever eigenbasis 'auto' picks), alone with `only_defaults`.
    """
    import time

    import torch

    from hf_fwdattr import AttributionConfig, AttributionSubspace, simulate_responses
    from hf_fwdattr.estimator.eigenbasis import ExplicitEigenbasis, KroneckerEigenbasis, horizon_filter
    from hf_fwdattr.estimator.ggn import gauss_newton
    from hf_fwdattr.estimator.gradients import document_gradients, query_gradients

    model, task, documents, queries = setup["model"], setup["task"], setup["document_set"], setup["queries"]
    train = list(documents.examples)
    out = {"scores": {}, "seconds": {}, "cpu_seconds": {}}

    def timed(name, fn):
        start, cpu = time.perf_counter(), time.process_time()
        value = fn()
        out["seconds"][name], out["cpu_seconds"][name] = time.perf_counter() - start, time.process_time() - cpu
        log(f"{name}: {out['seconds'][name]:.1f}s wall, {out['cpu_seconds'][name]:.1f}s CPU")
        return value

    if modules is None:
        built = AttributionSubspace.build(model, "peft")
    else:  # the adapter's A and B of the named projections only: a smaller subspace of the same fine-tune
        from hf_fwdattr.estimator.subspace import canonical_name

        names = [canonical_name(n) for n, _ in model.named_parameters() if "lora_" in n and any(f".{m}." in n for m in modules)]
        built = AttributionSubspace.build(model, "trainable", parameter_names=names)
    with built as subspace:
        out["dim"] = subspace.dim
        query = query_gradients(subspace, task, queries, dtype=torch.float64)

        def epoch():  # one pass of forward + backward over the training documents, batches of 16: the unit of build cost
            adapter = [p for n, p in model.named_parameters() if "lora_" in n]
            flags = [p.requires_grad for p in adapter]
            for parameter in adapter:
                parameter.requires_grad_(True)
            with torch.enable_grad():
                for lo in range(0, len(train), 16):
                    task.train_loss(model, task.collate(train[lo : lo + 16])).sum().backward()
            for parameter, flag in zip(adapter, flags):
                parameter.requires_grad_(flag)
                parameter.grad = None

        timed("epoch", epoch)
        if only_defaults:
            result = timed("defaults", lambda: simulate_responses(subspace, task, documents, train, AttributionConfig()))
            out["scores"]["defaults"], out["spectrum"] = query @ result.responses.double().T, []
            return out
        gradients = timed("document_gradients", lambda: document_gradients(subspace, task, documents, dtype=torch.float64))

        def closed(basis, k):
            step = 1.0 / (basis.max_eigenvalue + damping)
            return query @ basis.filter(gradients, horizon_filter(step, k, damping)).T

        made = timed("exact_ggn", lambda: gauss_newton(subspace, task, train, 16))
        exact = timed("exact_eigh", lambda: ExplicitEigenbasis.from_gauss_newton(made))
        out["spectrum"] = exact.eigenvalues.double().flip(0)[:: max(1, len(exact.eigenvalues) // 64)].tolist()
        out["scores"]["exact"] = closed(exact, None)
        out["scores"][f"exact_K{horizon}"] = closed(exact, horizon)
        kronecker = timed("kronecker", lambda: KroneckerEigenbasis.estimate(subspace, task, train, 16, dtype=torch.float64))
        out["scores"]["kronecker"] = closed(kronecker, horizon)
        unmasked = KroneckerEigenbasis.estimate(subspace, _counting_padding(task.pad_token_id), train, 16, dtype=torch.float64)
        out["scores"]["kronecker_counting_padding"] = closed(unmasked, horizon)  # the factors before issue 15
        for s in samples:
            sketched = timed(f"sketched_{s}", lambda: ExplicitEigenbasis.from_gauss_newton(gauss_newton(subspace, task, train, 16, samples=s)))
            out["scores"][f"sketched_{s}"] = closed(sketched, horizon)
        if defaults:
            result = timed("defaults", lambda: simulate_responses(subspace, task, documents, train, AttributionConfig()))
            out["scores"]["defaults"] = query @ result.responses.double().T
    return out


if __name__ == "__main__":
    main()
