"""Meta modes: registry, weights, driver/exact equivalences, BatchNorm semantics, the real step, state."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dnet_fast.config import DiffNetConfig, LossConfig, MetaConfig, TrainConfig
from dnet_fast.losses import LOSSES, ClassBalancedCE, CrossEntropy, PerSampleLoss, build_loss
from dnet_fast.meta import (
    META_MODES,
    ExactMode,
    Inner,
    MetaMode,
    build_meta_mode,
    class_weights,
    driver_loss,
    forward_ad_problem,
    meta_gradient_double_backward,
    modes,
    weighted_mean,
)
from dnet_fast.models import DifficultyNet, MetaWeightNet
from tests.helpers import ACC, LAMBDA, B, C, TinyNet, batch, flat_grad, meta_config, tiny_param_groups

MOMENTUM, WD, LRS = 0.9, 5e-4, (0.5, 0.3)  # main SGD: backbone lr, head lr
MODES = [
    ("off", "jvp"),
    ("frozen", "jvp"),
    ("driver", "jvp"),
    ("exact", "jvp"),
    ("exact", "double_backward"),
    ("exact_absolute", "jvp"),
    ("exact_absolute", "double_backward"),
    ("exact_sample", "jvp"),
    ("exact_sample", "double_backward"),
    ("mwn", "jvp"),
    ("mwn", "double_backward"),
]
CLASS_NET_MODES = ("frozen", "driver", "exact", "exact_absolute")  # modes with a class-level Difficulty-Net


def make(
    mode: str,
    grad: str = "jvp",
    criterion: nn.Module | None = None,
    normalize: str = "sum_to_C",
    device: str = "cpu",
    temperature: float = 1.0,
    **kwargs,
) -> MetaMode:
    """A float64 meta mode on TinyNet; the same arguments give bit-identical initial states."""
    cfg = meta_config(mode, grad, normalize=normalize, temperature=temperature)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = TinyNet().to(device, torch.float64).train()
        groups = tiny_param_groups(model, *LRS)
        optimizer = torch.optim.SGD(groups, lr=0.1, momentum=MOMENTUM, nesterov=True, weight_decay=WD)
        criterion = (criterion or CrossEntropy()).to(device)
        meta = META_MODES.get(mode)(cfg, model, criterion, optimizer, C, **kwargs)
    meta.set_class_accuracy(ACC.to(device))
    return meta


def driver_grad(diffnet: nn.Module) -> Tensor:
    """λ ∇_θ L_dr written out independently."""
    d = diffnet(ACC)  # (C,)
    loss = LAMBDA * ((1.0 - ACC / ACC.sum() - d) ** 2).mean()
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(diffnet.parameters()))])


def assert_same_state(a: MetaMode, b: MetaMode, **tol) -> None:
    """Model parameters and buffers, momentum buffers and the auxiliary nets' parameters agree."""
    tol = tol or {"rtol": 0, "atol": 0}
    for (name, ta), tb in zip(a.model.state_dict().items(), b.model.state_dict().values(), strict=True):
        torch.testing.assert_close(ta, tb, msg=name, **tol)
    for pa, pb in zip(a.model.parameters(), b.model.parameters(), strict=True):
        torch.testing.assert_close(
            a.optimizer.state[pa]["momentum_buffer"], b.optimizer.state[pb]["momentum_buffer"], **tol
        )
    for name, net in a.owned().modules.items():
        for ta, tb in zip(net.parameters(), b.owned().modules[name].parameters(), strict=True):
            torch.testing.assert_close(ta, tb, msg=name, **tol)


# ----------------------------------------------------------------------------------------------------------
# Registry and construction


