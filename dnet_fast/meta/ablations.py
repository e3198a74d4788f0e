"""The paper's Table 4 ablation modes: frozen (#5), exact_absolute (#7; #4 with λ = 0), exact_sample (#8).

Each reuses the named phases and `meta_gradient` of the paper's method (`ExactMode`) and changes one thing:
what trains D (frozen: nothing), what D reads (absolute: each class's own accuracy; sample: the batch's
losses), and with it the driver target. The other rows are configurations of existing modes (SPEC §11,
Table 4):

====  ===========================  ===============================================================
#1    Focal                        ``off`` + ``loss.name = focal``
#2    CDB-CE                       ``off`` + ``loss.name = cdb_ce``
#3    MWN                          ``mwn``
#4    CDB-CE + MWN                 ``exact_absolute`` with λ = 0: MWN's meta-learned per-item map applied to
                                   CDB-CE's per-class accuracy, no driver loss
#5    Ours w/o L_dr and ML         ``frozen``: nothing trains D, the weights come from D at its initialisation
#6    Ours w/o L_dr                ``exact`` with λ = 0
#7    absolute difficulty          ``exact_absolute``
#8    sample-level difficulty      ``exact_sample``
#9    Ours                         ``exact``
====  ===========================  ===============================================================
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from dnet_fast.config import TrainConfig
from dnet_fast.meta.gradient import meta_gradient, needs_losses
from dnet_fast.meta.modes import (
    META_MODES,
    ClassWeightMode,
    ExactMode,
    MetaMode,
    Owned,
    choose_grad,
    diffnet_adam,
)
from dnet_fast.meta.phases import aux_step, class_weights, driver_loss, real_step, weight_stats, weighted_mean
from dnet_fast.models.difficulty_net import DifficultyNet

__all__ = ["ExactAbsoluteMode", "ExactSampleMode", "FrozenMode", "sample_accuracy"]


@META_MODES.register("frozen")
class FrozenMode(ClassWeightMode):
    """Table 4 #5, "Ours w/o L_dr and ML": class weights w = C·D(A; θ_0)/Σ from an untrained Difficulty-Net.

    Eq. 8 without both of its terms leaves θ no objective, so D keeps its (seeded) initialisation θ_0 and only
    A changes from epoch to epoch; one real step per iteration, no meta batch, no optimiser for θ (not even
    weight decay: there is no loss to regularise). ``meta.mode = driver`` with ``meta.lambda_dr = 0`` is the
    other reading — Adam's coupled weight decay alone then shrinks θ towards 0, so w drifts to 1 within about
    |θ|/β ≈ 10⁴ iterations at the CIFAR settings — and stays available as a configuration.

    Args:
        cfg, model, criterion, optimizer, num_classes, diffnet, forward: as `ClassWeightMode`.
    """

    # Only the real step: DDP averages its gradients; D is fixed and identical on every rank.
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
        self.diffnet.requires_grad_(False)  # θ_0 for good: no phase may build a graph into it

    def _step(self, x: Tensor, y: Tensor, _meta_batch: tuple[Tensor, Tensor] | None) -> dict[str, Tensor]:
        return self._real_phase(*self._train_forward(x, y), y)


@META_MODES.register("exact_absolute")
class ExactAbsoluteMode(ExactMode):
    """Table 4 #7, absolute difficulty: d_c = D^abs(a_c; θ), trained exactly as `ExactMode` (Eqs. 8–11).

    Paper §4.5: "we modified Difficulty-Net from Eq. 1 to d_c = D^abs(a_c; θ) and trained it in the same way
    as before". D^abs is Difficulty-Net with input and output width 1 (1→H→H→1, sigmoid), applied to each
    class's accuracy as its own row, so a class's difficulty cannot depend on the other classes' accuracies.
    The weights are then normalised over classes as in every class-level mode (w = C·d/Σd,
    ``diffnet.normalize``), exactly as CDB-CE normalises its (1 − a_c)^τ.

    Driver target (the paper is silent): t_c = 1 − a_c, the absolute difficulty of CDB-CE that the paper's
    §3.1 quotes, instead of Eq. 7's 1 − â_c with â_c = a_c/Σ_k a_k. The normalisation by Σ_k a_k is what makes
    Eq. 7 *relative*; keeping it would pull an absolute net towards a target that moves with the other
    classes' accuracies. Both targets are all ones when A = 0 (CIFAR epoch 0).

    Without biases a ReLU MLP of one input a ≥ 0 is positively homogeneous, D^abs(a) = σ(κ·a) with the single
    number κ = fc3·relu(fc2·relu(fc1)): the Table 4 presets set ``diffnet.bias = true`` for this mode.

    Table 4 #4 (CDB-CE + MWN, "the straight-forward combination … without the driver loss") is this mode with
    λ = 0: MWN's meta-learned per-item weighting function applied at class level to CDB-CE's signal, the
    accuracy of the class alone. The jvp path applies as in `ExactMode`: ω_i = w_{y_i}(θ; A) does not depend
    on φ, so φ̂ is linear in ω.

    Args:
        cfg, model, criterion, optimizer, num_classes, forward: as `ExactMode`.
        diffnet: the absolute net (default ``DifficultyNet(1, diffnet.hidden, diffnet.bias)``).
    """

    relative_target = False
    distributed_problem = None  # reduces exactly as ExactMode (same phases, same collective)

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
        if diffnet is None:
            diffnet = DifficultyNet(1, cfg.diffnet.hidden, cfg.diffnet.bias)
        super().__init__(cfg, model, criterion, optimizer, num_classes, diffnet, forward=forward)


def sample_accuracy(losses: Tensor) -> Tensor:
    """p_i = exp(−ℓ_i) (B,): for the cross-entropy, the probability the model gives sample i's true label.

    The sample-level stand-in for a class's accuracy in the driver loss: a_c is the expected 0/1 correctness
    of class c's val images, p_i that of sample i under the model's own predictive distribution. It is a
    function of D^sample's input, as 1 − â is of D's.
    """
    return torch.exp(-losses)


@META_MODES.register("exact_sample")
class ExactSampleMode(MetaMode):
    """Table 4 #8, sample-level relative difficulty: d_1..d_B = D^sample(ℓ_1..ℓ_B; θ), Eqs. 8–11 per sample.

    Paper §4.5: "d_1, d_2, …, d_B = D^sample({l_s}_{s=1}^B; θ) where B is the total number of samples in a
    single batch, l_s is the model's cross-entropy loss for samples s … Note that this variant uses relative
    difficulty and the driver loss". D^sample is Difficulty-Net with width N = B (``optim.batch_size``; the
    loaders drop the last partial batch). Per iteration:

    1. Real train forward ℓ(φ_t) (B,), kept for Eq. 11; D reads ℓ **detached**, a constant like A.
    2. w, d = `class_weights`(D^sample, ℓ): w = B·d/Σd (``sum_to_C`` normalises over the net's B outputs, so
       the weights average 1 per sample — the paper's Eq. 4 has no normalisation, the project's class-level
       rule sums to the number of weighted items, as MWN's b·V/ΣV does; ``none``: w = d).
    3. L_dr = mean_i (t_i − d_i)², t = 1 − p/Σp with p = `sample_accuracy`(ℓ) = exp(−ℓ) (the paper is silent
       on the target: Eq. 7 with each sample's true-label probability in place of a class's accuracy, so a
       sample whose loss is relatively high gets a high target).
    4. Eq. 9–10: `meta_gradient` with ω = w, Adam on θ with λ·L_dr + L_meta.
    5. Eq. 11: w' from the updated θ on the same ℓ, (1/b) Σ w'_i ℓ_i, real step.

    The jvp path's ω-linearity holds: because D^sample reads detached losses, ω = w(θ; ℓ(φ_t)) is a function
    of θ alone in the virtual step φ̂ = φ_t − α (1/b) Σ_i ω_i ∇_φ ℓ_i(φ_t), which is linear in ω; ∂L_meta/∂ω_i
    is one JVP, as for class weights. (Feeding D non-detached losses would add ∂ω/∂φ terms to the virtual
    gradient and need the double backward; this mode does not offer it.) On the double-backward path the
    scratch forward recomputes the same losses, and ω is the same tensor.

    Args:
        cfg, model, criterion, optimizer, num_classes, forward: as `build_meta_mode`.
        sample_net: D^sample (default ``DifficultyNet(optim.batch_size, diffnet.hidden, diffnet.bias)``).
    """

    needs_meta_batch = True
    distributed_problem = (
        "D^sample reads this rank's b losses; the global batch of N·b would need a net of width N·b (not offered)"
    )

    def __init__(
        self,
        cfg: TrainConfig,
        model: nn.Module,
        criterion: nn.Module,
        optimizer: torch.optim.Optimizer,
        num_classes: int,
        sample_net: nn.Module | None = None,
        *,
        forward: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        super().__init__(cfg, model, criterion, optimizer, num_classes, forward=forward)
        if sample_net is None:
            sample_net = DifficultyNet(cfg.optim.batch_size, cfg.diffnet.hidden, cfg.diffnet.bias)
        self.sample_net = sample_net.to(device=self.device, dtype=self.dtype)
        self.lambda_dr = cfg.meta.lambda_dr
        self.normalize, self.temperature = cfg.diffnet.normalize, cfg.diffnet.temperature
        self.sample_net_optimizer = diffnet_adam(self.sample_net, cfg, self.device)
        self.grad, self.grad_fallback_reason = choose_grad(cfg.meta.grad, criterion, num_classes, self.device)

    def owned(self) -> Owned:
        """The base declaration plus D^sample and its Adam (names ``sample_diffnet[_optimizer]``)."""
        net, opt = self.sample_net, self.sample_net_optimizer
        aux = Owned({"sample_diffnet": net}, {"sample_diffnet_optimizer": opt})
        return super().owned().plus(aux)

    def class_weights(self) -> Tensor | None:
        """None: this mode weights samples, not classes (the step reports their min/max)."""
        return None

    def sample_weights(self, losses: Tensor) -> tuple[Tensor, Tensor]:
        """(w, d) of the batch, (B,) each, from its detached losses, in D^sample's precision and graph.

        Raises:
            ValueError: the batch size is not the net's width ``optim.batch_size``.
        """
        self._check_batch(losses.shape)
        return class_weights(self.sample_net, losses.detach().to(self.dtype), self.normalize,
                             self.temperature)

    def _check_batch(self, shape: torch.Size) -> None:
        """ValueError unless ``shape`` is (width of D^sample,): a (2B,) input would pass as two rows."""
        width = self.sample_net.num_classes
        if tuple(shape) != (width,):
            msg = f"exact_sample needs batches of optim.batch_size = {width} samples, got {tuple(shape)}"
            raise ValueError(msg)

    def _step(self, x: Tensor, y: Tensor, meta_batch: tuple[Tensor, Tensor] | None) -> dict[str, Tensor]:
        self._check_batch(y.shape)  # before any forward touches the BN running statistics
        losses, logits = self._train_forward(x, y)  # (B,), (B, C): D^sample reads ℓ(φ_t) before Eq. 9
        w, d = self.sample_weights(losses)  # (B,), in θ's graph
        l_dr = driver_loss(d, sample_accuracy(losses.detach().to(self.dtype)))
        shared = losses if needs_losses(self.grad) else None
        mg = meta_gradient(self._inner(x, y), shared, lambda _: w, meta_batch, self.grad)
        aux_step(self.sample_net_optimizer, [self.lambda_dr * l_dr, *mg.roots], [None, *mg.grad_tensors])
        with torch.no_grad():
            w_new, d_new = self.sample_weights(losses)  # (B,) of the updated θ
        loss = weighted_mean(losses, w_new, self.criterion.denominator(y))
        real_step(self.optimizer, loss)
        return {
            "loss": loss.detach(),
            "logits": logits,
            "meta_loss": mg.meta_loss,
            "driver_loss": l_dr.detach(),
            **weight_stats(w_new, d_new),
        }
