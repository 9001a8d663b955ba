"""LoRA fine-tune of the test base model with ForwardAttributionCallback; run under torchrun (2 CPU processes)
or alone. Writes <output_dir>/influence and the adapter to <output_dir>/adapter.

    torchrun --nproc_per_node 2 tests/scripts/distributed_finetune.py BASE_DIR OUTPUT_DIR [SOLVER] [compressed]
"""

import sys
from pathlib import Path

import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

from hf_fwdattr import AttributionConfig, CausalLMTask, CompressionConfig, ForwardAttributionCallback
from hf_fwdattr.demo.toy import fact_corpus


# compressed responses: two processes share out both passes (a few documents per shard) and one builds the basis
COMPRESSED = CompressionConfig(storage="compressed", sample_documents=6, validation_documents=2, heldout_documents=3, max_rank=4, queries=2,
                               shard_documents=3, chunk_size=4 * 2 * 2048)


def _slow_second_rank(seconds: float = 3.0) -> None:
    """Rank 1 opens every shard folder `seconds` late (SLOW_SECOND_RANK=1): by then rank 0 has written shards, which a
    process listing the folder itself would drop from its share of the work (the race the build must not have)."""
    import os
    import time

    from hf_fwdattr.storage.shards import ShardWriter

    if os.environ.get("SLOW_SECOND_RANK") != "1" or os.environ.get("RANK") != "1":
        return
    opened = ShardWriter.__init__

    def late(self, *args, **kwargs):
        if not kwargs.get("create", True):
            time.sleep(seconds)
        opened(self, *args, **kwargs)

    ShardWriter.__init__ = late


def main(base_dir: str, output_dir: str, solver: str = "closed_form", storage: str = "exact") -> None:
    _slow_second_rank()
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]))
    corpus = fact_corpus(n_entities=4, relations_per_entity=2, n_filler=3, n_distractors=1, pretraining_entities=6)
    rows = [{"document_id": d["document_id"], "source": d["source"], "input_ids": tokenizer(d["text"])["input_ids"]} for d in corpus["documents"]]
    task = CausalLMTask(pad_token_id=tokenizer.pad_token_id)
    callback = ForwardAttributionCallback(
        document_column="document_id", source_column="source", max_shard_size=2 * 4 * 2048,  # a few documents per shard
        config=AttributionConfig(solver=solver, damping=1e-2, horizon=8, batch_size=4),
        compression=COMPRESSED if storage == "compressed" else "exact",
    )
    args = TrainingArguments(output_dir=output_dir, num_train_epochs=2, per_device_train_batch_size=4, learning_rate=5e-3,
                             save_strategy="no", report_to=[], use_cpu=True, remove_unused_columns=False, disable_tqdm=True, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer, callbacks=[callback],
                      data_collator=lambda batch: task.collate([{"input_ids": r["input_ids"]} for r in batch]))
    trainer.train()
    if trainer.is_world_process_zero():
        model.save_pretrained(Path(output_dir) / "adapter")
        print("processes", trainer.args.world_size, "artifact", callback.artifact)


if __name__ == "__main__":
    main(*sys.argv[1:5])
