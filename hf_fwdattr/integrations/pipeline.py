"""`AttributedTextGenerationPipeline`: generated text plus the training documents (or sources) behind it.

Registered as the transformers task ``"attributed-text-generation"`` when `hf_fwdattr` is imported::

    import hf_fwdattr
    from transformers import pipeline
    pipe = pipeline("attributed-text-generation", model="out/model", influence="out/influence")
    pipe("The capital of Zorbia is", max_new_tokens=8, top_k=5, aggregate="source")

Generation is the parent `TextGenerationPipeline`'s, untouched; the attribution of each answer is read
out afterwards with forward passes only. f_q is the log-likelihood of the generated continuation given
the prompt (per token with ``per_token=True``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
from transformers import AutoModelForCausalLM, TextGenerationPipeline
from transformers.pipelines import PIPELINE_REGISTRY

from ..errors import ReadoutError
from ..estimator.task import IGNORE_INDEX, CausalLMTask
from ..query.scoring import ArtifactScorer
from ..storage.artifact import InfluenceArtifact

TASK_NAME = "attributed-text-generation"
_AGGREGATES = ("document", "source")


class AttributionRequestError(ValueError):
    """An attribution argument of the pipeline call is invalid."""


@dataclass
class _Attributions:
    """Per-input attributions carried from `_forward` to `postprocess` (one entry per returned sequence)."""

    per_sequence: list


class AttributedTextGenerationPipeline(TextGenerationPipeline):
    """Text generation that also returns, for each answer, the training documents or sources that made it likely.

    Accepts everything `TextGenerationPipeline` accepts (generation kwargs, chat messages, batches) plus:

    - ``top_k`` (int, default 10): how many documents/sources to return, sorted by score;
    - ``aggregate`` (``"document"`` or ``"source"``): rank documents, or sources (exact, one direction per source);
    - ``per_token`` (bool): also attribute each generated token separately;
    - ``response`` (str): score this given response to the prompt instead of generating (auditing).

    Each output record is ``{"generated_text": ..., "attributions": [...]}``; an attribution is
    ``{"document_id", "source", "score"}`` or ``{"source", "score", "n_documents"}``. Positive scores
    are proponents: training on the document made the answer more likely.

    Args:
        influence: an `InfluenceArtifact`, a local artifact folder, or a Hub repo id.
        readout: readout mode overriding the artifact's (``"jvp"``, ``"central_difference"``, ``"one_sided"``).
    """

    def __init__(self, *args, influence: Union[InfluenceArtifact, str, None] = None, readout: Optional[str] = None, **kwargs):
        if influence is None:
            raise AttributionRequestError(
                "pipeline('attributed-text-generation', ...) needs `influence=`: an InfluenceArtifact, its folder, or a Hub repo id."
            )
        super().__init__(*args, **kwargs)
        self.influence = influence if isinstance(influence, InfluenceArtifact) else InfluenceArtifact.from_pretrained(influence)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        self.attribution_task = CausalLMTask(pad_token_id=pad if pad is not None else 0)
        self.scorer = ArtifactScorer(self.influence, self.model, self.attribution_task, mode=readout)
        self._source_counts = {s: self.influence.documents.sources.count(s) for s in self.influence.source_names}

    # ------------------------------------------------------------------ the four-method contract
    def _sanitize_parameters(self, top_k=None, aggregate=None, per_token=None, response=None, **kwargs):
        preprocess_params, forward_params, postprocess_params = super()._sanitize_parameters(**kwargs)
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k <= 0):
            raise AttributionRequestError(f"`top_k` must be a positive integer, got {top_k!r}.")
        if aggregate is not None and aggregate not in _AGGREGATES:
            raise AttributionRequestError(f"`aggregate` must be 'document' or 'source', got {aggregate!r}.")
        if aggregate == "source" and not self.influence.source_names:
            raise AttributionRequestError("aggregate='source' needs an artifact whose documents have sources; this one has none.")
        if response is not None and not isinstance(response, str):
            raise AttributionRequestError(f"`response` must be a string, got {type(response).__name__}.")
        attribution = {"top_k": top_k or 10, "aggregate": aggregate or "document", "per_token": bool(per_token)}
        forward_params = {**forward_params, "attribution": attribution, "response": response}
        postprocess_params = {**postprocess_params, "attribution": attribution}
        return preprocess_params, forward_params, postprocess_params

    def preprocess(self, prompt_text, **kwargs):
        text = prompt_text if isinstance(prompt_text, str) else None
        if text is not None and not text.strip():
            raise AttributionRequestError("The prompt is empty; f_q is the likelihood of an answer *given* a prompt, so give one.")
        inputs = super().preprocess(prompt_text, **kwargs)
        if inputs["input_ids"].shape[-1] == 0:
            raise AttributionRequestError("The prompt has no tokens after tokenisation; give a non-empty prompt.")
        return inputs

    def _forward(self, model_inputs, attribution=None, response=None, **generate_kwargs):
        if response is None:
            outputs = super()._forward(model_inputs, **generate_kwargs)
        else:
            outputs = self._given_response(model_inputs, response)
        prompts = self._prompt_ids(model_inputs["input_ids"], model_inputs.get("attention_mask"))
        outputs["fwdattr"] = self._attribute(prompts, model_inputs["input_ids"].shape[-1], outputs["generated_sequence"], attribution)
        return outputs

    def postprocess(self, model_outputs, attribution=None, **kwargs):
        carried = model_outputs.pop("fwdattr")
        carried = carried[0] if isinstance(carried, list) else carried  # a list unless the batch was split per input
        records = super().postprocess(model_outputs, **kwargs)
        for record, attributions in zip(records, carried.per_sequence):
            record.update(attributions)
        return records

    # ------------------------------------------------------------------ helpers
    def attribute(self, prompt: str, response: str, **kwargs):
        """Attribute an existing answer: the records for (`prompt`, `response`), without generating."""
        return self(prompt, response=response, **kwargs)

    def _given_response(self, model_inputs, response: str) -> dict:
        input_ids = model_inputs["input_ids"]
        if input_ids.shape[0] != 1:
            raise AttributionRequestError("Scoring a given `response` works one prompt at a time (batch_size=1).")
        answer = self.tokenizer(response, add_special_tokens=False, return_tensors="pt")["input_ids"].to(input_ids.device)
        if answer.shape[-1] == 0:
            raise AttributionRequestError("The response is empty; there is nothing to attribute.")
        sequence = torch.cat([input_ids, answer], dim=1)
        return {"generated_sequence": sequence[:, None], "input_ids": input_ids, "prompt_text": model_inputs.pop("prompt_text")}

    @staticmethod
    def _prompt_ids(input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> list[list[int]]:
        if attention_mask is None:
            return [row.tolist() for row in input_ids]
        return [row[mask.bool()].tolist() for row, mask in zip(input_ids, attention_mask.to(input_ids.device))]

    def _continuation(self, sequence: list[int], prompt_length: int) -> list[int]:
        tokens = sequence[prompt_length:]
        stop = set()
        for item in (self.model.generation_config.eos_token_id, self.tokenizer.eos_token_id):
            if item is not None:
                stop.update(item if isinstance(item, (list, tuple)) else [item])
        for position, token in enumerate(tokens):
            if token in stop:
                return tokens[: position + 1]
        pad = self.tokenizer.pad_token_id
        while tokens and pad is not None and tokens[-1] == pad:
            tokens = tokens[:-1]
        return tokens

    def _attribute(self, prompts: list[list[int]], prompt_length: int, generated: torch.Tensor, request: dict) -> list[_Attributions]:
        """Attributions for every returned sequence, grouped by input (one `_Attributions` per input row)."""
        sequences = []
        for row, prompt in enumerate(prompts):
            for sequence in generated[row].tolist():
                continuation = self._continuation(sequence, prompt_length)
                if not continuation:
                    raise ReadoutError("The model generated no tokens to attribute; raise max_new_tokens.")
                sequences.append((row, prompt, continuation))
        queries = []
        for _, prompt, continuation in sequences:
            queries.append(CausalLMTask.query_example(prompt, continuation))
            if request["per_token"]:  # one query per generated token: log p(token | prompt, earlier tokens)
                for position, token in enumerate(continuation):
                    queries.append({"input_ids": prompt + continuation[: position + 1],
                                    "labels": [IGNORE_INDEX] * (len(prompt) + position) + [token]})
        scores = self.scorer.source_scores(queries) if request["aggregate"] == "source" else self.scorer.document_scores(queries)
        per_input: list[list[dict]] = [[] for _ in prompts]
        cursor = 0
        for row, _, continuation in sequences:
            record = {"attributions": self._ranked(scores[cursor], request)}
            cursor += 1
            if request["per_token"]:
                record["token_attributions"] = []
                for token in continuation:
                    record["token_attributions"].append({"token": self.tokenizer.decode([token]), "token_id": token,
                                                         "attributions": self._ranked(scores[cursor], request)})
                    cursor += 1
            per_input[row].append(record)
        return [_Attributions(records) for records in per_input]

    def _ranked(self, scores: torch.Tensor, request: dict) -> list[dict]:
        top = torch.topk(scores, min(request["top_k"], scores.numel()))
        ranked = []
        for score, index in zip(top.values.tolist(), top.indices.tolist()):
            if request["aggregate"] == "source":
                name = self.influence.source_names[index]
                ranked.append({"source": name, "score": score, "n_documents": self._source_counts[name]})
            else:
                documents = self.influence.documents
                ranked.append({"document_id": documents.document_ids[index], "source": documents.sources[index], "score": score})
        return ranked


PIPELINE_REGISTRY.register_pipeline(TASK_NAME, pipeline_class=AttributedTextGenerationPipeline, pt_model=AutoModelForCausalLM, type="text")
