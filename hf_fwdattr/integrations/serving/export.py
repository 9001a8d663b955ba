"""Directions of an influence artifact as standard PEFT LoRA adapters for θ* ± εû (DESIGN §5).

A perturbation of a LoRA-shaped attribution subspace is itself a LoRA update, so a multi-LoRA inference
server can evaluate f_q(θ* ± εû) like any user's adapter:

- ``peft`` subspace: the user's adapter with its A and B moved along û (same config: rank, lora_alpha,
  rsLoRA, fan_in_fan_out, target modules);
- ``projection`` subspace: a rank-r adapter with the frozen seeded A and B = ±εû_B (scaling 1);
- ``projection`` on a model that keeps its own unmerged LoRA adapter: one adapter of rank r1 + r2 per
  module, A = [A_user; A_proj] and B = [s_user·B_user, B_proj] (each part's scaling folded into its B, so
  the concatenation has scaling 1);
- ``trainable`` subspace over exactly one adapter's LoRA matrices: as ``peft``. Over anything else it has
  no adapter form, and `AdapterExportError` says what to change.

Loading an exported folder with PEFT (`PeftModel.from_pretrained(base, folder)`) gives f_q(θ* ± εû) of the
library's readout to float32 round-off (tested).
"""

from __future__ import annotations

import copy
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from safetensors.torch import save_file
from torch import nn

from ...errors import AdapterExportError
from ...estimator.config import ReadoutMode, Solver
from ...estimator.subspace import AttributionSubspace, SubspaceKind, canonical_name, find_peft_adapters
from ...query.readout import default_epsilon
from ...storage.artifact import InfluenceArtifact
from .adapter_set import BASE_ADAPTER, AdapterSet, DifferenceMode, DirectionKind

logger = logging.getLogger(__name__)

PEFT_PREFIX = "base_model.model."
_MATRICES = {"lora_A": "lora_B", "lora_embedding_A": "lora_embedding_B"}


@dataclass
class _Part:
    """One adapter's LoRA matrices at one module: parameter names (canonical) and its scaling there."""

    a_name: str
    b_name: str
    scaling: float
    rank: int
    embedding: bool


