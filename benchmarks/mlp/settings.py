"""The MLP benchmark settings: data, splits, architecture, training recipe and ground-truth sizes."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from .ensemble import MLPSpec, TrainingRecipe


@dataclass(frozen=True)
class Setting:
    """One benchmark setting. Every split and subset is drawn from `seed`; nothing else is random."""

    name: str
    dataset: str
    n_train: int
    n_validation_queries: int
    n_test_queries: int
    hidden: int
    recipe: TrainingRecipe = field(default_factory=TrainingRecipe)
    activation: str = "tanh"
    n_subsets: int = 100
    subset_fraction: float = 0.5
    subset_seeds: int = 3
    n_loo: int = 50
    loo_seeds: int = 8
    n_checkpoints: int = 10
    seed: int = 0

    def to_dict(self) -> dict:
        data = asdict(self)
        data["recipe"] = self.recipe.to_dict()
        return data


SETTINGS = {
    "digits": Setting("digits", "digits", n_train=500, n_validation_queries=100, n_test_queries=200, hidden=16),
    "breast_cancer": Setting("breast_cancer", "breast_cancer", n_train=300, n_validation_queries=100, n_test_queries=169, hidden=16),
}


@dataclass
class Data:
    """Standardised float64 inputs and integer labels of the training set and the two query sets."""

    spec: MLPSpec
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_validation: torch.Tensor
    y_validation: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    @property
    def x_queries(self) -> torch.Tensor:
        """Validation then test queries (the ground truth is measured on both)."""
        return torch.cat([self.x_validation, self.x_test])

    @property
    def y_queries(self) -> torch.Tensor:
        return torch.cat([self.y_validation, self.y_test])


def load(setting: Setting) -> Data:
    """Load the dataset shipped with scikit-learn, split it with `setting.seed`, standardise on the training split."""
    from sklearn import datasets

    bunch = {"digits": datasets.load_digits, "breast_cancer": datasets.load_breast_cancer}[setting.dataset]()
    x, y = np.asarray(bunch.data, dtype=np.float64), np.asarray(bunch.target, dtype=np.int64)
    order = np.random.default_rng(setting.seed).permutation(len(x))
    n, v, t = setting.n_train, setting.n_validation_queries, setting.n_test_queries
    if n + v + t > len(x):
        raise ValueError(f"{setting.name}: {n} + {v} + {t} examples asked for, the dataset has {len(x)}.")
    train, validation, test = order[:n], order[n : n + v], order[n + v : n + v + t]
    mean, std = x[train].mean(0), x[train].std(0)
    std[std == 0] = 1.0
    x = (x - mean) / std
    as_x = lambda idx: torch.tensor(x[idx], dtype=torch.float64)  # noqa: E731
    as_y = lambda idx: torch.tensor(y[idx], dtype=torch.long)  # noqa: E731
    spec = MLPSpec(x.shape[1], setting.hidden, int(y.max()) + 1, setting.activation)
    return Data(spec, as_x(train), as_y(train), as_x(validation), as_y(validation), as_x(test), as_y(test))
