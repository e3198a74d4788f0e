"""GPU checks of the torchrun path on one CUDA device (NCCL, world size 1): skipped without CUDA.

Run on a GPU machine: ``pytest -q -m gpu tests/test_distributed_gpu.py -rA`` (item 1 of tools/gpu_check.sh). One GPU
cannot show scaling or the per-rank BatchNorm difference; it checks that the DDP step over NCCL equals the
single-process step, that SyncBatchNorm builds and runs, and whether the step can be captured in a CUDA graph
under DDP. ``test_gpu_graph_under_ddp_equals_eager`` passing is the evidence for setting
``dnet_fast.distributed.GRAPH_UNDER_DDP = True``; until then torchrun runs take the eager step.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from dnet_fast import distributed
from dnet_fast.config import DiffNetConfig, MetaConfig, ModelConfig, RunConfig, TrainConfig
from dnet_fast.distributed import LOCAL
from dnet_fast.evaluation import class_accuracy
from dnet_fast.schedule import apply_lr
from dnet_fast.stack import build_stack
from tests.helpers import world_of_one

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
pytestmark = [pytest.mark.gpu, cuda, pytest.mark.usefixtures("deterministic_cudnn")]

C, ITERS = 10, 6
TOL = 1e-5  # fp32, norm-wise relative, as tests/test_step.py's graph == eager checks
MODES = [("off", "jvp"), ("driver", "jvp"), ("exact", "jvp"), ("exact", "double_backward")]


@pytest.fixture(scope="module")
def world1():
    """An NCCL group of one rank, made by ``distributed.init_from_env`` from torchrun's variables."""
    # NCCL's async error handling off: a precondition of capture (torch's CUDA-graph notes for DDP).
    with world_of_one(torch.device("cuda"), 300, TORCH_NCCL_ASYNC_ERROR_HANDLING="0") as collective:
        assert torch.distributed.get_backend() == "nccl"
        yield collective


def _cfg(mode: str, grad: str, *, graph: str = "off", sync_bn: bool = False) -> TrainConfig:
    return TrainConfig(
        model=ModelConfig(backbone="resnet20", width=8, sync_bn=sync_bn),
        diffnet=DiffNetConfig(hidden=32, bias=True, lr=1e-3),
        meta=MetaConfig(mode=mode, grad=grad, meta_batch=10),
        run=RunConfig(seed=0, graph=graph),
    ).validate()


def _data() -> list[tuple[Tensor, Tensor, tuple[Tensor, Tensor]]]:
    g, dev = torch.Generator().manual_seed(1), torch.device("cuda", torch.cuda.current_device())
    return [(torch.randn(16, 3, 16, 16, generator=g).to(dev), torch.randint(0, C, (16,), generator=g).to(dev),
             (torch.randn(10, 3, 16, 16, generator=g).to(dev), (torch.arange(10) % C).to(dev)))
            for _ in range(ITERS)]


def _run(cfg: TrainConfig, collective, data) -> tuple[object, list[dict[str, Tensor]]]:
    dev = torch.device("cuda", torch.cuda.current_device())
    stack = build_stack(cfg, torch.logspace(2, 0, C).floor().long().numpy(), dev, collective=collective)
    stack.meta.set_class_accuracy(torch.linspace(0.9, 0.05, C, device=dev))
    outs = []
    for i, (x, y, mb) in enumerate(data):
        if i == ITERS // 2:  # schedule change and new A: in place, no re-capture
            apply_lr(stack.optimizer, 0.1)
            stack.meta.set_class_accuracy(torch.linspace(0.5, 0.3, C, device=dev))
        outs.append({k: v.clone() for k, v in stack.step.step(x, y, mb).items()})
    torch.cuda.synchronize()  # sync point: compared on the host
    return stack, outs


def _flat(obj, prefix=""):
    if isinstance(obj, Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _flat(v, f"{prefix}/{k}")


def _assert_close(a: object, b: object, outs_a, outs_b) -> None:
    sa, sb = dict(_flat(a.meta.state_dict())), dict(_flat(b.meta.state_dict()))
    assert sa.keys() == sb.keys()
    for key, ta in sa.items():
        tb = sb[key]
        if ta.dtype in (torch.int64, torch.int32):
            assert torch.equal(ta, tb), key
        else:
            err = float((ta.double() - tb.double()).norm() / tb.double().norm().clamp_min(1e-30))
            assert err < TOL, (key, err)
    for da, db in zip(outs_a, outs_b, strict=True):
        for key in da:
            err = float((da[key].double() - db[key].double()).norm() / db[key].double().norm().clamp_min(1e-30))
            assert err < TOL, key


@pytest.mark.parametrize(("mode", "grad"), MODES)
def test_gpu_ddp_world1_equals_one_process(world1, mode, grad):
    data = _data()
    single, outs_s = _run(_cfg(mode, grad), LOCAL, data)
    ddp, outs_d = _run(_cfg(mode, grad), world1, data)
    assert isinstance(ddp.meta.forward, torch.nn.parallel.DistributedDataParallel)
    _assert_close(ddp, single, outs_d, outs_s)


@pytest.mark.parametrize("mode", ["off", "driver"])
def test_gpu_sync_bn_builds_and_equals_batch_norm_on_one_rank(world1, mode):
    data = _data()
    single, outs_s = _run(_cfg(mode, "jvp"), LOCAL, data)
    synced, outs_d = _run(_cfg(mode, "jvp", sync_bn=True), world1, data)
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in synced.model.modules())
    _assert_close(synced, single, outs_d, outs_s)  # one rank: SyncBatchNorm reduces to BatchNorm


def test_gpu_eval_counts_are_reduced_on_the_device(world1):
    dev = torch.device("cuda", torch.cuda.current_device())
    cfg = _cfg("off", "jvp")
    stack = build_stack(cfg, torch.ones(C).long().numpy(), dev, collective=world1)
    x, y, _ = _data()[0]
    acc_local = class_accuracy(stack.model, [(x, y)], C, cfg, dev)
    acc_dist = class_accuracy(stack.model, [(x, y)], C, cfg, dev, collective=world1)
    assert torch.equal(acc_local, acc_dist)


@pytest.mark.parametrize(("mode", "grad"), MODES)
def test_gpu_graph_under_ddp_equals_eager(world1, monkeypatch, mode, grad):
    """The check behind GRAPH_UNDER_DDP: capture with NCCL all-reduce inside the graph, replay == eager DDP."""
    monkeypatch.setattr(distributed, "GRAPH_UNDER_DDP", True)
    data = _data()
    eager, outs_e = _run(_cfg(mode, grad), world1, data)
    graphed, outs_g = _run(_cfg(mode, grad, graph="on"), world1, data)
    assert graphed.step.graph
    assert graphed.step.captured
    assert graphed.step.warmup_iters == distributed.DDP_CAPTURE_WARMUP
    _assert_close(graphed, eager, outs_g, outs_e)