class LoraLayout:
    """How the parameters θ* + δ of a subspace become the tensors of one PEFT LoRA adapter.

    Args:
        subspace: the attribution subspace (bound to its model).
        adapters: the model's adapters the exported adapter consists of, in concatenation order.
        config: the PEFT `LoraConfig` to save with the adapter.
    """

    def __init__(self, subspace: AttributionSubspace, adapters: list[str], config):
        self.subspace = subspace
        self.adapters = adapters
        self.config = config
        self.concatenated = len(adapters) > 1
        self.parts: dict[str, dict[str, _Part]] = _lora_parts(subspace.model, adapters)
        if not self.parts:
            raise AdapterExportError(f"The model has no LoRA layers of the adapters {adapters}; nothing to export.")
        self.ranks = {a: max(p[a].rank for p in self.parts.values() if a in p) for a in adapters}
        self.rank = sum(self.ranks.values())
        if self.concatenated and any(p.embedding for module in self.parts.values() for p in module.values()):
            raise AdapterExportError(
                "Concatenating the model's adapter with the projection adapter works for linear layers only; one of them "
                "adapts an embedding. Build the projection with target_modules that leave the embeddings out."
            )
        names = dict(subspace.model.named_parameters(remove_duplicate=False))
        self._model_params = {canonical_name(n): p.detach() for n, p in names.items()}
        self._subspace_index = {canonical_name(n): n for n in subspace.names}

    @property
    def target_modules(self) -> list[str]:
        """Module-name suffixes the adapter touches."""
        return sorted({module.rsplit(".", 1)[-1] for module in self.parts})

    def state_dict(self, delta: torch.Tensor) -> dict[str, torch.Tensor]:
        """The adapter's tensors (PEFT's saved names) at θ* + δ, δ a flat subspace vector."""
        moved = self.subspace.parameters_at(delta)

        def value(name: str) -> torch.Tensor:
            if name in self._subspace_index:
                return moved[self._subspace_index[name]]
            return self._model_params[name]

        state = {}
        for module, parts in self.parts.items():
            key = PEFT_PREFIX + module
            if not self.concatenated:
                (part,) = parts.values()
                a_key, b_key = ("lora_embedding_A", "lora_embedding_B") if part.embedding else ("lora_A.weight", "lora_B.weight")
                state[f"{key}.{a_key}"] = value(part.a_name).cpu().contiguous()
                state[f"{key}.{b_key}"] = value(part.b_name).cpu().contiguous()
                continue
            a_blocks, b_blocks = [], []
            reference = next(iter(parts.values()))
            d_out, d_in = value(reference.b_name).shape[0], value(reference.a_name).shape[1]
            like = {"dtype": value(reference.a_name).dtype, "device": value(reference.a_name).device}
            for adapter in self.adapters:
                used = 0
                if adapter in parts:
                    part = parts[adapter]
                    a_blocks.append(value(part.a_name))
                    b_blocks.append(value(part.b_name) * part.scaling)  # scaling folded in: the concatenation has scaling 1
                    used = part.rank
                pad = self.ranks[adapter] - used  # modules an adapter skips (or adapts at a lower rank) get zeros
                if pad:
                    a_blocks.append(torch.zeros(pad, d_in, **like))
                    b_blocks.append(torch.zeros(d_out, pad, **like))
            state[f"{key}.lora_A.weight"] = torch.cat(a_blocks, dim=0).cpu().contiguous()
            state[f"{key}.lora_B.weight"] = torch.cat(b_blocks, dim=1).cpu().contiguous()
        return state

    def save(self, directory: Path, delta: torch.Tensor, base_model_name_or_path: Optional[str]) -> None:
        """Write adapter_config.json and adapter_model.safetensors for θ* + δ into `directory`."""
        directory.mkdir(parents=True, exist_ok=True)
        config = copy.deepcopy(self.config)
        config.base_model_name_or_path = base_model_name_or_path
        config.inference_mode = True
        config.save_pretrained(str(directory))
        save_file(self.state_dict(delta), str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})


def _lora_parts(model: nn.Module, adapters: list[str]) -> dict[str, dict[str, _Part]]:
    """module (canonical name) → adapter → its LoRA matrices there, for every LoRA layer of `adapters`."""
    from peft.tuners.lora import LoraLayer

    parts: dict[str, dict[str, _Part]] = {}
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        module_name = canonical_name(name)
        for adapter in adapters:
            for a_attr, b_attr in _MATRICES.items():
                container = getattr(module, a_attr, {})
                if adapter not in container:
                    continue
                a = container[adapter]
                a_weight = a.weight if isinstance(a, nn.Module) else a
                embedding = a_attr == "lora_embedding_A"
                suffix = "" if embedding else ".weight"
                parts.setdefault(module_name, {})[adapter] = _Part(
                    a_name=f"{module_name}.{a_attr}.{adapter}{suffix}",
                    b_name=f"{module_name}.{b_attr}.{adapter}{suffix}",
                    scaling=float(module.scaling[adapter]),
                    rank=int(a_weight.shape[0]),
                    embedding=embedding,
                )
    return parts


def _peft_config(model: nn.Module, adapter: str):
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, dict) or adapter not in configs:
        raise AdapterExportError(f"The model has no PEFT config for its adapter {adapter!r}; load the adapter with PEFT "
                                 "(`PeftModel.from_pretrained`) or transformers' `load_adapter`.")
    config = configs[adapter]
    problems = []
    if getattr(config, "use_dora", False):
        problems.append("use_dora=True (the magnitude vectors are no LoRA matrices)")
    if getattr(config, "bias", "none") != "none":
        problems.append(f"bias={config.bias!r} (trained biases of the base layers)")
    if getattr(config, "modules_to_save", None):
        problems.append(f"modules_to_save={config.modules_to_save} (fully trained modules)")
    if getattr(config, "lora_bias", False):
        problems.append("lora_bias=True")
    if getattr(config, "trainable_token_indices", None):
        problems.append("trainable_token_indices")
    if problems:
        raise AdapterExportError(
            f"The model's adapter {adapter!r} uses " + "; ".join(problems) + ", which LoRA servers do not apply. "
            "Train the adapter without them, or merge it (`merge_and_unload`), serve the merged weights and attribute "
            "with a projection subspace."
        )
    return config


