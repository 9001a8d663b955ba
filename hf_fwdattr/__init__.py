"""hf_fwdattr: training-data attribution for Hugging Face models with forward passes only at query time."""

__version__ = "0.1.0"

from .artifact import DocumentTable, InfluenceArtifact
from .build import build_influence_artifact
from .callback import ForwardAttributionCallback
from .compress import build_readout_basis
from .config import AttributionConfig, Curvature, Eigenbasis, ReadoutMode, Solver
from .curvature import CurvatureOperator, estimate_step_size, top_eigenvalue
from .documents import DocumentSet, MinibatchSequence
from .errors import (
    ArtifactError,
    AttributionConfigError,
    DocumentsError,
    DuplicateDocumentError,
    EmptyDocumentsError,
    FingerprintMismatchError,
    ReadoutError,
    SimulationDivergedError,
    SubspaceError,
    TaskError,
)
from .gradients import GradientMethod, document_gradients, example_gradients, query_gradients
from .pipeline import AttributedTextGenerationPipeline
from .readout import ForwardReadout
from .scoring import ArtifactScorer
from .simulate import SimulationResult, simulate_responses
from .subspace import AttributionSubspace, SubspaceKind, SubspaceSpec
from .task import AttributionTask, CausalLMTask, ClassificationTask

__all__ = [
    "ArtifactScorer",
    "AttributedTextGenerationPipeline",
    "ArtifactError",
    "AttributionConfig",
    "AttributionConfigError",
    "AttributionSubspace",
    "AttributionTask",
    "CausalLMTask",
    "ClassificationTask",
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
    "ReadoutError",
    "ReadoutMode",
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
    "query_gradients",
    "simulate_responses",
    "top_eigenvalue",
]
