"""The META_MODES registry: one whole training iteration per mode (off | driver | exact | mwn), eager.

The Table 4 ablations (frozen | exact_absolute | exact_sample) register from ``dnet_fast.meta.ablations``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from dnet_fast.config import TrainConfig
from dnet_fast.distributed import LOCAL, Collective
from dnet_fast.meta.gradient import Inner, forward_ad_problem, meta_gradient, needs_losses
from dnet_fast.meta.phases import (
    Params,
    aux_step,
    class_weights,
    driver_loss,
    real_step,
    weight_stats,
    weighted_mean,
)
from dnet_fast.models.difficulty_net import DifficultyNet, MetaWeightNet
from dnet_fast.registry import Registry

__all__ = [
    "META_MODES",
    "ClassWeightMode",
    "DriverMode",
    "ExactMode",
    "MWNMode",
    "MetaMode",
    "OffMode",
    "Owned",
    "build_meta_mode",
    "choose_grad",
    "diffnet_adam",
]

log = logging.getLogger(__name__)

META_MODES: Registry[type[MetaMode]] = Registry("meta mode")


@dataclass(frozen=True)
class Owned:
    """Everything a meta mode's step mutates, by checkpoint name: the one list that the step's snapshot
    (``dnet_fast.step.snapshot``) and the checkpoint (`MetaMode.state_dict`) both read."""

    modules: dict[str, nn.Module] = field(default_factory=dict)  # parameters and buffers
    optimizers: dict[str, torch.optim.Optimizer] = field(default_factory=dict)  # the main one first
    tensors: dict[str, Tensor] = field(default_factory=dict)  # static buffers such as A

    def plus(self, other: Owned) -> Owned:
        """This declaration extended by ``other`` (a subclass adds its auxiliary net and optimiser)."""
        return Owned(
            {**self.modules, **other.modules},
            {**self.optimizers, **other.optimizers},
            {**self.tensors, **other.tensors},
        )


class MetaMode:
    """Base of the meta modes: holds the classifier, its loss and optimiser, and the static accuracy buffer A.

    ``step`` never syncs with the host (no ``.item()``, no data-dependent shapes), so it can be captured in a
    CUDA graph; the caller wraps it in autocast when training in bf16. The real step calls ``optimizer.step()``:
    with ``dnet_fast.step.DeviceLRSGD`` that update reads its learning rates on the device.

    Args:
        cfg: the run's config (``meta`` and ``diffnet`` sections are read).
        model: the classifier f(·; φ) on its device, in train mode.
        criterion: per-sample loss, (B, C) logits → (B,).
        optimizer: the main optimiser over ``model``'s parameters (its group lrs are the virtual-step sizes).
        num_classes: C.
        forward: the real forward (default ``model``), e.g. a ``torch.compile``'d model.

    Attributes:
        needs_meta_batch: whether ``step`` needs a balanced meta batch.
        distributed_problem: why the mode cannot run under torchrun, or None when its step reduces through
            ``collective`` so that N ranks compute the single-process step of the global batch. Read from the
            mode's own class, never inherited: a new mode, even a subclass of a supported one, is refused until it
            declares how its step reduces.
        diffnet: the class-level Difficulty-Net, (C,) accuracies → (C,) difficulties (frozen, driver, exact,
            exact_absolute) or None (off, mwn, exact_sample).
        acc: (C,) static buffer with the per-class accuracy A, refreshed in place.
        collective: the ranks' reductions (`use_collective`); ``distributed.LOCAL``, a no-op, on one process.
    """

    needs_meta_batch: bool = False
    distributed_problem: str | None = "it does not declare torchrun support (MetaMode.distributed_problem)"

    def __init__(
        self,
        cfg: TrainConfig,
        model: nn.Module,
        criterion: nn.Module,
        optimizer: torch.optim.Optimizer,
        num_classes: int,
        *,
        forward: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        self.cfg = cfg
        self.model, self.criterion, self.optimizer = model, criterion, optimizer
        self.num_classes = num_classes
        self.diffnet: nn.Module | None = None
        self.forward = model if forward is None else forward
        first = next(model.parameters())
        self.device = first.device
        self.dtype = torch.promote_types(torch.float32, first.dtype)  # auxiliary nets: at least fp32
        self.acc = torch.zeros(num_classes, device=self.device, dtype=self.dtype)  # (C,)
        self._params, self._group_of = _optimised_params(model, optimizer)
        self.collective: Collective = LOCAL

    def use_collective(self, collective: Collective) -> None:
        """Runs the step as one rank of ``collective`` (its real forward ``forward`` is then the DDP module).

        Raises:
            ValueError: the mode cannot run distributed (``distributed_problem``).
        """
        problem = type(self).__dict__.get("distributed_problem", MetaMode.distributed_problem)
        if collective.distributed and problem is not None:
            msg = f"meta.mode={self.cfg.meta.mode} cannot run under torchrun: {problem}"
            raise ValueError(msg)
        self.collective = collective

    def set_class_accuracy(self, acc: Tensor) -> None:
        """Copies the (C,) per-class accuracy into the static buffer (in place: a captured graph reads it)."""
        if acc.shape != self.acc.shape:
            msg = f"class accuracy must have shape ({self.num_classes},), got {tuple(acc.shape)}"
            raise ValueError(msg)
        with torch.no_grad():
            self.acc.copy_(acc)

    def class_weights(self) -> Tensor | None:
        """Current detached (C,) class weights; None for modes without class-level weights (mwn)."""
        return torch.ones_like(self.acc)

    def owned(self) -> Owned:
        """What this mode's step mutates: model, criterion (its buffers), main optimiser and A; subclasses add
        their auxiliary net and optimiser with `Owned.plus`."""
        return Owned(
            {"model": self.model, "criterion": self.criterion}, {"optimizer": self.optimizer}, {"acc": self.acc}
        )

    def state_dict(self) -> dict[str, Any]:
        """The checkpoint of everything `owned` declares, keyed by its names."""
        owned = self.owned()
        return {
            **{name: m.state_dict() for name, m in owned.modules.items()},
            **{name: opt.state_dict() for name, opt in owned.optimizers.items()},
            **{name: t.detach().clone() for name, t in owned.tensors.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restores what `state_dict` returned (tensors copied in place: a captured graph keeps reading them)."""
        owned = self.owned()
        for name, m in owned.modules.items():
            m.load_state_dict(state[name])
        for name, opt in owned.optimizers.items():
            opt.load_state_dict(state[name])
        with torch.no_grad():
            for name, t in owned.tensors.items():
                t.copy_(state[name].to(t.device))

    def step(
        self, x: Tensor, y: Tensor, meta_batch: tuple[Tensor, Tensor] | None = None
    ) -> dict[str, Tensor]:
        """One training iteration including the real optimiser step.

        Args:
            x: (B, 3, H, W) training images.
            y: (B,) int64 labels.
            meta_batch: balanced (x^m (m, 3, H, W), y^m (m,)) when ``needs_meta_batch``, else ignored.

        Returns:
            Detached tensors: the real forward's ``logits`` (B, C) and the scalars ``loss`` and, by mode,
            ``meta_loss``, ``driver_loss``, ``weight_min``, ``weight_max``, ``weight_E``.

        Raises:
            RuntimeError: the model is in eval mode (every forward of the step uses batch statistics).
            ValueError: a meta batch is needed and missing.
        """
        if not self.model.training:
            msg = (
                "MetaMode.step needs model.train(): the virtual, meta and real forwards use batch statistics"
            )
            raise RuntimeError(msg)
        if self.needs_meta_batch and meta_batch is None:
            msg = f"meta mode '{self.cfg.meta.mode}' needs a meta batch"
            raise ValueError(msg)
        return self._step(x, y, meta_batch)

    def _step(self, x: Tensor, y: Tensor, meta_batch: tuple[Tensor, Tensor] | None) -> dict[str, Tensor]:
        raise NotImplementedError

    def _train_forward(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """The real train forward with the real buffers (BN running statistics update once).

        Returns:
            (ℓ (B,) with graph, detached logits (B, C)).
        """
        logits = self.forward(x)  # (B, C)
        return self.criterion(logits, y), logits.detach()

    def _inner(self, x: Tensor, y: Tensor) -> Inner:
        groups = self.optimizer.param_groups
        lrs = {n: groups[g]["lr"] for n, g in self._group_of.items()}  # read each step: schedules change it
        return Inner(self.model, self.criterion, self._params, lrs, x, y, self._denominator(y), self.collective)

    def _denominator(self, y: Tensor) -> Tensor | None:
        """This rank's Z: the loss's own (``PerSampleLoss.denominator``), averaged over ranks under torchrun.

        The mean over ranks of Σ_{i∈r} ω_i ℓ_i / mean_r(Z_r) is Σ_i ω_i ℓ_i / Σ_r Z_r, the global-batch loss,
        for Z = B (None, every rank has b) and for the losses that divide by their own weight sum Σ_i v_{y_i}.
        """
        z = self.criterion.denominator(y)
        return z if z is None else self.collective.mean([z])[0]


@META_MODES.register("off")
class OffMode(MetaMode):
    """No reweighting: the mean per-sample loss, one real step."""

    distributed_problem = None

    def _step(self, x: Tensor, y: Tensor, _meta_batch: tuple[Tensor, Tensor] | None) -> dict[str, Tensor]:
        losses, logits = self._train_forward(x, y)  # (B,), (B, C)
        loss = weighted_mean(losses, torch.ones_like(losses), self._denominator(y))
        real_step(self.optimizer, loss)
        return {"loss": loss.detach(), "logits": logits}


class ClassWeightMode(MetaMode):
    """Base of the modes that weight classes by a Difficulty-Net: holds D and runs the real phase (Eq. 11).

    Args:
        cfg, model, criterion, optimizer, num_classes: as `build_meta_mode`.
        diffnet: Difficulty-Net to use (default: built from ``cfg.diffnet``); moved to the model's device, ≥ fp32.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        model: nn.Module,
        criterion: nn.Module,
        optimizer: torch.optim.Optimizer,
        num_classes: int,
        diffnet: nn.Module | None = None,
        *,
        forward: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        super().__init__(cfg, model, criterion, optimizer, num_classes, forward=forward)
        if diffnet is None:
            diffnet = DifficultyNet(num_classes, cfg.diffnet.hidden, cfg.diffnet.bias)
        self.diffnet = diffnet.to(device=self.device, dtype=self.dtype)
        self.normalize, self.temperature = cfg.diffnet.normalize, cfg.diffnet.temperature

    def owned(self) -> Owned:
        """The base declaration plus Difficulty-Net."""
        return super().owned().plus(Owned({"diffnet": self.diffnet}))

    def class_weights(self) -> Tensor:
        """Current (C,) class weights of Difficulty-Net, detached."""
        with torch.no_grad():
            return class_weights(self.diffnet, self.acc, self.normalize, self.temperature)[0]

    def _real_phase(self, losses: Tensor, logits: Tensor, y: Tensor) -> dict[str, Tensor]:
        """Eq. 11: detached weights of the (updated) net, (1/b) Σ w'_{y_i} ℓ_i, real step."""
        with torch.no_grad():
            w, d = class_weights(self.diffnet, self.acc, self.normalize, self.temperature)  # (C,)
        loss = weighted_mean(losses, w[y], self._denominator(y))
        real_step(self.optimizer, loss)
        return {"loss": loss.detach(), "logits": logits, **weight_stats(w, d)}


def diffnet_adam(net: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Adam:
    """Difficulty-Net's optimiser (SPEC §1): Adam, lr β = ``diffnet.lr``, coupled L2 ``diffnet.weight_decay``.

    capturable on CUDA: Adam's step counter stays on the device, so the step can be graph-captured.
    """
    d, cuda = cfg.diffnet, device.type == "cuda"
    return torch.optim.Adam(net.parameters(), lr=d.lr, weight_decay=d.weight_decay, capturable=cuda)


@META_MODES.register("driver")
class DriverMode(ClassWeightMode):
    """What the released code computes (SPEC §4.4): an Adam step on λ·L_dr, then the real step with w(θ_{t+1}).

    Args:
        cfg, model, criterion, optimizer, num_classes, diffnet, forward: as `ClassWeightMode`.

    Attributes:
        relative_target: L_dr's target is Eq. 7's 1 − â (True) or the absolute 1 − a (`driver_loss`).
    """

    relative_target: bool = True
    # L_dr depends on A and θ only, both identical on every rank: so are θ's gradient and Adam step.
    distributed_problem = None

    def __init__(
        self,
        cfg: TrainConfig,
        model: nn.Module,
        criterion: nn.Module,
        optimizer: torch.optim.Optimizer,
        num_classes: int,
        diffnet: nn.Module | None = None,
        *,
        forward: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        super().__init__(cfg, model, criterion, optimizer, num_classes, diffnet, forward=forward)
        self.lambda_dr = cfg.meta.lambda_dr
        self.diffnet_optimizer = diffnet_adam(self.diffnet, cfg, self.device)

    def owned(self) -> Owned:
        """The base declaration plus Difficulty-Net and its Adam."""
        return super().owned().plus(Owned({}, {"diffnet_optimizer": self.diffnet_optimizer}))

    def _step(self, x: Tensor, y: Tensor, _meta_batch: tuple[Tensor, Tensor] | None) -> dict[str, Tensor]:
        _, d = class_weights(self.diffnet, self.acc, self.normalize)  # (C,)
        l_dr = driver_loss(d, self.acc, relative=self.relative_target)
        aux_step(self.diffnet_optimizer, [self.lambda_dr * l_dr], [None])
        return {**self._real_phase(*self._train_forward(x, y), y), "driver_loss": l_dr.detach()}


@META_MODES.register("exact")
class ExactMode(DriverMode):
    """The paper's Eqs. 8–11 (SPEC §4.3): differentiable virtual step, meta loss into θ, Adam, real step.

    ``cfg.meta.grad`` picks the meta-gradient algorithm (``META_GRADIENTS``: `meta_gradient_jvp` or the plain
    `meta_gradient_double_backward`); jvp falls back to double_backward, with a logged reason in
    ``grad_fallback_reason``, when the loss has no forward-mode AD formula.

    Args:
        cfg, model, criterion, optimizer, num_classes, diffnet, forward: as `DriverMode`.
    """

    needs_meta_batch = True
    # g, v, L_meta and θ's gradient are averaged over ranks (meta.gradient, aux_step's average).
    distributed_problem = None

    def __init__(
        self,
        cfg: TrainConfig,
        model: nn.Module,
        criterion: nn.Module,
        optimizer: torch.optim.Optimizer,
        num_classes: int,
        diffnet: nn.Module | None = None,
        *,
        forward: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        super().__init__(cfg, model, criterion, optimizer, num_classes, diffnet, forward=forward)
        self.grad, self.grad_fallback_reason = choose_grad(
            cfg.meta.grad, criterion, num_classes, self.device
        )

    def _step(self, x: Tensor, y: Tensor, meta_batch: tuple[Tensor, Tensor] | None) -> dict[str, Tensor]:
        w, d = class_weights(self.diffnet, self.acc, self.normalize, self.temperature)  # (C,), in θ's graph
        l_dr = driver_loss(d, self.acc, relative=self.relative_target)
        omega = w[y]  # (B,) device-side gather
        # jvp: one train forward serves Eq. 9 (first-order g) and Eq. 11 (second backward with w').
        shared = self._train_forward(x, y) if needs_losses(self.grad) else None
        mg = meta_gradient(self._inner(x, y), None if shared is None else shared[0], lambda _: omega, meta_batch, self.grad)
        # Under torchrun θ's gradient is averaged over ranks: each rank's meta term is its share of the global one
        # times N (its loss divides by Z/N), the λ·L_dr term is the same on every rank.
        average = self.collective.mean if self.collective.distributed else None
        aux_step(self.diffnet_optimizer, [self.lambda_dr * l_dr, *mg.roots], [None, *mg.grad_tensors], average)
        losses, logits = shared if shared is not None else self._train_forward(x, y)
        return {**self._real_phase(losses, logits, y), "driver_loss": l_dr.detach(), "meta_loss": mg.meta_loss}


@META_MODES.register("mwn")
class MWNMode(MetaMode):
    """The Meta-Weight-Net baseline (SPEC §12): ω_i = b·V(ℓ_i)/Σ_j V(ℓ_j) on detached losses, same three steps.

    Which losses V sees:

    - Virtual step (Eq. 9 with ω): V reads the per-sample losses ℓ_i(φ_t) of the virtual forward,
      **detached** (``sample_weights``): those of the shared train forward on the jvp path, those of the
      scratch forward on the double-backward path (equal values: both are train-mode forwards at φ_t on x). So
      φ̂ = φ_t − α (1/b) Σ_i ω_i(Θ) ∇_φ ℓ_i(φ_t) and L_meta reaches Θ only through ω, as the MWN paper's
      update writes it; φ̂ is linear in ω and ω depends on Θ alone, which is what the jvp path needs.
    - Meta step: V is not evaluated; L_meta is the plain mean CE of f(x^m; φ̂) on the balanced meta batch.
    - Real step: V with the updated Θ on the detached losses of the real forward (reference: ``no_grad``).

    ω = b·V/ΣV with (1/b) Σ ω_i ℓ_i equals the reference's Σ_i ℓ_i V_i/Σ_j V_j; its host check ``ΣV ≠ 0``
    is dropped (sigmoid outputs are positive, and the check would sync). The class-imbalance reference
    (xjtushujun/Meta-weight-net_class-imbalance) feeds V the *non-detached* virtual-forward losses
    (``vnet(cost_v)``), so its virtual gradient also carries ∂V/∂ℓ·∇_φℓ terms; the MWN paper's Eq. 4 and
    its noisy-label code (``vnet(cost_v.data)``) detach, and so does this mode.

    V's optimiser is the reference's ``optimizer_c``: SGD lr 1e-5, momentum 0.9, Nesterov, weight decay
    5e-4 (``meta.mwn_lr``, ``mwn_momentum``, ``mwn_nesterov``, ``mwn_weight_decay``; the reference passes the
    last three from the arguments it also gives the classifier's SGD). There is no driver loss.
    ``cfg.meta.grad`` works as in `ExactMode`.
    Not under torchrun (``distributed_problem``).

    Args:
        cfg, model, criterion, optimizer, num_classes: as `build_meta_mode`.
        vnet: the weighting net V (default: ``MetaWeightNet(cfg.meta.mwn_hidden)``).
    """

    needs_meta_batch = True
    distributed_problem = (
        "its weights b·V(ℓ_i)/Σ_j V(ℓ_j) are normalised over the batch, and the global Σ_j V(ℓ_j) with its "
        "gradient is not reduced across ranks; run it on one process"
    )

    def __init__(
        self,
        cfg: TrainConfig,
        model: nn.Module,
        criterion: nn.Module,
        optimizer: torch.optim.Optimizer,
        num_classes: int,
        vnet: nn.Module | None = None,
        *,
        forward: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        super().__init__(cfg, model, criterion, optimizer, num_classes, forward=forward)
        self.vnet = (vnet if vnet is not None else MetaWeightNet(cfg.meta.mwn_hidden)).to(
            self.device, self.dtype
        )
        m = cfg.meta
        self.vnet_optimizer = torch.optim.SGD(
            self.vnet.parameters(), lr=m.mwn_lr, momentum=m.mwn_momentum, nesterov=m.mwn_nesterov,
            weight_decay=m.mwn_weight_decay,
        )
        self.grad, self.grad_fallback_reason = choose_grad(
            cfg.meta.grad, criterion, num_classes, self.device
        )

    def owned(self) -> Owned:
        """The base declaration plus V and its SGD (checkpoint names ``mwn``, ``mwn_optimizer``)."""
        return super().owned().plus(Owned({"mwn": self.vnet}, {"mwn_optimizer": self.vnet_optimizer}))

    def class_weights(self) -> Tensor | None:
        """None: MWN weights samples, not classes (the step reports their min/max)."""
        return None

    def sample_weights(self, losses: Tensor) -> Tensor:
        """ω = b·V(ℓ)/Σ V(ℓ), (B,), on detached losses, in V's precision and graph."""
        with torch.autocast(losses.device.type, enabled=False):
            v = self.vnet(losses.detach().to(self.dtype))  # (B,)
        return v * (v.numel() / v.sum())

    def _step(self, x: Tensor, y: Tensor, meta_batch: tuple[Tensor, Tensor] | None) -> dict[str, Tensor]:
        shared = self._train_forward(x, y) if needs_losses(self.grad) else None
        mg = meta_gradient(self._inner(x, y), None if shared is None else shared[0], self.sample_weights, meta_batch, self.grad)
        aux_step(self.vnet_optimizer, mg.roots, list(mg.grad_tensors))
        losses, logits = shared if shared is not None else self._train_forward(x, y)
        with torch.no_grad():
            w = self.sample_weights(losses)  # (B,) of the updated V
        loss = weighted_mean(losses, w, self.criterion.denominator(y))
        real_step(self.optimizer, loss)
        return {
            "loss": loss.detach(),
            "logits": logits,
            "meta_loss": mg.meta_loss,
            "weight_min": w.min(),
            "weight_max": w.max(),
        }


def build_meta_mode(
    cfg: TrainConfig,
    model: nn.Module,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    num_classes: int,
    *,
    forward: Callable[[Tensor], Tensor] | None = None,
    collective: Collective = LOCAL,
) -> MetaMode:
    """Builds the mode named ``cfg.meta.mode`` for a model already on its device (``forward``: see `MetaMode`),
    as one rank of ``collective`` (`MetaMode.use_collective`; ``forward`` is then the DDP module).

    Raises:
        UnknownNameError: the mode is not registered.
        ValueError: the mode cannot run under torchrun.
    """
    meta = META_MODES.get(cfg.meta.mode)(cfg, model, criterion, optimizer, num_classes, forward=forward)
    meta.use_collective(collective)
    return meta


def _optimised_params(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[Params, dict[str, int]]:
    """φ: the model's parameters the optimiser updates, and the index of each one's param group."""
    group_of_id = {id(p): i for i, group in enumerate(optimizer.param_groups) for p in group["params"]}
    params = {n: p for n, p in model.named_parameters() if p.requires_grad and id(p) in group_of_id}
    return params, {n: group_of_id[id(p)] for n, p in params.items()}


def choose_grad(
    grad: str, criterion: nn.Module, num_classes: int, device: torch.device
) -> tuple[str, str | None]:
    """The meta-gradient algorithm to use, and why jvp was replaced by double_backward (None if it was not)."""
    if grad != "jvp":
        return grad, None
    problem = forward_ad_problem(criterion, num_classes, device)
    if problem is not None:
        log.warning("meta.grad=jvp falls back to double_backward: %s", problem)
        return "double_backward", problem
    return grad, None
