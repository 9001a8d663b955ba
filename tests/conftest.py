"""Shared fixtures: tiny models built from configs, synthetic data, and a guard that forbids backward passes."""

from __future__ import annotations

import contextlib
import os

import pytest
import torch

# One torch thread per test process (and per process a test starts, through the environment): on this 2-core machine
# torch's 2-thread kernels slow down 10-25x while another process keeps a core busy (a 4-minute suite took 48).
# OMP_NUM_THREADS set by the caller wins, for a run that is about threads.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", os.environ["OMP_NUM_THREADS"])
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
from torch import nn

from hf_fwdattr import CausalLMTask, ClassificationTask
from hf_fwdattr.demo.toy import tiny_gpt2, tiny_llama

VOCAB = 64


@pytest.fixture(scope="session", autouse=True)
def repository_untouched():
    """Fail the session if any test wrote inside the repository (tests write under pytest's tmp_path only)."""
    from repository import changes, snapshot

    before = snapshot()
    yield
    written = changes(before, snapshot())
    if written:
        pytest.fail("Tests wrote inside the repository (use tmp_path):\n" + "\n".join(written[:20]), pytrace=False)


class BackwardCalled(AssertionError):
    pass


@contextlib.contextmanager
def backward_forbidden():
    """Make every autograd backward/grad entry point raise, and count tensors saved for backward."""
    import torch.autograd
    import torch.autograd.graph
    from torch.autograd.variable import Variable

    def refuse(*args, **kwargs):
        raise BackwardCalled("a backward pass ran")

    class _Engine:
        def run_backward(self, *args, **kwargs):
            refuse()

        def __getattr__(self, name):
            return getattr(original_engine, name)

    original_engine = Variable._execution_engine
    patched = [
        (torch.Tensor, "backward"),
        (torch.autograd, "backward"),
        (torch.autograd, "grad"),
        (torch.autograd.graph, "_engine_run_backward"),
    ]
    originals = [(obj, name, getattr(obj, name)) for obj, name in patched]
    saved = {"count": 0}

    def pack(tensor):
        saved["count"] += 1
        return tensor

    try:
        for obj, name in patched:
            setattr(obj, name, refuse)
        Variable._execution_engine = _Engine()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield saved
    finally:
        for obj, name, value in originals:
            setattr(obj, name, value)
        Variable._execution_engine = original_engine


def lm_examples(n: int, seed: int = 0, min_len: int = 4, max_len: int = 12) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(min_len, max_len, (1,), generator=generator))
        out.append({"input_ids": torch.randint(3, VOCAB, (length,), generator=generator).tolist()})
    return out


def lm_queries(examples: list[dict]) -> list[dict]:
    return [CausalLMTask.query_example(e["input_ids"][:3], e["input_ids"][3:]) for e in examples]


def make_lm(architecture: str, adapter: str):
    """(model, subspace kwargs) for a tiny causal LM with a PEFT LoRA adapter or for the projection adapter."""
    from peft import LoraConfig, get_peft_model

    base = tiny_llama(VOCAB) if architecture == "llama" else tiny_gpt2(VOCAB)
    if adapter == "peft":
        targets = ["q_proj", "v_proj"] if architecture == "llama" else ["c_attn"]
        model = get_peft_model(base, LoraConfig(r=4, target_modules=targets, init_lora_weights=False, fan_in_fan_out=architecture == "gpt2")).eval()
        return model, {"spec": "peft"}
    return base, {"spec": "projection", "rank": 4}


@pytest.fixture
def lm_task():
    return CausalLMTask(pad_token_id=0)


def noisy_classification(n: int = 120, dim: int = 3, classes: int = 3, seed: int = 0, dtype=torch.float64):
    """Inputs and labels drawn from a softmax model: no classifier separates them, so losses stay finite."""
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(n, dim, generator=generator, dtype=dtype)
    weights = torch.randn(dim, classes, generator=generator, dtype=dtype)
    labels = torch.multinomial(torch.softmax(inputs @ weights, dim=1), 1, generator=generator).squeeze(1)
    return inputs, labels


