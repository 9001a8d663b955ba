"""Realistic run (issue 18): a ≥ 20M-parameter Llama, LoRA on all linear layers, N = 10⁴ documents, compressed build."""