def test_registry_names_and_builder():
    assert META_MODES.names() == ["driver", "exact", "exact_absolute", "exact_sample", "frozen", "mwn", "off"]
    model = TinyNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for name in META_MODES.names():
        cfg = TrainConfig(meta=MetaConfig(mode=name), diffnet=DiffNetConfig(hidden=8))
        meta = build_meta_mode(cfg, model, CrossEntropy(), optimizer, C)
        assert meta.needs_meta_batch == (name in ("exact", "exact_absolute", "exact_sample", "mwn"))
        assert (meta.diffnet is not None) == (name in CLASS_NET_MODES)
        if meta.diffnet is not None:
            assert isinstance(meta.diffnet, DifficultyNet)
            assert meta.diffnet.num_classes == (1 if name == "exact_absolute" else C)  # the input width
            assert all(p.dtype == torch.float32 for p in meta.diffnet.parameters())
        if name == "exact_sample":
            assert isinstance(meta.sample_net, DifficultyNet)
            assert meta.sample_net.num_classes == cfg.optim.batch_size
        if name == "mwn":
            assert isinstance(meta.vnet, MetaWeightNet)


def test_step_rejects_eval_mode_missing_meta_batch_and_bad_accuracy():
    meta = make("exact")
    x, y, _ = batch(0)
    with pytest.raises(ValueError, match="meta batch"):
        meta.step(x, y, None)
    meta.model.eval()
    with pytest.raises(RuntimeError, match="train"):
        meta.step(*batch(0))
    with pytest.raises(ValueError, match="shape"):
        meta.set_class_accuracy(torch.zeros(C + 1))


def test_every_registered_loss_has_forward_mode_ad():
    counts = torch.tensor([40.0, 20, 10, 5, 2])
    for name in LOSSES.names():
        assert (
            forward_ad_problem(build_loss(LossConfig(name=name), counts, 10), C, torch.device("cpu")) is None
        )


class _NoForwardAD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z: Tensor) -> Tensor:
        return z.clone()

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:
        return g


class OpaqueCE(PerSampleLoss):
    """CE through an autograd.Function without a forward-mode formula."""

    def _per_sample(self, z: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(_NoForwardAD.apply(z), y, reduction="none")


def test_jvp_falls_back_to_double_backward_with_a_reason():
    meta = make("exact", "jvp", OpaqueCE())
    assert meta.grad == "double_backward"
    assert "OpaqueCE" in meta.grad_fallback_reason
    out = meta.step(*batch(0))
    assert torch.isfinite(out["meta_loss"])


# ----------------------------------------------------------------------------------------------------------
# Weights and the weighted loss


def test_weighted_mean_needs_matching_vectors():
    losses, w = torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([4.0, 0.0, 0.0, 0.0])
    assert weighted_mean(losses, w).item() == pytest.approx(1.0)
    assert (losses.mean() * w.mean()).item() == pytest.approx(2.5)  # the broadcasting bug's value differs
    with pytest.raises(ValueError, match=r"\(B,\)"):
        weighted_mean(losses[:, None], w)
    with pytest.raises(ValueError, match=r"\(B,\)"):
        weighted_mean(losses, w[:, None])


@pytest.mark.parametrize("mode", CLASS_NET_MODES)
def test_class_weights_sum_to_c_and_match_the_net(mode):
    meta = make(mode)
    meta.step(*batch(0))
    w = meta.class_weights()
    d = meta.diffnet(ACC).detach()
    assert w.shape == (C,)
    torch.testing.assert_close(w.sum(), torch.tensor(float(C), dtype=w.dtype))
    torch.testing.assert_close(w, C * d / d.sum())
    torch.testing.assert_close(make(mode, normalize="none").class_weights(), make(mode).diffnet(ACC).detach())


def test_temperature_weights_match_hand_computed_values():
    """w = C·d^(1/T)/Σ d^(1/T): d = (0.2, 0.4, 0.8), T = 0.5 → d² = (0.04, 0.16, 0.64), Σ = 0.84."""

    class Fixed(nn.Module):
        def forward(self, acc: Tensor) -> Tensor:
            return torch.tensor([0.2, 0.4, 0.8], dtype=torch.float64) + 0 * acc

    acc = torch.zeros(3, dtype=torch.float64)
    w, d = class_weights(Fixed(), acc, "sum_to_C", 0.5)
    want = torch.tensor([0.12, 0.48, 1.92], dtype=torch.float64) / 0.84  # 3·d²/0.84
    torch.testing.assert_close(w, want, rtol=1e-14, atol=0)
    torch.testing.assert_close(d, torch.tensor([0.2, 0.4, 0.8], dtype=torch.float64))  # L_dr and E read raw d
    assert float(w.max() / w.min()) == pytest.approx(16.0)  # (d_max/d_min)^(1/T) = 4²
    torch.testing.assert_close(class_weights(Fixed(), acc, "sum_to_C", 1.0)[0],
                               torch.tensor([0.6, 1.2, 2.4], dtype=torch.float64) / 1.4)


@pytest.mark.parametrize("mode", CLASS_NET_MODES)
def test_modes_apply_the_configured_temperature(mode):
    meta = make(mode, temperature=0.25)
    meta.step(*batch(0))
    d = meta.diffnet(ACC).detach()
    torch.testing.assert_close(meta.class_weights(), C * d**4 / (d**4).sum())


def test_step_returns_detached_scalars():
    for mode, grad in MODES:
        out = make(mode, grad).step(*batch(0))
        assert "loss" in out
        logits = out.pop("logits")  # the real forward's, for the step's training counters
        assert logits.shape == (B, C)
        assert not logits.requires_grad
        assert all(v.dim() == 0 and not v.requires_grad for v in out.values())
    keys = set(make("exact").step(*batch(0)))
    assert keys == {"loss", "logits", "meta_loss", "driver_loss", "weight_min", "weight_max", "weight_E"}


def test_driver_loss_formula():
    d = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64)
    acc = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    assert driver_loss(d, acc).item() == pytest.approx(
        ((0.5 - 0.2) ** 2 + (0.7 - 0.5) ** 2 + (0.8 - 0.9) ** 2) / 3
    )
    torch.testing.assert_close(driver_loss(d, torch.zeros(3, dtype=torch.float64)), ((1 - d) ** 2).mean())
    # Σa = 1 above, where both targets coincide. Doubling A leaves the relative target 1 − a/Σa as it was and
    # moves the absolute one, 1 − a, to (0, 0.4, 0.6).
    acc2 = 2 * acc
    assert driver_loss(d, acc2).item() == pytest.approx(driver_loss(d, acc).item())
    assert driver_loss(d, acc2, relative=False).item() == pytest.approx(
        ((0.0 - 0.2) ** 2 + (0.4 - 0.5) ** 2 + (0.6 - 0.9) ** 2) / 3
    )


