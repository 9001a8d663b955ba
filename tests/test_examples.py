"""The four examples run end to end, as a user runs them (each in its own process, outputs in a temporary folder,
run from a temporary working directory so that their defaults relative to it, e.g. runs/examples/base, land there)."""

import os
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args, env: dict, cwd: Path) -> str:
    run = subprocess.run([sys.executable, str(ROOT / "examples" / script), *map(str, args)], cwd=cwd, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, f"{script} failed:\n{run.stderr[-3000:]}"
    return run.stdout


def test_examples_run_end_to_end(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    lora = tmp_path / "lora"
    out = _run("lora_callback_pipeline.py", lora, env=env, cwd=tmp_path)
    assert (lora / "influence" / "attribution_config.json").is_file() and "top source" in out
    out = _run("full_finetune_projection.py", tmp_path / "full", env=env, cwd=tmp_path)
    assert "the model itself has no adapter: True" in out
    out = _run("audit_pairs.py", lora / "model", lora / "influence", env=env, cwd=tmp_path)
    assert "documents:" in out and "sources:" in out
    out = _run("hub_push_load.py", lora / "influence", lora / "model", env=env, cwd=tmp_path)
    assert "Loaded back from" in out
