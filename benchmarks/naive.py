"""Naive reference iterations (official-style and plain double-backward exact) that the fast modes are timed against."""

from __future__ import annotations

import copy
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "NaiveExactStep",
    "NaiveState",
    "OfficialClassAwareSampler",
    "OfficialMetaLoader",
    "OfficialStyleStep",
    "class_weights",
    "driver_loss",
    "swap_params",
]

#: ε of the driver-loss target t = 1 - a / (Σa + ε) (SPEC §5).
_TARGET_EPS = 1e-12


# ----------------------------------------------------------------------------------------------------------
# Shared pieces (written from SPEC §1 and §5; the fast modes have their own)


def driver_loss(d: Tensor, acc: Tensor) -> Tensor:
    """L_dr = mean_c (t_c - d_c)², t = 1 - a / (Σa + ε), on the difficulties before normalisation (SPEC §5)."""
    target = 1 - acc / (acc.sum() + _TARGET_EPS)
    return F.mse_loss(d, target)


def class_weights(d: Tensor) -> Tensor:
    """w = C·d / Σd (sum-to-C normalisation, SPEC §1); keeps whatever graph ``d`` has."""
    return d / d.sum() * d.numel()


def swap_params(module: nn.Module, tensors: dict[str, Tensor]) -> None:
    """Replaces parameters by plain tensors, walking dotted names with setattr.

    This is the reflection-based "MetaModule" trick of the released code (STYLE §4.1 names it as a
    counter-example): the module then computes with non-leaf tensors that carry the virtual step's graph.
    """
    for name, value in tensors.items():
        owner = module
        *path, leaf = name.split(".")
        for part in path:
            owner = getattr(owner, part)
        owner._parameters.pop(leaf, None)  # a Parameter slot refuses a non-leaf tensor; drop it first
        setattr(owner, leaf, value)


# ----------------------------------------------------------------------------------------------------------
# Official-style class-aware meta sampler (a Python re-implementation of the released sampler's behaviour)


class _RandomCycle:
    """Endless cycle over a list, reshuffled with ``rng`` at the start of every pass (like ``RandomCycleIter``)."""

    def __init__(self, items: Sequence[int], rng: random.Random) -> None:
        self._items = list(items)
        self._rng = rng
        self._i = len(self._items) - 1  # so that the first ``next`` shuffles

    def __iter__(self) -> Iterator[int]:
        return self

    def __next__(self) -> int:
        self._i += 1
        if self._i == len(self._items):
            self._i = 0
            self._rng.shuffle(self._items)
        return self._items[self._i]


class OfficialClassAwareSampler:
    """Class-aware sampling as the released code does it: a shuffled cycle over classes picks a class, that class's
    shuffled cycle picks an image. Pure Python, one ``next`` per index; seeded ``random.Random`` (the released code
    used the unseeded global ``random``, SPEC §13 #11).

    Args:
        labels: label of every meta-set image.
        seed: seed of the private random generator.
    """

    def __init__(self, labels: Sequence[int], seed: int = 0) -> None:
        rng = random.Random(seed)
        num_classes = max(int(v) for v in labels) + 1
        per_class: list[list[int]] = [[] for _ in range(num_classes)]
        for i, label in enumerate(labels):
            per_class[int(label)].append(i)
        self._classes = _RandomCycle(range(num_classes), rng)
        self._images = [_RandomCycle(idx, rng) for idx in per_class]

    def __iter__(self) -> Iterator[int]:
        return self

    def __next__(self) -> int:
        return next(self._images[next(self._classes)])


class OfficialMetaLoader:
    """Meta batches of ``m`` images drawn by ``OfficialClassAwareSampler`` and collated sample by sample.

    Args:
        images: (N, 3, H, W) eval-transformed meta images.
        labels: (N,) int64 labels.
        batch_size: meta batch size m.
        seed: sampler seed.
    """

    def __init__(self, images: Tensor, labels: Tensor, batch_size: int, seed: int = 0) -> None:
        self.images, self.labels, self.batch_size = images, labels, batch_size
        self._sampler = OfficialClassAwareSampler(labels.tolist(), seed)

    def next_batch(self) -> tuple[Tensor, Tensor]:
        """The next (x (m, 3, H, W), y (m,)) batch, stacked per sample like ``default_collate``."""
        idx = [next(self._sampler) for _ in range(self.batch_size)]
        x = torch.stack([self.images[i] for i in idx])
        y = torch.tensor([int(self.labels[i]) for i in idx], dtype=torch.int64, device=self.labels.device)
        return x, y


