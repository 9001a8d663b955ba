"""The exact GGN from per-example output Jacobians against the curvature-vector-product GGN, and the horizon filter."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, lm_examples, noisy_classification
from torch import nn

from hf_fwdattr import AttributionSubspace, AttributionTask, CausalLMTask, ClassificationTask, CurvatureOperator
from hf_fwdattr.demo.toy import tiny_gpt2, tiny_llama
from hf_fwdattr.estimator.ggn import exact_ggn


def _matvec_ggn(subspace, task, examples) -> torch.Tensor:
    operator = CurvatureOperator(subspace, task, task.collate(examples), "ggn", torch.float64)
    return operator.matvec(torch.eye(subspace.dim, dtype=torch.float64))


class _GenericClassification(ClassificationTask):
    """A classifier task without the closed-form factors: the default output curvature (autograd Hessian) runs."""

    output_curvature = AttributionTask.output_curvature


@pytest.mark.parametrize("task", [ClassificationTask(), _GenericClassification()], ids=["closed_form_softmax", "autograd_hessian"])
def test_exact_ggn_equals_the_product_ggn_on_an_mlp(task):
    inputs, labels = noisy_classification(n=23, dim=4, classes=3, seed=3)
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    examples = [(inputs[i], labels[i]) for i in range(len(labels))]
    subspace = AttributionSubspace.build(model, "trainable")
    expected = _matvec_ggn(subspace, task, examples)
    torch.testing.assert_close(exact_ggn(subspace, task, examples, batch_size=5), expected, rtol=1e-12, atol=1e-14)


def _lm_with_lora(architecture: str):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    if architecture == "gpt2":  # one layer: the product reference costs p vmapped JVP/VJP pairs through GPT-2 attention
        base, targets = tiny_gpt2(VOCAB, layers=1).double(), ["c_attn", "mlp.c_proj"]
    else:
        base, targets = tiny_llama(VOCAB).double(), ["q_proj", "v_proj", "down_proj"]
    config = LoraConfig(r=2, target_modules=targets, init_lora_weights=False, fan_in_fan_out=architecture == "gpt2")
    return get_peft_model(base, config).eval()


@pytest.mark.parametrize("architecture", ["gpt2", "llama"])
def test_exact_ggn_equals_the_product_ggn_on_a_lora_language_model(architecture):
    model = _lm_with_lora(architecture)
    examples = lm_examples(9, seed=4)
    examples[0]["labels"] = [-100, -100] + examples[0]["input_ids"][2:]  # a prompt that is not scored
    task = CausalLMTask(pad_token_id=0)
    subspace = AttributionSubspace.build(model, "peft")
    expected = _matvec_ggn(subspace, task, examples)
    fast = exact_ggn(subspace, task, examples, batch_size=4)  # other batches, other padding: the same matrix
    # GPT-2 in float64 is float64 throughout: round-off. Llama's RMSNorm computes in float32 whatever the model's dtype
    # (transformers upcasts and casts back), so two differentiation orders of it agree to float32's 1e-7 only.
    tolerance = 1e-12 if architecture == "gpt2" else 1e-6
    torch.testing.assert_close(fast, expected, rtol=tolerance, atol=tolerance * float(expected.abs().max()))
