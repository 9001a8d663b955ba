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
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the `hf-fwdattr` console script."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
