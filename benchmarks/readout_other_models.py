"""A JVP direction against a forward of the same tokens on tiny Llamas that chose nothing in the readout's design
(issue 17's "≤ 1.5× a forward" target, checked away from the demo model it was tuned on).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/readout_other_models.py

Each model: `tiny_llama` (random weights, vocabulary 512, 4 heads / 2 key-value heads) with a PEFT LoRA (r = 8,
random A and B) on the listed projections; 4 random queries of 14 prompt + 6 answer tokens; k random directions.
Contenders interleaved query by query, median CPU time of 20 repeats: the batched JVP readout
(`ForwardReadout(..., "jvp", engine="lora_batch").token_scores`) against `task.token_measurement` on the query
repeated k times in one batch (what one direction's forward costs when k run together).
"""

from __future__ import annotations

import statistics
import time

import torch
from peft import LoraConfig, get_peft_model

from hf_fwdattr import AttributionSubspace, CausalLMTask, ForwardReadout
from hf_fwdattr.demo.toy import tiny_llama

MODELS = [  # (hidden size, layers, LoRA target modules)
    (64, 2, ["q_proj", "v_proj"]),
    (32, 2, ["q_proj", "v_proj"]),
    (128, 4, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
]


def main() -> None:
    print("| hidden | layers | LoRA on | p | k | jvp CPU ms | forward × k CPU ms | × forward |")
    print("|---|---|---|---|---|---|---|---|")
    for hidden, layers, targets in MODELS:
        torch.manual_seed(0)
        base = tiny_llama(512, hidden_size=hidden, layers=layers, heads=4)
        model = get_peft_model(base, LoraConfig(r=8, target_modules=targets, init_lora_weights=False)).eval()
        subspace = AttributionSubspace.build(model, spec="peft")
        task = CausalLMTask(pad_token_id=0)
        generator = torch.Generator().manual_seed(1)
        queries = [CausalLMTask.query_example(torch.randint(3, 512, (14,), generator=generator).tolist(),
                                              torch.randint(3, 512, (6,), generator=generator).tolist()) for _ in range(4)]
        for count in (10, 64):
            directions = torch.randn(count, subspace.dim, generator=generator)
            readout = ForwardReadout(subspace, task, "jvp", chunk_size=count, engine="lora_batch")

            def forward(query, count=count):
                with torch.inference_mode():
                    return task.token_measurement(model, task.collate([query] * count))

            contenders = {"jvp": lambda query, readout=readout, directions=directions: readout.token_scores([query], directions),
                          "forward": forward}
            for query in queries:  # warm-up
                for run in contenders.values():
                    run(query)
            times = {name: [] for name in contenders}
            for _ in range(20):
                for query in queries:
                    for name, run in contenders.items():
                        start = time.process_time()
                        run(query)
                        times[name].append(time.process_time() - start)
            jvp, plain = (statistics.median(times[name]) * 1e3 for name in ("jvp", "forward"))
            print(f"| {hidden} | {layers} | {', '.join(t.removesuffix('_proj') for t in targets)} | {subspace.dim:,} | {count} | "
                  f"{jvp:.2f} | {plain:.2f} | {jvp / plain:.2f} |")


if __name__ == "__main__":
    main()
