"""Tests for dnet_fast.losses: every loss against hand-written NumPy formulas, contracts, DRW, CDB-CE, EQL."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dnet_fast.config import LossConfig
from dnet_fast.losses import LOSSES, PerSampleLoss, build_loss
from dnet_fast.meta import weighted_mean
from dnet_fast.registry import UnknownNameError

EXPECTED_NAMES = ["balanced_softmax", "cb", "cdb_ce", "ce", "eql", "focal", "ldam", "logit_adjust"]

# The hand-made example: 3 samples x 3 classes, one sample per class, counts with a rare class 2.
Z = np.array([[2.0, 0.5, -1.0], [0.1, 0.2, 3.0], [-0.5, 1.5, 0.3]])
Y = np.array([0, 1, 2])
COUNTS = np.array([100, 10, 1])
PRIOR = COUNTS / COUNTS.sum()

# Contract-test data: 4 classes, the last one rare enough (π < 0.005) to be an EQL tail class.
CONTRACT_COUNTS = np.array([500, 100, 20, 2])
CONTRACT_ACC = torch.tensor([0.9, 0.6, 0.3, 0.05])


def np_log_softmax(z: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax with max subtraction, written independently of torch."""
    m = z.max(axis=1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(axis=1, keepdims=True))


def np_ce(z: np.ndarray, y: np.ndarray) -> np.ndarray:
    return -np_log_softmax(z)[np.arange(len(y)), y]


def run(name: str, z: np.ndarray = Z, y: np.ndarray = Y, counts: np.ndarray = COUNTS, **cfg) -> np.ndarray:
    """Builds ``name`` with config overrides and evaluates it on float64 logits."""
    loss = build_loss(LossConfig(name=name, **cfg), counts, num_epochs=10)
    return loss(torch.tensor(z, dtype=torch.float64), torch.tensor(y)).numpy()


def contract_loss(name: str) -> PerSampleLoss:
    """A loss with every optional mechanism switched on (DRW for LDAM) after one start_epoch."""
    cfg = LossConfig(name=name, drw_epoch=1 if name == "ldam" else -1)
    loss = build_loss(cfg, CONTRACT_COUNTS, num_epochs=4)
    loss.start_epoch(1, CONTRACT_ACC)
    return loss


# ---------------------------------------------------------------------------------------------------------------
# Registry and contracts
# ---------------------------------------------------------------------------------------------------------------


def test_registered_names() -> None:
    assert LOSSES.names() == EXPECTED_NAMES


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(UnknownNameError, match="unknown loss 'nope'") as info:
        build_loss(LossConfig(name="nope"), COUNTS, num_epochs=1)
    assert isinstance(info.value, ValueError)
    for name in EXPECTED_NAMES:
        assert name in str(info.value)


@pytest.mark.parametrize("name", LOSSES.names())
def test_contract_shape_finite_gradient(name: str) -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 4, generator=gen, requires_grad=True)
    target = torch.tensor([0, 1, 2, 3, 3, 0])
    out = contract_loss(name)(logits, target)
    assert out.shape == (6,)
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert logits.grad is not None
    assert torch.isfinite(logits.grad).all()
    assert logits.grad.abs().sum() > 0


@pytest.mark.parametrize("name", LOSSES.names())
def test_stable_at_extreme_logits(name: str) -> None:
    logits = torch.tensor([[1e4, -1e4, 0.0, 5.0], [-1e4, 1e4, 3.0, -2.0]], requires_grad=True)
    target = torch.tensor([0, 3])  # p_y = 1 exactly, p_y ≈ 0
    out = contract_loss(name)(logits, target)
    out.sum().backward()
    assert torch.isfinite(out).all()
    assert torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("name", LOSSES.names())
