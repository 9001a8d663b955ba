"""The forward-only readout: agreement of the modes with ∇f_qᵀu on both engines, per-token scores from the same passes,
no backward pass, the sign."""

import contextlib
import weakref

import pytest
import torch
from torch import nn

from hf_fwdattr import (
    AttributionConfig,
    AttributionSubspace,
    ClassificationTask,
    DocumentSet,
    CausalLMTask,
    ForwardReadout,
    ReadoutError,
    query_gradients,
    simulate_responses,
)
from hf_fwdattr.demo.toy import tiny_llama

from conftest import VOCAB, BackwardCalled, backward_forbidden, fit, lm_examples, lm_queries, make_lm, noisy_classification

MODES = ["jvp", "central_difference", "one_sided"]
ENGINES = ["lora_batch", "functional"]
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


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", LM_CASES)
def test_modes_agree_with_gradient_dot_response(lm_responses, case, mode, engine):
    subspace, task, responses = lm_responses[case]
    queries = lm_queries(lm_examples(3, seed=7))
    expected = query_gradients(subspace, task, queries) @ responses.T
    scores = ForwardReadout(subspace, task, mode, chunk_size=3, engine=engine).scores(queries, responses)
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


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", [("llama", "peft"), ("llama", "projection")])
def test_readout_runs_no_backward_pass(lm_responses, case, mode, engine):
    subspace, task, responses = lm_responses[case]
    queries = lm_queries(lm_examples(2, seed=8))
    readout = ForwardReadout(subspace, task, mode, engine=engine)
    with backward_forbidden() as saved:
        scores = readout.scores(queries, responses)
        per_token = readout.token_scores(queries, responses)
        with torch.inference_mode():  # a caller's inference mode (e.g. a pipeline's) changes nothing
            inside = readout.token_scores(queries, responses)
    assert saved["count"] == 0, "the readout saved tensors for a backward pass"
    torch.testing.assert_close(inside.tokens, per_token.tokens)
    assert per_token.tokens.abs().max() > 0
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


# ---------------------------------------------------------------------- the batched LoRA engine and per-token scores
@pytest.mark.parametrize("case", LM_CASES)
def test_batched_lora_jvp_equals_the_functional_jvp(lm_responses, case):
    """The hand-written LoRA tangents plus forward AD give torch.func.jvp's numbers to float32 round-off."""
    subspace, task, responses = lm_responses[case]
    queries = lm_queries(lm_examples(3, seed=11))
    functional = ForwardReadout(subspace, task, "jvp", engine="functional").token_scores(queries, responses)
    batched = ForwardReadout(subspace, task, "jvp", engine="lora_batch").token_scores(queries, responses)
    scale = functional.tokens.abs().max()
    torch.testing.assert_close(batched.tokens, functional.tokens, rtol=1e-5, atol=1e-5 * float(scale))
    torch.testing.assert_close(batched.total, functional.total, rtol=1e-5, atol=1e-5 * float(scale))
    # the tangent attention is switched on for each readout and off after it (the first time through transformers'
    # set_attn_implementation, then by its config attribute): the model's own implementation is left as it was
    model = subspace.model.get_base_model() if hasattr(subspace.model, "get_base_model") else subspace.model
    before = model.config._attn_implementation
    again = ForwardReadout(subspace, task, "jvp", engine="lora_batch").token_scores(queries, responses)
    assert model.config._attn_implementation == before != "fwdattr_tangent_sdpa"
    torch.testing.assert_close(again.tokens, batched.tokens, rtol=0, atol=0)


