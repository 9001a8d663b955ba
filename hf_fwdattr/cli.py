"""The `hf-fwdattr` command line.

Building the parser imports nothing heavy (``hf-fwdattr --help`` answers in a fraction of a second); each command
imports what it needs when it runs. The library's own errors, missing files and bad arguments end the command with
one line on stderr and exit code 1 (2 for arguments argparse rejects); ``--traceback`` shows the whole story.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

# `hf_fwdattr.evaluation.fact_tracing.METHODS`, spelled out so that the parser does not import the evaluation
# (torch and the fact-tracing code); a test keeps the two equal.
EVALUATION_METHODS = ("ours", "ours_unlearning", "bm25", "grad_dot", "influence", "random")
DEFAULT_DEMO_DIR = "runs/demo"

SCORE_UNITS = {
    "removal": "score: how much the answer's log-likelihood (nats) drops when the {what} is unlearned "
               "(positive: it made the answer more likely).",
    "first_order": "score: change of the answer's log-likelihood (nats) per unit of up-weighting the {what} in the "
                   "training loss, to first order (positive: it made the answer more likely).",
}
SHARE_UNIT = "share: the entry's part of all positive scores for this answer, comparable across answers."


class CommandError(Exception):
    """A command cannot run as asked (e.g. a path that does not exist); the message says what to fix."""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def looks_like_path(name: str) -> bool:
    """Whether `name` can only be a local path, never a Hub repo id (``namespace/name``): it starts with ``.``, ``/``
    or ``~``, contains the OS's own separator (where that is not ``/``) or more than one ``/``, or its first part
    exists here."""
    if name.startswith((".", "/", "~")) or (os.sep != "/" and os.sep in name) or name.count("/") > 1:
        return True
    first = name.split("/")[0]
    return "/" in name and Path(first).exists()


def check_local_path(name: Optional[str], flag: str, marker: Optional[str] = None) -> None:
    """Refuse a path-looking `name` that does not exist (or lacks `marker`), naming the nearest existing folder."""
    if name is None or not looks_like_path(name):
        return
    path = Path(name).expanduser()
    if path.exists():
        return
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing in (Path("."), Path(existing.anchor)):
        hint = "" if path.is_absolute() else f" (relative to {Path.cwd()})"
    else:
        import difflib

        siblings = sorted(child.name for child in existing.iterdir() if not child.name.startswith("."))
        close = difflib.get_close_matches(path.relative_to(existing).parts[0], siblings, n=1)
        hint = f"; {existing} exists" + (f": did you mean {existing / close[0]}?" if close else f" and holds {siblings[:8]}")
    raise CommandError(f"{flag} {name}: no such file or folder{hint}")


# ---------------------------------------------------------------------- the commands
def _demo(args: argparse.Namespace) -> int:
    from .demo.run import classifier_demo, fact_demo

    if args.task == "classifier":
        classifier_demo(output_dir=args.output_dir, seed=args.seed)
    else:
        fact_demo(output_dir=args.output_dir or DEFAULT_DEMO_DIR, seed=args.seed)
    return 0


def _attribute(args: argparse.Namespace) -> int:
    import json

    check_local_path(args.model, "--model")
    check_local_path(args.influence, "--influence")
    from transformers import pipeline

    from .integrations import pipeline as _registration  # noqa: F401  (registers the task)

    pipe = pipeline("attributed-text-generation", model=args.model, influence=args.influence, readout=args.readout)
    call = {"attribution_top_k": args.top_k, "aggregate": args.aggregate, "per_token": args.per_token}
    if args.response is not None:
        call["response"] = args.response
    else:  # greedy: the answer attributed is the model's most likely one, the same on every run
        call.update(max_new_tokens=args.max_new_tokens, do_sample=False)
        if args.stop_sequence:
            call["stop_sequence"] = args.stop_sequence
    results = [pipe(prompt, **call) for prompt in args.prompts]
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    for prompt, records in zip(args.prompts, results):
        for record in records:
            text = record["generated_text"]
            answer = text[len(prompt):] if text.startswith(prompt) else text
            print(f"{prompt} → {answer!r}")
            print(format_attributions(record["attributions"]))
            for token in record.get("token_attributions", []):
                print(f"  token {token['token']!r}:")
                print(format_attributions(token["attributions"], indent="    "))
    mode = args.readout or pipe.influence.config.readout.value
    what = "document" if args.aggregate == "document" else "source (all its documents together)"
    print(f"\n{SCORE_UNITS['removal' if mode == 'removal' else 'first_order'].format(what=what)}\n{SHARE_UNIT}")
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
    records = readout.attribute(args.prompts, max_new_tokens=args.max_new_tokens, top_k=args.top_k, per_token=args.per_token)
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
        for token in record.get("token_attributions", []):
            top = token["attributions"][0]
            print(f"     token {token['token_id']}: {top.get('document_id') or top['source']}  {top['score']:+.4f}")
    return 0


def format_attributions(entries: list[dict], indent: str = "  ") -> str:
    """A ranked table of pipeline attributions (documents or sources) with score and share."""
    lines = []
    for rank, entry in enumerate(entries, start=1):
        if "document_id" in entry:
            name = f"{entry['document_id']:<18} {entry.get('source') or '':<16}"
        else:
            name = f"{entry['source']:<18} {str(entry['n_documents']) + ' documents':<16}"
        share = f"   share {entry['share']:6.1%}" if "share" in entry else ""
        lines.append(f"{indent}{rank:>2}. {name} score {entry['score']:+10.3f}{share}")
    return "\n".join(lines)


def _evaluate(args: argparse.Namespace) -> int:
    check_local_path(args.model, "--model")
    check_local_path(args.influence, "--influence")
    for flag, name in (("--documents", args.documents), ("--queries", args.queries)):  # always local files
        if name is not None and not Path(name).expanduser().exists():
            check_local_path(name if looks_like_path(name) else os.path.join(".", name), flag)
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


# ---------------------------------------------------------------------- the parser
def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `hf-fwdattr`."""
    parser = argparse.ArgumentParser(prog="hf-fwdattr", description="Training-data attribution with forward passes only at query time.")
    parser.add_argument("--traceback", action="store_true", help="On an error, show the full traceback instead of one line.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo", help="Run the end-to-end demonstration on built-in defaults (about 30 s on 2 CPU cores).",
        description="facts (default): build a corpus of invented facts, pre-train a tiny Llama, fine-tune a LoRA adapter with the "
        "Trainer callback, then show what the model answers and which documents made it (about 30 s on 2 CPU cores). "
        "classifier: the model-agnostic core on a small MLP (a few seconds).",
    )
    demo.add_argument("--output-dir", default=None,
                      help=f"Where the demo writes its outputs (facts: base/, model/, influence/; classifier: influence/ and scores). "
                      f"Default: {DEFAULT_DEMO_DIR} for facts; the classifier demo writes nothing unless given one.")
    demo.add_argument("--seed", type=int, default=0, help="Seed of the corpus, the models and the training order (default 0).")
    demo.add_argument("--task", choices=["facts", "classifier"], default="facts",
                      help="facts: LoRA fine-tune of a tiny causal LM with the Trainer callback (default); classifier: a small MLP.")
    demo.set_defaults(run=_demo)

    attribute = commands.add_parser(
        "attribute", help="Generate an answer (greedy) and rank the training documents (or sources) behind it.",
        description="Generates each prompt's answer greedily (the same answer on every run) and ranks the training documents or "
        "sources by how much they made that answer likely, with forward passes only. Takes seconds.",
    )
    attribute.add_argument("prompts", nargs="+", help="One or more prompts.")
    attribute.add_argument("--model", required=True, help="Model folder or Hub id (a folder holding a PEFT adapter loads its base too).")
    attribute.add_argument("--influence", required=True, help="Influence artifact folder or Hub repo id.")
    attribute.add_argument("--top-k", type=_positive_int, default=5, help="How many documents (or sources) to list per answer (default 5).")
    attribute.add_argument("--aggregate", choices=["document", "source"], default="document",
                           help="Rank single documents, or sources (exact: one direction per source).")
    attribute.add_argument("--per-token", action="store_true", help="Also attribute each generated token.")
    attribute.add_argument("--max-new-tokens", type=_positive_int, default=16, help="Longest answer generated (default 16 tokens).")
    attribute.add_argument("--stop-sequence", help="Stop generating once this string appears (e.g. '.'), so that only the answer is attributed.")
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
    export.add_argument("--served-dir", help="Also copy the base weights a server serves here, without adapter files (vLLM "
                        "would read adapter_model.safetensors as model weights): --model's folder, or the base folder its "
                        "adapter_config.json names.")
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
    serve.add_argument("--max-new-tokens", type=_positive_int, default=16, help="Longest answer generated (default 16 tokens).")
    serve.add_argument("--top-k", type=int, default=5, help="How many sources or documents to list.")
    serve.add_argument("--per-token", action="store_true", help="Also attribute each answer token (from the same requests).")
    serve.add_argument("--json", action="store_true", help="Print the records as JSON.")
    serve.set_defaults(run=_serve_attribute)

    evaluate = commands.add_parser(
        "evaluate", help="Fact tracing: recall@k, MRR and source accuracy of the true document, against BM25 and gradient peers.",
        description="On built-in defaults, builds the fact model (a LoRA fine-tune with the callback) and evaluates it "
        "(about 10 minutes on 2 CPU cores with OMP_NUM_THREADS=1: 3 pre-training the model, 5 for the unlearning solver; "
        "--methods without ours_unlearning saves those 5). "
        "On your own model: --model, --influence, --documents (id, source, text) and --queries (query, answer, true document id).",
    )
    evaluate.add_argument("--output-dir", default="runs/evaluate", help="Where fact_tracing.json, the figures (and a default model) go.")
    evaluate.add_argument("--model", help="Model folder (base + adapter + tokenizer); default: build the fact model.")
    evaluate.add_argument("--influence", help="Influence artifact folder or Hub repo id of that model.")
    evaluate.add_argument("--documents", help="Documents file (.jsonl/.json/.csv/.parquet or a save_to_disk folder).")
    evaluate.add_argument("--queries", help="Queries file: a prompt, the answer, the id of the one document stating the fact.")
    evaluate.add_argument("--methods", nargs="+", choices=list(EVALUATION_METHODS),
                          help="Default: all, except exact influence when the subspace has more than --influence-max-dim dimensions.")
    evaluate.add_argument("--influence-max-dim", type=_positive_int, default=4096,
                          help="Largest subspace exact influence runs on by default (default 4096).")
    evaluate.add_argument("--seed", type=int, default=0, help="Seed of the default corpus and model, and of the random baseline (default 0).")
    evaluate.add_argument("--no-append-eos", dest="append_eos", action="store_false",
                          help="Documents given as text were trained without a trailing end-of-sequence token.")
    evaluate.add_argument("--influence-solver", choices=["auto", "dense", "cg"], default="auto",
                          help="Exact influence: explicit curvature + eigendecomposition, or conjugate gradients.")
    evaluate.add_argument("--influence-tolerance", type=float, default=1e-4, help="CG: relative residual to reach.")
    evaluate.add_argument("--influence-max-iterations", type=_positive_int, default=2000, help="CG: iterations at most.")
    evaluate.add_argument("--no-plots", action="store_true", help="Write the metrics only, no figures.")
    for flag, default in (("id", "document_id"), ("source", "source"), ("text", "text"), ("query", "query"), ("answer", "answer"),
                          ("true", "document_id"), ("kind", "kind")):
        evaluate.add_argument(f"--{flag}-column", default=default, help=f"Column name in your files (default {default!r}).")
    evaluate.set_defaults(run=_evaluate)
    return parser


def configure_logging() -> None:
    """Show this library's INFO lines on stderr; other libraries' loggers keep their own levels and handlers (the root
    logger is left alone, so that e.g. bm25s, which sets its logger to DEBUG, prints nothing)."""
    library = logging.getLogger("hf_fwdattr")
    if not any(isinstance(handler, _StderrHandler) for handler in library.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        library.addHandler(handler)
    library.setLevel(logging.INFO)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is at the time of the record (it may be replaced after the handler is made)."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def _is_library_error(err: BaseException) -> bool:
    return type(err).__module__.split(".")[0] == "hf_fwdattr" or isinstance(err, (CommandError, OSError))


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the `hf-fwdattr` console script."""
    args = build_parser().parse_args(argv)
    configure_logging()
    try:
        return args.run(args)
    except KeyboardInterrupt:
        print("hf-fwdattr: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001
        if args.traceback or not _is_library_error(err):
            raise
        message = str(err) if isinstance(err, CommandError) else f"{type(err).__name__}: {err}"
        print(f"hf-fwdattr {args.command}: error: {message}  (--traceback for details)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
