"""Scale benchmark (issue 8): simulation, compressed and source readout cost against N, fidelity, peers.

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.scale.run                      # N = 10³, 10⁴, 10⁵
    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.scale.run --sizes 1000 10000   # a subset
    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.scale.run --fresh              # recompute everything but the base model

For each N, on a tiny Llama (hidden 64, 2 layers) whose LoRA adapter (r = 8 on q/v, p = 3,584) is trained one
epoch on the N documents: the epoch, the closed-form simulation (EK-FAC on CURVATURE_EXAMPLES examples), the
compressed basis, per-query readout times (interleaved), peak RSS of each readout in a fresh process, and the
peers (Kronfluence, Bergson) on the same model and documents. The fidelity of the closed form against the
linearized solver is measured at one size (--fidelity-size). Step results are cached in
benchmarks/scale/cache/results-n<N>.json (with the artifacts), so an interrupted run continues; the report
goes to benchmarks/scale/results/ (results.json, tables.md, per_query_time.png).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time

import torch

from . import setting
from .corpus import SOURCES

CURVATURE_EXAMPLES = 1024
KRONFLUENCE_MAX_ROWS = 10_000  # beyond this many documents, Kronfluence's pass over the documents is timed on a prefix and scaled
EXACT_ROWS = 2048  # the exact streamed readout is timed on this many rows and scaled by N / EXACT_ROWS


def log(message: str) -> None:
    print(time.strftime("%H:%M:%S"), message, flush=True)


def load_avg() -> float:
    return round(os.getloadavg()[0], 2)


class Results:
    """Per-size step results, cached as JSON next to the artifacts."""

    def __init__(self, n: int):
        self.path = setting.CACHE / f"results-n{n}.json"
        self.data = json.loads(self.path.read_text()) if self.path.is_file() else {}

    def step(self, name: str, compute) -> dict:
        if name not in self.data:
            log(f"  {name} …")
            before = load_avg()
            start, cpu = time.perf_counter(), time.process_time()
            value = compute()
            value["step_wall_seconds"] = time.perf_counter() - start
            value["step_cpu_seconds"] = time.process_time() - cpu
            value["load_average_before_after"] = [before, load_avg()]
            self.data[name] = value
            self.path.write_text(json.dumps(self.data, indent=1, default=float))
            log(f"  {name} done in {value['step_wall_seconds']:.1f} s")
        return self.data[name]


def _memory(n: int, readout: str, queries: int) -> dict:
    command = [sys.executable, "-m", "benchmarks.scale.memory", "--n", str(n), "--readout", readout, "--queries", str(queries)]
    out = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=setting.CACHE.parent.parent.parent)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _spearman(a: torch.Tensor, b: torch.Tensor) -> dict:
    from hf_fwdattr.stats import pearson_rows, spearman_rows

    return {"spearman": float(spearman_rows(a, b).nanmean()), "pearson": float(pearson_rows(a, b).nanmean())}


def run_size(n: int, fidelity_size: int, tok) -> dict:
    from hf_fwdattr import AttributionSubspace, InfluenceArtifact, document_gradients, query_gradients

    from . import fidelity, ours, peers
    from .model import TASK

    log(f"N = {n:,}")
    results = Results(n)
    documents, examples, _ = setting.documents(n, tok)
    fidelity_queries, test_queries = setting.queries(tok)
    directory = setting.size_dir(n)
    trained = {}

    def train():
        shutil.rmtree(directory / "adapter", ignore_errors=True)
        trained["model"], seconds = setting.model(n, examples, tok)
        return {**seconds, "steps": -(-n // 32), "documents": n,
                "tokens": sum(len(e["input_ids"]) for e in examples)}

    results.step("epoch", train)
    model = trained.get("model") or setting.model(n, examples, tok)[0]

    def simulate():
        shutil.rmtree(directory / "influence", ignore_errors=True)
        return ours.build_artifact(model, documents, examples, directory / "influence", CURVATURE_EXAMPLES)

    results.step("simulation", simulate)
    artifact = InfluenceArtifact.from_pretrained(directory / "influence")
    results.step("basis", lambda: ours.attach_basis(artifact, model, fidelity_queries, test_queries)[0])
    artifact = InfluenceArtifact.from_pretrained(directory / "influence")
    results.step("readouts", lambda: ours.time_readouts(artifact, model, test_queries, exact_rows=EXACT_ROWS))
    results.step("memory", lambda: {readout: _memory(n, readout, 1 if readout == "exact" else 16)
                                    for readout in ("compressed", "source", "exact", "gradient")})

    def reference_scores(rows: int | None = None) -> torch.Tensor:
        from .ours import streamed_scores

        with AttributionSubspace.build(model) as subspace:
            scores = streamed_scores(query_gradients(subspace, TASK, test_queries[:16]), artifact)
        return scores if rows is None else scores[:, :rows]

    def kronfluence():
        rows = min(n, KRONFLUENCE_MAX_ROWS)
        from hf_fwdattr.estimator.eigenbasis import curvature_subset

        indices = curvature_subset(list(range(n)), CURVATURE_EXAMPLES, seed=0)  # the same examples our EK-FAC is estimated on
        value = peers.kronfluence_peer(model, examples, indices, test_queries, rows, directory / "kronfluence", ours.DAMPING, single_rows=rows)
        scores = value.pop("scores")
        value["vs_ours_exact"] = _spearman(reference_scores(rows), scores)
        value["scale_to_n"] = n / rows
        return value

    def bergson():
        value = peers.bergson_peer(model, examples, test_queries, directory / "bergson")
        scores = value.pop("scores")
        value.pop("single_scores")
        value["vs_ours_exact"] = _spearman(reference_scores(), scores)
        with AttributionSubspace.build(model) as subspace:  # Bergson's index holds ∇L_b: check it against ours, −(∇f_q · g_b)
            rows = list(range(min(n, 2048)))
            ours_dot = -(query_gradients(subspace, TASK, test_queries[:16]) @ document_gradients(subspace, TASK, documents, 256, indices=rows).T).double()
        value["vs_gradient_dot"] = _spearman(ours_dot, scores[:, rows])
        shutil.rmtree(directory / "bergson.part", ignore_errors=True)  # N × p floats: not worth keeping
        return value

    for name, compute in (("kronfluence", kronfluence), ("bergson", bergson)):
        try:
            results.step(name, compute)
        except Exception as err:  # a peer that does not run here is reported with its error, not skipped silently
            log(f"  {name} failed: {type(err).__name__}: {err}")
            results.data[name] = {"error": f"{type(err).__name__}: {err}"}
    if n == fidelity_size:
        results.step("fidelity", lambda: fidelity.closed_form_fidelity(model, documents, examples, artifact, test_queries))
    return results.data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 10_000, 100_000])
    parser.add_argument("--fidelity-size", type=int, default=10_000, help="N at which the closed form is compared with the linearized solver")
    parser.add_argument("--fresh", action="store_true", help="recompute every step (the base model and tokenizer are kept)")
    args = parser.parse_args()
    if args.fresh:
        for n in args.sizes:
            shutil.rmtree(setting.size_dir(n), ignore_errors=True)
            (setting.CACHE / f"results-n{n}.json").unlink(missing_ok=True)
    start = time.perf_counter()
    log(f"threads: {torch.get_num_threads()} (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}), load average {os.getloadavg()}")
    tok = setting.tokenizer()
    setting.base(tok)  # trained once, then cached
    per_size = {str(n): run_size(n, args.fidelity_size, tok) for n in sorted(args.sizes)}
    from .report import write_report

    meta = {"threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
            "cpu_count": os.cpu_count(), "sources": len(SOURCES), "curvature_examples": CURVATURE_EXAMPLES,
            "exact_rows": EXACT_ROWS, "kronfluence_max_rows": KRONFLUENCE_MAX_ROWS,
            "command": "OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.scale.run " + " ".join(sys.argv[1:]),
            "wall_seconds_this_invocation": time.perf_counter() - start}
    write_report(per_size, meta)
    log(f"done in {meta['wall_seconds_this_invocation'] / 60:.1f} min")


if __name__ == "__main__":
    main()
