"""Exact damped influence against ours in a small subspace of any `hf-fwdattr evaluate` output.

    OMP_NUM_THREADS=2 .venv/bin/python -m benchmarks.lm.small_exact /tmp/ev/h128e768

Reads the model, the artifact and the tables that `run_evaluation` wrote to the folder given, re-simulates
ours with the artifact's settings in the LoRA B matrix of the last layer's MLP down-projection, where the
explicit full-batch curvature can be built and eigendecomposed, and prints the fact-tracing table of ours,
gradient dot product and exact damped influence there. This tells whether the estimator or the model limits
a result: if exact influence does no better than ours, a better estimator cannot help.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_fwdattr import CausalLMTask, InfluenceArtifact, build_influence_artifact
    from hf_fwdattr.estimator.subspace import SubspaceSpec, canonical_name
    from hf_fwdattr.evaluation.fact_data import FactTracingSet, tokenized_documents
    from hf_fwdattr.evaluation.fact_tracing import evaluate_fact_tracing, format_table

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("evaluation_dir", type=Path, help="an `hf-fwdattr evaluate --output-dir` folder of a default run")
    args = parser.parse_args()
    root = args.evaluation_dir
    model_dir = root / "fact_model" / "model"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    artifact = InfluenceArtifact.from_pretrained(root / "fact_model" / "influence")
    data = FactTracingSet.from_files(root / "data" / "documents.jsonl", root / "data" / "queries.jsonl")
    task = CausalLMTask(pad_token_id=tokenizer.pad_token_id)
    documents = tokenized_documents(data, tokenizer, artifact)
    last = model.config.num_hidden_layers - 1
    names = [canonical_name(n) for n, _ in model.named_parameters() if f"layers.{last}.mlp.down_proj.lora_B" in n]
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        small = build_influence_artifact(model, task, documents, documents.examples, tmp, artifact.config,
                                         subspace=SubspaceSpec(kind="trainable", parameter_names=names), progress=False)
        print(f"ours re-simulated in the small subspace (p = {small.dim}) in {time.perf_counter() - start:.0f}s", flush=True)
        result = evaluate_fact_tracing(model, tokenizer, small, data, methods=["ours", "grad_dot", "influence"], influence_solver="dense")
    print(format_table(result))
    print({method: f"{seconds:.1f}s" for method, seconds in result.seconds.items()})


if __name__ == "__main__":
    main()
