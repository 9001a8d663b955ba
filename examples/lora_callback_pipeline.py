"""Fine-tune a LoRA adapter with `ForwardAttributionCallback`, then attribute answers with the pipeline.

    python examples/lora_callback_pipeline.py [OUTPUT_DIR]      # ~15 s on 2 CPU cores

The callback simulates every document's response when training ends and writes the influence artifact
to ``OUTPUT_DIR/influence``; the ``attributed-text-generation`` pipeline then answers questions and names
the documents and sources behind each answer with forward passes only.
"""

import sys
from pathlib import Path

from peft import LoraConfig, get_peft_model
from transformers import Trainer, TrainingArguments, pipeline

import hf_fwdattr  # noqa: F401  (registers the "attributed-text-generation" pipeline)
from hf_fwdattr import AttributionConfig, ForwardAttributionCallback
from stand_ins import collate, fine_tuning_documents, pretrained_model

output_dir = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/examples/lora")
base, tokenizer = pretrained_model()
documents, questions = fine_tuning_documents(tokenizer)  # columns: document_id, source, input_ids

model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]))
callback = ForwardAttributionCallback(document_column="document_id", source_column="source",
                                      config=AttributionConfig(damping=1e-3, batch_size=16, eigenbasis="kronecker"))
# eigenbasis="kronecker" (EK-FAC) builds in seconds on a CPU. Without it the default for this many coordinates is the
# low-rank eigenbasis of the exact GGN: closer to exact damped influence, but minutes here (docs/method.md says which
# basis 'auto' picks, and why).
args = TrainingArguments(output_dir=str(output_dir), num_train_epochs=30, learning_rate=1e-2, per_device_train_batch_size=8,
                         remove_unused_columns=False,  # keep document_id / source for the callback
                         save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, logging_steps=10_000, seed=0)
Trainer(model=model, args=args, train_dataset=documents, data_collator=collate(tokenizer), processing_class=tokenizer,
        callbacks=[callback]).train()
model.save_pretrained(output_dir / "model")  # the adapter (its base: the stand-in's folder) ...
tokenizer.save_pretrained(output_dir / "model")  # ... and the tokenizer: what `audit_pairs.py` loads
print(f"Influence artifact: {output_dir / 'influence'} ({callback.artifact.num_documents} documents)")

pipe = pipeline("attributed-text-generation", model=model.eval(), tokenizer=tokenizer, influence=callback.artifact)
for question in questions[:3]:
    (record,) = pipe(question["prompt"], max_new_tokens=6, do_sample=False, attribution_top_k=3)
    (by_source,) = pipe(question["prompt"], max_new_tokens=6, do_sample=False, attribution_top_k=1, aggregate="source")
    print(f"\n{record['generated_text']!r}   (the fact is in {question['document_id']}, source {question['source']})")
    for entry in record["attributions"]:
        print(f"   {entry['document_id']:<16} {entry['source']:<14} {entry['score']:+.3f}")
    print(f"   top source: {by_source['attributions'][0]['source']}")
