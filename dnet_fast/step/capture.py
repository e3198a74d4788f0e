"""TrainStep: one iteration through static device buffers, replayed from a captured CUDA graph or run eagerly."""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any

import torch
from torch import Tensor

from dnet_fast.config import GRAPH_CHOICES, PRECISIONS
from dnet_fast.meta import MetaMode
from dnet_fast.metrics import DeviceClassCounter
from dnet_fast.step.health import FiniteGuard
from dnet_fast.step.sgd import DeviceLRSGD
from dnet_fast.step.snapshot import StateSnapshot, step_optimizers

__all__ = ["TrainStep", "resolve_graph"]

log = logging.getLogger(__name__)


def resolve_graph(choice: str, device: torch.device | str) -> bool:
    """Whether the step is CUDA-graphed: ``auto`` = CUDA device with CUDA available, ``on`` = yes, ``off`` = no.

    Raises:
        ValueError: unknown choice, or ``on`` without a usable CUDA device.
    """
    if choice not in GRAPH_CHOICES:
        msg = f"run.graph must be one of {GRAPH_CHOICES}, got {choice!r}"
        raise ValueError(msg)
    cuda = torch.device(device).type == "cuda" and torch.cuda.is_available()
    if choice == "on" and not cuda:
        msg = "run.graph=on needs a CUDA device (CPU builds cannot instantiate torch.cuda.CUDAGraph)"
        raise ValueError(msg)
    return cuda and choice != "off"


