"""The META_MODES registry: one whole training iteration (off | driver | exact | mwn), written as named phases."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from dnet_fast.config import TrainConfig
from dnet_fast.models.difficulty_net import DifficultyNet, MetaWeightNet
from dnet_fast.registry import Registry

__all__ = [
    "META_MODES",
    "DriverMode",
    "ExactMode",
    "Inner",
    "MWNMode",
    "MetaGrad",
    "MetaMode",
    "OffMode",
    "aux_step",
    "build_meta_mode",
    "class_weights",
    "driver_loss",
    "forward_ad_problem",
    "loss_denominator",
    "loss_jvp",
    "meta_gradient",
    "meta_gradient_double_backward",
    "meta_gradient_jvp",
    "meta_loss",
    "real_step",
    "scratch_buffers",
    "scratch_losses",
    "virtual_step",
    "weight_stats",
    "weighted_mean",
]

log = logging.getLogger(__name__)

META_MODES: Registry[type[MetaMode]] = Registry("meta mode")

Params = dict[str, Tensor]
#: Maps the per-sample losses (B,) of the virtual forward to per-sample weights ω (B,) in the graph of the
#: auxiliary net (Difficulty-Net: ω_i = w_{y_i}, ignoring the losses; MWN: ω_i ∝ V(ℓ_i)).
Weigher = Callable[[Tensor], Tensor]

_EPS = 1e-12  # SPEC §5: t = 1 - a / (Σa + ε)


# ----------------------------------------------------------------------------------------------------------
# Phases: near-pure functions, each one step of the iteration.


def weighted_mean(losses: Tensor, weights: Tensor, denominator: Tensor | None = None) -> Tensor:
    """L = Σ_i w_i ℓ_i / Z with Z = B (the Difficulty-Net reduction: divide by b, not by Σ w).

    Args:
        losses: (B,) per-sample losses.
        weights: (B,) per-sample weights.
        denominator: Z when the loss divides by its own class weights Σ_i v_{y_i} (see `loss_denominator`);
            None means B.

    Raises:
        ValueError: ``losses`` is not (B,) or ``weights`` has another shape; a (B,1) × (B,) product would
            broadcast to (B, B) and silently lose the per-sample weights (SPEC §13 #2).
    """
    if losses.ndim != 1 or weights.shape != losses.shape:
        msg = f"per-sample weighting needs losses (B,) and weights (B,), got {tuple(losses.shape)} and {tuple(weights.shape)}"
        raise ValueError(msg)
    weighted = weights * losses  # (B,)
    return weighted.mean() if denominator is None else weighted.sum() / denominator


def loss_denominator(criterion: nn.Module, y: Tensor) -> Tensor | None:
    """Z of `weighted_mean` for ``criterion``, as ``dnet_fast.losses.reduce_loss`` defines it.

    None (Z = B) unless the loss carries its own class weights v and divides by Σ_i v_{y_i} (CB, LDAM-DRW,
    CDB-CE; SPEC §12). Z depends on the labels only, so it is a constant for every derivative in this module.
    """
    if not getattr(criterion, "divides_by_weight_sum", False):
        return None
    return (
        criterion.sample_weight(y).sum().clamp_min(torch.finfo(torch.float32).tiny)
    )  # floor: as reduce_loss


def class_weights(diffnet: nn.Module, acc: Tensor, normalize: str) -> tuple[Tensor, Tensor]:
    """Class weights from Difficulty-Net (SPEC §1), computed in the net's own precision (≥ fp32).

    Args:
        diffnet: D(·; θ), (C,) accuracies → (C,) difficulties in (0, 1).
        acc: (C,) per-class accuracy A.
        normalize: ``sum_to_C`` (w = C·d/Σd) or ``none`` (w = d).

    Returns:
        (w, d): weights (C,) and the raw difficulties (C,), both in the autograd graph of θ.
    """
    with torch.autocast(acc.device.type, enabled=False):  # bf16 autocast must not reach the small MLP
        d = diffnet(acc)  # (C,)
    if normalize == "none":
        return d, d
    return d * (d.numel() / d.sum()), d  # (C,), sums to C


def driver_loss(d: Tensor, acc: Tensor) -> Tensor:
    """L_dr = mean_c (t_c − d_c)², t = 1 − a/(Σa + 1e-12), on the difficulties before normalisation (SPEC §5)."""
    target = 1.0 - acc / (acc.sum() + _EPS)  # (C,); all ones when A = 0
    return F.mse_loss(d, target)


def weight_stats(w: Tensor, d: Tensor) -> dict[str, Tensor]:
    """Detached weight_min, weight_max and E = −(1/C) Σ log(C·d_c/Σd) (SPEC §1, paper Fig. 3)."""
    with torch.no_grad():
        e = -torch.log(d * (d.numel() / d.sum())).mean()
        return {"weight_min": w.min(), "weight_max": w.max(), "weight_E": e}


def scratch_buffers(model: nn.Module) -> Params:
    """Throw-away copies of the model's buffers.

    Virtual and meta forwards run in train mode (batch statistics) like the real forward, but their BatchNorm
    running-statistics updates must land somewhere that is discarded (SPEC §4.3).
    """
    return {name: b.clone() for name, b in model.named_buffers()}


def virtual_step(
    params: Mapping[str, Tensor], grads: Mapping[str, Tensor | None], lrs: Mapping[str, Any]
) -> Params:
    """φ̂ = φ − α g per parameter (Eq. 9): plain SGD, no momentum or weight decay; a missing g leaves φ as is.

    Args:
        params: φ by name.
        grads: g by name (None where the loss does not depend on the parameter).
        lrs: α by name, the current lr of the parameter's optimizer group (float or 0-d tensor; a device
            tensor, as `dnet_fast.step` installs, is read on the device, so schedules need no re-capture).
    """
    return {n: p if grads[n] is None else p - lrs[n] * grads[n] for n, p in params.items()}


def meta_loss(
    model: nn.Module, params_hat: Mapping[str, Tensor], meta_batch: tuple[Tensor, Tensor]
) -> Tensor:
    """L_meta = mean CE of f(x^m; φ̂) on the balanced meta batch, train-mode BN with throw-away buffers."""
    xm, ym = meta_batch
    logits = functional_call(model, (dict(params_hat), scratch_buffers(model)), (xm,))  # (m, C)
    return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), ym)


def real_step(
    optimizer: torch.optim.Optimizer,
    loss: Tensor,
    *,
    set_to_none: bool = True,
    update: Callable[[], object] | None = None,
) -> None:
    """Eq. 11: zero the grads, backward ``loss`` into φ, one step of the main optimiser.

    Args:
        optimizer: the main optimiser (its ``zero_grad`` always runs).
        loss: the scalar to differentiate.
        set_to_none: passed to ``zero_grad``.
        update: replaces ``optimizer.step()`` (the CUDA-graph step installs an in-place tensor-lr SGD,
            ``dnet_fast.step.sgd_step_``); None calls ``optimizer.step()``.
    """
    optimizer.zero_grad(set_to_none=set_to_none)
    loss.backward()
    if update is None:
        optimizer.step()
    else:
        update()


def aux_step(
    optimizer: torch.optim.Optimizer,
    roots: list[Tensor],
    grads: list[Tensor | None],
    *,
    set_to_none: bool = True,
) -> None:
    """Eq. 10 for the auxiliary net: backward Σ_k ⟨roots_k, grads_k⟩ into its parameters only, one step."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    pairs = [(r, g) for r, g in zip(roots, grads, strict=True) if r.requires_grad]  # detached roots add 0
    optimizer.zero_grad(set_to_none=set_to_none)
    if pairs:
        torch.autograd.backward([r for r, _ in pairs], [g for _, g in pairs], inputs=params)
    optimizer.step()


