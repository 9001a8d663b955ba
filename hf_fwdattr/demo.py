"""Runnable demonstrations behind `hf-fwdattr demo`."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from .config import AttributionConfig
from .documents import DocumentSet
from .readout import ForwardReadout
from .simulate import simulate_responses
from .subspace import AttributionSubspace
from .task import ClassificationTask

logger = logging.getLogger(__name__)


def _clusters(n_per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[2.0, 0.0], [-1.0, 1.7], [-1.0, -1.7]])
    inputs = torch.cat([c + 0.9 * torch.randn(n_per_class, 2, generator=generator) for c in centres])
    labels = torch.arange(3).repeat_interleave(n_per_class)
    return inputs, labels


def classifier_demo(output_dir: str | Path | None = None, seed: int = 0, top_k: int = 3) -> dict:
    """Train a small MLP on three noisy clusters, simulate every training point's response, and
    print the top proponents and opponents of a few test queries. Returns the score matrix and data."""
    torch.manual_seed(seed)
    train_x, train_y = _clusters(40, seed)
    test_x, test_y = _clusters(1, seed + 1)
    model = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 3))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.03, weight_decay=1e-3)
    for _ in range(300):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(train_x), train_y).backward()
        optimizer.step()
    model.eval()
    accuracy = (model(train_x).argmax(1) == train_y).float().mean().item()
    print(f"Trained a 2-16-3 MLP on {len(train_y)} points (train accuracy {accuracy:.2f}).")

    task = ClassificationTask()
    train = [(train_x[i], train_y[i]) for i in range(len(train_y))]
    queries = [(test_x[i], test_y[i]) for i in range(len(test_y))]
    documents = DocumentSet.from_examples(train, document_ids=[f"train-{i}" for i in range(len(train))])
    subspace = AttributionSubspace.build(model, "trainable")
    config = AttributionConfig(damping=1e-2, horizon=50, batch_size=32)
    result = simulate_responses(subspace, task, documents, train, config, progress=True)
    scores = ForwardReadout.from_config(subspace, task, config).scores(queries, result.responses)
    print(f"Simulated {len(documents)} responses (K={config.horizon}, η={result.step_size:.3g}) in {result.seconds:.1f}s; "
          f"readout mode {config.readout.value}, forward passes only.\n")
    for q, (x, y) in enumerate(queries):
        order = torch.argsort(scores[q], descending=True)
        print(f"Query {q}: x=({x[0]:+.2f}, {x[1]:+.2f}) label {int(y)}")
        for title, rows in (("proponents", order[:top_k]), ("opponents", order.flip(0)[:top_k])):
            listed = ", ".join(f"{documents.document_ids[r]} (label {int(train_y[r])}, {scores[q, r]:+.3g})" for r in rows.tolist())
            print(f"  top {title}: {listed}")
    if output_dir is not None:
        from safetensors.torch import save_file

        path = Path(output_dir)
        path.mkdir(parents=True, exist_ok=True)
        save_file({"scores": scores.contiguous(), "responses": result.responses.contiguous()}, str(path / "classifier_scores.safetensors"), metadata={"format": "pt"})
        print(f"\nScores and responses written to {path / 'classifier_scores.safetensors'}.")
    return {"scores": scores, "train_labels": train_y, "query_labels": test_y}
