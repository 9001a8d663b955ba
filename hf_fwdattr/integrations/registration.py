"""Registering the ``"attributed-text-generation"`` task with transformers, without importing transformers' pipelines.

`import hf_fwdattr` has to make ``transformers.pipeline("attributed-text-generation", ...)`` work, yet importing
the pipeline class means importing `transformers.pipelines`, which loads torch and the model machinery (seconds).
transformers resolves a task through `PIPELINE_REGISTRY`, an attribute of `transformers.pipelines`, so the task
only needs to be registered by the time that module exists. `register_attributed_text_generation` therefore
registers it at once when `transformers.pipelines` is already imported, and otherwise installs a one-shot import
hook that registers it right after `transformers.pipelines` has finished loading (the first
``from transformers import pipeline`` does that).
"""

from __future__ import annotations

import importlib
import importlib.abc
import logging
import sys

logger = logging.getLogger(__name__)

TRANSFORMERS_PIPELINES = "transformers.pipelines"
PIPELINE_MODULE = "hf_fwdattr.integrations.pipeline"


def register_attributed_text_generation() -> None:
    """Make ``transformers.pipeline("attributed-text-generation", ...)`` available: now if transformers' pipelines are
    loaded, else as soon as they are."""
    if TRANSFORMERS_PIPELINES in sys.modules:
        _import_pipeline_module()
    elif not any(isinstance(finder, _RegisterAfterLoading) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterLoading())


def _import_pipeline_module() -> None:
    # A failure here must not break `import transformers.pipelines` for the user: say why the task is missing instead.
    try:
        importlib.import_module(PIPELINE_MODULE)  # registers the task when it runs (a module being imported is returned as is)
    except Exception as err:  # noqa: BLE001
        logger.warning("hf_fwdattr could not register the 'attributed-text-generation' pipeline: %s: %s", type(err).__name__, err)


class _RegisterAfterLoading(importlib.abc.MetaPathFinder):
    """Finds `transformers.pipelines` through the other finders and wraps its loader to register the task after it runs."""

    def find_spec(self, fullname, path, target=None):
        if fullname != TRANSFORMERS_PIPELINES:
            return None
        sys.meta_path.remove(self)  # one shot, and the lookup below must not come back here
        for finder in sys.meta_path:
            find_spec = getattr(finder, "find_spec", None)
            spec = find_spec(fullname, path, target) if find_spec is not None else None
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _RegisteringLoader(spec.loader)
        return spec


class _RegisteringLoader(importlib.abc.Loader):
    """Runs the original loader, puts it back on the module, then registers the task."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        module.__spec__.loader = module.__loader__ = self._loader
        self._loader.exec_module(module)
        _import_pipeline_module()

    def __getattr__(self, name):
        return getattr(self._loader, name)
