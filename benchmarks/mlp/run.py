"""MLP benchmark: LDS and LOO of the forward-only estimator against TRAK, exact influence and gradient similarity.

    .venv/bin/python -m benchmarks.mlp.run                     # both settings; ground truth cached after the first run
    .venv/bin/python -m benchmarks.mlp.run --settings digits   # one setting

Writes benchmarks/mlp/results/{results.json, table.md, lds_vs_horizon.png, lds_vs_cost.png}.
Hyper-parameters are chosen on the validation queries (by LDS) and every number reported is on the
held-out test queries.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from hf_fwdattr import AttributionConfig, AttributionSubspace, ForwardReadout, SimulationDivergedError, query_gradients
from hf_fwdattr.evaluation.metrics import lds, leave_one_out, split_half_ceiling

from . import costs
from .ensemble import module_from, train_ensemble
from .ground_truth import CACHE, lds_outputs, load_or_generate, loo_effects_per_seed
from .methods import TASK, EigenScorer, TrakRunner, examples, explicit_curvatures, filter_factors, gradient_dot, gradients, run_ours
from .settings import SETTINGS, load

RESULTS = Path(__file__).resolve().parent / "results"
HORIZONS = (1, 5, 20, 100)
STEP_FRACTIONS = (0.25, 0.5, 1.0, 1.9)
DAMPING_MULTIPLES = {"ggn": (0.1, 0.3, 1, 3, 10, 30, 100), "hessian": (1, 3, 10, 30, 100)}  # × weight decay
TRAK_DIMS = (64, 256, 1024)
TRAK_CHECKPOINTS = (1, 5, 10)
TRAK_REGULARISERS = (0.0, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)  # × mean diagonal of XᵀX


def log(message: str) -> None:
    print(time.strftime("%H:%M:%S"), message, flush=True)


class Evaluator:
    """Scores [Q_all, n_train] (validation queries first) → LDS and LOO on validation or test queries."""

    def __init__(self, setting, truth):
        v = setting.n_validation_queries
        self.slices = {"validation": slice(0, v), "test": slice(v, None)}
        self.subsets = truth["subsets"].numpy()
        self.loo_points = truth["loo_points"].numpy()
        self.lds_outputs = {k: lds_outputs(truth, s) for k, s in self.slices.items()}
        self.loo_effects = {k: loo_effects_per_seed(truth, s).mean(0) for k, s in self.slices.items()}

    def lds(self, scores: np.ndarray, split: str):
        return lds(scores, self.subsets, self.lds_outputs[split])

    def loo(self, scores: np.ndarray, split: str):
        return leave_one_out(scores[:, self.loo_points], self.loo_effects[split])

    def report(self, scores_test: np.ndarray) -> dict:
        """All test metrics of test-query scores."""
        loo = self.loo(scores_test, "test")
        result = self.lds(scores_test, "test")
        return {
            "lds": result.mean, "lds_se": result.stderr,
            "loo_spearman": loo.spearman.mean, "loo_spearman_se": loo.spearman.stderr,
            "loo_pearson": loo.pearson.mean, "loo_pearson_se": loo.pearson.stderr,
        }


def noise_ceilings(setting, truth) -> dict:
    test = slice(setting.n_validation_queries, None)
    subsets = truth["subset_margins"][:, :, test].numpy()  # [seeds, subsets, queries]
    effects = loo_effects_per_seed(truth, test)  # [seeds, n_loo, queries]
    return {
        "lds": split_half_ceiling(subsets, "spearman"),
        "loo_spearman": split_half_ceiling(effects, "spearman"),
        "loo_pearson": split_half_ceiling(effects, "pearson"),
    }


def run_setting(setting, args) -> dict:
    data = load(setting)
    truth = load_or_generate(setting, data, log, regenerate=args.regenerate)
    evaluator = Evaluator(setting, truth)
    out: dict = {"setting": setting.to_dict(), "ground_truth_seconds": float(truth["seconds"]), "methods": {}}
    out["noise_ceiling"] = noise_ceilings(setting, truth)
    out["checkpoint_gradient_norm_max"] = float(truth["checkpoint_gradient_norms"].max())
    out["subset_gradient_norm_max"] = float(truth["subset_gradient_norms"].max())
    out["loo_gradient_norm_max"] = float(truth["loo_gradient_norms"].max())
    log(f"[{setting.name}] noise ceiling: {json.dumps(out['noise_ceiling'])}")
    n_val, wd = setting.n_validation_queries, setting.recipe.weight_decay
    model = module_from(data.spec, truth["checkpoints"], 0, torch.float64)
    train = examples(data.x_train, data.y_train, torch.float64)
    queries = examples(data.x_queries, data.y_queries, torch.float64)
    test_queries = queries[n_val:]
    accuracy = float((model(data.x_test).argmax(1) == data.y_test).double().mean())
    out["test_accuracy"], out["num_parameters"] = accuracy, data.spec.num_parameters
    log(f"[{setting.name}] θ*: {data.spec.num_parameters} parameters, test accuracy {accuracy:.3f}")

    def record(name: str, scores_all: np.ndarray, **extra) -> dict:
        entry = {**evaluator.report(scores_all[n_val:]), **extra}
        out["methods"][name] = entry
        log(f"[{setting.name}] {name}: LDS {entry['lds']:.3f} ± {entry['lds_se']:.3f}, "
            f"LOO ρ {entry['loo_spearman']:.3f} ± {entry['loo_spearman_se']:.3f}, r {entry['loo_pearson']:.3f}")
        return entry

    # ---- gradients, explicit curvature, gradient similarity
    (query_grads, train_grads), grad_seconds, _ = costs.timed(lambda: gradients(model, train, queries))
    record("grad-dot", gradient_dot(query_grads, train_grads))
    record("grad-cosine", gradient_dot(query_grads, train_grads, cosine=True))
    curvatures, curvature_seconds, curvature_memory = costs.timed(lambda: explicit_curvatures(model, data.x_train, data.y_train))
    out["curvature"] = {k: {"top": c.top, "bottom": float(c.eigenvalues.min())} for k, c in curvatures.items()}
    log(f"[{setting.name}] explicit curvature in {curvature_seconds:.1f}s: {out['curvature']}")
    scorers = {k: EigenScorer(c, query_grads, train_grads) for k, c in curvatures.items()}
    val = slice(0, n_val)

    def validation_lds(scorer, factors) -> float:
        return evaluator.lds(scorer.scores(factors, val), "validation").mean

    # ---- exact damped influence (explicit matrix), λ on validation
    exact_choice = {}
    for kind, scorer in scorers.items():
        grid = [(validation_lds(scorer, filter_factors(scorer.curvature.eigenvalues, m * wd, None, None)), m) for m in DAMPING_MULTIPLES[kind]]
        best_val, multiple = max(grid)
        exact_choice[kind] = multiple * wd
        factors = filter_factors(scorer.curvature.eigenvalues, multiple * wd, None, None)
        record(f"exact influence ({kind})", scorer.scores(factors), damping=multiple * wd, validation_lds=best_val,
               sweep={str(m): v for v, m in grid})

    # ---- ours: closed-form sweep of (λ, η) per curvature and horizon, then the library itself
    chosen = {}
    for kind, scorer in scorers.items():
        top = scorer.curvature.top
        for horizon in args.horizons:
            grid = []
            for m in DAMPING_MULTIPLES[kind]:
                for fraction in STEP_FRACTIONS if horizon > 1 else (1.0,):
                    eta = fraction / (top + m * wd)
                    grid.append((validation_lds(scorer, filter_factors(scorer.curvature.eigenvalues, m * wd, eta, horizon)), m, fraction, eta))
            best = max(grid)
            chosen[(kind, horizon)] = {"damping": best[1] * wd, "step_fraction": best[2], "step_size": best[3], "validation_lds": best[0]}

    ours_scores = {}
    solvers = (("linearized", "ggn"), ("linearized", "hessian"), ("closed_form", "ggn"), ("closed_form", "hessian"),
               ("two_trajectory", "hessian"), ("single_trajectory", "hessian"))
    for solver, kind in solvers:
        for horizon in args.horizons:
            choice = chosen[(kind, horizon)]
            name = f"ours {solver} ({kind}) K={horizon}" if solver in ("linearized", "closed_form") else f"ours {solver} K={horizon}"
            # Hessian runs carry the training objective's weight decay explicitly (θ* is stationary only with it, which the
            # trajectory solvers need); λ − wd is the extra damping. For the GGN, λ stands for wd + extra damping.
            shift = dict(damping=choice["damping"] - wd, weight_decay=wd) if kind == "hessian" else dict(damping=choice["damping"])
            config = AttributionConfig(**shift, step_size=choice["step_size"], horizon=horizon, solver=solver,
                                       curvature=kind, batch_size=setting.n_train, dtype="float64", readout="jvp",
                                       readout_chunk_size=256, simulation_chunk_size=setting.n_train, trajectory_epsilon=args.trajectory_epsilon,
                                       eigenbasis="explicit")
            # a trajectory solver pays K full-batch gradient steps per document, one document at a time: past the budget,
            # simulate the LOO points only (LOO metrics, no LDS) — the linearised solver gives the same responses batched
            subset = solver.endswith("trajectory") and setting.n_train * horizon > args.trajectory_budget
            documents = evaluator.loo_points.tolist() if subset else None
            try:
                result = run_ours(model, train, test_queries, config, documents)
            except SimulationDivergedError as err:
                out["methods"][name] = {"error": str(err), **choice}
                log(f"[{setting.name}] {name}: {err}")
                continue
            closed = scorers[kind].scores(filter_factors(scorers[kind].curvature.eigenvalues, choice["damping"], choice["step_size"], horizon), slice(n_val, None))
            if subset:
                closed = closed[:, evaluator.loo_points]
                deviation = float(np.linalg.norm(result.scores - closed) / max(np.linalg.norm(closed), 1e-300))
                loo = leave_one_out(result.scores, evaluator.loo_effects["test"])
                out["methods"][name] = {"loo_spearman": loo.spearman.mean, "loo_spearman_se": loo.spearman.stderr,
                                        "loo_pearson": loo.pearson.mean, "loo_pearson_se": loo.pearson.stderr, **choice,
                                        "solver": solver, "curvature": kind, "horizon": horizon, "documents": "loo points only",
                                        "simulation_seconds": result.simulation_seconds, "relative_deviation_from_closed_form": deviation}
                log(f"[{setting.name}] {name} (LOO points only): LOO ρ {loo.spearman.mean:.3f}, sim {result.simulation_seconds:.1f}s, "
                    f"deviation from closed form {deviation:.1e}")
                continue
            deviation = float(np.linalg.norm(result.scores - closed) / max(np.linalg.norm(closed), 1e-300))
            entry = {**evaluator.report(result.scores), **choice, "solver": solver, "curvature": kind, "horizon": horizon,
                     "simulation_seconds": result.simulation_seconds, "readout_seconds": result.readout_seconds,
                     "relative_deviation_from_closed_form": deviation}
            out["methods"][name] = entry
            ours_scores[name] = result
            log(f"[{setting.name}] {name}: LDS {entry['lds']:.3f} ± {entry['lds_se']:.3f}, LOO ρ {entry['loo_spearman']:.3f}, "
                f"r {entry['loo_pearson']:.3f} (λ={choice['damping']:.3g}, η={choice['step_size']:.3g}, sim {result.simulation_seconds:.1f}s, "
                f"deviation from closed form {deviation:.1e})")

    # ---- investigation axes on the best linearised configuration: float32, minibatches
    best_ours = max((n for n in ours_scores if "linearized" in n), key=lambda n: out["methods"][n]["validation_lds"])  # chosen on validation
    b = out["methods"][best_ours]
    variants = {
        "float32 model and responses": dict(dtype="float32"),
        "minibatch 32 (step size re-estimated)": dict(batch_size=32, step_size="auto", step_size_fraction=min(b["step_fraction"], 1.0)),
    }
    for label, change in variants.items():
        shift = dict(damping=b["damping"] - wd, weight_decay=wd) if b["curvature"] == "hessian" else dict(damping=b["damping"])
        base = dict(**shift, step_size=b["step_size"], horizon=b["horizon"], solver="linearized", curvature=b["curvature"],
                    batch_size=setting.n_train, dtype="float64", readout="jvp", readout_chunk_size=256, simulation_chunk_size=setting.n_train)
        config = AttributionConfig(**{**base, **change})
        variant_model = module_from(data.spec, truth["checkpoints"], 0, torch.float32) if change.get("dtype") == "float32" else model
        variant_queries = examples(data.x_test, data.y_test, torch.float32) if change.get("dtype") == "float32" else test_queries
        variant_train = examples(data.x_train, data.y_train, torch.float32) if change.get("dtype") == "float32" else train
        try:
            result = run_ours(variant_model, variant_train, variant_queries, config)
            entry = {**evaluator.report(result.scores), "variant_of": best_ours, "change": label, "simulation_seconds": result.simulation_seconds}
        except SimulationDivergedError as err:
            entry = {"error": str(err), "variant_of": best_ours, "change": label}
        out["methods"][f"{best_ours} [{label}]"] = entry
        log(f"[{setting.name}] {best_ours} [{label}]: {entry.get('lds', entry.get('error'))}")

    # ---- TRAK: projection dimension × regulariser × number of checkpoints
    checkpoints = [module_from(data.spec, truth["checkpoints"], i, torch.float32) for i in range(setting.n_checkpoints)]
    margin_grads = query_gradients(AttributionSubspace.build(model, "trainable"), TASK, train, dtype=torch.float64)
    diagonal = float((margin_grads**2).sum() / data.spec.num_parameters)
    trak_val, trak_runs = {}, {}
    workdir = CACHE / setting.name / "trak"
    workdir.mkdir(parents=True, exist_ok=True)
    for dim in TRAK_DIMS:
        for c in TRAK_REGULARISERS:
            runner = TrakRunner(checkpoints, data.x_train, data.y_train, dim, c * diagonal, workdir)
            try:
                featurize_seconds = runner.featurize()
                for count in TRAK_CHECKPOINTS:
                    scores = runner.scores(data.x_queries, data.y_queries, count)
                    if not np.all(np.isfinite(scores)):
                        continue
                    value = evaluator.lds(scores[:n_val], "validation").mean
                    key = (dim, count)
                    if key not in trak_val or value > trak_val[key][0]:
                        trak_val[key] = (value, c, scores, featurize_seconds)
            except (RuntimeError, ValueError) as err:  # a singular XᵀX without regulariser
                log(f"[{setting.name}] TRAK k={dim} c={c}: {err}")
            finally:
                runner.close()
    for (dim, count), (value, c, scores, featurize_seconds) in sorted(trak_val.items()):
        record(f"TRAK T={count} k={dim}", scores, proj_dim=dim, checkpoints=count, lambda_reg=c * diagonal, lambda_multiple=c,
               validation_lds=value, featurize_seconds_all_checkpoints=featurize_seconds)

    out["costs"] = measure_costs(setting, data, truth, model, train, test_queries, out, ours_scores, best_ours, curvatures, exact_choice,
                                 checkpoints, trak_val, train_grads, workdir, curvature_seconds, grad_seconds, args)
    return out


def measure_costs(setting, data, truth, model, train, test_queries, out, ours_scores, best_ours, curvatures, exact_choice,
                  checkpoints, trak_val, train_grads, workdir, curvature_seconds, grad_seconds, args) -> dict:
    """Precompute time, one-query latency, amortised per-query time over 100 queries, peak memory; all in this process."""
    log(f"[{setting.name}] measuring costs")
    subspace = AttributionSubspace.build(model, "trainable")
    best = ours_scores[best_ours]
    responses = best.responses
    readout = ForwardReadout(subspace, TASK, "jvp", chunk_size=256)
    one, batch = test_queries[:1], test_queries[:100]
    n_batch = len(batch)

    # exact influence: precompute (H + λI)⁻¹ G by an explicit solve
    kind = max(exact_choice, key=lambda k: out["methods"][f"exact influence ({k})"]["validation_lds"])
    matrix = curvatures[kind].matrix
    eye = torch.eye(matrix.shape[0], dtype=matrix.dtype)
    exact_responses, solve_seconds, _ = costs.timed(lambda: -torch.linalg.solve(matrix + exact_choice[kind] * eye, train_grads.T).T)

    def backward_readout(queries, stored):
        return query_gradients(subspace, TASK, queries, dtype=torch.float64) @ stored.T

    # compressed forward readout: U ≈ C Vᵀ with the top-k right singular vectors; k is the smallest rank whose
    # validation LDS is within 0.01 of the exact readout's (validation queries only)
    (u_, s_, vt_), svd_seconds, _ = costs.timed(lambda: torch.linalg.svd(responses.double(), full_matrices=False))
    evaluator = Evaluator(setting, truth)
    validation_queries = examples(data.x_validation, data.y_validation, torch.float64)
    exact_validation = evaluator.lds(readout.scores(validation_queries, responses).double().numpy(), "validation").mean
    ranks = [k for k in args.compressed_ranks if k < min(responses.shape)] + [min(responses.shape)]
    rank_sweep = {}
    for rank in ranks:
        scores_k = (readout.scores(validation_queries, vt_[:rank]).double() @ (u_[:, :rank] * s_[:rank]).T).numpy()
        rank_sweep[rank] = evaluator.lds(scores_k, "validation").mean
        if rank_sweep[rank] >= exact_validation - 0.01:
            break
    basis, coefficients = vt_[:rank].contiguous(), (u_[:, :rank] * s_[:rank]).contiguous()
    compressed_scores = (readout.scores(test_queries, basis).double() @ coefficients.T).numpy()
    out["methods"][f"{best_ours} [compressed readout, k={rank}]"] = {**evaluator.report(compressed_scores), "variant_of": best_ours,
                                                                      "validation_lds_by_rank": rank_sweep}

    trak_best = {}
    for count in TRAK_CHECKPOINTS:
        candidates = {dim: v for (dim, c), v in trak_val.items() if c == count}
        if candidates:
            dim = max(candidates, key=lambda d: out["methods"][f"TRAK T={count} k={d}"]["validation_lds"])
            trak_best[count] = (dim, candidates[dim][1])
    runners, trak_precompute = {}, {}
    for count, (dim, c) in trak_best.items():
        diagonal = out["methods"][f"TRAK T={count} k={dim}"]["lambda_reg"]
        runner = TrakRunner(checkpoints[:count], data.x_train, data.y_train, dim, diagonal, workdir)
        featurize_seconds, _, featurize_memory = costs.timed(runner.featurize)  # featurize() returns its own wall time
        runners[count] = runner
        trak_precompute[count] = (featurize_seconds, featurize_memory)

    # training one more checkpoint (TRAK's T > 1 needs T − 1 of them)
    _, train_seconds, _ = costs.timed(lambda: train_ensemble(data.spec, setting.recipe, data.x_train, data.y_train,
                                                             torch.ones(1, setting.n_train), [12345]))
    x_one, y_one = data.x_test[:1], data.y_test[:1]
    x_batch, y_batch = data.x_test[:n_batch], data.y_test[:n_batch]

    def contenders(queries) -> dict:  # every method's readout of `queries`, as zero-argument callables
        return {
            "ours (forward JVP readout, N directions)": lambda: readout.scores(queries, responses),
            f"ours (compressed forward readout, k={rank})": lambda: readout.scores(queries, basis) @ coefficients.T,
            "ours (backward readout)": lambda: backward_readout(queries, responses),
            "exact influence (backward readout)": lambda: backward_readout(queries, exact_responses),
            "grad-dot": lambda: backward_readout(queries, -train_grads),
        }

    latency, amortised = contenders(one), contenders(batch)
    for count, runner in runners.items():
        latency[f"TRAK T={count}"] = lambda r=runner, c=count: r.scores(x_one, y_one, c)
        amortised[f"TRAK T={count}"] = lambda r=runner, c=count: r.scores(x_batch, y_batch, c)
    one_query = costs.interleaved(latency, args.repeats)
    many = costs.interleaved(amortised, max(1, args.repeats // 2))
    for runner in runners.values():
        runner.close()
    best_entry = out["methods"][best_ours]
    precompute = {
        "ours (forward JVP readout, N directions)": best_entry["simulation_seconds"],
        f"ours (compressed forward readout, k={rank})": best_entry["simulation_seconds"] + svd_seconds,
        "ours (backward readout)": best_entry["simulation_seconds"],
        "exact influence (backward readout)": grad_seconds + curvature_seconds + solve_seconds,
        "grad-dot": grad_seconds,
    }
    for count, (seconds, _) in trak_precompute.items():
        precompute[f"TRAK T={count}"] = seconds + (count - 1) * train_seconds
    stored = {
        "ours (forward JVP readout, N directions)": responses.numel() * responses.element_size(),
        f"ours (compressed forward readout, k={rank})": (basis.numel() + coefficients.numel()) * 8,
        "ours (backward readout)": responses.numel() * responses.element_size(),
        "exact influence (backward readout)": exact_responses.numel() * 8,
        "grad-dot": train_grads.numel() * 8,
    }
    for count, (dim, _) in trak_best.items():
        stored[f"TRAK T={count}"] = count * setting.n_train * (2 * dim + 1) * 4  # grads + features + out-to-loss, float32
    table = {}
    for name in latency:
        table[name] = {
            "precompute_s": precompute[name],
            "latency_s": one_query[name]["median_s"],
            "amortised_per_query_s": many[name]["median_s"] / n_batch,
            "peak_memory_query_bytes": one_query[name]["peak_memory_bytes"],
            "peak_memory_batch_bytes": many[name]["peak_memory_bytes"],
            "stored_bytes": stored[name],
        }
        log(f"[{setting.name}] cost {name}: precompute {precompute[name]:.2f}s, latency {1000 * table[name]['latency_s']:.2f} ms, "
            f"amortised {1000 * table[name]['amortised_per_query_s']:.3f} ms/query")
    return {"per_method": table, "one_extra_checkpoint_training_s": train_seconds, "best_ours": best_ours,
            "trak_configs": {str(k): {"proj_dim": v[0]} for k, v in trak_best.items()}, "queries_in_batch": n_batch}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is steadier on a shared 2-core machine)")
    parser.add_argument("--regenerate", action="store_true", help="retrain the ground truth even if cached")
    parser.add_argument("--repeats", type=int, default=5, help="timing repeats per method (interleaved)")
    parser.add_argument("--compressed-ranks", type=int, nargs="+", default=[8, 16, 32, 64, 128, 256],
                        help="ranks tried for the compressed readout (smallest within 0.01 validation LDS of exact wins)")
    parser.add_argument("--trajectory-epsilon", type=float, default=1e-4)
    parser.add_argument("--trajectory-budget", type=int, default=30_000,
                        help="trajectory solvers simulate only the LOO points when n_train × K exceeds this")
    parser.add_argument("--horizons", type=int, nargs="+", default=list(HORIZONS), help="horizons K of ours (all four for the report)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    results = {"machine": {"platform": platform.platform(), "processor": platform.processor(), "cpu_count": os.cpu_count(),
                           "torch_threads": args.threads, "torch": torch.__version__}, "settings": {}}
    for name in args.settings:
        results["settings"][name] = run_setting(SETTINGS[name], args)
    results["seconds"] = time.perf_counter() - start
    args.output.mkdir(parents=True, exist_ok=True)
    previous = args.output / "results.json"
    if previous.exists() and set(args.settings) != set(SETTINGS):  # keep the other settings of an earlier full run
        old = json.loads(previous.read_text())
        results["settings"] = {**old.get("settings", {}), **results["settings"]}
    previous.write_text(json.dumps(results, indent=1, sort_keys=True, default=float))
    from .report import write_report

    write_report(results, args.output)
    log(f"done in {results['seconds']:.0f}s; results in {args.output}")


if __name__ == "__main__":
    main()
