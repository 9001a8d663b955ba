"""Tables and the per-query-time plot of the scale benchmark, from the per-size step results."""

from __future__ import annotations

import json
import math
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"

READOUTS = [  # (key in readouts.per_query, label)
    ("compressed (jvp)", "compressed, k chosen for Spearman ≥ 0.99 (jvp)"),
    ("compressed (central_difference)", "compressed, same k (central difference)"),
    ("compressed (one_sided)", "compressed, same k (one-sided)"),
    ("compressed, fixed k (jvp)", "compressed, k = 256 at every N (jvp)"),
    ("source (jvp)", "source, 10 directions (jvp)"),
    ("source (central_difference)", "source, 10 directions (central difference)"),
    ("source (one_sided)", "source, 10 directions (one-sided)"),
    ("exact streamed (jvp)", "exact streamed, N directions (jvp)†"),
    ("gradient-based (backward + N dot products)", "gradient-based: backward + N dot products"),
]


def _ms(seconds) -> str:
    if seconds is None or (isinstance(seconds, float) and math.isnan(seconds)):
        return "–"
    return f"{seconds * 1e3:,.0f}" if seconds >= 0.1 else f"{seconds * 1e3:,.1f}"


def _n(n: str) -> str:
    return f"{int(n):,}"


def peer_times(data: dict) -> dict:
    """Per-query seconds (alone, amortised over 16) and precompute seconds of the peers, scaled to N where measured on a prefix."""
    out = {}
    k = data.get("kronfluence", {})
    if "error" not in k and k:
        scale = k["scale_to_n"]
        out["Kronfluence EK-FAC (pairwise, train gradients recomputed)‡"] = (k["single_seconds"] * scale, k["batch_seconds"] * scale / k["batch_queries"], k["precompute_seconds"])
    b = data.get("bergson", {})
    if "error" not in b and b:
        out["Bergson (gradient index, trace = backward + dot products)"] = (b["single_seconds"], b["batch_seconds"] / b["batch_queries"], b["precompute_seconds"])
    return out


