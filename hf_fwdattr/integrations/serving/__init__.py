"""Attribution where the model is served: an artifact's directions as PEFT LoRA adapters (`export`, `adapter_set`),
read out by vLLM in process (`engine`) or by a client of a running `vllm serve` (`client`)."""
