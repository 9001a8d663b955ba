"""LDS ground truth for the fact model: the LoRA fine-tune retrained on random halves of its documents.

Every retraining starts from the same pretrained base (``model/model.safetensors`` of the fact model) and
repeats the demo's fine-tuning recipe exactly (`hf_fwdattr.demo.run.train_fact_model`: LoRA r = 8 on every
projection, 30 epochs, AdamW at 1e-2 with a linear schedule, batch 8) on the documents of one subset,
with `seeds` LoRA-initialisation / data-order seeds per subset (10 000 + …, none of them θ*'s). The
measurement is f_q = log p(answer | prompt) of every query, averaged over seeds. Two full-data
retrainings per seed give the seed-to-seed spread for reference.

Cached (resumable, one subset at a time) under ``benchmarks/lm/cache/<name>/``, keyed on the settings, the
documents and the base model's weights.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

CACHE = Path(__file__).resolve().parent / "cache"


def base_dir_of(model_dir: Path) -> Path:
    """The folder of the base model that the adapter in `model_dir` names (the demo saves base and adapter apart)."""
    return Path(json.loads((Path(model_dir) / "adapter_config.json").read_text())["base_model_name_or_path"])


def load_base(model_dir: Path):
    """The pretrained base of the fact model, without its adapter."""
    from transformers import LlamaConfig, LlamaForCausalLM

    base_dir = base_dir_of(model_dir)
    model = LlamaForCausalLM(LlamaConfig.from_pretrained(base_dir))
    model.load_state_dict(load_file(base_dir / "model.safetensors"), strict=False)
    model.tie_weights()
    return model


def retrain(model_dir: Path, rows: list[dict], seed: int, task, epochs: int = 30, learning_rate: float = 1e-2):
    """The demo's LoRA fine-tune on `rows` (``{"input_ids"}``) from the pretrained base, seeded."""
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer
    from transformers.utils import logging as hf_logging

    from hf_fwdattr.demo.run import LORA_TARGETS, collator, training_arguments

    hf_logging.set_verbosity_error()
    torch.manual_seed(seed)
    model = get_peft_model(load_base(model_dir), LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=LORA_TARGETS))
    with tempfile.TemporaryDirectory() as tmp:
        args = training_arguments(Path(tmp), epochs, learning_rate, 8, seed)
        args.disable_tqdm, args.logging_steps = True, 10_000
        Trainer(model=model, args=args, train_dataset=Dataset.from_list(rows), data_collator=collator(task)).train()
    return model.eval()


@torch.inference_mode()
def measure(model, task, queries: list[dict]) -> torch.Tensor:
    """f_q = log p(answer | prompt) for every query (float64)."""
    return task.measurement(model, task.collate(queries)).double()


def generate(name: str, model_dir: Path, documents: list[dict], queries: list[dict], task, n_subsets: int = 64, seeds: int = 2,
             fraction: float = 0.5, seed: int = 0, log=print) -> dict:
    """Retrain on `n_subsets` random subsets (each holding `fraction` of the documents) × `seeds`, resuming a cache."""
    directory = CACHE / name
    directory.mkdir(parents=True, exist_ok=True)
    path, meta_path = directory / "ground_truth.safetensors", directory / "ground_truth.json"
    n = len(documents)
    settings = {"n_subsets": n_subsets, "seeds": seeds, "fraction": fraction, "seed": seed, "n_documents": n, "n_queries": len(queries),
                "document_ids": [d["document_id"] for d in documents],
                "base_sha256": hashlib.sha256((base_dir_of(model_dir) / "model.safetensors").read_bytes()).hexdigest()}
    if path.is_file() and json.loads(meta_path.read_text())["settings"] == settings:
        tensors = load_file(path)
        meta = json.loads(meta_path.read_text())
    else:
        rng = np.random.default_rng(seed + 1)
        subsets = torch.zeros(n_subsets, n, dtype=torch.bool)
        for j in range(n_subsets):
            subsets[j, rng.choice(n, int(round(fraction * n)), replace=False)] = True
        tensors = {"subsets": subsets, "outputs": torch.full((seeds, n_subsets, len(queries)), float("nan"), dtype=torch.float64),
                   "full_outputs": torch.full((seeds, len(queries)), float("nan"), dtype=torch.float64)}
        meta = {"settings": settings, "seconds": 0.0, "done": 0, "full_done": False}
    rows = [{"input_ids": d["input_ids"]} for d in documents]

    def save():
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"format": "pt"})
        meta_path.write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")

    start = time.perf_counter() - meta["seconds"]
    if not meta["full_done"]:
        for s in range(seeds):
            tensors["full_outputs"][s] = measure(retrain(model_dir, rows, 10_000 + s, task), task, queries)
        meta["full_done"] = True
        meta["seconds"] = time.perf_counter() - start
        save()
    for j in range(meta["done"], n_subsets):
        chosen = [rows[i] for i in torch.nonzero(tensors["subsets"][j]).flatten().tolist()]
        for s in range(seeds):
            tensors["outputs"][s, j] = measure(retrain(model_dir, chosen, 10_000 + seeds * (j + 1) + s, task), task, queries)
        meta["done"] = j + 1
        meta["seconds"] = time.perf_counter() - start
        save()
        log(f"[{name}] subset {j + 1}/{n_subsets} retrained ({meta['seconds']:.0f}s)")
    return {**tensors, "seconds": meta["seconds"], "settings": settings}


def main() -> None:
    from benchmarks.lm.setup import NAME, evaluation_setup

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subsets", type=int, default=64)
    parser.add_argument("--seeds", type=int, default=2)
    args = parser.parse_args()
    setup = evaluation_setup()
    generate(NAME, setup["model_dir"], setup["documents"], setup["queries"], setup["task"], args.subsets, args.seeds)


if __name__ == "__main__":
    main()