def _jvp(
    fn: Callable[..., Tensor], primals: tuple[Any, ...], tangents: tuple[Any, ...]
) -> tuple[Tensor, Tensor]:
    """``torch.func.jvp``, minus the DeprecationWarning torch's own first call raises.

    The first jvp imports torch's forward-AD decompositions, which torch compiles with the deprecated
    ``torch.jit.script``; the warning concerns torch internals, not this code.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r".*torch\.jit\.script.*deprecated", category=DeprecationWarning
        )
        return torch.func.jvp(fn, primals, tangents)


# ----------------------------------------------------------------------------------------------------------
# The meta-gradient: the derivative of L_meta(φ̂(ω)) with respect to the per-sample weights ω.


class Inner(NamedTuple):
    """The inner problem of one iteration: the classifier at φ_t, its step sizes and its training batch."""

    model: nn.Module
    criterion: nn.Module  # per-sample loss, (B, C) logits → (B,)
    params: Params  # φ_t: the parameters the main optimiser updates
    lrs: dict[str, Any]  # α per parameter name (float or 0-d tensor)
    x: Tensor  # (B, 3, H, W)
    y: Tensor  # (B,)
    denominator: Tensor | None  # Z of the reduction (None: B), see `loss_denominator`


class MetaGrad(NamedTuple):
    """The meta term as backward roots: ∇_θ L_meta = Σ_k (∂roots_k/∂θ)ᵀ grad_tensors_k."""

    meta_loss: Tensor  # detached scalar L_meta at φ̂
    roots: list[Tensor]
    grad_tensors: list[Tensor]


def scratch_losses(inner: Inner, params: Mapping[str, Tensor]) -> Tensor:
    """Per-sample losses ℓ(φ) (B,) of a train-mode forward at ``params`` that leaves the model's buffers alone."""
    logits = functional_call(inner.model, (dict(params), scratch_buffers(inner.model)), (inner.x,))  # (B, C)
    return inner.criterion(logits, inner.y)


