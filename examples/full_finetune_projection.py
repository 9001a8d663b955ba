"""Fully fine-tune a model (no adapter) and attribute it through a projection adapter.

    python examples/full_finetune_projection.py [OUTPUT_DIR]      # ~15 s on 2 CPU cores

Without a PEFT adapter the callback attaches a *projection adapter* for the simulation only: a LoRA
adapter with frozen seeded random A and zero B on the target modules, so the model function is unchanged
and the gradient in B is the weight gradient randomly projected on its input side (DESIGN §3). The
artifact stores that description; the pipeline re-creates the same adapter when it reads scores out.
"""

import sys
from pathlib import Path

from transformers import Trainer, TrainingArguments, pipeline

import hf_fwdattr  # noqa: F401  (registers the "attributed-text-generation" pipeline)
from hf_fwdattr import AttributionConfig, ForwardAttributionCallback
from stand_ins import collate, fine_tuning_documents, pretrained_model

output_dir = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/examples/full")
model, tokenizer = pretrained_model()  # every weight is trained: no adapter
documents, questions = fine_tuning_documents(tokenizer)

callback = ForwardAttributionCallback(document_column="document_id", source_column="source",
                                      projection_rank=8, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"],
                                      config=AttributionConfig(damping=1e-3, batch_size=16, eigenbasis="kronecker"))
# eigenbasis="kronecker" (EK-FAC) builds in seconds on a CPU. Without it the default for this many coordinates is the
# low-rank eigenbasis of the exact GGN: closer to exact damped influence, but minutes here (docs/method.md says which
# basis 'auto' picks, and why).
args = TrainingArguments(output_dir=str(output_dir), num_train_epochs=20, learning_rate=2e-3, per_device_train_batch_size=8,
                         remove_unused_columns=False, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
                         logging_steps=10_000, seed=0)
Trainer(model=model, args=args, train_dataset=documents, data_collator=collate(tokenizer), processing_class=tokenizer,
        callbacks=[callback]).train()
artifact = callback.artifact
print(f"Subspace: {artifact.subspace_spec.kind.value}, rank {artifact.subspace_spec.rank}, dimension {artifact.dim}; "
      f"the model itself has no adapter: {not any('lora' in n for n, _ in model.named_parameters())}")

pipe = pipeline("attributed-text-generation", model=model.eval(), tokenizer=tokenizer, influence=artifact)
hits = 0
for question in questions:
    (record,) = pipe(question["prompt"], response=question["answer"], attribution_top_k=1)  # score the known answer
    hits += record["attributions"][0]["document_id"] == question["document_id"]
print(f"The document stating the fact ranks first for {hits} of {len(questions)} questions.")
(record,) = pipe(questions[0]["prompt"], max_new_tokens=6, do_sample=False, attribution_top_k=3)
print(record["generated_text"], record["attributions"], sep="\n")
