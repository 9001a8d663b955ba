"""Counterfactual ground truth, generated once per setting and cached under benchmarks/mlp/cache/.

- Checkpoints: `n_checkpoints` models trained on all training data with init seeds 0, 1, …; seed 0 is
  θ*, the model every single-model method attributes. TRAK's ensembles use seeds 0 … T−1.
- LDS: `n_subsets` random subsets holding `subset_fraction` of the training set, each trained from
  scratch with `subset_seeds` init seeds that no checkpoint uses (10 000 + …), so the ground truth is
  the expected behaviour of the recipe, not of θ*'s basin. Their query margins are averaged over seeds.
- LOO: `n_loo` random training points; for each of the first `loo_seeds` checkpoints, the model is
  retrained without the point, *warm-started* from that checkpoint and run to stationarity with the
  same L-BFGS (retraining from scratch lands in another point of the non-convex landscape: the
  one-point change drowns in init-to-init chaos, see RESULTS.md). The effect is margin(full) −
  margin(without the point), per seed; the reported ground truth is its mean over seeds.

The measurement everywhere is the correct-class margin z_y − logsumexp_{c≠y} z_c at each query
(validation queries first, then test queries).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .ensemble import lbfgs, margins, train_ensemble, value_and_gradient
from .settings import Data, Setting

CACHE = Path(__file__).resolve().parent / "cache"


def _chunks(n: int, size: int):
    for lo in range(0, n, size):
        yield lo, min(n, lo + size)


def generate(setting: Setting, data: Data, log=print, chunk: int = 100) -> dict:
    """Train every model the ground truth needs and measure it; returns the tensors that get cached."""
    spec, recipe, n = data.spec, setting.recipe, setting.n_train
    x, y, xq, yq = data.x_train, data.y_train, data.x_queries, data.y_queries
    rng = np.random.default_rng(setting.seed + 1)
    start = time.perf_counter()

    log(f"[{setting.name}] {setting.n_checkpoints} checkpoints on all {n} training points")
    seeds = list(range(setting.n_checkpoints))
    checkpoints, norms = train_ensemble(spec, recipe, x, y, torch.ones(len(seeds), n), seeds, log)
    full_margins = margins(spec, checkpoints, xq, yq)

    subsets = torch.zeros(setting.n_subsets, n, dtype=torch.bool)
    for j in range(setting.n_subsets):
        subsets[j, rng.choice(n, int(round(setting.subset_fraction * n)), replace=False)] = True
    rows = [(j, r) for j in range(setting.n_subsets) for r in range(setting.subset_seeds)]
    subset_margins = torch.zeros(setting.subset_seeds, setting.n_subsets, xq.shape[0], dtype=torch.float64)
    subset_norms = torch.zeros(len(rows), dtype=torch.float64)
    for lo, hi in _chunks(len(rows), chunk):
        log(f"[{setting.name}] LDS models {lo}–{hi - 1} of {len(rows)} ({time.perf_counter() - start:.0f}s)")
        block = rows[lo:hi]
        weights = torch.stack([subsets[j].double() for j, _ in block])
        params, block_norms = train_ensemble(spec, recipe, x, y, weights, [10_000 + setting.subset_seeds * j + r for j, r in block], log)
        values = margins(spec, params, xq, yq)
        for (j, r), value in zip(block, values):
            subset_margins[r, j] = value
        subset_norms[lo:hi] = block_norms

    loo_points = torch.tensor(np.sort(rng.choice(n, setting.n_loo, replace=False)))
    loo_margins = torch.zeros(setting.loo_seeds, setting.n_loo, xq.shape[0], dtype=torch.float64)
    loo_norms = torch.zeros(setting.loo_seeds, setting.n_loo, dtype=torch.float64)
    inputs = x.to(recipe.torch_dtype)
    for s in range(setting.loo_seeds):
        log(f"[{setting.name}] LOO seed {s}: {setting.n_loo} warm-started retrainings ({time.perf_counter() - start:.0f}s)")
        weights = torch.ones(setting.n_loo, n, dtype=recipe.torch_dtype)
        weights[torch.arange(setting.n_loo), loo_points] = 0
        init = checkpoints[s : s + 1].expand(setting.n_loo, -1).clone()
        params = lbfgs(spec, init, inputs, y, weights, recipe.weight_decay, recipe.lbfgs_iterations, recipe.lbfgs_history, recipe.lbfgs_tolerance)
        loo_norms[s] = value_and_gradient(spec, params, inputs, y, weights, recipe.weight_decay)[1].norm(dim=1)
        loo_margins[s] = margins(spec, params, xq, yq)
        log(f"    max ‖∇‖ {float(loo_norms[s].max()):.1e}")
    seconds = time.perf_counter() - start
    log(f"[{setting.name}] ground truth in {seconds:.0f}s")
    return {
        "checkpoints": checkpoints,
        "checkpoint_gradient_norms": norms,
        "full_margins": full_margins,
        "subsets": subsets,
        "subset_margins": subset_margins,
        "subset_gradient_norms": subset_norms,
        "loo_points": loo_points,
        "loo_margins": loo_margins,
        "loo_gradient_norms": loo_norms,
        "seconds": torch.tensor(seconds),
    }


def load_or_generate(setting: Setting, data: Data, log=print, regenerate: bool = False) -> dict:
    """The cached ground truth of `setting`, generated first if missing or made with other settings."""
    folder = CACHE / setting.name
    tensors_path, meta_path = folder / "ground_truth.safetensors", folder / "ground_truth.json"
    description = setting.to_dict()
    if not regenerate and tensors_path.exists() and meta_path.exists():
        if json.loads(meta_path.read_text()) == description:
            log(f"[{setting.name}] ground truth from cache {tensors_path}")
            return load_file(tensors_path)
        log(f"[{setting.name}] cached ground truth was made with other settings: regenerating")
    result = generate(setting, data, log)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in result.items()}, tensors_path, metadata={"format": "pt"})
    meta_path.write_text(json.dumps(description, indent=2, sort_keys=True))
    return result


def lds_outputs(truth: dict, query_slice: slice) -> np.ndarray:
    """[n_subsets, n_queries] subset margins averaged over seeds."""
    return truth["subset_margins"][:, :, query_slice].mean(0).numpy()


def loo_effects_per_seed(truth: dict, query_slice: slice) -> np.ndarray:
    """[seeds, n_loo, n_queries] margin(full) − margin(without the point), per seed."""
    seeds = truth["loo_margins"].shape[0]
    full = truth["full_margins"][:seeds, None, query_slice]
    return (full - truth["loo_margins"][:, :, query_slice]).numpy()
