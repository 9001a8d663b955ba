"""Peak resident memory of the streamed readout as the number of stored responses N grows (issue 5).

For each N an artifact of N random responses (tiny Llama + LoRA, p = 896) is written shard by shard,
then a fresh process loads it (memory-mapped), binds the model and scores 8 queries against all N
responses in JVP mode, streaming 4,096 rows at a time. The figure that must stay flat is the peak RSS
of that process above its RSS right after loading the model.

    .venv/bin/python benchmarks/artifact_memory.py            # N = 1e3, 1e4, 1e5
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _model():
    from peft import LoraConfig, get_peft_model

    from hf_fwdattr.demo.toy import tiny_llama

    return get_peft_model(tiny_llama(64), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)).eval()


def _queries():
    from hf_fwdattr import CausalLMTask

    generator = torch.Generator().manual_seed(0)
    return [CausalLMTask.query_example(torch.randint(3, 64, (4,), generator=generator).tolist(),
                                       torch.randint(3, 64, (8,), generator=generator).tolist()) for _ in range(8)]


def write_artifact(directory: Path, n: int) -> None:
    """An artifact of `n` random responses, written shard by shard (the writer never holds all rows)."""
    from hf_fwdattr import AttributionConfig, AttributionSubspace, DocumentTable, InfluenceArtifact
    from hf_fwdattr.storage.shards import ShardWriter

    subspace = AttributionSubspace.build(_model())
    config = AttributionConfig()
    table = DocumentTable([f"doc-{i}" for i in range(n)], [f"source-{i % 10}" for i in range(n)])
    identity = {"benchmark": "artifact_memory", "n": n}
    writer = ShardWriter(directory, identity, n, subspace.dim, torch.float32, max_shard_size="16MB")
    generator = torch.Generator().manual_seed(n)
    for index, lo, hi in writer.pending():
        writer.write(index, torch.randn(hi - lo, subspace.dim, generator=generator) * 1e-2)
    store = writer.finish()
    artifact = InfluenceArtifact(
        config=config, subspace_spec=subspace.spec, documents=table, responses=store,
        model_fingerprint=subspace.model_fingerprint, subspace_fingerprint=subspace.fingerprint,
    )
    artifact.save_pretrained(directory)


def measure(directory: str) -> dict:
    """Run in a fresh process: load, bind, score; report RSS figures in MiB."""
    from hf_fwdattr import CausalLMTask, ForwardReadout, InfluenceArtifact

    def rss_now() -> float:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024

    model = _model()
    task = CausalLMTask(pad_token_id=0)
    queries = _queries()
    artifact = InfluenceArtifact.from_pretrained(directory)
    subspace = artifact.bind(model)
    readout = ForwardReadout(subspace, task, "jvp", chunk_size=64)
    readout.scores(queries, artifact.responses(list(range(64))))  # warm up kernels before the baseline
    baseline = rss_now()
    start = time.perf_counter()
    scores = readout.scores(queries, artifact.iter_responses(chunk_rows=4096), num_directions=artifact.num_documents)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"n": artifact.num_documents, "dim": artifact.dim, "baseline_mib": baseline, "peak_mib": peak,
            "peak_above_baseline_mib": peak - baseline, "responses_mib": artifact.num_documents * artifact.dim * 4 / 2**20,
            "readout_seconds": seconds, "scores_shape": list(scores.shape), "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 10_000, 100_000])
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure)))
        return
    rows = []
    for n in args.sizes:
        with tempfile.TemporaryDirectory() as tmp:
            write_artifact(Path(tmp), n)
            out = subprocess.run([sys.executable, __file__, "--measure", tmp], capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    print("\n| N | responses on disk (MiB) | peak RSS (MiB) | peak above baseline (MiB) | readout time (s) |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['n']:,} | {row['responses_mib']:.1f} | {row['peak_mib']:.1f} | {row['peak_above_baseline_mib']:.1f} | {row['readout_seconds']:.1f} |")


if __name__ == "__main__":
    main()