def meta_gradient_double_backward(
    inner: Inner, weigh: Weigher, meta_batch: tuple[Tensor, Tensor]
) -> MetaGrad:
    """The plain reference: g = ∇_φ L_w with ``create_graph``, φ̂ = φ − αg, L_meta(φ̂) is the backward root.

    The virtual forward uses throw-away BN buffers, so the real forward still has to run afterwards.
    """
    losses = scratch_losses(inner, inner.params)  # (B,)
    names = list(inner.params)
    grads = torch.autograd.grad(
        weighted_mean(losses, weigh(losses), inner.denominator),
        [inner.params[n] for n in names],
        create_graph=True,
        allow_unused=True,
    )
    params_hat = virtual_step(inner.params, dict(zip(names, grads, strict=True)), inner.lrs)
    l_meta = meta_loss(inner.model, params_hat, meta_batch)
    return MetaGrad(l_meta.detach(), [l_meta], [torch.ones_like(l_meta)])


def loss_jvp(inner: Inner, tangents: Mapping[str, Tensor]) -> Tensor:
    """s_i = uᵀ ∇_φ ℓ_i(φ_t) for every sample at once: one forward-mode pass (train-mode BN, throw-away buffers).

    The batch statistics depend on φ, so s includes the path through them, as the double backward does.
    """

    # scratch_losses clones the buffers inside the transformed function: functorch forbids in-place updates
    # (BN running statistics, num_batches_tracked) of tensors captured from outside.
    primals = {n: p.detach() for n, p in inner.params.items()}
    with torch.no_grad():  # forward-mode only; no reverse graph needed
        _, s = _jvp(lambda params: scratch_losses(inner, params), (primals,), (dict(tangents),))
    return s  # (B,)


