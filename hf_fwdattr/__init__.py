"""hf_fwdattr: training-data attribution for Hugging Face models with forward passes only at query time."""

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
from .estimator.config import AttributionConfig, Curvature, Eigenbasis, ReadoutMode, Solver
from .estimator.curvature import CurvatureOperator, estimate_step_size, top_eigenvalue
from .estimator.documents import DocumentSet, MinibatchSequence
from .estimator.gradients import GradientMethod, document_gradients, example_gradients, query_gradients
from .estimator.simulate import SimulationResult, simulate_responses
from .estimator.subspace import AttributionSubspace, SubspaceKind, SubspaceSpec
from .estimator.task import AttributionTask, CausalLMTask, ClassificationTask
from .integrations.build import build_influence_artifact
from .integrations.callback import ForwardAttributionCallback
from .integrations.pipeline import AttributedTextGenerationPipeline
from .query.compress import build_readout_basis
from .query.readout import ForwardReadout
from .query.scoring import ArtifactScorer
from .storage.artifact import DocumentTable, InfluenceArtifact

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
    "query_gradients",
    "simulate_responses",
    "top_eigenvalue",
]
