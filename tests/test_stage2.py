"""Decoupled stage 2: LAS, LWS and τ-norm against hand computations; frozen backbones, BatchNorm modes, τ chosen on
val, the class-balanced sampler, the cached features, presets, the command line and its errors."""

from __future__ import annotations

import dataclasses
import json
import math
import re

import numpy as np
import pytest
import torch
from torch import nn

from dnet_fast.checkpoint import load_checkpoint, save_checkpoint
from dnet_fast.cli import main
from dnet_fast.config import Stage2Config, load_config
from dnet_fast.data import LoaderSpec
from dnet_fast.data.loaders import epoch_indices, eval_batches, make_loader, num_batches
from dnet_fast.models import CosineClassifier, build_head
from dnet_fast.report import runs_table
from dnet_fast.sampling import epoch_order
from dnet_fast.stage2.features import BN_MODES, EPOCH_LENGTHS, CachedFeatures, StreamedFeatures
from dnet_fast.stage2.methods import (
    STAGE2_METHODS,
    LabelAwareSmoothing,
    Stage2Head,
    las_eps_for_ratio,
    las_epsilons,
    tau_grid,
    tau_norm_weight,
)
from dnet_fast.stage2.train import build_stage2_session, load_stage2_config, stage2_presets
from tests.conftest import TINY_OVERRIDES

# Two classifier epochs of 16-image batches on the tiny set (5 classes, head 40: 200 samples an epoch).
STAGE2_TINY = ("stage2.epochs=2", "stage2.batch_size=16", "run.progress=false", "run.tensorboard=false")


# ----------------------------------------------------------------------------------------------------------
# LAS, LWS, τ-norm against independent references


def _las_reference(logits: list[float], y: int, counts: list[int], eps_head: float, eps_tail: float) -> float:
    """The MiSLAS loss of one sample with plain floats: ε_y from the concave profile, log-softmax by hand."""
    n1, nk = max(counts), min(counts)
    eps = eps_head if n1 == nk else eps_tail + (eps_head - eps_tail) * math.sin(
        math.pi * (counts[y] - nk) / (2 * (n1 - nk)))
    top = max(logits)
    log_z = top + math.log(sum(math.exp(v - top) for v in logits))
    logp = [v - log_z for v in logits]
    return (1 - eps) * -logp[y] + eps * -sum(logp) / len(logp)


@pytest.mark.parametrize(
    ("counts", "eps_head", "eps_tail"),
    [([100, 10, 1], 0.4, 0.1), ([500, 5, 50, 120], 0.3, 0.0), ([50, 50], 0.2, 0.0), ([7, 3, 3], 0.0, 0.0)],
)
def test_las_loss_matches_hand_computation(counts, eps_head, eps_tail):
    g = torch.Generator().manual_seed(len(counts))
    logits = torch.randn(6, len(counts), generator=g, dtype=torch.float64) * 3
    target = torch.arange(6) % len(counts)
    loss = LabelAwareSmoothing(np.array(counts), eps_head, eps_tail)(logits, target)
    assert loss.shape == (6,)
    for i in range(6):
        expected = _las_reference(logits[i].tolist(), int(target[i]), counts, eps_head, eps_tail)
        assert float(loss[i]) == pytest.approx(expected, rel=1e-6)


def test_las_epsilons_are_concave_from_tail_to_head():
    eps = las_epsilons(np.array([100, 10, 1, 55]), 0.4, 0.1)
    assert eps[0] == pytest.approx(0.4)
    assert eps[2] == pytest.approx(0.1)
    assert eps[1] == pytest.approx(0.1 + 0.3 * math.sin(math.pi * 9 / 198))
    # concave: the midpoint count lies above the straight line between tail and head
    assert eps[3] > 0.1 + 0.3 * (55 - 1) / 99


