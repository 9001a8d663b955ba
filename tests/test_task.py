"""The objective the library differentiates is the one `transformers.Trainer` optimised."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, lm_examples

from hf_fwdattr import CausalLMTask, TaskError
from hf_fwdattr.demo.toy import tiny_llama


@pytest.fixture(scope="module")
def batch_and_trainer_loss(tmp_path_factory):
    """A batch with a prompt masked out and padding, and the loss `Trainer.compute_loss` gives on it."""
    from transformers import Trainer, TrainingArguments

    model = tiny_llama(VOCAB).eval()
    examples = lm_examples(5, seed=11)
    examples[1]["labels"] = [-100] * 3 + examples[1]["input_ids"][3:]  # a completion-only example
    batch = CausalLMTask(pad_token_id=0).collate(examples)
    args = TrainingArguments(output_dir=str(tmp_path_factory.mktemp("trainer")), report_to=[], use_cpu=True)
    trainer = Trainer(model=model, args=args)
    with torch.no_grad():
        reported = trainer.compute_loss(model, {k: v.clone() for k, v in batch.items()})
    return model, examples, batch, float(reported)


def test_token_mean_reduction_equals_the_trainer_loss(batch_and_trainer_loss):
    model, examples, batch, reported = batch_and_trainer_loss
    tokens = CausalLMTask.tokens_per_example_of(examples)
    task = CausalLMTask(pad_token_id=0, reduction="token_mean", tokens_per_example=tokens)
    with torch.no_grad():
        assert float(task.train_loss(model, batch).mean()) == pytest.approx(reported, rel=1e-6)


def test_sum_and_mean_reductions_weigh_tokens_and_examples(batch_and_trainer_loss):
    model, examples, batch, reported = batch_and_trainer_loss
    scored = (batch["labels"][:, 1:] != -100).sum(dim=1).double()
    with torch.no_grad():
        summed = CausalLMTask(pad_token_id=0, reduction="sum").train_loss(model, batch).double()
        mean = CausalLMTask(pad_token_id=0, reduction="mean").train_loss(model, batch).double()
        measured = CausalLMTask(pad_token_id=0, reduction="mean").measurement(model, batch).double()
    assert float(summed.sum() / scored.sum()) == pytest.approx(reported, rel=1e-6)  # Trainer: NLL sum over scored tokens
    torch.testing.assert_close(mean, summed / scored)
    torch.testing.assert_close(measured, -summed)  # f_q is the summed log-likelihood whatever the reduction


def test_token_mean_needs_the_token_count():
    with pytest.raises(TaskError, match="tokens_per_example"):
        CausalLMTask(reduction="token_mean")
    with pytest.raises(TaskError, match="reduction"):
        CausalLMTask(reduction="median")


def test_rows_as_trained_carry_the_collator_masks():
    """pad = eos: DataCollatorForLanguageModeling never scores the end-of-sequence token, and neither does attribution."""
    from datasets import Dataset
    from transformers import DataCollatorForLanguageModeling

    from hf_fwdattr.demo.toy import train_tokenizer
    from hf_fwdattr.integrations.data import rows_as_trained

    tokenizer = train_tokenizer(["the capital of Kaven is Vashfenvash", "the river runs north"], vocab_size=300)
    tokenizer.pad_token = tokenizer.eos_token
    texts = ["the capital of Kaven is Vashfenvash", "the river"]
    dataset = Dataset.from_list([{"document_id": f"d{i}", "input_ids": tokenizer(t)["input_ids"] + [tokenizer.eos_token_id]}
                                 for i, t in enumerate(texts)])
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    rows = rows_as_trained(dataset, lambda batch: collator([{"input_ids": r["input_ids"]} for r in batch]), ["document_id"])
    for row, stored in zip(rows, dataset):
        assert row["document_id"] == stored["document_id"] and row["input_ids"] == stored["input_ids"]
        assert row["labels"][-1] == -100 and row["labels"][:-1] == stored["input_ids"][:-1]
    tokens = CausalLMTask.tokens_per_example_of(rows)
    assert tokens == pytest.approx(sum(len(r["input_ids"]) - 2 for r in rows) / 2)  # the eos is not a scored token
