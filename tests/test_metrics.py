"""Per-class counters: C++ == NumPy twin == device counter, tie rule, non-finite rows, bad inputs, host counter."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from dnet_fast import _reference as ref
from dnet_fast import evaluation, metrics
from dnet_fast.config import TrainConfig
from dnet_fast.metrics import DeviceClassCounter, HostClassCounter, class_counter, counts_from_logits

_C = metrics._C
COUNTERS = [HostClassCounter, lambda c, topk=1: DeviceClassCounter(c, "cpu", topk)]
COUNTER_IDS = ["host", "device"]


def tied_logits(n: int, num_classes: int, seed: int, dtype=np.float32) -> np.ndarray:
    # Few distinct values so ties are everywhere (including with the label's own logit).
    return np.random.default_rng(seed).integers(-2, 3, size=(n, num_classes)).astype(dtype)


def with_non_finite(logits: np.ndarray, seed: int, rate: float = 0.2) -> np.ndarray:
    """A copy where about ``rate`` of the rows get one NaN, +inf or -inf at a random column (the label's too)."""
    rng = np.random.default_rng(seed)
    out = logits.copy()
    rows = np.flatnonzero(rng.random(out.shape[0]) < rate)
    cols = rng.integers(0, out.shape[1], size=rows.size)
    out[rows, cols] = rng.choice(np.array([np.nan, np.inf, -np.inf]), size=rows.size)
    return out


def count_with(counter, batches) -> tuple[np.ndarray, np.ndarray]:
    for logits, label in batches:
        counter.update(torch.from_numpy(logits), torch.from_numpy(label))
    return counter.correct.numpy(), counter.total.numpy()


@pytest.mark.parametrize(("n", "num_classes"), [(0, 1), (1, 1), (50, 4), (777, 33), (3000, 100)])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("threads", [0, 2])
def test_counts_from_logits_match_twin_with_ties(n, num_classes, dtype, threads):
    logits = tied_logits(n, num_classes, n, dtype)
    label = np.random.default_rng(n + 1).integers(0, num_classes, size=n)
    for topk in sorted({1, 2, num_classes}):
        if topk > num_classes:
            continue
        got = _C.counts_from_logits(logits, label, num_classes, topk, threads)
        want = ref.counts_from_logits(logits, label, num_classes, topk)
        for g, w in zip(got, want, strict=True):
            assert g.dtype == np.int64
            np.testing.assert_array_equal(g, w)


def test_counts_from_logits_accept_any_integer_label_dtype_and_layout():
    logits, label = tied_logits(999, 20, 1), np.random.default_rng(2).integers(0, 20, size=999)
    want = ref.counts_from_logits(logits, label, 20)
    for dtype in (np.int8, np.int32, np.uint16, np.uint64):
        np.testing.assert_array_equal(counts_from_logits(logits, label.astype(dtype), 20)[0], want[0])
    strided = np.stack([label, label], axis=1)[:, 0]  # non-contiguous views
    np.testing.assert_array_equal(counts_from_logits(logits, strided, 20)[0], want[0])
    np.testing.assert_array_equal(counts_from_logits(np.asfortranarray(logits), label, 20)[0], want[0])


def test_top1_equals_numpy_and_torch_argmax_tie_rule():
    logits = tied_logits(4000, 12, 3)
    label = np.random.default_rng(4).integers(0, 12, size=4000)
    correct, total = counts_from_logits(logits, label, 12)
    np.testing.assert_array_equal(correct, np.bincount(label[logits.argmax(1) == label], minlength=12))
    torch_pred = torch.from_numpy(logits).argmax(1).numpy()
    np.testing.assert_array_equal(correct, np.bincount(label[torch_pred == label], minlength=12))
    np.testing.assert_array_equal(total, np.bincount(label, minlength=12))
    # An explicit tie: label 2 ties with class 1 (lower index wins) -> wrong; label 1 ties with 2 -> right.
    z = np.array([[0.0, 5.0, 5.0], [0.0, 5.0, 5.0]], dtype=np.float32)
    np.testing.assert_array_equal(counts_from_logits(z, np.array([2, 1]), 3)[0], [0, 1, 0])
    np.testing.assert_array_equal(counts_from_logits(z, np.array([2, 1]), 3, topk=2)[0], [0, 1, 1])


def test_signed_zeros_tie():
    # -0.0 == 0.0: label 1 (-0.0) loses to class 0 (0.0) by the tie rule; label 0 (0.0) beats class 1 (-0.0).
    z = np.array([[0.0, -0.0, -1.0], [0.0, -0.0, -1.0]])
    for impl in (_C, ref):
        np.testing.assert_array_equal(impl.counts_from_logits(z, np.array([1, 0]), 3)[0], [1, 0, 0])


# ---------------------------------------------------------------------------------------------------------------
# Non-finite logits: the row counts in total, never in correct.
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("topk", [1, 4])
def test_all_nan_logits_give_zero_accuracy(dtype, topk):
    label = np.array([0, 1, 1, 2, 3, 3, 3])
    logits = np.full((label.size, 4), np.nan, dtype=dtype)
    want_total = [1, 2, 1, 3]
    for impl in (_C, ref):
        correct, total = impl.counts_from_logits(logits, label, 4, topk)
        np.testing.assert_array_equal(correct, [0, 0, 0, 0])
        np.testing.assert_array_equal(total, want_total)
    for make in COUNTERS:
        counter = make(4, topk=topk)
        count_with(counter, [(logits, label)])
        np.testing.assert_array_equal(counter.per_class_accuracy().numpy(), [0.0, 0.0, 0.0, 0.0])
        np.testing.assert_array_equal(counter.total.numpy(), want_total)


# Four rows that are all top-1 correct when finite; row `row` gets `value` at column `col`.
FINITE = np.array([[3.0, 1.0, 0.0], [0.0, 3.0, 1.0], [1.0, 0.0, 3.0], [3.0, 0.0, 1.0]])
FINITE_LABEL = np.array([0, 1, 2, 0])


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize(("row", "col"), [(1, 1), (1, 0), (2, 0), (3, 2)])
@pytest.mark.parametrize("topk", [1, 3])
def test_one_non_finite_row_among_finite_ones(value, row, col, topk):
    # (1, 1) is the label's own logit, the others a rival's. With topk = C every row is correct by rank alone, and
    # for NaN, +inf at the label or -inf at a rival even the top-1 rank says correct: only the rule makes them wrong.
    logits = FINITE.copy()
    logits[row, col] = value
    want_correct = np.array([2, 1, 1])
    want_correct[FINITE_LABEL[row]] -= 1  # only the poisoned row turns wrong, even with topk = C
    for impl in (_C, ref):
        for dtype in (np.float32, np.float64):
            correct, total = impl.counts_from_logits(logits.astype(dtype), FINITE_LABEL, 3, topk)
            np.testing.assert_array_equal(correct, want_correct)
            np.testing.assert_array_equal(total, [2, 1, 1])
    for make in COUNTERS:
        correct, total = count_with(make(3, topk=topk), [(logits.astype(np.float32), FINITE_LABEL)])
        np.testing.assert_array_equal(correct, want_correct)
        np.testing.assert_array_equal(total, [2, 1, 1])


@pytest.mark.parametrize(("n", "num_classes"), [(1, 1), (300, 7), (5000, 64), (20000, 150)])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("threads", [0, 1, 3])
def test_engine_twin_and_counters_agree_with_injected_non_finite_rows(n, num_classes, dtype, threads):
    logits = with_non_finite(tied_logits(n, num_classes, n, dtype), seed=n)
    label = np.random.default_rng(n + 2).integers(0, num_classes, size=n)
    for topk in sorted({1, min(3, num_classes), num_classes}):
        got = _C.counts_from_logits(logits, label, num_classes, topk, threads)
        want = ref.counts_from_logits(logits, label, num_classes, topk)
        batches = [(logits[i : i + 256], label[i : i + 256]) for i in range(0, n, 256)]
        for make in COUNTERS:
            on_counter = count_with(make(num_classes, topk=topk), batches)
            for g, w, d in zip(got, want, on_counter, strict=True):
                np.testing.assert_array_equal(g, w)
                np.testing.assert_array_equal(d, w)
    finite = np.isfinite(logits).all(axis=1)
    assert 0 < finite.sum() < n or n < 10  # the cases mix both kinds of row
    all_k, _ = ref.counts_from_logits(logits, label, num_classes, num_classes)  # topk = C: the finite rows
    np.testing.assert_array_equal(all_k, np.bincount(label[finite], minlength=num_classes))


# ---------------------------------------------------------------------------------------------------------------
# Bad inputs: the same error from the engine and its twin.
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", [_C, ref], ids=["C", "ref"])
def test_counts_from_logits_reject_bad_input(impl):
    z = np.zeros((3, 4), dtype=np.float32)
    y = np.array([0, 1, 3])
    cases = [
        ((z.astype(np.int32), y, 4), "logits must be a float"),
        ((z.astype(np.longdouble), y, 4), "logits must be a float") if np.longdouble().itemsize > 8 else None,
        ((z[0], y, 4), "logits must be 2-D"),
        ((z, y[:2], 4), "logits has 3 rows but label has 2"),
        ((z, y, 5), "logits has 4 columns but num_classes = 5"),
        ((z, y.astype(np.float64), 4), "label must be an integer array"),
        ((z, y.astype(bool), 4), "label must be an integer array"),
        ((z, y[None], 4), "label must be 1-D"),
        ((z, np.array([0, 4, 1]), 4), r"label\[1\] = 4 is outside \[0, 4\)"),
        ((z, np.array([0, 1, -1]), 4), r"label\[2\] = -1 is outside \[0, 4\)"),
        ((np.full((3, 4), np.nan), np.array([0, 9, 1]), 4), r"label\[1\] = 9"),  # labels checked, NaN is not
        ((z, y, 0), "num_classes"),
        ((z, y, 2**40), "num_classes"),
        ((z, y, 4, 0), "topk"),
        ((z, y, 4, 5), "topk"),
        ((z, y, 4, 1, -1), "num_threads"),
    ]
    for args, match in filter(None, cases):
        with pytest.raises(ValueError, match=match):
            impl.counts_from_logits(*args)


# ---------------------------------------------------------------------------------------------------------------
# Host and device counters.
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make", COUNTERS, ids=COUNTER_IDS)
@pytest.mark.parametrize("topk", [1, 3])
def test_counter_accumulates_like_counts_from_logits(make, topk):
    counter = make(9, topk=topk)
    host_c, host_t = np.zeros(9, dtype=np.int64), np.zeros(9, dtype=np.int64)
    for batch in range(5):
        logits = tied_logits(64, 9, batch)
        label = np.random.default_rng(batch).integers(0, 7, size=64)  # classes 7, 8 never seen
        counter.update(torch.from_numpy(logits), torch.from_numpy(label))
        c, t = ref.counts_from_logits(logits, label, 9, topk=topk)
        host_c, host_t = host_c + c, host_t + t
    assert counter.correct.dtype == counter.total.dtype == torch.int64
    np.testing.assert_array_equal(counter.correct.numpy(), host_c)
    np.testing.assert_array_equal(counter.total.numpy(), host_t)
    acc = counter.per_class_accuracy()
    assert acc.dtype == torch.float32
    np.testing.assert_allclose(acc[:7].numpy(), host_c[:7] / host_t[:7], rtol=1e-6)
    assert (acc[7:] == 0).all()
    buffers = counter.correct.data_ptr(), counter.total.data_ptr()
    counter.reset()
    assert counter.total.sum() == 0
    assert counter.correct.sum() == 0
    assert (counter.correct.data_ptr(), counter.total.data_ptr()) == buffers


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_host_counter_on_half_logits_equals_device_counter(dtype):
    logits = torch.from_numpy(with_non_finite(np.random.default_rng(5).normal(size=(500, 40)), 6)).to(dtype)
    label = torch.from_numpy(np.random.default_rng(7).integers(0, 40, size=500))
    host, device = HostClassCounter(40, topk=2), DeviceClassCounter(40, "cpu", topk=2)
    host.update(logits, label.to(torch.int32))  # any integer label dtype on the host
    device.update(logits, label)
    assert torch.equal(host.correct, device.correct)
    assert torch.equal(host.total, device.total)
    assert 0 < host.correct.sum() < host.total.sum() == 500


def test_host_counter_rejects_bad_input_without_counting():
    counter = HostClassCounter(3)
    counter.update(torch.zeros(2, 3), torch.tensor([0, 2]))
    with pytest.raises(ValueError, match=r"label\[1\] = 3 is outside \[0, 3\)"):
        counter.update(torch.zeros(2, 3), torch.tensor([1, 3]))
    with pytest.raises(ValueError, match="logits has 4 columns but num_classes = 3"):
        counter.update(torch.zeros(2, 4), torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="CPU tensors"):
        counter.update(torch.zeros(2, 3, device="meta"), torch.tensor([1, 1]))
    assert counter.total.tolist() == [1, 0, 1]
    assert counter.correct.tolist() == [1, 0, 0]


def test_device_counter_update_has_no_host_sync(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("host sync inside DeviceClassCounter.update")

    counter = DeviceClassCounter(5, "cpu")
    logits, label = torch.randn(16, 5), torch.randint(0, 5, (16,))
    logits[3, 1] = float("nan")
    for name in ("item", "tolist", "cpu", "numpy", "nonzero", "bincount"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    monkeypatch.setattr(torch, "bincount", forbidden)
    monkeypatch.setattr(torch, "nonzero", forbidden)
    counter.update(logits, label)
    monkeypatch.undo()
    assert counter.total.sum().item() == 16


@pytest.mark.parametrize("make", COUNTERS, ids=COUNTER_IDS)
def test_counters_reject_bad_arguments(make):
    with pytest.raises(ValueError, match="num_classes"):
        make(0)
    with pytest.raises(ValueError, match="topk"):
        make(3, topk=4)
    with pytest.raises(ValueError, match="topk"):
        make(3, topk=0)


def test_class_counter_picks_host_on_cpu_and_device_elsewhere():
    for device in ("cpu", torch.device("cpu")):
        counter = class_counter(6, device, topk=2)
        assert type(counter) is HostClassCounter
        assert counter.topk == 2
        assert counter.num_classes == 6
    counter = class_counter(6, "meta", topk=3)  # any non-CPU device; meta needs no accelerator
    assert type(counter) is DeviceClassCounter
    assert counter.topk == 3
    assert counter.correct.device.type == "meta"


class _Fixed(nn.Module):
    """A 'model' that returns the logits stored for each batch, in order."""

    def __init__(self, outputs: list[torch.Tensor]) -> None:
        super().__init__()
        self.outputs = iter(outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return next(self.outputs)


def test_engine_class_accuracy_counts_on_host_on_cpu(monkeypatch):
    logits = with_non_finite(tied_logits(300, 5, 8), 9)
    label = np.random.default_rng(10).integers(0, 5, size=300)
    chunks = [slice(0, 128), slice(128, 256), slice(256, 300)]
    batches = [(torch.zeros(s.stop - s.start, 1), torch.from_numpy(label[s])) for s in chunks]
    made = []

    def spy(*args, **kwargs):
        made.append(class_counter(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(evaluation, "class_counter", spy)
    model = _Fixed([torch.from_numpy(logits[s]) for s in chunks])
    acc = evaluation.class_accuracy(model, batches, 5, TrainConfig(), torch.device("cpu"))
    correct, total = ref.counts_from_logits(logits, label, 5)
    assert [type(c) for c in made] == [HostClassCounter]
    assert made[0].correct.tolist() == correct.tolist()
    assert made[0].total.tolist() == total.tolist()
    np.testing.assert_allclose(acc.numpy(), correct / total, rtol=1e-6)
    model = _Fixed([torch.full((len(y), 5), float("nan")) for _, y in batches])  # a diverged model scores 0
    assert (evaluation.class_accuracy(model, batches, 5, TrainConfig(), torch.device("cpu")) == 0).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_device_counter_inside_cuda_graph_matches_host():
    counter = DeviceClassCounter(10, "cuda")
    static_logits = torch.zeros(128, 10, device="cuda")
    static_label = torch.zeros(128, dtype=torch.int64, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        counter.update(static_logits, static_label)  # warm-up outside capture
    torch.cuda.current_stream().wait_stream(side)
    counter.reset()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        counter.update(static_logits, static_label)
    host = HostClassCounter(10)
    for seed in range(4):
        logits = with_non_finite(tied_logits(128, 10, seed), seed)
        label = np.random.default_rng(seed).integers(0, 10, size=128)
        static_logits.copy_(torch.from_numpy(logits))
        static_label.copy_(torch.from_numpy(label))
        graph.replay()
        host.update(torch.from_numpy(logits), torch.from_numpy(label))
    assert torch.equal(counter.correct.cpu(), host.correct)
    assert torch.equal(counter.total.cpu(), host.total)
