"""The training step: static device buffers, tensor learning rates, whole-iteration CUDA-graph capture (or eager)."""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from dnet_fast.meta import MetaMode
from dnet_fast.metrics import DeviceClassCounter

__all__ = [
    "GRAPH_CHOICES",
    "PRECISIONS",
    "ZERO_INIT_STATE",
    "StateSnapshot",
    "TrainStep",
    "build_train_step",
    "init_momentum_buffers_",
    "mutable_state",
    "resolve_graph",
    "sgd_step_",
    "step_optimizers",
    "tensor_lrs_",
]

log = logging.getLogger(__name__)

#: Values of ``run.graph``: auto (graph iff CUDA), on (graph; error without CUDA), off (eager).
GRAPH_CHOICES = ("auto", "on", "off")
#: Values of ``run.precision``.
PRECISIONS = ("fp32", "bf16")
#: Optimizer-state keys that torch (Adam, AdamW, SGD) and `sgd_step_` initialise to zeros. State created lazily
#: during the capture warm-up is reset to zeros, which equals a fresh state only for these keys.
ZERO_INIT_STATE = frozenset({"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer"})


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


# ----------------------------------------------------------------------------------------------------------
# Learning rates as device tensors, and an SGD that reads them without a host sync.
#
# torch.optim.SGD (2.4 ... 2.13) accepts a tensor lr, but its single-tensor and foreach paths apply it as
# ``param.add_(grad, alpha=-lr)``: turning the tensor into a Scalar is an ``.item()``, a host sync that fails
# under capture (pytorch/pytorch #106802). Only ``fused=True`` passes lr to the kernel as a device pointer; it is
# a different kernel with its own rounding and its own first-step branch. `sgd_step_` is the foreach update
# with the tensor lr applied by ``_foreach_mul`` / ``_foreach_sub_``, used by the eager and the graph path alike.


def _lr_dtype(group: dict[str, Any]) -> torch.dtype:
    """The dtype of a group's lr tensor: its parameters' dtype, at least float32 (α·g in the params' precision)."""
    first = group["params"][0]
    return torch.promote_types(torch.float32, first.dtype)


def tensor_lrs_(optimizer: torch.optim.Optimizer, device: torch.device | str) -> list[Tensor]:
    """Replaces every group's ``lr`` by a 0-d tensor on ``device`` (in place in the group dict); returns them.

    A group whose lr already is such a tensor keeps it (its address may be captured). ``apply_lr`` then updates
    the tensors with ``fill_``, so a schedule change needs no re-capture; the virtual step α of the meta modes
    reads the same tensors.
    """
    device = torch.device(device)
    lrs = []
    for group in optimizer.param_groups:
        lr, dtype = group["lr"], _lr_dtype(group)
        if not (isinstance(lr, Tensor) and lr.ndim == 0 and lr.device == device and lr.dtype == dtype):
            # sync point (build time only): a tensor lr loaded from a checkpoint is read once
            value = float(lr)
            group["lr"] = torch.tensor(value, device=device, dtype=dtype)
        lrs.append(group["lr"])
    return lrs


def _check_sgd_group(group: dict[str, Any]) -> None:
    if group.get("dampening", 0) != 0:
        msg = "sgd_step_ supports dampening=0 only (zero-initialised momentum then equals torch's first step)"
        raise ValueError(msg)
    if group.get("differentiable", False):
        msg = "sgd_step_ does not support differentiable=True"
        raise ValueError(msg)


def init_momentum_buffers_(optimizer: torch.optim.Optimizer) -> None:
    """Creates missing ``momentum_buffer`` states as zeros, before any capture, so their addresses are fixed.

    With dampening 0, ``0·μ + g = g`` bit for bit, so a zero buffer behaves exactly as torch's first-step
    ``buf = g.clone()``; checkpoints keep torch's state layout.
    """
    for group in optimizer.param_groups:
        _check_sgd_group(group)
        if group.get("momentum", 0) == 0:
            continue
        for p in group["params"]:
            state = optimizer.state[p]
            if state.get("momentum_buffer") is None:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)


