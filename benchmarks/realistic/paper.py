"""On paper: what the compressed build costs for the models users fine-tune, from their published configs.

    .venv/bin/python -m benchmarks.realistic.paper [--results benchmarks/realistic/results/full.json]

LoRA r = 16 on every linear layer of the blocks (q, k, v, o, gate, up, down). p = layers × r × Σ (d_in + d_out).
Costs are FLOP counts divided by an assumed sustained GPU throughput (stated in the output), calibrated by the
per-stage costs the realistic run measured (its results JSON): the document pass of the simulation against the
training epoch, and the EK-FAC estimate against one pass over its examples. No GPU was used.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

GPU_FLOPS = 200e12
"""Assumed sustained bf16 throughput of one GPU (H100-class) on the model's matmuls, training and per-document gradients alike."""
EIGH_FLOPS = 5e12
"""Assumed throughput of a dense symmetric eigendecomposition (≈ 9 n³ FLOPs), far below matmul peak."""
TOKENS_PER_DOCUMENT = 512
TOKENS_PER_QUERY = 64
CURVATURE_EXAMPLES = 1024
SOURCES = 100
LORA_RANK = 16


@dataclass(frozen=True)
class Architecture:
    """The published config numbers that fix parameter count and LoRA dimension."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool

    def linears(self) -> list[tuple[int, int]]:
        """(d_in, d_out) of q, k, v, o, gate, up, down in one block."""
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        return [(h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)]

    @property
    def parameters(self) -> int:
        body = self.layers * (sum(a * b for a, b in self.linears()) + 2 * self.hidden) + self.hidden
        return body + self.vocab * self.hidden * (1 if self.tied else 2)

    @property
    def forward_flops_per_token(self) -> int:
        """2 × (block weights + the output projection): the embedding lookup costs nothing, the lm_head does."""
        return 2 * (self.layers * sum(a * b for a, b in self.linears()) + self.vocab * self.hidden)

    def lora_dim(self, rank: int = LORA_RANK) -> int:
        return self.layers * rank * sum(a + b for a, b in self.linears())

    def ekfac_floats(self, rank: int = LORA_RANK) -> int:
        """Kronecker factors of the LoRA layers: A (r × d_in): d_in² + r²; B (d_out × r): r² + d_out²."""
        return self.layers * sum(a * a + b * b + 2 * rank * rank for a, b in self.linears())

    def eigh_flops(self, rank: int = LORA_RANK) -> float:
        return self.layers * sum(9.0 * (a**3 + b**3 + 2 * rank**3) for a, b in self.linears())


MODELS = {  # published config.json values
    "SmolLM-135M": Architecture(hidden=576, intermediate=1536, layers=30, heads=9, kv_heads=3, head_dim=64, vocab=49152, tied=True),
    "Qwen2.5-0.5B": Architecture(hidden=896, intermediate=4864, layers=24, heads=14, kv_heads=2, head_dim=64, vocab=151936, tied=True),
    "Llama-3.2-1B": Architecture(hidden=2048, intermediate=8192, layers=16, heads=32, kv_heads=8, head_dim=64, vocab=128256, tied=True),
    "Llama-3.1-8B": Architecture(hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8, head_dim=128, vocab=128256, tied=False),
}


@dataclass(frozen=True)
class Calibration:
    """Per-stage costs measured by the realistic run, as multiples of the matching training work."""

    document_pass: float  # seconds per document of the simulation's passes / seconds per document of the epoch
    curvature: float  # EK-FAC seconds / (curvature examples × epoch seconds per document)
    rank: int  # k the run chose
    sample: int  # documents in the first pass (sample + validation)

    @classmethod
    def from_results(cls, results: dict) -> "Calibration":
        run = results["finetune"]
        n, fidelity = run["n"], run["fidelity"]
        per_document_epoch = run["epoch_cpu_seconds"] / n  # process CPU time: other jobs on the machine distort wall time
        # the two passes simulate every document once (the second re-reads the first pass's) and project them
        passes = fidelity["compression_first_pass_cpu_seconds"] + fidelity["compression_second_pass_cpu_seconds"]
        curvature = run["simulation"]["curvature_cpu_seconds"] / (min(CURVATURE_EXAMPLES, n) * per_document_epoch)
        first = fidelity["compression_sample_documents"] + fidelity["compression_validation_documents"]
        return cls(document_pass=passes / n / per_document_epoch, curvature=curvature, rank=run["rank"], sample=first)


def estimate(model: Architecture, n: int, gpus: int, calibration: Calibration) -> dict:
    """Seconds and bytes of one build of N = `n` documents on `gpus` GPUs (documents shared out; EK-FAC on every GPU)."""
    p, k = model.lora_dim(), calibration.rank
    epoch_document = 3 * model.forward_flops_per_token * TOKENS_PER_DOCUMENT / GPU_FLOPS  # forward + backward ≈ 3 forwards
    epoch = n * epoch_document / gpus
    curvature = calibration.curvature * CURVATURE_EXAMPLES * epoch_document + model.eigh_flops() / EIGH_FLOPS  # not shared out
    documents = calibration.document_pass * n * epoch_document / gpus
    projection = 2.0 * n * k * p / GPU_FLOPS / gpus
    gram = (2.0 * calibration.sample**2 * p + 2.0 * calibration.sample * k * p) / GPU_FLOPS  # on the main process
    simulation = curvature + documents + projection + gram
    readout_directions = 3 * model.forward_flops_per_token * TOKENS_PER_QUERY / GPU_FLOPS  # one JVP ≈ 3 forwards
    return {
        "p": p, "epoch_s": epoch, "simulation_s": simulation, "ratio": simulation / epoch,
        "exact_bytes": 4.0 * n * p, "compressed_bytes": 4.0 * (n * k + SOURCES * p) + 2.0 * k * p,  # the basis in float16 (the default)
        "query_compressed_s": k * readout_directions + 2.0 * n * k / GPU_FLOPS,
        "query_exact_s": n * readout_directions,
        "ekfac_gb": 4.0 * model.ekfac_floats() * 2 / 1e9,  # factors and their eigenvectors, float32
    }


def _size(nbytes: float) -> str:
    for unit, scale in (("PB", 1e15), ("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if nbytes >= scale:
            return f"{nbytes / scale:.3g} {unit}"
    return f"{nbytes / 1e3:.3g} kB"


def _time(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.3g} h"
    if seconds >= 60:
        return f"{seconds / 60:.3g} min"
    if seconds >= 1:
        return f"{seconds:.3g} s"
    return f"{seconds * 1e3:.3g} ms"


def table(calibration: Calibration) -> str:
    """The on-paper table as markdown, with its assumptions."""
    lines = [
        f"Assumptions: LoRA r = {LORA_RANK} on q, k, v, o, gate, up, down; {TOKENS_PER_DOCUMENT} tokens per document, "
        f"{TOKENS_PER_QUERY} per query; one GPU sustains {GPU_FLOPS / 1e12:.0f} TFLOP/s on the model's matmuls (bf16, H100-class) "
        f"and {EIGH_FLOPS / 1e12:.0f} TFLOP/s in eigendecompositions (9 n³ each); forward = 2 × (block weights + vocabulary × hidden) "
        "FLOPs per token; an epoch = N × tokens × 3 forwards (LoRA: no weight gradients of the base). Calibrated by the realistic "
        f"run (CPU): the simulation's document passes cost {calibration.document_pass:.2f}× the epoch per document, the EK-FAC "
        f"estimate {calibration.curvature:.2f}× an epoch over its {CURVATURE_EXAMPLES:,} examples; k = {calibration.rank} "
        f"(the run's rank; the basis stored in float16, coefficients and source sums in float32), a first pass of {calibration.sample:,} documents, {SOURCES} sources. 8 GPUs: `accelerate launch` shares the "
        "documents out; the main process estimates the EK-FAC eigenbasis and broadcasts it (as `build_influence_artifact` does), so its time is not divided.",
        "",
        "| model | params | p (LoRA r=16) | EK-FAC factors + eigenvectors (fp32) | N | GPUs | epoch | simulation | simulation / epoch | exact responses | compressed artifact | per query, compressed (k JVPs) | per query, exact (N JVPs) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, model in MODELS.items():
        for n in (10**4, 10**5, 10**6):
            for gpus in (1, 8):
                e = estimate(model, n, gpus, calibration)
                lines.append(
                    f"| {name} | {model.parameters / 1e6:,.0f}M | {e['p']:,} | {e['ekfac_gb']:.1f} GB | {n:,} | {gpus} | {_time(e['epoch_s'])} | "
                    f"{_time(e['simulation_s'])} | {e['ratio']:.2f}× | {_size(e['exact_bytes'])} | {_size(e['compressed_bytes'])} "
                    f"({100 * e['compressed_bytes'] / e['exact_bytes']:.2g}%) | {_time(e['query_compressed_s'])} | {_time(e['query_exact_s'])} |"
                )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default=str(Path(__file__).resolve().parent / "results" / "full.json"))
    args = parser.parse_args()
    print(table(Calibration.from_results(json.loads(Path(args.results).read_text()))))


if __name__ == "__main__":
    main()
