"""The readout against a running OpenAI-compatible `vllm serve`: a client with no torch and no autograd.

Start the server with LoRA and run-time adapter loading on (the adapters are loaded by this client):

    VLLM_ALLOW_RUNTIME_LORA_UPDATING=True vllm serve served-model/ --enable-lora --max-lora-rank 8 \\
        --max-loras 8 --max-cpu-loras 32 --lora-target-modules q_proj v_proj --dtype float32

then ``VLLMServerReadout("http://127.0.0.1:8000", "adapters/").attribute(["The capital of Zorbia is"])``.
Each (query, adapter) pair is one `/v1/completions` request with ``prompt_logprobs=0`` and ``max_tokens=1``,
sent concurrently so that the server batches the adapters like many users. On vLLM's CPU backend,
``--lora-target-modules`` (the adapters' modules; `AdapterSet.target_modules`) keeps the LM head out of the LoRA
wrappers, whose CPU kernel crashes on prompt log-probabilities when several adapters share a batch (vLLM 0.32).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from ...errors import ServingError
from .adapter_set import AdapterSet
from .attribution import ServedReadout, TokenIds, answer_token_log_likelihoods


class VLLMServerReadout(ServedReadout):
    """Scores read from a running `vllm serve` (OpenAI-compatible API) under the adapters of an `AdapterSet`.

    Args:
        url: the server's address, e.g. ``http://127.0.0.1:8000``.
        adapters: the adapter set (or its folder), exported for the model the server serves.
        server_directory: the set's folder as the server sees it (default: the same path; set it when the
            server runs in a container or on another machine with the folder mounted elsewhere).
        api_key: sent as a bearer token when the server was started with ``--api-key``.
        max_concurrency: requests in flight at once (the server batches them).
        timeout: seconds to wait for one response.
    """

    def __init__(self, url: str, adapters: Union[AdapterSet, str, Path], server_directory: Optional[str] = None,
                 api_key: Optional[str] = None, max_concurrency: int = 64, timeout: float = 300.0):
        super().__init__(adapters)
        self.url = url.rstrip("/")
        self.server_directory = server_directory or str(self.adapters.directory.resolve())
        self.api_key = api_key
        self.max_concurrency = int(max_concurrency)
        self.timeout = float(timeout)
        self.loaded: list[str] = []
        self.base_model = self._served_models()[0]
        self.load_adapters()

    # ------------------------------------------------------------------ HTTP
    def _call(self, method: str, path: str, body: Optional[dict] = None) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method)
        request.add_header("Content-Type", "application/json")
        if self.api_key:
            request.add_header("Authorization", f"Bearer {self.api_key}")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                status, text = response.status, response.read().decode()
        except urllib.error.HTTPError as err:
            status, text = err.code, err.read().decode(errors="replace")
        except (urllib.error.URLError, ConnectionError, TimeoutError) as err:
            raise ServingError(f"No answer from a server at {self.url} ({err}). Is `vllm serve` running there, and did it "
                               "stay up? (vLLM's CPU backend dies on prompt log-probabilities with several adapters in one batch "
                               "unless started with --lora-target-modules; see `AdapterSet.target_modules`.)") from err
        try:
            return status, json.loads(text) if text else None
        except ValueError:
            return status, text

    @staticmethod
    def _message(payload: Any) -> str:
        if isinstance(payload, dict):
            error = payload.get("error", payload)
            return str(error.get("message", error) if isinstance(error, dict) else error)
        return str(payload)

    def _served_models(self) -> list[str]:
        status, payload = self._call("GET", "/v1/models")
        if status != 200 or not isinstance(payload, dict) or not payload.get("data"):
            raise ServingError(f"{self.url}/v1/models answered {status}: {self._message(payload)}; this is not an "
                               "OpenAI-compatible server (start one with `vllm serve`).")
        return [card["id"] for card in payload["data"]]

    # ------------------------------------------------------------------ adapters
    def load_adapters(self) -> None:
        """Register every adapter of the set on the server (`/v1/load_lora_adapter`), skipping those it already has."""
        present = set(self._served_models())
        for entry in self.adapters.entries:
            name = self.adapters.served_name(entry.name)
            if name in present:
                continue
            path = str(Path(self.server_directory) / entry.name)
            status, payload = self._call("POST", "/v1/load_lora_adapter", {"lora_name": name, "lora_path": path})
            if status == 200:
                self.loaded.append(name)
                continue
            self.unload_adapters()  # leave the server as it was
            message = self._message(payload)
            if status == 404 and "lora" not in message.lower():
                raise ServingError(f"{self.url} has no /v1/load_lora_adapter endpoint: start `vllm serve` with "
                                   "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True in its environment (and --enable-lora).")
            raise ServingError(self._rejection(entry.name, path, message))

    def _rejection(self, name: str, path: str, message: str) -> str:
        lowered = message.lower()
        if "lora is not enabled" in lowered or "enable-lora" in lowered:
            return f"The server at {self.url} runs without LoRA: restart `vllm serve` with --enable-lora --max-lora-rank {self.adapters.vllm_max_lora_rank}."
        if "max_lora_rank" in lowered:
            return (f"The server at {self.url} rejected adapter {name!r}: {message}. Restart `vllm serve` with "
                    f"--max-lora-rank {self.adapters.vllm_max_lora_rank} (or larger).")
        return (f"The server at {self.url} rejected adapter {name!r} ({path}): {message}. The adapter must load in that "
                "server; check that the server sees this path and serves the model the adapters were exported for.")

    def unload_adapters(self) -> None:
        """Remove the adapters this client registered from the server."""
        for name in self.loaded:
            self._call("POST", "/v1/unload_lora_adapter", {"lora_name": name})
        self.loaded = []

    def close(self) -> None:
        """Unload the adapters (the server keeps running)."""
        self.unload_adapters()

    def __enter__(self) -> "VLLMServerReadout":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ readout
    def _completion(self, body: dict) -> dict:
        status, payload = self._call("POST", "/v1/completions", body)
        if status != 200 or not isinstance(payload, dict) or not payload.get("choices"):
            message = self._message(payload)
            if "prompt_logprobs" in message:
                message += " (this server does not return prompt log-probabilities; the readout needs vLLM's completions API)"
            raise ServingError(f"The server at {self.url} failed a completion request for {body['model']!r} ({status}): {message}")
        return payload["choices"][0]

    def token_log_likelihoods(self, prompts: Sequence[TokenIds], answers: Sequence[TokenIds],
                              adapter_names: Sequence[str]) -> dict[str, list[list[float]]]:
        """adapter name → each answer's token log-probabilities under it: one `/v1/completions` request per
        (query, adapter), ``prompt_logprobs=0``, sent concurrently."""
        jobs = []
        for name in adapter_names:
            for q, (prompt, answer) in enumerate(zip(prompts, answers)):
                jobs.append((name, q, [int(t) for t in prompt], [int(t) for t in prompt] + [int(t) for t in answer]))

        def run(job) -> list[float]:
            name, _, prompt, sequence = job
            choice = self._completion({"model": self.adapters.served_name(name), "prompt": sequence, "max_tokens": 1,
                                       "temperature": 0.0, "prompt_logprobs": 0, "return_token_ids": True})
            entries = [None if e is None else {int(t): float(v["logprob"]) for t, v in e.items()} for e in choice["prompt_logprobs"]]
            return answer_token_log_likelihoods(entries, choice.get("prompt_token_ids") or sequence, len(prompt))

        with ThreadPoolExecutor(max_workers=max(1, min(self.max_concurrency, len(jobs)))) as pool:
            results = list(pool.map(run, jobs))
        values: dict[str, list[list[float]]] = {name: [[] for _ in prompts] for name in adapter_names}
        for (name, q, _, _), value in zip(jobs, results):
            values[name][q] = value
        return values

    def generate(self, prompts: Sequence[Union[str, TokenIds]], max_new_tokens: int) -> list[tuple[list[int], list[int], str]]:
        """Greedy answers under the `base` adapter (θ*), through `/v1/completions`."""
        def run(prompt) -> tuple[list[int], list[int], str]:
            choice = self._completion({"model": self.adapters.served_name(self.base_adapter),
                                       "prompt": prompt if isinstance(prompt, str) else [int(t) for t in prompt],
                                       "max_tokens": int(max_new_tokens), "temperature": 0.0, "return_token_ids": True})
            return list(choice["prompt_token_ids"]), list(choice["token_ids"]), choice.get("text", "")

        with ThreadPoolExecutor(max_workers=max(1, min(self.max_concurrency, len(prompts)))) as pool:
            return list(pool.map(run, prompts))
