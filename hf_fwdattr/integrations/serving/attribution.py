"""`ServedReadout`: scores from the log-likelihoods an inference server computes under an adapter set's adapters.

A backend implements two methods — `log_likelihoods` (the summed log-probability of each answer given its
prompt, under each named adapter: vLLM's prompt log-probabilities) and `generate` (greedy answers under θ*) —
and gets scores, document scores through a compressed basis, and generation with attribution in one call.
No torch here: the arithmetic is the adapter set's, in numpy.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np

from ...errors import ServingError
from .adapter_set import BASE_ADAPTER, AdapterSet, DirectionKind

TokenIds = Sequence[int]


class ServedReadout:
    """Forward-only readout through a model server: f_q(θ* ± εû_j) from the server, scores from the `AdapterSet`.

    Subclasses implement `log_likelihoods` and `generate`.

    Args:
        adapters: the adapter set (or its folder) exported from the artifact for the served model.
    """

    def __init__(self, adapters: Union[AdapterSet, str]):
        self.adapters = adapters if isinstance(adapters, AdapterSet) else AdapterSet.from_pretrained(adapters)

    # ------------------------------------------------------------------ what a backend provides
    def log_likelihoods(self, prompts: Sequence[TokenIds], answers: Sequence[TokenIds], adapter_names: Sequence[str]) -> dict[str, list[float]]:
        """adapter name → [log p(answer_q | prompt_q) under that adapter, for each q] (the answer tokens' summed
        log-probabilities)."""
        raise NotImplementedError(f"{type(self).__name__} must implement `log_likelihoods`.")

    def generate(self, prompts: Sequence[Union[str, TokenIds]], max_new_tokens: int) -> list[tuple[list[int], list[int], str]]:
        """Greedy answers under θ* (the `base` adapter): (prompt ids, answer ids, answer text) per prompt."""
        raise NotImplementedError(f"{type(self).__name__} must implement `generate`.")

    # ------------------------------------------------------------------ scores
    def direction_scores(self, prompts: Sequence[TokenIds], answers: Sequence[TokenIds]) -> np.ndarray:
        """[n_queries, n_directions] scores ∇f_qᵀu_j of the set's directions; positive = proponent."""
        _check_pairs(prompts, answers)
        names = [entry.name for entry in self.adapters.scoring_entries]
        return self.adapters.direction_scores(self.log_likelihoods(prompts, answers, names))

    def scores(self, prompts: Sequence[TokenIds], answers: Sequence[TokenIds]) -> np.ndarray:
        """Source scores (source sets), document scores (document sets; basis sets through the coefficients),
        [n_queries, n]; positive = proponent."""
        scores = self.direction_scores(prompts, answers)
        return self.adapters.document_scores(scores) if self.adapters.kind is DirectionKind.BASIS else scores

    def attribute(self, prompts: Sequence[Union[str, TokenIds]], max_new_tokens: int = 16, top_k: int = 5) -> list[dict]:
        """Generate each prompt's answer under θ*, then attribute it: one record per prompt with the answer
        (``answer``, ``answer_token_ids``, ``prompt_token_ids``) and its `top_k` ``attributions``."""
        if isinstance(prompts, str):
            prompts = [prompts]
        generated = self.generate(list(prompts), max_new_tokens)
        empty = [i for i, (_, answer, _) in enumerate(generated) if not answer]
        if empty:
            raise ServingError(f"The model generated no tokens for prompt {empty[0]}; raise max_new_tokens.")
        scores = self.scores([g[0] for g in generated], [g[1] for g in generated])
        return [{"prompt_token_ids": list(p), "answer_token_ids": list(a), "answer": text,
                 "attributions": self.adapters.ranked(row, top_k)} for (p, a, text), row in zip(generated, scores)]

    @property
    def base_adapter(self) -> str:
        """Name of the θ* adapter in the set."""
        return BASE_ADAPTER


def answer_log_likelihood(prompt_logprobs: Sequence[Optional[dict]], token_ids: Sequence[int], prompt_length: int) -> float:
    """Σ log p(token_t | tokens_<t) over the answer positions t >= `prompt_length`, from per-position dicts
    token id → log-probability (a server's prompt log-probabilities; the first position has none)."""
    total = 0.0
    for position in range(prompt_length, len(token_ids)):
        entry = prompt_logprobs[position]
        token = token_ids[position]
        if entry is None or token not in entry:
            raise ServingError(f"The server returned no log-probability for token {token} at position {position}; "
                               "request prompt log-probabilities (prompt_logprobs=0) for the whole sequence.")
        total += float(entry[token])
    return total


def _check_pairs(prompts: Sequence[TokenIds], answers: Sequence[TokenIds]) -> None:
    if len(prompts) != len(answers):
        raise ServingError(f"{len(prompts)} prompts for {len(answers)} answers; give one answer per prompt.")
    for i, (prompt, answer) in enumerate(zip(prompts, answers)):
        if not len(prompt) or not len(answer):
            raise ServingError(f"Query {i} has an empty {'prompt' if not len(prompt) else 'answer'}; a causal LM needs "
                               "at least one token of context and one token to score.")
