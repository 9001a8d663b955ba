"""Exception classes raised by hf_fwdattr.

Each error says what was expected, what came, and how to fix it. They subclass the
built-in exception a caller would naturally catch (`ValueError` for bad input,
`RuntimeError` for a computation that went wrong).
"""


class AttributionConfigError(ValueError):
    """An `AttributionConfig` field has a value that cannot be used."""


class DocumentsError(ValueError):
    """The documents to attribute to cannot be used as given (e.g. a missing column)."""


class EmptyDocumentsError(DocumentsError):
    """The document set, or one of its documents, has nothing to attribute to."""


class DuplicateDocumentError(DocumentsError):
    """Two documents share an id."""


class SubspaceError(ValueError):
    """The attribution subspace cannot be built on the given model."""


class TaskError(ValueError):
    """A task received a batch it cannot measure, or a task method is missing."""


class SimulationDivergedError(RuntimeError):
    """The short-horizon simulation grew without bound."""


class ReadoutError(RuntimeError):
    """The forward-only readout cannot run on the given model or responses."""


class FingerprintMismatchError(ValueError):
    """An artifact was made for other model weights or another attribution subspace."""


class ArtifactError(ValueError):
    """An influence artifact on disk is missing pieces, corrupted, or inconsistent."""


class AdapterExportError(ValueError):
    """An artifact's directions cannot be written as LoRA adapters (the subspace is not LoRA-shaped, or uses
    adapter features the exported format does not carry)."""


class ServingError(RuntimeError):
    """An inference server (vLLM, in process or over HTTP) cannot run the readout as it is configured."""


class ArtifactIntegrityError(ArtifactError):
    """A file of an influence artifact does not match the digest, size or structure the artifact records for it."""


class UnfinishedArtifactError(ArtifactError):
    """A folder holds a save that has not finished (or whose final swap was interrupted)."""


class ArtifactChangedError(ArtifactError):
    """Files under a loaded influence artifact were modified after it was loaded."""


class ArtifactBusyError(ArtifactError):
    """Another process (or thread) is saving an influence artifact to the same folder."""
