"""Does the fact model answer paraphrased questions? Pretrain + LoRA fine-tune, no attribution.

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.lm.generalisation --hidden 128 --entities 768

The recipe of `hf_fwdattr.demo.run.train_fact_model` on `hf-fwdattr evaluate`'s corpus (co-mention distractors,
pretraining paraphrases), with the width, the number of pretraining entities and the learning rates as
options. Prints, per query kind, the mean log p(answer | prompt) and how many queries the model answers
(every answer token its most likely next token). A paraphrase the model does not answer cannot be traced
to its document by any attribution of the model, so this is the first thing to check for a new recipe.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np


def main() -> None:
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer
    from transformers.utils import logging as hf_logging

    from hf_fwdattr.demo.run import LORA_TARGETS, collator, training_arguments
    from hf_fwdattr.demo.toy import fact_corpus, tiny_llama, train_tokenizer
    from hf_fwdattr.estimator.task import CausalLMTask
    from hf_fwdattr.evaluation.fact_data import FactTracingSet, query_examples
    from hf_fwdattr.evaluation.fact_tracing import EVALUATION_CORPUS, answer_statistics

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--entities", type=int, default=EVALUATION_CORPUS["pretraining_entities"], help="pretraining entities")
    parser.add_argument("--pretrain-epochs", type=int, default=40)
    parser.add_argument("--pretrain-lr", type=float, default=3e-3)
    parser.add_argument("--finetune-lr", type=float, default=1e-2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    hf_logging.set_verbosity_error()

    corpus = fact_corpus(seed=args.seed, **{**EVALUATION_CORPUS, "pretraining_entities": args.entities})
    documents = corpus["documents"]
    tokenizer = train_tokenizer(corpus["pretraining"] + [d["text"] for d in documents], vocab_size=600)
    task = CausalLMTask(pad_token_id=tokenizer.pad_token_id)
    encode = lambda text: tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]  # noqa: E731
    model = tiny_llama(len(tokenizer), hidden_size=args.hidden, layers=2, heads=4, seed=args.seed).train()

    def quiet(tmp, epochs, learning_rate, batch_size):
        arguments = training_arguments(tmp, epochs, learning_rate, batch_size, args.seed)
        arguments.disable_tqdm, arguments.logging_steps = True, 100_000
        return arguments

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        Trainer(model=model, args=quiet(tmp, args.pretrain_epochs, args.pretrain_lr, 16),
                train_dataset=Dataset.from_list([{"input_ids": encode(t)} for t in corpus["pretraining"]]), data_collator=collator(task)).train()
        pretrained = time.perf_counter()
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=LORA_TARGETS))
        Trainer(model=model, args=quiet(tmp, 30, args.finetune_lr, 8),
                train_dataset=Dataset.from_list([{"input_ids": encode(d["text"])} for d in documents]), data_collator=collator(task)).train()
    data = FactTracingSet.from_corpus(corpus)
    log_probs, answered = answer_statistics(model.eval(), task, query_examples(data, tokenizer))
    kinds = np.array(data.kinds)
    print(f"hidden {args.hidden}, {args.entities} pretraining entities ({len(corpus['pretraining'])} texts), pretraining LR "
          f"{args.pretrain_lr} × {args.pretrain_epochs} epochs ({pretrained - start:.0f}s), fine-tuning LR {args.finetune_lr}")
    for kind in dict.fromkeys(kinds.tolist()):
        mask = kinds == kind
        print(f"  {kind}: mean log p {log_probs[mask].mean():.2f}, answered {int(answered[mask].sum())} of {int(mask.sum())}")


if __name__ == "__main__":
    main()