@pytest.mark.parametrize(
    ("logit_shape", "target", "match"),
    [
        ((6, 4), torch.zeros(5, dtype=torch.int64), "target must be"),
        ((6, 4), torch.zeros(6, 1, dtype=torch.int64), "target must be"),
        ((4,), torch.zeros(4, dtype=torch.int64), "logits must be"),
        ((6, 4, 1), torch.zeros(6, dtype=torch.int64), "logits must be"),
        ((6, 4), torch.zeros(6, dtype=torch.int32), "int64"),
    ],
)
def test_shape_errors(name: str, logit_shape: tuple[int, ...], target: torch.Tensor, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        contract_loss(name)(torch.zeros(logit_shape), target)


@pytest.mark.parametrize("name", ["balanced_softmax", "cb", "cdb_ce", "eql", "ldam", "logit_adjust"])
def test_class_count_mismatch_raises(name: str) -> None:
    with pytest.raises(ValueError, match="built for 4"):
        contract_loss(name)(torch.zeros(2, 5), torch.zeros(2, dtype=torch.int64))


@pytest.mark.parametrize("name", LOSSES.names())
def test_start_epoch_keeps_buffer_identity(name: str) -> None:
    loss = build_loss(LossConfig(name=name, drw_epoch=2 if name == "ldam" else -1), CONTRACT_COUNTS, 4)
    before = {key: (buf, buf.data_ptr()) for key, buf in loss.named_buffers()}
    for epoch in range(4):
        loss.start_epoch(epoch, CONTRACT_ACC.roll(epoch))
    after = dict(loss.named_buffers())
    assert after.keys() == before.keys()
    for key, (buf, ptr) in before.items():
        assert after[key] is buf
        assert after[key].data_ptr() == ptr


@pytest.mark.parametrize("counts", [np.array([3, 0, 2]), np.array([[3, 2]]), np.array([], dtype=np.int64)])
def test_bad_counts_raise(counts: np.ndarray) -> None:
    with pytest.raises(ValueError, match="class_counts"):
        build_loss(LossConfig(name="balanced_softmax"), counts, num_epochs=1)


# ---------------------------------------------------------------------------------------------------------------
# Every loss against its formula on the hand-made example
# ---------------------------------------------------------------------------------------------------------------


def test_ce_by_hand() -> None:
    # sample 0: -log(e^2 / (e^2 + e^0.5 + e^-1)), written out for one row
    row0 = -math.log(math.exp(2.0) / (math.exp(2.0) + math.exp(0.5) + math.exp(-1.0)))
    np.testing.assert_allclose(run("ce"), np_ce(Z, Y), rtol=1e-12)
    assert run("ce")[0] == pytest.approx(row0, rel=1e-12)


def test_focal_by_hand() -> None:
    p = np.exp(np_log_softmax(Z))[np.arange(3), Y]
    expected = -((1 - p) ** 2) * np.log(p)
    np.testing.assert_allclose(run("focal", focal_gamma=2.0), expected, rtol=1e-10)
    np.testing.assert_allclose(run("focal", focal_gamma=0.0), np_ce(Z, Y), rtol=1e-10)


@pytest.mark.parametrize("gamma", [0.5, 1.0, 2.0])
def test_focal_gradient_finite_when_certain(gamma: float) -> None:
    logits = torch.tensor([[1e4, 0.0, 0.0], [0.0, 30.0, 0.0]], requires_grad=True)
    out = build_loss(LossConfig(name="focal", focal_gamma=gamma), COUNTS, 1)(logits, torch.tensor([0, 1]))
    out.sum().backward()
    assert out[0].item() == 0.0
    assert torch.isfinite(logits.grad).all()


def test_cb_by_hand() -> None:
    beta = 0.9
    w = (1 - beta) / (1 - beta**COUNTS)
    w = w / w.sum() * 3
    np.testing.assert_allclose(run("cb", cb_beta=beta), w[Y] * np_ce(Z, Y), rtol=1e-6)


def test_ldam_by_hand() -> None:
    margins = 0.5 * COUNTS**-0.25 / (COUNTS**-0.25).max()
    z = Z.copy()
    z[np.arange(3), Y] -= margins[Y]
    expected = np_ce(30.0 * z, Y)
    np.testing.assert_allclose(run("ldam"), expected, rtol=1e-6)
    # other hyper-parameters: margins scale linearly with the max margin
    z_small = Z.copy()
    z_small[np.arange(3), Y] -= 0.2 / 0.5 * margins[Y]
    np.testing.assert_allclose(
        run("ldam", ldam_scale=2.0, ldam_max_margin=0.2), np_ce(2.0 * z_small, Y), rtol=1e-6
    )


def test_eql_by_hand() -> None:
    # λ = 0.05: only class 2 (π = 1/111) is a tail class. γ = 1 always suppresses, γ = 0 never does.
    suppressed = np.array([np_ce(Z[:1, :2], Y[:1])[0], np_ce(Z[1:2, :2], Y[1:2])[0], np_ce(Z[2:], Y[2:])[0]])
    np.testing.assert_allclose(run("eql", eql_lambda=0.05, eql_gamma=1.0), suppressed, rtol=1e-10)
    np.testing.assert_allclose(run("eql", eql_lambda=0.05, eql_gamma=0.0), np_ce(Z, Y), rtol=1e-10)
    # λ below every frequency: nothing is a tail class
    np.testing.assert_allclose(run("eql", eql_lambda=0.001, eql_gamma=1.0), np_ce(Z, Y), rtol=1e-10)


def test_cdb_ce_by_hand() -> None:
    acc = np.array([0.9, 0.5, 0.1])
    loss = build_loss(LossConfig(name="cdb_ce", cdb_tau=1.0), COUNTS, num_epochs=10)
    loss.start_epoch(1, torch.tensor(acc))
    w = np.array([0.2, 1.0, 1.8])  # (1 - a) = [0.1, 0.5, 0.9], sum 1.5, times 3 / 1.5
    out = loss(torch.tensor(Z), torch.tensor(Y)).numpy()
    np.testing.assert_allclose(out, w[Y] * np_ce(Z, Y), rtol=1e-6)


def test_cdb_ce_dynamic_tau_by_hand() -> None:
    acc = np.array([0.9, 0.5, 0.1])
    tau = 2.0 / (1.0 + math.exp(-(0.9 / (0.1 + 0.01) - 1.0)))
    w = (1 - acc) ** tau
    w = w / w.sum() * 3
    loss = build_loss(LossConfig(name="cdb_ce", cdb_tau=-1.0), COUNTS, num_epochs=10)
    loss.start_epoch(1, torch.tensor(acc))
    np.testing.assert_allclose(loss.class_weight.numpy(), w, rtol=1e-6)
    # τ ≈ 2 here, clearly not the fixed τ = 1 weights
    assert not np.allclose(w, [0.2, 1.0, 1.8], rtol=1e-2)


def test_balanced_softmax_by_hand() -> None:
    np.testing.assert_allclose(run("balanced_softmax"), np_ce(Z + np.log(PRIOR), Y), rtol=1e-6)


def test_logit_adjust_by_hand() -> None:
    np.testing.assert_allclose(run("logit_adjust", la_tau=0.5), np_ce(Z + 0.5 * np.log(PRIOR), Y), rtol=1e-6)
    np.testing.assert_allclose(run("logit_adjust", la_tau=1.0), run("balanced_softmax"), rtol=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# Balanced Softmax stability (SPEC §13 #2, #3)
# ---------------------------------------------------------------------------------------------------------------


def test_balanced_softmax_is_ce_on_shifted_logits_at_extremes() -> None:
    logits = torch.tensor([[1e4, -1e4, 0.0], [-1e4, 1e4, 5.0], [3.0, 1.0, -2.0]], requires_grad=True)
    target = torch.tensor([1, 0, 2])
    loss = build_loss(LossConfig(name="balanced_softmax"), COUNTS, num_epochs=1)
    out = loss(logits, target)
    log_prior = torch.log(torch.tensor(PRIOR, dtype=torch.float32))
    reference = F.cross_entropy(logits + log_prior, target, reduction="none")
    assert out.shape == (3,)
    torch.testing.assert_close(out, reference)
    np.testing.assert_allclose(
        out.detach().numpy(),
        np_ce(logits.detach().double().numpy() + np.log(PRIOR), target.numpy()),
        rtol=1e-6,
    )
    out.sum().backward()
    assert torch.isfinite(logits.grad).all()


# ---------------------------------------------------------------------------------------------------------------
# Reduction (SPEC §12, §14)
# ---------------------------------------------------------------------------------------------------------------


def test_weighted_reduction_is_per_sample() -> None:
    per_sample = torch.tensor([1.0, 2.0, 3.0, 4.0])
    target = torch.tensor([0, 0, 1, 2])
    w = torch.tensor([0.5, 1.0, 1.5])
    ce = build_loss(LossConfig(name="ce"), COUNTS, num_epochs=1)
    reduced = weighted_mean(per_sample, w[target], ce.denominator(target))
    assert reduced.item() == pytest.approx((0.5 * 1 + 0.5 * 2 + 1.0 * 3 + 1.5 * 4) / 4)  # 2.625
    assert reduced.item() != pytest.approx(per_sample.mean().item() * w[target].mean().item())  # 2.1875
    assert reduced.item() != pytest.approx(per_sample.mean().item() * w.mean().item())  # 2.5
    assert weighted_mean(per_sample, torch.ones(4), ce.denominator(target)).item() == pytest.approx(2.5)


def test_reduction_rejects_broadcasting_shapes() -> None:
    ce = build_loss(LossConfig(name="ce"), COUNTS, num_epochs=1)
    # the official Balanced Softmax returned (B, 1, 1), which broadcast the weights away (SPEC §13 #2)
    with pytest.raises(ValueError, match=r"\(B,\)"):
        weighted_mean(torch.ones(4, 1, 1), torch.ones(4), ce.denominator(torch.zeros(4, dtype=torch.int64)))


def test_weighted_losses_reduce_like_torch_weighted_mean() -> None:
    logits, target = torch.tensor(Z), torch.tensor(Y)
    cb = build_loss(LossConfig(name="cb", cb_beta=0.9), COUNTS, num_epochs=1)
    assert cb.divides_by_weight_sum
    reference = F.cross_entropy(logits, target, weight=cb.class_weight.double())  # mean = Σ v_y ℓ / Σ v_y
    torch.testing.assert_close(weighted_mean(cb(logits, target), torch.ones(3), cb.denominator(target)), reference)


@pytest.mark.parametrize("name", ["balanced_softmax", "ce", "eql", "focal", "logit_adjust"])
def test_unweighted_losses_divide_by_batch(name: str) -> None:
    loss = build_loss(LossConfig(name=name), COUNTS, num_epochs=1)
    assert not loss.divides_by_weight_sum
    assert torch.equal(loss.sample_weight(torch.tensor(Y)), torch.ones(3))


# ---------------------------------------------------------------------------------------------------------------
# CB, LDAM-DRW, CDB-CE, EQL specifics
# ---------------------------------------------------------------------------------------------------------------


def test_cb_weights_from_counts_not_ratios() -> None:
    counts = np.array([5000, 500, 50])
    beta = 0.9999
    from_counts = (1 - beta) / (1 - beta**counts)
    from_counts = from_counts / from_counts.sum() * 3
    ratios = counts / counts.sum()
    from_ratios = (1 - beta) / (1 - beta**ratios)  # the official code's bug: ≈ 1/π
    from_ratios = from_ratios / from_ratios.sum() * 3
    for given in (counts, torch.tensor(counts)):
        weights = build_loss(LossConfig(name="cb", cb_beta=beta), given, num_epochs=1).class_weight.numpy()
        np.testing.assert_allclose(weights, from_counts, rtol=1e-6)
        assert not np.allclose(weights, from_ratios, rtol=1e-2)
    assert weights.sum() == pytest.approx(3.0)


def test_ldam_margins() -> None:
    counts = np.array([5000, 1000, 50, 5])
    loss = build_loss(LossConfig(name="ldam"), counts, num_epochs=1)
    margins = loss.margins.numpy()
    assert margins.max() == pytest.approx(0.5)
    assert margins.argmax() == 3
    np.testing.assert_allclose(margins, 0.5 * (counts / 5.0) ** -0.25, rtol=1e-6)


def test_ldam_drw_switches_at_drw_epoch() -> None:
    beta = 0.999
    cb = (1 - beta) / (1 - beta**COUNTS)
    cb = cb / cb.sum() * 3
    loss = build_loss(LossConfig(name="ldam", drw_epoch=3, cb_beta=beta), COUNTS, num_epochs=5)
    logits, target = torch.tensor(Z), torch.tensor(Y)
    plain = loss(logits, target)
    for epoch in range(5):
        loss.start_epoch(epoch, None)
        expected = cb if epoch >= 3 else np.ones(3)
        np.testing.assert_allclose(loss.class_weight.numpy(), expected, rtol=1e-6)
        np.testing.assert_allclose(loss(logits, target).numpy(), expected[Y] * plain.numpy(), rtol=1e-6)
    loss.start_epoch(1, None)  # resuming before the DRW epoch switches it off again
    assert torch.equal(loss.class_weight, torch.ones(3))


def test_ldam_without_drw_stays_unweighted() -> None:
    loss = build_loss(LossConfig(name="ldam"), COUNTS, num_epochs=300)
    loss.start_epoch(299, None)
    assert torch.equal(loss.class_weight, torch.ones(3))


def test_drw_epoch_validation() -> None:
    with pytest.raises(ValueError, match="never be reached"):
        build_loss(LossConfig(name="ldam", drw_epoch=5), COUNTS, num_epochs=5)
    with pytest.raises(ValueError, match="only used by 'ldam'"):
        build_loss(LossConfig(name="ce", drw_epoch=2), COUNTS, num_epochs=5)


def test_cdb_ce_weights_follow_accuracies() -> None:
    loss = build_loss(LossConfig(name="cdb_ce"), CONTRACT_COUNTS, num_epochs=3)
    assert torch.equal(loss.class_weight, torch.ones(4))  # before any accuracy
    loss.start_epoch(0, None)
    assert torch.equal(loss.class_weight, torch.ones(4))
    loss.start_epoch(1, CONTRACT_ACC)
    difficulty = 1 - CONTRACT_ACC.numpy().astype(np.float64)
    np.testing.assert_allclose(loss.class_weight.numpy(), difficulty / difficulty.sum() * 4, rtol=1e-6)
    kept = loss.class_weight.clone()
    loss.start_epoch(2, None)  # no new measurement keeps the last weights
    assert torch.equal(loss.class_weight, kept)
    loss.start_epoch(2, torch.ones(4))  # every class perfect: uniform rather than 0/0
    assert torch.equal(loss.class_weight, torch.ones(4))
    with pytest.raises(ValueError, match="class_acc"):
        loss.start_epoch(3, torch.ones(5))


def test_eql_reproducible_under_manual_seed() -> None:
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(64, 4, generator=gen)
    target = torch.randint(0, 3, (64,), generator=gen)  # never the tail class 3
    loss = build_loss(LossConfig(name="eql", eql_gamma=0.5), CONTRACT_COUNTS, num_epochs=1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        first = loss(logits, target)
        torch.manual_seed(0)
        again = loss(logits, target)
        torch.manual_seed(1)
        other = loss(logits, target)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    # one tail class: each sample either kept or dropped z_3 from its denominator, and both happened
    full = F.cross_entropy(logits, target, reduction="none")
    dropped = F.cross_entropy(logits[:, :3], target, reduction="none")
    is_full = torch.isclose(first, full)
    is_dropped = torch.isclose(first, dropped)
    assert (is_full | is_dropped).all()
    assert is_full.any()
    assert is_dropped.any()


def test_eql_draws_per_sample_and_class() -> None:
    # two tail classes (2 and 3): independent (B, C) draws give all four suppression patterns in one batch
    counts = np.array([1000, 100, 2, 2])
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(64, 4, generator=gen)
    target = torch.randint(0, 2, (64,), generator=gen)
    loss = build_loss(LossConfig(name="eql", eql_gamma=0.5), counts, num_epochs=1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        out = loss(logits, target)
    keep_sets = {"none": [0, 1, 2, 3], "drop2": [0, 1, 3], "drop3": [0, 1, 2], "both": [0, 1]}
    seen = set()
    for pattern, keep in keep_sets.items():
        candidate = F.cross_entropy(logits[:, keep], target, reduction="none")
        if torch.isclose(out, candidate).any():
            seen.add(pattern)
    assert seen == set(keep_sets)


# ---------------------------------------------------------------------------------------------------------------
# CUDA-graph capture (GPU only)
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", LOSSES.names())
def test_cuda_graph_replay_sees_start_epoch(name: str) -> None:
    dev = torch.device("cuda")
    cfg = LossConfig(name=name, drw_epoch=1 if name == "ldam" else -1, eql_gamma=1.0)
    loss = build_loss(cfg, CONTRACT_COUNTS, num_epochs=3).to(dev)
    loss.start_epoch(0, None)
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 4, generator=gen).to(dev).requires_grad_()
    target = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3], device=dev)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # warm-up before capture, as torch.cuda.graphs requires
            loss(logits, target).sum().backward()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    logits.grad = None
    with torch.cuda.graph(graph):
        out = loss(logits, target)
        out.sum().backward()
    for epoch in range(3):
        loss.start_epoch(epoch, CONTRACT_ACC.roll(epoch).to(dev))
        graph.replay()
        torch.testing.assert_close(out, loss(logits.detach(), target))
