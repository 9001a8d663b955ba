"""What attribution adds to generation (issue 7): plain text-generation vs attributed generation vs the
classical readout (one backward per query, dot products with the same stored responses).

All contenders run in one process, interleaved prompt by prompt, on the demo's fact model and artifact
(built first if `--demo-dir` holds none). Greedy decoding, `--new-tokens` tokens per answer.

    .venv/bin/python benchmarks/pipeline_overhead.py --demo-dir runs/demo
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
    plain = pipeline("text-generation", model=str(directory / "model"))
    attributed = pipeline("attributed-text-generation", model=str(directory / "model"), influence=str(directory / "influence"))
    by_mode = {mode: pipeline("attributed-text-generation", model=str(directory / "model"), influence=str(directory / "influence"), readout=mode)
               for mode in ("central_difference", "one_sided")}
    artifact, tokenizer = attributed.influence, attributed.tokenizer
    task = CausalLMTask(pad_token_id=tokenizer.pad_token_id)
    subspace = attributed.scorer.subspace
    responses = artifact.responses()
    generation = {"max_new_tokens": args.new_tokens, "do_sample": False}

    def classical(prompt: str) -> torch.Tensor:
        text = plain(prompt, **generation)[0]["generated_text"]
        prompt_ids = tokenizer(prompt)["input_ids"]
        continuation = tokenizer(text)["input_ids"][len(prompt_ids):]
        gradient = query_gradients(subspace, task, [CausalLMTask.query_example(prompt_ids, continuation)])
        return gradient @ responses.T

    contenders = {
        "text-generation": lambda p: plain(p, **generation),
        "attributed, documents, jvp (N directions)": lambda p: attributed(p, top_k=5, **generation),
        "attributed, documents, central difference": lambda p: by_mode["central_difference"](p, top_k=5, **generation),
        "attributed, documents, one-sided": lambda p: by_mode["one_sided"](p, top_k=5, **generation),
        "attributed, sources, jvp (S directions)": lambda p: attributed(p, top_k=3, aggregate="source", **generation),
        "attributed, sources, central difference": lambda p: by_mode["central_difference"](p, top_k=3, aggregate="source", **generation),
        "classical: backward per query · stored responses": classical,
    }
    for run in contenders.values():  # warm-up
        run(questions[0]["prompt"])
    times = {name: [] for name in contenders}
    for _ in range(args.repeats):
        for question in questions:
            for name, run in contenders.items():
                start = time.perf_counter()
                run(question["prompt"])
                times[name].append(time.perf_counter() - start)
    base = statistics.median(times["text-generation"])
    rows = []
    for name, values in times.items():
        median = statistics.median(values)
        rows.append({"contender": name, "median_ms": 1000 * median, "ratio_to_generation": median / base})
    info = {"documents": artifact.num_documents, "sources": len(artifact.source_names), "dim": artifact.dim,
            "readout": artifact.config.readout.value, "prompts": len(questions), "repeats": args.repeats,
            "new_tokens": args.new_tokens, "threads": torch.get_num_threads()}
    print(json.dumps(info))
    print("\n| contender | median per prompt (ms) | × text-generation |\n|---|---|---|")
    for row in rows:
        print(f"| {row['contender']} | {row['median_ms']:.1f} | {row['ratio_to_generation']:.2f} |")


if __name__ == "__main__":
    main()