# ----------------------------------------------------------------------------------------------------------
# Driver, exact and the official (detached) pattern


def test_driver_gradient_is_lambda_grad_l_dr_and_exact_differs():
    driver, exact = make("driver"), make("exact")
    expected = driver_grad(copy.deepcopy(driver.diffnet))
    driver.step(*batch(0))
    exact.step(*batch(0))
    torch.testing.assert_close(flat_grad(driver.diffnet), expected, rtol=1e-10, atol=1e-16)
    assert (flat_grad(exact.diffnet) - expected).norm() > 0.05 * expected.norm()


def _without_meta_term(variant: str):
    """``modes.meta_gradient`` with the meta term removed: scaled by 0, or computed from detached weights (the
    official code's pattern, SPEC §4.2: the meta loss then sends no gradient to θ)."""
    real = modes.meta_gradient

    def patched(inner, losses, weigh, meta_batch, algorithm):
        if variant == "detach_weights":
            return real(inner, losses, lambda ell: weigh(ell).detach(), meta_batch, algorithm)
        mg = real(inner, losses, weigh, meta_batch, algorithm)
        return mg._replace(grad_tensors=[g * 0.0 for g in mg.grad_tensors])

    return patched


@pytest.mark.parametrize("grad", ["jvp", "double_backward"])
@pytest.mark.parametrize("variant", ["meta_scale_0", "detach_weights"])
def test_exact_without_meta_term_equals_driver_step_for_step(grad, variant, monkeypatch):
    monkeypatch.setattr(modes, "meta_gradient", _without_meta_term(variant))
    driver, exact = make("driver"), make("exact", grad)
    for step in range(3):
        out_d, out_e = driver.step(*batch(step)), exact.step(*batch(step))
        torch.testing.assert_close(flat_grad(exact.diffnet), flat_grad(driver.diffnet), rtol=0, atol=0)
        torch.testing.assert_close(out_e["loss"], out_d["loss"], rtol=0, atol=0)
    assert_same_state(driver, exact)


