"""In-loop accounting for end-to-end benchmarks: time blocked on data vs step time, GPU utilisation samples, and
the endless batch stream a loader feeds across timed calls."""

from __future__ import annotations

import shutil
import statistics
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

__all__ = ["GpuUtilSampler", "TimedLoop", "endless_batches", "gpu_utilization"]


def endless_batches(batches: Callable[[int], Iterator[Any]]) -> Iterator[Any]:
    """A loader's ``batches(epoch)``, epoch after epoch: one iterator lives across timed calls, as in training."""
    epoch = 0
    while True:
        yield from batches(epoch)
        epoch += 1


def _smi_id(index: int) -> str:
    """The ``nvidia-smi -i`` selector of torch device ``index`` (its UUID: CUDA_VISIBLE_DEVICES renumbers)."""
    uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
    return f"GPU-{uuid}" if uuid is not None else str(index)


def gpu_utilization(index: int = 0) -> tuple[float | None, str]:
    """One reading of the GPU's utilisation (percent of the last sample period with a kernel running).

    ``torch.cuda.utilization`` (NVML via pynvml) first, else ``nvidia-smi --query-gpu=utilization.gpu``.

    Returns:
        (percent, source), or (None, why) when neither works.
    """
    try:
        return float(torch.cuda.utilization(index)), "torch.cuda.utilization (NVML)"
    except Exception as exc:  # pynvml missing or NVML unusable: try the command-line tool
        nvml_error = f"{type(exc).__name__}: {exc}"
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None, f"no NVML ({nvml_error}) and no nvidia-smi"
    try:
        out = subprocess.run(
            [smi, "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-i", _smi_id(index)],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout
        return float(out.strip().splitlines()[0]), "nvidia-smi utilization.gpu"
    except (OSError, subprocess.SubprocessError, ValueError, IndexError) as exc:
        return None, f"no NVML ({nvml_error}); nvidia-smi failed: {exc}"


class GpuUtilSampler:
    """A daemon thread that reads `gpu_utilization` every ``interval`` seconds while ``active`` is set.

    NVML's figure is the share of its own sample period (1/6 s to 1 s) in which any kernel ran: it says whether
    the GPU was kept busy, not how efficiently.

    Args:
        index: torch CUDA device index.
        interval: seconds between readings.
    """

    def __init__(self, index: int = 0, interval: float = 0.1) -> None:
        self.index, self.interval = index, interval
        self.samples: list[float] = []
        self.source: str | None = None
        self.active = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="gpu-util", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            if self.active.wait(timeout=0.2) and not self._stop.is_set():
                value, self.source = gpu_utilization(self.index)
                if value is not None:
                    self.samples.append(value)
                self._stop.wait(self.interval)

    def close(self) -> None:
        """Stops the thread."""
        self._stop.set()
        self.active.set()  # wake the waiting thread so that it sees the stop flag
        self._thread.join(timeout=10)

    def summary(self) -> dict[str, Any]:
        """Mean, median and minimum of the readings, their count and source."""
        s = self.samples
        return {
            "gpu_util_mean_pct": statistics.fmean(s) if s else None,
            "gpu_util_median_pct": statistics.median(s) if s else None,
            "gpu_util_min_pct": min(s) if s else None,
            "gpu_util_samples": len(s),
            "gpu_util_source": self.source,
        }


class TimedLoop:
    """``iters`` training iterations per call, each ``batch = fetch()`` then ``train(batch)``, with accounting.

    Only calls made while ``recording`` is True count (the runner sets it for timed calls, never for warm-up).
    Per iteration it adds the host time blocked in ``fetch`` and the whole host time; on CUDA it also records
    three events (before ``fetch``, between, after ``train``) on the current stream, whose elapsed times split
    the GPU timeline into "data" (the stream waited for the batch, or ran the loader's augmentation kernels) and
    "step". Events are read lazily in `stats`, after the runner's end-of-call synchronisation, so accounting adds
    no host sync to the loop.

    Args:
        fetch: returns the next batch (loader next + meta-batch draw + host-to-device copy).
        train: runs one training iteration on it.
        iters: iterations per call.
        cuda: record CUDA events.
        sampler: GPU utilisation sampler, switched on during recorded calls.
    """

    def __init__(
        self,
        fetch: Callable[[], Any],
        train: Callable[[Any], object],
        iters: int,
        *,
        cuda: bool = False,
        sampler: GpuUtilSampler | None = None,
    ) -> None:
        self.fetch, self.train, self.iters = fetch, train, iters
        self.cuda, self.sampler = cuda, sampler
        self.recording = False
        self.iterations = 0
        self.host_data_s = self.host_total_s = 0.0
        self._events: list[tuple[Any, Any, Any]] = []

    def _event(self) -> Any:
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        return ev

    def __call__(self) -> None:
        rec = self.recording
        events = self.cuda and rec
        if rec and self.sampler is not None:
            self.sampler.active.set()
        try:
            for _ in range(self.iters):
                e0 = self._event() if events else None
                t0 = time.perf_counter()
                batch = self.fetch()
                t1 = time.perf_counter()
                e1 = self._event() if events else None
                self.train(batch)
                if events:
                    self._events.append((e0, e1, self._event()))
                if rec:
                    self.host_data_s += t1 - t0
                    self.host_total_s += time.perf_counter() - t0
                    self.iterations += 1
        finally:
            if self.sampler is not None:
                self.sampler.active.clear()

    def stats(self) -> dict[str, Any]:
        """Data-wait shares and per-iteration times of the recorded calls.

        Returns:
            ``iterations``; ``data_wait_share_host`` (host time blocked in ``fetch`` / host loop time) and
            ``host_data_ms_per_iter``; on CUDA ``data_share_gpu`` (stream time from "fetch started" to "batch
            ready" / stream time of the whole iteration) with ``gpu_data_ms_per_iter`` and
            ``gpu_ms_per_iter``; plus the sampler's utilisation summary.
        """
        n = max(self.iterations, 1)
        out: dict[str, Any] = {
            "iterations": self.iterations,
            "data_wait_share_host": self.host_data_s / self.host_total_s if self.host_total_s else None,
            "host_data_ms_per_iter": 1e3 * self.host_data_s / n,
        }
        if self._events:
            self._events[-1][2].synchronize()  # sync point: outside the timed calls
            data = sum(e0.elapsed_time(e1) for e0, e1, _ in self._events)
            total = sum(e0.elapsed_time(e2) for e0, _, e2 in self._events)
            out |= {
                "data_share_gpu": data / total if total else None,
                "gpu_data_ms_per_iter": data / len(self._events),
                "gpu_ms_per_iter": total / len(self._events),
            }
        if self.sampler is not None:
            out |= self.sampler.summary()
        return out
