"""Benchmark harness, runner output format, and the naive reference iterations (never the speed)."""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json

import numpy as np
import pytest
import torch
from torch import nn

from benchmarks import e2e_epoch, official, report, runner
from benchmarks.e2e_data import (
    OfficialStyleDataset,
    decode_split,
    places_lt_counts,
    scaled_counts,
    textured_image,
    write_jpegs,
)
from benchmarks.harness import BENCHMARKS, Benchmark, Ratio, Timing, environment, timeit, write_json
from benchmarks.loopstats import TimedLoop
from benchmarks.naive import NaiveExactStep, NaiveState, class_weights, swap_params
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


class _Counter:
    """A variant callable that counts its calls, split by the runner's ``recording`` flag."""

    def __init__(self):
        self.recording = False
        self.calls = {True: 0, False: 0}

    def __call__(self):
        self.calls[self.recording] += 1


class _Hooked(_Toy):
    name = "hooked"
    seen: dict = {}

    def variants(self, params):
        return ["loop", "vector"]

    def profile_for(self, params, profile):
        return dataclasses.replace(profile, warmup=1, repeats=3, rounds=2)

    def sequential(self, params):
        return params["n"] == 8

    def prepare(self, variant):
        fn = _Counter()
        type(self).seen[variant] = fn
        return fn

    def metrics(self, variant):
        return {"timed_calls": self.seen[variant].calls[True], "warmup_calls": self.seen[variant].calls[False]}

    def release(self, variant):
        type(self).seen[variant + "_released"] = True

    def time_scale(self, variant):
        return 10.0 if variant == "vector" else 1.0

    def derived(self, point):
        return {
            "tables": [{"title": "derived table", "columns": ["variant", "x"], "rows": [{"variant": "a", "x": 1.5}]}],
            "targets": [{"name": "x target", "value": 1.5, "target": 2.0, "op": ">=", "passed": False}],
        }


@pytest.mark.parametrize("quick", [True, False])
def test_runner_hooks(tmp_path, monkeypatch, quick):
    monkeypatch.setitem(BENCHMARKS._items, "hooked", _Hooked)
    monkeypatch.setattr(_Hooked, "seen", {})
    out = tmp_path / "bench"
    argv = ["--cpu", "--threads", "1", "--only", "hooked", "--out", str(out), "--set", "k=3", "--rounds", "1"]
    assert runner.main([*(["--quick"] if quick else []), *argv]) == 0
    payload = json.loads((out / "results.json").read_text())
    assert payload["profile"]["extra"] == {"k": 3}
    (point,) = payload["benchmarks"][0]["points"]
    assert point["timing_profile"] == {"warmup": 1, "repeats": 3, "rounds": 2}
    for name, row in point["variants"].items():
        assert row["metrics"] == {"timed_calls": 6, "warmup_calls": 2}, name  # warm-up never recorded
    assert point["variants"]["vector"]["time_scale"] == 10.0
    assert bool(_Hooked.seen.get("loop_released")) is quick  # sequential (n == 8, quick) releases each variant
    md = (out / "results.md").read_text()
    assert "In-loop measurements" in md
    assert "**derived table**" in md
    assert "| x target | 1.5 | >= 2 | **MISSED** |" in md
    assert "timed on 1/10, scaled" in md
    png = out / "results.png"
    assert png.exists() == (importlib.util.find_spec("matplotlib") is not None)


def test_runner_budget_skips_later_points(tmp_path, toy_registered):
    out = tmp_path / "bench"
    assert runner.main(["--quick", "--cpu", "--only", "toy", "--out", str(out), "--budget-s", "1e-9"]) == 0
    (point,) = json.loads((out / "results.json").read_text())["benchmarks"][0]["points"]
    assert point["skipped"] == {"*": "time budget exhausted (--budget-s)"}
    assert "time budget exhausted" in (out / "results.md").read_text()


def test_runner_rejects_malformed_set(tmp_path, toy_registered):
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        runner.main(["--quick", "--cpu", "--only", "toy", "--out", str(tmp_path), "--set", "novalue"])


