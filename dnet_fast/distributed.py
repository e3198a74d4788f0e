"""torchrun scale-out: the process group from torchrun's environment, the collectives of a distributed step
(`Collective`), the DistributedDataParallel forward, and the rank-0 helpers of the engine and the CLI.

One distributed iteration on N ranks with per-rank batch b is one single-process iteration on the global batch
of N·b (README, "Multi-GPU with torchrun"). Every rank computes its share with the *local* loss denominator
Z/N (Z: the global one, N·b or the global Σ_i v_{y_i}), so that the mean over ranks of any local gradient is the
global gradient; DDP averages the real step's gradients, and `Collective.mean` averages what the meta modes
compute outside DDP (virtual-step gradients, v = ∂L_meta/∂φ̂, Difficulty-Net's θ-gradient). Off torchrun
`LOCAL` stands in: every method returns its input unchanged, so the single-process step is the same code with
the same numbers.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import sys
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from dnet_fast.config import TrainConfig

__all__ = [
    "DDP_CAPTURE_WARMUP",
    "ENV_KEYS",
    "GRAPH_UNDER_DDP",
    "LOCAL",
    "Collective",
    "MutedHistory",
    "data_parallel",
    "env_rank",
    "graph_fallback_reason",
    "init_from_env",
    "launched",
    "prepare_model",
    "reported",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: What torchrun (and any launcher using ``init_method="env://"``) exports to every worker.
ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")

#: Whether the CUDA-graph step under DistributedDataParallel (NCCL all-reduce captured inside the graph) has
#: passed ``tests/test_distributed_gpu.py`` on a GPU. Until then a torchrun run with ``run.graph`` auto/on takes
#: the eager step and logs why (`graph_fallback_reason`). When True, the capture preconditions of torch's
#: CUDA-graph notes for DDP apply: NCCL's async error handling off before the group exists, DDP built on a side
#: stream, at least `DDP_CAPTURE_WARMUP` eager DDP iterations before the capture.
GRAPH_UNDER_DDP = False
#: Eager DDP iterations before a capture (torch's CUDA-graph notes: at least 11).
DDP_CAPTURE_WARMUP = 11


def launched() -> bool:
    """Whether this process was started by torchrun (every key of `ENV_KEYS` is set)."""
    return all(key in os.environ for key in ENV_KEYS)


def env_rank() -> int:
    """This process's global rank from the environment (0 off torchrun), readable before the group exists."""
    return int(os.environ.get("RANK", "0")) if launched() else 0