class TrainStep:
    """One training iteration through static buffers: replays a captured CUDA graph, or runs the same code eagerly.

    The meta mode's main optimiser must be a `DeviceLRSGD` (device learning rates, in-place update), so nothing in
    the iteration reads a value on the host. `step` copies the inputs into static buffers (fixed shapes), runs
    ``meta.step`` on them and counts the real forward's logits into ``counter`` (per-class training correct/total,
    ``index_add_``) — eagerly, or on CUDA with ``graph`` by replaying the graph captured at the first call: warm-up
    iterations on a side stream, capture with ``torch.cuda.graph``, then the state snapshotted before the warm-up
    (everything ``meta.owned()`` declares, and the counter) is restored, so replay and eager agree from iteration 0.

    Auxiliary optimisers keep their own ``step``: Difficulty-Net's Adam is capturable on CUDA (its lr β is
    constant), MWN's SGD uses its constant float lr, which the graph bakes in.

    The returned tensors of a graphed step are static: the next `step` overwrites them; read or clone them at
    logging points only. After ``load_state_dict`` of anything the mode owns (which rebinds tensors) call `reset`.

    Args:
        meta: the meta mode (model in train mode, on its device).
        graph: capture and replay a CUDA graph (CUDA only); see `resolve_graph`.
        precision: ``fp32`` or ``bf16`` (autocast without GradScaler, CUDA only; Difficulty-Net stays fp32).
        channels_last: keep the static image buffers in channels_last.
        warmup_iters: eager iterations on a side stream before capture (cuDNN autotuning, lazy state).
        capture_error_mode: passed to ``torch.cuda.graph`` (``global`` | ``thread_local`` | ``relaxed``).

    Attributes:
        counter: per-class training correct/total of the real forwards since the last ``counter.reset()``.
        guard: the finite-value flag of every iteration (`FiniteGuard`), read by the engine at logging points.
        warmup_seconds: wall time of the warm-up iterations (None until captured).
        capture_seconds: wall time of capture and instantiation (None until captured).
    """

    def __init__(
        self,
        meta: MetaMode,
        *,
        graph: bool = False,
        precision: str = "fp32",
        channels_last: bool = False,
        warmup_iters: int = 3,
        capture_error_mode: str = "global",
    ) -> None:
        if precision not in PRECISIONS:
            msg = f"precision must be one of {PRECISIONS}, got {precision!r}"
            raise ValueError(msg)
        if not isinstance(meta.optimizer, DeviceLRSGD):
            msg = (f"TrainStep needs the main optimizer to be a DeviceLRSGD (SGD with device learning rates), "
                   f"got {type(meta.optimizer).__name__}")
            raise TypeError(msg)
        self.meta, self.device = meta, meta.device
        if graph and not (self.device.type == "cuda" and torch.cuda.is_available()):
            msg = f"a CUDA-graph step needs a CUDA model, got device {self.device}"
            raise ValueError(msg)
        if graph and warmup_iters < 1:
            msg = f"capture needs at least one warm-up iteration, got {warmup_iters}"
            raise ValueError(msg)
        if precision == "bf16" and self.device.type != "cuda":
            log.warning("precision=bf16 is CUDA-only; the step on %s runs in fp32", self.device)
        self.graph, self.precision, self.channels_last = graph, precision, channels_last
        self.warmup_iters, self.capture_error_mode = warmup_iters, capture_error_mode
        self.counter = DeviceClassCounter(meta.num_classes, self.device)
        owned = meta.owned()
        self.guard = FiniteGuard((p for m in owned.modules.values() for p in m.parameters()), self.device)
        self.warmup_seconds: float | None = None
        self.capture_seconds: float | None = None
        self._static: dict[str, Tensor] = {}
        self._graph: Any = None  # torch.cuda.CUDAGraph once captured
        self._outputs: dict[str, Tensor] = {}

    def reset(self) -> None:
        """Drops the captured graph; the next `step` captures again (after state tensors were rebound)."""
        self._graph, self._outputs = None, {}
        self.warmup_seconds = self.capture_seconds = None

    @property
    def captured(self) -> bool:
        """Whether a graph has been captured (and `step` replays it)."""
        return self._graph is not None

    @property
    def lrs(self) -> list[Tensor]:
        """The device lr tensor of each main-optimiser group (update them in place, e.g. with ``apply_lr``)."""
        return [g["lr"] for g in self.meta.optimizer.param_groups]

    # -- static inputs --------------------------------------------------------------------------------

    def _load(self, x: Tensor, y: Tensor, meta_batch: tuple[Tensor, Tensor] | None) -> None:
        """Copies the inputs into the static buffers (allocated at the first call)."""
        inputs = {"x": x, "y": y}
        if self.meta.needs_meta_batch:
            if meta_batch is None:
                msg = f"meta mode {type(self.meta).__name__} needs a meta batch"
                raise ValueError(msg)
            inputs |= {"xm": meta_batch[0], "ym": meta_batch[1]}
        for name, value in inputs.items():
            self._static_for(name, value).copy_(value, non_blocking=True)

    def _static_for(self, name: str, value: Tensor) -> Tensor:
        buf = self._static.get(name)
        if buf is None:
            fmt = torch.channels_last if self.channels_last and value.ndim == 4 else torch.contiguous_format
            buf = self._static[name] = torch.empty(
                value.shape, dtype=value.dtype, device=self.device
            ).contiguous(memory_format=fmt)
        elif buf.shape != value.shape or buf.dtype != value.dtype:
            msg = (
                f"static input {name!r} is {tuple(buf.shape)} {buf.dtype}, got {tuple(value.shape)} {value.dtype}: "
                "the step needs fixed shapes (drop or pad the last partial batch)"
            )
            raise ValueError(msg)
        return buf

    # -- running --------------------------------------------------------------------------------------

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.device.type != "cuda":
            return contextlib.nullcontext()
        # cache_enabled=False: autocast's weight-cast cache must not outlive a capture (torch CUDA-graph notes).
        return torch.autocast(
            "cuda", dtype=torch.bfloat16, enabled=self.precision == "bf16", cache_enabled=False
        )

    def _run(self) -> dict[str, Tensor]:
        """One eager iteration on the static buffers: the mode's step, then the training counters."""
        s = self._static
        meta_batch = (s["xm"], s["ym"]) if self.meta.needs_meta_batch else None
        with self._autocast():
            out = self.meta.step(s["x"], s["y"], meta_batch)
        logits = out["logits"]
        self.counter.update(logits.to(torch.promote_types(logits.dtype, torch.float32)), s["y"])  # never narrows
        self.guard.update(v for v in out.values() if v.ndim == 0)
        return out

    def step(
        self, x: Tensor, y: Tensor, meta_batch: tuple[Tensor, Tensor] | None = None
    ) -> dict[str, Tensor]:
        """One training iteration.

        Args:
            x: (B, 3, H, W) training images; B, H, W fixed for the life of the step.
            y: (B,) int64 labels.
            meta_batch: (x^m (m, 3, H, W), y^m (m,)) when the mode needs one, else ignored.

        Returns:
            The mode's detached outputs (scalars ``loss``, ``driver_loss``, ``meta_loss``, ``weight_*``, and the
            real forward's ``logits`` (B, C)); static tensors overwritten by the next step when graphed.

        Raises:
            ValueError: a shape or dtype differs from the first call, or a needed meta batch is missing.
        """
        self._load(x, y, meta_batch)
        if not self.graph:
            return self._run()
        if self._graph is None:
            self._capture()
        self._graph.replay()
        return dict(self._outputs)

    def _warm_up(self) -> None:
        """``warmup_iters`` eager iterations, on a side stream on CUDA (the documented pre-capture pattern)."""
        if self.device.type != "cuda":
            for _ in range(self.warmup_iters):
                self._run()
            return
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(self.warmup_iters):
                self._run()
        torch.cuda.current_stream(self.device).wait_stream(side)

    def rehearse(self, x: Tensor, y: Tensor, meta_batch: tuple[Tensor, Tensor] | None = None) -> None:
        """Runs the pre-capture warm-up and restores the snapshot, without capturing (testable on CPU).

        After it, the state equals the state before it (parameters, BN buffers, optimiser states, counters,
        RNG), which is what lets the first replay match the eager run.
        """
        self._load(x, y, meta_batch)
        snapshot = self._snapshot()
        self._warm_up()
        snapshot.restore()

    def _snapshot(self) -> StateSnapshot:
        return StateSnapshot(self.meta, self.counter, extra=self.guard.tensors)

    def _capture(self) -> None:
        """Snapshot, warm-up, capture, restore; times warm-up and capture separately."""
        snapshot = self._snapshot()
        start = time.perf_counter()
        self._warm_up()
        torch.cuda.synchronize(self.device)  # sync point: the warm-up time is measured on its own
        warmed = time.perf_counter()
        for opt in step_optimizers(self.meta):
            opt.zero_grad(set_to_none=True)  # backward then allocates gradients from the graph's pool
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode=self.capture_error_mode):
            outputs = self._run()
        torch.cuda.synchronize(self.device)  # sync point: capture + instantiation time
        self.warmup_seconds, self.capture_seconds = warmed - start, time.perf_counter() - warmed
        snapshot.restore()
        self._graph, self._outputs = graph, outputs