def test_detached_weights_send_no_meta_gradient_to_theta():
    """The official code's pattern (SPEC §4.2): weights detached before the virtual step."""
    meta = make("exact", "double_backward")
    x, y, meta_batch = batch(0)
    inner = meta._inner(x, y)
    theta = list(meta.diffnet.parameters())
    for detach in (True, False):
        w, _ = class_weights(meta.diffnet, meta.acc, "sum_to_C")
        omega = w[y].detach() if detach else w[y]
        l_meta = meta_gradient_double_backward(inner, lambda _, o=omega: o, meta_batch).roots[0]
        grads = torch.autograd.grad(l_meta, theta, allow_unused=True)
        if detach:
            assert all(g is None for g in grads)
        else:
            assert all(g is not None for g in grads)
            assert sum(float(g.norm()) for g in grads) > 1e-6


# ----------------------------------------------------------------------------------------------------------
# The Table 4 ablation modes and the MWN baseline's optimiser


def test_absolute_net_reads_each_class_alone():
    absolute, relative = make("exact_absolute").diffnet, make("exact").diffnet
    with torch.no_grad():
        d = absolute(ACC)  # (C,)
        alone = torch.cat([absolute(ACC[c : c + 1]) for c in range(C)])
        moved = ACC.clone()
        moved[1:] = 0.5  # every other class changes
        torch.testing.assert_close(d, alone, rtol=0, atol=0)
        assert absolute(moved)[0] == d[0]
        assert relative(moved)[0] != relative(ACC)[0]  # the relative net does see the other classes


def test_bias_free_absolute_net_is_a_one_parameter_sigmoid():
    """Why the absolute presets set diffnet.bias = true: without biases D^abs(a) = σ(κ·a) for a ≥ 0."""
    torch.manual_seed(3)
    net = DifficultyNet(1, 8, bias=False).double()
    with torch.no_grad():
        kappa = net.fc3.weight @ torch.relu(net.fc2.weight @ torch.relu(net.fc1.weight))  # (1, 1)
        a = torch.linspace(0, 1, 11, dtype=torch.float64)
        torch.testing.assert_close(net(a), torch.sigmoid(kappa.reshape(()) * a), rtol=1e-12, atol=0)
        biased = DifficultyNet(1, 8, bias=True).double()
        assert not torch.allclose(biased(a), torch.sigmoid(a * torch.logit(biased(a)[-1])), atol=1e-3)


def test_frozen_mode_keeps_the_initial_difficulty_net():
    meta = make("frozen")
    theta0 = [p.detach().clone() for p in meta.diffnet.parameters()]
    assert not meta.needs_meta_batch
    assert set(meta.owned().optimizers) == {"optimizer"}  # nothing to step for θ
    for step in range(3):
        x, y, _ = batch(step)
        out = meta.step(x, y)
        if step == 1:
            meta.set_class_accuracy(ACC.flip(0))
    for p, p0 in zip(meta.diffnet.parameters(), theta0, strict=True):
        assert torch.equal(p, p0)
    with torch.no_grad():
        d = meta.diffnet(ACC.flip(0))
    torch.testing.assert_close(meta.class_weights(), C * d / d.sum(), rtol=1e-14, atol=0)
    assert out["weight_max"] > out["weight_min"]  # an untrained D still weighs the classes unequally


def test_sample_mode_driver_loss_and_weights_by_hand():
    meta = make("exact_sample")
    net0, model0 = copy.deepcopy(meta.sample_net), copy.deepcopy(meta.model)
    x, y, meta_batch = batch(0)
    with torch.no_grad():
        ell = F.cross_entropy(model0(x), y, reduction="none")  # (B,) train-mode forward at φ_t
        d = net0(ell)  # (B,)
        p = torch.exp(-ell)
        expected = ((1.0 - p / p.sum() - d) ** 2).mean()
    out = meta.step(x, y, meta_batch)
    torch.testing.assert_close(out["driver_loss"], expected, rtol=1e-10, atol=0)  # ε = 1e-12 in the target
    with torch.no_grad():
        w, _ = meta.sample_weights(ell)  # (B,) of the updated net
        d1 = meta.sample_net(ell)
    torch.testing.assert_close(w, B * d1 / d1.sum(), rtol=1e-14, atol=0)
    torch.testing.assert_close(w.sum(), torch.tensor(float(B), dtype=w.dtype))
    torch.testing.assert_close(out["weight_min"], w.min())
    assert meta.class_weights() is None
    assert meta.diffnet is None  # no class-level net for the engine's per-class history