def meta_gradient_jvp(
    inner: Inner, losses: Tensor, weigh: Weigher, meta_batch: tuple[Tensor, Tensor]
) -> MetaGrad:
    """The fast meta-gradient: ∂L_meta/∂ω_i = −(1/Z)·uᵀ∇_φℓ_i with u = α ⊙ ∂L_meta/∂φ̂ (no double backward).

    φ̂ = φ − α (1/Z) Σ_i ω_i ∇_φℓ_i is linear in ω, so dφ̂/dω_i = −(α/Z) ∇_φℓ_i; the b products uᵀ∇_φℓ_i are one
    JVP (`loss_jvp`) and θ gets them through an ordinary backward of ω.

    Args:
        inner: the inner problem.
        losses: (B,) per-sample losses of the shared train forward (real buffers); its graph is retained for the
            real step's backward.
        weigh: losses → ω (B,) in the graph of the auxiliary net.
        meta_batch: balanced (x^m, y^m).
    """
    omega = weigh(losses)  # (B,)
    names = list(inner.params)
    # First-order g: ω enters as a constant here; its influence on φ̂ is linear and handled through s below.
    grads = torch.autograd.grad(
        weighted_mean(losses, omega.detach(), inner.denominator),
        [inner.params[n] for n in names],
        retain_graph=True,
        allow_unused=True,
    )
    with torch.no_grad():
        params_hat = virtual_step(inner.params, dict(zip(names, grads, strict=True)), inner.lrs)
    params_hat = {n: p.detach().requires_grad_() for n, p in params_hat.items()}
    l_meta = meta_loss(inner.model, params_hat, meta_batch)
    v = torch.autograd.grad(l_meta, [params_hat[n] for n in names], allow_unused=True)  # ∂L_meta/∂φ̂
    u = {
        n: torch.zeros_like(params_hat[n]) if g is None else inner.lrs[n] * g
        for n, g in zip(names, v, strict=True)
    }
    s = loss_jvp(inner, u)  # (B,)
    z = losses.shape[0] if inner.denominator is None else inner.denominator
    return MetaGrad(l_meta.detach(), [omega], [-s / z])


def meta_gradient(
    inner: Inner, losses: Tensor | None, weigh: Weigher, meta_batch: tuple[Tensor, Tensor], algorithm: str
) -> MetaGrad:
    """Dispatches to `meta_gradient_jvp` (needs ``losses``) or `meta_gradient_double_backward`."""
    if algorithm == "jvp":
        if losses is None:
            msg = "the jvp meta-gradient needs the losses of the shared train forward"
            raise ValueError(msg)
        return meta_gradient_jvp(inner, losses, weigh, meta_batch)
    return meta_gradient_double_backward(inner, weigh, meta_batch)


def forward_ad_problem(criterion: nn.Module, num_classes: int, device: torch.device) -> str | None:
    """Why ``criterion`` cannot be differentiated in forward mode (None when it can), probed on tiny logits."""
    z = torch.zeros(2, num_classes, device=device)  # (2, C)
    y = torch.zeros(2, dtype=torch.long, device=device)
    try:
        _jvp(lambda logits: criterion(logits, y), (z,), (torch.ones_like(z),))
    except (NotImplementedError, RuntimeError) as err:
        return f"{type(criterion).__name__} has no forward-mode AD formula ({err})"
    return None


# ----------------------------------------------------------------------------------------------------------
# Modes: each `step` is one whole iteration, ending with the real SGD step.


