"""The ``distributed`` benchmark: images/s per rank of the DistributedDataParallel step (the torchrun path:
``build_stack`` with a ``dnet_fast.distributed.Collective``) against the single-process step, per meta mode.

Variants per mode ``m``: ``m`` (one process, no process group), ``m_ddp_w1`` (DDP over a process group of one
rank: the per-rank overhead of DDP and the meta modes' collectives), and on the CPU ``m_ddp_w2`` (two ranks: this
process and a helper process it starts, both with this process's thread count; per-rank throughput, so 1.0 is
perfect scaling). On CUDA (one GPU: no scaling, per-rank overhead only) also ``m_ddp_w1_graph``: the step captured
in a CUDA graph under DDP, NCCL all-reduce inside the graph (the check behind ``distributed.GRAPH_UNDER_DDP``);
a capture error skips the variant with the error as reason.

Every rank steps on the same synthetic batch (``bench_step.synthetic_problem``) with its own meta batches; data
loading is excluded. The helper process obeys commands broadcast by rank 0 (build a variant, run k iterations,
release, stop), so every timed call of a 2-rank variant is one lockstep round of both ranks.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from benchmarks.bench_step import Problem, balanced_meta_indices, synthetic_problem
from benchmarks.harness import BENCHMARKS, Benchmark, Profile, Ratio, SkipVariant

__all__ = ["CPU_POINTS", "GPU_POINTS", "QUICK_POINTS", "DistributedBenchmark", "variants_of"]

_BASE = {"model": "resnet20", "width": 8, "classes": 10, "image": 16, "batch": 32, "meta_batch": 20,
         "meta_per_class": 4, "precision": "fp32", "channels_last": False, "modes": "off,driver,exact"}
#: CPU: a small ResNet-20 (width 8) at 16 px, batch 32 per rank, 1 and 2 ranks.
CPU_POINTS = ({"name": "r20_cpu", **_BASE, "world": 2, "iters": 2},)
#: GPU (one device): ResNet-32 CIFAR-100 fp32 and ResNet-50 bf16, as the step benchmark; world size 1 only.
GPU_POINTS = (
    {"name": "r32_fp32", **_BASE, "model": "resnet32", "width": 16, "classes": 100, "image": 32, "batch": 128,
     "meta_batch": 100, "meta_per_class": 25, "world": 1, "iters": 20},
    {"name": "r50_bf16", **_BASE, "model": "resnet50", "width": 16, "classes": 1000, "image": 224, "batch": 128,
     "meta_batch": 100, "meta_per_class": 1, "precision": "bf16", "channels_last": True, "world": 1, "iters": 5},
)
#: ``--quick``: tiny shapes, checks the plumbing (the 2-rank variant included on the CPU).
QUICK_POINTS = ({"name": "r20_quick", **_BASE, "width": 4, "classes": 5, "image": 8, "batch": 8, "meta_batch": 5,
                 "meta_per_class": 2, "modes": "off,exact", "world": 2, "iters": 1},)
SEED = 0
TIMEOUT = datetime.timedelta(minutes=30)  # the helper waits while rank 0 times the other variants
_STOP, _BUILD, _RUN, _RELEASE = 0, 1, 2, 3


def variants_of(params: dict[str, Any]) -> list[str]:
    """Variant names of a grid point, in a fixed order (rank 0 and the helper index the same list)."""
    out = []
    for mode in params["modes"].split(","):
        out += [mode, f"{mode}_ddp_w1"]
        if params["world"] > 1:
            out.append(f"{mode}_ddp_w2")
        if params["device"] == "cuda":
            out.append(f"{mode}_ddp_w1_graph")
    return out


def _stack(params: dict[str, Any], mode: str, problem: Problem, device: torch.device, collective: Any, *,
           graph: bool = False) -> Any:
    """The engine's stack of ``mode`` (CE, SGD lr 0.1 momentum 0.9, Difficulty-Net H = 128, Adam 1e-5).

    ``graph``: captured under DDP as ``distributed.GRAPH_UNDER_DDP`` would have it (side-stream DDP, 11 warm-up
    iterations), whatever the flag says now.
    """
    from dnet_fast import distributed
    from dnet_fast.config import DiffNetConfig, MetaConfig, ModelConfig, RunConfig, TrainConfig
    from dnet_fast.stack import build_stack

    cfg = TrainConfig(
        model=ModelConfig(backbone=params["model"], width=params["width"], channels_last=params["channels_last"]),
        diffnet=DiffNetConfig(hidden=128, lr=1e-5),
        meta=MetaConfig(mode=mode, meta_batch=params["meta_batch"]),
        run=RunConfig(seed=SEED, precision=params["precision"], graph="on" if graph else "off"),
    ).validate()
    verified = distributed.GRAPH_UNDER_DDP
    distributed.GRAPH_UNDER_DDP = verified or graph
    try:
        stack = build_stack(cfg, problem.counts, device, collective=collective or distributed.LOCAL)
    finally:
        distributed.GRAPH_UNDER_DDP = verified
    stack.meta.set_class_accuracy(problem.acc)
    return stack


class _Rank:
    """What one rank runs for one variant: its stack and its position in the meta-batch stream."""

    def __init__(self, params: dict[str, Any], variant: str, problem: Problem, device: torch.device,
                 collectives: dict[int, Any]) -> None:
        mode, world = variant.split("_")[0], _world(variant)
        self.collective = collectives.get(world)
        self.stack = _stack(params, mode, problem, device, self.collective, graph=variant.endswith("_graph"))
        self.problem, self.params = problem, params
        self.meta_indices = balanced_meta_indices(problem.meta_y)
        self.calls = 0

    def run(self, iters: int) -> object:
        p, d, c = self.params, self.problem, self.collective
        out = None
        for _ in range(iters):
            meta = None
            if self.stack.meta.needs_meta_batch:
                step = self.calls if c is None else c.stream_index(self.calls)
                idx = self.meta_indices(step, p["meta_batch"])
                meta = d.meta_x.index_select(0, idx), d.meta_y.index_select(0, idx)
            out = self.stack.step.step(d.x, d.y, meta)
            self.calls += 1
        return out


def _world(variant: str) -> int:
    return 2 if "_ddp_w2" in variant else 1 if "_ddp_w1" in variant else 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _groups(world: int, rank: int) -> dict[int, Any]:
    """Collectives by world size: the default group (``world`` ranks) and, when larger, a group of rank 0 only.

    ``new_group`` is collective over the default group, so the helper calls it too.
    """
    from dnet_fast.distributed import Collective

    out = {world: Collective(rank, world, rank, dist.group.WORLD)}
    if world > 1:
        solo = dist.new_group([0])
        if rank == 0:
            out[1] = Collective(0, 1, 0, solo)
    return out


@BENCHMARKS.register("distributed")
class DistributedBenchmark(Benchmark):
    """Images/s per rank of each meta mode's step: one process vs DDP at world size 1 (and 2 on the CPU)."""

    name = "distributed"
    description = "DDP step: images/s per rank vs one process (world 1 overhead; world 2 scaling on CPU)"
    baseline = "off"

    def grid(self, profile: Profile) -> list[dict[str, Any]]:
        """CPU: ResNet-20 width 8, 1 and 2 ranks; GPU: ResNet-32 fp32 and ResNet-50 bf16 at world size 1; quick:
        tiny shapes. ``--set`` keys override point values (``points=a,b`` selects; ``modes``, ``iters``)."""
        points = QUICK_POINTS if profile.quick else GPU_POINTS if profile.device == "cuda" else CPU_POINTS
        extra = dict(profile.extra)
        chosen = extra.pop("points", None)
        names = str(chosen).split(",") if chosen else [p["name"] for p in points]
        world = 1 if profile.device == "cuda" else None  # one GPU: no second rank
        return [{**p, **extra, "device": profile.device, **({"world": world} if world else {})}
                for p in points if p["name"] in names]

    def sequential(self, params: dict[str, Any]) -> bool:
        """One variant at a time on CUDA (peak memory; captured graphs of large models do not fit together)."""
        return params["device"] == "cuda"

    def variants(self, params: dict[str, Any]) -> list[str]:
        """Per mode: one process, DDP world 1, (CPU) DDP world 2, (CUDA) DDP world 1 captured."""
        return variants_of(params)

    def ratios(self, params: dict[str, Any]) -> list[Ratio]:
        """DDP's per-rank overhead at world 1, per-rank throughput at world 2, graph vs eager under DDP."""
        out = []
        for mode in params["modes"].split(","):
            out.append(Ratio(f"{mode}: DDP world-1 step time / one process", f"{mode}_ddp_w1", mode,
                             higher_is_better=False))
            if params["world"] > 1:
                out.append(Ratio(f"{mode}: per-rank img/s at world 2 / one process", mode, f"{mode}_ddp_w2"))
            if params["device"] == "cuda":
                out.append(Ratio(f"{mode}: DDP graph speed-up over DDP eager", f"{mode}_ddp_w1",
                                 f"{mode}_ddp_w1_graph"))
        return out

    # -- shared state -----------------------------------------------------------------------------------

    def setup(self, params: dict[str, Any]) -> None:
        """The synthetic problem, the process group (this process is rank 0) and, on the CPU, the helper rank."""
        if dist.is_initialized():
            msg = "a process group already exists in this process (run the benchmark without torchrun)"
            raise SkipVariant(msg)
        self.params = params
        self.device = torch.device("cuda", torch.cuda.current_device()) if params["device"] == "cuda" \
            else torch.device("cpu")
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        self.problem = synthetic_problem(params, self.device)
        self.units_per_call = params["batch"] * params["iters"]
        self.names = variants_of(params)
        self._ranks: dict[str, _Rank] = {}
        port = _free_port()
        self._helper = _start_helper(params, port) if params["world"] > 1 else None
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        if backend == "nccl":  # capture precondition of the _graph variants (torch's CUDA-graph notes for DDP)
            os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "0")
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0,
                                world_size=params["world"], timeout=TIMEOUT)
        self.collectives = _groups(params["world"], 0)

    def teardown(self) -> None:
        """Stops the helper, destroys the process group."""
        self._ranks.clear()
        if getattr(self, "_helper", None) is not None:
            _command(_STOP)
            try:
                self._helper.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self._helper.kill()
            self._helper = None
        if dist.is_initialized():
            dist.destroy_process_group()

    # -- variants ---------------------------------------------------------------------------------------

    def prepare(self, variant: str) -> Callable[[], object]:
        """Builds the variant on every rank it spans and runs one untimed call (capture for ``_graph``)."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        two = _world(variant) == 2
        if two:
            _command(_BUILD, self.names.index(variant))
        try:
            rank = _Rank(self.params, variant, self.problem, self.device, self.collectives)
            self._ranks[variant] = rank
            fn = self._call(variant, rank, two)
            fn()
        except Exception as exc:
            if variant.endswith("_graph"):
                msg = f"capture under DDP failed: {type(exc).__name__}: {exc}"
                raise SkipVariant(msg) from exc
            raise
        return fn

    def _call(self, variant: str, rank: _Rank, two: bool) -> Callable[[], object]:
        iters, index = self.params["iters"], self.names.index(variant)

        def call() -> object:
            if two:
                _command(_RUN, index, iters)
            return rank.run(iters)

        return call

    def metrics(self, variant: str) -> dict[str, Any]:
        """Per-rank batch, world size, capture time and peak memory (CUDA)."""
        rank = self._ranks.get(variant)
        out: dict[str, Any] = {"world_size": _world(variant) or 1, "batch_per_rank": self.params["batch"]}
        if rank is not None and rank.stack.step.graph:
            out |= {"graph_warmup_s": rank.stack.step.warmup_seconds, "capture_s": rank.stack.step.capture_seconds}
        if self.device.type == "cuda":
            out["peak_mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        return out

    def release(self, variant: str) -> None:
        """Drops the variant's stacks (sequential CUDA points)."""
        self._ranks.pop(variant, None)
        if _world(variant) == 2:
            _command(_RELEASE, self.names.index(variant))