def tables(per_size: dict, meta: dict) -> str:
    sizes = sorted(per_size, key=int)
    first, last = sizes[0], sizes[-1]
    lines = []
    add = lines.append
    add("**Simulation against one training epoch** (closed form: EK-FAC eigenbasis on "
        f"{meta['curvature_examples']:,} examples, then per-document gradients through the filter, shards written; the whole "
        "`build_influence_artifact` call). Epoch: AdamW over the N documents, batch 32, a plain PyTorch loop. The ratio in CPU "
        "time (process time, one thread) is the one to read: other jobs shared the two cores, which inflates wall times unevenly.\n")
    add("| N | epoch (s) | closed-form simulation (s) | of which EK-FAC estimate (s) | simulation / epoch, wall | simulation / epoch, CPU | "
        "compressed basis: SVD + projection (s) | basis / epoch (CPU) | responses on disk (MiB) |")
    add("|---|---|---|---|---|---|---|---|---|")
    for n in sizes:
        d = per_size[n]
        epoch, sim, basis = d["epoch"], d["simulation"], d["basis"]
        cpu_ratio = sim["simulation_cpu_seconds"] / epoch["epoch_cpu_seconds"] if "epoch_cpu_seconds" in epoch else float("nan")
        basis_ratio = basis["svd_cpu_seconds"] / epoch["epoch_cpu_seconds"] if "epoch_cpu_seconds" in epoch else float("nan")
        add(f"| {_n(n)} | {epoch['epoch_seconds']:.1f} | {sim['simulation_seconds']:.1f} | {sim['eigenbasis_seconds']:.1f} | "
            f"{sim['simulation_seconds'] / epoch['epoch_seconds']:.2f}× | **{cpu_ratio:.2f}×** | "
            f"{basis['svd_seconds']:.1f} | {basis_ratio:.2f}× | {sim['responses_mib']:,.0f} |")
    add("")
    add("**Per-query readout time (ms, wall)**, one query alone (median of 9) / amortised over a batch of 16; contenders interleaved "
        "query by query in one process. The growth columns also give the ratio in CPU time, which other jobs on the machine disturb less.\n")
    header = "| readout | " + " | ".join(f"N = {_n(n)}" for n in sizes) + f" | growth {_n(first)} → {_n(last)}, alone: wall / CPU | batch of 16: wall / CPU |"
    add(header)
    add("|---" * (len(sizes) + 3) + "|")
    for key, label in READOUTS:
        cells, alone = [], []
        rows = [per_size[n]["readouts"]["per_query"].get(key) for n in sizes]
        for n in sizes:
            r = per_size[n]["readouts"]["per_query"].get(key)
            if r is None:
                cells.append("–")
                alone.append(None)
                continue
            extra = ""
            if key.startswith("compressed") and "fixed" not in key:
                extra = f" (k = {per_size[n]['readouts']['chosen_rank']})"
            if "fixed" in key:
                extra = f" (k = {per_size[n]['readouts']['fixed_rank']})"
            cells.append(f"{_ms(r['alone_seconds'])} / {_ms(r['batched_seconds_per_query'])}{extra}")
            alone.append(r["alone_seconds"])
        growth = "–"
        if rows[0] and rows[-1]:
            ratio = lambda field: rows[-1][field] / rows[0][field] if field in rows[0] else float("nan")  # noqa: E731
            growth = (f"{ratio('alone_seconds'):.2f}× / {ratio('alone_cpu_seconds'):.2f}× | "
                      f"{ratio('batched_seconds_per_query'):.2f}× / {ratio('batched_cpu_seconds_per_query'):.2f}×")
        add(f"| {label} | " + " | ".join(cells) + f" | {growth} |")
    for label in sorted({label for n in sizes for label in peer_times(per_size[n])}):
        cells, alone, amortised = [], [], []
        for n in sizes:
            times = peer_times(per_size[n]).get(label)
            cells.append(f"{_ms(times[0])} / {_ms(times[1])}" if times else per_size[n].get("kronfluence" if "Kron" in label else "bergson", {}).get("error", "–"))
            alone.append(times[0] if times else None)
            amortised.append(times[1] if times else None)
        growth = f"{alone[-1] / alone[0]:.2f}× / – | {amortised[-1] / amortised[0]:.2f}× / –" if alone[0] and alone[-1] else "– | –"
        add(f"| {label} | " + " | ".join(cells) + f" | {growth} |")
    add("")
    add(f"† timed on the first {meta.get('exact_rows', 2048):,} responses (all of them when N is smaller) and scaled by N / {meta.get('exact_rows', 2048):,}: "
        "streamed readout time is linear in N (the memory table's run streams all N, 1 query: its time is measured, not scaled).  ")
    add("‡ Kronfluence's scores recompute every document's gradient per query batch; beyond "
        "10,000 documents its pass was timed on the first 10,000 and scaled by N / 10,000.\n")
    add("**Peak RSS above baseline (MiB)** of each readout in a fresh process (baseline: after imports, model and a warm-up "
        "readout, before the artifact is opened; then load + bind + score), as total / anonymous memory / pages of the "
        "memory-mapped shards (the last two sampled every 5 ms). 16 queries; exact streamed: 1 query.\n")
    add("| readout | " + " | ".join(f"N = {_n(n)}" for n in sizes) + " |")
    add("|---" * (len(sizes) + 1) + "|")
    for readout, label in (("compressed", "compressed (basis loaded: V and C = N × k)"), ("source", "source (10 summed responses)"),
                           ("exact", "exact streamed (shards memory-mapped, 4,096 rows at a time)"), ("gradient", "gradient-based (streamed dot products)")):
        cells = []
        for n in sizes:
            m = per_size[n]["memory"].get(readout, {})
            cells.append(m.get("error", f"{m['peak_above_baseline_mib']:.0f} / {m.get('anonymous_above_baseline_mib', float('nan')):.0f} / "
                                        f"{m.get('file_backed_above_baseline_mib', float('nan')):.0f} ({m['seconds']:.1f} s)") if m else "–")
        add(f"| {label} | " + " | ".join(cells) + " |")
    add("")
    add("**Compressed basis fidelity** (rank chosen on 32 fidelity queries, figures on 32 other test queries; exact = every response).\n")
    add("| N | chosen k (max 1,024) | Spearman (test) | Pearson (test) | top-10 overlap | Spearman at k = 64 / 256 / 512 / 1,024 | SVD + projection (s) | rank selection (s) |")
    add("|---|---|---|---|---|---|---|---|")
    for n in sizes:
        b = per_size[n]["basis"]
        sweep = b["sweep"]
        at = " / ".join(f"{sweep[str(k)]['test_spearman']:.3f}" if str(k) in sweep else "–" for k in (64, 256, 512, 1024))
        add(f"| {_n(n)} | {b['rank']} | {b['at_chosen_test_spearman']:.4f} | {b['at_chosen_test_pearson']:.4f} | {b['at_chosen_test_top10_overlap']:.3f} | "
            f"{at} | {b['svd_seconds']:.1f} | {b['rank_selection_seconds']:.1f} |")
    add("")
    add("**Readout modes at equal directions** (scores of the difference modes against the JVP's, same k or same 10 sources, 16 test queries).\n")
    add("| N | " + " | ".join(["compressed central diff. (Spearman / max rel. err.)", "compressed one-sided", "source central diff. (Pearson / max rel. err.)", "source one-sided"]) + " |")
    add("|---|---|---|---|---|")
    for n in sizes:
        m = per_size[n]["readouts"]["mode_fidelity"]
        add(f"| {_n(n)} | {m['compressed (central_difference)']['spearman_vs_jvp']:.5f} / {m['compressed (central_difference)']['max_relative_error']:.1e} | "
            f"{m['compressed (one_sided)']['spearman_vs_jvp']:.5f} / {m['compressed (one_sided)']['max_relative_error']:.1e} | "
            f"{m['source (central_difference)']['pearson_vs_jvp']:.6f} / {m['source (central_difference)']['max_relative_error']:.1e} | "
            f"{m['source (one_sided)']['pearson_vs_jvp']:.6f} / {m['source (one_sided)']['max_relative_error']:.1e} |")
    add("")
    add("**Peers** on the same model and documents (scores against ours: mean over 16 test queries of the per-query correlation "
        "across documents, ours = exact scores of the stored responses).\n")
    add("| N | peer | precompute (s) | precompute / epoch (CPU) | per query alone (ms) | per query, batch of 16 (ms) | Spearman with ours | Pearson with ours |")
    add("|---|---|---|---|---|---|---|---|")
    for n in sizes:
        d = per_size[n]
        epoch = d["epoch"].get("epoch_cpu_seconds", d["epoch"]["epoch_seconds"])
        for name, key in (("Kronfluence (EK-FAC, λ = 1e-3)", "kronfluence"), ("Bergson (gradient dot product)", "bergson")):
            v = d.get(key)
            if not v:
                continue
            if "error" in v:
                add(f"| {_n(n)} | {name} | did not run: `{v['error']}` | | | | | |")
                continue
            scale = v.get("scale_to_n", 1.0)
            add(f"| {_n(n)} | {name} | {v['precompute_seconds']:.1f} | {v.get('precompute_cpu_seconds', v['precompute_seconds']) / epoch:.2f}× | {_ms(v['single_seconds'] * scale)} | "
                f"{_ms(v['batch_seconds'] * scale / v['batch_queries'])} | {v['vs_ours_exact']['spearman']:.3f} | {v['vs_ours_exact']['pearson']:.3f} |")
    fid = next((per_size[n]["fidelity"] for n in sizes if "fidelity" in per_size[n]), None)
    if fid:
        add("")
        add(f"**Closed form against the iterative reference** (N = {fid['training_examples']:,}; the first {fid['documents']} documents; "
            f"K = {fid['horizon']}, λ = {fid['damping']:g}, η = {fid['step_size']:.4g} for all, from the linearized solver's power "
            f"iteration, h_max = {fid['h_max_minibatch']:.3g}; reference: `linearized`, GGN products on the minibatch sequence, batch 32). "
            "Correlations of scores on 32 test queries: per query across the documents (mean), and pooled over all pairs.\n")
        add("| responses | Spearman | Pearson | pooled Pearson | eigenbasis estimate (s) |")
        add("|---|---|---|---|---|")
        for label, row in fid["rows"].items():
            add(f"| {label} | {row['spearman']:.3f} | {row['pearson']:.3f} | {row['pooled_pearson']:.3f} | "
                f"{row['eigenbasis_seconds']:.1f} |" if "eigenbasis_seconds" in row else
                f"| {label} | {row['spearman']:.3f} | {row['pearson']:.3f} | {row['pooled_pearson']:.3f} | – |")
        epoch = per_size[str(fid["training_examples"])]["epoch"]["epoch_seconds"] if str(fid["training_examples"]) in per_size else None
        add("")
        add(f"Cost of the reference: {fid['linearized_seconds']:.0f} s for {fid['documents']} documents = {fid['linearized_seconds_per_document']:.2f} s "
            f"per document" + (f", i.e. {fid['linearized_seconds_per_document'] * fid['training_examples'] / epoch:,.0f}× an epoch for all "
                                 f"{fid['training_examples']:,} documents (extrapolated)" if epoch else "") + ". "
            f"The explicit eigenbasis (p = {fid['dim']:,}) needs p GGN products per 32 training examples: "
            f"{fid['ggn_product_seconds_per_32_examples'] * 1e3:.0f} ms each, so ≈ {fid['explicit_eigenbasis_seconds_estimate_per_1024_examples'] / 60:,.0f} min "
            "for 1,024 curvature examples — not run.")
    return "\n".join(lines) + "\n"


