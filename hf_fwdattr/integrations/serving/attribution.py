"""`ServedReadout`: scores from the log-likelihoods an inference server computes under an adapter set's adapters.

A backend implements two methods — `token_log_likelihoods` (the log-probability of each answer token given what
precedes it, under each named adapter: vLLM's prompt log-probabilities) and `generate` (greedy answers under θ*) —
and gets scores, per-token scores from the same requests, document scores through a compressed basis, and
generation with attribution in one call.
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

    Subclasses implement `token_log_likelihoods` and `generate`.

    Args:
        adapters: the adapter set (or its folder) exported from the artifact for the served model.
    """

    def __init__(self, adapters: Union[AdapterSet, str]):
        self.adapters = adapters if isinstance(adapters, AdapterSet) else AdapterSet.from_pretrained(adapters)

    # ------------------------------------------------------------------ what a backend provides
    def token_log_likelihoods(self, prompts: Sequence[TokenIds], answers: Sequence[TokenIds],
                              adapter_names: Sequence[str]) -> dict[str, list[list[float]]]:
        """adapter name → for each query q, [log p(answer_q[t] | prompt_q, answer_q[:t]) for each answer token t]
        under that adapter."""
        raise NotImplementedError(f"{type(self).__name__} must implement `token_log_likelihoods`.")

    def generate(self, prompts: Sequence[Union[str, TokenIds]], max_new_tokens: int) -> list[tuple[list[int], list[int], str]]:
        """Greedy answers under θ* (the `base` adapter): (prompt ids, answer ids, answer text) per prompt."""
        raise NotImplementedError(f"{type(self).__name__} must implement `generate`.")

    def log_likelihoods(self, prompts: Sequence[TokenIds], answers: Sequence[TokenIds], adapter_names: Sequence[str]) -> dict[str, list[float]]:
        """adapter name → [log p(answer_q | prompt_q) under that adapter, for each q]: the answer tokens' summed
        log-probabilities."""
        tokens = self.token_log_likelihoods(prompts, answers, adapter_names)
        return {name: [float(sum(values)) for values in per_query] for name, per_query in tokens.items()}

    # ------------------------------------------------------------------ scores
    def direction_scores(self, prompts: Sequence[TokenIds], answers: Sequence[TokenIds]) -> np.ndarray:
        """[n_queries, n_directions] scores ∇f_qᵀu_j of the set's directions; positive = proponent."""
        _check_pairs(prompts, answers)
        return self.adapters.direction_scores(self.log_likelihoods(prompts, answers, self._scoring_names()))

    def scores(self, prompts: Sequence[TokenIds], answers: Sequence[TokenIds]) -> np.ndarray:
        """Source scores (source sets), document scores (document sets; basis sets through the coefficients),
        [n_queries, n]; positive = proponent."""
        return self._readable(self.direction_scores(prompts, answers))

    def token_scores(self, prompts: Sequence[TokenIds], answers: Sequence[TokenIds]) -> tuple[np.ndarray, list[np.ndarray]]:
        """(scores [n_queries, n] as `scores` gives them, and per query [len(answer_q), n] the scores of each answer
        token's log-likelihood), both from the same requests: the server returns every token's log-probability
        anyway, and the differences are linear, so a query's token scores sum to its score."""
        _check_pairs(prompts, answers)
        tokens = self.token_log_likelihoods(prompts, answers, self._scoring_names())
        per_token = [self._readable(self.adapters.direction_scores({name: values[q] for name, values in tokens.items()}))
                     for q in range(len(prompts))]
        totals = self.adapters.direction_scores({name: [float(sum(v)) for v in values] for name, values in tokens.items()})
        return self._readable(totals), per_token

    def attribute(self, prompts: Sequence[Union[str, TokenIds]], max_new_tokens: int = 16, top_k: int = 5,
                  per_token: bool = False) -> list[dict]:
        """Generate each prompt's answer under θ*, then attribute it: one record per prompt with the answer
        (``answer``, ``answer_token_ids``, ``prompt_token_ids``) and its `top_k` ``attributions``; with
        `per_token`, also ``token_attributions`` (each answer token's own ranking, from the same requests)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        generated = self.generate(list(prompts), max_new_tokens)
        empty = [i for i, (_, answer, _) in enumerate(generated) if not answer]
        if empty:
            raise ServingError(f"The model generated no tokens for prompt {empty[0]}; raise max_new_tokens.")
        prompt_ids, answer_ids = [g[0] for g in generated], [g[1] for g in generated]
        if per_token:
            scores, token_scores = self.token_scores(prompt_ids, answer_ids)
        else:
            scores, token_scores = self.scores(prompt_ids, answer_ids), None
        records = []
        for q, ((prompt, answer, text), row) in enumerate(zip(generated, scores)):
            record = {"prompt_token_ids": list(prompt), "answer_token_ids": list(answer), "answer": text,
                      "attributions": self.adapters.ranked(row, top_k)}
            if token_scores is not None:
                record["token_attributions"] = [{"token_id": int(token), "attributions": self.adapters.ranked(token_row, top_k)}
                                                for token, token_row in zip(answer, token_scores[q])]
            records.append(record)
        return records

    def _scoring_names(self) -> list[str]:
        return [entry.name for entry in self.adapters.scoring_entries]

    def _readable(self, direction_scores: np.ndarray) -> np.ndarray:
        return self.adapters.document_scores(direction_scores) if self.adapters.kind is DirectionKind.BASIS else direction_scores

    @property
    def base_adapter(self) -> str:
        """Name of the θ* adapter in the set."""
        return BASE_ADAPTER


def answer_token_log_likelihoods(prompt_logprobs: Sequence[Optional[dict]], token_ids: Sequence[int], prompt_length: int) -> list[float]:
    """[log p(token_t | tokens_<t) for the answer positions t >= `prompt_length`], from per-position dicts
    token id → log-probability (a server's prompt log-probabilities; the first position has none)."""
    values = []
    for position in range(prompt_length, len(token_ids)):
        entry = prompt_logprobs[position]
        token = token_ids[position]
        if entry is None or token not in entry:
            raise ServingError(f"The server returned no log-probability for token {token} at position {position}; "
                               "request prompt log-probabilities (prompt_logprobs=0) for the whole sequence.")
        values.append(float(entry[token]))
    return values


def _check_pairs(prompts: Sequence[TokenIds], answers: Sequence[TokenIds]) -> None:
    if len(prompts) != len(answers):
        raise ServingError(f"{len(prompts)} prompts for {len(answers)} answers; give one answer per prompt.")
    for i, (prompt, answer) in enumerate(zip(prompts, answers)):
        if not len(prompt) or not len(answer):
            raise ServingError(f"Query {i} has an empty {'prompt' if not len(prompt) else 'answer'}; a causal LM needs "
                               "at least one token of context and one token to score.")
