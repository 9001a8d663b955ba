"""Progress bars: one per long stage, following the Hugging Face switches.

A bar shows when its caller asks for progress and progress bars are not switched off: by
``HF_HUB_DISABLE_PROGRESS_BARS=1``, transformers' ``logging.disable_progress_bar()``, huggingface_hub's
``disable_progress_bars()`` (or ``disable_progress_bars("hf_fwdattr")`` for this library's bars only), or the
Trainer's ``disable_tqdm``, which the callback passes on. Bars sit on the first line (``position=0``) and stay when
done, so that a bar opened while another one is still open (the Trainer's, when the callback simulates at the end of
training) is not drawn as a nested bar: nested bars move the cursor up with ``ESC [A``, which a log file
keeps as stray characters.
"""

from __future__ import annotations

from typing import Iterable, Optional

GROUP = "hf_fwdattr"


def progress_enabled() -> bool:
    """False when progress bars are switched off for this library (see the module docstring)."""
    from huggingface_hub.utils import are_progress_bars_disabled

    return not are_progress_bars_disabled(GROUP)


def progress_bar(iterable: Optional[Iterable] = None, *, desc: str, total: Optional[int] = None, enabled: bool = True, unit: str = "it"):
    """A `tqdm` bar over `iterable` (or a manual one of `total` steps) for one stage; a silent one unless `enabled` and
    progress bars are on."""
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, unit=unit, disable=not (enabled and progress_enabled()), position=0, leave=True)
