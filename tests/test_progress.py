"""Progress bars: one per long stage, closed cleanly, never nested (no cursor-up escapes in a log), and off when
the Hugging Face switches say so."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import Trainer, TrainingArguments
from transformers.utils import logging as hf_logging

from hf_fwdattr import AttributionConfig, ForwardAttributionCallback
from hf_fwdattr.demo.run import collator
from hf_fwdattr.progress import progress_bar

from conftest import VOCAB, lm_examples, tiny_llama

ROOT = Path(__file__).resolve().parents[1]
CURSOR_UP = "\x1b[A"


def _train_with_callback(output_dir: Path, lm_task) -> None:
    model = get_peft_model(tiny_llama(VOCAB), LoraConfig(r=2, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    rows = [{"document_id": f"doc-{i}", **example} for i, example in enumerate(lm_examples(24, seed=5))]
    args = TrainingArguments(output_dir=str(output_dir), num_train_epochs=1, per_device_train_batch_size=8, learning_rate=1e-2,
                             save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=False, logging_steps=10_000,
                             remove_unused_columns=False)
    callback = ForwardAttributionCallback(document_column="document_id", config=AttributionConfig(damping=1e-2, batch_size=8))
    Trainer(model=model, args=args, train_dataset=Dataset.from_list(rows), data_collator=collator(lm_task), callbacks=[callback]).train()
    assert callback.artifact is not None


def test_the_callbacks_bars_follow_the_trainers_without_nesting(tmp_path, lm_task, capsys):
    _train_with_callback(tmp_path / "run", lm_task)
    err = capsys.readouterr().err  # not a terminal: what a log file would keep
    assert CURSOR_UP not in err
    for stage in ("Curvature (", "Simulating responses (shards)"):
        shown = [part for part in err.replace("\r", "\n").splitlines() if part.startswith(stage)]
        assert shown and "100%" in shown[-1], f"{stage}: no finished bar in {err[-2000:]!r}"


def test_the_bars_are_off_when_transformers_turns_progress_bars_off(tmp_path, lm_task, capsys):
    hf_logging.disable_progress_bar()
    try:
        _train_with_callback(tmp_path / "run", lm_task)
    finally:
        hf_logging.enable_progress_bar()
    err = capsys.readouterr().err  # (the Trainer's own bar follows its `disable_tqdm`)
    assert "Curvature" not in err
    assert "Simulating responses" not in err


@pytest.mark.parametrize("switch, shown", [({}, True), ({"HF_HUB_DISABLE_PROGRESS_BARS": "1"}, False)])
def test_the_environment_switch_of_the_hub_turns_the_bars_off(switch, shown):
    code = "from hf_fwdattr.progress import progress_bar\nprint(not progress_bar(range(3), desc='stage').disable)"
    env = {key: value for key, value in os.environ.items() if key != "HF_HUB_DISABLE_PROGRESS_BARS"}
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**env, **switch, "PYTHONPATH": str(ROOT)})
    assert run.stdout.strip() == str(shown), run.stderr


def test_this_librarys_bars_alone_can_be_turned_off():
    from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

    disable_progress_bars("hf_fwdattr")
    try:
        with progress_bar(range(3), desc="stage") as bar:
            assert bar.disable
    finally:
        enable_progress_bars("hf_fwdattr")
    with progress_bar(range(3), desc="stage") as bar:
        assert not bar.disable
