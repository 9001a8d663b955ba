"""Peak resident memory of one readout in a fresh process (the pattern of benchmarks/artifact_memory.py).

    python -m benchmarks.scale.memory --n 1000 --readout compressed --queries 16

Baseline: RSS after the imports, the model and a warm-up readout of the same kind on random directions — before
the artifact is opened; the kernel's peak mark (VmHWM) is reset there. Reported: the peak RSS from then on and
peak − baseline, i.e. what loading the artifact, binding it and scoring the queries added — and, sampled every
5 ms, how much of it was anonymous memory and how much pages of the memory-mapped shards (RssAnon / RssFile).
"""

from __future__ import annotations

import argparse
import json
import threading
import time

import torch


def _status(field: str) -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field)) / 1024


def rss_mib() -> float:
    return _status("VmRSS:")


def reset_peak() -> None:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux: `5` written to /proc/self/clear_refs)."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def measure(n: int, readout: str, n_queries: int) -> dict:
    from hf_fwdattr import ArtifactScorer, AttributionSubspace, ForwardReadout, InfluenceArtifact, query_gradients

    from . import setting
    from .model import TASK
    from .ours import streamed_scores

    model, _ = setting.model(n)
    queries = setting.queries()[1][:n_queries]
    with AttributionSubspace.build(model) as subspace:  # warm-up: kernels and allocator, no artifact yet
        if readout == "gradient":
            query_gradients(subspace, TASK, queries)
        else:
            ForwardReadout(subspace, TASK, "jvp").scores(queries, torch.randn(64, subspace.dim) * 1e-3)
    reset_peak()  # the peak is then that of what follows, not of the set-up
    baseline = rss_mib()
    baseline_parts = {field: _status(field + ":") for field in ("RssAnon", "RssFile")}
    peaks, done = dict(baseline_parts), threading.Event()

    def poll() -> None:  # what the peak is made of: anonymous memory, or pages of the memory-mapped shards
        while not done.is_set():
            for field in peaks:
                peaks[field] = max(peaks[field], _status(field + ":"))
            time.sleep(0.005)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    start = time.perf_counter()
    artifact = InfluenceArtifact.from_pretrained(setting.size_dir(n) / "influence")
    scorer = ArtifactScorer(artifact, model, TASK, use_basis=readout == "compressed")
    if readout in ("compressed", "exact"):
        scores = scorer.document_scores(queries)
    elif readout == "source":
        scores = scorer.source_scores(queries)
    else:
        scores = streamed_scores(query_gradients(scorer.subspace, TASK, queries), artifact, dtype=torch.float32)
    seconds = time.perf_counter() - start
    peak = _status("VmHWM:")
    done.set()
    poller.join()
    return {"n": n, "readout": readout, "queries": n_queries, "baseline_mib": baseline, "peak_mib": peak,
            "peak_above_baseline_mib": peak - baseline, "seconds": seconds,
            "anonymous_above_baseline_mib": peaks["RssAnon"] - baseline_parts["RssAnon"],
            "file_backed_above_baseline_mib": peaks["RssFile"] - baseline_parts["RssFile"], "scores_shape": list(scores.shape),
            "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, required=True)
    parser.add_argument("--readout", choices=["compressed", "source", "exact", "gradient"], required=True)
    parser.add_argument("--queries", type=int, default=16)
    args = parser.parse_args()
    print(json.dumps(measure(args.n, args.readout, args.queries)))


if __name__ == "__main__":
    main()
