"""The readout inside a `vllm.LLM`: every (query, adapter) pair is one request, batched like many users.

    readout = VLLMReadout.from_pretrained("served-model/", "adapters/")    # starts vllm.LLM with LoRA on
    readout.attribute(["The capital of Zorbia is"], max_new_tokens=8)       # generate under θ*, then attribute

vLLM starts worker processes with spawn: a script that builds one needs ``if __name__ == "__main__":``.
Every request carries an adapter (θ* itself is the set's `base` adapter): on vLLM's CPU backend a request
without one, batched with LoRA requests, is computed with the last loaded adapter (vLLM 0.32).
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, Sequence, Union

from ...errors import ServingError
from .adapter_set import AdapterSet
from .attribution import ServedReadout, TokenIds, answer_token_log_likelihoods

_LORA_IDS = itertools.count(1)  # vLLM's LoRA ids must be unique per engine; unique per process is enough


def vllm_engine_arguments(adapters: AdapterSet, **overrides: Any) -> dict[str, Any]:
    """Keyword arguments of `vllm.LLM` that serve `adapters`; `overrides` win.

    LoRA on with the smallest `max_lora_rank` that holds the set, room for all its adapters in one batch, float32
    and eager mode (the readout's differences need float32), and `lora_target_modules` limited to the modules the
    adapters touch: that keeps the LM head out of vLLM's LoRA wrappers, whose CPU kernel crashes on prompt
    log-probabilities when several adapters share a batch (vLLM 0.32).
    """
    arguments = {
        "enable_lora": True,
        "max_lora_rank": adapters.vllm_max_lora_rank,
        "max_loras": min(len(adapters.entries), 64),
        "max_cpu_loras": len(adapters.entries),
        "lora_target_modules": list(adapters.target_modules),
        "dtype": "float32",
        "enforce_eager": True,
    }
    arguments.update(overrides)
    return arguments


def check_engine(llm: Any, adapters: AdapterSet) -> None:
    """Raise `ServingError` naming the setting to change if `llm` cannot serve `adapters`."""
    config = llm.llm_engine.vllm_config
    lora = config.lora_config
    if lora is None:
        raise ServingError("This vllm.LLM was built without LoRA; build it with enable_lora=True "
                           f"(and max_lora_rank >= {adapters.rank}), e.g. from `vllm_engine_arguments(adapters)`.")
    if lora.max_lora_rank < adapters.rank:
        raise ServingError(f"This vllm.LLM serves LoRA ranks up to max_lora_rank={lora.max_lora_rank}, the adapters have rank "
                           f"{adapters.rank}; build it with max_lora_rank={adapters.vllm_max_lora_rank}.")
    dtype = str(config.model_config.dtype).replace("torch.", "")
    if dtype != "float32":
        raise ServingError(f"This vllm.LLM computes in {dtype}; finite differences of log-likelihoods with ε = {adapters.epsilon:g} "
                           "need float32. Build it with dtype='float32'.")


class VLLMReadout(ServedReadout):
    """Scores read from a `vllm.LLM`'s prompt log-probabilities under the adapters of an `AdapterSet`.

    Args:
        llm: a `vllm.LLM` with LoRA enabled (see `vllm_engine_arguments`).
        adapters: the adapter set (or its folder), exported for the model `llm` serves.
    """

    def __init__(self, llm: Any, adapters: Union[AdapterSet, str, Path]):
        super().__init__(adapters)
        from vllm.lora.request import LoRARequest

        check_engine(llm, self.adapters)
        self.llm = llm
        self._requests = {entry.name: LoRARequest(self.adapters.served_name(entry.name), next(_LORA_IDS),
                                                  str(self.adapters.path(entry.name).resolve()))
                          for entry in self.adapters.entries}

    @classmethod
    def from_pretrained(cls, model: Union[str, Path], adapters: Union[AdapterSet, str, Path], **llm_arguments: Any) -> "VLLMReadout":
        """Start a `vllm.LLM` on `model` (the served weights, θ* without the adapters) with the settings the set
        needs (`vllm_engine_arguments`; `llm_arguments` override them) and read out through it."""
        if (Path(model) / "adapter_model.safetensors").is_file():
            raise ServingError(f"{model} holds adapter files next to the base weights, which vLLM would read as model weights. "
                               "Serve the base weights alone (`hf-fwdattr export-adapters --served-dir DIR`, or "
                               "`copy_served_weights`): the adapter set carries the adapter.")
        from vllm import LLM

        adapter_set = adapters if isinstance(adapters, AdapterSet) else AdapterSet.from_pretrained(adapters)
        return cls(LLM(model=str(model), **vllm_engine_arguments(adapter_set, **llm_arguments)), adapter_set)

    def token_log_likelihoods(self, prompts: Sequence[TokenIds], answers: Sequence[TokenIds],
                              adapter_names: Sequence[str]) -> dict[str, list[list[float]]]:
        """adapter name → each answer's token log-probabilities under it: one vLLM request per (query, adapter),
        all in one `generate` call (`max_tokens=1`, `prompt_logprobs=0`)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        requests, loras, owners = [], [], []
        for name in adapter_names:
            for q, (prompt, answer) in enumerate(zip(prompts, answers)):
                requests.append(TokensPrompt(prompt_token_ids=[int(t) for t in prompt] + [int(t) for t in answer]))
                loras.append(self._requests[name])
                owners.append((name, q, len(prompt)))
        parameters = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
        outputs = self.llm.generate(requests, parameters, lora_request=loras, use_tqdm=False)
        values: dict[str, list[list[float]]] = {name: [[] for _ in prompts] for name in adapter_names}
        for (name, q, prompt_length), output in zip(owners, outputs):
            logprobs = [None if entry is None else {t: lp.logprob for t, lp in entry.items()} for entry in output.prompt_logprobs]
            values[name][q] = answer_token_log_likelihoods(logprobs, output.prompt_token_ids, prompt_length)
        return values

    def generate(self, prompts: Sequence[Union[str, TokenIds]], max_new_tokens: int) -> list[tuple[list[int], list[int], str]]:
        """Greedy answers under the `base` adapter (θ*)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        inputs = [p if isinstance(p, str) else TokensPrompt(prompt_token_ids=[int(t) for t in p]) for p in prompts]
        parameters = SamplingParams(max_tokens=int(max_new_tokens), temperature=0.0)
        outputs = self.llm.generate(inputs, parameters, lora_request=[self._requests[self.base_adapter]] * len(inputs), use_tqdm=False)
        return [(list(o.prompt_token_ids), list(o.outputs[0].token_ids), o.outputs[0].text) for o in outputs]
