"""Figures of a fact-tracing evaluation, saved as PNG (matplotlib, no display needed).

- `plot_recall_mrr`: recall@1, recall@10 and MRR of every method, one panel per query kind;
- `plot_score_distributions`: per method, the true document's score against all other documents'
  scores, each query's scores standardised (z-scores), so methods on different scales compare;
- `plot_token_attribution`: one answer, token by token, against its top documents.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Sequence, Union

import numpy as np
import torch

from .fact_metrics import METHOD_LABELS, FactTracingResult


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def plot_recall_mrr(result: FactTracingResult, path: Union[str, Path]) -> Path:
    """Grouped bars of recall@1, recall@10 and MRR by method, one panel per query kind (and all queries)."""
    plt = _pyplot()
    methods = list(result.metrics)
    kinds = [k for k in next(iter(result.metrics.values())) if k != "all"] + ["all"]
    measures = ["recall@1", "recall@10", "mrr", "source_accuracy"]
    measures = [m for m in measures if m in result.metrics[methods[0]]["all"]]
    fig, axes = plt.subplots(1, len(kinds), figsize=(4.2 * len(kinds), 3.6), sharey=True, squeeze=False)
    width = 0.8 / len(methods)
    for ax, kind in zip(axes[0], kinds):
        for i, method in enumerate(methods):
            values = [result.metrics[method][kind][m] for m in measures]
            ax.bar(np.arange(len(measures)) + (i - (len(methods) - 1) / 2) * width, values, width, label=METHOD_LABELS.get(method, method))
        ax.set_xticks(np.arange(len(measures)), [m.replace("_", " ") for m in measures])
        ax.set_title(f"{kind} queries (n = {result.metrics[methods[0]][kind]['n_queries']})")
        ax.set_ylim(0, 1.05)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("fraction / mean reciprocal rank")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(methods), fontsize=9)
    fig.suptitle("Fact tracing: is the document that states the fact ranked first?")
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    return _save(fig, path)


def plot_score_distributions(result: FactTracingResult, path: Union[str, Path]) -> Path:
    """Histograms of standardised scores: the true document's against the other documents', per method and kind."""
    plt = _pyplot()
    methods = list(result.scores)
    kinds = list(dict.fromkeys(result.kinds))
    fig, axes = plt.subplots(len(kinds), len(methods), figsize=(3.0 * len(methods), 2.4 * len(kinds)), squeeze=False)
    for row, kind in enumerate(kinds):
        rows = np.array([k == kind for k in result.kinds])
        for col, method in enumerate(methods):
            scores = result.scores[method].numpy()[rows]
            z = (scores - scores.mean(1, keepdims=True)) / np.maximum(scores.std(1, keepdims=True), 1e-12)
            true = np.zeros_like(z, dtype=bool)
            true[np.arange(len(z)), result.true_index[rows]] = True
            bins = np.linspace(min(z.min(), -3), max(z.max(), 3), 40)
            ax = axes[row][col]
            ax.hist(z[~true], bins=bins, density=True, alpha=0.6, label="other documents")
            ax.hist(z[true], bins=bins, density=True, alpha=0.6, label="true document")
            ax.set_yticks([])
            if row == 0:
                ax.set_title(METHOD_LABELS.get(method, method), fontsize=9)
            if col == 0:
                ax.set_ylabel(f"{kind}")
            if row == len(kinds) - 1:
                ax.set_xlabel("score (z within query)")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle("Score distributions: true document vs the rest")
    fig.tight_layout()
    return _save(fig, path)


def plot_token_attribution(tokens: Sequence[str], scores: torch.Tensor, document_ids: Sequence[str], title: str,
                           path: Union[str, Path], top: int = 8, highlight: str = None) -> Path:
    """Heat map of one answer's per-token scores [n_tokens, n_documents] for the documents with the largest total."""
    plt = _pyplot()
    scores = scores.double()
    order = torch.argsort(scores.sum(0), descending=True)[:top].tolist()
    matrix = scores[:, order].numpy().T
    limit = max(np.abs(matrix).max(), 1e-12)
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(tokens), 0.9 + 0.38 * len(order)))
    image = ax.imshow(matrix, cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto")
    ax.set_xticks(range(len(tokens)), [repr(t)[1:-1] for t in tokens])
    labels = [document_ids[i] + ("  ← true" if document_ids[i] == highlight else "") for i in order]
    ax.set_yticks(range(len(order)), labels, fontsize=8)
    ax.set_xlabel("answer token")
    fig.colorbar(image, ax=ax, label="score (positive = proponent)")
    ax.set_title("\n".join(textwrap.wrap(title, 60)), fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def _save(fig, path: Union[str, Path]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)
    return path