@pytest.mark.parametrize(
    ("ratio", "expected"),
    [(200, (0.4, 0.0)), (100.5, (0.4, 0.0)), (100, (0.4, 0.1)), (51, (0.4, 0.1)), (50, (0.3, 0.0)),
     (21, (0.3, 0.0)), (20, (0.2, 0.0)), (10, (0.2, 0.0))],
)
def test_las_ratio_rule(ratio, expected):
    assert las_eps_for_ratio(ratio) == expected


def test_lws_logits_are_scale_times_logits():
    torch.manual_seed(0)
    fc = nn.Linear(4, 3).double()
    head = Stage2Head(fc, "linear")
    with torch.no_grad():
        head.scale.copy_(torch.tensor([0.5, 2.0, -1.0]))
    x = torch.randn(5, 4, dtype=torch.float64)
    z = x @ fc.weight.detach().T + fc.bias.detach()
    assert torch.equal(head(x).detach(), z * torch.tensor([0.5, 2.0, -1.0], dtype=torch.float64))


def test_tau_norm_weight_by_hand():
    w = torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, -2.0]], dtype=torch.float64)  # row norms 5, 1, 2
    for tau in (0.0, 0.5, 1.0, 2.0):
        expected = torch.stack([w[0] / 5**tau, w[1] / 1**tau, w[2] / 2**tau])
        assert torch.allclose(tau_norm_weight(w, tau), expected, rtol=0, atol=1e-15)
    assert torch.equal(tau_norm_weight(w, 0.0), w)


def test_tau_norm_linear_head():
    torch.manual_seed(1)
    fc = nn.Linear(6, 4).double()
    x = torch.randn(3, 6, dtype=torch.float64)
    assert torch.equal(Stage2Head(fc, "linear", tau=0.0)(x), Stage2Head(fc, "linear")(x))  # τ = 0: the trained head
    w, b = fc.weight.detach(), fc.bias.detach()
    expected = x @ (w / w.norm(dim=1, keepdim=True) ** 1.5).T + b  # the bias is kept
    assert torch.allclose(Stage2Head(fc, "linear", tau=1.5)(x).detach(), expected, rtol=1e-12)


def test_tau_norm_cosine_head_acts_on_the_raw_rows():
    torch.manual_seed(2)
    cos = CosineClassifier(6, 4, scale=30.0).double()
    with torch.no_grad():
        cos.weight.mul_(torch.tensor([[1.0], [3.0], [0.5], [2.0]], dtype=torch.float64))  # unequal row norms
    x = torch.randn(3, 6, dtype=torch.float64)
    # τ = 1 is the cosine classifier itself; rescaling W inside it would change nothing, whatever τ.
    assert torch.allclose(Stage2Head(cos, "cosine", tau=1.0)(x), cos(x), rtol=1e-12)
    xn, w = x / x.norm(dim=1, keepdim=True), cos.weight.detach()
    for tau in (0.0, 0.5, 2.0):
        expected = 30.0 * xn @ (w / w.norm(dim=1, keepdim=True) ** tau).T
        assert torch.allclose(Stage2Head(cos, "cosine", tau=tau)(x).detach(), expected, rtol=1e-12)


def test_tau_grid_is_41_points_on_0_2():
    grid = tau_grid(Stage2Config())
    assert len(grid) == 41
    assert grid[0] == 0.0
    assert grid[-1] == 2.0
    assert grid[1] == pytest.approx(0.05)


# ----------------------------------------------------------------------------------------------------------
# Sampler, epoch lengths, BatchNorm modes


def test_epoch_lengths():
    counts = np.array([40, 10, 0, 5])
    assert EPOCH_LENGTHS.get("classes_x_max")(counts, 16) == 3 * 40  # non-empty classes × the head count
    assert EPOCH_LENGTHS.get("dataset_plus_one")(counts, 16) == (math.ceil(55 / 16) + 1) * 16


