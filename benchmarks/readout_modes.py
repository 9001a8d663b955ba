"""Cost of the readout per query (issues 7 and 17): each mode on each engine, against one backward pass + dot products
with the same stored responses, and against forwards of the same tokens.

    .venv/bin/hf-fwdattr demo --output-dir runs/demo
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/readout_modes.py runs/demo

The demo's fact model (tiny Llama, LoRA on all linear layers, p = 16,384) and artifact; fact queries (prompt + gold
answer); k directions (S = 10, like ten sources' summed responses, and k = 64 and 256, like a compressed basis) taken
from the artifact's responses, cycled. Every contender runs once per query and repeat, interleaved in one process;
the table gives medians of CPU time (this process's) and wall time per query. "× forward" divides by a forward of
the same tokens for every direction at once: the query repeated k times in one batch, with the log-probabilities of
its answer tokens (what one direction's forward costs when k run together). Scores are per token and summed, from
`ForwardReadout.token_scores`, as the pipeline reads them. The one-sided readout computes f(θ*) as one more copy of
the batch, or takes it given (as the pipeline does, from generation's logits).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from peft import AutoPeftModelForCausalLM
from transformers import AutoTokenizer

from hf_fwdattr import CausalLMTask, ForwardReadout, InfluenceArtifact, query_gradients
from hf_fwdattr.demo.toy import fact_corpus


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("demo_dir", nargs="?", default="runs/demo")
    parser.add_argument("--directions", type=int, nargs="+", default=[10, 64, 256])
    parser.add_argument("--queries", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(f"{args.demo_dir}/model")
    model = AutoPeftModelForCausalLM.from_pretrained(f"{args.demo_dir}/model").eval()  # the base the adapter names, then the adapter
    artifact = InfluenceArtifact.from_pretrained(f"{args.demo_dir}/influence")
    subspace = artifact.bind(model)
    task = CausalLMTask(pad_token_id=tokenizer.pad_token_id)
    queries = []
    for question in fact_corpus()["questions"][: args.queries]:
        prompt = tokenizer(question["prompt"])["input_ids"]
        answer = tokenizer(question["answer"], add_special_tokens=False)["input_ids"]
        queries.append(CausalLMTask.query_example(prompt, answer))
    responses = artifact.responses()
    bases: dict[int, torch.Tensor] = {}

    def forward_of_the_same_tokens(query: dict, copies: int):
        batch = task.collate([query] * copies)
        with torch.inference_mode():
            return task.token_measurement(model, batch)

    def backward_and_dot_products(query: dict, directions: torch.Tensor):
        return query_gradients(subspace, task, [query]) @ directions.T

    bases.update({id(q): forward_of_the_same_tokens(q, 1) for q in queries})  # f(θ*) per token, computed once beforehand
    rows = []
    for count in args.directions:
        directions = responses[torch.arange(count) % len(responses)].contiguous()
        contenders = {
            "forward, the query once": lambda q: forward_of_the_same_tokens(q, 1),
            f"forward of the same tokens × {count} (one batch)": lambda q, count=count: forward_of_the_same_tokens(q, count),
        }
        for mode in ("jvp", "central_difference", "one_sided"):
            for engine in ("lora_batch", "functional"):
                readout = ForwardReadout(subspace, task, mode, chunk_size=count, engine=engine)
                contenders[f"{mode}, {engine}"] = lambda q, readout=readout, directions=directions: readout.token_scores([q], directions)
        one_sided = ForwardReadout(subspace, task, "one_sided", chunk_size=count)
        contenders["one_sided, lora_batch, f(θ*) given (as generation's logits give it)"] = (
            lambda q, directions=directions: one_sided.token_scores([q], directions, base_values=bases[id(q)]))
        contenders["backward + dot products"] = lambda q, directions=directions: backward_and_dot_products(q, directions)
        for run in contenders.values():  # warm-up
            run(queries[0])
        wall = {name: [] for name in contenders}
        cpu = {name: [] for name in contenders}
        for _ in range(args.repeats):
            for query in queries:
                for name, run in contenders.items():
                    start, start_cpu = time.perf_counter(), time.process_time()
                    run(query)
                    wall[name].append(time.perf_counter() - start)
                    cpu[name].append(time.process_time() - start_cpu)
        forward_cpu = statistics.median(cpu[f"forward of the same tokens × {count} (one batch)"])
        for name in contenders:
            c, w = statistics.median(cpu[name]), statistics.median(wall[name])
            rows.append((count, name, 1000 * c, 1000 * w, c / forward_cpu))
    lengths = [len(q["input_ids"]) for q in queries]
    print(json.dumps({"dim": subspace.dim, "queries": len(queries), "tokens_per_query": lengths, "repeats": args.repeats,
                      "threads": torch.get_num_threads()}))
    print("\n| k | contender | CPU ms per query | wall ms per query | × forward (CPU) |\n|---|---|---|---|---|")
    for count, name, c, w, ratio in rows:
        print(f"| {count} | {name} | {c:.1f} | {w:.1f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
