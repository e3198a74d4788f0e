"""Benchmark harness, runner output format, and the naive reference iterations (never the speed)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from benchmarks import runner
from benchmarks.harness import BENCHMARKS, Benchmark, Ratio, Timing, environment, timeit, write_json
from benchmarks.naive import (
    NaiveExactStep,
    NaiveState,
    OfficialClassAwareSampler,
    OfficialMetaLoader,
    OfficialStyleStep,
    class_weights,
    driver_loss,
    swap_params,
)
from dnet_fast.models import DifficultyNet

C = 4  # classes of the tiny problems


# ----------------------------------------------------------------------------------------------------------
# Harness


def test_timeit_excludes_warmup_and_reports_setup():
    calls = []
    events = []
    t = timeit(
        lambda: calls.append(1),
        warmup=3,
        repeats=5,
        setup=lambda: events.append("setup"),
        reset=lambda: events.append(len(calls)),
    )
    assert len(calls) == 8
    assert events == ["setup", 3]  # reset runs after the warm-up, before timing
    assert len(t.samples) == 5
    assert t.clock == "perf_counter"
    assert t.setup_s is not None
    assert t.min <= t.median <= t.max


def test_timeit_rejects_bad_counts():
    with pytest.raises(ValueError, match="repeats"):
        timeit(lambda: None, repeats=0)


def test_timing_statistics_and_merge():
    t = Timing.from_samples([1.0, 2.0, 3.0, 4.0, 5.0], "perf_counter")
    assert (t.median, t.min, t.max, t.iqr) == (3.0, 1.0, 5.0, 2.0)
    m = t.merged(Timing.from_samples([10.0], "perf_counter"))
    assert m.samples == [1.0, 2.0, 3.0, 4.0, 5.0, 10.0]
    assert m.median == 3.5
    assert json.dumps(m.to_dict())


def test_write_json_is_atomic_and_overwrites(tmp_path):
    path = tmp_path / "sub" / "out.json"
    write_json(path, {"a": 1})
    write_json(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 2}
    assert [p.name for p in path.parent.iterdir()] == ["out.json"]  # no temp file left


def test_environment_has_provenance():
    env = environment()
    for key in (
        "date_utc",
        "cpu_model",
        "cpu_count",
        "torch",
        "numpy",
        "python",
        "git_commit",
        "git_dirty",
        "dnet_fast_C",
        "torch_threads",
    ):
        assert key in env
    assert isinstance(env["dnet_fast_C"]["built"], bool)
    assert json.dumps(env, default=str)


def test_ratio_verdicts():
    medians = {"slow": 3.0, "fast": 1.0}
    assert Ratio("s", "slow", "fast", 2.5).evaluate(medians)["passed"] is True
    assert Ratio("o", "fast", "slow", 0.3, higher_is_better=False).evaluate(medians)["passed"] is False
    assert Ratio("m", "slow", "missing", 1.0).evaluate(medians)["value"] is None


# ----------------------------------------------------------------------------------------------------------
# Runner and output format


class _Toy(Benchmark):
    name = "toy"
    description = "sums a small tensor"
    baseline = "loop"

    def grid(self, profile):
        return [{"n": 8 if profile.quick else 64}]

    def variants(self, params):
        return ["loop", "vector", "broken"]

    def ratios(self, params):
        return [Ratio("vector speed-up", "loop", "vector", 1e-6)]

    def setup(self, params):
        self.x = torch.arange(params["n"], dtype=torch.float32)
        self.units_per_call = params["n"]

    def prepare(self, variant):
        from benchmarks.harness import SkipVariant

        if variant == "broken":
            msg = "not written yet"
            raise SkipVariant(msg)
        if variant == "loop":
            return lambda: sum(float(v) for v in self.x)
        return self.x.sum


@pytest.fixture
def toy_registered(monkeypatch):
    monkeypatch.setitem(BENCHMARKS._items, "toy", _Toy)


def test_runner_writes_json_and_markdown(tmp_path, toy_registered, capsys):
    out = tmp_path / "bench"
    assert runner.main(["--quick", "--cpu", "--threads", "1", "--only", "toy", "--out", str(out)]) == 0
    payload = json.loads((out / "results.json").read_text())
    assert payload["profile"]["quick"] is True
    assert payload["profile"]["device"] == "cpu"
    assert "git_commit" in payload["environment"]
    (bench,) = payload["benchmarks"]
    (point,) = bench["points"]
    assert point["params"] == {"n": 8}
    assert set(point["variants"]) == {"loop", "vector"}
    assert point["skipped"] == {"broken": "not written yet"}
    row = point["variants"]["vector"]
    for key in ("timing", "ms_per_call", "best_median_s", "units_per_s", "speedup_vs_baseline", "setup_s"):
        assert key in row
    assert point["variants"]["loop"]["speedup_vs_baseline"] == 1.0
    assert point["ratios"][0]["passed"] is True
    md = (out / "results.md").read_text()
    assert "| `vector` |" in md
    assert "vector speed-up" in md
    assert "skipped `broken`" in md
    assert (out / "toy.json").exists()
    assert "# dnet-fast benchmark results" in capsys.readouterr().out


def test_runner_rejects_unknown_name(tmp_path):
    assert runner.main(["--quick", "--threads", "1", "--only", "no_such_bench", "--out", str(tmp_path)]) == 2


def test_runner_lists_discovered_benchmarks(capsys):
    assert runner.main(["--list"]) == 0
    assert "step" in capsys.readouterr().out


def test_step_benchmark_quick_smoke(tmp_path):
    out = tmp_path / "step"
    assert (
        runner.main(
            [
                "--quick",
                "--cpu",
                "--threads",
                "1",
                "--only",
                "step",
                "--out",
                str(out),
                "--repeats",
                "1",
                "--warmup",
                "0",
            ]
        )
        == 0
    )
    (point,) = json.loads((out / "results.json").read_text())["benchmarks"][0]["points"]
    assert "error" not in point
    measured = set(point["variants"]) | set(point["skipped"])
    assert {
        "official",
        "official_2nd",
        "naive_exact",
        "off",
        "driver",
        "exact",
        "exact_double_backward",
    } <= measured
    assert {r["name"] for r in point["ratios"]} >= {
        "driver speed-up over official-style",
        "exact speed-up over naive exact",
    }


def test_e2e_benchmark_quick_smoke(tmp_path):
    out = tmp_path / "e2e"
    argv = [
        "--quick",
        "--cpu",
        "--threads",
        "1",
        "--only",
        "e2e",
        "--out",
        str(out),
        "--repeats",
        "1",
        "--warmup",
        "0",
    ]
    assert runner.main(argv) == 0
    (point,) = json.loads((out / "results.json").read_text())["benchmarks"][0]["points"]
    assert "error" not in point
    assert set(point["variants"]) | set(point["skipped"]) == {"official", "off", "driver", "exact"}


# ----------------------------------------------------------------------------------------------------------
# Naive references: faithful to SPEC §4.2 / §4.3


def _tiny_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 3, 3, padding=1),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(3, C),
    ).double()


def _state(seed: int = 0) -> NaiveState:
    torch.manual_seed(seed)
    model = _tiny_model().train()
    diffnet = DifficultyNet(C, hidden=6, bias=True).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9, weight_decay=1e-3)
    adam = torch.optim.Adam(diffnet.parameters(), lr=1e-2, weight_decay=1e-4)
    acc = torch.tensor([0.9, 0.5, 0.2, 0.0], dtype=torch.float64)
    return NaiveState(model, diffnet, opt, adam, acc, lambda_dr=0.3)


def _batches(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(10, 3, 5, 5, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2, 2, 3])
    xm = torch.randn(8, 3, 5, 5, generator=g, dtype=torch.float64)
    ym = torch.arange(C).repeat(2)
    return x, y, (xm, ym)


def _bn_after_one_forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    ref = copy.deepcopy(model)
    with torch.no_grad():
        ref(x)
    return ref[1].running_mean.clone()


def test_official_sampler_is_seeded_and_class_aware():
    labels = [c for c in range(5) for _ in range(3)]
    a = [next(OfficialClassAwareSampler(labels, seed=3)) for _ in range(1)]
    s1, s2 = OfficialClassAwareSampler(labels, seed=3), OfficialClassAwareSampler(labels, seed=3)
    draws = [next(s1) for _ in range(10)]
    assert draws == [next(s2) for _ in range(10)]
    assert a[0] == draws[0]
    assert sorted(labels[i] for i in draws[:5]) == [0, 1, 2, 3, 4]  # one class cycle covers every class once


def test_official_meta_loader_batches():
    images = torch.randn(12, 3, 2, 2)
    labels = torch.arange(4).repeat_interleave(3)
    x, y = OfficialMetaLoader(images, labels, batch_size=4, seed=0).next_batch()
    assert x.shape == (4, 3, 2, 2)
    assert sorted(y.tolist()) == [0, 1, 2, 3]


def test_swap_params_uses_new_tensors():
    model = nn.Sequential(nn.Linear(2, 1, bias=False))
    swap_params(model, {"0.weight": torch.zeros(1, 2)})
    assert model(torch.ones(1, 2)).item() == 0.0
    assert len(list(model.parameters())) == 0


@pytest.mark.parametrize("second_order", [False, True])
def test_official_style_meta_loss_sends_no_gradient_to_theta(second_order):
    s = _state()
    x, y, (xm, ym) = _batches()
    expected = torch.autograd.grad(
        s.lambda_dr * driver_loss(s.diffnet(s.acc), s.acc), list(s.diffnet.parameters())
    )
    bn_expected = _bn_after_one_forward(s.model, x)
    loader = OfficialMetaLoader(xm, ym, batch_size=4, seed=0)
    step = OfficialStyleStep(s, _tiny_model, loader, second_order=second_order)
    step.step(x, y)
    for p, g in zip(s.diffnet.parameters(), expected, strict=True):
        torch.testing.assert_close(p.grad, g)  # only λ·L_dr reached θ (SPEC §4.2)
    torch.testing.assert_close(s.model[1].running_mean, bn_expected)  # only the real forward touched BN
    assert sum(step.class_total) == len(y)


def test_official_style_equals_driver_mode_step():
    """SPEC §4.4: driver mode computes what the released code computes."""
    meta = pytest.importorskip("dnet_fast.meta")
    from dnet_fast.config import MetaConfig, TrainConfig
    from dnet_fast.losses import build_loss

    x, y, (xm, ym) = _batches()
    s_ref, s_lib = _state(), _state()
    OfficialStyleStep(s_ref, _tiny_model, OfficialMetaLoader(xm, ym, 4, seed=0)).step(x, y)
    cfg = TrainConfig(meta=MetaConfig(mode="driver", lambda_dr=0.3))
    criterion = build_loss(cfg.loss, torch.ones(C), 1)
    mode = meta.DriverMode(cfg, s_lib.model, criterion, s_lib.optimizer, C, diffnet=s_lib.diffnet)
    mode.diffnet_optimizer = s_lib.diff_optimizer
    mode.set_class_accuracy(s_lib.acc)
    mode.step(x, y)
    for a, b in zip(s_ref.diffnet.parameters(), s_lib.diffnet.parameters(), strict=True):
        torch.testing.assert_close(a, b)
    for a, b in zip(s_ref.model.state_dict().values(), s_lib.model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)


def test_naive_exact_meta_gradient_matches_finite_differences():
    s = _state()
    x, y, meta_batch = _batches()
    step = NaiveExactStep(s)
    theta = list(s.diffnet.parameters())
    grads = torch.autograd.grad(step.meta_objective(x, y, meta_batch), theta)
    assert any(g.abs().sum() > 0 for g in grads[:-1])  # the meta term does reach θ (unlike the official code)
    g = torch.Generator().manual_seed(2)
    direction = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in theta]
    eps = 1e-6

    def objective_at(sign: float) -> float:
        with torch.no_grad():
            for p, v in zip(theta, direction, strict=True):
                p.add_(sign * eps * v)
        value = step.meta_objective(x, y, meta_batch).item()
        with torch.no_grad():
            for p, v in zip(theta, direction, strict=True):
                p.sub_(sign * eps * v)
        return value

    fd = (objective_at(1.0) - objective_at(-1.0)) / (2 * eps)
    analytic = sum((gi * v).sum() for gi, v in zip(grads, direction, strict=True)).item()
    assert fd == pytest.approx(analytic, rel=1e-5, abs=1e-9)


def test_naive_exact_step_updates_bn_once_and_uses_updated_weights():
    s = _state()
    x, y, meta_batch = _batches()
    bn_expected = _bn_after_one_forward(s.model, x)
    NaiveExactStep(s).step(x, y, meta_batch)
    torch.testing.assert_close(s.model[1].running_mean, bn_expected)
    w = class_weights(s.diffnet(s.acc))
    assert w.sum().item() == pytest.approx(C)


def test_naive_exact_equals_library_exact_double_backward():
    """The plain reference and the library's exact mode compute the same step (SPEC §14)."""
    meta = pytest.importorskip("dnet_fast.meta")
    from dnet_fast.config import MetaConfig, TrainConfig
    from dnet_fast.losses import build_loss

    x, y, meta_batch = _batches()
    s_ref, s_lib = _state(), _state()
    NaiveExactStep(s_ref).step(x, y, meta_batch)
    cfg = TrainConfig(meta=MetaConfig(mode="exact", grad="double_backward", lambda_dr=0.3))
    criterion = build_loss(cfg.loss, torch.ones(C), 1)
    mode = meta.ExactMode(cfg, s_lib.model, criterion, s_lib.optimizer, C, diffnet=s_lib.diffnet)
    mode.diffnet_optimizer = s_lib.diff_optimizer
    mode.set_class_accuracy(s_lib.acc)
    mode.step(x, y, meta_batch)
    for a, b in zip(s_ref.diffnet.parameters(), s_lib.diffnet.parameters(), strict=True):
        torch.testing.assert_close(a, b)
    for a, b in zip(s_ref.model.state_dict().values(), s_lib.model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)