def _user_adapters(model: nn.Module, projection: str) -> list[str]:
    """The model's own adapters active next to the projection adapter."""
    from peft.tuners.lora import LoraLayer

    active = set()
    for module in model.modules():
        if isinstance(module, LoraLayer):
            active.update(a for a in module.active_adapters if a != projection)
    return sorted(active)


def lora_layout(subspace: AttributionSubspace) -> LoraLayout:
    """How `subspace`'s parameters become one PEFT LoRA adapter; `AdapterExportError` if they cannot."""
    from peft import LoraConfig

    spec, model = subspace.spec, subspace.model
    if spec.kind is SubspaceKind.PEFT:
        return LoraLayout(subspace, [spec.adapter_name], _peft_config(model, spec.adapter_name))
    if spec.kind is SubspaceKind.TRAINABLE:
        owners = {}
        for adapter in find_peft_adapters(model):
            for module, parts in _lora_parts(model, [adapter]).items():
                for part in parts.values():
                    owners[part.a_name] = owners[part.b_name] = adapter
        outside = [n for n in spec.parameter_names if n not in owners]
        adapters = {owners[n] for n in spec.parameter_names if n in owners}
        if outside or len(adapters) != 1:
            example = outside[0] if outside else spec.parameter_names[0]
            raise AdapterExportError(
                f"The artifact's subspace is kind 'trainable' over parameters that are not the LoRA matrices of one adapter "
                f"(e.g. {example!r}); a LoRA server can only add low-rank updates. Simulate the artifact with "
                "subspace='projection' (or 'peft' on a PEFT model) to serve its readout."
            )
        (adapter,) = adapters
        return LoraLayout(subspace, [adapter], _peft_config(model, adapter))
    # projection
    users = _user_adapters(model, spec.adapter_name)
    if len(users) > 1:
        raise AdapterExportError(f"The model has several active LoRA adapters {users} next to the projection adapter; "
                                 "an exported adapter concatenates one. Merge or delete the others first.")
    if not users:
        config = LoraConfig(r=spec.rank, lora_alpha=spec.rank, lora_dropout=0.0, bias="none", target_modules=list(spec.target_modules))
        return LoraLayout(subspace, [spec.adapter_name], config)
    user_config = _peft_config(model, users[0])
    layout = LoraLayout(subspace, users + [spec.adapter_name], None)
    rank = layout.rank
    layout.config = LoraConfig(
        r=rank, lora_alpha=rank, lora_dropout=0.0, bias="none", fan_in_fan_out=user_config.fan_in_fan_out,
        target_modules=_concatenated_targets(model, layout),
    )
    return layout


def _concatenated_targets(model: nn.Module, layout: LoraLayout) -> list[str]:
    """Suffixes when they name exactly the adapted modules, else the modules' full names."""
    suffixes = set(layout.target_modules)
    matched = {canonical_name(n) for n, _ in model.named_modules() if n.rsplit(".", 1)[-1] in suffixes}
    return sorted(suffixes) if matched == set(layout.parts) else sorted(layout.parts)