@pytest.mark.parametrize("case", [("llama", "peft"), ("llama", "projection"), ("gpt2", "peft")])
def test_batched_lora_values_equal_the_model_at_the_perturbed_parameters(lm_responses, case):
    """Each copy of the batch sees θ* + δ_c exactly: the batched values equal functional_call at θ* + δ_c."""
    from hf_fwdattr.estimator.functional import TaskFunction
    from hf_fwdattr.query.lora_batch import LoRABatchEngine

    subspace, task, responses = lm_responses[case]
    queries = lm_queries(lm_examples(2, seed=12))
    batch = task.collate(queries)
    directions = responses / responses.norm(dim=1, keepdim=True)
    scales = torch.tensor([0.0, 0.5, -0.5, 1.0])
    index = torch.tensor([0, 1, 1, 3])
    with backward_forbidden() as saved:
        values = LoRABatchEngine(subspace).values(task.token_measurement, batch, directions, scales, index, rows=2)
    assert saved["count"] == 0
    measure = TaskFunction(subspace, task.token_measurement)
    with torch.no_grad():
        expected = torch.stack([measure(s * directions[i], batch) for s, i in zip(scales, index)])
    torch.testing.assert_close(values, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("mode", MODES)
def test_token_scores_are_the_scores_of_each_token(lm_responses, mode, engine):
    """One pass gives every token's score: they equal the readout of one query per token, and sum to the whole."""
    subspace, task, responses = lm_responses[("llama", "peft")]
    prompt, answer = [5, 9, 11], [20, 31, 7, 44]
    query = CausalLMTask.query_example(prompt, answer)
    readout = ForwardReadout(subspace, task, mode, engine=engine)
    result = readout.token_scores([query], responses)
    assert result.tokens.shape == (1, len(prompt) + len(answer), len(responses))
    assert (result.tokens[0, : len(prompt)] == 0).all(), "prompt tokens are not scored"
    single_tokens = [{"input_ids": prompt + answer[: i + 1], "labels": [-100] * (len(prompt) + i) + [answer[i]]} for i in range(len(answer))]
    one_per_token = readout.scores(single_tokens, responses)
    whole = readout.scores([query], responses)[0]
    scale = float(whole.abs().max())
    tolerance = {"jvp": 1e-5, "central_difference": 2e-3, "one_sided": 3e-2}[mode] * scale
    torch.testing.assert_close(result.tokens[0, len(prompt):], one_per_token, rtol=0, atol=tolerance)
    torch.testing.assert_close(result.total[0], whole, rtol=0, atol=tolerance)
    torch.testing.assert_close(result.total, result.tokens.sum(dim=1))


def test_token_measurement_sums_to_the_measurement(lm_task):
    for architecture in ("llama", "gpt2"):
        model, _ = make_lm(architecture, "peft")
        batch = lm_task.collate(lm_queries(lm_examples(4, seed=13)) + lm_examples(1, seed=14))  # a row scored from token 1
        with torch.no_grad():
            tokens = lm_task.token_measurement(model, batch)
            whole = lm_task.measurement(model, batch)
        assert tokens.shape == batch["input_ids"].shape
        assert (tokens[batch["labels"] == -100] == 0).all()
        torch.testing.assert_close(tokens.sum(dim=1), whole, rtol=1e-5, atol=1e-5)


def test_one_sided_takes_given_base_values(lm_responses):
    """f(θ*) given per token (e.g. from generation's logits) replaces the readout's own copy of the batch."""
    from hf_fwdattr.estimator.functional import TaskFunction

    subspace, task, responses = lm_responses[("llama", "peft")]
    queries = lm_queries(lm_examples(2, seed=15))
    readout = ForwardReadout(subspace, task, "one_sided")
    with torch.no_grad():
        base = TaskFunction(subspace, task.token_measurement)(torch.zeros(subspace.dim), task.collate(queries))
    own = readout.token_scores(queries, responses)
    given = readout.token_scores(queries, responses, base_values=base)
    scale = float(own.total.abs().max())
    torch.testing.assert_close(given.total, own.total, rtol=0, atol=1e-2 * scale)
    shifted = readout.token_scores(queries, responses, base_values=base - 1e-3)  # the base is really used
    assert not torch.allclose(shifted.total, given.total, rtol=0, atol=1e-2 * scale)
    # the JVP and central difference have no use for it
    jvp = ForwardReadout(subspace, task, "jvp")
    torch.testing.assert_close(jvp.token_scores(queries, responses, base_values=base - 1.0).total, jvp.token_scores(queries, responses).total)


def test_engine_choice_and_refusals(lm_responses, mlp_classifier, classification_task):
    subspace, task, responses = lm_responses[("llama", "peft")]
    assert ForwardReadout(subspace, task).engine.value == "lora_batch"
    assert ForwardReadout(subspace, task, vectorize=False).engine.value == "functional"
    model, _ = mlp_classifier
    trainable = AttributionSubspace.build(model, "trainable")
    assert ForwardReadout(trainable, classification_task).engine.value == "functional"
    with pytest.raises(ReadoutError, match="LoRA A or B weight.*engine='functional'"):
        ForwardReadout(trainable, classification_task, engine="lora_batch")
    with pytest.raises(ReadoutError, match="`engine` must be one of"):
        ForwardReadout(subspace, task, engine="fast")
    with pytest.raises(NotImplementedError, match="token_measurement"):
        ForwardReadout(trainable, classification_task).token_scores([(torch.zeros(3, dtype=torch.float64), torch.tensor(0))], torch.ones(2, trainable.dim))


@pytest.mark.parametrize("state", ["disabled", "merged"])
def test_batched_engine_follows_an_adapter_that_is_off(lm_task, state):
    """With the adapter disabled or merged its A/B no longer enter the forward: both engines then read 0."""
    model, kwargs = make_lm("llama", "peft")
    subspace = AttributionSubspace.build(model, **kwargs)
    queries = lm_queries(lm_examples(2, seed=16))
    directions = torch.randn(3, subspace.dim)
    context = model.disable_adapter() if state == "disabled" else contextlib.nullcontext()
    if state == "merged":
        model.merge_adapter()
    with context:
        for mode in ("jvp", "central_difference"):
            for engine in ENGINES:
                scores = ForwardReadout(subspace, lm_task, mode, engine=engine).scores(queries, directions)
                assert scores.abs().max() < 1e-4, (mode, engine)


def _same_version(replacement: torch.Tensor, old: torch.Tensor) -> nn.Parameter:
    """`replacement` as a parameter at `old`'s in-place version: only its identity tells the two apart."""
    while replacement._version < old._version:
        replacement.add_(0.0)
    return nn.Parameter(replacement)


def test_one_readout_kept_for_the_next_query_follows_every_change(lm_task):
    """The batched JVP keeps its layer maps from one readout to the next while the directions and the weights stay the
    same: reading other queries reuses them; directions changed in place, a LoRA weight changed in place, a replaced
    base weight, a replaced output head and an adapter switched off are each followed (equal to a readout that starts
    afresh); directions the caller drops are not kept alive."""
    model, kwargs = make_lm("llama", "peft")
    subspace = AttributionSubspace.build(model, **kwargs)
    queries, others = lm_queries(lm_examples(2, seed=31)), lm_queries(lm_examples(2, seed=32))
    directions = torch.randn(3, subspace.dim, generator=torch.Generator().manual_seed(1))
    kept = ForwardReadout(subspace, lm_task, "jvp", engine="lora_batch")
    engine = kept._engine

    def afresh():
        return ForwardReadout(subspace, lm_task, "jvp", engine="functional").scores(queries, directions)

    def agrees():
        expected = afresh()
        torch.testing.assert_close(kept.scores(queries, directions), expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))

    agrees()
    maps = engine._patches[1]
    kept.scores(others, directions)
    assert engine._patches[1] is maps, "other queries, the same directions and weights: the maps are reused"
    directions.mul_(-2.0)  # in place
    agrees()
    layer = engine.layers[0]
    with torch.no_grad():
        layer.module.lora_B[layer.adapter].weight.add_(0.5)  # in place
        agrees()
        base = layer.module.get_base_layer()
        base.weight = _same_version(base.weight + 0.25, base.weight)
        agrees()
        head = model.get_output_embeddings()  # a plain linear layer outside the subspace, replaced the same way
        head.weight = _same_version(head.weight * 1.5, head.weight)
        agrees()
    with model.disable_adapter():
        assert kept.scores(queries, directions).abs().max() < 1e-4
    # the engine only watches the directions: a tensor the caller drops is freed (its memory could then hold others)
    dropped = torch.randn(3, subspace.dim)
    kept.scores(queries, dropped)
    watch = weakref.ref(dropped)
    del dropped
    assert watch() is None


