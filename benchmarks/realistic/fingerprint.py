"""The weight fingerprint: the sampled one against SHA-256 of every byte, on the same weights, in one process.

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.realistic.fingerprint [--millions 256]

Weights: a Llama-shaped stack of `--millions` million float32 parameters (hidden 2048, intermediate 8192, as many
blocks as fit) with a LoRA adapter (r = 16, all linear layers), built from a config. Both fingerprints are timed
three times, interleaved (median; wall and CPU). Prints one JSON line; the per-parameter rates give a 7B model.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--millions", type=int, default=256)
    args = parser.parse_args()
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from hf_fwdattr.estimator.subspace import fingerprint_parameters, model_fingerprint

    per_block = 4 * 2048 * 2048 + 3 * 2048 * 8192
    layers = max(1, args.millions * 10**6 // per_block)
    config = LlamaConfig(vocab_size=256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=layers, num_attention_heads=16,
                         num_key_value_heads=16, max_position_embeddings=64)
    with torch.device("cpu"):
        model = LlamaForCausalLM(config)
    model = get_peft_model(model, LoraConfig(r=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    parameters = sum(p.numel() for p in model.parameters())
    adapter = sum(p.numel() for p in model.parameters() if p.requires_grad)
    named = list(model.named_parameters())
    times = {"sampled": [], "full_sha256": []}
    for _ in range(3):
        for name, function in (("sampled", lambda: model_fingerprint(model)), ("full_sha256", lambda: fingerprint_parameters(named))):
            start, cpu = time.perf_counter(), time.process_time()
            function()
            times[name].append((time.perf_counter() - start, time.process_time() - cpu))
    result = {"parameters": parameters, "adapter_parameters": adapter, "threads": torch.get_num_threads(), "dtype": "float32"}
    for name, values in times.items():
        wall, cpu = statistics.median(v[0] for v in values), statistics.median(v[1] for v in values)
        result[name] = {"wall_s": wall, "cpu_s": cpu, "cpu_s_per_billion_parameters": cpu / parameters * 1e9}
    result["cpu_speedup"] = result["full_sha256"]["cpu_s"] / result["sampled"]["cpu_s"]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