def _directions(artifact: InfluenceArtifact, kind: DirectionKind, document_ids: Optional[Sequence[str]]):
    """(vectors [n, p], labels, direction sources) of the chosen directions."""
    if kind is DirectionKind.SOURCES:
        if not artifact.source_names:
            raise AdapterExportError("The artifact's documents have no sources; export directions='basis' or 'documents'.")
        return artifact.source_responses, list(artifact.source_names), list(artifact.source_names)
    if kind is DirectionKind.BASIS:
        if artifact.readout_basis is None:
            raise AdapterExportError("The artifact has no compressed readout basis; build one (`build_readout_basis`, or "
                                     "AttributionConfig(readout_basis_rank=...)) or export directions='documents'.")
        directions = artifact.readout_basis["directions"]
        return directions, [f"basis-{j:05d}" for j in range(directions.shape[0])], []
    if not document_ids:
        raise AdapterExportError("directions='documents' needs `document_ids`: the documents to export.")
    position = {d: i for i, d in enumerate(artifact.documents.document_ids)}
    unknown = [d for d in map(str, document_ids) if d not in position]
    if unknown:
        raise AdapterExportError(f"The artifact has no documents with ids {unknown[:5]}.")
    rows = [position[str(d)] for d in document_ids]
    return artifact.responses(rows), [str(d) for d in document_ids], [artifact.documents.sources[r] for r in rows]


def export_adapters(
    artifact: InfluenceArtifact,
    model: nn.Module,
    save_directory: Union[str, Path],
    directions: Union[DirectionKind, str] = DirectionKind.SOURCES,
    document_ids: Optional[Sequence[str]] = None,
    mode: Optional[Union[DifferenceMode, str]] = None,
    epsilon: Optional[float] = None,
    base_model_name_or_path: Optional[str] = None,
    overwrite: bool = False,
) -> AdapterSet:
    """Write θ* and θ* ± εû_j of the chosen directions of `artifact` as PEFT LoRA adapter folders.

    Args:
        artifact: the influence artifact.
        model: the model it was made on (fingerprints are checked; a projection adapter is injected and taken
            out again).
        save_directory: the folder of the set (`base/`, `plus-00000/`, `minus-00000/`, ... and the manifest).
        directions: ``sources`` (one per source, the summed responses: source scores), ``basis`` (the compressed
            readout basis rows: document scores through its coefficients) or ``documents`` (`document_ids`).
        document_ids: the documents to export with directions='documents'.
        mode: ``central_difference`` (plus and minus adapters), ``one_sided`` (plus adapters only) or ``removal``
            (θ* − u_j, for the unlearning solver's finite responses); default removal for artifacts read out by
            removal, else central_difference.
        epsilon: step length along û_j; default the artifact's `epsilon`, else the float32 default of `mode`
            (removal sets take the whole response away: no ε).
        base_model_name_or_path: written into each adapter_config.json (default: the artifact's base model).
        overwrite: replace an existing folder.

    Returns:
        The `AdapterSet`, whose `direction_scores` turns log-likelihoods under its adapters into scores.
    """
    kind = DirectionKind(directions)
    removal_artifact = artifact.config.readout is ReadoutMode.REMOVAL
    mode = DifferenceMode(mode if mode is not None else (DifferenceMode.REMOVAL if removal_artifact else DifferenceMode.CENTRAL))
    if mode is DifferenceMode.REMOVAL and artifact.config.solver is not Solver.UNLEARNING:
        raise AdapterExportError(f"mode='removal' evaluates θ* − u_b, meaningful only for the unlearning solver's finite responses; "
                                 f"this artifact was simulated with solver={artifact.config.solver.value!r}: use central_difference or one_sided.")
    if mode is DifferenceMode.REMOVAL and kind is not DirectionKind.DOCUMENTS:
        raise AdapterExportError("The removal readout is nonlinear in u_b, so only documents have removal adapters (a source's "
                                 "removal score is the sum of its documents'): export directions='documents'.")
    directory = Path(save_directory)
    if directory.exists() and any(directory.iterdir()) and not overwrite:
        raise AdapterExportError(f"{directory} is not empty; pass overwrite=True to replace it, or export elsewhere.")
    vectors, labels, direction_sources = _directions(artifact, kind, document_ids)
    subspace = artifact.bind(model)
    try:
        layout = lora_layout(subspace)
        dtype = subspace.parameter_dtype if subspace.parameter_dtype in (torch.float32, torch.float64) else torch.float32
        if mode is DifferenceMode.REMOVAL:
            epsilon = 1.0  # the whole response
        elif epsilon is None:
            epsilon = artifact.config.epsilon or default_epsilon(mode.value, dtype)
        # the unit directions exactly as `ForwardReadout` forms them, so the same ε gives the same parameters
        vectors = vectors.to(device=subspace.device, dtype=dtype)
        norms = vectors.norm(dim=1, keepdim=True)
        units = vectors / norms.clamp_min(torch.finfo(dtype).tiny)
        name = base_model_name_or_path or artifact.base_model.get("name_or_path")
        directory.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=directory.parent, prefix=f".{directory.name}-") as tmp:
            staging = Path(tmp) / "set"
            adapter_set = AdapterSet(
                directory=staging, kind=kind, labels=labels, norms=norms[:, 0].tolist(), mode=mode, epsilon=float(epsilon),
                rank=layout.rank, target_modules=layout.target_modules, direction_sources=direction_sources,
                fingerprints={"model": artifact.model_fingerprint, "subspace": artifact.subspace_fingerprint},
                base_model={**artifact.base_model, "name_or_path": name},
            )
            if kind is DirectionKind.BASIS:
                adapter_set.document_ids = list(artifact.documents.document_ids)
                adapter_set.document_sources = list(artifact.documents.sources)
                adapter_set.basis_coefficients = artifact.readout_basis["coefficients"].detach().cpu().double().numpy()
            zero = torch.zeros(subspace.dim, dtype=dtype, device=subspace.device)
            with torch.inference_mode():
                for entry in adapter_set.entries:
                    if entry.direction is None:
                        delta = zero
                    elif adapter_set.steps_along_units:
                        delta = (entry.sign * float(epsilon)) * units[entry.direction]
                    else:
                        delta = entry.sign * vectors[entry.direction]  # removal: θ* − u_b, as the torch readout evaluates it
                    layout.save(staging / entry.name, delta, name)
            adapter_set.save_manifest()
            if directory.exists():
                shutil.rmtree(directory)
            shutil.move(str(staging), str(directory))
        adapter_set.directory = directory
        logger.info("Exported %d adapters (rank %d, %s, ε=%g) to %s", len(adapter_set.entries), layout.rank, mode.value, epsilon, directory)
        return adapter_set
    finally:
        subspace.remove()


