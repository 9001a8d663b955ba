"""The model of the scale benchmark: a tiny Llama pretrained once, then a LoRA adapter trained one epoch per N.

The base model (hidden 64, 2 layers, vocabulary 512) is trained from scratch on a separate corpus of the same
kind and cached; for each N a fresh, seeded LoRA adapter (r = 8 on q_proj and v_proj, p = 3,584) is trained
for one epoch over the N documents with AdamW, batch 32 — that epoch is what simulation cost is measured in.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import torch

from hf_fwdattr import CausalLMTask

BATCH_SIZE = 32
LORA = dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
TASK = CausalLMTask(pad_token_id=0)


def base_model(cache: Path, tokenizer, pretraining_texts):
    """The pretrained tiny Llama (trained on `pretraining_texts()` and saved under `cache` the first time)."""
    from transformers import LlamaForCausalLM

    from hf_fwdattr.demo.toy import tiny_llama

    from .corpus import tokenize

    directory = cache / "base"
    if (directory / "config.json").is_file():
        return LlamaForCausalLM.from_pretrained(directory).eval()
    model = tiny_llama(vocab_size=len(tokenizer), hidden_size=64, layers=2, heads=4, max_position_embeddings=64)
    examples = [{"input_ids": ids} for ids in tokenize(tokenizer, pretraining_texts())]
    train_epoch(model, examples, list(model.parameters()), lr=3e-3, seed=1)
    model.save_pretrained(directory)
    return model.eval()


def with_adapter(base, seed: int = 0):
    """`base` (copied) with a fresh LoRA adapter, seeded."""
    import copy

    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    return get_peft_model(copy.deepcopy(base), LoraConfig(**LORA)).eval()


def train_epoch(model, examples: list[dict], parameters: list, lr: float = 1e-3, seed: int = 0) -> dict:
    """One epoch of AdamW over `examples` in a seeded random order, batch 32; returns its wall and CPU seconds.

    A plain PyTorch loop (forward with the mean token loss, backward, optimizer step): the cheapest epoch, so
    cost ratios against it are upper bounds of those against a `Trainer` epoch.
    """
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)
    model.train()
    start, cpu = time.perf_counter(), time.process_time()
    for lo in range(0, len(order), BATCH_SIZE):
        batch = TASK.collate([examples[i] for i in order[lo : lo + BATCH_SIZE]])
        loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    seconds = {"epoch_seconds": time.perf_counter() - start, "epoch_cpu_seconds": time.process_time() - cpu}
    model.eval()
    return seconds


def trained_adapter(cache: Path, base, examples: list[dict]):
    """(model with its LoRA adapter trained one epoch on `examples`, epoch {wall, CPU} seconds or None if loaded from cache)."""
    from peft import PeftModel

    directory = cache / "adapter"
    if (directory / "adapter_config.json").is_file():
        return PeftModel.from_pretrained(__import__("copy").deepcopy(base), directory).eval(), None
    model = with_adapter(base)
    seconds = train_epoch(model, examples, [p for p in model.parameters() if p.requires_grad])
    model.save_pretrained(directory)
    return model, seconds