def plot(per_size: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted(per_size, key=int)
    xs = [int(n) for n in sizes]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True)
    series = [(key, label) for key, label in READOUTS if "central" not in key or key.startswith("source")]
    for ax, column, title in ((axes[0], 0, "one query alone"), (axes[1], 1, "amortised over 16 queries")):
        for key, label in series:
            ys = [per_size[n]["readouts"]["per_query"][key]["alone_seconds" if column == 0 else "batched_seconds_per_query"] for n in sizes]
            ax.plot(xs, ys, marker="o", label=label, linestyle="--" if "exact" in key else "-")
        peers = sorted({label for n in sizes for label in peer_times(per_size[n])})
        for label in peers:
            points = [(int(n), peer_times(per_size[n])[label][column]) for n in sizes if label in peer_times(per_size[n])]
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="s", linestyle=":", label=label.replace("‡", ""))
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("documents N")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("seconds per query")
    axes[1].legend(fontsize=7, loc="upper left")
    fig.suptitle("Per-query readout time against N (tiny Llama + LoRA, p = 3,584, 1 CPU thread)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(per_size: dict, meta: dict) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "results.json").write_text(json.dumps({"meta": meta, "sizes": per_size}, indent=1, default=float))
    (RESULTS / "tables.md").write_text(tables(per_size, meta))
    plot(per_size, RESULTS / "per_query_time.png")
    print(tables(per_size, meta))


if __name__ == "__main__":
    saved = json.loads((RESULTS / "results.json").read_text())
    write_report(saved["sizes"], saved["meta"])
