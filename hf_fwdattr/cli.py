"""The `hf-fwdattr` command line."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional, Sequence


def _demo(args: argparse.Namespace) -> int:
    from .demo.run import classifier_demo, fact_demo

    if args.task == "classifier":
        classifier_demo(seed=args.seed)
    else:
        fact_demo(output_dir=args.output_dir, seed=args.seed)
    return 0


def _attribute(args: argparse.Namespace) -> int:
    import json

    from transformers import pipeline

    from .integrations import pipeline as _registration  # noqa: F401  (registers the task)

    pipe = pipeline("attributed-text-generation", model=args.model, influence=args.influence, readout=args.readout)
    call = {"top_k": args.top_k, "aggregate": args.aggregate, "per_token": args.per_token}
    if args.response is not None:
        call["response"] = args.response
    else:
        call.update(max_new_tokens=args.max_new_tokens, do_sample=False)
    results = [pipe(prompt, **call) for prompt in args.prompts]
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    for prompt, records in zip(args.prompts, results):
        for record in records:
            print(record["generated_text"])
            for rank, entry in enumerate(record["attributions"], start=1):
                name = entry.get("document_id") or entry["source"]
                extra = f"  ({entry['source']})" if "document_id" in entry and entry.get("source") else ""
                print(f"  {rank:>2}. {name}{extra}  {entry['score']:+.4f}")
    return 0


def _export_adapters(args: argparse.Namespace) -> int:
    from transformers import AutoModelForCausalLM

    from .integrations.serving.export import copy_served_weights, export_adapters
    from .storage.artifact import InfluenceArtifact

    model = AutoModelForCausalLM.from_pretrained(args.model)
    adapter_set = export_adapters(
        InfluenceArtifact.from_pretrained(args.influence), model, args.output_dir, directions=args.directions,
        document_ids=args.document_ids, mode="one_sided" if args.one_sided else "central_difference", epsilon=args.epsilon,
        base_model_name_or_path=args.served_model, overwrite=args.overwrite,
    )
    if args.served_dir:
        copy_served_weights(args.model, args.served_dir)
        print(f"Base weights to serve (without the adapter files): {args.served_dir}")
    print(f"{len(adapter_set.entries)} adapters of rank {adapter_set.rank} ({adapter_set.num_directions} {adapter_set.kind.value}, "
          f"{adapter_set.mode.value}, epsilon {adapter_set.epsilon:g}) in {args.output_dir}. A vLLM server for them:\n"
          f"  VLLM_ALLOW_RUNTIME_LORA_UPDATING=True python -m vllm.entrypoints.openai.api_server --model {args.served_dir or 'BASE_WEIGHTS_DIR'} "
          f"--enable-lora --max-lora-rank {adapter_set.vllm_max_lora_rank} --max-loras {min(len(adapter_set.entries), 64)} "
          f"--max-cpu-loras {len(adapter_set.entries)} --lora-target-modules {' '.join(adapter_set.target_modules)} --dtype float32")
    return 0


def _serve_attribute(args: argparse.Namespace) -> int:
    import json

    if args.url:
        from .integrations.serving.client import VLLMServerReadout

        readout = VLLMServerReadout(args.url, args.adapters, server_directory=args.server_adapters, api_key=args.api_key)
    else:
        from .integrations.serving.engine import VLLMReadout

        def value(text: str):
            try:
                return json.loads(text)
            except ValueError:
                return text  # a plain string

        engine = {key: value(text) for key, _, text in (item.partition("=") for item in args.engine_arg)}
        readout = VLLMReadout.from_pretrained(args.model, args.adapters, **engine)
    records = readout.attribute(args.prompts, max_new_tokens=args.max_new_tokens, top_k=args.top_k)
    if args.url:
        readout.close()
    if args.json:
        print(json.dumps(records, indent=2))
        return 0
    for prompt, record in zip(args.prompts, records):
        print(f"{prompt}{record['answer']}")
        for rank, entry in enumerate(record["attributions"], start=1):
            name = entry.get("document_id") or entry["source"]
            extra = f"  ({entry['source']})" if "document_id" in entry and entry.get("source") else ""
            print(f"  {rank:>2}. {name}{extra}  {entry['score']:+.4f}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from .evaluation.fact_tracing import format_table, run_evaluation

    columns = {"id_column": args.id_column, "source_column": args.source_column, "text_column": args.text_column,
               "query_column": args.query_column, "answer_column": args.answer_column, "true_column": args.true_column,
               "kind_column": args.kind_column}
    result = run_evaluation(
        args.output_dir, args.model, args.influence, args.documents, args.queries, methods=args.methods, seed=args.seed,
        append_eos=args.append_eos, columns=columns, plots=not args.no_plots, influence_solver=args.influence_solver,
        influence_tolerance=args.influence_tolerance, influence_max_iterations=args.influence_max_iterations,
        influence_max_dim=args.influence_max_dim,
    )
    print(format_table(result))
    print(f"\nMetrics: {args.output_dir}/fact_tracing.json" + ("" if args.no_plots else f"; figures: {args.output_dir}/*.png"))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `hf-fwdattr`."""
    parser = argparse.ArgumentParser(prog="hf-fwdattr", description="Training-data attribution with forward passes only at query time.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="Run the end-to-end demonstration on built-in defaults.")
    demo.add_argument("--output-dir", default="runs/demo", help="Where the demo writes its outputs.")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--task", choices=["facts", "classifier"], default="facts",
                      help="facts: LoRA fine-tune of a tiny causal LM with the Trainer callback (default); classifier: a small MLP.")
    demo.set_defaults(run=_demo)

    attribute = commands.add_parser("attribute", help="Generate an answer and rank the training documents (or sources) behind it.")
    attribute.add_argument("prompts", nargs="+", help="One or more prompts.")
    attribute.add_argument("--model", required=True, help="Model folder or Hub id (an adapter saved next to the base is loaded too).")
    attribute.add_argument("--influence", required=True, help="Influence artifact folder or Hub repo id.")
    attribute.add_argument("--top-k", type=int, default=5)
    attribute.add_argument("--aggregate", choices=["document", "source"], default="document")
    attribute.add_argument("--per-token", action="store_true", help="Also attribute each generated token.")
    attribute.add_argument("--max-new-tokens", type=int, default=16)
    attribute.add_argument("--response", help="Score this answer instead of generating one (auditing).")
    attribute.add_argument("--readout", choices=["jvp", "central_difference", "one_sided", "removal"],
                           help="Override the artifact's readout mode (removal: for artifacts of the unlearning solver).")
    attribute.add_argument("--json", action="store_true", help="Print the pipeline's records as JSON.")
    attribute.set_defaults(run=_attribute)

    export = commands.add_parser(
        "export-adapters", help="Write an artifact's directions as PEFT LoRA adapters (θ* ± εu) for a LoRA inference server.",
        description="For the readout inside a served model: `hf-fwdattr serve-attribute` (or your own client) reads the "
        "answers' log-likelihoods under these adapters from vLLM and turns them into scores.",
    )
    export.add_argument("--model", required=True, help="The model the artifact was made on (folder or Hub id; its adapter too).")
    export.add_argument("--influence", required=True, help="Influence artifact folder or Hub repo id.")
    export.add_argument("--output-dir", required=True, help="Folder of the adapter set.")
    export.add_argument("--directions", choices=["sources", "basis", "documents"], default="sources",
                        help="sources: one adapter pair per source (source scores); basis: the compressed readout basis "
                        "(document scores); documents: the --document-ids given.")
    export.add_argument("--document-ids", nargs="+", help="With --directions documents: the documents to export.")
    export.add_argument("--one-sided", action="store_true", help="Only θ* + εu adapters (half the requests, less accurate).")
    export.add_argument("--epsilon", type=float, help="Step length along each unit direction (default: the artifact's, else the float32 default).")
    export.add_argument("--served-model", help="base_model_name_or_path written into each adapter (default: the artifact's base model).")
    export.add_argument("--served-dir", help="Also copy --model's folder without its adapter files here: the base weights a "
                        "server serves (vLLM would read adapter_model.safetensors as model weights).")
    export.add_argument("--overwrite", action="store_true", help="Replace an existing --output-dir.")
    export.set_defaults(run=_export_adapters)

    serve = commands.add_parser(
        "serve-attribute", help="Generate answers with vLLM and attribute them through an exported adapter set.",
        description="Either against a running `vllm serve` (--url; start it with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True and the "
        "settings `export-adapters` prints) or in this process (--model; needs the vllm extra).",
    )
    serve.add_argument("prompts", nargs="+", help="One or more prompts.")
    serve.add_argument("--adapters", required=True, help="Adapter set folder written by `hf-fwdattr export-adapters`.")
    where = serve.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="Address of a running OpenAI-compatible vLLM server, e.g. http://127.0.0.1:8000.")
    where.add_argument("--model", help="Served weights (θ* without the adapters) to start vllm.LLM on, in this process.")
    serve.add_argument("--server-adapters", help="--url: the adapter set's folder as the server sees it (default: the same path).")
    serve.add_argument("--api-key", help="--url: the server's --api-key.")
    serve.add_argument("--engine-arg", action="append", default=[], metavar="KEY=VALUE",
                       help="--model: extra vllm.LLM argument (JSON values), e.g. kv_cache_memory_bytes=268435456.")
    serve.add_argument("--max-new-tokens", type=int, default=16)
    serve.add_argument("--top-k", type=int, default=5, help="How many sources or documents to list.")
    serve.add_argument("--json", action="store_true", help="Print the records as JSON.")
    serve.set_defaults(run=_serve_attribute)

    from .evaluation.fact_tracing import METHODS

    evaluate = commands.add_parser(
        "evaluate", help="Fact tracing: recall@k, MRR and source accuracy of the true document, against BM25 and gradient peers.",
        description="On built-in defaults, builds the fact model (a LoRA fine-tune with the callback) and evaluates it. "
        "On your own model: --model, --influence, --documents (id, source, text) and --queries (query, answer, true document id).",
    )
    evaluate.add_argument("--output-dir", default="runs/evaluate", help="Where fact_tracing.json, the figures (and a default model) go.")
    evaluate.add_argument("--model", help="Model folder (base + adapter + tokenizer); default: build the fact model.")
    evaluate.add_argument("--influence", help="Influence artifact folder or Hub repo id of that model.")
    evaluate.add_argument("--documents", help="Documents file (.jsonl/.json/.csv/.parquet or a save_to_disk folder).")
    evaluate.add_argument("--queries", help="Queries file: a prompt, the answer, the id of the one document stating the fact.")
    evaluate.add_argument("--methods", nargs="+", choices=list(METHODS),
                          help="Default: all, except exact influence when the subspace has more than --influence-max-dim dimensions.")
    evaluate.add_argument("--influence-max-dim", type=int, default=4096)
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--no-append-eos", dest="append_eos", action="store_false",
                          help="Documents given as text were trained without a trailing end-of-sequence token.")
    evaluate.add_argument("--influence-solver", choices=["auto", "dense", "cg"], default="auto",
                          help="Exact influence: explicit curvature + eigendecomposition, or conjugate gradients.")
    evaluate.add_argument("--influence-tolerance", type=float, default=1e-4, help="CG: relative residual to reach.")
    evaluate.add_argument("--influence-max-iterations", type=int, default=2000, help="CG: iterations at most.")
    evaluate.add_argument("--no-plots", action="store_true")
    for flag, default in (("id", "document_id"), ("source", "source"), ("text", "text"), ("query", "query"), ("answer", "answer"),
                          ("true", "document_id"), ("kind", "kind")):
        evaluate.add_argument(f"--{flag}-column", default=default, help=f"Column name in your files (default {default!r}).")
    evaluate.set_defaults(run=_evaluate)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the `hf-fwdattr` console script."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
