"""The attribution subspace S (DESIGN §3): which parameter perturbations responses live in.

Three kinds, all described by a `SubspaceSpec` that is stored with an artifact and rebuilds the
same subspace at readout time:

- ``trainable``: the named parameters themselves (all trainable parameters by default); exact, for
  small models.
- ``peft``: the LoRA A and B matrices of a PEFT adapter already on the model.
- ``projection``: a PEFT LoRA adapter injected for attribution only, with frozen seeded Gaussian
  A (scaled by 1/√d_in) and zero B, so the model function is unchanged; the coordinates are the B
  matrices, and the gradient in them is the weight gradient projected on its input side.

Coordinates are flattened into one vector in a fixed parameter order; a flat vector v stands for
the parameters θ* + v.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import warnings
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional, Union

import torch
from torch import nn

from ..errors import SubspaceError
from .config import known_fields

logger = logging.getLogger(__name__)

PROJECTION_ADAPTER_NAME = "fwdattr_projection"
_LORA_MATRICES = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B")


class SubspaceKind(str, Enum):
    """The three ways of choosing the attribution subspace."""

    TRAINABLE = "trainable"
    PEFT = "peft"
    PROJECTION = "projection"


@dataclass
class SubspaceSpec:
    """Data that describes an attribution subspace and re-creates it identically.

    `parameter_names` is filled in when the subspace is built; passing it back selects exactly those
    parameters again (and is checked against the model).
    """

    kind: SubspaceKind = field(default=SubspaceKind.PEFT, metadata={"help": "trainable | peft | projection."})
    parameter_names: list[str] = field(default_factory=list, metadata={"help": "Subspace parameters, in flattening order."})
    adapter_name: Optional[str] = field(
        default=None, metadata={"help": "PEFT adapter to use (peft) or name of the injected adapter (projection)."}
    )
    rank: int = field(default=8, metadata={"help": "Projection adapter rank r."})
    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={"help": "Projection adapter target modules (PEFT syntax); None uses PEFT's default for the architecture."},
    )
    seed: int = field(default=0, metadata={"help": "Seed of the projection adapter's random A matrices."})

    def __post_init__(self) -> None:
        try:
            self.kind = SubspaceKind(self.kind)
        except ValueError as err:
            choices = ", ".join(repr(k.value) for k in SubspaceKind)
            raise SubspaceError(f"`kind` must be one of {choices}, got {self.kind!r}.") from err
        if self.kind is SubspaceKind.PROJECTION:
            if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
                raise SubspaceError(f"`rank` must be an integer >= 1, got {self.rank!r}.")
            if self.adapter_name is None:
                self.adapter_name = PROJECTION_ADAPTER_NAME
        if isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)
        self.parameter_names = list(self.parameter_names)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        data = dataclasses.asdict(self)
        data["kind"] = self.kind.value
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SubspaceSpec":
        """Inverse of `to_dict`; unknown keys are ignored with a warning."""
        return cls(**known_fields(cls, data))


_PEFT_PREFIX = "base_model.model."


def canonical_name(name: str) -> str:
    """A parameter name without PEFT's wrapper prefix, so a `PeftModel` and the same model with the adapter
    loaded by transformers (``from_pretrained`` on a folder holding an adapter) name parameters alike."""
    return name[len(_PEFT_PREFIX):] if name.startswith(_PEFT_PREFIX) else name


def _stable_seed(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % (2**63)


def _hash_tensor(hasher: "hashlib._Hash", tensor: torch.Tensor) -> None:
    tensor = tensor.detach().to("cpu").contiguous().reshape(-1)
    hasher.update(f"{tensor.dtype}:{tuple(tensor.shape)};".encode())
    hasher.update(tensor.view(torch.uint8).numpy().tobytes())


def fingerprint_parameters(named_tensors: list[tuple[str, torch.Tensor]]) -> str:
    """SHA-256 of the values, shapes and dtypes of `named_tensors`, in order (names are not hashed).

    Reads every byte: ~2 minutes for a 7B float32 model. Artifacts use the cheaper `model_fingerprint`; this one
    remains for checks that must see every value (and for artifacts written before `model_fingerprint` existed).
    """
    hasher = hashlib.sha256()
    for _, tensor in named_tensors:
        _hash_tensor(hasher, tensor)
    return hasher.hexdigest()


FINGERPRINT_SCHEME = "sampled-v1"
SAMPLED_VALUES = 1024
"""Values hashed per large frozen tensor by `model_fingerprint`."""
FULLY_HASHED_NUMEL = 65_536
"""Tensors of at most this many elements (norms, biases, small layers) are hashed in full by `model_fingerprint`."""


def _is_adapter_parameter(name: str) -> bool:
    parts = name.split(".")
    return any(part in _LORA_MATRICES or part.startswith("lora_") for part in parts) or "modules_to_save" in parts


def _hash_sample(hasher: "hashlib._Hash", tensor: torch.Tensor, ordinal: int) -> None:
    tensor = tensor.detach()
    hasher.update(f"{tensor.dtype}:{tuple(tensor.shape)};".encode())
    if tensor.device.type == "meta":  # offloaded (accelerate): no values on this device to read
        hasher.update(b"meta;")
        return
    generator = torch.Generator().manual_seed(_stable_seed(ordinal, f"{tensor.numel()}:{tuple(tensor.shape)}"))
    positions = torch.randint(tensor.numel(), (SAMPLED_VALUES,), generator=generator)
    sample = tensor.reshape(-1)[positions.to(tensor.device)].to("cpu").contiguous()
    hasher.update(sample.view(torch.uint8).numpy().tobytes())


def model_fingerprint(model: nn.Module, fully_hashed: Optional[set[str]] = None, exclude_adapter: Optional[str] = None) -> str:
    """A cheap fingerprint of the weights θ*: ``"sampled-v1:"`` + SHA-256 over the parameters in order (names are not hashed).

    Every parameter contributes its dtype and shape. Its values are hashed in full when it is an adapter parameter
    (LoRA A/B, PEFT's `modules_to_save`), when its canonical name is in `fully_hashed` (the subspace parameters of a
    'trainable' subspace), or when it has at most `FULLY_HASHED_NUMEL` elements; of every other (large, frozen) tensor
    a fixed seeded sample of `SAMPLED_VALUES` positions is hashed, read on the tensor's own device. So the cost is that
    of the adapter plus ~1,000 values per weight matrix, whatever the model size, and the result is the same on any
    device, dtype layout or process for the same values.

    What it detects: any change to the adapter or the subspace parameters (a different fine-tune, a single changed
    LoRA value), to any small tensor, to dtypes or shapes, and any change to a large tensor that touches one of its
    sampled positions — a different base model, a merged adapter or a full fine-tune changes essentially every
    value, so it is caught with certainty in practice.

    What it does not detect: a change confined to positions of a large frozen tensor that are not sampled (e.g. a
    handful of edited base weights, or only a few rows of a large embedding retrained: each of n changed values of a
    tensor of N elements escapes with probability (1 − n/N)^1024), and the values of parameters offloaded to the
    meta device by accelerate (their dtype and shape only). Use `fingerprint_parameters` to hash every byte.

    Args:
        model: the model (with its PEFT adapter, if any).
        fully_hashed: canonical names of further parameters to hash in full.
        exclude_adapter: leave out the parameters of this LoRA adapter (the projection adapter of the attribution
            subspace, which is not part of θ*).
    """
    fully_hashed = fully_hashed or set()
    hasher = hashlib.sha256()
    ordinal = 0
    for name, param in model.named_parameters():
        if exclude_adapter is not None and _is_lora_parameter(name, exclude_adapter):
            continue
        if param.numel() <= FULLY_HASHED_NUMEL or _is_adapter_parameter(name) or canonical_name(name) in fully_hashed:
            if param.device.type == "meta":
                _hash_sample(hasher, param, ordinal)
            else:
                _hash_tensor(hasher, param)
        else:
            _hash_sample(hasher, param, ordinal)
        ordinal += 1
    return f"{FINGERPRINT_SCHEME}:{hasher.hexdigest()}"


def _is_lora_parameter(name: str, adapter_name: str) -> bool:
    parts = name.split(".")
    return any(parts[i] in _LORA_MATRICES and parts[i + 1] == adapter_name for i in range(len(parts) - 1))


def find_peft_adapters(model: nn.Module) -> list[str]:
    """Names of the LoRA adapters present on `model` (empty when it has none)."""
    names = set()
    for module in model.modules():
        for attr in ("lora_A", "lora_embedding_A"):
            adapters = getattr(module, attr, None)
            if isinstance(adapters, (nn.ModuleDict, nn.ParameterDict)):
                names.update(adapters.keys())
    return sorted(names)


class AttributionSubspace:
    """A set of model parameters whose perturbations responses and readouts live in.

    Build one with `AttributionSubspace.build(model, spec)`. A flat vector `v` of length `dim`
    stands for the parameters θ* + v; `parameters_at(v)` gives them as a name → tensor dict for
    `torch.func.functional_call`.

    Args:
        model: the model (with its PEFT or projection adapter in place).
        spec: the subspace description, `parameter_names` filled in.
        model_fingerprint: fingerprint of θ* (`model_fingerprint` of all model parameters, projection adapter
            excluded); None computes it when first asked for.
    """

    def __init__(self, model: nn.Module, spec: SubspaceSpec, model_fingerprint: Optional[str] = None, projection_tuner: Any = None):
        self.model = model
        self.spec = spec
        self._model_fingerprint = model_fingerprint
        self._projection_tuner = projection_tuner
        named = dict(model.named_parameters(remove_duplicate=False))
        actual = {canonical_name(n): n for n in named}
        missing = [n for n in spec.parameter_names if n not in actual]
        if missing:
            raise SubspaceError(
                f"The model has no parameters named {missing[:3]} (of {len(missing)} missing) that the subspace "
                "description lists. Use the same model class and adapter the subspace was made with."
            )
        # names as this model spells them (functional_call needs them); the spec keeps canonical ones
        self.names: list[str] = [actual[n] for n in spec.parameter_names]
        self.base: dict[str, torch.Tensor] = {n: named[n].detach() for n in self.names}
        self.shapes = [self.base[n].shape for n in self.names]
        self.numels = [self.base[n].numel() for n in self.names]
        self.dim = sum(self.numels)
        if self.dim == 0:
            raise SubspaceError("The attribution subspace has no parameters (dimension 0).")
        self.fingerprint = self._subspace_fingerprint()

    # ------------------------------------------------------------------ construction
    @classmethod
    def build(cls, model: nn.Module, spec: Optional[Union[SubspaceSpec, dict, str]] = None, **spec_kwargs) -> "AttributionSubspace":
        """Build the subspace described by `spec` on `model`.

        `spec` may be a `SubspaceSpec`, its dict form, a kind string (``"trainable"``, ``"peft"``,
        ``"projection"``), or None: the model's PEFT adapter if it has one, else a projection adapter.
        Keyword arguments fill the remaining `SubspaceSpec` fields. The projection kind injects its
        adapter into `model` in place; `remove()` takes it out again.
        """
        if isinstance(spec, dict):
            spec = SubspaceSpec.from_dict(spec)
        elif isinstance(spec, (str, SubspaceKind)) or spec is None:
            kind = spec if spec is not None else (SubspaceKind.PEFT if find_peft_adapters(model) else SubspaceKind.PROJECTION)
            spec = SubspaceSpec(kind=kind, **spec_kwargs)
        elif spec_kwargs:
            spec = dataclasses.replace(spec, **spec_kwargs)
        spec = dataclasses.replace(spec)  # never mutate the caller's spec

        if spec.kind is SubspaceKind.PROJECTION:
            if any(_is_lora_parameter(n, spec.adapter_name) for n, _ in model.named_parameters()):
                raise SubspaceError(
                    f"The model already carries a projection adapter named {spec.adapter_name!r}; "
                    "call `remove()` on the subspace that injected it before building another."
                )
            tuner = _inject_projection_adapter(model, spec)
            names = [n for n, _ in model.named_parameters() if _is_lora_parameter(n, spec.adapter_name) and ".lora_B." in f".{n}."]
            return cls._checked(model, spec, names, tuner)

        if spec.kind is SubspaceKind.PEFT:
            adapters = find_peft_adapters(model)
            if not adapters:
                raise SubspaceError(
                    "subspace kind 'peft' needs a model with a PEFT LoRA adapter, and this model has none. "
                    "Wrap it with `peft.get_peft_model`, or use kind='projection' (or 'trainable' for a small model)."
                )
            if spec.adapter_name is None:
                active = getattr(model, "active_adapter", None)
                spec.adapter_name = active if isinstance(active, str) and active in adapters else adapters[0]
            if spec.adapter_name not in adapters:
                raise SubspaceError(f"The model has no LoRA adapter named {spec.adapter_name!r}; it has {adapters}.")
            names = [n for n, _ in model.named_parameters() if _is_lora_parameter(n, spec.adapter_name)]
        else:
            names = [n for n, p in model.named_parameters() if p.requires_grad]
        return cls._checked(model, spec, names, None)

    @classmethod
    def _checked(cls, model, spec, names, tuner) -> "AttributionSubspace":
        names = [canonical_name(n) for n in names]
        if spec.parameter_names and spec.parameter_names != names and spec.kind is not SubspaceKind.TRAINABLE:
            raise SubspaceError(
                f"The subspace description lists {len(spec.parameter_names)} parameters, but the model gives "
                f"{len(names)} for kind {spec.kind.value!r} (first difference: "
                f"{next((a, b) for a, b in zip(spec.parameter_names + [None], names + [None]) if a != b)}). "
                "The model's architecture or adapter differs from the one the subspace was made on."
            )
        if not spec.parameter_names:
            if not names:
                raise SubspaceError(
                    f"The model has no trainable parameters in the {spec.kind.value!r} subspace. "
                    "Unfreeze some parameters (requires_grad=True), or pick another subspace kind."
                )
            spec.parameter_names = names
        try:
            return cls(model, spec, None, tuner)
        except Exception:
            if tuner is not None:
                _remove_projection_adapter(model, spec, tuner)
            raise

    @property
    def model_fingerprint(self) -> str:
        """`model_fingerprint` of θ* (the projection adapter left out), computed on first use and kept."""
        if self._model_fingerprint is None:
            self._model_fingerprint = model_fingerprint(self.model, self._fully_hashed(), self._projection_adapter())
        return self._model_fingerprint

    def _fully_hashed(self) -> set[str]:
        return set(self.spec.parameter_names) if self.spec.kind is SubspaceKind.TRAINABLE else set()

    def _projection_adapter(self) -> Optional[str]:
        return self.spec.adapter_name if self.spec.kind is SubspaceKind.PROJECTION else None

    def matches_model_fingerprint(self, recorded: str) -> bool:
        """Whether `recorded` (an artifact's model fingerprint) is this model's: the cheap `model_fingerprint`, or for
        artifacts written before it, the full SHA-256 of every parameter (`fingerprint_parameters`)."""
        if recorded.startswith(f"{FINGERPRINT_SCHEME}:"):
            return recorded == self.model_fingerprint
        adapter = self._projection_adapter()
        named = [(n, p) for n, p in self.model.named_parameters() if adapter is None or not _is_lora_parameter(n, adapter)]
        return recorded == fingerprint_parameters(named)

    def remove(self) -> None:
        """Take the projection adapter out of the model again (no-op for the other kinds)."""
        if self._projection_tuner is not None:
            _remove_projection_adapter(self.model, self.spec, self._projection_tuner)
            self._projection_tuner = None

    def __enter__(self) -> "AttributionSubspace":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    # ------------------------------------------------------------------ coordinates
    def flatten(self, tensors: dict[str, torch.Tensor], dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """Concatenate per-parameter tensors (optionally with leading batch dims) into [..., dim]."""
        first = tensors[self.names[0]]
        lead = first.shape[: first.dim() - len(self.shapes[0])]
        parts = [tensors[n].reshape(*lead, -1) for n in self.names]
        flat = torch.cat(parts, dim=-1)
        return flat if dtype is None else flat.to(dtype)

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split [..., dim] into a name → tensor dict with the parameters' shapes (dtype kept)."""
        if flat.shape[-1] != self.dim:
            raise ValueError(f"Expected vectors of the subspace dimension {self.dim}, got shape {tuple(flat.shape)}.")
        lead = flat.shape[:-1]
        chunks = torch.split(flat, self.numels, dim=-1)
        return {n: c.reshape(*lead, *s) for n, c, s in zip(self.names, chunks, self.shapes)}

    def parameters_at(self, delta: torch.Tensor) -> dict[str, torch.Tensor]:
        """θ* + δ for a flat δ of length `dim`, in each parameter's own dtype and device."""
        parts = self.unflatten(delta)
        # each parameter on its own device: a model placed with device_map spreads them over several
        return {n: self.base[n] + parts[n].to(self.base[n].device, self.base[n].dtype) for n in self.names}

    def base_vector(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """θ* restricted to the subspace, flattened."""
        return self.flatten(self.base, dtype)

    @property
    def device(self) -> torch.device:
        """Device of the subspace parameters."""
        return self.base[self.names[0]].device

    @property
    def parameter_dtype(self) -> torch.dtype:
        """dtype of the (first) subspace parameter."""
        return self.base[self.names[0]].dtype

    def _subspace_fingerprint(self) -> str:
        hasher = hashlib.sha256()
        description = {k: v for k, v in self.spec.to_dict().items()}
        hasher.update(repr(sorted(description.items())).encode())
        hasher.update(repr([tuple(s) for s in self.shapes]).encode())
        if self.spec.kind is SubspaceKind.PROJECTION:
            for name, param in self.model.named_parameters():
                if _is_lora_parameter(name, self.spec.adapter_name) and ".lora_A." in f".{name}.":
                    _hash_tensor(hasher, param)
        return hasher.hexdigest()

    def __repr__(self) -> str:
        return f"AttributionSubspace(kind={self.spec.kind.value!r}, parameters={len(self.names)}, dim={self.dim})"


def _inject_projection_adapter(model: nn.Module, spec: SubspaceSpec):
    from peft import LoraConfig
    from peft.tuners.lora import LoraModel

    requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    had_config = hasattr(model, "peft_config")
    existing = _existing_lora_layers(model)
    merged = [name for name, layer in existing.items() if layer.merged]
    if merged:
        raise SubspaceError(
            f"The model's LoRA adapter is merged into its weights while its LoRA layers remain ({merged[0]}, ...): a projection "
            "adapter on top would be bypassed. Call `model.unmerge_adapter()`, or `model = model.merge_and_unload()`, first."
        )
    active = {name: list(layer.active_adapters) for name, layer in existing.items()}
    lora_config = LoraConfig(
        r=spec.rank,
        lora_alpha=spec.rank,  # scaling = alpha / r = 1: ΔW = B A exactly
        lora_dropout=0.0,
        bias="none",
        target_modules=spec.target_modules,
    )
    try:
        with warnings.catch_warnings():
            # PEFT switches fan_in_fan_out on for GPT-2's Conv1D by itself; the projection needs nothing else.
            warnings.filterwarnings("ignore", message="fan_in_fan_out is set to False")
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            tuner = LoraModel(model, lora_config, spec.adapter_name)
    except ValueError as err:
        raise SubspaceError(
            f"Could not inject the projection adapter: {err}. Pass `target_modules` (PEFT syntax, e.g. "
            "['q_proj', 'v_proj'] or a regex) naming the linear layers to project."
        ) from err
    tuner._fwdattr_requires_grad = requires_grad
    tuner._fwdattr_had_config = had_config
    tuner._fwdattr_active = active
    for name, adapters in active.items():  # the model's own adapters stay on, the projection adds to them
        if adapters:
            model.get_submodule(name).set_adapter(adapters + [spec.adapter_name])
    if spec.target_modules is None:
        spec.target_modules = sorted(lora_config.target_modules)
    elif isinstance(spec.target_modules, set):
        spec.target_modules = sorted(spec.target_modules)
    for module_name, module in model.named_modules():
        for matrix_a, matrix_b in (("lora_A", "lora_B"), ("lora_embedding_A", "lora_embedding_B")):
            container = getattr(module, matrix_a, None)
            if container is None or spec.adapter_name not in container:
                continue
            a = container[spec.adapter_name]
            a_weight = a.weight if isinstance(a, nn.Module) else a
            b = getattr(module, matrix_b)[spec.adapter_name]
            b_weight = b.weight if isinstance(b, nn.Module) else b
            generator = torch.Generator().manual_seed(_stable_seed(spec.seed, module_name))
            fan_in = a_weight.shape[1]
            values = torch.randn(a_weight.shape, generator=generator, dtype=torch.float32) / fan_in**0.5
            with torch.no_grad():
                a_weight.copy_(values.to(a_weight.dtype))
                b_weight.zero_()
            a_weight.requires_grad_(False)
            b_weight.requires_grad_(True)
    for name, param in model.named_parameters():
        if not _is_lora_parameter(name, spec.adapter_name):
            param.requires_grad_(False)
    return tuner


def _existing_lora_layers(model: nn.Module) -> dict[str, Any]:
    from peft.tuners.lora import LoraLayer

    return {name: module for name, module in model.named_modules() if isinstance(module, LoraLayer)}


def _remove_projection_adapter(model: nn.Module, spec: SubspaceSpec, tuner) -> None:
    if not tuner._fwdattr_active:
        tuner.unload()
        if not tuner._fwdattr_had_config and hasattr(model, "peft_config"):
            del model.peft_config
    else:
        # The model has LoRA layers of its own: delete only the projection adapter, unwrap the layers that
        # only it had wrapped, and give the others back their active adapters.
        tuner.delete_adapter(spec.adapter_name)
        for name, layer in _existing_lora_layers(model).items():
            if name in tuner._fwdattr_active:
                layer.set_adapter(tuner._fwdattr_active[name])
            else:
                parent_name, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent_name), child, layer.get_base_layer())
    for name, param in model.named_parameters():
        if name in tuner._fwdattr_requires_grad:
            param.requires_grad_(tuner._fwdattr_requires_grad[name])
