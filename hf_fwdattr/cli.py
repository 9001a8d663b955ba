"""The `hf-fwdattr` command line."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional, Sequence


def _demo(args: argparse.Namespace) -> int:
    from .demo import classifier_demo, fact_demo

    if args.task == "classifier":
        classifier_demo(seed=args.seed)
    else:
        fact_demo(output_dir=args.output_dir, seed=args.seed)
    return 0


def _attribute(args: argparse.Namespace) -> int:
    import json

    from transformers import pipeline

    from . import pipeline as _registration  # noqa: F401  (registers the task)

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
    attribute.add_argument("--readout", choices=["jvp", "central_difference", "one_sided"], help="Override the artifact's readout mode.")
    attribute.add_argument("--json", action="store_true", help="Print the pipeline's records as JSON.")
    attribute.set_defaults(run=_attribute)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the `hf-fwdattr` console script."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
