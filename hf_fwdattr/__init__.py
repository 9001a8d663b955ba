"""hf_fwdattr: training-data attribution for Hugging Face models with forward passes only at query time.

The public names below load on first use (PEP 562), so that ``import hf_fwdattr`` and ``hf-fwdattr --help``
do not pay for torch, transformers and peft. Importing the package registers the
``"attributed-text-generation"`` pipeline with transformers (see `integrations.registration`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

from .errors import (
    AdapterExportError,
    ArtifactError,
    AttributionConfigError,
    DocumentsError,
    DuplicateDocumentError,
    EmptyDocumentsError,
    FingerprintMismatchError,
    ReadoutError,
    ServingError,
    SimulationDivergedError,
    SubspaceError,
    TaskError,
)
from .integrations.registration import register_attributed_text_generation

# public name -> the module that defines it
_LAZY = {
    **dict.fromkeys(["AttributionConfig", "Curvature", "Eigenbasis", "ReadoutMode", "Solver"], ".estimator.config"),
    **dict.fromkeys(["CurvatureOperator", "estimate_step_size", "top_eigenvalue"], ".estimator.curvature"),
    **dict.fromkeys(["DocumentSet", "MinibatchSequence"], ".estimator.documents"),
    **dict.fromkeys(["GradientMethod", "document_gradients", "example_gradients", "query_gradients"], ".estimator.gradients"),
    **dict.fromkeys(["SimulationResult", "simulate_responses"], ".estimator.simulate"),
    **dict.fromkeys(["AttributionSubspace", "SubspaceKind", "SubspaceSpec", "model_fingerprint"], ".estimator.subspace"),
    **dict.fromkeys(["AttributionTask", "CausalLMTask", "ClassificationTask"], ".estimator.task"),
    "build_influence_artifact": ".integrations.build",
    "ForwardAttributionCallback": ".integrations.callback",
    "AttributedTextGenerationPipeline": ".integrations.pipeline",
    "build_readout_basis": ".query.compress",
    "ForwardReadout": ".query.readout",
    "ArtifactScorer": ".query.scoring",
    **dict.fromkeys(["DocumentTable", "InfluenceArtifact"], ".storage.artifact"),
    "ProjectedResponses": ".storage.coefficients",
    **dict.fromkeys(["CompressionConfig", "ResponseStorage"], ".storage.compression"),
}

if TYPE_CHECKING:  # what the lazy names are, for type checkers and editors
    from .estimator.config import AttributionConfig, Curvature, Eigenbasis, ReadoutMode, Solver
    from .estimator.curvature import CurvatureOperator, estimate_step_size, top_eigenvalue
    from .estimator.documents import DocumentSet, MinibatchSequence
    from .estimator.gradients import GradientMethod, document_gradients, example_gradients, query_gradients
    from .estimator.simulate import SimulationResult, simulate_responses
    from .estimator.subspace import AttributionSubspace, SubspaceKind, SubspaceSpec, model_fingerprint
    from .estimator.task import AttributionTask, CausalLMTask, ClassificationTask
    from .integrations.build import build_influence_artifact
    from .integrations.callback import ForwardAttributionCallback
    from .integrations.pipeline import AttributedTextGenerationPipeline
    from .query.compress import build_readout_basis
    from .query.readout import ForwardReadout
    from .query.scoring import ArtifactScorer
    from .storage.artifact import DocumentTable, InfluenceArtifact
    from .storage.coefficients import ProjectedResponses
    from .storage.compression import CompressionConfig, ResponseStorage


def __getattr__(name: str):
    """Import a public name's module on first access and cache the name in the package."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


register_attributed_text_generation()

__all__ = [
    "AdapterExportError",
    "ArtifactScorer",
    "AttributedTextGenerationPipeline",
    "ArtifactError",
    "AttributionConfig",
    "AttributionConfigError",
    "AttributionSubspace",
    "AttributionTask",
    "CausalLMTask",
    "ClassificationTask",
    "CompressionConfig",
    "Curvature",
    "CurvatureOperator",
    "DocumentSet",
    "DocumentsError",
    "DocumentTable",
    "DuplicateDocumentError",
    "Eigenbasis",
    "EmptyDocumentsError",
    "FingerprintMismatchError",
    "ForwardAttributionCallback",
    "ForwardReadout",
    "GradientMethod",
    "InfluenceArtifact",
    "MinibatchSequence",
    "ProjectedResponses",
    "ReadoutError",
    "ReadoutMode",
    "ResponseStorage",
    "ServingError",
    "SimulationDivergedError",
    "SimulationResult",
    "Solver",
    "SubspaceError",
    "SubspaceKind",
    "SubspaceSpec",
    "TaskError",
    "__version__",
    "build_influence_artifact",
    "build_readout_basis",
    "document_gradients",
    "estimate_step_size",
    "example_gradients",
    "model_fingerprint",
    "query_gradients",
    "simulate_responses",
    "top_eigenvalue",
]