@torch.no_grad()
def sgd_step_(optimizer: torch.optim.Optimizer) -> None:
    """One step of ``optimizer`` (a ``torch.optim.SGD``) in place, reading tensor lrs on the device.

    Same update as ``torch.optim.SGD`` (coupled weight decay, momentum, Nesterov, maximize; dampening 0): every
    state tensor is updated in place, nothing is rebound after `init_momentum_buffers_`, and no value is read on
    the host, so the step can be captured. Bit-identical to torch when α·g is exact (e.g. power-of-two lrs);
    otherwise torch fuses p − α·g into one FMA and the results may differ in the last bit.

    Raises:
        ValueError: dampening ≠ 0, differentiable groups or sparse gradients.
    """
    for group in optimizer.param_groups:
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            continue
        _check_sgd_group(group)
        grads = [p.grad for p in params]
        if any(g.is_sparse for g in grads):
            msg = "sgd_step_ does not support sparse gradients"
            raise ValueError(msg)
        if group.get("maximize", False):
            grads = torch._foreach_neg(grads)
        weight_decay, momentum = group["weight_decay"], group["momentum"]
        if weight_decay != 0:
            grads = torch._foreach_add(grads, params, alpha=weight_decay)  # out of place: p.grad stays ∇L
        if momentum != 0:
            bufs = [_momentum_buffer(optimizer, p) for p in params]
            torch._foreach_mul_(bufs, momentum)
            torch._foreach_add_(bufs, grads)
            grads = torch._foreach_add(grads, bufs, alpha=momentum) if group["nesterov"] else bufs
        _descend_(params, grads, group["lr"])


def _momentum_buffer(optimizer: torch.optim.Optimizer, p: Tensor) -> Tensor:
    state = optimizer.state[p]
    buf = state.get("momentum_buffer")
    if buf is None:  # eager use without init_momentum_buffers_; never reached inside a capture
        buf = state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    return buf


def _descend_(params: list[Tensor], updates: list[Tensor], lr: float | Tensor) -> None:
    """p ← p − lr·u; a tensor lr stays on the device (no ``alpha=`` Scalar, which would call ``.item()``)."""
    if isinstance(lr, Tensor):
        torch._foreach_sub_(params, torch._foreach_mul(updates, lr))
    else:
        torch._foreach_add_(params, updates, alpha=-lr)


# ----------------------------------------------------------------------------------------------------------
# Snapshot and restore of everything a step mutates in place.


def step_optimizers(meta: MetaMode) -> list[torch.optim.Optimizer]:
    """The optimisers a step of ``meta`` updates: the main one first, then auxiliary ones (Adam of D, SGD of V)."""
    aux = [v for v in vars(meta).values() if isinstance(v, torch.optim.Optimizer) and v is not meta.optimizer]
    return [meta.optimizer, *aux]


def _modules(meta: MetaMode) -> list[nn.Module]:
    """Model, criterion and auxiliary nets held by ``meta`` (parameters and buffers a step may change)."""
    return [v for v in vars(meta).values() if isinstance(v, nn.Module)]


def _optimizer_state(optimizers: Iterable[torch.optim.Optimizer]) -> Iterator[tuple[str, Tensor]]:
    for opt in optimizers:
        for state in opt.state.values():
            for key, value in state.items():
                if isinstance(value, Tensor):
                    yield key, value


def mutable_state(meta: MetaMode, counter: DeviceClassCounter | None = None) -> list[Tensor]:
    """Every tensor a step of ``meta`` may change in place (deduplicated, in a stable order).

    Parameters and buffers of the model, criterion and auxiliary nets (BN running statistics and
    ``num_batches_tracked`` included), the optimiser states that exist now, A, and the counters.
    """
    tensors: list[Tensor] = [meta.acc]
    for module in _modules(meta):
        tensors += [*module.parameters(), *module.buffers()]
    tensors += [t for _, t in _optimizer_state(step_optimizers(meta))]
    if counter is not None:
        tensors += [counter.correct, counter.total]
    unique: dict[int, Tensor] = {}
    for t in tensors:
        unique.setdefault(id(t), t)  # shared tensors (tied weights, the same optimizer twice) once
    return list(unique.values())


