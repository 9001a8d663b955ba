"""Cost of one chunk of readout directions in each mode, next to one plain forward pass.

    .venv/bin/hf-fwdattr demo --output-dir runs/demo
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/readout_modes.py runs/demo

One fact query, the first 64 responses of the demo's artifact in one vmapped chunk; mean of 3 runs after a warm-up.
"""

import sys
import time

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_fwdattr import CausalLMTask, ForwardReadout, InfluenceArtifact


def main(demo_dir: str, directions: int = 64, repeats: int = 3) -> None:
    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(f"{demo_dir}/model")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(f"{demo_dir}/model"), f"{demo_dir}/model").eval()
    artifact = InfluenceArtifact.from_pretrained(f"{demo_dir}/influence")
    subspace = artifact.bind(model)
    task = CausalLMTask(pad_token_id=tokenizer.pad_token_id)
    prompt, answer = tokenizer("The capital of Kaven is")["input_ids"], tokenizer(" Vashfenvash")["input_ids"]
    query = {"input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer}
    responses = artifact.responses()[:directions]
    for mode in ("jvp", "central_difference", "one_sided"):
        readout = ForwardReadout(subspace, task, mode, chunk_size=directions)
        readout.scores([query], responses)
        start = time.perf_counter()
        for _ in range(repeats):
            readout.scores([query], responses)
        print(f"{mode:>20}: {(time.perf_counter() - start) / repeats * 1e3:7.1f} ms for {len(responses)} directions")
    batch = task.collate([query])
    with torch.inference_mode():
        start = time.perf_counter()
        for _ in range(10):
            model(input_ids=batch["input_ids"])
    print(f"{'plain forward':>20}: {(time.perf_counter() - start) / 10 * 1e3:7.1f} ms")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/demo")
