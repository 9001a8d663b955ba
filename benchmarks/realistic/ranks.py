"""How compressed-vs-exact fidelity grows with the rank k, for fact questions and for training documents as queries.

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.realistic.ranks --preset mid [--sample 512] [--heldout 256]

The build picks k as the smallest rank whose Spearman on its validation documents reaches the target, with training
documents as queries; fact questions (log p(answer | prompt)) need more. This re-simulates the exact responses of
`--sample` documents of the build's sample and of `--heldout` held-out documents (the artifact's closed form, step
size and objective, on the fine-tuned model), fixes a basis from the sample as the build does (`gram_basis`), and
scores the held-out documents through its first r directions against their exact scores. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="mid")
    parser.add_argument("--sample", type=int, default=512)
    parser.add_argument("--heldout", type=int, default=256)
    args = parser.parse_args()

    from hf_fwdattr import ArtifactScorer, DocumentSet, query_gradients, simulate_responses
    from hf_fwdattr.estimator.eigenbasis import estimate_eigenbasis
    from hf_fwdattr.query.compress import gram_basis
    from hf_fwdattr.stats import spearman_rows
    from hf_fwdattr.storage.shards import InMemoryResponses

    from . import setting

    start = time.perf_counter()
    preset = setting.PRESETS[args.preset]
    made = setting.heldout_setting(preset, args.heldout)
    model, tok, artifact, task, rows = made["model"], made["tokenizer"], made["artifact"], made["task"], made["rows"]
    examples, plan, heldout = made["examples"], made["plan"], made["heldout"]
    sample = plan["sample"][: args.sample]
    train_queries = [examples[i] for i in torch.randperm(len(rows), generator=torch.Generator().manual_seed(12))[:32].tolist()]
    subspace = ArtifactScorer(artifact, model, task).subspace
    gradients = {"fact": query_gradients(subspace, task, setting.fact_queries(preset, tok)), "training": query_gradients(subspace, task, train_queries)}
    eigenbasis = estimate_eigenbasis(subspace, task, examples, artifact.config)

    def simulate(indices: list[int]) -> torch.Tensor:
        picked = DocumentSet.from_examples([examples[i] for i in indices], [rows[i]["document_id"] for i in indices])
        parts = [simulate_responses(subspace, task, picked, examples, artifact.config, document_indices=range(lo, min(lo + 128, len(indices))),
                                    step_size=artifact.step_size, eigenbasis=eigenbasis).responses for lo in range(0, len(indices), 128)]
        return torch.cat(parts)

    directions, _ = gram_basis(InMemoryResponses(simulate(sample)), max_rank=args.sample)
    responses = simulate(heldout)
    result = {"preset": preset.name, "sample_documents": len(sample), "heldout_documents": len(heldout), "basis_rank": directions.shape[0],
              "artifact_rank": artifact.store.rank if artifact.compressed else None, "threads": torch.get_num_threads()}
    ranks = sorted({r for r in (8, 16, 32, 64, 128, 256, 512) if r <= directions.shape[0]} | ({artifact.store.rank} if artifact.compressed else set()))
    for name, g in gradients.items():
        exact = (g @ responses.T).double()
        result[f"{name}_spearman_by_rank"] = {}
        for r in ranks:
            basis = directions[:r]
            approximate = ((g @ basis.T) @ (responses @ basis.T).T).double()
            result[f"{name}_spearman_by_rank"][r] = float(spearman_rows(exact, approximate).nanmean())
    result["seconds"] = time.perf_counter() - start
    print(json.dumps(result))


if __name__ == "__main__":
    main()