def _command(kind: int, index: int = 0, iters: int = 0) -> None:
    """Rank 0 tells the helper what to do next (a broadcast over the default group)."""
    dist.broadcast(torch.tensor([kind, index, iters], dtype=torch.int64), src=0)


def _start_helper(params: dict[str, Any], port: int) -> subprocess.Popen:
    """Starts rank 1 (``python -m benchmarks.bench_distributed --helper PARAMS``) with this process's threads."""
    threads = torch.get_num_threads()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "benchmarks.bench_distributed", "--helper", json.dumps({**params, "_port": port}),
           "--threads", str(threads)]
    return subprocess.Popen(cmd, env=env)


def _helper_main(params: dict[str, Any]) -> None:
    """Rank 1: builds and runs the variants rank 0 names, until told to stop."""
    device = torch.device("cpu")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{params['_port']}", rank=1,
                            world_size=params["world"], timeout=TIMEOUT)
    collectives = _groups(params["world"], 1)
    problem, names, ranks = synthetic_problem(params, device), variants_of(params), {}
    while True:
        cmd = torch.zeros(3, dtype=torch.int64)
        dist.broadcast(cmd, src=0)
        kind, index, iters = cmd.tolist()
        if kind == _STOP:
            break
        if kind == _BUILD:
            ranks[names[index]] = _Rank(params, names[index], problem, device, collectives)
        elif kind == _RUN:
            ranks[names[index]].run(iters)
        elif kind == _RELEASE:
            ranks.pop(names[index], None)
    dist.destroy_process_group()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="helper rank of the distributed benchmark (started by rank 0)")
    parser.add_argument("--helper", required=True, help="the grid point as JSON")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    _helper_main(json.loads(args.helper))