class StateSnapshot:
    """Copies of the step's mutable state and RNG, restorable in place (tensor addresses never change).

    Warm-up iterations before a capture update parameters, BN running statistics, optimiser states and counters
    an extra time; restoring the snapshot after capture makes the first replay start from the eager state.
    Optimiser state that did not exist at snapshot time (torch creates Adam's lazily) is reset to zeros, its
    fresh value (`ZERO_INIT_STATE`).

    Args:
        meta: the meta mode whose state to save.
        counter: device class counters to save as well.
    """

    def __init__(self, meta: MetaMode, counter: DeviceClassCounter | None = None) -> None:
        self.meta, self.counter = meta, counter
        with torch.no_grad():
            self._saved = [(t, t.detach().clone()) for t in mutable_state(meta, counter)]
        self._cpu_rng = torch.get_rng_state()
        self._cuda_rng = torch.cuda.get_rng_state(meta.device) if meta.device.type == "cuda" else None

    @torch.no_grad()
    def restore(self) -> None:
        """Copies the saved values back in place and zeros optimiser state created since the snapshot.

        Raises:
            RuntimeError: a new optimiser state is not zero-initialised in torch (cannot be restored).
        """
        for tensor, saved in self._saved:
            tensor.copy_(saved)
        known = {id(t) for t, _ in self._saved}
        for key, value in _optimizer_state(step_optimizers(self.meta)):
            if id(value) in known:
                continue
            if key not in ZERO_INIT_STATE:
                msg = f"optimizer state {key!r} appeared during warm-up and has no known initial value"
                raise RuntimeError(msg)
            value.zero_()
        torch.set_rng_state(self._cpu_rng)
        if self._cuda_rng is not None:
            torch.cuda.set_rng_state(self._cuda_rng, self.meta.device)


# ----------------------------------------------------------------------------------------------------------
# The step