def copy_served_weights(model_directory: Union[str, Path], directory: Union[str, Path]) -> Path:
    """Copy a saved model folder without its adapter files: what a LoRA server serves as the base.

    A folder where the Trainer left base weights, tokenizer and adapter side by side cannot be served as it is:
    vLLM reads every ``*.safetensors`` as model weights, ``adapter_model.safetensors`` included.
    """
    source, directory = Path(model_directory), Path(directory)
    adapter_config = source / "adapter_config.json"
    if not (source / "config.json").is_file() and adapter_config.is_file():
        # an adapter folder of its own (the Hub layout): its base is where the adapter says
        import json

        base = json.loads(adapter_config.read_text(encoding="utf-8")).get("base_model_name_or_path")
        if base and (Path(base) / "config.json").is_file():
            source = Path(base)
    if not (source / "config.json").is_file():
        raise AdapterExportError(f"{source} has no config.json, and no adapter_config.json naming a local base folder; give the "
                                 "folder that holds the base model's weights.")
    directory.mkdir(parents=True, exist_ok=True)
    for path in source.iterdir():
        if path.is_file() and not path.name.startswith("adapter_"):
            shutil.copy2(path, directory / path.name)
    return directory


__all__ = ["BASE_ADAPTER", "LoraLayout", "copy_served_weights", "export_adapters", "lora_layout"]