def test_sample_mode_rejects_another_batch_size_before_touching_state():
    meta = make("exact_sample")
    x, y, meta_batch = batch(0)
    with pytest.raises(ValueError, match=r"optim\.batch_size = 8"):
        meta.step(torch.cat([x, x]), torch.cat([y, y]), meta_batch)  # 2B would pass the net as two rows
    assert int(meta.model.bn.num_batches_tracked) == 0


def test_mwn_optimiser_is_the_class_imbalance_reference():
    """xjtushujun/Meta-weight-net_class-imbalance: SGD(vnet.params(), 1e-5, momentum=0.9, nesterov=True,
    weight_decay=5e-4)."""
    model = TinyNet()
    cfg, optimizer = TrainConfig(meta=MetaConfig(mode="mwn")), torch.optim.SGD(model.parameters(), lr=0.1)
    meta = build_meta_mode(cfg, model, CrossEntropy(), optimizer, C)
    opt = meta.vnet_optimizer
    assert isinstance(opt, torch.optim.SGD)
    hyper = {k: opt.defaults[k] for k in ("lr", "momentum", "nesterov", "weight_decay", "dampening")}
    assert hyper == {"lr": 1e-5, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4, "dampening": 0}


# ----------------------------------------------------------------------------------------------------------
# BatchNorm semantics and the real step


@pytest.mark.parametrize(("mode", "grad"), MODES)
def test_bn_running_stats_change_as_one_train_forward(mode, grad):
    meta = make(mode, grad)
    ref = copy.deepcopy(meta.model).train()
    x, y, meta_batch = batch(0)
    with torch.no_grad():
        ref(x)
    meta.step(x, y, meta_batch)
    for name, buf in ref.named_buffers():
        torch.testing.assert_close(dict(meta.model.named_buffers())[name], buf, rtol=0, atol=0, msg=name)
    assert int(meta.model.bn.num_batches_tracked) == 1


def _sgd_reference(params: dict[str, Tensor], grads: dict[str, Tensor], bufs: dict[str, Tensor]) -> None:
    """Torch SGD by hand: coupled L2, momentum (no dampening), Nesterov; updates params and bufs in place."""
    for name, p in params.items():
        g = grads[name] + WD * p
        bufs[name] = g.clone() if name not in bufs else MOMENTUM * bufs[name] + g
        p -= (LRS[0] if not name.startswith("fc") else LRS[1]) * (g + MOMENTUM * bufs[name])


@pytest.mark.parametrize(
    ("mode", "grad", "loss"),
    [
        ("off", "jvp", "cb"),
        ("driver", "jvp", "ce"),
        ("driver", "jvp", "cb"),
        ("exact", "jvp", "ce"),
        ("exact", "double_backward", "cb"),
        ("mwn", "jvp", "ce"),
        ("frozen", "jvp", "cb"),
        ("exact_absolute", "jvp", "ce"),
        ("exact_sample", "jvp", "cb"),
        ("exact_sample", "double_backward", "ce"),
    ],
)
def test_real_step_equals_hand_written_sgd(mode, grad, loss):
    criterion = (
        CrossEntropy() if loss == "ce" else ClassBalancedCE(torch.tensor([40.0, 20, 10, 5, 2]), beta=0.99)
    )
    meta = make(mode, grad, criterion)
    ref = copy.deepcopy(meta.model).train()
    params, bufs = {n: p.detach().clone() for n, p in ref.named_parameters()}, {}
    for step in range(2):
        x, y, meta_batch = batch(step)
        out = meta.step(x, y, meta_batch)
        live = {n: p.requires_grad_() for n, p in params.items()}
        ell = torch.func.functional_call(ref, live, (x,))
        ell = criterion(ell, y)  # (B,)
        if mode in ("mwn", "exact_sample"):
            net = meta.vnet if mode == "mwn" else meta.sample_net
            v = net(ell.detach())  # V or D^sample after its update
            loss_ref = weighted_mean(ell * (B * v / v.sum()), torch.ones_like(ell), criterion.denominator(y))
        else:
            w = torch.ones(C, dtype=ell.dtype) if mode == "off" else meta.class_weights()
            loss_ref = weighted_mean(ell, w[y], criterion.denominator(y))
        grads = dict(zip(live, torch.autograd.grad(loss_ref, list(live.values())), strict=True))
        params = {n: p.detach() for n, p in live.items()}
        _sgd_reference(params, grads, bufs)
        torch.testing.assert_close(out["loss"], loss_ref.detach(), rtol=1e-13, atol=0)
    for name, p in meta.model.named_parameters():
        torch.testing.assert_close(p.detach(), params[name], rtol=1e-12, atol=1e-15, msg=name)


