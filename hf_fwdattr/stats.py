"""Row-wise rank and linear correlations: the one implementation the library, its evaluation and its benchmarks use.

Ties get the average of the ranks they span (as `scipy.stats.rankdata`), and a row whose values are constant
has no defined correlation: NaN, which callers leave out of their means (`torch.nanmean`).
"""

from __future__ import annotations

import torch


def average_ranks(values: torch.Tensor) -> torch.Tensor:
    """Ranks (0-based, float64) along the last dimension; tied values share the average of their ranks."""
    values = torch.as_tensor(values).to(torch.float64)
    n = values.shape[-1]
    ordered, order = values.sort(dim=-1, stable=True)
    positions = torch.arange(n, dtype=torch.float64).expand_as(ordered)
    starts_group = torch.ones_like(ordered, dtype=torch.bool)
    starts_group[..., 1:] = ordered[..., 1:] != ordered[..., :-1]
    ends_group = torch.ones_like(ordered, dtype=torch.bool)
    ends_group[..., :-1] = starts_group[..., 1:]
    first = torch.where(starts_group, positions, torch.zeros_like(positions)).cummax(dim=-1).values
    last = torch.where(ends_group, positions, torch.full_like(positions, n)).flip(-1).cummin(dim=-1).values.flip(-1)
    return torch.empty_like(ordered).scatter_(-1, order, (first + last) / 2)


def pearson_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of each row of `a` with the same row of `b` ([R, n] each → [R], float64); NaN for a
    row that is constant (to 1e-12 of its scale) in either argument."""
    a, b = torch.as_tensor(a).to(torch.float64), torch.as_tensor(b).to(torch.float64)
    if a.shape != b.shape or a.dim() != 2:
        raise ValueError(f"Expected two [rows, n] matrices of one shape, got {tuple(a.shape)} and {tuple(b.shape)}.")
    a, b = a - a.mean(dim=1, keepdim=True), b - b.mean(dim=1, keepdim=True)
    norms = (a.square().sum(dim=1) * b.square().sum(dim=1)).sqrt()
    scale = a.abs().amax(dim=1).clamp_min(1e-300) * b.abs().amax(dim=1).clamp_min(1e-300) * a.shape[1]
    correlation = ((a * b).sum(dim=1) / norms).clamp(-1.0, 1.0)
    return torch.where(norms <= 1e-12 * scale, torch.full_like(correlation, float("nan")), correlation)


def spearman_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation (ties averaged) of each row of `a` with the same row of `b`; NaN for constant rows."""
    return pearson_rows(average_ranks(a), average_ranks(b))