def test_report_without_matplotlib_writes_no_png(tmp_path, monkeypatch, toy_registered):
    monkeypatch.setattr(report, "_pyplot", lambda: None)
    out = tmp_path / "bench"
    assert runner.main(["--quick", "--cpu", "--threads", "1", "--only", "toy", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["results.json", "results.md", "toy.json"]


def test_runner_writes_png_per_benchmark(tmp_path, toy_registered):
    pytest.importorskip("matplotlib")
    out = tmp_path / "bench"
    assert runner.main(["--quick", "--cpu", "--threads", "1", "--only", "toy", "--out", str(out)]) == 0
    for name in ("results.png", "toy.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_runner_lists_every_registered_benchmark(capsys):
    assert runner.main(["--list"]) == 0
    listed = {line.split()[0] for line in capsys.readouterr().out.splitlines() if line.strip()}
    assert {"e2e", "engine", "loaders", "step"} <= listed


def _quick_point(name: str, out) -> dict:
    """Runs benchmark ``name`` once (quick profile, CPU, one thread, no warm-up); returns its only grid point."""
    quick = ["--quick", "--cpu", "--threads", "1", "--repeats", "1", "--warmup", "0"]
    assert runner.main([*quick, "--only", name, "--out", str(out)]) == 0
    (point,) = json.loads((out / "results.json").read_text())["benchmarks"][0]["points"]
    return point


def test_step_benchmark_quick_smoke(tmp_path):
    point = _quick_point("step", tmp_path / "step")
    assert "error" not in point
    measured = set(point["variants"]) | set(point["skipped"])
    assert {
        "official",
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


def _quick_run(name: str, out) -> dict:
    """Runs benchmark ``name`` with the quick profile on the CPU; returns the whole payload."""
    quick = ["--quick", "--cpu", "--threads", "1", "--repeats", "1", "--warmup", "0"]
    assert runner.main([*quick, "--only", name, "--out", str(out)]) == 0
    return json.loads((out / "results.json").read_text())


def test_e2e_benchmark_quick_smoke(tmp_path):
    payload = _quick_run("e2e", tmp_path / "e2e")
    points = payload["benchmarks"][0]["points"]
    assert [p["params"]["name"] for p in points] == ["cifar_quick", "places_quick"]
    for point in points:
        assert "error" not in point, point.get("error")
        assert set(point["variants"]) | set(point["skipped"]) == {"official", "off", "driver", "exact"}
        assert point["timing_profile"] == {"warmup": 0, "repeats": 1, "rounds": 1}
        for name, row in point["variants"].items():
            m = row["metrics"]
            assert m["iterations"] == point["params"]["iters"], name  # timed calls only, not the warm-up
            assert 0.0 <= m["data_wait_share_host"] <= 1.0
            assert m["first_iter_s"] > 0
        assert point["variants"]["official"]["metrics"]["loader_start_s"] > 0
        titles = [t["title"] for t in point["derived"]["tables"]]
        assert any("extrapolated, not measured" in t for t in titles)
        assert any(t.startswith("A_C evaluation cost") for t in titles)
        assert point["derived"]["targets"] == []  # absolute targets are GPU-only
        assert {"official", "engine", "resident", "images"} <= set(point["derived"]["eval_costs_s_per_image"])
        ratio = next(r for r in point["ratios"] if r["name"].startswith("driver e2e speed-up"))
        assert ratio["target"] == 1.0
    md = (tmp_path / "e2e" / "results.md").read_text()
    assert "In-loop measurements" in md
    assert "extrapolated, not measured" in md


def test_engine_benchmark_quick_smoke(tmp_path):
    payload = _quick_run("engine", tmp_path / "engine")
    points = {p["params"]["name"]: p for p in payload["benchmarks"][0]["points"]}
    assert set(points) == {"meta_sampling", "epoch_order", "counting", "acc_pass"}
    for point in points.values():
        assert "error" not in point, point.get("error")
        assert not point["skipped"]
        assert point["variants"]["cpp"]["speedup_vs_baseline"] == 1.0
    counting = points["counting"]["variants"]
    assert counting["official_item_loop"]["time_scale"] == 10.0  # timed on 200 of 2,000 rows
    assert counting["cpp"]["time_scale"] == 1.0
    assert points["counting"]["derived"]["tables"][0]["title"] == "Input throughput"
    names = {r["name"] for r in points["meta_sampling"]["ratios"]}
    assert "official Python ClassAwareSampler / C++" in names


def test_step_benchmark_gpu_grid_and_variants():
    from benchmarks.bench_step import StepBenchmark
    from benchmarks.harness import Profile

    bench = StepBenchmark()
    gpu = {p["name"]: p for p in bench.grid(Profile(device="cuda"))}
    assert set(gpu) == {"r32_fp32", "r32_bf16", "r50_bf16"}
    assert bench.variants(gpu["r50_bf16"]) == [
        "official", "off", "driver", "exact", "exact_double_backward",
        "off_graph", "driver_graph", "exact_graph",
    ]
    assert bench.sequential(gpu["r50_bf16"])
    targets = {r.name: r.target for r in bench.ratios(gpu["r50_bf16"])}
    assert targets["exact: graph speed-up over eager"] == 1.1
    assert targets["exact cost over CE (graph)"] == 3.0
    assert targets["driver cost over CE (graph)"] == 1.05
    assert gpu["r50_bf16"]["tree"] == "imagenet_places"
    assert gpu["r32_fp32"]["tree"] == "cifar"
    r32 = {r.name: r.target for r in bench.ratios(gpu["r32_fp32"])}
    assert r32["exact graph speed-up over official-style"] == 5.0
    assert r32["exact: graph speed-up over eager"] == 3.0
    chosen = bench.grid(Profile(device="cuda", extra={"points": "r50_bf16", "flops": True}))
    assert [(p["name"], p["flops"]) for p in chosen] == [("r50_bf16", True)]
    assert [p["name"] for p in bench.grid(Profile())] == ["r32_fp32"]


def test_e2e_grid_selects_points_and_overrides():
    from benchmarks.bench_e2e import E2EBenchmark
    from benchmarks.harness import Profile

    grid = E2EBenchmark().grid(Profile(device="cuda", extra={"points": "r50_224", "cudnn_benchmark": True}))
    assert [(p["name"], p["model"], p["cudnn_benchmark"]) for p in grid] == [("r50_224", "resnet50", True)]
    assert [p["name"] for p in E2EBenchmark().grid(Profile())] == ["cifar_r32", "r50_tiny"]
    gpu = {p["name"]: p for p in E2EBenchmark().grid(Profile(device="cuda"))}
    assert set(gpu) == {"cifar_r32", "r50_224", "r152_224"}
    assert E2EBenchmark().variants(gpu["r50_224"]) == ["official", "official_bf16", "off", "driver", "exact"]
    assert E2EBenchmark().sequential(gpu["r50_224"])


def test_cli_bench_lists_benchmarks(capsys):
    from dnet_fast.cli import main

    # Both ``dnet-fast bench --list`` and the ``--`` form reach the runner.
    assert main(["bench", "--list"]) == 0
    assert "e2e" in capsys.readouterr().out
    assert main(["bench", "--", "--list"]) == 0
    assert "e2e" in capsys.readouterr().out


def test_places_lt_counts_fallback_profile(tmp_path):
    counts, source = places_lt_counts(tmp_path / "missing.txt")
    assert "fitted" in source
    assert (len(counts), counts.max(), counts.min()) == (365, 4980, 5)
    assert abs(int(counts.sum()) - 62_500) < 365  # rounding of 365 classes
    assert (np.diff(counts) <= 0).all()


def test_places_lt_counts_from_split_file(tmp_path):
    split = tmp_path / "train.txt"
    split.write_text("a.jpg 1\nb.jpg 1\nc.jpg 0\nd.jpg 1\ne.jpg 2\nf.jpg 2\n")
    counts, source = places_lt_counts(split)
    assert counts.tolist() == [3, 2, 1]
    assert source.startswith("train.txt (sha256 ")


def test_scaled_counts_keeps_every_class():
    counts = np.array([1000, 100, 10, 1])
    assert scaled_counts(counts, 111).tolist() == [100, 10, 1, 1]
    assert scaled_counts(counts, 100, classes=2).tolist() == [100, 1]


def test_official_style_dataset_items(tmp_path):
    labels = np.array([0, 1, 1])
    split = write_jpegs(tmp_path, labels, lambda i: textured_image(np.random.default_rng(i), 40, int(labels[i])))
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    train = OfficialStyleDataset(split, "imagenet", train=True, crop=16, mean=mean, std=std)
    x, y = train[2]
    assert x.shape == (3, 16, 16)
    assert x.dtype == torch.float32
    assert y == 1
    ev = OfficialStyleDataset(split, "imagenet", train=False, crop=16, mean=mean, std=std)
    assert ev[0][0].shape == (3, 16, 16)
    cifar = OfficialStyleDataset(split, "cifar", train=True, crop=40, mean=mean, std=std)
    assert cifar[0][0].shape == (3, 40, 40)
    assert decode_split(split).images.shape == (3, 40, 40, 3)


def test_timed_loop_counts_recorded_calls_only():
    seen = []
    loop = TimedLoop(lambda: len(seen), seen.append, iters=3)
    loop()  # warm-up: not recorded
    loop.recording = True
    loop()
    stats = loop.stats()
    assert seen == [0, 1, 2, 3, 4, 5]
    assert stats["iterations"] == 3
    assert 0.0 <= stats["data_wait_share_host"] <= 1.0
    assert "data_share_gpu" not in stats  # CPU: no CUDA events


def test_e2e_projection_and_cpu_targets():
    params = {"batch": 4, "meta_batch": 4, "calls": [0, 2, 1], "iters": 1, "eval_repeats": 1, "eval_images": 8}
    assert e2e_epoch.projected_point_s(params, 1.0) == pytest.approx(3 * (3 + 1 + 1 + 4.8) + 2 * 8 / 4 + 20)
    point = {"variants": {"off": {"metrics": {"data_share_gpu": 0.5}, "units_per_s": 10.0}}}
    gpu = {"device": "cuda", "crop": 224, "batch": 128, "precision": "bf16", "model": "resnet50"}
    targets = e2e_epoch._targets(gpu, point)
    assert [t["passed"] for t in targets] == [False, False, None]  # data share, off img/s, exact not measured
    assert e2e_epoch._targets({**gpu, "device": "cpu"}, point) == []


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


def test_swap_params_uses_new_tensors():
    model = nn.Sequential(nn.Linear(2, 1, bias=False))
    swap_params(model, {"0.weight": torch.zeros(1, 2)})
    assert model(torch.ones(1, 2)).item() == 0.0
    assert len(list(model.parameters())) == 0


@pytest.mark.parametrize("tree", official.TREES)
def test_official_loop_equals_driver_mode_step(tree):
    """SPEC §4.4: driver mode computes what the released code computes (its meta loss sends no gradient to θ;
    the real step uses the weights of the updated θ), in both official trees."""
    meta = pytest.importorskip("dnet_fast.meta")
    from dnet_fast.config import MetaConfig, TrainConfig
    from dnet_fast.losses import build_loss

    x, y, (xm, ym) = _batches()
    x, xm = x.float(), xm.float()
    s_ref, s_lib = _state(), _state()
    for s in (s_ref, s_lib):  # the official code keeps A as a float32 row (C:155)
        s.model.float(), s.diffnet.float()
        s.acc = s.acc.float()
    loop = official.build(tree, s_ref.model, lambda: _tiny_model().float(), s_ref.diffnet, s_ref.optimizer, s_ref.diff_optimizer,
                          s_ref.acc, xm, ym, meta_batch=4, data_parallel=False, epoch=1)
    loop.step(x, y)
    loop.close()
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
