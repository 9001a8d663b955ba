import pytest
import torch

from hf_fwdattr import AttributionSubspace, CausalLMTask, DocumentSet, document_gradients, example_gradients

from conftest import lm_examples, make_lm


def _autograd_gradient(subspace, task, examples):
    """Reference: plain autograd on the model's own parameters, summed loss of `examples`."""
    named = dict(subspace.model.named_parameters())
    params = [named[n] for n in subspace.names]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    loss = task.train_loss(subspace.model, task.collate(examples)).sum()
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    for p, flag in zip(params, flags):
        p.requires_grad_(flag)
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(grads, params)])


CASES = [("llama", "peft"), ("llama", "projection"), ("gpt2", "peft"), ("gpt2", "projection")]


@pytest.mark.parametrize("architecture, adapter", CASES)
def test_linear_hooks_match_per_example_backward(architecture, adapter, lm_task):
    model, kwargs = make_lm(architecture, adapter)
    with AttributionSubspace.build(model, **kwargs) as subspace:
        examples = lm_examples(5)
        hooked = example_gradients(subspace, lm_task.train_loss, lm_task.collate, examples, method="linear_hooks")
        looped = example_gradients(subspace, lm_task.train_loss, lm_task.collate, examples, method="loop")
        torch.testing.assert_close(hooked, looped, rtol=1e-4, atol=1e-6)
        reference = torch.stack([_autograd_gradient(subspace, lm_task, [e]) for e in examples])
        torch.testing.assert_close(hooked, reference, rtol=1e-4, atol=1e-6)
        assert hooked.norm(dim=1).min() > 0


def test_trainable_subspace_of_an_lm_uses_the_loop(lm_task):
    from hf_fwdattr.estimator.gradients import GradientMethod, resolve_gradient_method
    from hf_fwdattr.demo.toy import tiny_llama

    model = tiny_llama(64, hidden_size=16, layers=1)
    subspace = AttributionSubspace.build(model, "trainable")
    assert resolve_gradient_method(subspace) is GradientMethod.LOOP  # embeddings and norms are not nn.Linear
    examples = lm_examples(2)
    torch.testing.assert_close(
        example_gradients(subspace, lm_task.train_loss, lm_task.collate, examples)[1],
        _autograd_gradient(subspace, lm_task, examples[1:]),
    )


def test_chunked_document_is_the_sum_of_its_chunks(lm_task):
    model, kwargs = make_lm("llama", "peft")
    subspace = AttributionSubspace.build(model, **kwargs)
    chunks = lm_examples(7, seed=3)
    documents = DocumentSet(examples=chunks, example_document=[0, 1, 0, 2, 1, 0, 2], document_ids=["a", "b", "c"])
    gradients = document_gradients(subspace, lm_task, documents, batch_size=3)
    for row, members in enumerate([[0, 2, 5], [1, 4], [3, 6]]):
        expected = _autograd_gradient(subspace, lm_task, [chunks[i] for i in members])
        torch.testing.assert_close(gradients[row], expected, rtol=1e-4, atol=1e-6)
    only = document_gradients(subspace, lm_task, documents, indices=[2, 0])
    torch.testing.assert_close(only, gradients[[2, 0]], rtol=1e-4, atol=1e-6)


def test_padding_is_never_scored():
    task = CausalLMTask(pad_token_id=5)
    batch = task.collate([{"input_ids": [7, 8, 9]}, {"input_ids": [7, 8, 9, 10, 11]}])
    assert batch["input_ids"][0].tolist() == [7, 8, 9, 5, 5]
    assert batch["labels"][0].tolist() == [7, 8, 9, -100, -100]
    assert batch["attention_mask"][0].tolist() == [1, 1, 1, 0, 0]
