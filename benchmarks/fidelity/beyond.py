"""Beyond the explicit size: the closed form against exact damped influence by conjugate gradients, p ≥ 10⁵.

    OMP_NUM_THREADS=1 python -m benchmarks.fidelity.beyond --seed 1     # the report (seed 0 chose the settings)

The setting (per seed): a tiny Llama (hidden 128, 2 layers, vocabulary 512) pretrained one epoch on 8,000 documents
of the scale benchmark's synthetic fact corpus (cached), then a fresh LoRA (r = 32, alpha 32) on every linear layer
(q, k, v, o, gate, up, down: p = 131,072) trained one epoch (AdamW, batch 32) on N = 128 documents of another
corpus; that epoch is the unit of cost. Every build, the epoch included, runs in this process on one thread.

Reference: −∇f_qᵀ(G + λI)⁻¹g_b with G the GGN of the mean training loss over the closed form's curvature examples
(all N), λ = the default damping, solved by conjugate gradients for the 16 queries at once with exact GGN-vector
products (`CurvatureOperator`, JVP and VJP), preconditioned by the defaults' own low-rank basis (which changes how fast
CG converges, not what it converges to), to a relative residual of `--tolerance` (0.02); scored against 32 documents
(the 16 whose facts the queries ask, 16 others); every 5th iterate is kept, to see how many iterations the ranking
needs. Other modes: `--spectrum` (eigenvalue counts above multiples of λ), `--cg-iterates N` / `--cg-solver N` (the
`conjugate_gradients` solver on the scored documents: tuning, then as a user runs it), `--own-curvature`, `--hybrid`,
`--ranks` (tuning experiments). Contenders: the defaults (`AttributionConfig()`, whatever 'auto' picks),
EK-FAC (eigenbasis='kronecker'), and the low-rank eigenbasis at several ranks, power passes and complements.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import time
from pathlib import Path
from typing import Callable

import torch

CACHE = Path(__file__).resolve().parent / "cache"
N_TRAIN, N_PRETRAIN, N_QUERIES, N_OTHER_DOCUMENTS = 128, 8_000, 16, 16
HIDDEN, LAYERS, LORA_RANK = 128, 2, 32
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def setting(seed: int) -> dict:
    """The model of `seed` (base cached, adapter trained here: its epoch is timed), documents, queries."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    from benchmarks.scale.corpus import make_corpus, query_examples, tokenize, train_corpus_tokenizer
    from benchmarks.scale.model import TASK, train_epoch
    from hf_fwdattr import DocumentSet
    from hf_fwdattr.demo.toy import tiny_llama

    directory = CACHE / f"beyond-seed{seed}"
    tokenizer = train_corpus_tokenizer(seed)
    if (directory / "base" / "config.json").is_file():
        base = LlamaForCausalLM.from_pretrained(directory / "base").eval()
    else:
        base = tiny_llama(vocab_size=len(tokenizer), hidden_size=HIDDEN, layers=LAYERS, heads=4, max_position_embeddings=64, seed=seed)
        pretraining = [{"input_ids": ids} for ids in tokenize(tokenizer, make_corpus(N_PRETRAIN, 0, seed=200 + seed).texts)]
        train_epoch(base, pretraining, list(base.parameters()), lr=3e-3, seed=seed)
        base.save_pretrained(directory / "base")
    corpus = make_corpus(N_TRAIN, N_QUERIES, seed=10 + seed)
    train = [{"input_ids": ids} for ids in tokenize(tokenizer, corpus.texts)]
    torch.manual_seed(seed)
    config = LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, target_modules=TARGETS, lora_dropout=0.0)
    model = get_peft_model(copy.deepcopy(base), config)
    epoch = train_epoch(model, train, [p for p in model.parameters() if p.requires_grad], lr=1e-3, seed=seed)
    model.eval()
    # the documents whose facts the queries ask (make_corpus's own draw), then others
    asked = random.Random(10 + seed + 1).sample(range(min(N_TRAIN, 1_000)), N_QUERIES)
    others = [i for i in random.Random(seed).sample(range(N_TRAIN), 4 * N_OTHER_DOCUMENTS) if i not in asked][:N_OTHER_DOCUMENTS]
    picked = asked + others
    documents = DocumentSet.from_examples([train[i] for i in picked], [f"doc-{i:04d}" for i in picked])
    return {"model": model, "task": TASK, "train": train, "documents": documents, "queries": query_examples(tokenizer, corpus),
            "epoch": epoch}