def test_class_aware_loader_uses_the_cpp_order_with_its_epoch_length():
    labels = np.repeat(np.arange(4), [30, 9, 4, 1])
    spec = LoaderSpec(batch_size=8, seed=3, order="class_aware", per_visit=4, num_samples=96)
    order = epoch_indices(labels, spec, 2)
    assert np.array_equal(order, epoch_order(labels, "class_aware", seed=3, epoch=2, per_visit=4, num_samples=96))
    assert num_batches(len(labels), spec) == 12
    # 4 per class visit, each class visited equally often: the balanced classes of cRT.
    assert np.bincount(labels[order], minlength=4).tolist() == [24, 24, 24, 24]
    assert all(len(set(labels[order[i : i + 4]])) == 1 for i in range(0, 96, 4))


class _WithExtraBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
        self.block = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.BatchNorm2d(4))

    @property
    def extra_block(self) -> nn.Module:
        return self.block


def test_bn_modes_name_the_layers_that_shift():
    model = _WithExtraBlock()
    assert BN_MODES.get("frozen")(model) == []
    assert BN_MODES.get("shift")(model) == [model.body[1], model.block[1], model.block[2]]
    assert BN_MODES.get("shift_extra_block")(model) == [model.block[1], model.block[2]]
    with pytest.raises(ValueError, match="needs a backbone with an extra block"):
        BN_MODES.get("shift_extra_block")(nn.Sequential(nn.BatchNorm2d(2)))


def test_places_extra_block_is_layer4_2():
    from dnet_fast.models.resnet import places_resnet152

    with torch.device("meta"):
        model = places_resnet152(365)
    shifted = BN_MODES.get("shift_extra_block")(model)
    assert shifted == [model.layer4[2].bn1, model.layer4[2].bn2, model.layer4[2].bn3]


# ----------------------------------------------------------------------------------------------------------
# Presets


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("cifar100_lt_r32_ir100_stage2", {"epochs": 50, "lr": 0.05, "batch_size": 128, "weight_decay": 1e-4,
                                          "epoch_length": "classes_x_max", "las_eps_by_ratio": True,
                                          "las_bn": "frozen"}),
        ("imagenet_lt_r10_stage2", {"epochs": 10, "lr": 0.05, "batch_size": 128, "weight_decay": 2e-4,
                                    "epoch_length": "dataset_plus_one", "las_eps_head": 0.3, "las_eps_tail": 0.0,
                                    "las_bn": "shift"}),
        ("imagenet_lt_r50_stage2", {"epochs": 10, "lr": 0.05, "batch_size": 128, "weight_decay": 2e-4,
                                    "las_bn": "shift"}),
        ("places_lt_r152_stage2", {"epochs": 20, "lr": 0.1, "batch_size": 256, "weight_decay": 5e-4,
                                   "epoch_length": "dataset_plus_one", "las_eps_head": 0.4, "las_eps_tail": 0.1,
                                   "las_bn": "shift_extra_block"}),
        ("demo_stage2", {"epoch_length": "classes_x_max", "las_eps_by_ratio": True}),
    ],
)
def test_stage2_presets_hold_the_official_recipes(name, expected):
    s = load_config(name, ["stage2.source=runs/x"]).stage2
    assert {k: getattr(s, k) for k in expected} == expected
    assert (s.momentum, s.per_visit, s.schedule, s.augment) == (0.9, 4, "cosine", True)


def test_every_stage2_preset_is_tested():
    assert sorted(stage2_presets()) == sorted(
        ["cifar100_lt_r32_ir100_stage2", "imagenet_lt_r10_stage2", "imagenet_lt_r50_stage2",
         "places_lt_r152_stage2", "demo_stage2"])
    with pytest.raises(ValueError, match="--from RUN_DIR"):
        load_config("demo_stage2")  # a stage-2 preset alone is not a run


# ----------------------------------------------------------------------------------------------------------
# Runs on the tiny set


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    """A finished one-epoch Difficulty-Net (exact) run on the tiny set."""
    run = tmp_path_factory.mktemp("stage1") / "exact-seed0"
    assert main(["train", *TINY_OVERRIDES, "optim.epochs=1", f"run.out_dir={run}"]) == 0
    return run


