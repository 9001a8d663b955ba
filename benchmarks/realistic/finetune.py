"""One LoRA fine-tuning epoch through `transformers.Trainer` with `ForwardAttributionCallback`, in a fresh process.

    python -m benchmarks.realistic.finetune --preset full               # N documents of the preset; saves the adapter
    python -m benchmarks.realistic.finetune --preset full --n 1000 --rank 150 --scratch   # the memory comparison

Prints one JSON line: the epoch (Trainer's train_runtime and the process CPU time of training), the callback's build
(wall, CPU, its stages as the artifact records them), the peak RSS of the build (the kernel's high-water mark reset
when training ends) and of the whole process, the RSS (and its anonymous part) every second during the build, and the artifact's size on disk.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import threading
import time
from pathlib import Path

import torch


def _status(field: str) -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field)) / 1024


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as handle:  # Linux: the peak RSS mark (VmHWM) restarts from the current RSS
        handle.write("5")


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="full")
    parser.add_argument("--n", type=int, default=None, help="documents (default: the preset's N)")
    parser.add_argument("--rank", type=int, default=None, help="fix the basis rank (fidelity target 1.0 keeps max_rank = this)")
    parser.add_argument("--scratch", action="store_true", help="write to a scratch folder and do not save the adapter")
    args = parser.parse_args()

    from datasets import Dataset
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from hf_fwdattr import AttributionConfig, CausalLMTask, ForwardAttributionCallback
    from hf_fwdattr.demo.run import collator

    from . import setting

    preset = setting.PRESETS[args.preset]
    n = args.n or preset.documents
    tok = setting.tokenizer(preset)
    base, _ = setting.pretrain(preset, tok)
    rows, _ = setting.documents(preset, tok, n)
    dataset = Dataset.from_list(rows)
    model = setting.with_adapter(base, preset)
    p = sum(param.numel() for param in model.parameters() if param.requires_grad)
    compression = dict(preset.compression)
    if args.rank is not None:
        compression.update(max_rank=args.rank, fidelity=1.0)
    if args.n is not None and args.n < preset.documents:  # the same plan scaled to N (the sample still spans the rank)
        scale = args.n / preset.documents
        for key in ("sample_documents", "validation_documents", "heldout_documents"):
            compression[key] = max(16, int(compression[key] * scale))
        compression["sample_documents"] = max(compression["sample_documents"], compression["max_rank"])
        compression["storage"] = "compressed"
    output = setting.cache(preset) / ("scratch" if args.scratch else "finetune")
    shutil.rmtree(output / "influence", ignore_errors=True)  # this step recomputes: an artifact of older settings is stale
    run = {}

    class Probe(TrainerCallback):
        """Placed before the attribution callback: times training, then watches the build's memory."""

        def on_train_begin(self, *_, **__):
            run["train_start"], run["train_cpu_start"] = time.perf_counter(), time.process_time()
            run["rss_at_train_begin_mib"] = _status("VmRSS:")

        def on_train_end(self, *_, **__):
            run["train_cpu_seconds"] = time.process_time() - run["train_cpu_start"]
            run["process_peak_during_training_mib"] = _status("VmHWM:")
            _reset_peak()
            run["rss_at_build_start_mib"] = _status("VmRSS:")
            run["build_start"], run["build_cpu_start"] = time.perf_counter(), time.process_time()
            run["series"], run["stop"] = [], threading.Event()

            def sample():
                while not run["stop"].is_set():
                    run["series"].append((round(time.perf_counter() - run["build_start"], 1), round(_status("VmRSS:")),
                                          round(_status("RssAnon:"))))
                    time.sleep(1.0)

            run["sampler"] = threading.Thread(target=sample, daemon=True)
            run["sampler"].start()

    task = CausalLMTask(pad_token_id=tok.pad_token_id)
    callback = ForwardAttributionCallback(document_column="document_id", source_column="source", config=AttributionConfig(),
                                          compression=compression, output_subdir="influence")
    trainer_args = TrainingArguments(
        output_dir=str(output), num_train_epochs=1, learning_rate=preset.learning_rate, per_device_train_batch_size=setting.BATCH_SIZE,
        lr_scheduler_type="linear", weight_decay=0.0, save_strategy="no", report_to=[], use_cpu=not torch.cuda.is_available(), seed=0,
        data_seed=0, disable_tqdm=True, logging_strategy="no", remove_unused_columns=False,
    )
    trainer = Trainer(model=model, args=trainer_args, train_dataset=dataset, data_collator=collator(task), processing_class=tok,
                      callbacks=[Probe(), callback])
    trainer.train()
    build_wall, build_cpu = time.perf_counter() - run["build_start"], time.process_time() - run["build_cpu_start"]
    run["stop"].set()
    run["sampler"].join()
    artifact = callback.artifact
    if not args.scratch:
        model.save_pretrained(setting.cache(preset) / "adapter")
    epoch = next(e["train_runtime"] for e in reversed(trainer.state.log_history) if "train_runtime" in e)
    store = artifact.store
    result = {
        "preset": preset.name, "n": n, "p": p, "parameters": sum(param.numel() for param in base.parameters()),
        "threads": torch.get_num_threads(), "compression": compression,
        "epoch_seconds": epoch, "epoch_cpu_seconds": run["train_cpu_seconds"],
        "build_seconds": build_wall, "build_cpu_seconds": build_cpu,
        "simulation": artifact.simulation, "fidelity": artifact.fidelity,
        "compressed": artifact.compressed, "rank": store.rank if artifact.compressed else None,
        "artifact_bytes": folder_bytes(output / "influence"),
        "exact_responses_bytes": n * p * 4,
        "rss_at_train_begin_mib": run["rss_at_train_begin_mib"], "process_peak_during_training_mib": run["process_peak_during_training_mib"],
        "rss_at_build_start_mib": run["rss_at_build_start_mib"], "build_peak_mib": _status("VmHWM:"),
        "rss_series": run["series"], "load_average": os.getloadavg()[0],
    }
    result["build_peak_above_start_mib"] = result["build_peak_mib"] - result["rss_at_build_start_mib"]
    # RSS also counts pages of files mapped for reading (shards), which the kernel can drop; anonymous memory cannot
    result["build_anon_peak_sampled_mib"] = max((entry[2] for entry in run["series"]), default=None)
    print(json.dumps(result, default=float))


if __name__ == "__main__":
    main()
