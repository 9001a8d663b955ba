import pytest
import torch
from torch import nn

from hf_fwdattr import AttributionSubspace, SubspaceError, SubspaceKind, SubspaceSpec
from hf_fwdattr.demo.toy import tiny_gpt2, tiny_llama

from conftest import VOCAB, make_lm


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
def test_projection_adapter_leaves_outputs_unchanged(build):
    model = build(VOCAB)
    ids = torch.randint(3, VOCAB, (2, 9))
    before = _logits(model, ids)
    names_before = [n for n, _ in model.named_parameters()]
    with AttributionSubspace.build(model, "projection", rank=4) as subspace:
        assert subspace.spec.kind is SubspaceKind.PROJECTION
        assert all(".lora_B." in n for n in subspace.names)
        torch.testing.assert_close(_logits(model, ids), before, rtol=0, atol=0)
        # the perturbation is literally ΔW = B A: moving B changes the outputs
        params = subspace.parameters_at(torch.full((subspace.dim,), 0.1))
        moved = torch.func.functional_call(model, params, (), {"input_ids": ids}).logits
        assert (moved - before).abs().max() > 1e-3
    assert [n for n, _ in model.named_parameters()] == names_before
    assert not hasattr(model, "peft_config")
    torch.testing.assert_close(_logits(model, ids), before, rtol=0, atol=0)


def test_projection_a_is_seeded_gaussian_scaled_by_fan_in():
    model = tiny_llama(VOCAB, hidden_size=64)
    with AttributionSubspace.build(model, "projection", rank=8, target_modules=["q_proj"]) as subspace:
        a = model.model.layers[0].self_attn.q_proj.lora_A[subspace.spec.adapter_name].weight
        assert not a.requires_grad
        assert abs(a.std().item() * 64**0.5 - 1.0) < 0.15
        assert subspace.spec.target_modules == ["q_proj"]


def test_same_description_rebuilds_the_same_subspace():
    model = tiny_llama(VOCAB)
    subspace = AttributionSubspace.build(model, "projection", rank=4, seed=3)
    spec, fingerprint, model_fingerprint = subspace.spec.to_dict(), subspace.fingerprint, subspace.model_fingerprint
    a_first = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_A" in n}
    subspace.remove()

    fresh = tiny_llama(VOCAB)  # same seed, same weights
    rebuilt = AttributionSubspace.build(fresh, SubspaceSpec.from_dict(spec))
    assert rebuilt.fingerprint == fingerprint
    assert rebuilt.model_fingerprint == model_fingerprint
    assert rebuilt.names == spec["parameter_names"]
    for name, value in a_first.items():
        torch.testing.assert_close(dict(fresh.named_parameters())[name], value, rtol=0, atol=0)
    rebuilt.remove()

    other_seed = AttributionSubspace.build(fresh, "projection", rank=4, seed=4)
    assert other_seed.fingerprint != fingerprint
    other_seed.remove()
    changed = tiny_llama(VOCAB, seed=1)
    assert AttributionSubspace.build(changed, SubspaceSpec.from_dict(spec)).model_fingerprint != model_fingerprint


def test_peft_subspace_is_the_adapter():
    model, _ = make_lm("llama", "peft")
    subspace = AttributionSubspace.build(model)
    assert subspace.spec.kind is SubspaceKind.PEFT and subspace.spec.adapter_name == "default"
    assert subspace.names and all(("lora_A" in n or "lora_B" in n) for n in subspace.names)
    assert subspace.dim == sum(p.numel() for p in model.parameters() if p.requires_grad)
    again = AttributionSubspace.build(model, SubspaceSpec.from_dict(subspace.spec.to_dict()))
    assert again.fingerprint == subspace.fingerprint and again.model_fingerprint == subspace.model_fingerprint


def test_flatten_unflatten_round_trip():
    model, _ = make_lm("gpt2", "peft")
    subspace = AttributionSubspace.build(model)
    vectors = torch.randn(3, subspace.dim)
    parts = subspace.unflatten(vectors)
    assert [parts[n].shape[1:] for n in subspace.names] == list(subspace.shapes)
    torch.testing.assert_close(subspace.flatten(parts), vectors)
    torch.testing.assert_close(subspace.parameters_at(torch.zeros(subspace.dim))[subspace.names[0]], subspace.base[subspace.names[0]])
    with pytest.raises(ValueError, match="subspace dimension"):
        subspace.unflatten(torch.zeros(subspace.dim + 1))


def test_no_trainable_parameters_is_refused():
    model = nn.Sequential(nn.Linear(3, 2))
    model.requires_grad_(False)
    with pytest.raises(SubspaceError, match="no trainable parameters"):
        AttributionSubspace.build(model, "trainable")


def test_peft_kind_without_adapter_is_refused():
    with pytest.raises(SubspaceError, match="no adapter|has none"):
        AttributionSubspace.build(tiny_llama(VOCAB), "peft")


def test_projection_on_unknown_architecture_asks_for_targets():
    with pytest.raises(SubspaceError, match="target_modules"):
        AttributionSubspace.build(nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)), "projection")
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    with AttributionSubspace.build(model, "projection", rank=2, target_modules=["0", "2"]) as subspace:
        assert subspace.dim == 4 * 2 + 2 * 2


def test_projection_targets_that_match_nothing_are_refused():
    with pytest.raises(SubspaceError):
        AttributionSubspace.build(tiny_llama(VOCAB), "projection", target_modules=["no_such_layer"])


def test_description_from_another_model_is_refused():
    spec = AttributionSubspace.build(make_lm("llama", "peft")[0]).spec
    with pytest.raises(SubspaceError, match="differs from the one"):
        AttributionSubspace.build(make_lm("gpt2", "peft")[0], SubspaceSpec.from_dict(spec.to_dict()))