# ----------------------------------------------------------------------------------------------------------
# The two reference iterations


@dataclass
class NaiveState:
    """What a naive iteration reads and updates.

    Attributes:
        model: the trained classifier f(·; φ), in train mode.
        diffnet: Difficulty-Net D(·; θ).
        optimizer: main optimiser over ``model``'s parameters (its group lr is also the virtual-step size).
        diff_optimizer: Adam over ``diffnet``'s parameters.
        acc: (C,) per-class accuracy A, fixed for the epoch.
        lambda_dr: driver-loss weight λ.
        criterion: per-sample loss, (B, C), (B,) → (B,).
    """

    model: nn.Module
    diffnet: nn.Module
    optimizer: torch.optim.Optimizer
    diff_optimizer: torch.optim.Optimizer
    acc: Tensor
    lambda_dr: float = 0.3
    criterion: Callable[[Tensor, Tensor], Tensor] = field(
        default=lambda logits, y: F.cross_entropy(logits, y, reduction="none")
    )

    @property
    def num_classes(self) -> int:
        """C."""
        return self.acc.numel()

    def param_lrs(self) -> list[float]:
        """Learning rate of each model parameter, in ``model.parameters()`` order (virtual-step sizes)."""
        lr_of = {id(p): g["lr"] for g in self.optimizer.param_groups for p in g["params"]}
        return [lr_of[id(p)] for p in self.model.parameters()]

    def real_step(self, x: Tensor, y: Tensor, w: Tensor) -> Tensor:
        """Eq. 11: weighted loss on (x, y) with per-sample weights w (B,); zero grads, backward, step.

        Returns:
            (B, C) logits of the real forward (detached).
        """
        logits = self.model(x)
        loss = (self.criterion(logits, y) * w).mean()
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return logits.detach()


class OfficialStyleStep:
    """One iteration as the released CIFAR code runs it (SPEC §4.2, §13 #21).

    Per call: build a fresh model and ``load_state_dict`` the current weights into it; class weights from D, then
    a detached copy (the code's ``torch.tensor(weights)``) spread to samples through host-built one-hot rows; a
    virtual step on the copy; a meta forward/backward on a class-aware meta batch of m plus λ·L_dr, Adam on θ;
    the real step with weights from the updated θ; per-class training accuracy counted sample by sample with
    ``.item()`` and the summed loss read back with ``.item()``. Because the weights are detached, θ gets only the
    driver-loss gradient, exactly as in the released code.

    Args:
        state: model, Difficulty-Net, optimisers, A, λ.
        model_factory: builds a fresh, randomly initialised classifier on the right device (as the code does).
        meta_loader: draws the meta batches.
        second_order: ``True`` is the CIFAR code (``create_graph=True`` virtual step, so the meta backward also
            runs a wasted double backward into the copy); ``False`` is a first-order virtual step (an in-place SGD
            step on the copy, as the ImageNet/Places "pseudo" model), the (2b + m)/b = 2.78× cost of
            PERFORMANCE §2.
    """

    def __init__(
        self,
        state: NaiveState,
        model_factory: Callable[[], nn.Module],
        meta_loader: OfficialMetaLoader,
        *,
        second_order: bool = False,
    ) -> None:
        self.s = state
        self.model_factory = model_factory
        self.meta_loader = meta_loader
        self.second_order = second_order
        c = state.num_classes
        self.class_correct = [0] * c
        self.class_total = [0] * c
        self.loss_sum = 0.0

    def _host_one_hot_weights(self, w_class: Tensor, y: Tensor) -> Tensor:
        """Per-sample weights the way the code builds them: eye on the host, one-hot rows, repeat, multiply, sum."""
        c = self.s.num_classes
        one_hot = torch.eye(c)[y.cpu()].float().to(y.device)  # (B, C)
        detached = w_class.clone().detach()  # what torch.tensor(weights) returns: a detached copy
        return (detached.unsqueeze(0).repeat(one_hot.shape[0], 1) * one_hot).sum(1)  # (B,)

    def _virtual_step(self, model_cpy: nn.Module, x: Tensor, y: Tensor, w: Tensor) -> None:
        loss = (self.s.criterion(model_cpy(x), y) * w).mean()
        named = list(model_cpy.named_parameters())
        grads = torch.autograd.grad(loss, [p for _, p in named], create_graph=self.second_order)
        lrs = self.s.param_lrs()
        if self.second_order:
            swap_params(model_cpy, {n: p - lr * g for (n, p), g, lr in zip(named, grads, lrs, strict=True)})
            return
        with torch.no_grad():
            for (_, p), g, lr in zip(named, grads, lrs, strict=True):
                p.sub_(lr * g)

    def _count_accuracy(self, logits: Tensor, y: Tensor) -> None:
        pred = logits.argmax(1)
        for j in range(len(y)):  # the code's per-sample loop, one host sync per element
            label = y[j].item()
            self.class_total[label] += 1
            if pred[j].item() == label:
                self.class_correct[label] += 1

    def step(self, x: Tensor, y: Tensor, meta_batch: tuple[Tensor, Tensor] | None = None) -> None:
        """One training iteration on the batch (x (B, 3, H, W), y (B,)); ``meta_batch`` is ignored (the code
        draws its own from ``meta_loader``)."""
        del meta_batch
        s = self.s
        model_cpy = self.model_factory()
        model_cpy.load_state_dict(s.model.state_dict())
        model_cpy.train()
        d = s.diffnet(s.acc)
        dr = driver_loss(d, s.acc)
        self._virtual_step(model_cpy, x, y, self._host_one_hot_weights(class_weights(d), y))
        xm, ym = self.meta_loader.next_batch()
        meta_loss = F.cross_entropy(model_cpy(xm), ym) + s.lambda_dr * dr
        s.diff_optimizer.zero_grad()
        meta_loss.backward()
        s.diff_optimizer.step()
        with torch.no_grad():
            w = self._host_one_hot_weights(class_weights(s.diffnet(s.acc)), y)
        logits = self._real_step_with_loss_readback(x, y, w)
        self._count_accuracy(logits, y)

    def _real_step_with_loss_readback(self, x: Tensor, y: Tensor, w: Tensor) -> Tensor:
        s = self.s
        logits = s.model(x)
        per_sample = s.criterion(logits, y)
        self.loss_sum += per_sample.sum().item()  # the code's epoch_loss accumulation: a host sync
        loss = (per_sample * w).mean()
        s.optimizer.zero_grad()
        loss.backward()
        s.optimizer.step()
        return logits.detach()


