"""Peers on the same model and documents: Kronfluence (EK-FAC influence) and Bergson (gradient index).

Neither is a dependency of hf_fwdattr; both are installed into the venv for this benchmark only, without
their dependencies (each would otherwise replace torch 2.13.0 with a CUDA build):

    .venv/bin/pip install --no-deps kronfluence==1.0.1 einops opt_einsum einconv
    .venv/bin/pip install --no-deps bergson==2.5.1 jaxtyping wadler_lindig ml_dtypes natsort petname simple-parsing docstring_parser torchopt optree

Both compute scores with the sign convention of ours when their measurement is the query's summed NLL and
their training loss the document's summed NLL: positive = training on the document lowers the query's loss.
"""

from __future__ import annotations

import copy
import shutil
import time
from pathlib import Path

import torch

from .model import TASK


def _lora_module_names(model) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear) and (".lora_A." in name or ".lora_B." in name)]


# ---------------------------------------------------------------------------------------------- Kronfluence
class _KronfluenceTask:
    """kronfluence `Task`: summed token NLL as the training loss (labels sampled from the model for the Fisher),
    summed answer-token NLL as the measurement; tracked modules: the LoRA A and B matrices."""

    def __new__(cls, tracked: list[str]):
        from kronfluence.task import Task

        class LMTask(Task):
            def compute_train_loss(self, batch, model, sample=False):
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
                labels = batch["labels"][:, 1:]
                if sample:
                    with torch.no_grad():
                        probabilities = torch.softmax(logits.detach(), dim=-1).reshape(-1, logits.shape[-1])
                        sampled = torch.multinomial(probabilities, 1).reshape(labels.shape)
                    labels = torch.where(labels == -100, labels, sampled)
                return torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="sum")

            def compute_measurement(self, batch, model):
                return self.compute_train_loss(batch, model, sample=False)

            def get_influence_tracked_modules(self):
                return tracked

            def get_attention_mask(self, batch):
                return batch["attention_mask"]

        return LMTask()


