"""Tables (markdown) and plots from benchmarks/mlp/results/results.json."""

from __future__ import annotations

import json
import sys
from pathlib import Path

HORIZONS = (1, 5, 20, 100)


def _fmt(entry: dict, key: str) -> str:
    if "error" in entry:
        return "diverged"
    value, se = entry.get(key), entry.get(f"{key}_se")
    if value is None:
        return "–"
    return f"{value:.3f} ± {se:.3f}" if se is not None else f"{value:.3f}"


def _ceiling(result: dict, key: str) -> str:
    c = result["noise_ceiling"][key]
    return f"{c['ceiling']:.3f} (split-half {c['half']:.3f})"


def headline_rows(result: dict) -> list[str]:
    methods = result["methods"]
    best = result["costs"]["best_ours"]
    rows = [f"| **ours, best: {best}** | {_fmt(methods[best], 'lds')} | {_fmt(methods[best], 'loo_spearman')} | {_fmt(methods[best], 'loo_pearson')} |"]
    ordered = [n for n in methods if n.startswith("exact")] + sorted(
        (n for n in methods if n.startswith("TRAK")), key=lambda n: (int(n.split("T=")[1].split()[0]), int(n.split("k=")[1])))
    ordered += ["grad-dot", "grad-cosine"]
    rows += [f"| {n} | {_fmt(methods[n], 'lds')} | {_fmt(methods[n], 'loo_spearman')} | {_fmt(methods[n], 'loo_pearson')} |" for n in ordered]
    rows.append(f"| *seed-to-seed noise ceiling* | {_ceiling(result, 'lds')} | {_ceiling(result, 'loo_spearman')} | {_ceiling(result, 'loo_pearson')} |")
    return rows