def _stage2(source, method, *extra, out=None) -> dict:
    out = out or source / method
    argv = ["train", "demo_stage2", "--from", str(source), "--method", method, *STAGE2_TINY, f"run.out_dir={out}",
            *extra]
    assert main(argv) == 0
    return json.loads((out / "results.json").read_text())


def _backbone(state: dict) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if not k.startswith("fc.")}


def _assert_backbone_frozen(stage1_state: dict, stage2_state: dict, *, buffers_too: bool) -> None:
    params = {k for k, v in stage1_state.items() if "running_" not in k and "num_batches" not in k}
    for key, value in _backbone(stage1_state).items():
        same = torch.equal(value, stage2_state[key])
        if key in params or buffers_too:
            assert same, key


@pytest.mark.parametrize("method", ["crt", "lws", "tau_norm", "las"])
def test_each_method_freezes_the_backbone_and_trains_only_its_part(stage1, method, capsys):
    results = _stage2(stage1, method)
    out = stage1 / method
    s1 = load_checkpoint(stage1 / "last.pt")["model"]
    s2 = load_checkpoint(out / "last.pt")["model"]
    _assert_backbone_frozen(s1, s2, buffers_too=True)  # frozen BatchNorm: statistics bit-identical too
    head_kept = torch.equal(s2["fc.head.weight"], s1["fc.weight"]) and torch.equal(s2["fc.head.bias"], s1["fc.bias"])
    scale_kept = torch.equal(s2["fc.scale"], torch.ones(5))
    assert (head_kept, scale_kept) == {"crt": (False, True), "lws": (True, False), "tau_norm": (True, True),
                                       "las": (False, False)}[method]
    assert set(results["test"]) >= {"top1", "many", "medium", "few", "per_class"}
    assert results["stage1"]["test"]["top1"] == json.loads((stage1 / "results.json").read_text())["test"]["top1"]
    label = {"crt": "cRT", "lws": "LWS", "tau_norm": "τ-norm", "las": "LAS"}[method]
    assert main(["report", str(stage1), str(out)]) == 0
    table = capsys.readouterr().out
    assert f"| Difficulty-Net (exact) + CE → {label} | 1 |" in table
    assert "| Difficulty-Net (exact) + CE | 1 |" in table
    # the checkpoint evaluates through `dnet-fast eval` as its run reported
    assert main(["eval", str(out / "last.pt"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["top1"] == pytest.approx(results["test"]["top1"])


def test_crt_reinitialises_only_the_classifier(stage1):
    cfg = load_stage2_config("demo_stage2", stage1, ["stage2.method=crt", *STAGE2_TINY])
    s = build_stage2_session(cfg)
    s1 = load_checkpoint(stage1 / "last.pt")["model"]
    torch.manual_seed(cfg.run.seed)
    fresh = build_head(cfg.model.head, s.head.head.in_features, 5, cfg.model.head_scale)
    assert torch.equal(s.head.head.weight, fresh.weight)
    assert not torch.equal(s.head.head.weight, s1["fc.weight"])
    state = s.model.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in _backbone(s1).items())
    trainable = {n for n, p in s.model.named_parameters() if p.requires_grad}
    assert trainable == set()  # nothing trains until the method's optimiser enables its groups


def test_tau_is_chosen_on_val_and_recorded(stage1):
    results = _stage2(stage1, "tau_norm")
    sweep = results["stage2"]["tau_sweep"]
    assert [row["tau"] for row in sweep] == tau_grid(Stage2Config())
    best = max(range(len(sweep)), key=lambda i: (sweep[i]["val_top1"], -i))
    assert results["stage2"]["tau"] == sweep[best]["tau"]
    assert load_checkpoint(stage1 / "tau_norm" / "last.pt")["tau"] == sweep[best]["tau"]
    assert results["best_val"] == sweep[best]["val_top1"]
    # the sweep's numbers are val accuracies of the τ-normalised head (recomputed here on the val split)
    s = build_stage2_session(load_stage2_config("demo_stage2", stage1, ["stage2.method=tau_norm", *STAGE2_TINY,
                                                                        f"run.out_dir={stage1 / 'x'}"]))
    for row in (sweep[0], sweep[-1]):
        s.head.tau = row["tau"]
        acc = s.head(s.val.features).argmax(1) == s.val.labels
        per_class = [float(acc[s.val.labels == c].float().mean()) for c in range(5)]
        assert np.mean(per_class) == pytest.approx(row["val_top1"])


def test_shift_bn_moves_only_statistics(stage1):
    out = stage1 / "las-shift"
    results = _stage2(stage1, "las", "stage2.las_bn=shift", out=out)
    assert results["stage2"]["bn"] == "shift"
    assert results["stage2"]["features"] == "streamed"
    s1 = load_checkpoint(stage1 / "last.pt")["model"]
    s2 = load_checkpoint(out / "last.pt")["model"]
    _assert_backbone_frozen(s1, s2, buffers_too=False)  # every weight and bias bit-identical
    moved = [k for k in _backbone(s1) if "running_mean" in k and not torch.equal(s1[k], s2[k])]
    assert len(moved) == sum("running_mean" in k for k in s1)  # every BatchNorm layer re-estimated
    steps = results["stage2"]["batches_per_epoch"] * 2
    key = next(k for k in s1 if k.endswith("num_batches_tracked"))
    assert int(s2[key]) == int(s1[key]) + steps


def test_cached_features_equal_the_streamed_backbone(stage1):
    cfg = load_stage2_config("demo_stage2", stage1, ["stage2.method=lws", "stage2.augment=false", *STAGE2_TINY,
                                                     f"run.out_dir={stage1 / 'x'}"])
    s = build_stage2_session(cfg)
    assert isinstance(s.train, CachedFeatures)
    loader = make_loader("resident", s.bundle.train, s.train.spec, s.bundle)
    streamed = StreamedFeatures(loader, s.model, cfg)
    s.model.eval()
    for (fa, ya), (fb, yb) in zip(s.train.batches(1), streamed.batches(1), strict=True):
        assert torch.equal(ya, yb)
        assert torch.allclose(fa, fb, rtol=1e-5, atol=1e-6)


def test_augment_off_trains_on_cached_features(stage1):
    results = _stage2(stage1, "crt", "stage2.augment=false", out=stage1 / "crt-cached")
    assert results["stage2"]["features"] == "cached"
    assert results["stage2"]["epoch_samples"] == 192  # 12 batches of 16 from C·n_max = 200


def test_val_selection_picks_the_best_val_epoch(stage1):
    out = stage1 / "lws-val"
    results = _stage2(stage1, "lws", "run.select=val", "stage2.epochs=3", out=out)
    epochs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    val = [r["val_top1"] for r in epochs if r["kind"] == "epoch"]
    assert results["best_epoch"] == int(np.argmax(val))
    assert load_checkpoint(out / "best.pt")["epoch"] == results["best_epoch"] + 1
    assert results["selected"] == f"best val (epoch {results['best_epoch']})"


def test_report_groups_stage2_seeds_under_their_stage1_method(tmp_path):
    for seed, top1 in enumerate([0.4, 0.6]):
        run = tmp_path / f"exact-seed{seed}" / "las"
        run.mkdir(parents=True)
        cfg = {"meta": {"mode": "exact"}, "loss": {"name": "ce"}, "run": {"seed": seed},
               "stage2": {"method": "las", "source": str(tmp_path / f"exact-seed{seed}")}}
        test = {"top1": top1, "many": 0.9, "medium": 0.5, "few": 0.1}
        (run / "results.json").write_text(json.dumps({"config": cfg, "stage2": {"label": "LAS"}, "test": test}))
    table = runs_table([str(tmp_path / f"exact-seed{s}" / "las") for s in (0, 1)]).splitlines()
    assert table[2].startswith("| Difficulty-Net (exact) + CE → LAS | 2 | 50.00 ± 14.14 |")


# ----------------------------------------------------------------------------------------------------------
# Bad input: one clear line, non-zero exit, nothing written


def _fails(argv, capsys, pattern, *, absent) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert re.search(pattern, err[0]), err[0]
    assert not absent.exists()


def test_bad_from_directories(stage1, tmp_path, capsys):
    out = tmp_path / "out"
    base = ["train", "demo_stage2", "--method", "crt", "--out", str(out)]
    _fails([*base, "--from", str(tmp_path / "nope")], capsys, r"not a stage-1 run directory \(no last\.pt\)",
           absent=out)
    bad = tmp_path / "badcfg"
    bad.mkdir()
    state = load_checkpoint(stage1 / "last.pt")
    save_checkpoint(bad / "last.pt", {**state, "config": ["not", "a", "mapping"]})
    _fails([*base, "--from", str(bad)], capsys, r"not a mapping", absent=out)
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    save_checkpoint(unfinished / "last.pt", {**state, "epoch": 0})
    _fails([*base, "--from", str(unfinished)], capsys, r"stopped after 0 of 1 epochs", absent=out)


def test_bad_methods_presets_and_overrides(stage1, tmp_path, capsys):
    out = tmp_path / "out"
    base = ["train", "--from", str(stage1), "--out", str(out)]
    _fails([*base, "demo_stage2", "--method", "nope"], capsys, r"stage2\.method.*valid: .*crt.*las", absent=out)
    _fails([*base, "demo"], capsys, r"demo is not a stage-2 preset .*demo_stage2", absent=out)
    _fails([*base, "demo_stage2", "--backbone", "resnet32"], capsys, r"model\.backbone .*reads it from the checkpoint",
           absent=out)
    _fails([*base], capsys, r"stage 2 needs a method", absent=out)
    _fails([*base, "demo_stage2", "stage2.las_bn=shift_extra_block"], capsys, r"needs a backbone with an extra block",
           absent=out)
    _fails(["train", "demo_stage2", "--out", str(out)], capsys, r"stage2\.source.*--from RUN_DIR", absent=out)
    _fails([*base, "demo_stage2", "--resume"], capsys, r"--resume is for stage-1 runs", absent=out)
    before = {p.name: p.stat().st_mtime_ns for p in stage1.iterdir()}
    _fails(["train", "demo_stage2", "--from", str(stage1), "--out", str(stage1)], capsys, r"is the stage-1 run",
           absent=out)
    assert {p.name: p.stat().st_mtime_ns for p in stage1.iterdir()} == before


def test_a_stage2_run_is_not_a_stage1_source(stage1, tmp_path, capsys):
    run = tmp_path / "lws"
    run.mkdir()
    state = load_checkpoint(stage1 / "last.pt")
    config = {**state["config"], "stage2": {**state["config"]["stage2"], "method": "lws", "source": str(stage1)}}
    save_checkpoint(run / "last.pt", {**state, "config": config})
    out = tmp_path / "again"
    _fails(["train", "demo_stage2", "--from", str(run), "--method", "crt", "--out", str(out)], capsys,
           r"a stage-2 run \(lws\); pass the stage-1 run it came from", absent=out)


def test_method_registry_contract():
    assert STAGE2_METHODS.names() == ["crt", "las", "lws", "tau_norm"]
    head = Stage2Head(nn.Linear(3, 2), "linear")
    for name in STAGE2_METHODS:
        method = STAGE2_METHODS.get(name)()
        groups = method.groups(head, Stage2Config())
        assert bool(groups) == method.trains
        assert method.label
        assert method.bn(dataclasses.replace(Stage2Config(), las_bn="shift")) == ("shift" if name == "las" else "frozen")


def test_eval_batches_feed_the_cache_in_split_order(stage1):
    cfg = load_stage2_config("demo_stage2", stage1, ["stage2.method=tau_norm", *STAGE2_TINY,
                                                     f"run.out_dir={stage1 / 'x'}"])
    s = build_stage2_session(cfg)
    labels = torch.cat([y for _, y in eval_batches(s.bundle.val, s.bundle, 7, "cpu")])
    assert torch.equal(s.val.labels, labels)


# ----------------------------------------------------------------------------------------------------------
# The stage2 benchmark


def _released_class_aware_order(labels: np.ndarray, n: int, k: int) -> list[int]:
    """The released ``ClassAwareSampler`` (CIFAR-LT/data/ClassAwareSampler.py) verbatim in behaviour: one global
    ``random`` stream shared by the class cycle and the per-class cycles."""
    import random

    class Cycle:
        def __init__(self, data):
            self.data_list, self.i = list(data), len(data) - 1

        def __iter__(self):
            return self

        def __next__(self):
            self.i += 1
            if self.i == len(self.data_list):
                self.i = 0
                random.shuffle(self.data_list)
            return self.data_list[self.i]

    classes = len(np.unique(labels))
    cls_iter = Cycle(range(classes))
    data_iters = [Cycle([i for i, y in enumerate(labels) if y == c]) for c in range(classes)]
    out, i, j, temp = [], 0, 0, ()
    while i < n:
        if j >= k:
            j = 0
        if j == 0:
            temp = next(zip(*[data_iters[next(cls_iter)]] * k, strict=False))
        out.append(temp[j])
        i, j = i + 1, j + 1
    return out


def test_official_class_aware_sampler_is_the_released_one():
    import random

    from benchmarks.bench_stage2 import OfficialClassAwareSampler

    labels = np.repeat(np.arange(5), [17, 9, 4, 2, 1])
    state = random.getstate()
    try:
        random.seed(7)
        expected = _released_class_aware_order(labels, 5 * 17, 4)
    finally:
        random.setstate(state)
    sampler = OfficialClassAwareSampler(labels, 4, seed=7)
    assert len(sampler) == 5 * 17  # max count × classes
    assert list(sampler) == expected


def test_stage2_benchmark_quick_smoke(tmp_path):
    from benchmarks import runner

    argv = ["--quick", "--cpu", "--threads", "1", "--repeats", "1", "--warmup", "0", "--only", "stage2"]
    assert runner.main([*argv, "--out", str(tmp_path)]) == 0
    payload = json.loads((tmp_path / "results.json").read_text())
    (point,) = payload["benchmarks"][0]["points"]
    assert sorted(point["variants"]) == sorted(["official", "stage2", "official_noaug", "stage2_cached"])
    assert point["variants"]["stage2_cached"]["metrics"]["features"] == "cached"
    assert point["variants"]["stage2"]["metrics"]["features"] == "streamed"
    assert point["variants"]["stage2"]["time_scale"] == 6.0  # 2 of the epoch's 12 batches per call
    target = point["ratios"][0]
    assert (target["numerator"], target["denominator"], target["target"]) == ("official", "stage2", 3.0)


def test_overrides_may_follow_the_flags(monkeypatch):
    import dnet_fast.cli as cli

    seen = {}
    monkeypatch.setattr(cli, "_train_stage2", lambda args: seen.setdefault("args", args) and 0)
    assert main(["train", "demo_stage2", "--from", "runs/x", "--method", "las", "stage2.epochs=3", "run.seed=1"]) == 0
    assert seen["args"].overrides == ["stage2.epochs=3", "run.seed=1"]
    assert seen["args"].preset == "demo_stage2"
    with pytest.raises(SystemExit):
        main(["train", "demo_stage2", "--from", "runs/x", "--bogus"])