@dataclass(frozen=True)
class Collective:
    """The reductions one training process needs from its process group; every one is a no-op without a group.

    Attributes:
        rank: this process's rank in ``group`` (0 off torchrun).
        world_size: N, the number of ranks in ``group``.
        local_rank: the rank on this node (selects the GPU).
        group: the ``torch.distributed`` process group, or None for the single process (`LOCAL`).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    group: Any = None

    @property
    def distributed(self) -> bool:
        """Whether collectives run (a process group exists, even of size 1)."""
        return self.group is not None

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes checkpoints, logs, TensorBoard, the history and the progress line."""
        return self.rank == 0

    def device(self, device: torch.device) -> torch.device:
        """The device of this rank: ``cuda:LOCAL_RANK`` for a CUDA run under torchrun, else ``device``."""
        if self.distributed and device.type == "cuda":
            return torch.device("cuda", self.local_rank)
        return device

    # -- reductions -------------------------------------------------------------------------------------

    def mean(self, tensors: Sequence[Tensor | None]) -> Sequence[Tensor | None]:
        """The mean over ranks of each tensor (None entries stay None), as new detached tensors.

        One all-reduce per (device, dtype) over the flattened tensors. Off torchrun ``tensors`` itself is
        returned, untouched.
        """
        if not self.distributed:
            return tensors
        present = [t.detach() for t in tensors if t is not None]
        reduced = iter(self._all_reduce(present, mean=True))
        return [None if t is None else next(reduced) for t in tensors]

    def mean_keep_graph(self, tensors: Sequence[Tensor | None]) -> Sequence[Tensor | None]:
        """Each tensor replaced by its mean over ranks in value, its autograd graph kept as the local one's.

        ḡ + (g − g.detach()): the value is ḡ exactly, the derivative that of the local g. The double-backward
        meta-gradient builds φ̂ from it; the mean over ranks of the resulting θ-gradients is the global one.
        """
        if not self.distributed:
            return tensors
        means = self.mean(tensors)
        return [None if g is None else m + (g - g.detach()) for g, m in zip(tensors, means, strict=True)]

    def sum_(self, tensors: Sequence[Tensor]) -> None:
        """Sums each tensor over ranks in place (per-class counters)."""
        if not self.distributed:
            return
        for t, total in zip(tensors, self._all_reduce(list(tensors), mean=False), strict=True):
            t.copy_(total)

    def summed(self, *tensors: Tensor) -> tuple[Tensor, ...]:
        """Copies of ``tensors`` summed over ranks (the tensors themselves off torchrun)."""
        if not self.distributed:
            return tensors
        return tuple(self._all_reduce([t.detach() for t in tensors], mean=False))

    def mean_scalars(self, values: dict[str, Tensor]) -> dict[str, Tensor]:
        """The logged 0-d statistics averaged over ranks (the global-batch loss; equal values stay equal)."""
        if not self.distributed or not values:
            return values
        return dict(zip(values, self.mean(list(values.values())), strict=True))

    def _all_reduce(self, tensors: list[Tensor], *, mean: bool) -> list[Tensor]:
        out: list[Tensor | None] = [None] * len(tensors)
        for positions in _by_kind(tensors).values():
            flat = torch.cat([tensors[i].reshape(-1) for i in positions])
            dist.all_reduce(flat, group=self.group)
            if mean:
                flat.div_(self.world_size)
            for i, part in zip(positions, flat.split([tensors[i].numel() for i in positions]), strict=True):
                out[i] = part.view_as(tensors[i])
        return out  # type: ignore[return-value]

    # -- rank 0 and data --------------------------------------------------------------------------------

    def broadcast_buffers(self, module: nn.Module) -> None:
        """Copies rank 0's buffers (BatchNorm running statistics) into every rank's ``module``, in place.

        DDP broadcasts them before each of its forwards; evaluation runs the bare module after the last
        training forward, whose running-statistics update differs per rank unless SyncBatchNorm is used.
        """
        buffers = [b for b in module.buffers() if b.numel()]
        if not self.distributed or not buffers:
            return
        for positions in _by_kind(buffers).values():
            flat = torch.cat([buffers[i].reshape(-1) for i in positions])
            dist.broadcast(flat, src=dist.get_global_rank(self.group, 0), group=self.group)
            for i, part in zip(positions, flat.split([buffers[i].numel() for i in positions]), strict=True):
                buffers[i].copy_(part.view_as(buffers[i]))

    def broadcast_object(self, obj: T) -> T:
        """Rank 0's ``obj`` on every rank (picklable; ``obj`` itself off torchrun)."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=dist.get_global_rank(self.group, 0), group=self.group)
        return box[0]

    def barrier(self) -> None:
        """Waits for every rank (e.g. until rank 0 has written a checkpoint the others will read)."""
        if self.distributed:
            dist.barrier(group=self.group)

    def shard(self, items: T) -> T:
        """Rank r's share ``items[r::N]`` of a sequence or tensor (``items`` itself off torchrun)."""
        if not self.distributed:
            return items
        return items[self.rank :: self.world_size]  # type: ignore[index]

    def shard_indices(self, n: int) -> np.ndarray:
        """Indices r, r + N, ... below ``n``: this rank's share of an evaluation split."""
        return np.arange(self.rank, n, self.world_size, dtype=np.int64)

    def stream_index(self, step: int) -> int:
        """This rank's position in the meta-batch stream at iteration ``step``: step·N + r.

        The N ranks take N consecutive batches of the single-process stream, so no two ranks draw the same
        batch and their union is what one process would draw over N iterations.
        """
        return step * self.world_size + self.rank