def tables(results: dict) -> str:
    lines = []
    for name, result in results["settings"].items():
        s = result["setting"]
        lines += [
            f"### {name}",
            "",
            f"n_train = {s['n_train']}, p = {result['num_parameters']} parameters ({s['hidden']} {s['activation']} hidden units), "
            f"θ* test accuracy {result['test_accuracy']:.3f}; {s['n_validation_queries']} validation / {s['n_test_queries']} test queries; "
            f"ground truth: {s['n_subsets']} subsets × {s['subset_seeds']} seeds, {s['n_loo']} LOO points × {s['loo_seeds']} seeds "
            f"({result['ground_truth_seconds']:.0f} s to generate). Largest final gradient norm: checkpoints "
            f"{result['checkpoint_gradient_norm_max']:.1e}, subset models {result['subset_gradient_norm_max']:.1e}, LOO models "
            f"{result['loo_gradient_norm_max']:.1e}.",
            "",
            "| method | LDS | LOO Spearman | LOO Pearson |",
            "| --- | --- | --- | --- |",
            *headline_rows(result),
            "",
            "Ours by solver and horizon K (λ, η chosen per cell on validation queries; LDS / LOO Spearman on test queries):",
            "",
            "| solver | " + " | ".join(f"K={k}" for k in HORIZONS) + " |",
            "| --- | " + " | ".join("---" for _ in HORIZONS) + " |",
        ]
        for prefix in ("ours linearized (ggn)", "ours linearized (hessian)", "ours closed_form (ggn)", "ours closed_form (hessian)",
                       "ours two_trajectory", "ours single_trajectory"):
            cells = []
            for k in HORIZONS:
                entry = result["methods"].get(f"{prefix} K={k}")
                if entry is None:
                    cells.append("–")
                elif "error" in entry:
                    cells.append("diverged")
                elif "lds" not in entry:
                    cells.append(f"– / {entry['loo_spearman']:.3f}†")
                else:
                    cells.append(f"{entry['lds']:.3f} / {entry['loo_spearman']:.3f}")
            lines.append(f"| {prefix[5:]} | " + " | ".join(cells) + " |")
        lines += ["", "† simulated for the LOO points only (n_train × K above the trajectory budget): LOO metrics, no LDS.", "",
                  "Variants of the best configuration:", "", "| variant | LDS | LOO Spearman |", "| --- | --- | --- |"]
        for n, entry in result["methods"].items():
            if "variant_of" in entry:
                lines.append(f"| {n.split('[')[-1].rstrip(']')} | {_fmt(entry, 'lds')} | {_fmt(entry, 'loo_spearman')} |")
        c = result["costs"]
        lines += [
            "",
            f"Cost (one query alone = latency; {c['queries_in_batch']} queries at once = amortised; training one more checkpoint: "
            f"{c['one_extra_checkpoint_training_s']:.1f} s, counted in TRAK's precompute for T > 1):",
            "",
            "| method | precompute (s) | latency, 1 query (ms) | amortised (ms/query) | peak RSS increase, 1 / 100 queries (MiB) | stored (MiB) |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for n, row in c["per_method"].items():
            lines.append(
                f"| {n} | {row['precompute_s']:.2f} | {1000 * row['latency_s']:.2f} | {1000 * row['amortised_per_query_s']:.3f} | "
                f"{row['peak_memory_query_bytes'] / 2**20:.1f} / {row['peak_memory_batch_bytes'] / 2**20:.1f} | {row['stored_bytes'] / 2**20:.2f} |"
            )
        ours = c["per_method"]["ours (forward JVP readout, N directions)"]
        ratios = []
        for n, row in c["per_method"].items():
            if n.startswith("TRAK"):
                ratios.append(f"{n}: {ours['latency_s'] / row['latency_s']:.2f}× latency, "
                              f"{ours['amortised_per_query_s'] / row['amortised_per_query_s']:.2f}× amortised")
        lines += ["", "Per-query cost of ours (forward JVP readout) relative to TRAK (below 1 = ours cheaper): " + "; ".join(ratios) + ".", ""]
    return "\n".join(lines)


def plots(results: dict, folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = list(results["settings"].items())
    fig, axes = plt.subplots(1, len(settings), figsize=(6 * len(settings), 4.5), squeeze=False)
    for ax, (name, result) in zip(axes[0], settings):
        methods = result["methods"]
        for prefix, style in (("ours linearized (ggn)", "o-"), ("ours linearized (hessian)", "s-"), ("ours two_trajectory", "^--"), ("ours single_trajectory", "v:")):
            points = [(k, methods[f"{prefix} K={k}"]["lds"]) for k in HORIZONS if "lds" in methods.get(f"{prefix} K={k}", {})]
            if points:
                ax.plot(*zip(*points), style, label=prefix)
        peers = {n: e for n, e in methods.items() if n.startswith(("exact", "grad-dot")) or (n.startswith("TRAK") and "k=" in n)}
        trak_best = {}
        for n, e in peers.items():
            if n.startswith("TRAK"):
                count = n.split("T=")[1].split()[0]
                if count not in trak_best or e["validation_lds"] > trak_best[count][1]["validation_lds"]:
                    trak_best[count] = (n, e)
        lines = [(n, e) for n, e in peers.items() if not n.startswith("TRAK")] + [v for v in trak_best.values()]
        colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        for i, (n, e) in enumerate(lines):
            ax.axhline(e["lds"], color=colours[(i + 4) % len(colours)], ls="--" if n.startswith("TRAK") else "-.", lw=1, label=n)
        ceiling = result["noise_ceiling"]["lds"]["ceiling"]
        ax.axhline(ceiling, color="k", lw=0.8, label="noise ceiling")
        ax.set_xscale("log")
        ax.set_xlabel("horizon K")
        ax.set_ylabel("LDS (test queries)")
        ax.set_title(name)
        ax.legend(fontsize=6)
    fig.tight_layout()
    horizon_path = folder / "lds_vs_horizon.png"
    fig.savefig(horizon_path, dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(settings), figsize=(6 * len(settings), 4.5), squeeze=False)
    for ax, (name, result) in zip(axes[0], settings):
        best = result["costs"]["best_ours"]
        for label, row in result["costs"]["per_method"].items():
            if label.startswith("TRAK"):
                dim = result["costs"]["trak_configs"][label.split("T=")[1]]["proj_dim"]
                entry = result["methods"][f"{label} k={dim}"]
            elif label.startswith("exact"):
                entry = max((e for n, e in result["methods"].items() if n.startswith("exact")), key=lambda e: e["validation_lds"])
            elif label.startswith("grad-dot"):
                entry = result["methods"]["grad-dot"]
            elif "compressed" in label:
                entry = next(e for n, e in result["methods"].items() if "compressed readout" in n)
            else:
                entry = result["methods"][best]
            ax.scatter(1000 * row["amortised_per_query_s"], entry["lds"], marker="o", label=f"{label} (amortised)")
            ax.scatter(1000 * row["latency_s"], entry["lds"], marker="x", color=ax.collections[-1].get_facecolor()[0])
        ax.set_xscale("log")
        ax.set_xlabel("per-query time, ms (o: amortised over 100 queries, x: one query alone)")
        ax.set_ylabel("LDS (test queries)")
        ax.set_title(name)
        ax.legend(fontsize=6)
    fig.tight_layout()
    cost_path = folder / "lds_vs_cost.png"
    fig.savefig(cost_path, dpi=120)
    plt.close(fig)
    return [horizon_path, cost_path]


def write_report(results: dict, folder: Path) -> None:
    """table.md and the two plots next to results.json."""
    folder.mkdir(parents=True, exist_ok=True)
    machine = results["machine"]
    header = (f"Machine: {machine['platform']}, {machine['cpu_count']} CPU cores, torch {machine['torch']} with "
              f"{machine['torch_threads']} thread(s); whole run {results['seconds']:.0f} s.\n\n")
    (folder / "table.md").write_text(header + tables(results))
    plots(results, folder)


if __name__ == "__main__":  # re-render from an existing results.json
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent / "results" / "results.json"
    write_report(json.loads(path.read_text()), path.parent)
