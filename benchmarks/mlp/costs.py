"""Wall time and peak memory of a call, measured in this process."""

from __future__ import annotations

import statistics
import threading
import time
from typing import Any, Callable

import psutil


class PeakMemory:
    """Peak resident memory above the level at entry, sampled every millisecond by a thread (bytes)."""

    def __enter__(self) -> "PeakMemory":
        self._process = psutil.Process()
        self.baseline = self._process.memory_info().rss
        self.peak = self.baseline
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._process.memory_info().rss)
            time.sleep(0.001)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss)

    @property
    def increase(self) -> int:
        return self.peak - self.baseline


def timed(function: Callable[[], Any]) -> tuple[Any, float, int]:
    """(result, seconds, peak memory increase in bytes) of one call."""
    with PeakMemory() as memory:
        start = time.perf_counter()
        result = function()
        seconds = time.perf_counter() - start
    return result, seconds, memory.increase


def interleaved(functions: dict[str, Callable[[], Any]], repeats: int) -> dict[str, dict]:
    """Time every function `repeats` times, round-robin (so that load from other processes hits all alike).

    Returns per name the median and min seconds and the largest peak-memory increase seen.
    """
    times: dict[str, list] = {name: [] for name in functions}
    memory: dict[str, int] = {name: 0 for name in functions}
    for name, function in functions.items():  # warm-up, not timed
        function()
    for _ in range(repeats):
        for name, function in functions.items():
            _, seconds, increase = timed(function)
            times[name].append(seconds)
            memory[name] = max(memory[name], increase)
    return {name: {"median_s": statistics.median(t), "min_s": min(t), "peak_memory_bytes": memory[name]} for name, t in times.items()}
