"""What content addressing and the staged save cost (issue 16).

One artifact of N random float32 responses of dimension p, in 16 MB shards. Measured in one process:

- save: `save_pretrained` of the in-memory artifact (shards written into the staging folder, every shard hashed
  again for the index, metadata, swap), against writing the same shards alone with `safetensors.torch.save_file`;
- load: `from_pretrained` (sealed config, table, index, sums read and hashed; shard headers checked) and `verify()`
  (every shard byte hashed, rows digest, finiteness, source sums);
- streaming every row in 4,096-row chunks and summing it (scoring touches every value): the pinned reader (`pread`
  through descriptors kept open, what scoring uses) against safetensors' `safe_open(...).get_slice` (what the reader
  used before), interleaved, best of 3.

    .venv/bin/python benchmarks/artifact_integrity.py                    # N = 50,000, p = 1,024 (205 MB)
    .venv/bin/python benchmarks/artifact_integrity.py --rows 5000 --dim 256
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _timed(function):
    wall, cpu = time.perf_counter(), time.process_time()
    result = function()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from safetensors import safe_open
    from safetensors.torch import save_file

    from hf_fwdattr import AttributionConfig, DocumentTable, InfluenceArtifact
    from hf_fwdattr.estimator.subspace import SubspaceSpec

    generator = torch.Generator().manual_seed(0)
    responses = torch.randn(args.rows, args.dim, generator=generator) * 1e-2
    table = DocumentTable([f"doc-{i}" for i in range(args.rows)], [f"source-{i % 100}" for i in range(args.rows)])
    artifact = InfluenceArtifact(config=AttributionConfig(), subspace_spec=SubspaceSpec(kind="trainable", parameter_names=["w"]),
                                 documents=table, responses=responses, model_fingerprint="m" * 64, subspace_fingerprint="s" * 64)
    figures = {"rows": args.rows, "dim": args.dim, "megabytes": responses.numel() * 4 / 1e6, "threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as tmp:
        folder, plain = Path(tmp) / "artifact", Path(tmp) / "plain"
        plain.mkdir()
        per_shard = max(1, 16_000_000 // (4 * args.dim))

        def shards_only():
            for index, lo in enumerate(range(0, args.rows, per_shard)):
                save_file({"responses": responses[lo : lo + per_shard].contiguous()}, str(plain / f"s{index}.safetensors"), metadata={"format": "pt"})

        _, figures["write_shards_only_s"], figures["write_shards_only_cpu_s"] = _timed(shards_only)
        _, figures["save_pretrained_s"], figures["save_pretrained_cpu_s"] = _timed(lambda: artifact.save_pretrained(folder, max_shard_size="16MB"))
        loaded, figures["from_pretrained_s"], figures["from_pretrained_cpu_s"] = _timed(lambda: InfluenceArtifact.from_pretrained(folder))
        _, figures["verify_s"], figures["verify_cpu_s"] = _timed(loaded.verify)
        names = [shard.filename for shard in loaded.store.shards]

        def pinned():  # every value is touched, as scoring does (safetensors' slices are lazy views of a memory map)
            return sum(len(block) + 0 * float(block.sum()) for block in loaded.iter_responses(chunk_rows=4096))

        def safetensors_slices():
            rows = 0
            for name in names:
                with safe_open(str(folder / name), framework="pt") as handle:
                    view = handle.get_slice("responses")
                    count = view.get_shape()[0]
                    for lo in range(0, count, 4096):
                        block = view[lo : min(lo + 4096, count)]
                        rows += len(block) + 0 * float(block.sum())
            return rows

        best = {"pinned": (float("inf"), 0.0), "safetensors": (float("inf"), 0.0)}
        for _ in range(args.repeats):  # interleaved: contention from other processes hits both alike
            for name, reader in (("pinned", pinned), ("safetensors", safetensors_slices)):
                rows, wall, cpu = _timed(reader)
                assert rows == args.rows
                best[name] = min(best[name], (wall, cpu))
        for name, (wall, cpu) in best.items():
            figures[f"stream_{name}_s"], figures[f"stream_{name}_cpu_s"] = wall, cpu
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
