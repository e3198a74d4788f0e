"""Meta-gradient checks in float64: exact, exact_absolute and exact_sample against finite differences, jvp
against the double backward."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from dnet_fast.losses import ClassBalancedCE, CrossEntropy
from dnet_fast.meta import (
    META_MODES,
    BatchNormTrain,
    ClosedFormBatchNorm,
    MetaMode,
    batch_norm_train,
    batch_norm_train_jvp,
    functional_layout,
    loss_jvp,
    scratch_losses,
)
from tests.helpers import ACC, LAMBDA, B, C, TinyNet, batch, flat_grad, meta_config, tiny_param_groups

Params = dict[str, Tensor]
LRS = {"conv": 0.5, "bn": 0.5, "fc": 0.3}  # α per param group (backbone, head): two groups on purpose


def tiny_forward(params: dict[str, Tensor], x: Tensor) -> Tensor:
    """TinyNet in plain functional ops, train-mode BN (batch statistics, no running statistics)."""
    h = F.conv2d(x, params["conv.weight"], padding=1)  # (B, 4, H, W)
    h = F.batch_norm(h, None, None, params["bn.weight"], params["bn.bias"], training=True)
    return F.linear(torch.relu(h).mean((2, 3)), params["fc.weight"], params["fc.bias"])  # (B, C)


def make(mode: str, grad: str = "jvp", criterion: nn.Module | None = None, temperature: float = 1.0,
         **kwargs) -> MetaMode:
    """A float64 meta mode on TinyNet; the same arguments give bit-identical initial states."""
    cfg = meta_config(mode, grad, temperature=temperature)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = TinyNet().double().train()
        groups = tiny_param_groups(model, LRS["conv"], LRS["fc"])
        optimizer = torch.optim.SGD(groups, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
        meta = META_MODES.get(mode)(cfg, model, criterion or CrossEntropy(), optimizer, C, **kwargs)
    meta.set_class_accuracy(ACC)
    return meta


def aux_net(meta: MetaMode) -> nn.Module:
    """The auxiliary net the meta step trains: the one module the mode owns besides model and criterion."""
    (net,) = [m for name, m in meta.owned().modules.items() if name not in ("model", "criterion")]
    return net


# ----------------------------------------------------------------------------------------------------------
# ω(θ) and L_dr(θ) of each mode at the batch losses ℓ(φ_t), written independently of dnet_fast.meta


def _spread(d: Tensor, temperature: float) -> Tensor:
    """n·d^(1/T)/Σ d^(1/T) over the n entries of d (T = 1: the paper's n·d/Σd)."""
    p = d ** (1.0 / temperature)
    return d.numel() * p / p.sum()


def relative_weights(
    net: nn.Module, theta: Params, ell: Tensor, y: Tensor, temperature: float
) -> tuple[Tensor, Tensor]:
    """exact (Eqs. 4, 7): d = D(A), ω_i = (C·d/Σd)_{y_i} (d^(1/T) under a temperature), L_dr = mean (1 − â − d)²."""
    d = functional_call(net, theta, (ACC,))  # (C,)
    return _spread(d, temperature)[y], ((1.0 - ACC / (ACC.sum() + 1e-12) - d) ** 2).mean()


def absolute_weights(
    net: nn.Module, theta: Params, ell: Tensor, y: Tensor, temperature: float
) -> tuple[Tensor, Tensor]:
    """exact_absolute: d_c = D^abs(a_c) — each class through the net on its own —, target 1 − a."""
    d = torch.cat([functional_call(net, theta, (ACC[c : c + 1],)) for c in range(C)])  # (C,)
    return _spread(d, temperature)[y], ((1.0 - ACC - d) ** 2).mean()


def sample_weights(
    net: nn.Module, theta: Params, ell: Tensor, y: Tensor, temperature: float
) -> tuple[Tensor, Tensor]:
    """exact_sample: d = D^sample(ℓ) on the detached losses, ω = B·d/Σd, target 1 − p/Σp with p = exp(−ℓ)."""
    ell = ell.detach()
    d = functional_call(net, theta, (ell,))  # (B,)
    p = torch.exp(-ell)
    return _spread(d, temperature), ((1.0 - p / p.sum() - d) ** 2).mean()


#: mode -> its ω(θ), L_dr(θ) (the FD oracle covers every mode whose θ receives the meta gradient and L_dr).
WEIGHTS = {"exact": relative_weights, "exact_absolute": absolute_weights, "exact_sample": sample_weights}


def bilevel_objective(weigh, net: nn.Module, theta: Params, phi: Params, alpha, data) -> Tensor:
    """J(θ) = L_meta(φ − α ∇_φ (1/b) Σ ω_i(θ) ℓ_i(φ)) + λ L_dr(θ)."""
    x, y, (xm, ym) = data
    p = {n: v.clone().requires_grad_() for n, v in phi.items()}
    ell = F.cross_entropy(tiny_forward(p, x), y, reduction="none")  # (B,)
    omega, l_dr = weigh(net, theta, ell, y)
    g = torch.autograd.grad((omega * ell).mean(), list(p.values()))
    p_hat = {n: phi[n] - alpha[n] * gn for n, gn in zip(p, g, strict=True)}
    return F.cross_entropy(tiny_forward(p_hat, xm), ym) + LAMBDA * l_dr


def central_differences(fn, theta: dict[str, Tensor], h: float = 1e-5) -> Tensor:
    out = []
    for name, value in theta.items():
        for i in range(value.numel()):
            plus, minus = dict(theta), dict(theta)
            plus[name] = value.flatten().index_add(0, torch.tensor([i]), torch.tensor([h], dtype=value.dtype))
            minus[name] = value.flatten().index_add(
                0, torch.tensor([i]), torch.tensor([-h], dtype=value.dtype)
            )
            plus[name], minus[name] = plus[name].view_as(value), minus[name].view_as(value)
            out.append((fn(plus) - fn(minus)) / (2 * h))
    return torch.stack(out)


def rel_err(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("temperature", [1.0, 0.25])  # 0.25: the opt-in diffnet.temperature variant
@pytest.mark.parametrize("grad", ["jvp", "double_backward"])
@pytest.mark.parametrize("mode", sorted(WEIGHTS))
def test_exact_theta_gradient_matches_finite_differences(mode, grad, temperature):
    meta = make(mode, grad, temperature=temperature)
    net = aux_net(meta)
    x, y, _ = data = batch(0)
    phi = {n: p.detach().clone() for n, p in meta.model.named_parameters()}
    theta = {n: p.detach().clone() for n, p in net.named_parameters()}
    alpha = {n: LRS[n.split(".")[0]] for n in phi}
    meta.step(*data)
    got = flat_grad(net)  # ∂J/∂θ at θ_t (Adam leaves .grad alone)

    weigh = functools.partial(WEIGHTS[mode], temperature=temperature)
    fd = central_differences(lambda th: bilevel_objective(weigh, net, th, phi, alpha, data), theta)
    th = {n: v.clone().requires_grad_() for n, v in theta.items()}
    ell = F.cross_entropy(tiny_forward(phi, x), y, reduction="none")
    dr = torch.autograd.grad(LAMBDA * weigh(net, th, ell, y)[1], list(th.values()))
    dr = torch.cat([g.flatten() for g in dr])  # the driver part λ ∇L_dr
    assert rel_err(got, fd) < 1e-4
    assert rel_err(got - dr, fd - dr) < 1e-4  # the meta term alone, not just the (larger) driver term
    assert (fd - dr).norm() > 1e-3 * fd.norm()  # and that term is not negligible
    assert dr.norm() > 1e-3 * fd.norm()  # nor is the driver term: the oracle checks both


@pytest.mark.parametrize(
    ("mode", "loss"),
    [
        ("exact", "ce"),
        ("exact", "cb"),
        ("mwn", "ce"),
        ("exact_absolute", "ce"),
        ("exact_sample", "ce"),
        ("exact_sample", "cb"),
    ],
)
def test_jvp_equals_double_backward_step_for_step(mode, loss):
    def criterion() -> nn.Module:
        return (
            CrossEntropy() if loss == "ce" else ClassBalancedCE(torch.tensor([40.0, 20, 10, 5, 2]), beta=0.99)
        )

    fast, ref = make(mode, "jvp", criterion()), make(mode, "double_backward", criterion())
    assert (fast.grad, ref.grad) == ("jvp", "double_backward")
    for step in range(3):
        data = batch(step)
        out_fast, out_ref = fast.step(*data), ref.step(*data)
        if step == 0:
            torch.testing.assert_close(
                flat_grad(aux_net(fast)), flat_grad(aux_net(ref)), rtol=1e-10, atol=1e-13
            )
        for key in out_ref:
            torch.testing.assert_close(out_fast[key], out_ref[key], rtol=1e-10, atol=1e-13)
    for a, b in ((fast.model, ref.model), (aux_net(fast), aux_net(ref))):
        for (name, ta), tb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
            torch.testing.assert_close(ta, tb, rtol=1e-10, atol=1e-13, msg=name)
    for pa, pb in zip(fast.model.parameters(), ref.model.parameters(), strict=True):
        buf_a, buf_b = fast.optimizer.state[pa]["momentum_buffer"], ref.optimizer.state[pb]["momentum_buffer"]
        torch.testing.assert_close(buf_a, buf_b, rtol=1e-10, atol=1e-13)


def test_mwn_gradient_matches_hand_written_double_backward():
    meta = make("mwn", "jvp")
    x, y, (xm, ym) = data = batch(0)
    phi = {n: p.detach().clone().requires_grad_() for n, p in meta.model.named_parameters()}
    vnet_params = dict(meta.vnet.named_parameters())
    alpha = {n: LRS[n.split(".")[0]] for n in phi}
    ell = F.cross_entropy(tiny_forward(phi, x), y, reduction="none")  # (B,)
    v = meta.vnet(ell.detach())  # (B,)
    g = torch.autograd.grad((B * v / v.sum() * ell).mean(), list(phi.values()), create_graph=True)
    p_hat = {n: phi[n] - alpha[n] * gn for n, gn in zip(phi, g, strict=True)}
    expected = torch.autograd.grad(F.cross_entropy(tiny_forward(p_hat, xm), ym), list(vnet_params.values()))
    before = [p.detach().clone() for p in vnet_params.values()]
    meta.step(*data)
    torch.testing.assert_close(
        flat_grad(meta.vnet), torch.cat([e.flatten() for e in expected]), rtol=1e-10, atol=1e-14
    )
    # The reference's first SGD step on V: g' = g + wd·Θ, buffer = g', Nesterov Θ ← Θ − lr·(g' + μ·buffer).
    m = meta.cfg.meta
    assert (m.mwn_momentum, m.mwn_nesterov, m.mwn_weight_decay) == (0.9, True, 5e-4)
    for p, p0, g in zip(meta.vnet.parameters(), before, expected, strict=True):
        g = g + m.mwn_weight_decay * p0
        expected_p = p0 - m.mwn_lr * (1 + m.mwn_momentum) * g
        torch.testing.assert_close(p.detach(), expected_p, rtol=1e-10, atol=1e-14)


# ----------------------------------------------------------------------------------------------------------
# The closed-form BatchNorm tangent of the jvp pass


def _bn_case(shape: tuple[int, ...], affine: bool, channels_last: bool, tangents: str):
    """Primals (x, γ, β) and tangents (None where absent) of a float64 train-mode BatchNorm."""
    g = torch.Generator().manual_seed(len(shape) + 10 * affine + 100 * channels_last)
    c = shape[1]
    x = (
        3.0 * torch.randn(shape, generator=g, dtype=torch.float64) + 2.0
    )  # mean far from 0: tests cancellation
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(c, generator=g, dtype=torch.float64) if affine else None
    b = torch.randn(c, generator=g, dtype=torch.float64) if affine else None
    xt = torch.randn(shape, generator=g, dtype=torch.float64) if "x" in tangents else None
    wt = torch.randn(c, generator=g, dtype=torch.float64) if affine and "w" in tangents else None
    bt = torch.randn(c, generator=g, dtype=torch.float64) if affine and "b" in tangents else None
    return (x, w, b), (xt, wt, bt)


#: (input shape, affine, channels_last) of the BN cases: 4-D NCHW and NHWC, no γ/β, BatchNorm1d (2-D and 3-D).
_BN_LAYOUTS = [
    ((6, 4, 5, 5), True, False),
    ((6, 4, 5, 5), True, True),
    ((6, 4, 5, 5), False, False),
    ((7, 3), True, False),
    ((5, 3, 4), True, False),
]
#: Which inputs carry a tangent: all, x only (γ, β fixed), γ and β only (x fixed, the first layer), γ only.
_BN_CASES = [(*lay, t) for lay in _BN_LAYOUTS for t in ("xwb", "x", "wb", "w") if lay[1] or t == "x"]


@pytest.mark.parametrize(("shape", "affine", "channels_last", "tangents"), _BN_CASES)
def test_batch_norm_jvp_equals_torch_forward_ad(shape, affine, channels_last, tangents):
    """y_t of `BatchNormTrain` under torch.func.jvp = torch's own forward-mode BN, to 1e-12 in float64."""
    (x, w, b), (xt, wt, bt) = _bn_case(shape, affine, channels_last, tangents)
    names = [n for n, t in zip("xwb", (xt, wt, bt), strict=True) if t is not None]
    prim = dict(zip("xwb", (x, w, b), strict=True))
    tang = dict(zip("xwb", (xt, wt, bt), strict=True))

    def run(bn):
        def fn(*vals):
            full = {**prim, **dict(zip(names, vals, strict=True))}
            return bn(full["x"], full["w"], full["b"])

        return torch.func.jvp(fn, tuple(prim[n] for n in names), tuple(tang[n] for n in names))

    ref_y, ref_t = run(lambda x, w, b: F.batch_norm(x, None, None, w, b, training=True, eps=1e-5))
    got_y, got_t = run(lambda x, w, b: batch_norm_train(x, w, b, 1e-5))
    torch.testing.assert_close(got_y, ref_y, rtol=0, atol=1e-12)
    torch.testing.assert_close(got_t, ref_t, rtol=0, atol=1e-12)
    _, mean, invstd = torch.native_batch_norm(x, w, b, None, None, True, 0.0, 1e-5)
    direct = batch_norm_train_jvp(x, mean, invstd, w, xt, wt, bt)  # the formula alone
    torch.testing.assert_close(direct, ref_t, rtol=0, atol=1e-12)


def test_batch_norm_train_backward_equals_torch():
    (x, w, b), _ = _bn_case((6, 4, 5, 5), True, False, "")
    gy = torch.randn(x.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    ref = torch.autograd.grad(F.batch_norm(leaves[0], None, None, *leaves[1:], training=True), leaves, gy)
    got = torch.autograd.grad(batch_norm_train(*leaves), leaves, gy)
    for a, e in zip(got, ref, strict=True):
        torch.testing.assert_close(a, e, rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(lambda *t: BatchNormTrain.apply(*t, 1e-5)[0], leaves)


def test_closed_form_mode_routes_train_bn_and_passes_eval_bn_through():
    bn = nn.BatchNorm2d(4).double()
    (x, _, _), _ = _bn_case((6, 4, 5, 5), True, False, "")
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.running_var.fill_(2.0)
    expected = F.batch_norm(x, None, None, bn.weight, bn.bias, training=True)
    with ClosedFormBatchNorm():
        got = bn(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    assert torch.equal(bn.running_mean, torch.zeros(4, dtype=torch.float64))  # routed: no running update
    bn.eval()
    with ClosedFormBatchNorm():
        torch.testing.assert_close(
            bn(x), F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias)
        )


def test_functional_layout_is_channels_last_for_cpu_images_only():
    x = torch.randn(2, 3, 4, 4)
    y = functional_layout(x)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(y, x)
    z = torch.randn(2, 3)
    assert functional_layout(z) is z


def test_loss_jvp_equals_plain_forward_ad_per_sample():
    """The closed-form BN and the channels_last pass change the speed of s = J u, not its value."""
    meta = make("exact")
    x, y, _ = batch(0)
    inner = meta._inner(x, y)
    g = torch.Generator().manual_seed(7)
    u = {n: torch.randn(p.shape, generator=g, dtype=p.dtype) for n, p in inner.params.items()}
    primals = {n: p.detach() for n, p in inner.params.items()}
    _, expected = torch.func.jvp(lambda p: scratch_losses(inner, p), (primals,), (u,))
    torch.testing.assert_close(loss_jvp(inner, u), expected, rtol=1e-12, atol=1e-13)
    assert torch.equal(meta.model.bn.running_mean, torch.zeros(4, dtype=torch.float64))  # buffers untouched
