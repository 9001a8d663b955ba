"""What a newcomer meets first: the README's pipeline call, what the demo leaves on disk, PEFT models accepted
quietly, and what a score's share means."""

import ast
import logging
import os
import re
import warnings
from pathlib import Path

import pytest
from transformers import pipeline

import hf_fwdattr  # noqa: F401  (registers the task)

ROOT = Path(__file__).resolve().parents[1]
SNIPPET_MARK = "<!-- the pipeline call of the quick start; tests/test_quickstart.py runs it -->"


def readme_snippet() -> str:
    """The README's documented pipeline call: the python block right after `SNIPPET_MARK`."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(re.escape(SNIPPET_MARK) + r"\s*```python\n(.*?)```", readme, re.S)
    assert block, "the README lost its quick-start pipeline snippet"
    return block.group(1)


def run_snippet(code: str, demo_dir: Path):
    """Run the snippet on `demo_dir` instead of runs/demo; returns the value of its last expression."""
    tree = ast.parse(code.replace("runs/demo", str(demo_dir)))
    last = tree.body.pop()
    assert isinstance(last, ast.Expr), "the snippet ends with the pipeline call whose output the README shows"
    namespace: dict = {}
    exec(compile(tree, "README.md", "exec"), namespace)
    call = compile(ast.Expression(last.value), "README.md", "eval")
    return eval(call, namespace), lambda: eval(call, namespace)


def test_the_documented_pipeline_call_gives_the_same_output_twice(fact_model):
    first, again = run_snippet(readme_snippet(), fact_model["directory"])
    assert first == again() == again()
    assert run_snippet(readme_snippet(), fact_model["directory"])[0] == first  # a fresh pipeline, too
    (record,) = first
    assert record["generated_text"].endswith(".") and {"document_id", "source", "score", "share"} <= set(record["attributions"][0])


def test_the_demo_layout_loads_cleanly_with_the_usual_peft_calls(fact_model):
    from peft import AutoPeftModelForCausalLM

    directory = fact_model["directory"]
    assert sorted(p.name for p in directory.iterdir()) == ["base", "influence", "model"]  # no empty training folders
    assert not (directory / "model" / "config.json").exists(), "the adapter folder holds no base weights"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = AutoPeftModelForCausalLM.from_pretrained(directory / "model")
    assert not [w for w in caught if "peft_config" in str(w.message)], [str(w.message) for w in caught]
    assert list(model.peft_config) == ["default"]
    assert model.generation_config.do_sample is False  # greedy: the README's calls give one answer


def fresh_peft_model(fact_model):
    """A `PeftModel` loaded from the demo's folders (a test merges the session's in-memory model)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    directory = fact_model["directory"]
    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(directory / "base"), directory / "model").eval()


def test_pipeline_accepts_a_peft_model_without_the_not_supported_error(fact_model):
    model = fresh_peft_model(fact_model)
    records = []

    class Remember(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    handler = Remember()
    library = logging.getLogger("transformers")  # transformers' loggers do not propagate to the root logger
    library.addHandler(handler)
    try:
        pipeline("text-generation", model=model, tokenizer=fact_model["tokenizer"])
        assert any("is not supported for text-generation" in m for m in records), "control: the plain pipeline complains"
        records.clear()
        pipe = pipeline("attributed-text-generation", model=model, tokenizer=fact_model["tokenizer"], influence=fact_model["artifact"])
    finally:
        library.removeHandler(handler)
    assert not [m for m in records if "not supported" in m]
    assert type(pipe.model).__name__ == "PeftModel"


def test_share_is_each_entrys_part_of_the_positive_scores(fact_model):
    pipe = pipeline("attributed-text-generation", model=fresh_peft_model(fact_model), tokenizer=fact_model["tokenizer"],
                    influence=fact_model["artifact"])
    question = fact_model["corpus"]["questions"][0]
    every = fact_model["artifact"].num_documents
    for aggregate, count in (("document", every), ("source", len(fact_model["artifact"].source_names))):
        (record,) = pipe(question["prompt"], response=question["answer"], attribution_top_k=count, aggregate=aggregate)
        entries = record["attributions"]
        positive = sum(max(e["score"], 0.0) for e in entries)
        assert len(entries) == count and sum(e["share"] for e in entries) == pytest.approx(1.0)
        for entry in entries:
            assert entry["share"] == pytest.approx(max(entry["score"], 0.0) / positive)
    (top,) = pipe(question["prompt"], response=question["answer"], attribution_top_k=2)  # shares are over every document, not the top ones
    assert top["attributions"][0]["share"] == pytest.approx(max(top["attributions"][0]["score"], 0.0) / positive_of_documents(pipe, question))


def positive_of_documents(pipe, question) -> float:
    (record,) = pipe(question["prompt"], response=question["answer"], attribution_top_k=pipe.influence.num_documents)
    return sum(max(e["score"], 0.0) for e in record["attributions"])


def test_saved_safetensors_files_have_the_usual_mode(fact_model):
    from hf_fwdattr.storage.permissions import current_umask

    umask = current_umask()
    assert umask == os.umask(umask)  # read without changing it
    for path in fact_model["directory"].rglob("*.safetensors"):
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path


NUMBER = re.compile(r"[+-]?\d+(?:\.\d+)?")


def readme_transcript(command: str) -> list[str]:
    """The lines of the README's transcript of `command` (after its `$` line), without the parts trimmed with "..."."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"<!-- transcript: " + re.escape(command) + r" -->\s*```text\n(.*?)```", readme, re.S)
    assert block, f"the README lost its transcript of {command}"
    lines = block.group(1).splitlines()
    return [line for line in lines[1:] if line != "..."]


def same_up_to_rounding(shown: list[str], printed: list[str]) -> None:
    assert [NUMBER.sub("#", line) for line in shown] == [NUMBER.sub("#", line) for line in printed]
    for line, actual in zip(shown, printed):
        for a, b in zip(NUMBER.findall(line), NUMBER.findall(actual)):
            assert float(a) == pytest.approx(float(b), rel=0.01, abs=0.15), (line, actual)


@pytest.mark.slow
def test_the_readme_transcripts_are_what_the_commands_print(tmp_path, capsys, monkeypatch):
    """`make demo` and the README's `attribute` call, run again (from a copy of the working directory's layout)."""
    from hf_fwdattr.cli import main

    monkeypatch.chdir(tmp_path)  # the commands' relative paths (runs/demo) land in the temporary folder
    assert main(["demo", "--output-dir", "runs/demo"]) == 0
    printed = capsys.readouterr().out.splitlines()
    shown = readme_transcript("make demo")
    start = printed.index(next(line for line in shown if line.startswith("[3/3]")))
    kept = [line for line in printed if line and not line.startswith("{'")]
    same_up_to_rounding([line for line in shown[shown.index(printed[start]):] if line], kept[kept.index(printed[start]):])
    shown = readme_transcript("hf-fwdattr attribute")
    command = (ROOT / "README.md").read_text(encoding="utf-8").split("<!-- transcript: hf-fwdattr attribute -->")[1].split("$ ")[1].split("\n")[0]
    arguments = re.findall(r'"[^"]*"|\S+', command)[1:]
    assert main([argument.strip('"') for argument in arguments]) == 0
    same_up_to_rounding(shown, capsys.readouterr().out.splitlines())
