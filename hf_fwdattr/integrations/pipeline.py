"""`AttributedTextGenerationPipeline`: generated text plus the training documents (or sources) behind it.

Registered as the transformers task ``"attributed-text-generation"`` when `hf_fwdattr` is imported::

    import hf_fwdattr
    from transformers import pipeline
    pipe = pipeline("attributed-text-generation", model="out/model", influence="out/influence")
    pipe("The capital of Zorbia is", max_new_tokens=8, attribution_top_k=5, aggregate="source")

Generation is the parent `TextGenerationPipeline`'s, untouched (``top_k`` and every other generation argument
reach it); the attribution of each answer is read out afterwards with forward passes only. f_q is the
log-likelihood of the generated continuation given the prompt; one readout gives every token's score and their
sum (``per_token=True`` costs no more passes). The one-sided and removal readouts take f_q(θ*) from generation's
own logits. f_q is taken under the very token ids the model generated from: the prompt is tokenised once, as
text-generation does, and attribution reuses those ids. One exception keeps a prompt's tokens what the model was
trained on: a prompt that starts with the tokenizer's BOS text is not given a second BOS by the tokenizer.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional, Union

import torch
from transformers import AutoModelForCausalLM, TextGenerationPipeline
from transformers.pipelines import PIPELINE_REGISTRY

from ..errors import ReadoutError
from ..estimator.task import CausalLMTask
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

    - ``attribution_top_k`` (int, default 10): how many documents/sources to return, sorted by score (``top_k`` is
      text-generation's sampling argument and goes to generation);
    - ``aggregate`` (``"document"`` or ``"source"``): rank documents, or sources (exact, one direction per source);
    - ``per_token`` (bool): also attribute each generated token separately;
    - ``response`` (str): score this given response to the prompt instead of generating (auditing).

    Each output record is ``{"generated_text": ..., "attributions": [...]}``; an attribution is
    ``{"document_id", "source", "score", "share"}`` or ``{"source", "score", "share", "n_documents"}``. Positive scores
    are proponents: training on the document made the answer more likely. ``score`` is the first-order change of the
    answer's log-likelihood (nats) per unit of up-weighting the document in the training loss (with the removal readout:
    its drop, in nats, when the document is unlearned); ``share`` is the entry's part of the sum of all positive scores
    of that answer (over every document or source, not only the top ones), a scale comparable across answers.

    Args:
        influence: an `InfluenceArtifact`, a local artifact folder, or a Hub repo id.
        readout: readout mode overriding the artifact's (``"jvp"``, ``"central_difference"``, ``"one_sided"``).
        readout_engine: how directions are evaluated (``"auto"``, ``"lora_batch"``, ``"functional"``; `ReadoutEngine`).
    """

    def __init__(self, *args, influence: Union[InfluenceArtifact, str, None] = None, readout: Optional[str] = None,
                 readout_engine: str = "auto", **kwargs):
        if influence is None:
            raise AttributionRequestError(
                "pipeline('attributed-text-generation', ...) needs `influence=`: an InfluenceArtifact, its folder, or a Hub repo id."
            )
        super().__init__(*args, **kwargs)
        self.influence = influence if isinstance(influence, InfluenceArtifact) else InfluenceArtifact.from_pretrained(influence)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        self.attribution_task = CausalLMTask(pad_token_id=pad if pad is not None else 0)
        self.scorer = ArtifactScorer(self.influence, self.model, self.attribution_task, mode=readout, engine=readout_engine)
        self._source_counts = {s: self.influence.documents.sources.count(s) for s in self.influence.source_names}

    def check_model_type(self, supported_models):
        """As the parent, but a PEFT model is checked by the model its adapter wraps: PEFT models are the main use case
        (the parent would log a multi-kilobyte "not supported" error for the wrapper's class)."""
        get_base_model = getattr(self.model, "get_base_model", None)
        if not callable(get_base_model):
            return super().check_model_type(supported_models)
        wrapper, self.model = self.model, get_base_model()
        try:
            return super().check_model_type(supported_models)
        finally:
            self.model = wrapper

    # ------------------------------------------------------------------ the four-method contract
    def _sanitize_parameters(self, attribution_top_k=None, aggregate=None, per_token=None, response=None, **kwargs):
        if "top_k" in kwargs and attribution_top_k is None:
            warnings.warn(
                "`top_k` is text-generation's sampling argument and goes to generation, as in the 'text-generation' pipeline; "
                "the number of attributions returned is `attribution_top_k` (default 10).", FutureWarning, stacklevel=3,
            )
        preprocess_params, forward_params, postprocess_params = super()._sanitize_parameters(**kwargs)
        top_k = attribution_top_k
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k <= 0):
            raise AttributionRequestError(f"`attribution_top_k` must be a positive integer, got {top_k!r}.")
        if aggregate is not None and aggregate not in _AGGREGATES:
            raise AttributionRequestError(f"`aggregate` must be 'document' or 'source', got {aggregate!r}.")
        if aggregate == "source" and not self.influence.source_names:
            raise AttributionRequestError("aggregate='source' needs an artifact whose documents have sources; this one has none.")
        if response is not None and not isinstance(response, str):
            raise AttributionRequestError(f"`response` must be a string, got {type(response).__name__}.")
        attribution = {"attribution_top_k": top_k or 10, "aggregate": aggregate or "document", "per_token": bool(per_token)}
        forward_params = {**forward_params, "attribution": attribution, "response": response}
        postprocess_params = {**postprocess_params, "attribution": attribution}
        return preprocess_params, forward_params, postprocess_params

    def preprocess(self, prompt_text, **kwargs):
        text = prompt_text if isinstance(prompt_text, str) else None
        if text is not None and not text.strip():
            raise AttributionRequestError("The prompt is empty; f_q is the likelihood of an answer *given* a prompt, so give one.")
        inputs = super().preprocess(prompt_text, **kwargs)
        if text is not None and kwargs.get("add_special_tokens") is None and self._doubled_bos(inputs["input_ids"], (kwargs.get("prefix") or "") + text):
            # the text brings its own BOS and the tokenizer added another: keep one, as the model saw in training
            inputs["input_ids"] = inputs["input_ids"][:, 1:]
            if inputs.get("attention_mask") is not None:
                inputs["attention_mask"] = inputs["attention_mask"][:, 1:]
        length = inputs["input_ids"].shape[-1]
        if length == 0:
            raise AttributionRequestError("The prompt has no tokens after tokenisation; give a non-empty prompt.")
        context = self._context_length()
        if context is not None and length >= context:
            raise AttributionRequestError(
                f"The prompt has {length} tokens, and the model's context is {context}: nothing can be generated or scored after "
                "it. Shorten the prompt."
            )
        return inputs

    def _forward(self, model_inputs, attribution=None, response=None, **generate_kwargs):
        step_logits = None
        if response is None:
            added = []
            if self.scorer.readout.needs_base_value:  # f_q(θ*) per token from generation's own logits, not another forward
                for key in ("return_dict_in_generate", "output_logits"):
                    if key not in generate_kwargs:
                        generate_kwargs[key] = True
                        added.append(key)
            outputs = super()._forward(model_inputs, **generate_kwargs)
            step_logits = outputs.pop("logits", None) if "output_logits" in added else outputs.get("logits")
        else:
            outputs = self._given_response(model_inputs, response)
        prompts = self._prompt_ids(model_inputs["input_ids"], model_inputs.get("attention_mask"))
        outputs["fwdattr"] = self._attribute(prompts, model_inputs["input_ids"].shape[-1], outputs["generated_sequence"], attribution,
                                             step_logits)
        return outputs

    def postprocess(self, model_outputs, attribution=None, **kwargs):
        carried = model_outputs.pop("fwdattr")
        carried = carried[0] if isinstance(carried, list) else carried  # a list unless the batch was split per input
        records = super().postprocess(model_outputs, **kwargs)
        for record, attributions in zip(records, carried.per_sequence):
            record.update(attributions)
        return records

    # ------------------------------------------------------------------ helpers
    def _doubled_bos(self, input_ids: torch.Tensor, text: str) -> bool:
        bos, bos_text = self.tokenizer.bos_token_id, self.tokenizer.bos_token
        return (bos is not None and bool(bos_text) and text.startswith(bos_text) and input_ids.shape[-1] >= 2
                and int(input_ids[0, 0]) == bos and int(input_ids[0, 1]) == bos)

    def _context_length(self) -> Optional[int]:
        config = getattr(self.model, "config", None)
        return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)

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
        context = self._context_length()
        if context is not None and sequence.shape[-1] > context:
            raise AttributionRequestError(
                f"The prompt and response have {sequence.shape[-1]} tokens together, more than the model's context of {context}; "
                "shorten them."
            )
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

    def _attribute(self, prompts: list[list[int]], prompt_length: int, generated: torch.Tensor, request: dict,
                   step_logits: Optional[torch.Tensor] = None) -> list[_Attributions]:
        """Attributions for every returned sequence, grouped by input (one `_Attributions` per input row).

        One readout for all sequences gives each token's scores and their sum; `step_logits` ([inputs, returned,
        steps, vocab], generation's logits) give f_q(θ*) per token to the readouts that use it.
        """
        sequences = []
        for row, prompt in enumerate(prompts):
            for returned, sequence in enumerate(generated[row].tolist()):
                continuation = self._continuation(sequence, prompt_length)
                if not continuation:
                    raise ReadoutError("The model generated no tokens to attribute; raise max_new_tokens.")
                context = self._context_length()
                if context is not None and len(prompt) + len(continuation) > context:
                    raise ReadoutError(f"Prompt and answer have {len(prompt) + len(continuation)} tokens, more than the model's context "
                                       f"of {context}; lower max_new_tokens or shorten the prompt.")
                sequences.append((row, returned, prompt, continuation))
        queries = [CausalLMTask.query_example(prompt, continuation) for _, _, prompt, continuation in sequences]
        base_values = None
        if step_logits is not None and self.scorer.readout.needs_base_value:
            base_values = self._generation_log_likelihoods(sequences, step_logits)
        if request["aggregate"] == "source":
            scores = self.scorer.source_token_scores(queries, base_values)
        else:
            scores = self.scorer.document_token_scores(queries, base_values)
        per_input: list[list[dict]] = [[] for _ in prompts]
        for index, (row, _, prompt, continuation) in enumerate(sequences):
            record = {"attributions": self._ranked(scores.total[index], request)}
            if request["per_token"]:  # token t's score: the score of log p(token t | prompt, earlier tokens)
                record["token_attributions"] = [
                    {"token": self.tokenizer.decode([token]), "token_id": token,
                     "attributions": self._ranked(scores.tokens[index, len(prompt) + position], request)}
                    for position, token in enumerate(continuation)
                ]
            per_input[row].append(record)
        return [_Attributions(records) for records in per_input]

    @staticmethod
    def _generation_log_likelihoods(sequences: list, step_logits: torch.Tensor) -> torch.Tensor:
        """[n_sequences, length] log p(token | earlier tokens) of each continuation token at its position in the
        collated query (prompt + continuation), read from generation's logits (step t scored token t)."""
        length = max(len(prompt) + len(continuation) for _, _, prompt, continuation in sequences)
        values = torch.zeros(len(sequences), length, dtype=torch.float32)
        for index, (row, returned, prompt, continuation) in enumerate(sequences):
            logits = step_logits[row, returned, : len(continuation)].float()
            tokens = torch.tensor(continuation, device=logits.device)
            picked = logits.gather(-1, tokens[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)
            values[index, len(prompt) : len(prompt) + len(continuation)] = picked.cpu()
        return values

    def _ranked(self, scores: torch.Tensor, request: dict) -> list[dict]:
        top = torch.topk(scores, min(request["attribution_top_k"], scores.numel()))
        positive = float(scores.clamp(min=0).sum())  # "share": a scale comparable across answers, unlike the raw score
        ranked = []
        for score, index in zip(top.values.tolist(), top.indices.tolist()):
            share = max(score, 0.0) / positive if positive > 0 else 0.0
            if request["aggregate"] == "source":
                name = self.influence.source_names[index]
                ranked.append({"source": name, "score": score, "share": share, "n_documents": self._source_counts[name]})
            else:
                documents = self.influence.documents
                ranked.append({"document_id": documents.document_ids[index], "source": documents.sources[index], "score": score, "share": share})
        return ranked


PIPELINE_REGISTRY.register_pipeline(TASK_NAME, pipeline_class=AttributedTextGenerationPipeline, pt_model=AutoModelForCausalLM, type="text")