class TrainStep:
    """One training iteration through static buffers: replays a captured CUDA graph, or runs the same code eagerly.

    The meta mode's real step is switched to `sgd_step_` with device lrs (`tensor_lrs_`), and its real forward
    feeds ``counter`` (per-class training correct/total, ``index_add_``). `step` copies the inputs into static
    buffers (fixed shapes), then either runs ``meta.step`` on them (eager) or, on CUDA with ``graph``, replays
    the graph captured at the first call: warm-up iterations on a side stream, capture with
    ``torch.cuda.graph``, then the state snapshotted before the warm-up is restored, so replay and eager agree
    from iteration 0. Nothing in `step` syncs with the host (a CPU input is copied in, which may).

    Auxiliary optimisers keep their own ``step``: Difficulty-Net's Adam is capturable on CUDA (its lr β is
    constant), MWN's SGD uses its constant float lr, which the graph bakes in.

    The returned tensors of a graphed step are static: the next `step` overwrites them; read or clone them at
    logging points only. After ``optimizer.load_state_dict`` (which rebinds state tensors) call `reset`.

    Args:
        meta: the meta mode (model in train mode, on its device).
        counter: training counters (default: a new ``DeviceClassCounter`` on the model's device).
        graph: capture and replay a CUDA graph (CUDA only); see `resolve_graph`.
        precision: ``fp32`` or ``bf16`` (autocast without GradScaler, CUDA only; Difficulty-Net stays fp32).
        channels_last: keep the static image buffers in channels_last.
        compile_backbone: ``torch.compile`` the real forward; applied only to modes without a meta batch
            (off, driver): the virtual/meta forwards use ``functional_call`` and double backward, which
            compiled code does not support.
        warmup_iters: eager iterations on a side stream before capture (cuDNN autotuning, lazy state).
        capture_error_mode: passed to ``torch.cuda.graph`` (``global`` | ``thread_local`` | ``relaxed``).

    Attributes:
        warmup_seconds: wall time of the warm-up iterations (None until captured).
        capture_seconds: wall time of capture and instantiation (None until captured).
    """

    def __init__(
        self,
        meta: MetaMode,
        *,
        counter: DeviceClassCounter | None = None,
        graph: bool = False,
        precision: str = "fp32",
        channels_last: bool = False,
        compile_backbone: bool = False,
        warmup_iters: int = 3,
        capture_error_mode: str = "global",
    ) -> None:
        if precision not in PRECISIONS:
            msg = f"precision must be one of {PRECISIONS}, got {precision!r}"
            raise ValueError(msg)
        self.meta, self.device = meta, meta.device
        if graph and not (self.device.type == "cuda" and torch.cuda.is_available()):
            msg = f"a CUDA-graph step needs a CUDA model, got device {self.device}"
            raise ValueError(msg)
        if graph and warmup_iters < 1:
            msg = f"capture needs at least one warm-up iteration, got {warmup_iters}"
            raise ValueError(msg)
        if precision == "bf16" and self.device.type != "cuda":
            log.warning("precision=bf16 is CUDA-only; the step on %s runs in fp32", self.device)
        self.graph = graph
        self.precision = precision
        self.channels_last = channels_last
        self.warmup_iters = warmup_iters
        self.capture_error_mode = capture_error_mode
        self.counter = counter if counter is not None else DeviceClassCounter(meta.num_classes, self.device)
        self.warmup_seconds: float | None = None
        self.capture_seconds: float | None = None
        self._static: dict[str, Tensor] = {}
        self._graph: Any = None  # torch.cuda.CUDAGraph once captured
        self._outputs: dict[str, Tensor] = {}
        self._install(compile_backbone=compile_backbone)

    # -- set-up ---------------------------------------------------------------------------------------

    def _install(self, *, compile_backbone: bool = False) -> None:
        m = self.meta
        if not isinstance(m.optimizer, torch.optim.SGD):
            msg = f"TrainStep drives the main optimizer with sgd_step_; got {type(m.optimizer).__name__}, not SGD"
            raise TypeError(msg)
        tensor_lrs_(m.optimizer, self.device)
        init_momentum_buffers_(m.optimizer)
        m.update = functools.partial(sgd_step_, m.optimizer)
        m.on_train_logits = self._count
        if compile_backbone:
            if m.needs_meta_batch:
                log.info("compile_backbone ignored for %s: functional_call/double backward", type(m).__name__)
            else:
                m.train_forward = torch.compile(m.model)

    def _count(self, logits: Tensor, y: Tensor) -> None:
        self.counter.update(logits.to(torch.promote_types(logits.dtype, torch.float32)), y)  # never narrows fp64

    def reset(self) -> None:
        """Drops the captured graph and re-reads lrs and optimiser state; the next `step` captures again.

        Call it after anything rebinds state tensors (``optimizer.load_state_dict``, replaced param groups).
        """
        self._graph, self._outputs = None, {}
        self.warmup_seconds = self.capture_seconds = None
        self._install()

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

    def _meta_batch(self) -> tuple[Tensor, Tensor] | None:
        return (self._static["xm"], self._static["ym"]) if self.meta.needs_meta_batch else None

    # -- running --------------------------------------------------------------------------------------

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.device.type != "cuda":
            return contextlib.nullcontext()
        # cache_enabled=False: autocast's weight-cast cache must not outlive a capture (torch CUDA-graph notes).
        return torch.autocast(
            "cuda", dtype=torch.bfloat16, enabled=self.precision == "bf16", cache_enabled=False
        )

    def _run(self) -> dict[str, Tensor]:
        """One eager iteration on the static buffers."""
        with self._autocast():
            return self.meta.step(self._static["x"], self._static["y"], self._meta_batch())

    def step(
        self, x: Tensor, y: Tensor, meta_batch: tuple[Tensor, Tensor] | None = None
    ) -> dict[str, Tensor]:
        """One training iteration.

        Args:
            x: (B, 3, H, W) training images; B, H, W fixed for the life of the step.
            y: (B,) int64 labels.
            meta_batch: (x^m (m, 3, H, W), y^m (m,)) when the mode needs one, else ignored.

        Returns:
            The mode's detached scalars (``loss``, ``driver_loss``, ``meta_loss``, ``weight_*``); static tensors
            overwritten by the next step when graphed.

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
        snapshot = StateSnapshot(self.meta, self.counter)
        self._warm_up()
        snapshot.restore()

    def _capture(self) -> None:
        """Snapshot, warm-up, capture, restore; times warm-up and capture separately."""
        snapshot = StateSnapshot(self.meta, self.counter)
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


def build_train_step(
    meta: MetaMode,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    num_classes: int,
    *,
    graph: bool,
    precision: str = "fp32",
    channels_last: bool = False,
    compile_backbone: bool = False,
    warmup_iters: int = 3,
    counter: DeviceClassCounter | None = None,
) -> TrainStep:
    """The engine's entry point: a `TrainStep` over ``meta`` (which must hold ``model`` and ``optimizer``).

    Build it after restoring a checkpoint (or call `TrainStep.reset` afterwards). ``graph`` is usually
    ``resolve_graph(cfg.run.graph, device)``; the step applies bf16 autocast itself, so do not wrap `step`
    in another autocast.

    Raises:
        ValueError: ``meta`` does not hold ``model``/``optimizer``, or ``num_classes`` differs.
    """
    if meta.model is not model or meta.optimizer is not optimizer:
        msg = "build_train_step: meta must hold the given model and optimizer"
        raise ValueError(msg)
    if meta.num_classes != num_classes:
        msg = f"build_train_step: meta has {meta.num_classes} classes, got num_classes={num_classes}"
        raise ValueError(msg)
    return TrainStep(
        meta, counter=counter, graph=graph, precision=precision, channels_last=channels_last,
        compile_backbone=compile_backbone, warmup_iters=warmup_iters,
    )
