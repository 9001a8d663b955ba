"""Issue 17: the readout through vLLM against the torch readout and one backward + dot products, per query;
attributed generation with vLLM against plain vLLM generation and against the transformers pipelines.

The model is the demo's fact model at hidden size 128 (head_dim 32: vLLM's CPU attention rejects the demo's 16),
LoRA r = 8 on every linear layer (p = 32,768), built into `--work-dir` on first use. Directions per query:
n = 10 (the responses of the first 10 documents: a source direction costs what a document direction does, and the
corpus has 5 sources), 64 and 256 (seeded Gaussian directions: the cost of a direction does not depend on it).
All contenders run in this one process, interleaved query by query; vLLM's engines (one batching all adapters, one
with a single request in flight, ENVIRONMENT.md's crash workaround) are worker processes of it, whose CPU time is
counted with ours. One torch thread here, and vLLM's worker bound to one core.

    OMP_NUM_THREADS=1 VLLM_CPU_OMP_THREADS_BIND=0 .venv-vllm/bin/python benchmarks/vllm_readout.py --work-dir runs/vllm_bench
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def cpu_seconds() -> float:
    """User + system CPU time of this process and its children (vLLM's engine core and worker)."""
    import psutil

    me = psutil.Process()
    total = sum(me.cpu_times()[:2])
    for child in me.children(recursive=True):
        try:
            total += sum(child.cpu_times()[:2])
        except psutil.NoSuchProcess:
            pass
    return total


def served_copy(model_dir: Path, served_dir: Path) -> Path:
    """The base weights and tokenizer without the adapter files: what the server serves."""
    if not (served_dir / "config.json").is_file():
        served_dir.mkdir(parents=True, exist_ok=True)
        for path in model_dir.iterdir():
            if path.is_file() and not path.name.startswith("adapter_"):
                shutil.copy(path, served_dir / path.name)
    return served_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", default="runs/vllm_bench")
    parser.add_argument("--queries", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--directions", type=int, nargs="+", default=[10, 64, 256])
    args = parser.parse_args()

    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline
    from vllm import LLM

    import hf_fwdattr.integrations.pipeline  # noqa: F401  (registers attributed-text-generation)
    from hf_fwdattr import CausalLMTask, DocumentTable, ForwardReadout, InfluenceArtifact, query_gradients
    from hf_fwdattr.demo.run import train_fact_model
    from hf_fwdattr.demo.toy import fact_corpus
    from hf_fwdattr.integrations.serving.engine import VLLMReadout, vllm_engine_arguments
    from hf_fwdattr.integrations.serving.export import export_adapters

    torch.set_num_threads(1)
    work = Path(args.work_dir)
    fact = work / "fact"
    if not (fact / "influence" / "attribution_config.json").is_file():
        train_fact_model(fact, hidden_size=128)
    served = served_copy(fact / "model", work / "served")
    tokenizer = AutoTokenizer.from_pretrained(fact / "model")
    model = AutoModelForCausalLM.from_pretrained(fact / "model").eval()
    artifact = InfluenceArtifact.from_pretrained(fact / "influence")
    task = CausalLMTask(pad_token_id=tokenizer.pad_token_id)
    prompts = [q["prompt"] for q in fact_corpus()["questions"][: args.queries]]

    # one query = a prompt and the greedy answer of θ* (transformers)
    queries = []
    with torch.no_grad():
        for prompt in prompts:
            ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
            out = model.generate(ids, max_new_tokens=args.new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
            queries.append((ids[0].tolist(), out[0, ids.shape[1]:].tolist()))

    # direction sets as artifacts of the same subspace, exported as adapters
    generator = torch.Generator().manual_seed(0)
    typical = float(artifact.responses().norm(dim=1).median())
    vectors, sets = {}, {}
    for n in args.directions:
        if n <= artifact.num_documents and n == 10:
            vectors[n] = artifact.responses(list(range(n))).float()
        else:
            vectors[n] = torch.randn(n, artifact.dim, generator=generator) * (typical / artifact.dim**0.5)
        stand_in = InfluenceArtifact(config=artifact.config, subspace_spec=artifact.subspace_spec,
                                     documents=DocumentTable([f"direction-{i}" for i in range(n)]), responses=vectors[n],
                                     model_fingerprint=artifact.model_fingerprint, subspace_fingerprint=artifact.subspace_fingerprint,
                                     base_model=artifact.base_model)
        for mode in ("central_difference", "one_sided"):
            folder = work / "adapters" / f"{n}-{mode}"
            sets[n, mode] = export_adapters(stand_in, model, folder, directions="documents", document_ids=stand_in.documents.document_ids,
                                            mode=mode, overwrite=True)

    subspace = artifact.bind(model)
    jvp = ForwardReadout(subspace, task, "jvp", chunk_size=64)
    central = ForwardReadout(subspace, task, "central_difference", epsilon=sets[args.directions[0], "central_difference"].epsilon, chunk_size=64)
    start = time.perf_counter()
    largest = max(args.directions)
    llm = LLM(model=str(served), **vllm_engine_arguments(sets[largest, "central_difference"], max_loras=64, max_cpu_loras=4 * largest + 8,
                                                          max_model_len=128, kv_cache_memory_bytes=2**30, seed=0))
    startup = time.perf_counter() - start
    vllm_readouts = {key: VLLMReadout(llm, adapter_set) for key, adapter_set in sets.items()}
    # ENVIRONMENT.md's workaround for the multi-adapter crash, for comparison: one request in flight at a time
    serial_llm = LLM(model=str(served), **vllm_engine_arguments(sets[largest, "central_difference"], max_loras=1, max_num_seqs=1,
                                                                 max_cpu_loras=4 * largest + 8, max_model_len=128,
                                                                 kv_cache_memory_bytes=2**30, seed=0))
    serial_readouts = {n: VLLMReadout(serial_llm, sets[n, "central_difference"]) for n in args.directions}

    def example(q):
        return [CausalLMTask.query_example(*q)]

    contenders = {}
    for n in args.directions:
        contenders[f"n={n}: vLLM, central difference ({2 * n} adapters)"] = lambda q, n=n: vllm_readouts[n, "central_difference"].direction_scores([q[0]], [q[1]])
        contenders[f"n={n}: vLLM, central difference, one request at a time (max_num_seqs=1)"] = lambda q, n=n: serial_readouts[n].direction_scores([q[0]], [q[1]])
        contenders[f"n={n}: vLLM, one-sided ({n + 1} adapters)"] = lambda q, n=n: vllm_readouts[n, "one_sided"].direction_scores([q[0]], [q[1]])
        contenders[f"n={n}: torch, JVP"] = lambda q, n=n: jvp.scores(example(q), vectors[n])
        contenders[f"n={n}: torch, central difference"] = lambda q, n=n: central.scores(example(q), vectors[n])
        contenders[f"n={n}: one backward + dot products"] = lambda q, n=n: query_gradients(subspace, task, example(q)) @ vectors[n].T

    # generation: plain and attributed (sources, S directions), with and without vLLM
    source_set = export_adapters(artifact, model, work / "adapters" / "sources", overwrite=True)
    source_readout = VLLMReadout(llm, source_set)
    plain = pipeline("text-generation", model=str(fact / "model"))
    attributed = pipeline("attributed-text-generation", model=str(fact / "model"), influence=str(fact / "influence"))
    attributed_central = pipeline("attributed-text-generation", model=str(fact / "model"), influence=str(fact / "influence"),
                                  readout="central_difference")
    generation = {"max_new_tokens": args.new_tokens, "do_sample": False}
    generation_contenders = {
        "vLLM generation (θ* = the base adapter)": lambda p: source_readout.generate([p], args.new_tokens),
        f"vLLM generation + attribution, {len(source_set.labels)} sources, central difference": lambda p: source_readout.attribute([p], args.new_tokens),
        "transformers text-generation": lambda p: plain(p, **generation),
        "transformers attributed-text-generation, sources, JVP": lambda p: attributed(p, aggregate="source", top_k=3, **generation),
        "transformers attributed-text-generation, sources, central difference": lambda p: attributed_central(p, aggregate="source", top_k=3, **generation),
    }

    # agreement of vLLM with the torch central difference, and of the two generators
    agreement = {}
    for n in args.directions:
        got = np.concatenate([vllm_readouts[n, "central_difference"].direction_scores([q[0]], [q[1]]) for q in queries])
        expected = np.concatenate([central.scores(example(q), vectors[n]).double().numpy() for q in queries])
        agreement[n] = min(float(np.corrcoef(a, b)[0, 1]) for a, b in zip(got, expected))
    same_answers = sum(source_readout.generate([p], args.new_tokens)[0][1] == q[1] for p, q in zip(prompts, queries))

    wall = {name: [] for name in list(contenders) + list(generation_contenders)}
    cpu = {name: [] for name in wall}
    for name, run in contenders.items():  # warm-up (vLLM loads each adapter once)
        run(queries[0])
    for name, run in generation_contenders.items():
        run(prompts[0])
    for _ in range(args.repeats):
        for q, p in zip(queries, prompts):
            for name, run in contenders.items():
                c0, t0 = cpu_seconds(), time.perf_counter()
                run(q)
                wall[name].append(time.perf_counter() - t0)
                cpu[name].append(cpu_seconds() - c0)
            for name, run in generation_contenders.items():
                c0, t0 = cpu_seconds(), time.perf_counter()
                run(p)
                wall[name].append(time.perf_counter() - t0)
                cpu[name].append(cpu_seconds() - c0)

    info = {"documents": artifact.num_documents, "sources": len(artifact.source_names), "dim": artifact.dim,
            "queries": len(queries), "repeats": args.repeats, "new_tokens": args.new_tokens,
            "tokens_per_query": statistics.mean(len(p) + len(a) for p, a in queries), "torch_threads": torch.get_num_threads(),
            "vllm_startup_s": round(startup, 1), "epsilon": sets[args.directions[0], "central_difference"].epsilon,
            "min_pearson_vllm_vs_torch_central": agreement, "same_greedy_answers": f"{same_answers}/{len(prompts)}"}
    print(json.dumps(info))
    print("\n| contender | median wall per query (ms) | median CPU (ms) |\n|---|---|---|")
    for name in contenders:
        print(f"| {name} | {1000 * statistics.median(wall[name]):.1f} | {1000 * statistics.median(cpu[name]):.1f} |")
    base = statistics.median(wall["transformers text-generation"])
    base_vllm = statistics.median(wall["vLLM generation (θ* = the base adapter)"])
    print("\n| generation | median wall per prompt (ms) | median CPU (ms) | × transformers text-generation | × vLLM generation |\n|---|---|---|---|---|")
    for name in generation_contenders:
        median = statistics.median(wall[name])
        print(f"| {name} | {1000 * median:.1f} | {1000 * statistics.median(cpu[name]):.1f} | {median / base:.2f} | {median / base_vllm:.2f} |")
    subspace.remove()


if __name__ == "__main__":
    main()
