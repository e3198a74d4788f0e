"""Per-class counters: C++ == NumPy twin, tie rule, thread-parallel path, bad inputs, device counter."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dnet_fast import _reference as ref
from dnet_fast import metrics
from dnet_fast.metrics import DeviceClassCounter, class_counts, counts_from_logits

_C = metrics._C


def random_case(n: int, num_classes: int, seed: int, sorted_labels: bool = False):
    rng = np.random.default_rng(seed)
    label = rng.integers(0, num_classes, size=n)
    if sorted_labels:  # eval sets are often grouped by class
        label.sort()
    pred = np.where(rng.random(n) < 0.6, label, rng.integers(-2, num_classes + 2, size=n))
    return pred, label


def tied_logits(n: int, num_classes: int, seed: int, dtype=np.float32) -> np.ndarray:
    # Few distinct values so ties are everywhere (including with the label's own logit).
    return np.random.default_rng(seed).integers(-2, 3, size=(n, num_classes)).astype(dtype)


@pytest.mark.parametrize(
    ("n", "num_classes"), [(0, 1), (1, 1), (7, 3), (1000, 10), (5003, 257), (20000, 5000)]
)
@pytest.mark.parametrize("threads", [0, 1, 3])
@pytest.mark.parametrize("sorted_labels", [False, True])
def test_class_counts_match_twin(n, num_classes, threads, sorted_labels):
    pred, label = random_case(n, num_classes, n + num_classes, sorted_labels)
    got = _C.class_counts(pred, label, num_classes, threads)
    want = ref.class_counts(pred, label, num_classes)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == np.int64
        np.testing.assert_array_equal(g, w)


def test_class_counts_accept_any_integer_dtype_and_layout():
    pred, label = random_case(999, 20, 1)
    want = ref.class_counts(pred, label, 20)
    for dtype in (np.int8, np.int32, np.uint16, np.uint64):
        got = class_counts(pred.astype(dtype) % 20, label.astype(dtype), 20)
        np.testing.assert_array_equal(got[1], want[1])
    strided = np.stack([label, label], axis=1)[:, 0]  # non-contiguous view
    np.testing.assert_array_equal(class_counts(pred, strided, 20)[0], want[0])


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
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])


def test_top1_equals_numpy_and_torch_argmax_tie_rule():
    logits = tied_logits(4000, 12, 3)
    label = np.random.default_rng(4).integers(0, 12, size=4000)
    correct, _ = counts_from_logits(logits, label, 12)
    np.testing.assert_array_equal(correct, class_counts(logits.argmax(1), label, 12)[0])
    torch_pred = torch.from_numpy(logits).argmax(1).numpy()
    np.testing.assert_array_equal(correct, class_counts(torch_pred, label, 12)[0])
    # An explicit tie: label 2 ties with class 1 (lower index wins) -> wrong; label 1 ties with 2 -> right.
    z = np.array([[0.0, 5.0, 5.0], [0.0, 5.0, 5.0]], dtype=np.float32)
    np.testing.assert_array_equal(counts_from_logits(z, np.array([2, 1]), 3)[0], [0, 1, 0])
    np.testing.assert_array_equal(counts_from_logits(z, np.array([2, 1]), 3, topk=2)[0], [0, 1, 1])


def test_infinities_and_signed_zero():
    z = np.array([[-np.inf, np.inf, 0.0], [0.0, -0.0, 1.0], [np.inf, np.inf, -1.0]])
    label = np.array([1, 1, 1])
    np.testing.assert_array_equal(
        _C.counts_from_logits(z, label, 3)[0], ref.counts_from_logits(z, label, 3)[0]
    )


@pytest.mark.parametrize(("n", "num_classes"), [(0, 1), (500, 7), (40000, 30)])
def test_confusion_matrix_matches_twin_and_counts(n, num_classes):
    pred, label = random_case(n, num_classes, 9)
    pred = np.mod(pred, num_classes)
    cm = metrics.confusion_matrix(pred, label, num_classes)
    np.testing.assert_array_equal(cm, ref.confusion_matrix(pred, label, num_classes))
    correct, total = class_counts(pred, label, num_classes)
    np.testing.assert_array_equal(np.diag(cm), correct)
    np.testing.assert_array_equal(cm.sum(axis=1), total)


def test_merge_counts():
    parts = [class_counts(*random_case(300, 6, s), 6) for s in range(4)]
    correct, total = metrics.merge_counts(parts)
    np.testing.assert_array_equal(correct, sum(p[0] for p in parts))
    np.testing.assert_array_equal(total, sum(p[1] for p in parts))
    pred, label = (np.concatenate(x) for x in zip(*[random_case(300, 6, s) for s in range(4)], strict=True))
    np.testing.assert_array_equal(total, class_counts(pred, label, 6)[1])


# ---------------------------------------------------------------------------------------------------------------
# Bad inputs: the same error from the engine and its twin.
# ---------------------------------------------------------------------------------------------------------------
P, Y = np.array([0, 1, 2]), np.array([0, 1, 1])


@pytest.mark.parametrize(
    ("pred", "label", "num_classes", "match"),
    [
        (P, Y.astype(np.float32), 3, "label must be an integer array"),
        (P.astype(np.float64), Y, 3, "pred must be an integer array"),
        (P, Y.astype(bool), 3, "label must be an integer array"),
        (P, Y[None], 3, "label must be 1-D"),
        (P[None], Y, 3, "pred must be 1-D"),
        (P[:2], Y, 3, "pred has 2 entries but label has 3"),
        (P, np.array([0, -1, 1]), 3, r"label\[1\] = -1 is outside \[0, 3\)"),
        (P, np.array([0, 1, 3]), 3, r"label\[2\] = 3 is outside \[0, 3\)"),
        (P, Y, 0, "num_classes"),
        (P, Y, -4, "num_classes"),
        (P, Y, 2**40, "num_classes"),
    ],
)
@pytest.mark.parametrize("impl", [_C, ref], ids=["C", "ref"])
def test_class_counts_reject_bad_input(impl, pred, label, num_classes, match):
    with pytest.raises(ValueError, match=match):
        impl.class_counts(pred, label, num_classes)


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
        ((z, np.array([0, 4, 1]), 4), r"label\[1\] = 4"),
        ((z, y, 4, 0), "topk"),
        ((z, y, 4, 5), "topk"),
        ((np.where(np.eye(3, 4) > 0, np.nan, 0.0), y, 4), "logits row 0 contains NaN"),
        ((z, y, 4, 1, -1), "num_threads"),
    ]
    for args, match in filter(None, cases):
        with pytest.raises(ValueError, match=match):
            impl.counts_from_logits(*args)


@pytest.mark.parametrize("impl", [_C, ref], ids=["C", "ref"])
def test_confusion_and_merge_reject_bad_input(impl):
    with pytest.raises(ValueError, match=r"pred\[2\] = 3 is outside"):
        impl.confusion_matrix(np.array([0, 1, 3]), Y, 3)
    with pytest.raises(ValueError, match=r"label\[0\] = -1"):  # the first bad sample wins, label before pred
        impl.confusion_matrix(np.array([5, 1, 3]), np.array([-1, 1, 1]), 3)
    with pytest.raises(ValueError, match="num_classes"):
        impl.confusion_matrix(P, Y, 2**15 + 1)
    ok = np.ones((2, 3), dtype=np.int64)
    with pytest.raises(ValueError, match="correct must be non-negative"):
        impl.merge_counts(-ok, ok)
    with pytest.raises(ValueError, match="correct must not exceed total"):
        impl.merge_counts(ok * 2, ok)
    with pytest.raises(ValueError, match="overflows"):
        impl.merge_counts(ok, ok * (2**62))
    with pytest.raises(ValueError, match="but total has shape"):
        impl.merge_counts(ok, ok[:1])
    with pytest.raises(ValueError, match="correct must be 2-D"):
        impl.merge_counts(ok[0], ok)


def test_merge_counts_facade_needs_parts():
    with pytest.raises(ValueError, match="at least one"):
        metrics.merge_counts([])


# ---------------------------------------------------------------------------------------------------------------
# Device counter.
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("topk", [1, 3])
def test_device_counter_agrees_with_host_counter(topk):
    counter = DeviceClassCounter(9, "cpu", topk=topk)
    host_c, host_t = np.zeros(9, dtype=np.int64), np.zeros(9, dtype=np.int64)
    for batch in range(5):
        logits = tied_logits(64, 9, batch)
        label = np.random.default_rng(batch).integers(0, 7, size=64)  # classes 7, 8 never seen
        counter.update(torch.from_numpy(logits), torch.from_numpy(label))
        c, t = counts_from_logits(logits, label, 9, topk=topk)
        host_c, host_t = host_c + c, host_t + t
    np.testing.assert_array_equal(counter.correct.numpy(), host_c)
    np.testing.assert_array_equal(counter.total.numpy(), host_t)
    acc = counter.per_class_accuracy()
    assert acc.dtype == torch.float32
    np.testing.assert_allclose(acc[:7].numpy(), host_c[:7] / host_t[:7], rtol=1e-6)
    assert (acc[7:] == 0).all()
    buffers = counter.correct.data_ptr(), counter.total.data_ptr()
    counter.reset()
    assert counter.total.sum() == 0
    assert (counter.correct.data_ptr(), counter.total.data_ptr()) == buffers


def test_device_counter_update_has_no_host_sync(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("host sync inside DeviceClassCounter.update")

    counter = DeviceClassCounter(5, "cpu")
    logits, label = torch.randn(16, 5), torch.randint(0, 5, (16,))
    for name in ("item", "tolist", "cpu", "numpy", "nonzero", "bincount"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    monkeypatch.setattr(torch, "bincount", forbidden)
    monkeypatch.setattr(torch, "nonzero", forbidden)
    counter.update(logits, label)
    monkeypatch.undo()
    assert counter.total.sum().item() == 16


def test_device_counter_rejects_bad_arguments():
    with pytest.raises(ValueError, match="num_classes"):
        DeviceClassCounter(0, "cpu")
    with pytest.raises(ValueError, match="topk"):
        DeviceClassCounter(3, "cpu", topk=4)


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
    host_c, host_t = np.zeros(10, dtype=np.int64), np.zeros(10, dtype=np.int64)
    for seed in range(4):
        logits, label = tied_logits(128, 10, seed), np.random.default_rng(seed).integers(0, 10, size=128)
        static_logits.copy_(torch.from_numpy(logits))
        static_label.copy_(torch.from_numpy(label))
        graph.replay()
        c, t = counts_from_logits(logits, label, 10)
        host_c, host_t = host_c + c, host_t + t
    np.testing.assert_array_equal(counter.correct.cpu().numpy(), host_c)
    np.testing.assert_array_equal(counter.total.cpu().numpy(), host_t)