def ggn_operator(subspace, task, examples: list, batch_size: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """X ↦ G X for rows X, G the GGN of the mean loss over `examples` (exact JVP/VJP products, batch by batch)."""
    from hf_fwdattr import CurvatureOperator

    batches = [examples[lo : lo + batch_size] for lo in range(0, len(examples), batch_size)]
    operators = [(CurvatureOperator(subspace, task, task.collate(b), "ggn", torch.float64), len(b)) for b in batches]

    def apply(rows: torch.Tensor) -> torch.Tensor:
        return sum(op.matvec(rows) * (count / len(examples)) for op, count in operators)

    return apply


def probe(seed: int) -> None:
    """Costs of the pieces on this machine (one thread): epoch, one GGN product pass for 16 vectors, one low-rank pass."""
    from hf_fwdattr import AttributionSubspace
    from hf_fwdattr.estimator.ggn import exact_passes
    from hf_fwdattr.estimator.lowrank import ggn_products

    made = setting(seed)
    print("epoch", made["epoch"])
    with AttributionSubspace.build(made["model"], "peft") as subspace:
        print("p", subspace.dim, "exact passes", exact_passes(subspace, made["task"], made["train"], 32))
        start, cpu = time.perf_counter(), time.process_time()
        apply = ggn_operator(subspace, made["task"], made["train"], 32)
        apply(torch.randn(16, subspace.dim, dtype=torch.float64))
        print("GGN product pass (16 vectors)", time.perf_counter() - start, time.process_time() - cpu)
        for width in (74, 281):
            start, cpu = time.perf_counter(), time.process_time()
            ggn_products(subspace, made["task"], made["train"], 32, torch.randn(subspace.dim, width, dtype=torch.float64), samples=8)
            print(f"low-rank pass, width {width}", time.perf_counter() - start, time.process_time() - cpu)


def run(seed: int, extra: bool = False, tolerance: float = 0.02, log=print) -> dict:
    """Every contender's scores [Q, D], build seconds (wall, CPU) and per-query Spearman against the CG reference."""
    from hf_fwdattr import AttributionConfig, AttributionSubspace, simulate_responses
    from hf_fwdattr.estimator.conjugate import conjugate_gradients as solve
    from hf_fwdattr.estimator.eigenbasis import ExplicitEigenbasis, KroneckerEigenbasis, estimate_eigenbasis, horizon_filter
    from hf_fwdattr.estimator.gradients import document_gradients, query_gradients
    from hf_fwdattr.estimator.lowrank import low_rank_ggn
    made = setting(seed)
    task, train, documents = made["task"], made["train"], made["documents"]
    defaults = AttributionConfig()
    damping, sketch = defaults.curvature_shift, defaults.curvature_sketch
    out = {"seed": seed, "epoch": made["epoch"], "seconds": {}, "cpu_seconds": {}, "scores": {}, "spectrum": {}, "agreement": {}}
    log(f"epoch: {made['epoch']}")

    def timed(name, fn):
        start, cpu = time.perf_counter(), time.process_time()
        value = fn()
        out["seconds"][name], out["cpu_seconds"][name] = time.perf_counter() - start, time.process_time() - cpu
        log(f"{name}: {out['seconds'][name]:.1f}s wall, {out['cpu_seconds'][name]:.1f}s CPU "
            f"({out['cpu_seconds'][name] / made['epoch']['epoch_cpu_seconds']:.1f} epochs)")
        return value

    with AttributionSubspace.build(made["model"], "peft") as subspace:
        out["dim"] = subspace.dim
        gradients = document_gradients(subspace, task, documents, dtype=torch.float64)
        queries = query_gradients(subspace, task, made["queries"], dtype=torch.float64)

        def scores(basis) -> torch.Tensor:
            return queries @ basis.filter(gradients, horizon_filter(0.0, None, damping)).T

        def low_rank(name: str, rank: int, passes: int, samples: int):
            low = timed(name, lambda: low_rank_ggn(subspace, task, train, defaults.batch_size, rank, passes, "mean", samples, seed))
            out["spectrum"][name] = {"top": low.eigenvalues[:8].tolist(), "last": float(low.eigenvalues[-1]),
                                     "trace": low.trace, "complement": low.complement}
            log(f"{name}: spectrum {out['spectrum'][name]}")
            out["scores"][f"{name}_mean"] = scores(ExplicitEigenbasis.from_low_rank(low))
            out["scores"][f"{name}_zero"] = scores(ExplicitEigenbasis(low.eigenvalues, low.eigenvectors, complement=0.0))

        # the defaults as a user runs them (AttributionConfig(), 'auto'), in two timed steps: the eigenbasis, then the rest
        basis = timed("defaults_eigenbasis", lambda: estimate_eigenbasis(subspace, task, train, defaults))
        result = timed("defaults_simulation", lambda: simulate_responses(subspace, task, documents, train, defaults, eigenbasis=basis))
        out["defaults_basis"] = {"type": type(basis).__name__, "rank": int(getattr(basis, "eigenvectors", torch.zeros(0, 0)).shape[1]),
                                 "complement": getattr(basis, "complement", None)}

        out["scores"]["defaults"] = queries @ result.responses.double().T
        if isinstance(basis, ExplicitEigenbasis):
            out["scores"]["defaults_complement_zero"] = scores(ExplicitEigenbasis(basis.eigenvalues, basis.eigenvectors, complement=0.0))
        kronecker = timed("kronecker", lambda: KroneckerEigenbasis.estimate(subspace, task, train, defaults.batch_size, dtype=torch.float64))
        out["scores"]["kronecker"] = scores(kronecker)
        low_rank("low_rank_64_q2", 64, 2, sketch)
        low_rank("low_rank_256_q0", 256, 0, sketch)
        if extra:
            low_rank("low_rank_256_q2_sketch32", 256, 2, 4 * sketch)
        save(out)

        # the reference: conjugate gradients with exact GGN-vector products, preconditioned by the defaults' basis when it is
        # a low-rank one (a preconditioner changes how fast CG converges, not what it converges to; the residual is exact).
        # Every 5th iterate is scored and saved, so that the agreement of each contender can be followed as CG converges.
        precondition = ((lambda rows: basis.filter(rows, lambda h: 1.0 / (h + damping))) if isinstance(basis, ExplicitEigenbasis)
                        else (lambda rows: rows))
        apply = ggn_operator(subspace, task, train, defaults.batch_size)

        def snapshot(iteration, x, residuals):
            worst = float(residuals.max())
            log(f"  CG iteration {iteration}: largest relative residual {worst:.2e}")
            if iteration % 5:
                return
            if "reference" in out["scores"]:  # the iterate 5 iterations earlier: how much the reference still moves
                out["scores"]["reference_5_iterations_earlier"] = out["scores"]["reference"]
            out["scores"]["reference"] = -x @ gradients.T
            out["scores"][f"cg_iterate_{iteration:03d}"] = out["scores"]["reference"].clone()
            out["cg"] = {"iterations": iteration, "residual": worst}
            agreement(out, log)
            save(out)

        solved = timed("reference_cg", lambda: solve(apply, queries, damping, tolerance, 300, precondition, snapshot))
        solution, iterations, residual = solved.solutions, solved.iterations, float(solved.relative_residuals.max())
        out["cg"] = {"iterations": iterations, "true_residual": residual}  # recomputed with one more product
        log(f"CG: {out['cg']}")
        out["scores"]["reference"] = -solution @ gradients.T
        agreement(out, log)
        # how many exact iterations the ranking needs: each kept iterate against the converged reference
        out["cg_iterates"] = {name: out["agreement"].pop(name) for name in sorted(out["agreement"]) if name.startswith("cg_iterate_")}
    return out


def agreement(out: dict, log=print) -> None:
    """Per-query Spearman of every contender's scores against the reference (mean, min), into out["agreement"]."""
    from hf_fwdattr.stats import spearman_rows

    for name, values in out["scores"].items():
        rho = spearman_rows(out["scores"]["reference"], values)
        out["agreement"][name] = {"spearman_mean": float(rho.nanmean()), "spearman_min": float(rho.min())}
    log(f"  agreement at CG {out['cg']}: " + ", ".join(f"{k} {v['spearman_mean']:.3f}" for k, v in out["agreement"].items()
                                                       if not k.startswith("cg_iterate_")))


def save(out: dict) -> None:
    """The scores (safetensors) and everything else (JSON) under cache/beyond-seed<seed>/."""
    from safetensors.torch import save_file

    path = CACHE / f"beyond-seed{out['seed']}"
    save_file({k: v.contiguous() for k, v in out["scores"].items()}, str(path / "scores.safetensors"), metadata={"format": "pt"})
    rest = {k: v for k, v in out.items() if k != "scores"}
    rest["build_epochs"] = {k: v / out["epoch"]["epoch_cpu_seconds"] for k, v in out["cpu_seconds"].items()}
    (path / "result.json").write_text(json.dumps(rest, indent=1, sort_keys=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--probe", action="store_true", help="Time the pieces only.")
    parser.add_argument("--extra", action="store_true", help="Also a 4x larger sketch (tuning).")
    parser.add_argument("--hybrid", action="store_true", help="Score the low-rank + EK-FAC hybrid against a saved reference (tuning).")
    parser.add_argument("--ranks", type=int, nargs="*", help="Score the low-rank basis at these ranks against a saved reference (tuning).")
    parser.add_argument("--sketch", type=int, default=8, help="With --ranks: sketched passes per batch.")
    parser.add_argument("--tolerance", type=float, default=0.02, help="CG stops at this largest relative residual.")
    parser.add_argument("--cg-iterates", type=int, metavar="N",
                        help="Tuning: CG on the scored documents, preconditioned by the defaults' basis; every iterate up to N scored "
                             "against the saved reference.")
    parser.add_argument("--cg-solver", type=int, metavar="N",
                        help="The conjugate_gradients solver with cg_iterations=N as a user runs it, timed, scored against the saved reference.")
    parser.add_argument("--spectrum", action="store_true", help="Count the GGN's eigenvalues above multiples of λ (Lanczos quadrature).")
    parser.add_argument("--own-curvature", action="store_true",
                        help="Score the low-rank basis + each document's own GGN in its complement against a saved reference (tuning).")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.probe:
        probe(args.seed)
        return
    if args.hybrid:
        hybrid(args.seed)
        return
    if args.spectrum:
        spectrum(args.seed)
        return
    if args.cg_iterates or args.cg_solver:
        conjugate_gradient_documents(args.seed, args.cg_iterates or args.cg_solver, snapshots=bool(args.cg_iterates))
        return
    if args.own_curvature:
        own_curvature(args.seed)
        return
    if args.ranks:
        more_ranks(args.seed, args.ranks, args.sketch)
        return
    result = run(args.seed, args.extra, args.tolerance)
    save(result)
    print(json.dumps({k: v for k, v in result.items() if k != "scores"}, indent=1, sort_keys=True))


def hybrid(seed: int, log=print) -> dict:
    """Tuning experiment: the defaults' low-rank basis with EK-FAC in its complement, u = V f(h) Vᵀ g + P⊥ K_f(P⊥ g),
    scored against the saved reference of `seed` (a run of `run` first)."""
    from safetensors.torch import load_file

    from hf_fwdattr import AttributionConfig, AttributionSubspace
    from hf_fwdattr.estimator.eigenbasis import KroneckerEigenbasis, estimate_eigenbasis, horizon_filter
    from hf_fwdattr.estimator.gradients import document_gradients, query_gradients
    from hf_fwdattr.stats import spearman_rows

    saved = load_file(CACHE / f"beyond-seed{seed}" / "scores.safetensors")
    made = setting(seed)
    task, train, defaults = made["task"], made["train"], AttributionConfig()
    factor = horizon_filter(0.0, None, defaults.curvature_shift)
    with AttributionSubspace.build(made["model"], "peft") as subspace:
        gradients = document_gradients(subspace, task, made["documents"], dtype=torch.float64)
        queries = query_gradients(subspace, task, made["queries"], dtype=torch.float64)
        basis = estimate_eigenbasis(subspace, task, train, defaults)
        kronecker = KroneckerEigenbasis.estimate(subspace, task, train, defaults.batch_size, dtype=torch.float64)
        vectors = basis.eigenvectors.double()
        inside = gradients @ vectors
        rest = gradients - inside @ vectors.T
        top = (inside * factor(basis.eigenvalues.double())) @ vectors.T
        filtered = kronecker.filter(rest, factor)
        scores = {"defaults_again": queries @ basis.filter(gradients, factor).T,
                  "hybrid": queries @ (top + filtered - (filtered @ vectors) @ vectors.T).T}
    out = {}
    for name, values in scores.items():
        rho = spearman_rows(saved["reference"], values)
        out[name] = {"spearman_mean": float(rho.nanmean()), "spearman_min": float(rho.min())}
    out["saved_defaults"] = float(spearman_rows(saved["reference"], saved["defaults"]).nanmean())
    log(json.dumps(out))
    return out


def more_ranks(seed: int, ranks: list[int], samples: int, log=print) -> dict:
    """Tuning experiment: the low-rank basis (2 power passes, mean complement) at `ranks` with `samples` sketched passes per
    batch, scored against the saved reference of `seed`, with its build time."""
    from safetensors.torch import load_file

    from hf_fwdattr import AttributionConfig, AttributionSubspace
    from hf_fwdattr.estimator.eigenbasis import ExplicitEigenbasis, horizon_filter
    from hf_fwdattr.estimator.gradients import document_gradients, query_gradients
    from hf_fwdattr.estimator.lowrank import low_rank_ggn
    from hf_fwdattr.stats import spearman_rows

    saved = load_file(CACHE / f"beyond-seed{seed}" / "scores.safetensors")
    made = setting(seed)
    task, train, defaults = made["task"], made["train"], AttributionConfig()
    factor = horizon_filter(0.0, None, defaults.curvature_shift)
    out = {}
    with AttributionSubspace.build(made["model"], "peft") as subspace:
        gradients = document_gradients(subspace, task, made["documents"], dtype=torch.float64)
        queries = query_gradients(subspace, task, made["queries"], dtype=torch.float64)
        for rank in ranks:
            cpu = time.process_time()
            low = low_rank_ggn(subspace, task, train, defaults.batch_size, rank, 2, "mean", samples, seed)
            cpu = time.process_time() - cpu
            rho = spearman_rows(saved["reference"], queries @ ExplicitEigenbasis.from_low_rank(low).filter(gradients, factor).T)
            out[f"low_rank_{rank}_q2_sketch{samples}"] = {"spearman_mean": float(rho.nanmean()), "spearman_min": float(rho.min()),
                                                          "cpu_seconds": cpu, "epochs": cpu / made["epoch"]["epoch_cpu_seconds"],
                                                          "last": float(low.eigenvalues[-1]), "complement": low.complement}
            log(json.dumps(out))
    return out



def conjugate_gradient_documents(seed: int, iterations: int, snapshots: bool, log=print) -> dict:
    """The `conjugate_gradients` solver on the scored documents against the saved reference of `seed`. `snapshots`
    (tuning): `estimator.conjugate.conjugate_gradients` as the solver calls it (the defaults' basis as preconditioner,
    exact GGN products), every iterate up to `iterations` scored; else the solver itself with cg_iterations =
    `iterations`, as a user runs it (`AttributionConfig(solver="conjugate_gradients")`), timed from the eigenbasis on.
    Saved as cache/beyond-seed<seed>/cg_<mode>.json."""
    from safetensors.torch import load_file

    from hf_fwdattr import AttributionConfig, AttributionSubspace, simulate_responses
    from hf_fwdattr.estimator.conjugate import conjugate_gradients as solve
    from hf_fwdattr.estimator.eigenbasis import estimate_eigenbasis, horizon_filter
    from hf_fwdattr.estimator.gradients import document_gradients, query_gradients
    from hf_fwdattr.stats import spearman_rows

    saved = load_file(CACHE / f"beyond-seed{seed}" / "scores.safetensors")
    made = setting(seed)
    task, train, documents = made["task"], made["train"], made["documents"]
    config = AttributionConfig(solver="conjugate_gradients", cg_iterations=iterations)
    epoch = made["epoch"]["epoch_cpu_seconds"]
    out = {"seed": seed, "iterations": iterations, "epoch": made["epoch"], "documents": len(documents), "spearman": {}}

    def agree(scores: torch.Tensor) -> dict:
        rho = spearman_rows(saved["reference"], scores)
        return {"spearman_mean": float(rho.nanmean()), "spearman_min": float(rho.min())}

    with AttributionSubspace.build(made["model"], "peft") as subspace:
        queries = query_gradients(subspace, task, made["queries"], dtype=torch.float64)
        cpu = time.process_time()
        basis = estimate_eigenbasis(subspace, task, train, config)
        out["eigenbasis_epochs"] = (time.process_time() - cpu) / epoch
        if snapshots:
            gradients = document_gradients(subspace, task, documents, dtype=torch.float64)
            apply = ggn_operator(subspace, task, train, config.batch_size)
            damping = config.curvature_shift

            def precondition(rows):
                return -basis.filter(rows, horizon_filter(0.0, None, damping))

            def seen(iteration, solution, residuals):
                out["spearman"][iteration] = agree(-(queries @ solution.T))
                log(f"iteration {iteration}: {out['spearman'][iteration]}")

            out["spearman"][0] = agree(queries @ basis.filter(gradients, horizon_filter(0.0, None, damping)).T)
            cpu = time.process_time()
            solve(apply, gradients, damping, 1e-6, iterations, precondition, seen, exact_residuals=False)
            out["cg_epochs"] = (time.process_time() - cpu) / epoch
        else:
            cpu = time.process_time()
            result = simulate_responses(subspace, task, documents, train, config, eigenbasis=basis)
            out["solver_epochs"] = (time.process_time() - cpu) / epoch
            out["solver_epochs_per_document"] = out["solver_epochs"] / len(documents)
            out["spearman"][iterations] = agree(queries @ result.responses.double().T)
    (CACHE / f"beyond-seed{seed}" / f"cg_{'iterates' if snapshots else 'solver'}.json").write_text(json.dumps(out, indent=1))
    log(json.dumps(out, indent=1))
    return out


def spectrum(seed: int, probes: int = 4, steps: int = 80, log=print) -> dict:
    """How many of the GGN's eigenvalues lie above t·λ, and the trace they hold, by stochastic Lanczos quadrature: `steps`
    Lanczos steps (exact GGN-vector products, full reorthogonalisation) from each of `probes` random unit vectors; the
    Ritz values θ_j with weights w_j² (first components of the Ritz vectors) give #{h > t} ≈ p · mean Σ_j w_j² [θ_j > t].
    Saved as cache/beyond-seed<seed>/spectrum.json."""
    from hf_fwdattr import AttributionConfig, AttributionSubspace

    made = setting(seed)
    damping = AttributionConfig().curvature_shift
    with AttributionSubspace.build(made["model"], "peft") as subspace:
        p = subspace.dim
        apply = ggn_operator(subspace, made["task"], made["train"], AttributionConfig().batch_size)
        vector = torch.randn(probes, p, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        vector /= vector.norm(dim=1, keepdim=True)
        basis, alphas, betas = [vector], [], []
        previous, beta = torch.zeros_like(vector), torch.zeros(probes, dtype=torch.float64)
        cpu = time.process_time()
        for _ in range(steps):
            product = apply(vector)
            alpha = (product * vector).sum(1)
            product -= alpha[:, None] * vector + beta[:, None] * previous
            stacked = torch.stack(basis, 1)
            product -= torch.einsum("bj,bjp->bp", torch.einsum("bjp,bp->bj", stacked, product), stacked)
            beta = product.norm(dim=1)
            alphas.append(alpha)
            betas.append(beta)
            previous, vector = vector, product / beta[:, None]
            basis.append(vector)
        cpu = time.process_time() - cpu
    alphas, betas = torch.stack(alphas, 1), torch.stack(betas, 1)[:, :-1]
    multiples = (0.1, 1, 3, 10, 30, 100, 300, 1000)
    counts, traces = torch.zeros(len(multiples), dtype=torch.float64), torch.zeros(len(multiples), dtype=torch.float64)
    trace = 0.0
    for probe in range(probes):
        ritz, vectors = torch.linalg.eigh(torch.diag(alphas[probe]) + torch.diag(betas[probe], 1) + torch.diag(betas[probe], -1))
        weights = vectors[0] ** 2
        trace += p * float((weights * ritz).sum()) / probes
        for i, multiple in enumerate(multiples):
            above = ritz > multiple * damping
            counts[i] += p * weights[above].sum() / probes
            traces[i] += p * (weights * ritz)[above].sum() / probes
    out = {"seed": seed, "p": p, "damping": damping, "probes": probes, "steps": steps, "cpu_seconds": cpu,
           "epochs": cpu / made["epoch"]["epoch_cpu_seconds"], "trace": trace,
           "above": {f"{m:g}": {"eigenvalues": float(c), "trace": float(t)} for m, c, t in zip(multiples, counts, traces)}}
    (CACHE / f"beyond-seed{seed}" / "spectrum.json").write_text(json.dumps(out, indent=1))
    log(json.dumps(out, indent=1))
    return out


def own_curvature(seed: int, iterations: int = 40, log=print) -> dict:
    """Tuning experiment: the defaults' low-rank basis for its eigendirections, and in their complement each document's
    own GGN (weight 1/N) plus the complement eigenvalue, solved per document by CG with exact products,
    u_b = V f(h) Vᵀ g_b − (P⊥(G_b/N + c)P⊥ + λ)⁻¹ P⊥ g_b; scored against the saved reference of `seed`."""
    from safetensors.torch import load_file

    from hf_fwdattr import AttributionConfig, AttributionSubspace, CurvatureOperator
    from hf_fwdattr.estimator.conjugate import conjugate_gradients as solve
    from hf_fwdattr.estimator.eigenbasis import estimate_eigenbasis, horizon_filter
    from hf_fwdattr.estimator.gradients import document_gradients, query_gradients
    from hf_fwdattr.stats import spearman_rows

    saved = load_file(CACHE / f"beyond-seed{seed}" / "scores.safetensors")
    made = setting(seed)
    task, train, defaults, documents = made["task"], made["train"], AttributionConfig(), made["documents"]
    damping = defaults.curvature_shift
    factor = horizon_filter(0.0, None, damping)
    out = {}
    with AttributionSubspace.build(made["model"], "peft") as subspace:
        gradients = document_gradients(subspace, task, documents, dtype=torch.float64)
        queries = query_gradients(subspace, task, made["queries"], dtype=torch.float64)
        basis = estimate_eigenbasis(subspace, task, train, defaults)
        vectors = basis.eigenvectors.double()

        def outside(rows):
            return rows - (rows @ vectors) @ vectors.T

        for name, rest in (("own_curvature_mean", float(basis.complement)), ("own_curvature_zero", 0.0)):
            responses, cpu = [], time.process_time()
            for row, example in enumerate(documents.examples):  # one example per document here
                operator = CurvatureOperator(subspace, task, task.collate([example]), "ggn", torch.float64)
                gradient = gradients[row : row + 1]
                top = ((gradient @ vectors) * factor(basis.eigenvalues.double())) @ vectors.T
                solution = solve(lambda rows: outside(operator.matvec(outside(rows)) / len(train)) + rest * outside(rows),
                                 outside(gradient), damping, 1e-3, iterations).solutions
                responses.append(top - solution)
            rho = spearman_rows(saved["reference"], queries @ torch.cat(responses).T)
            out[name] = {"spearman_mean": float(rho.nanmean()), "spearman_min": float(rho.min()), "cpu_seconds": time.process_time() - cpu}
            log(json.dumps(out))
    out["saved_defaults"] = float(spearman_rows(saved["reference"], saved["defaults"]).nanmean())
    return out


if __name__ == "__main__":
    main()