# ----------------------------------------------------------------------------------------------------------
# State


@pytest.mark.parametrize(
    ("mode", "grad"),
    [("driver", "jvp"), ("exact", "jvp"), ("mwn", "jvp"), ("frozen", "jvp"), ("exact_absolute", "jvp"),
     ("exact_sample", "jvp")],
)
def test_state_dict_round_trip_continues_identically(mode, grad):
    a = make(mode, grad)
    a.step(*batch(0))
    b = make(mode, grad)
    b.model.load_state_dict(a.model.state_dict())
    b.optimizer.load_state_dict(copy.deepcopy(a.optimizer.state_dict()))  # SGD keeps the tensors it is given
    b.set_class_accuracy(torch.zeros(C))
    b.load_state_dict(
        copy.deepcopy(a.state_dict())
    )  # restores A too; optimisers keep the tensors they are given
    torch.testing.assert_close(b.acc, a.acc)
    out_a, out_b = a.step(*batch(1)), b.step(*batch(1))
    for key, value in out_a.items():
        torch.testing.assert_close(out_b[key], value, rtol=0, atol=0)
    assert_same_state(a, b)


BASE_KEYS = {"model", "criterion", "optimizer", "acc"}


@pytest.mark.parametrize(
    ("mode", "keys"),
    [
        ("off", BASE_KEYS),
        ("driver", BASE_KEYS | {"diffnet", "diffnet_optimizer"}),
        ("exact", BASE_KEYS | {"diffnet", "diffnet_optimizer"}),
        ("mwn", BASE_KEYS | {"mwn", "mwn_optimizer"}),
        ("frozen", BASE_KEYS | {"diffnet"}),
        ("exact_absolute", BASE_KEYS | {"diffnet", "diffnet_optimizer"}),
        ("exact_sample", BASE_KEYS | {"sample_diffnet", "sample_diffnet_optimizer"}),
    ],
)
def test_state_dict_keys_are_the_checkpoint_layout(mode, keys):
    """The checkpoint holds exactly what the mode declares it owns, each under its declared name."""
    meta = make(mode)
    state = meta.state_dict()
    assert set(state) == keys
    owned = meta.owned()
    assert set(owned.modules) | set(owned.optimizers) | set(owned.tensors) == keys
    for key, obj in {**owned.modules, **owned.optimizers}.items():
        assert state[key].keys() == obj.state_dict().keys()
    assert list(owned.optimizers.values())[0] is meta.optimizer  # the main optimiser first


def test_off_mode_ignores_class_accuracy_and_has_unit_weights():
    meta = make("off")
    assert not meta.needs_meta_batch
    torch.testing.assert_close(meta.class_weights(), torch.ones(C, dtype=torch.float64))
    assert make("mwn").class_weights() is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(("mode", "grad"), MODES)
def test_step_has_no_host_sync_on_cuda(mode, grad):
    meta = make(mode, grad, device="cuda")
    x, y, (xm, ym) = batch(0)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            meta.step(x.cuda(), y.cuda(), (xm.cuda(), ym.cuda()))
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_inner_reads_group_lr_each_step():
    meta = make("exact")
    meta.optimizer.param_groups[1]["lr"] = 0.01
    inner = meta._inner(*batch(0)[:2])
    assert isinstance(inner, Inner)
    assert inner.lrs["fc.weight"] == 0.01
    assert inner.lrs["conv.weight"] == LRS[0]
    assert isinstance(meta, ExactMode)
