"""The forward-only readout: agreement of the three modes with ∇f_qᵀu, no backward pass, the sign."""

import pytest
import torch
from torch import nn

from hf_fwdattr import (
    AttributionConfig,
    AttributionSubspace,
    ClassificationTask,
    DocumentSet,
    ForwardReadout,
    ReadoutError,
    query_gradients,
    simulate_responses,
)
from hf_fwdattr.demo.toy import tiny_llama

from conftest import VOCAB, BackwardCalled, backward_forbidden, fit, lm_examples, lm_queries, make_lm, noisy_classification

MODES = ["jvp", "central_difference", "one_sided"]
TOLERANCE = {"jvp": 1e-4, "central_difference": 5e-3, "one_sided": 3e-2}  # relative, float32 models
LM_CASES = [("llama", "peft"), ("llama", "projection"), ("gpt2", "peft"), ("gpt2", "projection")]


@pytest.fixture(scope="module")
def lm_responses():
    """Simulated responses for each LM case, shared by the tests of this module."""
    from hf_fwdattr import CausalLMTask

    task = CausalLMTask(pad_token_id=0)
    train = lm_examples(16, seed=2)
    documents = DocumentSet(examples=train[:8], example_document=[i // 2 for i in range(8)], document_ids=list("abcd"))
    cases = {}
    for architecture, adapter in LM_CASES:
        model, kwargs = make_lm(architecture, adapter)
        subspace = AttributionSubspace.build(model, **kwargs)
        result = simulate_responses(subspace, task, documents, train, AttributionConfig(damping=1e-2, horizon=5, batch_size=8))
        cases[(architecture, adapter)] = (subspace, task, result.responses)
    return cases


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", LM_CASES)
def test_modes_agree_with_gradient_dot_response(lm_responses, case, mode):
    subspace, task, responses = lm_responses[case]
    queries = lm_queries(lm_examples(3, seed=7))
    expected = query_gradients(subspace, task, queries) @ responses.T
    scores = ForwardReadout(subspace, task, mode, chunk_size=3).scores(queries, responses)
    assert scores.shape == (3, 4)
    assert (scores - expected).norm() / expected.norm() < TOLERANCE[mode]


@pytest.mark.parametrize("mode", MODES)
def test_modes_are_exact_in_float64(mlp_classifier, classification_task, mode):
    model, examples = mlp_classifier
    subspace = AttributionSubspace.build(model, "trainable")
    documents = DocumentSet.from_examples(examples[:10])
    responses = simulate_responses(subspace, classification_task, documents, examples, AttributionConfig(horizon=10, dtype="float64")).responses
    expected = query_gradients(subspace, classification_task, examples[10:15], dtype=torch.float64) @ responses.T
    scores = ForwardReadout(subspace, classification_task, mode).scores(examples[10:15], responses)
    error = (scores - expected).norm() / expected.norm()
    assert error < {"jvp": 1e-12, "central_difference": 1e-8, "one_sided": 1e-5}[mode]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", [("llama", "peft"), ("llama", "projection")])
def test_readout_runs_no_backward_pass(lm_responses, case, mode):
    subspace, task, responses = lm_responses[case]
    queries = lm_queries(lm_examples(2, seed=8))
    readout = ForwardReadout(subspace, task, mode)
    with backward_forbidden() as saved:
        scores = readout.scores(queries, responses)
    assert saved["count"] == 0, "the readout saved tensors for a backward pass"
    with backward_forbidden(), pytest.raises(BackwardCalled):  # the guard is live: a backward readout is refused
        query_gradients(subspace, task, queries)
    assert torch.isfinite(scores).all() and scores.abs().max() > 0


def test_training_example_is_its_own_strongest_proponent():
    inputs, labels = noisy_classification(n=40, dim=48, classes=3, seed=1)
    torch.manual_seed(1)
    model = fit(nn.Sequential(nn.Linear(48, 16), nn.Tanh(), nn.Linear(16, 3)).double(), inputs, labels, weight_decay=1e-2)
    examples = [(inputs[i], labels[i]) for i in range(len(labels))]
    task = ClassificationTask()
    subspace = AttributionSubspace.build(model, "trainable")
    config = AttributionConfig(damping=1e-2, horizon=100, batch_size=16, dtype="float64")
    responses = simulate_responses(subspace, task, DocumentSet.from_examples(examples), examples, config).responses
    for mode in MODES:
        scores = ForwardReadout(subspace, task, mode).scores(examples, responses)
        assert (scores.diagonal() > 0).all(), "self-influence must be positive (a proponent)"
        assert (scores.argmax(dim=1) == torch.arange(len(examples))).all(), mode


def test_attention_without_forward_ad_is_switched(lm_task):
    """flex_attention has no forward-mode AD; the readout switches to SDPA's math kernel, same outputs."""
    from hf_fwdattr.estimator.functional import differentiable_attention

    reference = tiny_llama(VOCAB)
    model = tiny_llama(VOCAB, attn_implementation="flex_attention")
    assert model.config._attn_implementation == "flex_attention"
    ids = torch.randint(3, VOCAB, (2, 7))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        with differentiable_attention(model):
            during = model(input_ids=ids).logits
    assert model.config._attn_implementation == "flex_attention"
    torch.testing.assert_close(during, before, rtol=1e-5, atol=1e-5)

    queries = lm_queries(lm_examples(2, seed=9))
    train = lm_examples(6, seed=4)
    results = []
    for m in (reference, model):
        with AttributionSubspace.build(m, "projection", rank=2) as subspace:
            responses = simulate_responses(subspace, lm_task, DocumentSet.from_examples(train), train, AttributionConfig(horizon=3, batch_size=6)).responses
            results.append(ForwardReadout(subspace, lm_task, "jvp").scores(queries, responses))
    torch.testing.assert_close(results[1], results[0], rtol=1e-4, atol=1e-6)


def test_streamed_chunks_equal_one_tensor(lm_responses):
    subspace, task, responses = lm_responses[("llama", "peft")]
    queries = lm_queries(lm_examples(2, seed=5))
    readout = ForwardReadout(subspace, task, "jvp", chunk_size=3)
    torch.testing.assert_close(readout.scores(queries, iter([responses[:1], responses[1:]])), readout.scores(queries, responses))


def test_responses_of_another_subspace_are_refused(lm_responses):
    subspace, task, responses = lm_responses[("llama", "peft")]
    with pytest.raises(ReadoutError, match="another subspace"):
        ForwardReadout(subspace, task).scores(lm_queries(lm_examples(1)), responses[:, :-1])


def test_removal_readout_is_the_drop_of_f_when_the_response_is_taken_away(lm_responses):
    """f_q(θ*) − f_q(θ* − u_b), evaluated forward-only; equal to the JVP for a small u_b."""
    from hf_fwdattr.estimator.functional import TaskFunction

    subspace, task, responses = lm_responses[("llama", "peft")]
    queries = lm_queries(lm_examples(3, seed=8))
    large = responses / responses.norm(dim=1, keepdim=True)
    with backward_forbidden() as saved:
        removal = ForwardReadout(subspace, task, "removal").scores(queries, large)
    assert saved["count"] == 0
    measure, batch = TaskFunction(subspace, task.measurement), task.collate(queries)
    with torch.no_grad():
        expected = torch.stack([measure(torch.zeros(subspace.dim), batch) - measure(-u, batch) for u in large], dim=1)
    # f_q(θ*) and f_q(θ* − u) are float32 sums of log-probabilities of size ~10: their difference is exact to ~1e-5
    # (the vmapped and the looped forward round differently; 1e-6 held only by luck of the thread count)
    torch.testing.assert_close(removal, expected, rtol=1e-5, atol=1e-5)
    small = 1e-3 * large
    linear = ForwardReadout(subspace, task, "jvp").scores(queries, small)
    torch.testing.assert_close(ForwardReadout(subspace, task, "removal").scores(queries, small), linear, rtol=0.05, atol=1e-6)
