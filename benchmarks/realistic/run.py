"""The realistic run (issue 18), one command:

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.realistic.run                 # preset "full": ~24M Llama, LoRA p ≈ 6e5, N = 10⁴
    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.realistic.run --preset small  # the same pipeline in minutes

Steps, each in a fresh process and cached as JSON under benchmarks/realistic/cache/<preset>/ (--fresh recomputes):

1. finetune: the base Llama pretrained briefly from scratch (cached), then one LoRA epoch through `Trainer` with
   `ForwardAttributionCallback` writing the artifact (compressed: N × p would exceed the 4 GB default budget);
2. evaluate: compressed against exact scores on held-out documents, per-query readout time, the pipeline;
3. memory: the same Trainer + callback run at N / 10 documents with the rank the N run chose (peak RSS at fixed p);
4. report: benchmarks/realistic/results/<preset>.json and .md, including the on-paper table (benchmarks/realistic/paper.py).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from . import setting

RESULTS = Path(__file__).resolve().parent / "results"


def log(message: str) -> None:
    print(time.strftime("%H:%M:%S"), message, flush=True)


def step(preset: setting.Preset, name: str, arguments: list[str], fresh: bool) -> dict:
    """Run `python -m benchmarks.realistic.<module> ...` in a fresh process; its last stdout line is the JSON result."""
    path = setting.cache(preset) / f"step-{name}.json"
    if path.is_file() and not fresh:
        return json.loads(path.read_text())
    log(f"{name}: {' '.join(arguments)}")
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", *arguments], capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2],
                         env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    if out.returncode != 0:
        raise SystemExit(f"{name} failed:\n{out.stderr[-4000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["step_wall_seconds"] = time.perf_counter() - start
    path.write_text(json.dumps(result, indent=1))
    log(f"{name}: done in {result['step_wall_seconds']:.0f} s")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="full", choices=sorted(setting.PRESETS))
    parser.add_argument("--fresh", action="store_true", help="recompute every step (the pretrained base stays cached)")
    args = parser.parse_args()
    preset = setting.PRESETS[args.preset]
    finetune = step(preset, "finetune", ["benchmarks.realistic.finetune", "--preset", preset.name], args.fresh)
    evaluate = step(preset, "evaluate", ["benchmarks.realistic.evaluate", "--preset", preset.name], args.fresh)
    memory = step(preset, "memory", ["benchmarks.realistic.finetune", "--preset", preset.name, "--n", str(preset.small_documents),
                                     "--rank", str(finetune["rank"]), "--scratch"], args.fresh)
    from .report import write

    RESULTS.mkdir(exist_ok=True)
    results = {"preset": setting.describe(preset), "finetune": finetune, "evaluate": evaluate, "memory": memory}
    (RESULTS / f"{preset.name}.json").write_text(json.dumps(results, indent=1))
    write(results, RESULTS / f"{preset.name}.md")
    log(f"report: {RESULTS / (preset.name + '.md')}")


if __name__ == "__main__":
    main()
