"""Training time: the estimator of each document's parameter response.

The data flow reads top to bottom: `config` (settings) → `task` (what loss and query measurement mean for a
model) → `documents` (what scores are given to) → `subspace` (where responses live) → `functional` (the task
at θ* + δ) → `gradients` (per-document g_b) → `curvature` and `eigenbasis` (H, h_max, eigenbases) →
`simulate` (the solvers that turn g_b into u_b).
"""
