"""The one abstraction a user extends: what the model's loss and query measurement are.

A task turns (model, batch) into per-example numbers. Everything else in the library — gradients,
curvature products, simulation, readout — only calls these methods, so any `torch.nn.Module` works
once a task describes it.
"""

from __future__ import annotations

import inspect
from typing import Any, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import default_collate

from ..errors import EmptyDocumentsError, TaskError

IGNORE_INDEX = -100


class AttributionTask:
    """Per-example training loss and per-example query measurement of a model.

    Subclass it and implement `train_loss` (or `outputs` plus `loss_from_outputs`, which also
    enables Gauss–Newton curvature) and `measurement`. Every method gets a *batch* made by
    `collate` from a list of examples and returns one value per example: the loss of example i
    may depend on example i only.

    Sign convention: `measurement` is something the model should make *larger* (a log-likelihood),
    so a positive score means a training document makes the query output more likely.
    """

    def train_loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """Per-example training loss, shape [batch_size]. The simulated training objective is its mean."""
        if type(self).outputs is AttributionTask.outputs:
            raise NotImplementedError(
                f"{type(self).__name__} must implement `train_loss`, or `outputs` and `loss_from_outputs`."
            )
        return self.loss_from_outputs(self.outputs(model, batch), batch)

    def measurement(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """Per-example query measurement f_q (e.g. a log-likelihood), shape [batch_size]."""
        raise NotImplementedError(f"{type(self).__name__} must implement `measurement`.")

    def token_measurement(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """Per-output parts of the query measurement, shape [batch_size, n_outputs], that sum to f_q.

        Optional: the readout's per-token scores (`ForwardReadout.token_scores`) read every part's directional
        derivative from the same forward passes that give the whole's. For a causal LM, part t is the
        log-likelihood of token t.
        """
        raise NotImplementedError(
            f"{type(self).__name__} must implement `token_measurement` for per-token scores "
            "(the per-output parts of `measurement`, shape [batch_size, n_outputs])."
        )

    def outputs(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """Model outputs z (e.g. logits) whose loss `loss_from_outputs` gives; needed for curvature='ggn'."""
        raise NotImplementedError(
            f"{type(self).__name__} must implement `outputs` and `loss_from_outputs` for curvature='ggn' "
            "(the Gauss–Newton product needs the loss as a function of the model outputs); "
            "implement them or use curvature='hessian'."
        )

    def loss_from_outputs(self, outputs: torch.Tensor, batch: Any) -> torch.Tensor:
        """Per-example loss as a function of the outputs of `outputs`, shape [batch_size]."""
        raise NotImplementedError(f"{type(self).__name__} must implement `loss_from_outputs` for curvature='ggn'.")

    def sampled_loss_from_outputs(self, outputs: torch.Tensor, batch: Any, generator: torch.Generator) -> torch.Tensor:
        """Per-example loss with targets drawn from the model's own predictive distribution.

        Its gradient's covariance is the Gauss–Newton matrix, which is how the Kronecker-factored
        eigenbasis (EK-FAC) estimates it. Needed only by solver='closed_form' with eigenbasis='kronecker'.
        """
        raise NotImplementedError(
            f"{type(self).__name__} must implement `sampled_loss_from_outputs` for the Kronecker eigenbasis; "
            "implement it or use eigenbasis='explicit' (small subspaces) or another solver."
        )

    def output_curvature(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """The outputs y the loss is a function of, and a factorisation of the loss's curvature in them.

        Returns ``(y, factors)``: y of shape [B, positions, D], in the autograd graph of the model's parameters, and
        factors [B, positions, K, D] such that for every example i and position t, Σ_k f f ᵀ (f = factors[i, t, k])
        is ∇²_{y_it} ℓ_i, the Hessian of example i's loss in its outputs at t (the loss must not couple positions).
        The exact Gauss–Newton matrix is built from these (`estimator.ggn`): one backward pass per (position,
        factor) slot. The default treats `outputs` as one position and factors the exact Hessian of
        `loss_from_outputs` in them (one double-backward per output coordinate, so for small outputs only).
        """
        outputs = self.outputs(model, batch)
        flat = outputs.reshape(len(outputs), -1)
        if flat.shape[1] > 1024:
            raise NotImplementedError(
                f"{type(self).__name__}.output_curvature: the default factors the Hessian of a {flat.shape[1]}-dimensional output "
                "coordinate by coordinate, which is for small outputs only; implement `output_curvature` for this task."
            )
        hessian = _output_hessian(lambda z: self.loss_from_outputs(z.reshape(outputs.shape), batch), flat.detach())
        return flat[:, None, :], _psd_factors(hessian)[:, None]

    def sketched_output_curvature(self, model: nn.Module, batch: Any, samples: int, generator: torch.Generator) -> tuple[torch.Tensor, Iterator[torch.Tensor]]:
        """The outputs y (as in `output_curvature`) and `samples` random cotangents c_s ([B, positions, D] each) with
        E[Σ_s c_s c_sᵀ] = ∇²_y ℓ per example and position: S backward passes then estimate the GGN without bias,
        however many factors the exact curvature has. The default draws ±1 combinations of `output_curvature`'s
        factors (independent per position), divided by √S.
        """
        outputs, factors = self.output_curvature(model, batch)
        factors = factors.detach()

        def draws() -> Iterator[torch.Tensor]:
            for _ in range(samples):
                signs = _rademacher(factors.shape[:3], generator).to(factors.device, factors.dtype)
                yield torch.einsum("bpk,bpkd->bpd", signs, factors) / samples**0.5

        return outputs, draws()

    @property
    def supports_output_curvature(self) -> bool:
        """Whether `output_curvature` can run (it needs `outputs` and `loss_from_outputs`)."""
        return self.supports_ggn

    def position_mask(self, batch: Any) -> Optional[torch.Tensor]:
        """[B, positions] bool: which positions of a batch are real (not padding), for curvature statistics that
        average over positions (the Kronecker factors); None when examples have no positions (default)."""
        return None

    def example_length(self, example: Any) -> Optional[int]:
        """The length an example is padded to within a batch, or None (default: examples of one size).

        When given, per-example work (document gradients, curvature rows) batches examples of similar length together:
        the same numbers, with less padding computed."""
        return None

    def output_curvature_slots(self, model: nn.Module, batch: Any) -> Optional[int]:
        """The number of (position, factor) slots `output_curvature` gives this batch some factor in — one backward
        pass each in the exact GGN — if the task can count them without computing the factors (default: None)."""
        return None

    def collate(self, examples: Sequence[Any]) -> Any:
        """Turn a list of examples into a batch (default: `torch.utils.data.default_collate`)."""
        return default_collate(list(examples))

    def validate_example(self, example: Any) -> None:
        """Raise `EmptyDocumentsError` if `example` cannot contribute a loss (default: accept)."""

    @property
    def supports_ggn(self) -> bool:
        """Whether `outputs` and `loss_from_outputs` are implemented."""
        return type(self).outputs is not AttributionTask.outputs


def _output_hessian(loss_of, outputs: torch.Tensor) -> torch.Tensor:
    """[B, O, O]: the Hessian of each example's loss in its own outputs ([B, O], losses per example do not mix)."""
    z = outputs.detach().requires_grad_(True)
    with torch.enable_grad():
        (gradient,) = torch.autograd.grad(loss_of(z).sum(), z, create_graph=True)
        columns = [torch.autograd.grad(gradient[:, o].sum(), z, retain_graph=True)[0] for o in range(z.shape[1])]
    return torch.stack(columns, dim=1).detach()


def _psd_factors(matrices: torch.Tensor, relative_floor: float = 1e-10) -> torch.Tensor:
    """[..., K, D] rows f_k with Σ_k f_k f_kᵀ = the positive part of the symmetric [..., D, D] `matrices`; largest first,
    rows of eigenvalues below `relative_floor` × the largest set to zero (round-off), negative curvature dropped."""
    values, vectors = torch.linalg.eigh(((matrices + matrices.transpose(-1, -2)) / 2).double())
    values, vectors = values.flip(-1), vectors.flip(-1)
    floor = relative_floor * values[..., :1].clamp_min(0)
    scale = torch.where(values > floor, values, torch.zeros_like(values)).sqrt()
    return (vectors * scale[..., None, :]).transpose(-1, -2).to(matrices.dtype)


def _rademacher(shape: Sequence[int], generator: Optional[torch.Generator], dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """±1 entries in `dtype`, drawn on the CPU from `generator` (reproducible whatever the device)."""
    return torch.randint(0, 2, tuple(shape), generator=generator, dtype=torch.int8).to(dtype) * 2 - 1


def _to_tensor(values: Any) -> torch.Tensor:
    return values.detach().clone().long() if isinstance(values, torch.Tensor) else torch.as_tensor(values, dtype=torch.long)


def _batch_to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _forward_options(model: nn.Module) -> frozenset:
    """Keyword arguments the model's own forward names (through PEFT wrappers), cached per class."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    cls = type(inner)
    if cls not in _FORWARD_OPTIONS:
        try:
            _FORWARD_OPTIONS[cls] = frozenset(inspect.signature(inner.forward).parameters)
        except (TypeError, ValueError):
            _FORWARD_OPTIONS[cls] = frozenset()
    return _FORWARD_OPTIONS[cls]


_FORWARD_OPTIONS: dict[type, frozenset] = {}


def _model_device(model: nn.Module) -> torch.device:
    for param in model.parameters():
        return param.device
    return torch.device("cpu")


LOSS_REDUCTIONS = ("sum", "token_mean", "mean")


class CausalLMTask(AttributionTask):
    """Causal language modelling: loss = token NLL of each example (reduced as training reduced it), measurement =
    summed log-likelihood of the scored tokens.

    An example is a dict with ``input_ids`` and optionally ``labels`` (−100 marks tokens that are
    not scored, e.g. a query's prompt) and ``attention_mask``. Without ``labels`` every token after
    the first is scored. Batches are right-padded with `pad_token_id`; padding is never scored.

    The simulated objective is the mean of the per-example losses, so the reduction fixes how examples weigh and the
    units of the damping λ (it is added to this objective's curvature):

    - ``"sum"``: the summed token NLL of the example (a document's loss is the sum over its tokens and chunks);
    - ``"token_mean"``: the summed NLL divided by `tokens_per_example`, the mean number of scored tokens per training
      example — every token weighs the same and the objective is the corpus's token mean, which is what
      `transformers.Trainer` minimises for a causal LM (the batch's NLL sum over its scored tokens); the callback
      uses this with the training set's own count;
    - ``"mean"``: the example's mean token NLL (each example weighs the same, as some fine-tuning recipes do).

    The measurement f_q is always the summed log-likelihood, whatever the reduction.

    Args:
        pad_token_id: id used to pad batches (any id works: padded positions are masked).
        reduction: ``"sum"`` (default), ``"token_mean"`` or ``"mean"``.
        tokens_per_example: for ``"token_mean"``: the mean number of scored tokens per training example.
    """

    def __init__(self, pad_token_id: int = 0, reduction: str = "sum", tokens_per_example: Optional[float] = None):
        self.pad_token_id = int(pad_token_id)
        if reduction not in LOSS_REDUCTIONS:
            raise TaskError(f"`reduction` must be one of {LOSS_REDUCTIONS}, got {reduction!r}.")
        if reduction == "token_mean" and not (isinstance(tokens_per_example, (int, float)) and tokens_per_example > 0):
            raise TaskError("reduction='token_mean' needs `tokens_per_example` > 0: the mean number of scored tokens per "
                            f"training example (got {tokens_per_example!r}); `CausalLMTask.tokens_per_example_of(examples)` counts it.")
        self.reduction = reduction
        self.tokens_per_example = None if tokens_per_example is None else float(tokens_per_example)

    @staticmethod
    def tokens_per_example_of(examples: Sequence[dict]) -> float:
        """The mean number of scored tokens (labelled, after the first position) per example."""
        counts = []
        for example in examples:
            ids = _to_tensor(example["input_ids"]).reshape(-1)
            labels = _to_tensor(example["labels"]).reshape(-1) if example.get("labels") is not None else ids
            counts.append(int((labels[1:] != IGNORE_INDEX).sum()))
        if not counts or sum(counts) == 0:
            raise EmptyDocumentsError("No scored token in the training examples: there is no loss to reduce.")
        return sum(counts) / len(counts)

    def describe(self) -> dict:
        """The objective as JSON (recorded with an artifact)."""
        return {"task": type(self).__name__, "reduction": self.reduction, "tokens_per_example": self.tokens_per_example}

    def _example_weights(self, scored: torch.Tensor) -> torch.Tensor:
        """[B] weight of each example's summed NLL under the reduction (`scored`: [B, T] mask of scored tokens)."""
        if self.reduction == "sum":
            return torch.ones(scored.shape[0], dtype=torch.float64, device=scored.device)
        if self.reduction == "token_mean":
            return torch.full((scored.shape[0],), 1.0 / self.tokens_per_example, dtype=torch.float64, device=scored.device)
        return 1.0 / scored.sum(dim=1).clamp_min(1).to(torch.float64)

    def collate(self, examples: Sequence[dict]) -> dict:
        if not examples:
            raise TaskError("Cannot collate an empty list of examples.")
        ids = [_to_tensor(e["input_ids"]).reshape(-1) for e in examples]
        labels = [_to_tensor(e["labels"]).reshape(-1) if e.get("labels") is not None else i.clone() for e, i in zip(examples, ids)]
        masks = [_to_tensor(e["attention_mask"]).reshape(-1) if e.get("attention_mask") is not None else torch.ones_like(i) for e, i in zip(examples, ids)]
        length = max(len(i) for i in ids)
        batch = {
            "input_ids": torch.full((len(ids), length), self.pad_token_id, dtype=torch.long),
            "attention_mask": torch.zeros((len(ids), length), dtype=torch.long),
            "labels": torch.full((len(ids), length), IGNORE_INDEX, dtype=torch.long),
        }
        for row, (i, lab, m) in enumerate(zip(ids, labels, masks)):
            if not (len(i) == len(lab) == len(m)):
                raise TaskError(f"Example {row}: input_ids, labels and attention_mask must have one length each.")
            batch["input_ids"][row, : len(i)] = i
            batch["attention_mask"][row, : len(i)] = m
            batch["labels"][row, : len(i)] = torch.where(m.bool(), lab, torch.full_like(lab, IGNORE_INDEX))
        return batch

    def validate_example(self, example: Any) -> None:
        ids = _to_tensor(example["input_ids"]).reshape(-1)
        labels = _to_tensor(example["labels"]).reshape(-1) if example.get("labels") is not None else ids
        if len(ids) < 2 or not bool((labels[1:] != IGNORE_INDEX).any()):
            raise EmptyDocumentsError(
                f"An example has no token to score (input_ids of length {len(ids)}; a causal LM scores tokens "
                "after the first that are not labelled -100). Drop empty documents before attributing."
            )

    def outputs(self, model: nn.Module, batch: dict) -> torch.Tensor:
        batch = _batch_to(batch, _model_device(model))
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    def loss_from_outputs(self, outputs: torch.Tensor, batch: dict) -> torch.Tensor:
        labels = batch["labels"].to(outputs.device)[:, 1:]
        logits = outputs[:, :-1]
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()  # log-softmax over a vocabulary needs more than half precision
        token_nll = F.cross_entropy(logits.transpose(1, 2), labels.clamp(min=0), reduction="none")
        scored = labels != IGNORE_INDEX
        return (token_nll * scored).sum(dim=1) * self._example_weights(scored).to(token_nll.dtype)

    def measurement(self, model: nn.Module, batch: dict) -> torch.Tensor:
        labels = batch["labels"][:, 1:]
        logits = self.outputs(model, batch)[:, :-1]
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()
        labels = labels.to(logits.device)
        token_nll = F.cross_entropy(logits.transpose(1, 2), labels.clamp(min=0), reduction="none")
        return -(token_nll * (labels != IGNORE_INDEX)).sum(dim=1)

    def token_measurement(self, model: nn.Module, batch: dict) -> torch.Tensor:
        """Per-token log-likelihoods, shape [batch_size, sequence_length]: entry (i, t) is log p(token t | tokens < t)
        of example i where token t is scored (labelled), else 0; a row sums to the example's summed log-likelihood.

        Only the positions that predict a scored token go through the output layer (``logits_to_keep``, when the
        model takes it), and the model keeps no key/value cache.
        """
        batch = _batch_to(batch, _model_device(model))
        labels = batch["labels"]
        length = labels.shape[1]
        scored = labels[:, 1:] != IGNORE_INDEX  # position t predicts token t + 1
        used = scored.any(dim=0).nonzero()
        first = int(used[0]) if len(used) else length - 1  # first position whose prediction is scored
        options = _forward_options(model)
        kwargs = {"use_cache": False} if "use_cache" in options else {}
        if "logits_to_keep" in options:
            kwargs["logits_to_keep"] = length - first
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kwargs).logits
        logits = logits[:, logits.shape[1] - (length - first):][:, :-1]  # positions first .. length − 2
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()  # log-softmax over a vocabulary needs more than half precision
        targets = labels[:, first + 1:]
        picked = logits.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
        picked = torch.where(targets != IGNORE_INDEX, picked, torch.zeros_like(picked))
        return F.pad(picked, (first + 1, 0))

    def output_curvature(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The last hidden states φ_t (the output head's inputs) and factors of Wᵀ(diag p_t − p_t p_tᵀ)W per scored token.

        With logits z_t = W φ_t and the head W outside the attribution subspace, the token's cross-entropy curvature in
        φ_t is Wᵀ(diag p − p pᵀ)W, of rank at most the hidden size: a token costs that many factors, whatever the
        vocabulary. A head inside the subspace, or logits that are not W φ (soft-capping, scaling), are refused —
        the curvature-vector-product path covers them.
        """
        batch = _batch_to(batch, _model_device(model))
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        features, logits = out.hidden_states[-1][:, :-1], out.logits[:, :-1]
        weight = getattr(head, "weight", None)
        if weight is None or weight.requires_grad or getattr(head, "bias", None) is not None:
            raise NotImplementedError("CausalLMTask.output_curvature needs a bias-free linear output head outside the attribution subspace.")
        weight = weight.detach()
        reconstructed = features.detach() @ weight.T.to(features.dtype)
        if not torch.allclose(reconstructed, logits.detach(), rtol=1e-3, atol=1e-3 * float(logits.detach().abs().max())):
            raise NotImplementedError("CausalLMTask.output_curvature: the logits are not the head applied to the last hidden states.")
        probabilities = torch.softmax(logits.detach().double(), dim=-1)
        w = weight.double()
        mean = probabilities @ w  # [B, T, d]
        second = torch.einsum("btv,vd,ve->btde", probabilities, w, w)
        curvature = second - mean[..., :, None] * mean[..., None, :]
        scored = (batch["labels"][:, 1:] != IGNORE_INDEX).to(curvature.device)
        weights = self._example_weights(scored).sqrt()[:, None, None, None]  # the loss of example i is scaled by w_i
        factors = _psd_factors(curvature) * scored[..., None, None] * weights
        return features, factors.to(features.dtype)

    def sketched_output_curvature(self, model: nn.Module, batch: dict, samples: int, generator: torch.Generator) -> tuple[torch.Tensor, Iterator[torch.Tensor]]:
        """The logits and cotangents c = √p ⊙ ξ − p (√p · ξ) per scored token (ξ = ±1): E[c cᵀ] = diag p − p pᵀ, the
        cross-entropy curvature, at the cost of a vocabulary-sized vector — no factorisation, any output head."""
        batch = _batch_to(batch, _model_device(model))
        logits = self.outputs(model, batch)[:, :-1]
        # float32 at least: a sketch's sampling error is far above float32 round-off, and its vocabulary-sized draws
        # cost a third of float64's
        precision = torch.promote_types(logits.dtype, torch.float32)
        probabilities = torch.softmax(logits.detach().to(precision), dim=-1)
        root = probabilities.sqrt()
        scored = (batch["labels"][:, 1:] != IGNORE_INDEX).to(logits.device)
        scale = ((self._example_weights(scored).sqrt()[:, None] * scored)[..., None] / samples**0.5).to(precision)

        def draws() -> Iterator[torch.Tensor]:
            for _ in range(samples):
                signed = root * _rademacher(root.shape, generator, precision).to(root.device)
                yield ((signed - probabilities * signed.sum(dim=-1, keepdim=True)) * scale).to(logits.dtype)

        return logits, draws()

    @property
    def supports_output_curvature(self) -> bool:
        return True

    def example_length(self, example: dict) -> int:
        ids = example["input_ids"]
        return ids.numel() if isinstance(ids, torch.Tensor) else len(ids)

    def output_curvature_slots(self, model: nn.Module, batch: dict) -> Optional[int]:
        """Positions some example of the batch scores × the rank of Wᵀ(diag p − p pᵀ)W, min(hidden, vocabulary − 1)
        (an upper bound where p is degenerate), counted from the labels: no forward pass."""
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        weight = getattr(head, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            return None
        positions = int((batch["labels"][:, 1:] != IGNORE_INDEX).any(dim=0).sum())
        return positions * min(weight.shape[1], weight.shape[0] - 1)

    def position_mask(self, batch: dict) -> torch.Tensor:
        return batch["attention_mask"].bool()

    def sampled_loss_from_outputs(self, outputs: torch.Tensor, batch: dict, generator: torch.Generator) -> torch.Tensor:
        labels = batch["labels"].to(outputs.device)[:, 1:]
        logits = outputs[:, :-1].float()
        with torch.no_grad():
            probabilities = torch.softmax(logits.detach(), dim=-1).reshape(-1, logits.shape[-1])
            sampled = torch.multinomial(probabilities, 1, generator=generator).reshape(labels.shape)
        token_nll = F.cross_entropy(logits.transpose(1, 2), sampled, reduction="none")
        scored = labels != IGNORE_INDEX
        return (token_nll * scored).sum(dim=1) * self._example_weights(scored).to(token_nll.dtype)

    @staticmethod
    def query_example(prompt_ids: Sequence[int], answer_ids: Sequence[int]) -> dict:
        """An example whose measurement is log p(answer | prompt): prompt tokens are labelled −100."""
        prompt, answer = list(prompt_ids), list(answer_ids)
        if not answer:
            raise TaskError("The answer of a query has no tokens; there is nothing to measure.")
        if not prompt:
            raise TaskError("The prompt of a query has no tokens; a causal LM needs at least one token of context.")
        return {"input_ids": prompt + answer, "labels": [IGNORE_INDEX] * len(prompt) + answer}


class ClassificationTask(AttributionTask):
    """Classification with cross-entropy loss.

    An example is a pair ``(inputs, label)`` or a dict with the label under `label_key` and the
    model's keyword inputs under the other keys. The model returns logits (or an object with
    ``.logits``).

    Args:
        measurement: ``"log_prob"`` (log p(label | inputs)) or ``"margin"`` (logit of the label minus
            the log-sum-exp of the others, as in TRAK).
        label_key: key of the label in dict examples.
    """

    def __init__(self, measurement: str = "log_prob", label_key: str = "labels"):
        if measurement not in ("log_prob", "margin"):
            raise TaskError(f"`measurement` must be 'log_prob' or 'margin', got {measurement!r}.")
        self.measurement_kind = measurement
        self.label_key = label_key

    def _split(self, batch: Any) -> tuple[Any, torch.Tensor]:
        if isinstance(batch, dict):
            return {k: v for k, v in batch.items() if k != self.label_key}, batch[self.label_key]
        inputs, labels = batch
        return inputs, labels

    def outputs(self, model: nn.Module, batch: Any) -> torch.Tensor:
        inputs, _ = self._split(batch)
        device = _model_device(model)
        out = model(**_batch_to(inputs, device)) if isinstance(inputs, dict) else model(inputs.to(device))
        return getattr(out, "logits", out)

    def loss_from_outputs(self, outputs: torch.Tensor, batch: Any) -> torch.Tensor:
        _, labels = self._split(batch)
        return F.cross_entropy(outputs, labels.to(outputs.device), reduction="none")

    def output_curvature(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """The logits and the factors √p_c (e_c − p) of the softmax cross-entropy curvature diag(p) − p pᵀ."""
        logits = self.outputs(model, batch)
        probabilities = torch.softmax(logits.detach().double(), dim=-1)
        identity = torch.eye(logits.shape[1], dtype=torch.float64, device=logits.device)
        factors = probabilities.sqrt()[:, :, None] * (identity[None] - probabilities[:, None, :])
        return logits[:, None, :], factors[:, None].to(logits.dtype)

    def sampled_loss_from_outputs(self, outputs: torch.Tensor, batch: Any, generator: torch.Generator) -> torch.Tensor:
        with torch.no_grad():
            sampled = torch.multinomial(torch.softmax(outputs.detach().float(), dim=-1), 1, generator=generator).squeeze(1)
        return F.cross_entropy(outputs, sampled, reduction="none")

    def measurement(self, model: nn.Module, batch: Any) -> torch.Tensor:
        logits = self.outputs(model, batch)
        _, labels = self._split(batch)
        labels = labels.to(logits.device)
        if self.measurement_kind == "log_prob":
            return -F.cross_entropy(logits, labels, reduction="none")
        label_logit = logits.gather(1, labels[:, None]).squeeze(1)
        others = logits.scatter(1, labels[:, None], float("-inf"))
        return label_logit - torch.logsumexp(others, dim=1)


def as_task(task: Optional[AttributionTask]) -> AttributionTask:
    """Check that `task` is an `AttributionTask`."""
    if not isinstance(task, AttributionTask):
        raise TaskError(f"Expected an AttributionTask (e.g. CausalLMTask()), got {type(task).__name__}.")
    return task
