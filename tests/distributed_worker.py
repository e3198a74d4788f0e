"""One rank of the distributed tests (``tests/test_distributed.py``), started by torchrun or by the tests' launcher.

Jobs:
    steps OUT [--kill-rank R --kill-step K --how kill|raise]
        float64 iterations of every case in ``CASES`` on this rank's share of ``global_batch``; saves the state to
        ``OUT/<case>-rank<r>.pt``. The builders are imported by the test, which runs the single-process reference.
    fit OVERRIDE... [--resume] [--kill-rank R --kill-step K]
        ``engine.fit`` on the tiny config; rank R SIGKILLs itself at its K-th training iteration.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from dnet_fast import distributed
from dnet_fast.config import DiffNetConfig, MetaConfig, TrainConfig
from dnet_fast.distributed import LOCAL, Collective
from dnet_fast.losses import ClassBalancedCE, CrossEntropy
from dnet_fast.meta import build_meta_mode
from dnet_fast.step import DeviceLRSGD, TrainStep

C, B, M = 5, 8, 6  # classes, per-rank train batch, per-rank meta batch
WORLD = 2
ITERS = 4
ACC = torch.tensor([0.9, 0.6, 0.4, 0.2, 0.05], dtype=torch.float64)  # (C,) accuracy A
COUNTS = torch.tensor([40.0, 20.0, 10.0, 6.0, 4.0], dtype=torch.float64)  # training counts (CB weights)

#: name -> (meta.mode, meta.grad, loss)
CASES: dict[str, tuple[str, str, str]] = {
    "off-ce": ("off", "jvp", "ce"),
    "off-cb": ("off", "jvp", "cb"),
    "driver-ce": ("driver", "jvp", "ce"),
    "driver-cb": ("driver", "jvp", "cb"),
    "exact-jvp-ce": ("exact", "jvp", "ce"),
    "exact-jvp-cb": ("exact", "jvp", "cb"),
    "exact-double_backward-ce": ("exact", "double_backward", "ce"),
    "exact-double_backward-cb": ("exact", "double_backward", "cb"),
    "frozen-ce": ("frozen", "jvp", "ce"),
    "exact_absolute-jvp-ce": ("exact_absolute", "jvp", "ce"),
}


class NoBNNet(nn.Module):
    """conv → ReLU → global average pool → linear: no BatchNorm, whose batch statistics are per rank by design."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, C)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


def build_case(case: str, collective: Collective = LOCAL) -> TrainStep:
    """The eager step of ``case`` in float64, as one rank of ``collective`` (DDP forward) or on one process."""
    mode, grad, loss = CASES[case]
    cfg = TrainConfig(
        diffnet=DiffNetConfig(hidden=8, bias=True, lr=1e-2),
        meta=MetaConfig(mode=mode, grad=grad, lambda_dr=0.3, meta_batch=M),
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = NoBNNet().double().train()
        groups = [{"params": list(model.conv.parameters()), "lr": 0.5},
                  {"params": list(model.fc.parameters()), "lr": 0.3, "nesterov": True}]
        optimizer = DeviceLRSGD(groups, lr=0.1, momentum=0.9, weight_decay=5e-4, device="cpu")
        criterion = (CrossEntropy() if loss == "ce" else ClassBalancedCE(COUNTS, beta=0.9)).double()
        forward = distributed.data_parallel(model, collective) if collective.distributed else None
        meta = build_meta_mode(cfg, model, criterion, optimizer, C, forward=forward, collective=collective)
    meta.set_class_accuracy(ACC)
    return TrainStep(meta)


def global_batch(step: int, world: int = WORLD) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The global batch of iteration ``step``: x (world·B, 3, 5, 5), y, x^m (world·M, 3, 5, 5), y^m."""
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(world * B, 3, 5, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (world * B,), generator=g)
    xm = torch.randn(world * M, 3, 5, 5, generator=g, dtype=torch.float64)
    return x, y, xm, torch.arange(world * M) % C


def rank_share(batch: tuple[Tensor, ...], rank: int) -> tuple[Tensor, ...]:
    """Rank ``rank``'s consecutive share of a global batch (rows r·B.., meta rows r·M..)."""
    x, y, xm, ym = batch
    return x[rank * B : (rank + 1) * B], y[rank * B : (rank + 1) * B], xm[rank * M : (rank + 1) * M], \
        ym[rank * M : (rank + 1) * M]


def state_of(step: TrainStep) -> dict[str, Any]:
    """Every parameter, Difficulty-Net weight and optimiser state of the step's mode."""
    return step.meta.state_dict()


def run_case(case: str, collective: Collective, kill: tuple[int, int, str] | None = None) -> dict[str, Any]:
    """``ITERS`` iterations of ``case``; this rank's share under ``collective``, the global batch on one process."""
    step = build_case(case, collective)
    for it in range(ITERS):
        if kill is not None and kill[0] == collective.rank and kill[1] == it:
            _fail(kill[2])
        batch = global_batch(it)
        x, y, xm, ym = rank_share(batch, collective.rank) if collective.distributed else batch
        step.step(x, y, (xm, ym))
    return state_of(step)


def _fail(how: str) -> None:
    if how == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    msg = "deliberate failure of the test (tests/distributed_worker.py)"
    raise ValueError(msg)


def _steps(args: argparse.Namespace) -> None:
    collective = distributed.init_from_env(torch.device("cpu"), timeout_s=120)
    kill = None if args.kill_rank is None else (args.kill_rank, args.kill_step, args.how)
    out = Path(args.out)
    for case in CASES:
        state = run_case(case, collective, kill)
        torch.save(state, out / f"{case}-rank{collective.rank}.pt")


def _fit(args: argparse.Namespace) -> None:
    from dnet_fast.config import load_config
    from dnet_fast.engine import fit
    from dnet_fast.step import capture

    if args.kill_rank is not None and args.kill_rank == distributed.env_rank():
        original, calls = capture.TrainStep.step, [0]

        def dying_step(self: TrainStep, *a: Any, **k: Any) -> dict[str, Tensor]:
            calls[0] += 1
            if calls[0] == args.kill_step:
                _fail(args.how)
            return original(self, *a, **k)

        capture.TrainStep.step = dying_step  # type: ignore[method-assign]
    fit(load_config(None, args.overrides), resume=args.resume)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="job", required=True)
    steps = sub.add_parser("steps")
    steps.add_argument("out")
    fit = sub.add_parser("fit")
    fit.add_argument("overrides", nargs="*")
    fit.add_argument("--resume", action="store_true")
    for p in (steps, fit):
        p.add_argument("--kill-rank", type=int, default=None)
        p.add_argument("--kill-step", type=int, default=0)
        p.add_argument("--how", choices=("kill", "raise"), default="kill")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    with distributed.reported(f"distributed_worker {args.job}"):
        (_steps if args.job == "steps" else _fit)(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
