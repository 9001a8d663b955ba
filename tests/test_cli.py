"""The command line and the package's start-up: nothing heavy imported to answer --help or to import the package,
the pipeline still registered, one clear line instead of a traceback on errors, options documented."""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hf_fwdattr
from hf_fwdattr.cli import EVALUATION_METHODS, build_parser, looks_like_path, main

ROOT = Path(__file__).resolve().parents[1]


def _python(code: str) -> str:
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout


def test_import_and_help_load_neither_torch_nor_transformers():
    out = _python(
        "import sys, contextlib, io\n"
        "import hf_fwdattr\n"
        "from hf_fwdattr.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "    main(['--help'])\n"
        "print(sorted(m for m in ('torch', 'transformers', 'peft', 'datasets', 'transformers.pipelines') if m in sys.modules))\n"
    )
    assert out.strip() == "[]"


@pytest.mark.parametrize("order", ["hf_fwdattr first", "transformers first"])
def test_importing_the_package_registers_the_pipeline_task(order):
    imports = ["import hf_fwdattr", "from transformers import pipeline"]
    code = "\n".join(imports if order == "hf_fwdattr first" else imports[::-1]) + (
        "\nfrom transformers.pipelines import PIPELINE_REGISTRY, check_task"
        "\nimport transformers.pipelines as loaded"
        "\nname, task, _ = check_task('attributed-text-generation')"
        "\nprint(task['impl'].__name__, type(loaded.__spec__.loader).__name__)"
    )
    assert _python(code).split() == ["AttributedTextGenerationPipeline", "SourceFileLoader"]


def test_every_public_name_is_importable_from_the_package():
    for name in hf_fwdattr.__all__:
        assert getattr(hf_fwdattr, name) is not None, name
    namespace = {}
    exec("from hf_fwdattr import *", namespace)
    assert set(hf_fwdattr.__all__) <= set(namespace)
    assert set(hf_fwdattr.__all__) <= set(dir(hf_fwdattr))
    with pytest.raises(AttributeError, match="no attribute 'NotAName'"):
        hf_fwdattr.NotAName  # noqa: B018


def test_the_parser_lists_the_evaluation_methods_of_the_evaluation():
    from hf_fwdattr.evaluation.fact_metrics import METHODS

    assert EVALUATION_METHODS == METHODS


def test_every_option_has_help_text():
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, command in subparsers.choices.items():
        for action in command._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"{name} {action.option_strings[0]} has no help text"


@pytest.mark.parametrize("name, path", [("runs/demo/model", True), ("./model", True), ("/abs/model", True), ("~/model", True),
                                        ("me/my-model", False), ("gpt2", False), ("tests/nothing", True)])
def test_path_looking_names(name, path, monkeypatch):
    monkeypatch.chdir(ROOT)  # "tests" exists here, so "tests/nothing" is a path; "me" does not, so "me/my-model" is a repo id
    assert looks_like_path(name) is path


def test_a_mistyped_path_gets_one_line_about_the_path(tmp_path, capsys, monkeypatch):
    (tmp_path / "demo" / "model").mkdir(parents=True)
    (tmp_path / "demo" / "influence").mkdir()
    code = main(["attribute", "--model", str(tmp_path / "demo" / "modle"), "--influence", str(tmp_path / "demo" / "influence"), "Hi"])
    err = capsys.readouterr().err
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert "--model" in err and "no such file or folder" in err and f"did you mean {tmp_path / 'demo' / 'model'}?" in err
    assert "Traceback" not in err and "repo" not in err.lower()
    monkeypatch.chdir(tmp_path)
    assert main(["attribute", "--model", "demo/model", "--influence", "runs/demo/influence", "Hi"]) == 1
    assert "--influence runs/demo/influence: no such file or folder" in capsys.readouterr().err


def test_a_library_error_is_one_line_and_exit_code_1(fact_model, tmp_path, capsys):
    directory = fact_model["directory"]
    code = main(["attribute", "--model", str(directory / "model"), "--influence", str(directory / "model"), "Hi"])
    err = capsys.readouterr().err
    (line,) = [line for line in err.split("\n") if line and "\r" not in line]  # (transformers' own loading bars aside)
    assert code == 1 and "ArtifactError" in line and "not an influence artifact" in line and "Traceback" not in err
    with pytest.raises(Exception, match="not an influence artifact"):  # --traceback: the exception itself
        main(["--traceback", "attribute", "--model", str(directory / "model"), "--influence", str(directory / "model"), "Hi"])
    code = main(["evaluate", "--output-dir", str(tmp_path / "out"), "--model", str(directory / "model"), "--influence",
                 str(directory / "influence"), "--documents", "documents.jsonl", "--queries", str(tmp_path / "q.jsonl")])
    err = capsys.readouterr().err
    assert code == 1 and "--documents" in err and "no such file or folder" in err and not (tmp_path / "out").exists()


def test_bad_arguments_exit_2_with_usage(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["attribute", "--model", "m", "--influence", "i", "--top-k", "0", "Hi"])
    assert exit_info.value.code == 2 and "expected a positive integer, got 0" in capsys.readouterr().err


def test_attribute_prints_units_and_shares(fact_model, capsys):
    directory = fact_model["directory"]
    question = fact_model["corpus"]["questions"][0]
    assert main(["attribute", "--model", str(directory / "model"), "--influence", str(directory / "influence"), question["prompt"],
                 "--stop-sequence", ".", "--top-k", "3"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].startswith(question["prompt"] + " → '") and lines[0].endswith(".'")
    assert all("score" in line and "share" in line for line in lines[1:4])
    assert "nats" in out and "per unit of up-weighting" in out


def test_logging_shows_the_library_lines_and_not_third_party_debug():
    run = subprocess.run(
        [sys.executable, "-c",
         "import logging\n"
         "from hf_fwdattr.cli import configure_logging\n"
         "configure_logging()\n"
         "chatty = logging.getLogger('bm25s'); chatty.setLevel(logging.DEBUG); chatty.debug('Building index from tokens')\n"
         "logging.getLogger('hf_fwdattr.demo').info('a line of ours')\n"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert run.returncode == 0 and "a line of ours" in run.stderr and "bm25s" not in run.stderr and "DEBUG" not in run.stderr


def test_classifier_demo_writes_an_artifact_and_the_scores(tmp_path, capsys):
    from safetensors.torch import load_file

    from hf_fwdattr import InfluenceArtifact

    assert main(["demo", "--task", "classifier", "--output-dir", str(tmp_path / "mlp"), "--seed", "1"]) == 0
    artifact = InfluenceArtifact.from_pretrained(tmp_path / "mlp" / "influence")
    saved = load_file(tmp_path / "mlp" / "scores.safetensors")
    assert artifact.num_documents == saved["scores"].shape[1] == saved["train_labels"].numel() == 120
    assert saved["scores"].shape[0] == saved["query_labels"].numel() == 3 and torch.isfinite(saved["scores"]).all()
    assert json.loads((tmp_path / "mlp" / "influence" / "attribution_config.json").read_text())["num_documents"] == 120
    assert "scores.safetensors" in capsys.readouterr().out