#: The single process: no group, every collective a no-op.
LOCAL = Collective()


def _by_kind(tensors: list[Tensor]) -> dict[tuple[torch.device, torch.dtype], list[int]]:
    """Positions of ``tensors`` grouped by (device, dtype): one flat buffer and one collective per group."""
    kinds: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, t in enumerate(tensors):
        kinds.setdefault((t.device, t.dtype), []).append(i)
    return kinds


# ----------------------------------------------------------------------------------------------------------
# The process group and the model


def init_from_env(device: torch.device, timeout_s: float, *, capture: bool = False) -> Collective:
    """The `Collective` of this process: `LOCAL` off torchrun, else the default group, created if needed.

    Backend by device: NCCL for CUDA (after ``torch.cuda.set_device(LOCAL_RANK)``), Gloo otherwise. Every
    collective of the group fails after ``timeout_s`` seconds instead of waiting for a rank that stopped.
    ``capture``: the step may be graph-captured under DDP (``run.graph`` not off): once `GRAPH_UNDER_DDP` is set,
    NCCL's async error handling is turned off first, as capture requires (a stopped rank is then caught by
    torchrun's agent rather than by the timeout).
    """
    if not launched():
        return LOCAL
    local_rank = int(os.environ["LOCAL_RANK"])
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
            if capture and GRAPH_UNDER_DDP:
                os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "0")
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    if dist.get_rank() != 0:
        logging.getLogger("dnet_fast").setLevel(logging.ERROR)  # warnings once, from rank 0; errors from every rank
    return Collective(dist.get_rank(), dist.get_world_size(), local_rank, dist.group.WORLD)


def prepare_model(model: nn.Module, cfg: TrainConfig, collective: Collective) -> nn.Module:
    """``model`` with SyncBatchNorm when ``model.sync_bn`` asks for it under torchrun (before the optimiser).

    Raises:
        ValueError: SyncBatchNorm on a CPU model (torch implements it for GPUs only), or with
            ``meta.mode=exact`` on several ranks (its virtual step differentiates BatchNorm in forward mode or
            twice, and torch's SyncBatchNorm has neither rule).
    """
    if not cfg.model.sync_bn:
        return model
    if not collective.distributed:
        log.info("model.sync_bn has no effect on one process: BatchNorm already sees the whole batch")
        return model
    device = next(model.parameters()).device
    if device.type != "cuda":
        msg = ("model.sync_bn=true needs CUDA: torch's SyncBatchNorm runs on GPUs only; on the CPU (Gloo) each "
               "rank normalises with its own batch statistics (set model.sync_bn=false)")
        raise ValueError(msg)
    if cfg.meta.mode == "exact" and collective.world_size > 1:
        msg = ("model.sync_bn=true with meta.mode=exact: the virtual step differentiates BatchNorm in forward mode "
               "(meta.grad=jvp) or twice (double_backward), and torch's SyncBatchNorm has neither rule; use "
               "model.sync_bn=false (per-rank BatchNorm statistics) or meta.mode=driver|off")
        raise ValueError(msg)
    return nn.SyncBatchNorm.convert_sync_batchnorm(model, process_group=collective.group)


