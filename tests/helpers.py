"""The tiny float64 meta-learning problem shared by the meta-mode and training-step tests."""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from dnet_fast import distributed
from dnet_fast.config import DiffNetConfig, MetaConfig, OptimConfig, TrainConfig

__all__ = [
    "ACC",
    "B",
    "C",
    "LAMBDA",
    "M",
    "TinyNet",
    "batch",
    "flat_grad",
    "flatten_state",
    "free_port",
    "meta_config",
    "tiny_param_groups",
    "world_of_one",
]

C, B, M = 5, 8, 6  # classes, train batch, meta batch
LAMBDA = 0.3  # λ of the driver loss
ACC = torch.tensor([0.9, 0.6, 0.4, 0.2, 0.05], dtype=torch.float64)  # (C,) accuracy A


class TinyNet(nn.Module):
    """conv → BN → ReLU → global average pool → linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, C)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def meta_config(mode: str, grad: str = "jvp", **diffnet: object) -> TrainConfig:
    """The tests' config: an 8-unit Difficulty-Net (``diffnet`` overrides its fields), λ = LAMBDA, a 6-unit
    MWN; batches of B (the width of the sample-level net)."""
    return TrainConfig(
        optim=OptimConfig(batch_size=B),
        diffnet=DiffNetConfig(hidden=8, bias=True, lr=1e-2, **diffnet),
        meta=MetaConfig(mode=mode, grad=grad, lambda_dr=LAMBDA, meta_batch=M, mwn_hidden=6, mwn_lr=0.1),
    )


def tiny_param_groups(model: TinyNet, backbone_lr: float, head_lr: float, **head: object) -> list[dict]:
    """Two SGD groups on purpose: backbone (conv, BN) and head (fc, with extra options ``head``)."""
    return [
        {"params": [*model.conv.parameters(), *model.bn.parameters()], "lr": backbone_lr},
        {"params": list(model.fc.parameters()), "lr": head_lr, **head},
    ]


def batch(step: int) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor]]:
    """A train batch (x, y) and a balanced meta batch, a pure function of ``step``."""
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(B, 3, 5, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (B,), generator=g)
    xm = torch.randn(M, 3, 5, 5, generator=g, dtype=torch.float64)
    return x, y, (xm, torch.arange(M) % C)


def flat_grad(net: nn.Module) -> Tensor:
    """The ``.grad`` of every parameter of ``net``, flattened and concatenated."""
    return torch.cat([p.grad.flatten() for p in net.parameters()])


def flatten_state(obj: object, prefix: str = ""):
    """(path, leaf) pairs of a nested dict/list/tuple state (a checkpoint, a state_dict): ``/model/fc.weight``..."""
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from flatten_state(v, f"{prefix}/{k}")
    elif isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            yield from flatten_state(v, f"{prefix}/{i}")
    else:
        yield prefix, obj


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for a rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def world_of_one(device: torch.device, timeout_s: float, **env: str) -> Iterator[distributed.Collective]:
    """A process group of one rank in this process, made by ``distributed.init_from_env`` from torchrun's
    variables (plus ``env``); destroyed and the environment restored afterwards."""
    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), **env}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield distributed.init_from_env(device, timeout_s)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
