"""Markdown tables of the realistic run (benchmarks/realistic/results/<preset>.md), from its results JSON.

    .venv/bin/python -m benchmarks.realistic.report [--preset full]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .paper import Calibration, table


def _mib(value: float) -> str:
    return f"{value:,.0f}"


def _bytes(value: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if value >= scale:
            return f"{value / scale:.3g} {unit}"
    return f"{value:.0f} B"


def render(results: dict) -> str:
    run, evaluation, memory = results["finetune"], results["evaluate"], results["memory"]
    fidelity, simulation = run["fidelity"], run["simulation"]
    epoch_wall, epoch_cpu = run["epoch_seconds"], run["epoch_cpu_seconds"]
    cpu_ratio = run["build_cpu_seconds"] / run["build_seconds"]

    def stage(name: str, wall: float, cpu: float | None) -> str:
        cpu_text = f"{cpu:,.0f} | {cpu / epoch_cpu:.2f}×" if cpu is not None else "– | –"
        return f"| {name} | {wall:,.0f} | {wall / epoch_wall:.2f}× | {cpu_text} |"

    lines = [
        f"Model: Llama from `LlamaConfig` (hidden {results['preset']['hidden']}, {results['preset']['layers']} layers, intermediate "
        f"{results['preset']['intermediate']}, {results['preset']['heads']} heads / {results['preset']['kv_heads']} kv heads), "
        f"{run['parameters'] / 1e6:.1f}M parameters; LoRA r = {results['preset']['lora_rank']} on all linear layers: p = {run['p']:,}; "
        f"N = {run['n']:,} documents; {run['threads']} torch thread(s); load average at the end {run['load_average']:.1f} on 2 cores.",
        "",
        "**Stages** (Trainer epoch = one LoRA epoch over the N documents, batch 32; the callback's build after it).",
        "",
        "| stage | wall (s) | × epoch (wall) | CPU (s) | × epoch (CPU) |",
        "|---|---|---|---|---|",
        stage("one fine-tuning epoch (Trainer)", epoch_wall, epoch_cpu),
        stage("whole build (ForwardAttributionCallback.on_train_end)", run["build_seconds"], run["build_cpu_seconds"]),
        stage("· EK-FAC eigenbasis (1,024 examples)", simulation["curvature_seconds"], simulation.get("curvature_cpu_seconds")),
        stage(f"· first pass: exact responses of {fidelity['compression_sample_documents']:,} sample + "
              f"{fidelity['compression_validation_documents']:,} validation documents", fidelity["compression_first_pass_seconds"],
              fidelity.get("compression_first_pass_cpu_seconds")),
        stage("· basis (Gram matrix, V) and rank choice", fidelity["compression_basis_seconds"], None),
        stage("· second pass: every document projected (coefficients written)", fidelity["compression_second_pass_seconds"],
              fidelity.get("compression_second_pass_cpu_seconds")),
        "",
        f"**Artifact on disk**: {_bytes(run['artifact_bytes'])} for k = {run['rank']} directions; full responses would take "
        f"N × p × 4 = {_bytes(run['exact_responses_bytes'])}: **{100 * run['artifact_bytes'] / run['exact_responses_bytes']:.2f}%**.",
        "",
        "**Peak RSS** (MiB; the kernel's high-water mark reset when training ends, so the build's peak is its own).",
        "",
        "| N | p | k | RSS at train begin | peak during training | RSS at build start | peak during build | build peak − build start "
        "| anonymous RSS, highest sample during build |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for entry in (memory, run):
        lines.append(f"| {entry['n']:,} | {entry['p']:,} | {entry['rank']} | {_mib(entry['rss_at_train_begin_mib'])} | "
                     f"{_mib(entry['process_peak_during_training_mib'])} | {_mib(entry['rss_at_build_start_mib'])} | "
                     f"{_mib(entry['build_peak_mib'])} | {_mib(entry['build_peak_above_start_mib'])} | "
                     f"{_mib(entry['build_anon_peak_sampled_mib']) if entry.get('build_anon_peak_sampled_mib') else 'not sampled'} |")
    series = run["rss_series"]
    if series:
        marks = [series[int(i * (len(series) - 1) / 8)] for i in range(9)]
        lines += ["", "RSS during the N = {:,} build (s: MiB, anonymous MiB where sampled): ".format(run["n"])
                  + ", ".join(f"{entry[0]:.0f}: {entry[1]:,}" + (f" ({entry[2]:,})" if len(entry) > 2 else "") for entry in marks) + "."]
    lines += [
        "",
        f"**Compressed against exact scores on {evaluation['heldout_documents']} held-out documents** (neither in the sample nor in "
        "the validation set; exact responses simulated again, scored by backward passes; compressed scores through the artifact, forward "
        "passes only). Per-query correlation across the held-out documents, mean over queries.",
        "",
        "| queries | Spearman (mean) | Spearman (worst query) | Pearson | top-10 overlap | Spearman at rank 8 / 32 / 128 / 512 of the same basis |",
        "|---|---|---|---|---|---|",
    ]
    for name, label in (("fact_queries", "64 fact questions (log p(answer | prompt))"), ("training_queries", "32 training documents as queries")):
        entry = evaluation[name]
        curve = " / ".join(f"{entry['spearman_by_rank'][str(r)]:.3f}" if str(r) in entry["spearman_by_rank"] else "–" for r in (8, 32, 128, 512))
        lines.append(f"| {label} | {entry['spearman']:.4f} | {entry['spearman_min']:.4f} | {entry['pearson']:.4f} | {entry['top10_overlap']:.3f} | {curve} |")
    lines += [
        "",
        f"Recorded in the artifact by the build (training examples as queries): validation Spearman {fidelity.get('compression_validation_spearman', float('nan')):.4f} "
        f"at the chosen rank (target {run['compression'].get('fidelity', 0.95)}), held-out Spearman {fidelity.get('compression_heldout_spearman', float('nan')):.4f} "
        f"/ Pearson {fidelity.get('compression_heldout_pearson', float('nan')):.4f} on {fidelity.get('compression_heldout_documents', 0)} documents. "
        f"Stored coefficients against the projection of the re-simulated responses: max relative difference "
        f"{evaluation['stored_vs_recomputed_coefficients_max_relative_difference']:.2g}.",
        "",
        "**Per query** (one query alone, median of 5; wall / CPU seconds):",
        "",
        "| readout | wall (s) | CPU (s) |",
        "|---|---|---|",
    ]
    for key, label in (("document_readout", f"documents: k = {evaluation['rank']} directions, then N × k coefficients"),
                       ("source_readout", "sources: 10 summed responses"),
                       ("text_generation", "`text-generation`, 4 new tokens (no attribution)"),
                       ("attributed_generation_documents", "`attributed-text-generation`, 4 tokens, top 5 documents"),
                       ("attributed_generation_sources", "`attributed-text-generation`, 4 tokens, top 5 sources")):
        lines.append(f"| {label} | {evaluation[key]['wall']:.3f} | {evaluation[key]['cpu']:.3f} |")
    lines += ["", "**On paper** (`python -m benchmarks.realistic.paper`):", "", table(Calibration.from_results(results))]
    return "\n".join(lines) + "\n"


def write(results: dict, path: Path) -> None:
    path.write_text(render(results))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default="full")
    args = parser.parse_args()
    directory = Path(__file__).resolve().parent / "results"
    results = json.loads((directory / f"{args.preset}.json").read_text())
    write(results, directory / f"{args.preset}.md")
    print((directory / f"{args.preset}.md").read_text())


if __name__ == "__main__":
    main()