def fit(model: nn.Module, inputs, labels, weight_decay: float = 0.0, adam_steps: int = 300) -> nn.Module:
    """Train to a stationary point of the mean cross-entropy (+ weight decay): Adam, then L-BFGS."""
    def objective():
        loss = nn.functional.cross_entropy(model(inputs), labels)
        return loss + weight_decay * sum((p**2).sum() for p in model.parameters())

    adam = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(adam_steps):
        adam.zero_grad()
        objective().backward()
        adam.step()
    lbfgs = torch.optim.LBFGS(model.parameters(), max_iter=500, tolerance_grad=1e-13, tolerance_change=1e-16, line_search_fn="strong_wolfe")

    def closure():
        lbfgs.zero_grad()
        loss = objective()
        loss.backward()
        return loss

    for _ in range(3):
        lbfgs.step(closure)
    return model.eval()


def newton_polish(model: nn.Module, inputs, labels, steps: int = 8, weight_decay: float = 0.0) -> nn.Module:
    """A few exact Newton steps on the mean cross-entropy (+ (weight_decay/2)‖θ‖²): the gradient reaches float64 rounding."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]

    def loss_of(flat):
        params, offset = {}, 0
        for name, shape in zip(names, shapes):
            params[name] = flat[offset : offset + shape.numel()].reshape(shape)
            offset += shape.numel()
        return nn.functional.cross_entropy(torch.func.functional_call(model, params, (inputs,)), labels) + 0.5 * weight_decay * (flat**2).sum()

    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    for _ in range(steps):
        gradient = torch.autograd.functional.jacobian(loss_of, flat)
        hessian = torch.autograd.functional.hessian(loss_of, flat)
        flat = flat - torch.linalg.pinv(hessian, rtol=1e-10, hermitian=True) @ gradient
    with torch.no_grad():
        offset = 0
        for param in model.parameters():
            param.copy_(flat[offset : offset + param.numel()].reshape(param.shape))
            offset += param.numel()
    return model


@pytest.fixture(scope="session")
def softmax_regression():
    """(model, examples): a linear softmax classifier at an exact stationary point of its training loss."""
    inputs, labels = noisy_classification()
    torch.manual_seed(0)
    model = newton_polish(fit(nn.Linear(3, 3).double(), inputs, labels), inputs, labels)
    return model, [(inputs[i], labels[i]) for i in range(len(labels))]


@pytest.fixture(scope="session")
def mlp_classifier():
    """(model, examples): a small tanh MLP trained with weight decay (float64)."""
    inputs, labels = noisy_classification(n=60, dim=4, classes=3, seed=1)
    torch.manual_seed(1)
    model = fit(nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double(), inputs, labels, weight_decay=1e-3)
    return model, [(inputs[i], labels[i]) for i in range(len(labels))]


@pytest.fixture
def classification_task():
    return ClassificationTask()


SMALL_FACT_CORPUS = dict(n_entities=6, relations_per_entity=2, n_filler=6, n_distractors=3, pretraining_entities=12)


@pytest.fixture(scope="session")
def fact_model(tmp_path_factory):
    """What `hf-fwdattr demo` leaves, on a smaller corpus: a folder with model/ (base + adapter + tokenizer) and
    influence/, plus the in-memory corpus, tokenizer, model and artifact. Its basis is EK-FAC, not the default low-rank
    one (p = 16,384 > explicit_max_dim): the tests using it are about the artifact, CLI and pipeline, and it builds in
    seconds instead of minutes."""
    from hf_fwdattr import AttributionConfig
    from hf_fwdattr.demo.run import train_fact_model

    directory = tmp_path_factory.mktemp("fact_demo")
    made = train_fact_model(directory, corpus_kwargs=SMALL_FACT_CORPUS, pretrain_epochs=30, finetune_epochs=30,
                            config=AttributionConfig(damping=1e-3, horizon=20, batch_size=8, eigenbasis="kronecker"))
    return {**made, "directory": directory}