class _ListDataset(torch.utils.data.Dataset):
    def __init__(self, examples: list[dict]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict:
        return self.examples[index]


def kronfluence_peer(model, examples: list[dict], curvature_indices: list[int], queries: list[dict], train_rows: int,
                     output_dir: Path, damping: float, single_rows: int) -> dict:
    """EK-FAC factors on the curvature examples (precompute), then pairwise scores of the queries against the first
    `train_rows` documents: a batch of 16 queries, and single queries against the first `single_rows` documents.
    Kronfluence keeps no per-document state: every query batch recomputes the training gradients."""
    import logging

    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.utils.dataset import DataLoaderKwargs

    logging.getLogger("kronfluence").setLevel(logging.WARNING)
    shutil.rmtree(output_dir, ignore_errors=True)
    peer = copy.deepcopy(model)
    task = _KronfluenceTask(_lora_module_names(peer))
    peer = prepare_model(peer, task)
    analyzer = Analyzer(analysis_name="scale", model=peer, task=task, cpu=True, disable_tqdm=True, disable_model_save=True,
                        output_dir=str(output_dir))
    analyzer.set_dataloader_kwargs(DataLoaderKwargs(collate_fn=TASK.collate))
    curvature = _ListDataset([examples[i] for i in curvature_indices])
    torch.manual_seed(0)
    start, cpu = time.perf_counter(), time.process_time()
    analyzer.fit_all_factors("ekfac", dataset=curvature, per_device_batch_size=32, factor_args=FactorArguments(strategy="ekfac"))
    precompute, precompute_cpu = time.perf_counter() - start, time.process_time() - cpu
    score_args = ScoreArguments(damping_factor=damping)

    def scores(name: str, query_examples: list[dict], rows: int) -> tuple[torch.Tensor, float]:
        start = time.perf_counter()
        analyzer.compute_pairwise_scores(name, "ekfac", query_dataset=_ListDataset(query_examples),
                                         train_dataset=_ListDataset(examples[:rows]), per_device_query_batch_size=len(query_examples),
                                         per_device_train_batch_size=64, score_args=score_args, overwrite_output_dir=True)
        seconds = time.perf_counter() - start
        return analyzer.load_pairwise_scores(name)["all_modules"].to(torch.float64), seconds

    batch_scores, batch_seconds = scores("batch", queries[:16], train_rows)
    single_seconds = [scores(f"single{i}", queries[i : i + 1], single_rows)[1] for i in range(2)]
    return {"precompute_seconds": precompute, "precompute_cpu_seconds": precompute_cpu, "batch_seconds": batch_seconds, "batch_rows": train_rows, "batch_queries": 16,
            "single_seconds": min(single_seconds), "single_rows": single_rows, "scores": batch_scores}


# ---------------------------------------------------------------------------------------------- Bergson
def bergson_peer(model, examples: list[dict], queries: list[dict], output_dir: Path) -> dict:
    """Bergson's gradient index of every document (per-document LoRA gradients, no projection: p is small), then
    `Attributor.trace` per query: one backward pass, dot products with the whole index (no preconditioner)."""
    from bergson import Attributor, GradientProcessor, IndexConfig, collect_gradients
    from bergson.utils.peft import detect_peft_modules
    from datasets import Dataset

    shutil.rmtree(output_dir, ignore_errors=True)
    shutil.rmtree(Path(str(output_dir) + ".part"), ignore_errors=True)
    peer = copy.deepcopy(model)
    for parameter in peer.parameters():
        parameter.requires_grad_(False)
    for name, parameter in peer.named_parameters():
        if "lora_" in name:
            parameter.requires_grad_(True)
    targets = detect_peft_modules(peer)
    cfg = IndexConfig(run_path=str(output_dir), loss_reduction="sum", projection_dim=0, precision="fp32", model="scale-benchmark")
    processor = GradientProcessor(projection_dim=None)
    # a second column: bergson drops input_ids before adding its loss column, and a table without columns has no rows
    data = Dataset.from_dict({"input_ids": [e["input_ids"] for e in examples], "row": list(range(len(examples)))})
    batches = [list(range(lo, min(lo + 32, len(examples)))) for lo in range(0, len(examples), 32)]
    cfg.partial_run_path.mkdir(parents=True, exist_ok=True)
    start, cpu = time.perf_counter(), time.process_time()
    processor.save(cfg.partial_run_path)
    collect_gradients(peer, data, processor, cfg, batches=batches, target_modules=targets)
    precompute, precompute_cpu = time.perf_counter() - start, time.process_time() - cpu
    index_path = cfg.partial_run_path
    start = time.perf_counter()
    attributor = Attributor(index_path, device="cpu", unit_norm=False)
    load_seconds = time.perf_counter() - start

    def trace(query_examples: list[dict]) -> tuple[torch.Tensor, float]:
        batch = TASK.collate(query_examples)
        start = time.perf_counter()
        with attributor.trace(peer.base_model, k=None) as result:
            peer.zero_grad(set_to_none=True)
            logits = peer(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
            loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch["labels"][:, 1:], ignore_index=-100, reduction="sum")
            loss.backward()
        seconds = time.perf_counter() - start
        scores = torch.empty_like(result.scores)
        scores.scatter_(-1, result.indices, result.scores)
        return scores.to(torch.float64), seconds

    trace(queries[:1])  # warm-up
    single = [trace(queries[i : i + 1]) for i in range(5)]
    batch_scores, batch_seconds = trace(queries[:16])
    return {"precompute_seconds": precompute, "precompute_cpu_seconds": precompute_cpu, "load_seconds": load_seconds, "single_seconds": sorted(t for _, t in single)[2],
            "single_queries": 5, "batch_seconds": batch_seconds, "batch_queries": 16, "scores": batch_scores,
            "single_scores": torch.cat([s for s, _ in single])}
