"""Write the demo corpus (`toy.fact_corpus()` defaults) as the two files `hf-fwdattr evaluate` reads.

    .venv/bin/python -m benchmarks.lm.demo_files runs/demo/data

Then evaluate the model `hf-fwdattr demo --output-dir runs/demo` leaves, as a user's own model and files:

    hf-fwdattr evaluate --output-dir runs/demo/evaluate --model runs/demo/model --influence runs/demo/influence \\
        --documents runs/demo/data/documents.jsonl --queries runs/demo/data/queries.jsonl
"""

import sys

from hf_fwdattr.demo.toy import fact_corpus
from hf_fwdattr.evaluation.fact_data import FactTracingSet

if __name__ == "__main__":
    documents, queries = FactTracingSet.from_corpus(fact_corpus()).save(sys.argv[1] if len(sys.argv) > 1 else "runs/demo/data")
    print(f"{documents}\n{queries}")
