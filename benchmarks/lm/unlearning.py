"""The unlearning solver's settings against fact tracing (and LDS, when the cached ground truth fits the model).

    OMP_NUM_THREADS=2 .venv/bin/python -m benchmarks.lm.unlearning --model M --influence I --data D \
        [--setting K,RATE,RETAIN[,BATCH] ...] [--lds]

M, I: a fact model folder and its artifact (only its documents and subspace are used); D: a folder with
``documents.jsonl`` and ``queries.jsonl`` (what `hf-fwdattr evaluate` writes to ``<output>/data``). For every
setting (horizon K, Adam rate, retain weight, optionally the retain minibatch size, default 32) the documents are simulated again with ``solver="unlearning"``
in the artifact's subspace and read out with the removal readout and, for comparison, the JVP. With `--lds`
the scores are also compared with `benchmarks/lm/cache/facts/ground_truth.safetensors` (it must have been made
on the same base model: checked by hash), and the retrainings themselves are ranked first: per query and
document, mean f_q over the retrainings that kept the document minus the mean over those that dropped it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import numpy as np

DEFAULT_SETTINGS = ["20,1e-3,3", "20,1e-3,0", "20,1e-3,1", "20,1e-3,10", "10,1e-3,3", "40,1e-3,3", "20,3e-4,3", "20,3e-3,3"]


def main() -> None:
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_fwdattr import AttributionConfig, CausalLMTask, ForwardReadout, InfluenceArtifact, simulate_responses
    from hf_fwdattr.evaluation.fact_data import FactTracingSet, query_examples, tokenized_documents
    from hf_fwdattr.evaluation.fact_metrics import source_scores_from_documents, summarize
    from hf_fwdattr.evaluation.fact_tracing import query_groups
    from hf_fwdattr.evaluation.metrics import lds

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--influence", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--setting", action="append", help="K,RATE,RETAIN[,BATCH] (repeatable); default: a grid around 20,1e-3,3")
    parser.add_argument("--lds", action="store_true")
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model).eval()
    artifact = InfluenceArtifact.from_pretrained(args.influence)
    data = FactTracingSet.from_files(args.data / "documents.jsonl", args.data / "queries.jsonl")
    task = CausalLMTask(pad_token_id=tokenizer.pad_token_id)
    documents = tokenized_documents(data, tokenizer, artifact)
    queries = query_examples(data, tokenizer)
    ids, sources, names = list(artifact.documents.document_ids), list(artifact.documents.sources), list(artifact.source_names)
    true = np.array([ids.index(q["document_id"]) for q in data.queries])
    true_source = np.array([names.index(sources[i]) for i in true])
    groups = query_groups(data.kinds)
    truth = None
    if args.lds:
        cache = Path(__file__).resolve().parent / "cache" / "facts"
        settings = json.loads((cache / "ground_truth.json").read_text())["settings"]
        if settings["base_sha256"] != hashlib.sha256((args.model / "model.safetensors").read_bytes()).hexdigest() or settings["document_ids"] != ids:
            raise SystemExit("The cached ground truth was made on another base model or documents: drop --lds.")
        truth = load_file(cache / "ground_truth.safetensors")
        subsets, outputs = truth["subsets"].double(), truth["outputs"].mean(0)
        kept = (subsets.T @ outputs) / subsets.sum(0)[:, None] - ((1 - subsets).T @ outputs) / (1 - subsets).sum(0)[:, None]
        m = summarize(kept.T.contiguous(), true, groups)
        print("retrainings, kept minus dropped: MRR " + ", ".join(f"{k} {v['mrr']:.3f}" for k, v in m.items())
              + f"; the true document's effect (nats), median over queries {float(kept[true, np.arange(len(true))].median()):.2f}")
    subspace = artifact.bind(model)
    print(f"{len(ids)} documents, {len(queries)} queries, p = {subspace.dim}")
    print("| K | rate | retain | batch | readout | MRR verbatim | MRR paraphrase | MRR all | recall@1 all | source acc. all (sum) |"
          + (" LDS all | LDS verbatim | LDS paraphrase |" if truth is not None else "") + " simulation |")
    for setting in args.setting or DEFAULT_SETTINGS:
        horizon, rate, retain, *batch = setting.split(",")
        config = AttributionConfig(solver="unlearning", horizon=int(horizon), unlearning_rate=float(rate), unlearning_retain=float(retain),
                                   batch_size=int(batch[0]) if batch else 32)
        start = time.perf_counter()
        responses = simulate_responses(subspace, task, documents, documents.examples, config).responses
        seconds = time.perf_counter() - start
        for mode in ("removal", "jvp"):
            scores = ForwardReadout(subspace, task, mode).scores(queries, responses).double()
            by_source = source_scores_from_documents(scores, sources, names)
            m = summarize(scores, true, groups, by_source, true_source)
            row = (f"| {horizon} | {rate} | {retain} | {config.batch_size} | {mode} | {m['verbatim']['mrr']:.3f} | {m['paraphrase']['mrr']:.3f} | {m['all']['mrr']:.3f} | "
                   f"{m['all']['recall@1']:.3f} | {m['all']['source_accuracy']:.3f} |")
            if truth is not None:
                outputs, kinds = truth["outputs"].numpy().mean(0), np.array(data.kinds)
                values = [lds(scores.numpy()[mask], truth["subsets"].numpy(), outputs[:, mask]).mean
                          for mask in (np.ones(len(kinds), bool), kinds == "verbatim", kinds == "paraphrase")]
                row += " " + " | ".join(f"{v:.3f}" for v in values) + " |"
            print(row + f" {seconds:.0f}s |", flush=True)
    subspace.remove()


if __name__ == "__main__":
    main()
