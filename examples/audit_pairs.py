"""Audit existing (prompt, answer) pairs: which documents and sources made each answer likely?

    python examples/audit_pairs.py [MODEL_DIR INFLUENCE_DIR]

By default it audits what `lora_callback_pipeline.py` leaves in runs/examples/lora (run that first): the
model saved with `save_pretrained` and its influence artifact. Nothing is generated: each given answer is
scored as it stands, with forward passes only — per document, per source, and token by token.
"""

import sys

from transformers import pipeline

import hf_fwdattr  # noqa: F401  (registers the "attributed-text-generation" pipeline)
from hf_fwdattr.demo.toy import fact_corpus
from stand_ins import CORPUS

model_dir, influence_dir = sys.argv[1:3] if len(sys.argv) == 3 else ("runs/examples/lora/model", "runs/examples/lora/influence")
pipe = pipeline("attributed-text-generation", model=model_dir, influence=influence_dir)
questions = fact_corpus(**CORPUS)["questions"]

# The pairs to audit: a right answer, the same answer to a paraphrased question, and a wrong answer.
pairs = [(questions[0]["prompt"], questions[0]["answer"]),
         (questions[0]["paraphrase"], questions[0]["answer"]),
         (questions[1]["prompt"], questions[2]["answer"])]
for prompt, answer in pairs:
    (documents,) = pipe(prompt, response=answer, attribution_top_k=3, per_token=True)
    (sources,) = pipe(prompt, response=answer, attribution_top_k=2, aggregate="source")
    print(f"\n{prompt!r} -> {answer!r}")
    print("   documents: " + ", ".join(f"{a['document_id']} ({a['source']}, {a['score']:+.2f})" for a in documents["attributions"]))
    print("   sources:   " + ", ".join(f"{a['source']} ({a['score']:+.2f}, {a['n_documents']} documents)" for a in sources["attributions"]))
    for token in documents["token_attributions"]:
        best = token["attributions"][0]
        print(f"   token {token['token']!r:>10}: {best['document_id']} ({best['score']:+.2f})")