# ---------------------------------------------------------------------- layers that carry their tangents by hand
@pytest.mark.parametrize("masking", ["causal", "boolean", "additive", "per_head"])
def test_hand_written_attention_tangent_equals_forward_ad(masking):
    """Attention's tangent written out equals forward AD through SDPA's math kernel: grouped heads, padding, a query row
    with no key to attend to, a mask of its own for each query head."""
    import torch.autograd.forward_ad as forward_ad
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from hf_fwdattr.query.tangent_layers import tangent_attention

    generator = torch.Generator().manual_seed(0)
    batch, heads, kv_heads, length, width = 2, 4, 2, 5, 8
    q, q_t = (torch.randn(batch, heads, length, width, generator=generator) for _ in range(2))
    k, k_t, v, v_t = (torch.randn(batch, kv_heads, length, width, generator=generator) for _ in range(4))
    allowed = torch.ones(length, length, dtype=torch.bool).tril().expand(batch, 1, length, length).clone()
    allowed[1, :, :, :2] = False  # the second row is left-padded by two tokens: its first query sees no key
    per_head = allowed.repeat(1, heads, 1, 1)
    per_head[0, 1, :, 0] = False  # head 1 (the second query head of key/value head 0) of the first row never sees key 0
    per_head[0, 2, 3:, 1] = False
    mask = {"causal": None, "boolean": allowed, "additive": torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf")),
            "per_head": per_head}[masking]
    module = nn.Module()
    module.num_key_value_groups, module.is_causal = heads // kv_heads, True
    with torch.no_grad(), forward_ad.dual_level():
        duals = [forward_ad.make_dual(p, t) for p, t in ((q, q_t), (k, k_t), (v, v_t))]
        out, _ = tangent_attention(module, *duals, mask, scaling=0.3)
        out, tangent = forward_ad.unpack_dual(out)
        expanded = [duals[0]] + [d.repeat_interleave(2, dim=1) for d in duals[1:]]
        with sdpa_kernel(SDPBackend.MATH):
            reference = F.scaled_dot_product_attention(*expanded, attn_mask=mask, is_causal=mask is None, scale=0.3)
        reference, reference_tangent = forward_ad.unpack_dual(reference.transpose(1, 2))
    finite = torch.isfinite(reference)  # SDPA gives NaN for a query with no key; the hand-written one gives 0
    assert not torch.isnan(out).any() and not torch.isnan(tangent).any()
    torch.testing.assert_close(out[finite], reference[finite], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(tangent[finite], reference_tangent[finite], rtol=1e-5, atol=1e-5)


def test_rms_norms_are_recognised_by_what_they_compute():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from hf_fwdattr.query.tangent_layers import rms_norm_epsilon

    norm = LlamaRMSNorm(8, eps=1e-5)
    assert rms_norm_epsilon(norm) == 1e-5

    class OnePlusWeight(LlamaRMSNorm):  # Gemma's variant scales by (1 + w): not the formula, left to forward AD
        def forward(self, x):
            return super().forward(x) / self.weight * (1 + self.weight)

    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        other = OnePlusWeight(8, eps=1e-5)
        other.weight.copy_(norm.weight)
    assert rms_norm_epsilon(other) is None
    assert rms_norm_epsilon(nn.LayerNorm(8)) is None and rms_norm_epsilon(nn.LayerNorm(8, bias=False)) is None


def test_batched_engine_on_a_projection_next_to_the_models_own_adapter(lm_task):
    """A projection subspace on a model that has its own LoRA adapter: both adapters run in the same layers, and the
    batched engine reads what the functional one reads (JVP to round-off; a central difference to its precision)."""
    model, _ = make_lm("llama", "peft")
    queries = lm_queries(lm_examples(3, seed=17))
    with AttributionSubspace.build(model, "projection", rank=2) as subspace:
        directions = torch.randn(4, subspace.dim, generator=torch.Generator().manual_seed(0))
        for mode, tolerance in (("jvp", 1e-5), ("central_difference", 3e-3)):
            batched = ForwardReadout(subspace, lm_task, mode, engine="lora_batch").scores(queries, directions)
            functional = ForwardReadout(subspace, lm_task, mode, engine="functional").scores(queries, directions)
            assert (batched - functional).norm() / functional.norm() < tolerance, mode


# ---------------------------------------------------------------------- the Llama decoder stack written out whole
@pytest.mark.parametrize("case", [("llama", "peft"), ("llama", "projection")])
def test_llama_decoder_stack_carries_its_tangents_by_hand(lm_responses, case, monkeypatch):
    """A Llama's decoder stack runs as one hand-written (primal, tangents) forward, every layer of it, and gives
    torch.func.jvp's numbers on a padded batch with grouped-query attention."""
    import hf_fwdattr.query.tangent_llama as tangent_llama

    calls = []
    layer = tangent_llama._layer
    monkeypatch.setattr(tangent_llama, "_layer", lambda *args: calls.append(1) or layer(*args))
    subspace, task, responses = lm_responses[case]
    queries = lm_queries(lm_examples(3, seed=21))
    assert len({len(query["input_ids"]) for query in queries}) > 1, "the batch must be padded"
    with backward_forbidden() as saved:
        batched = ForwardReadout(subspace, task, "jvp", engine="lora_batch").token_scores(queries, responses)
    assert saved["count"] == 0
    assert len(calls) == 2, "both decoder layers of the tiny Llama, once each, in one readout"
    functional = ForwardReadout(subspace, task, "jvp", engine="functional").token_scores(queries, responses)
    scale = float(functional.tokens.abs().max())
    torch.testing.assert_close(batched.tokens, functional.tokens, rtol=1e-5, atol=1e-5 * scale)


def test_a_llama_the_stack_does_not_write_out_keeps_the_layer_by_layer_path(lm_task, monkeypatch):
    """A Llama with another activation is not written out whole (only SiLU is): the layer-by-layer tangents run, and
    are exact too."""
    from peft import LoraConfig, get_peft_model

    import hf_fwdattr.query.tangent_llama as tangent_llama

    calls = []
    layer = tangent_llama._layer
    monkeypatch.setattr(tangent_llama, "_layer", lambda *args: calls.append(1) or layer(*args))
    model = get_peft_model(tiny_llama(VOCAB, hidden_act="gelu"), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)).eval()
    subspace = AttributionSubspace.build(model, spec="peft")
    assert tangent_llama.llama_stack_plan(model) is None
    queries = lm_queries(lm_examples(2, seed=22))
    directions = torch.randn(3, subspace.dim, generator=torch.Generator().manual_seed(0))
    batched = ForwardReadout(subspace, lm_task, "jvp", engine="lora_batch").scores(queries, directions)
    assert not calls
    functional = ForwardReadout(subspace, lm_task, "jvp", engine="functional").scores(queries, directions)
    torch.testing.assert_close(batched, functional, rtol=1e-5, atol=1e-5 * float(functional.abs().max()))
