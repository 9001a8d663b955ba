"""`ForwardAttributionCallback`: simulate the responses at the end of a `transformers.Trainer` run."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional, Union

from transformers import TrainerCallback
from transformers.utils import logging

from ..errors import AttributionConfigError
from ..estimator.config import AttributionConfig
from ..estimator.subspace import AttributionSubspace, SubspaceSpec, find_peft_adapters
from ..estimator.task import AttributionTask, CausalLMTask
from ..storage.artifact import InfluenceArtifact
from ..storage.compression import CompressionConfig
from ..storage.table import DocumentTable
from .build import build_influence_artifact
from .data import (
    check_document_tokens,
    check_documents_dataset,
    documents_from_dataset,
    examples_from_dataset,
    rows_as_trained,
    vocabulary_size,
)

logger = logging.get_logger(__name__)


class ForwardAttributionCallback(TrainerCallback):
    """Writes an `InfluenceArtifact` to ``<output_dir>/influence/`` when training ends.

    The documents are checked when the callback is made and again when training *begins*, so a
    missing column, an empty, duplicated or unnamed document, token ids outside the model's vocabulary,
    labels that are neither a token nor -100, metadata that is not JSON or a model without parameters in
    the subspace stops the run before any training is spent. At the end, the trained model as the trainer holds it
    is used: a PEFT model's adapter is the subspace; a fully fine-tuned model gets a projection adapter
    (`projection_rank`, `target_modules`) for the duration of the simulation only.

    Args:
        documents: a `datasets.Dataset` with one row per document (``input_ids`` or a `text_column`),
            or None to use the trainer's own training dataset.
        document_column: column with unique document ids.
        source_column: optional column with each document's source.
        config: `AttributionConfig` (or its dict form) of the estimator.
        task: the `AttributionTask`; by default a `CausalLMTask` padded with the tokenizer's pad id.
        subspace: `SubspaceSpec`, its dict, a kind string, or None (PEFT adapter, else projection).
        projection_rank, target_modules: the projection adapter's rank and target modules.
        max_length: chunk length for long documents (default: the model's context length).
        text_column: column of raw text, tokenised with the trainer's processing class, when there is
            no ``input_ids`` column.
        metadata_columns: document columns copied into the documents table.
        train_examples: examples the simulation's minibatches are drawn from (default: the trainer's
            training dataset).
        output_subdir: folder under ``args.output_dir`` the artifact is written to.
        max_shard_size: size of each responses shard (also the unit of resumption and of work per process).
        compression: exact or compressed response storage (`CompressionConfig`, its dict, or 'auto' / 'exact' /
            'compressed'); None: 'auto', which stores coefficients on a basis when N × p would exceed its `max_exact_size`.
        push_to_hub: push the artifact; None follows ``TrainingArguments.push_to_hub``.
        hub_repo_id: repo to push to (default: ``<hub_model_id or output_dir name>-influence``).
    """

    def __init__(
        self,
        documents: Any = None,
        document_column: str = "document_id",
        source_column: Optional[str] = None,
        config: Union[AttributionConfig, dict, None] = None,
        task: Optional[AttributionTask] = None,
        subspace: Union[SubspaceSpec, dict, str, None] = None,
        projection_rank: int = 8,
        target_modules: Optional[Union[list[str], str]] = None,
        max_length: Optional[int] = None,
        text_column: Optional[str] = None,
        metadata_columns: tuple[str, ...] = (),
        train_examples: Any = None,
        output_subdir: str = "influence",
        max_shard_size: Union[int, str] = "1GB",
        compression: Union[CompressionConfig, dict, str, None] = None,
        push_to_hub: Optional[bool] = None,
        hub_repo_id: Optional[str] = None,
    ):
        if isinstance(config, dict):
            config = AttributionConfig.from_dict(config)
        if config is not None and not isinstance(config, AttributionConfig):
            raise AttributionConfigError(f"`config` must be an AttributionConfig or its dict, got {type(config).__name__}.")
        if task is not None and not isinstance(task, AttributionTask):
            raise AttributionConfigError(f"`task` must be an AttributionTask, got {type(task).__name__}.")
        if documents is not None:  # refuse bad documents before a Trainer is even built
            check_documents_dataset(documents, document_column, source_column, text_column, metadata_columns)
        self.documents = documents
        self.document_column = document_column
        self.source_column = source_column
        self.config = config or AttributionConfig()
        self.task = task
        self.subspace = subspace
        self.projection_rank = projection_rank
        self.target_modules = target_modules
        self.max_length = max_length
        self.text_column = text_column
        self.metadata_columns = tuple(metadata_columns)
        self.train_examples = train_examples
        self.output_subdir = output_subdir
        self.max_shard_size = max_shard_size
        self.compression = CompressionConfig.coerce(compression)
        self.push_to_hub = push_to_hub
        self.hub_repo_id = hub_repo_id
        self.artifact: Optional[InfluenceArtifact] = None
        self._train_start: Optional[float] = None

    # ------------------------------------------------------------------ helpers
    def _context_length(self, model) -> Optional[int]:
        if self.max_length is not None:
            return self.max_length
        config = getattr(model, "config", None)
        return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)

    def _task(self, model, processing_class, train_examples: list) -> AttributionTask:
        """The task given, or a causal LM task with Trainer's objective: the token mean of the NLL over the training set."""
        if self.task is not None:
            return self.task
        pad = getattr(processing_class, "pad_token_id", None)
        if pad is None:
            pad = getattr(getattr(model, "config", None), "pad_token_id", None)
        return CausalLMTask(pad_token_id=pad if pad is not None else 0, reduction="token_mean",
                            tokens_per_example=CausalLMTask.tokens_per_example_of(train_examples))

    def _subspace_request(self, model) -> tuple[Any, dict]:
        """(spec, keyword arguments) for `AttributionSubspace.build`."""
        if self.subspace is None and find_peft_adapters(model):
            return "peft", {}
        if self.subspace in (None, "projection"):
            return "projection", {"rank": self.projection_rank, "target_modules": self.target_modules}
        return self.subspace, {}

    def _inputs(self, model, processing_class, train_dataloader):
        dataset = getattr(train_dataloader, "dataset", None)
        keep = [c for c in (self.document_column, self.source_column, self.text_column, *self.metadata_columns) if c]
        trained = rows_as_trained(dataset, getattr(train_dataloader, "collate_fn", None), keep) if dataset is not None else None
        documents = documents_from_dataset(
            self.documents if self.documents is not None else trained, self.document_column, self.source_column,
            self._context_length(model), self.text_column, processing_class, self.metadata_columns,
        )
        train = self.train_examples if self.train_examples is not None else trained
        examples = train if isinstance(train, list) and train is not trained else examples_from_dataset(train, self._context_length(model))
        return documents, examples, self._task(model, processing_class, examples)

    # ------------------------------------------------------------------ hooks
    def on_train_begin(self, args, state, control, model=None, processing_class=None, train_dataloader=None, **kwargs):
        self._train_start = time.perf_counter()
        prepared, examples, task = self._inputs(model, processing_class, train_dataloader)
        prepared.documents.validate(task)
        # token ids the model cannot embed, labels that are no token, ids and metadata the artifact cannot store
        check_document_tokens(prepared.documents, examples, vocabulary_size(model), check_labels=isinstance(task, CausalLMTask))
        DocumentTable.from_document_set(prepared.documents, prepared.n_tokens, prepared.metadata)
        spec, arguments = self._subspace_request(model)
        # fails now if the subspace is empty; nothing heavy: the weights' fingerprint is computed only when the artifact is made
        with AttributionSubspace.build(model, spec, **arguments) as subspace:
            kind, dim = subspace.spec.kind.value, subspace.dim
        if state.is_local_process_zero:
            logger.info(
                "ForwardAttributionCallback: %d documents (%d chunks), %s subspace of dimension %d; "
                "responses are simulated when training ends.", len(prepared.documents), prepared.documents.num_examples, kind, dim,
            )

    def on_train_end(self, args, state, control, model=None, processing_class=None, train_dataloader=None, **kwargs):
        prepared, train_examples, task = self._inputs(model, processing_class, train_dataloader)
        training_seconds = _training_seconds(state, self._train_start)
        output_dir = Path(args.output_dir) / self.output_subdir
        spec, arguments = self._subspace_request(model)
        start = time.perf_counter()
        artifact = build_influence_artifact(
            model, task, prepared.documents, train_examples, output_dir, self.config, subspace=spec,
            n_tokens=prepared.n_tokens, metadata=prepared.metadata, max_shard_size=self.max_shard_size, compression=self.compression,
            progress=not args.disable_tqdm, **arguments,
        )
        seconds = time.perf_counter() - start
        if args.weight_decay and not self.config.weight_decay and state.is_world_process_zero:
            logger.info("TrainingArguments.weight_decay = %g is AdamW's decoupled decay, not a term of the loss, so the simulated "
                        "objective leaves it out; set AttributionConfig(weight_decay=...) to simulate an L2 term.", args.weight_decay)
        if state.is_world_process_zero and artifact is not None:
            ratio = seconds / training_seconds if training_seconds else float("nan")
            objective = task.describe() if hasattr(task, "describe") else {"task": type(task).__name__}
            artifact.simulation.update(training_seconds=training_seconds, cost_vs_training=ratio, objective=objective)
            artifact.save_pretrained(output_dir)
            logger.info("Influence artifact written to %s: the simulation took %.1fs, %.2f× the training time.", output_dir, seconds, ratio)
            push = args.push_to_hub if self.push_to_hub is None else self.push_to_hub
            if push:
                repo = self.hub_repo_id or f"{args.hub_model_id or Path(args.output_dir).name}-influence"
                url = artifact.push_to_hub(repo, private=args.hub_private_repo, token=args.hub_token)
                logger.info("Influence artifact pushed: %s", url)
        self.artifact = artifact


def _training_seconds(state, started: Optional[float]) -> Optional[float]:
    for entry in reversed(state.log_history or []):
        if "train_runtime" in entry:
            return float(entry["train_runtime"])
    return time.perf_counter() - started if started is not None else None
