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
