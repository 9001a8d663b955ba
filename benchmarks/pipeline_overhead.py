"""What attribution adds to generation (issues 7 and 17): plain text-generation vs attributed generation (documents,
sources, per token; each readout mode; the batched LoRA engine and the functional one) vs the classical readout (one
backward per query, dot products with the same stored responses).

All contenders run in one process, interleaved prompt by prompt, on the demo's fact model and artifact
(built first if `--demo-dir` holds none). Greedy decoding, `--new-tokens` tokens per answer. Each contender's
median wall time and median CPU time (this process's) per prompt are reported: the machine is shared, and CPU
time is what contention from other processes leaves least changed.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/pipeline_overhead.py --demo-dir runs/demo
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo-dir", default="runs/demo")
    parser.add_argument("--prompts", type=int, default=20)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from transformers import pipeline

    import hf_fwdattr  # noqa: F401
    from hf_fwdattr import CausalLMTask, query_gradients
    from hf_fwdattr.demo.run import train_fact_model
    from hf_fwdattr.demo.toy import fact_corpus

    directory = Path(args.demo_dir)
    if not (directory / "influence" / "attribution_config.json").is_file():
        train_fact_model(directory)
    questions = fact_corpus()["questions"][: args.prompts]
    model_dir, influence_dir = str(directory / "model"), str(directory / "influence")
    plain = pipeline("text-generation", model=model_dir)

    def attributed(mode: str, engine: str = "auto"):
        return pipeline("attributed-text-generation", model=model_dir, influence=influence_dir, readout=mode, readout_engine=engine)

    pipes = {(mode, engine): attributed(mode, engine) for mode in ("jvp", "central_difference", "one_sided") for engine in ("lora_batch", "functional")}
    reference = pipes[("jvp", "lora_batch")]
    artifact, tokenizer = reference.influence, reference.tokenizer
    task = CausalLMTask(pad_token_id=tokenizer.pad_token_id)
    subspace = reference.scorer.subspace
    responses = artifact.responses()
    generation = {"max_new_tokens": args.new_tokens, "do_sample": False}

    def answer_ids(prompt: str) -> tuple[list[int], list[int]]:
        text = plain(prompt, **generation)[0]["generated_text"]
        prompt_ids = tokenizer(prompt)["input_ids"]
        return prompt_ids, tokenizer(text)["input_ids"][len(prompt_ids):]

    def classical(prompt: str) -> torch.Tensor:
        prompt_ids, continuation = answer_ids(prompt)
        gradient = query_gradients(subspace, task, [CausalLMTask.query_example(prompt_ids, continuation)])
        return gradient @ responses.T

    def one_query_per_token(prompt: str) -> torch.Tensor:
        """What per_token=True did before issue 17: one more query per generated token, functional engine."""
        prompt_ids, continuation = answer_ids(prompt)
        queries = [CausalLMTask.query_example(prompt_ids, continuation)]
        queries += [{"input_ids": prompt_ids + continuation[: i + 1], "labels": [-100] * (len(prompt_ids) + i) + [token]}
                    for i, token in enumerate(continuation)]
        return pipes[("jvp", "functional")].scorer.source_scores(queries)

    contenders = {"text-generation": lambda p: plain(p, **generation)}
    for aggregate, top_k in (("document", 5), ("source", 3)):
        for mode in ("jvp", "central_difference", "one_sided"):
            for engine in ("lora_batch", "functional"):
                pipe = pipes[(mode, engine)]
                contenders[f"{aggregate}s, {mode}, {engine}"] = (
                    lambda p, pipe=pipe, aggregate=aggregate, top_k=top_k: pipe(p, attribution_top_k=top_k, aggregate=aggregate, **generation))
        for mode in ("jvp", "central_difference"):
            pipe = pipes[(mode, "lora_batch")]
            contenders[f"{aggregate}s, {mode}, lora_batch, per_token=True"] = (
                lambda p, pipe=pipe, aggregate=aggregate, top_k=top_k: pipe(p, attribution_top_k=top_k, aggregate=aggregate, per_token=True, **generation))
    contenders["sources, jvp, per_token as before: one query per token, functional"] = one_query_per_token
    contenders["classical: backward per query · stored responses"] = classical

    for run in contenders.values():  # warm-up
        run(questions[0]["prompt"])
    wall = {name: [] for name in contenders}
    cpu = {name: [] for name in contenders}
    for _ in range(args.repeats):
        for question in questions:
            for name, run in contenders.items():
                start, start_cpu = time.perf_counter(), time.process_time()
                run(question["prompt"])
                wall[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)
    base_wall, base_cpu = statistics.median(wall["text-generation"]), statistics.median(cpu["text-generation"])
    info = {"documents": artifact.num_documents, "sources": len(artifact.source_names), "dim": artifact.dim,
            "prompts": len(questions), "repeats": args.repeats, "new_tokens": args.new_tokens, "threads": torch.get_num_threads()}
    print(json.dumps(info))
    print("\n| contender | wall ms | × generation (wall) | CPU ms | × generation (CPU) |\n|---|---|---|---|---|")
    for name in contenders:
        w, c = statistics.median(wall[name]), statistics.median(cpu[name])
        print(f"| {name} | {1000 * w:.1f} | {w / base_wall:.2f} | {1000 * c:.1f} | {c / base_cpu:.2f} |")


if __name__ == "__main__":
    main()