class MetaMode:
    """Base of the meta modes: holds the classifier, its loss and optimiser, and the static accuracy buffer A.

    ``step`` never syncs with the host (no ``.item()``, no data-dependent shapes), so it can be captured in a
    CUDA graph; the caller wraps it in autocast when training in bf16.

    Attributes:
        needs_meta_batch: whether ``step`` needs a balanced meta batch.
        diffnet: Difficulty-Net (driver, exact) or None.
        acc: (C,) static buffer with the per-class accuracy A, refreshed in place.
        set_to_none: passed to ``zero_grad``. Inside a captured CUDA graph either value is correct: with True,
            backward allocates the gradients from the graph's pool at capture and every replay overwrites them.
        update: replaces ``optimizer.step()`` in the real step (None: ``optimizer.step()``); `dnet_fast.step`
            installs an in-place SGD that reads tensor learning rates without a host sync.
        train_forward: the real forward (None: ``model``); `dnet_fast.step` may install a compiled backbone.
        on_train_logits: called as ``fn(logits.detach(), y)`` after the real forward, e.g. device class counters.
    """

    needs_meta_batch: bool = False

    def __init__(
        self,
        cfg: TrainConfig,
        model: nn.Module,
        criterion: nn.Module,
        optimizer: torch.optim.Optimizer,
        num_classes: int,
    ) -> None:
        self.cfg = cfg
        self.model, self.criterion, self.optimizer = model, criterion, optimizer
        self.num_classes = num_classes
        self.diffnet: nn.Module | None = None
        self.set_to_none = True
        self.update: Callable[[], object] | None = None
        self.train_forward: Callable[[Tensor], Tensor] | None = None
        self.on_train_logits: Callable[[Tensor, Tensor], object] | None = None
        first = next(model.parameters())
        self.device = first.device
        self.dtype = torch.promote_types(torch.float32, first.dtype)  # auxiliary nets: at least fp32
        self.acc = torch.zeros(num_classes, device=self.device, dtype=self.dtype)  # (C,)
        self._params, self._group_of = _optimised_params(model, optimizer)

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

    def state_dict(self) -> dict[str, Any]:
        """The mode's own state: A and, where present, the auxiliary net and its optimiser."""
        return {"acc": self.acc.clone()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restores what `state_dict` returned."""
        self.set_class_accuracy(state["acc"].to(self.acc.device))

    def step(
        self, x: Tensor, y: Tensor, meta_batch: tuple[Tensor, Tensor] | None = None
    ) -> dict[str, Tensor]:
        """One training iteration including the real optimiser step.

        Args:
            x: (B, 3, H, W) training images.
            y: (B,) int64 labels.
            meta_batch: balanced (x^m (m, 3, H, W), y^m (m,)) when ``needs_meta_batch``, else ignored.

        Returns:
            Detached scalar tensors: ``loss`` and, by mode, ``meta_loss``, ``driver_loss``, ``weight_min``,
            ``weight_max``, ``weight_E``.

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

    def _train_losses(self, x: Tensor, y: Tensor) -> Tensor:
        """The real train forward with the real buffers (BN running statistics update once): ℓ (B,) with graph."""
        logits = (self.model if self.train_forward is None else self.train_forward)(x)  # (B, C)
        if self.on_train_logits is not None:
            self.on_train_logits(logits.detach(), y)
        return self.criterion(logits, y)

    def _inner(self, x: Tensor, y: Tensor) -> Inner:
        groups = self.optimizer.param_groups
        lrs = {n: groups[g]["lr"] for n, g in self._group_of.items()}  # read each step: schedules change it
        return Inner(self.model, self.criterion, self._params, lrs, x, y, loss_denominator(self.criterion, y))


@META_MODES.register("off")
class OffMode(MetaMode):
    """No reweighting: the mean per-sample loss, one real step."""

    def _step(self, x: Tensor, y: Tensor, _meta_batch: tuple[Tensor, Tensor] | None) -> dict[str, Tensor]:
        losses = self._train_losses(x, y)  # (B,)
        loss = weighted_mean(losses, torch.ones_like(losses), loss_denominator(self.criterion, y))
        real_step(self.optimizer, loss, set_to_none=self.set_to_none, update=self.update)
        return {"loss": loss.detach()}


@META_MODES.register("driver")
class DriverMode(MetaMode):
    """What the released code computes (SPEC §4.4): an Adam step on λ·L_dr, then the real step with w(θ_{t+1}).

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
    ) -> None:
        super().__init__(cfg, model, criterion, optimizer, num_classes)
        if diffnet is None:
            diffnet = DifficultyNet(num_classes, cfg.diffnet.hidden, cfg.diffnet.bias)
        self.diffnet = diffnet.to(device=self.device, dtype=self.dtype)
        self.lambda_dr = cfg.meta.lambda_dr
        self.normalize = cfg.diffnet.normalize
        # capturable on CUDA: Adam's step counter stays on the device, so the step can be graph-captured.
        self.diffnet_optimizer = torch.optim.Adam(
            self.diffnet.parameters(),
            lr=cfg.diffnet.lr,
            weight_decay=cfg.diffnet.weight_decay,
            capturable=self.device.type == "cuda",
        )

    def class_weights(self) -> Tensor:
        """Current (C,) class weights of Difficulty-Net, detached."""
        with torch.no_grad():
            return class_weights(self.diffnet, self.acc, self.normalize)[0]

    def state_dict(self) -> dict[str, Any]:
        """A, Difficulty-Net and its Adam state."""
        return {
            **super().state_dict(),
            "diffnet": self.diffnet.state_dict(),
            "diffnet_optimizer": self.diffnet_optimizer.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restores what `state_dict` returned."""
        super().load_state_dict(state)
        self.diffnet.load_state_dict(state["diffnet"])
        self.diffnet_optimizer.load_state_dict(state["diffnet_optimizer"])

    def _step(self, x: Tensor, y: Tensor, _meta_batch: tuple[Tensor, Tensor] | None) -> dict[str, Tensor]:
        _, d = class_weights(self.diffnet, self.acc, self.normalize)  # (C,)
        l_dr = driver_loss(d, self.acc)
        aux_step(self.diffnet_optimizer, [self.lambda_dr * l_dr], [None], set_to_none=self.set_to_none)
        return {**self._real_phase(self._train_losses(x, y), y), "driver_loss": l_dr.detach()}

    def _real_phase(self, losses: Tensor, y: Tensor) -> dict[str, Tensor]:
        """Eq. 11: detached weights of the updated net, (1/b) Σ w'_{y_i} ℓ_i, real step."""
        with torch.no_grad():
            w, d = class_weights(self.diffnet, self.acc, self.normalize)  # (C,)
        loss = weighted_mean(losses, w[y], loss_denominator(self.criterion, y))
        real_step(self.optimizer, loss, set_to_none=self.set_to_none, update=self.update)
        return {"loss": loss.detach(), **weight_stats(w, d)}


@META_MODES.register("exact")
class ExactMode(DriverMode):
    """The paper's Eqs. 8–11 (SPEC §4.3): differentiable virtual step, meta loss into θ, Adam, real step.

    ``cfg.meta.grad`` picks the meta-gradient algorithm (`meta_gradient_jvp` or the plain
    `meta_gradient_double_backward`); jvp falls back to double_backward, with a logged reason in
    ``grad_fallback_reason``, when the loss has no forward-mode AD formula.

    Args:
        cfg, model, criterion, optimizer, num_classes, diffnet: as `DriverMode`.
        meta_scale: factor on the meta term of ∇_θ J (1 = the paper; 0 removes it, which makes the mode
            equal to `driver` step for step — a test hook).
        detach_weights: use detached weights in the virtual step, the official code's pattern (SPEC §4.2): the
            meta loss then sends no gradient to θ.
    """

    needs_meta_batch = True

    def __init__(
        self,
        cfg: TrainConfig,
        model: nn.Module,
        criterion: nn.Module,
        optimizer: torch.optim.Optimizer,
        num_classes: int,
        diffnet: nn.Module | None = None,
        *,
        meta_scale: float = 1.0,
        detach_weights: bool = False,
    ) -> None:
        super().__init__(cfg, model, criterion, optimizer, num_classes, diffnet)
        self.meta_scale = meta_scale
        self.detach_weights = detach_weights
        self.grad, self.grad_fallback_reason = _choose_grad(
            cfg.meta.grad, criterion, num_classes, self.device
        )

    def _step(self, x: Tensor, y: Tensor, meta_batch: tuple[Tensor, Tensor] | None) -> dict[str, Tensor]:
        w, d = class_weights(self.diffnet, self.acc, self.normalize)  # (C,), in θ's graph
        l_dr = driver_loss(d, self.acc)
        omega = w[y].detach() if self.detach_weights else w[y]  # (B,) device-side gather
        # jvp: one train forward serves Eq. 9 (first-order g) and Eq. 11 (second backward with w').
        losses = self._train_losses(x, y) if self.grad == "jvp" else None
        mg = meta_gradient(self._inner(x, y), losses, lambda _: omega, meta_batch, self.grad)
        scaled = mg.grad_tensors if self.meta_scale == 1.0 else [g * self.meta_scale for g in mg.grad_tensors]
        aux_step(
            self.diffnet_optimizer,
            [self.lambda_dr * l_dr, *mg.roots],
            [None, *scaled],
            set_to_none=self.set_to_none,
        )
        if losses is None:
            losses = self._train_losses(x, y)
        return {**self._real_phase(losses, y), "driver_loss": l_dr.detach(), "meta_loss": mg.meta_loss}


@META_MODES.register("mwn")
class MWNMode(MetaMode):
    """The Meta-Weight-Net baseline (SPEC §12): ω_i = b·V(ℓ_i)/Σ_j V(ℓ_j) on detached losses, same three steps.

    V is trained with plain SGD (lr ``cfg.meta.mwn_lr``); there is no driver loss. ``cfg.meta.grad`` works as in
    `ExactMode` (ω depends on V's parameters only, so the jvp path applies unchanged).

    Args:
        cfg, model, criterion, optimizer, num_classes: as `build_meta_mode`.
        vnet: the weighting net V (default: ``MetaWeightNet(cfg.meta.mwn_hidden)``).
    """

    needs_meta_batch = True

    def __init__(
        self,
        cfg: TrainConfig,
        model: nn.Module,
        criterion: nn.Module,
        optimizer: torch.optim.Optimizer,
        num_classes: int,
        vnet: nn.Module | None = None,
    ) -> None:
        super().__init__(cfg, model, criterion, optimizer, num_classes)
        self.vnet = (vnet if vnet is not None else MetaWeightNet(cfg.meta.mwn_hidden)).to(
            self.device, self.dtype
        )
        self.vnet_optimizer = torch.optim.SGD(self.vnet.parameters(), lr=cfg.meta.mwn_lr)
        self.grad, self.grad_fallback_reason = _choose_grad(
            cfg.meta.grad, criterion, num_classes, self.device
        )

    def class_weights(self) -> Tensor | None:
        """None: MWN weights samples, not classes (the step reports their min/max)."""
        return None

    def state_dict(self) -> dict[str, Any]:
        """A, V and its SGD state."""
        return {
            **super().state_dict(),
            "mwn": self.vnet.state_dict(),
            "mwn_optimizer": self.vnet_optimizer.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restores what `state_dict` returned."""
        super().load_state_dict(state)
        self.vnet.load_state_dict(state["mwn"])
        self.vnet_optimizer.load_state_dict(state["mwn_optimizer"])

    def sample_weights(self, losses: Tensor) -> Tensor:
        """ω = b·V(ℓ)/Σ V(ℓ), (B,), on detached losses, in V's precision and graph."""
        with torch.autocast(losses.device.type, enabled=False):
            v = self.vnet(losses.detach().to(self.dtype))  # (B,)
        return v * (v.numel() / v.sum())

    def _step(self, x: Tensor, y: Tensor, meta_batch: tuple[Tensor, Tensor] | None) -> dict[str, Tensor]:
        losses = self._train_losses(x, y) if self.grad == "jvp" else None
        mg = meta_gradient(self._inner(x, y), losses, self.sample_weights, meta_batch, self.grad)
        aux_step(self.vnet_optimizer, mg.roots, list(mg.grad_tensors), set_to_none=self.set_to_none)
        if losses is None:
            losses = self._train_losses(x, y)
        with torch.no_grad():
            w = self.sample_weights(losses)  # (B,) of the updated V
        loss = weighted_mean(losses, w, loss_denominator(self.criterion, y))
        real_step(self.optimizer, loss, set_to_none=self.set_to_none, update=self.update)
        return {
            "loss": loss.detach(),
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
) -> MetaMode:
    """Builds the mode named ``cfg.meta.mode`` for a model already on its device.

    Raises:
        UnknownNameError: the mode is not registered.
    """
    return META_MODES.get(cfg.meta.mode)(cfg, model, criterion, optimizer, num_classes)


def _optimised_params(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[Params, dict[str, int]]:
    """φ: the model's parameters the optimiser updates, and the index of each one's param group."""
    group_of_id = {id(p): i for i, group in enumerate(optimizer.param_groups) for p in group["params"]}
    params = {n: p for n, p in model.named_parameters() if p.requires_grad and id(p) in group_of_id}
    return params, {n: group_of_id[id(p)] for n, p in params.items()}


def _choose_grad(
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