def data_parallel(model: nn.Module, collective: Collective, *, capture: bool = False) -> nn.Module:
    """The real forward under torchrun: ``DistributedDataParallel(model)`` over ``collective.group``.

    Construction broadcasts rank 0's parameters and buffers; every forward broadcasts the buffers again (DDP's
    default, named ``broadcast_buffers`` up to torch 2.12 and ``forward_sync_buffers`` since), and the real
    step's backward averages the gradients over ranks in buckets, overlapped with the backward. The meta modes'
    virtual and meta forwards call the bare ``model`` (``functional_call``); their reductions go through
    `Collective.mean`. ``capture``: the step will be CUDA-graph captured, so DDP is built on a side stream
    (torch's precondition for capturing its backward).
    """
    device = next(model.parameters()).device
    index = torch.cuda.current_device() if device.type == "cuda" and device.index is None else device.index
    side = torch.cuda.Stream(device) if capture and device.type == "cuda" else None
    with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
        ddp = nn.parallel.DistributedDataParallel(
            model,
            device_ids=[index] if device.type == "cuda" else None,
            process_group=collective.group,
        )
    if side is not None:
        torch.cuda.current_stream(device).wait_stream(side)
    return ddp


def graph_fallback_reason(graph: bool, collective: Collective) -> str | None:
    """Why a CUDA-graph step becomes eager under DDP (None when nothing changes)."""
    if not graph or not collective.distributed or GRAPH_UNDER_DDP:
        return None
    return ("the CUDA-graph step under DistributedDataParallel (NCCL all-reduce inside the graph) has not passed "
            "tests/test_distributed_gpu.py on a GPU yet (distributed.GRAPH_UNDER_DDP); the step runs eagerly")


# ----------------------------------------------------------------------------------------------------------
# Rank 0 and failures


class MutedHistory:
    """The history writer of ranks other than 0: writes nothing, tracks ``last_step`` as the real one does.

    Args:
        last_step: rank 0's ``HistoryWriter.last_step`` at start (broadcast), so every rank takes the same
            branches (and hence the same collectives) in the training loop.
    """

    def __init__(self, last_step: int | None) -> None:
        self.last_step = last_step

    def append(self, row: Any) -> None:
        """Records the row's step only."""
        self.last_step = row.step

    def close(self) -> None:
        """Nothing to close."""


_COMM_ERRORS = (dist.DistError,)
_COMM_WORDS = ("gloo", "nccl", "connection", "timed out", "timeout", "peer")


def _stopped_by_peer(err: BaseException) -> bool:
    if isinstance(err, _COMM_ERRORS):
        return True
    return isinstance(err, RuntimeError) and any(w in str(err).lower() for w in _COMM_WORDS)


@contextlib.contextmanager
def reported(prog: str) -> Iterator[None]:
    """Runs a torchrun worker's command: a failure is reported in one line naming this rank, then it exits.

    A collective that fails because another rank stopped (its connection closed, or ``run.dist_timeout``
    passed) says so; that rank's own line names the cause. Exit status 2 for bad values, files and missing
    modules (as the CLI's other errors), 1 otherwise. The process group is destroyed on the way out. Off
    torchrun the block runs unchanged.
    """
    if not launched():
        yield
        return
    where = f"rank {os.environ['RANK']} of {os.environ['WORLD_SIZE']}"
    try:
        yield
    except (ValueError, OSError, ImportError) as err:
        if _stopped_by_peer(err):
            _stop(prog, where, err)
        print(f"{prog}: error on {where}: {err}", file=sys.stderr, flush=True)
        raise SystemExit(2) from err
    except Exception as err:  # noqa: BLE001  (every failure of a rank must be reported with its rank)
        if _stopped_by_peer(err):
            _stop(prog, where, err)
        traceback.print_exc()
        print(f"{prog}: error on {where}: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
        raise SystemExit(1) from err
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _stop(prog: str, where: str, err: BaseException) -> None:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    print(f"{prog}: {where} stopped: a collective failed, most likely because another rank stopped first (its "
          f"own message names the cause): {type(err).__name__}: {first}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    # Exit at once: tearing down a process group whose peer is gone can abort in gloo's destructor
    # ("terminate called without an active exception"), which would turn this clear exit into SIGABRT.
    os._exit(1)