class NaiveExactStep:
    """One `exact` iteration (SPEC §4.3) written the correct-but-slow way.

    Per call: deep-copy the model; class weights w = C·D(A; θ)/Σ kept in the graph; virtual step φ̂ = φ - α∇φ L_w
    with ``create_graph=True`` written into the copy by name; meta CE on the copy plus λ·L_dr; a plain double
    backward for ∂J/∂θ; Adam on θ; then the real step (fresh forward) with weights from the updated θ. The copy's
    forwards run in train mode and absorb their running-statistics updates, so only the real forward changes the
    model's BatchNorm buffers.

    Args:
        state: model, Difficulty-Net, optimisers, A, λ.
    """

    def __init__(self, state: NaiveState) -> None:
        self.s = state

    def meta_objective(self, x: Tensor, y: Tensor, meta_batch: tuple[Tensor, Tensor]) -> Tensor:
        """J(θ) = CE(f(x^m; φ̂(θ)), y^m) + λ·L_dr(A, θ) at the current φ, on a throw-away copy of the model."""
        s = self.s
        model_cpy = copy.deepcopy(s.model)
        model_cpy.train()
        d = s.diffnet(s.acc)
        w = class_weights(d)[y]  # (B,), in θ's graph
        loss = (s.criterion(model_cpy(x), y) * w).mean()
        named = list(model_cpy.named_parameters())
        grads = torch.autograd.grad(loss, [p for _, p in named], create_graph=True)
        lrs = s.param_lrs()
        swap_params(model_cpy, {n: p - lr * g for (n, p), g, lr in zip(named, grads, lrs, strict=True)})
        xm, ym = meta_batch
        return F.cross_entropy(model_cpy(xm), ym) + s.lambda_dr * driver_loss(d, s.acc)

    def step(self, x: Tensor, y: Tensor, meta_batch: tuple[Tensor, Tensor]) -> None:
        """One training iteration on (x (B, 3, H, W), y (B,)) with a balanced meta batch (x^m, y^m)."""
        s = self.s
        theta = list(s.diffnet.parameters())
        grads = torch.autograd.grad(self.meta_objective(x, y, meta_batch), theta)
        for p, g in zip(theta, grads, strict=True):
            p.grad = g
        s.diff_optimizer.step()
        with torch.no_grad():
            w = class_weights(s.diffnet(s.acc))[y]
        s.real_step(x, y, w)
