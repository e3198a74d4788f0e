"""The ``stage2`` benchmark: one stage-2 epoch of dnet-fast against the official-style stage-2 loop, same work.

Official style (``CIFAR-LT/cifar_train_exaugment_stage2.py`` and ``CIFAR-LT/data/ClassAwareSampler.py`` of
hitachi-rd-cv/Difficulty_Net @ ``benchmarks.official.OFFICIAL_COMMIT``; ``S:n`` = line n of the script): a DataLoader
over per-image PIL transforms in worker processes, ordered by the Python ``ClassAwareSampler`` (4 per class visit;
its private ``random.Random`` here, seeded); per batch ``model.eval()`` (S:124), a blocking host-to-device copy, the
frozen backbone under ``no_grad`` (S:129), the classifier (fc, then the per-class scale), the loss read back with
``.item()`` (S:133), backward and SGD; per epoch a val pass with a host read per image (S:150-163,
``benchmarks.e2e_data.official_class_accuracy``). Its per-epoch test pass (SPEC §13 #5) is not charged: dnet-fast
evaluates test once per run.

dnet-fast: ``Stage2Trainer`` on the session ``build_stage2_session`` builds from a stage-1 run directory with the
``cifar100_lt_r32_ir100_stage2`` preset (LAS, frozen BatchNorm): class-balanced batches in the C++ order, the
resident loader's batched augmentation and the backbone under ``no_grad`` (``stage2``), or, without augmentation,
gathers from features computed once (``stage2_cached``; the cache is built in setup and reported as such); val on
val features computed once.

A timed call is ``batches`` train batches plus the same share of the epoch's val pass; ``time_scale`` reports every
variant as a whole epoch of the recipe (C·n_max samples), so the ratios compare epochs.
"""

from __future__ import annotations

import dataclasses
import random
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader, Sampler

from benchmarks.bench_engine import RandomCycleIter
from benchmarks.e2e_data import OfficialStyleDataset, official_class_accuracy
from benchmarks.harness import BENCHMARKS, Benchmark, Profile, Ratio

__all__ = ["CPU_POINTS", "QUICK_POINTS", "OfficialClassAwareSampler", "OfficialStage2Loop", "Stage2Benchmark"]

SEED = 0
PRESET = "cifar100_lt_r32_ir100_stage2"
_CIFAR = {"classes": 100, "max_count": 500, "imbalance": 100.0, "image": 32, "model": "resnet32", "width": 16,
          "val_per_class": 25, "batch": 128}
#: CIFAR-100-LT ρ = 100, ResNet-32: the official CIFAR stage-2 recipe (50,000 samples an epoch). ``calls`` caps
#: (warm-up, repeats, rounds); a smaller command-line value wins.
CPU_POINTS = ({"name": "cifar100_r32", **_CIFAR, "batches": 4, "workers": 2, "calls": [1, 3, 2]},)
QUICK_POINTS = (
    {"name": "quick", **_CIFAR, "classes": 5, "max_count": 40, "imbalance": 10.0, "image": 8, "model": "resnet20",
     "width": 4, "val_per_class": 4, "batch": 16, "batches": 2, "workers": 1, "calls": [0, 1, 1]},
)
VARIANTS = ("official", "stage2", "official_noaug", "stage2_cached")


# ----------------------------------------------------------------------------------------------------------
# The official pieces


class OfficialClassAwareSampler(Sampler[int]):
    """The official ``ClassAwareSampler`` (``num_samples_cls`` per class visit), with its generator loop.

    ``num_samples`` defaults to the code's max count × classes; the benchmark passes a larger value so that one
    iterator, and one start of the loader's workers, serves every timed call.
    """

    def __init__(self, labels: np.ndarray, num_samples_cls: int = 4, *, seed: int, num_samples: int | None = None):
        rng = random.Random(seed)  # the code uses the global, unseeded `random`
        classes = len(np.unique(labels))
        self.class_iter = RandomCycleIter(range(classes), rng)
        per_class: list[list[int]] = [[] for _ in range(classes)]
        for i, label in enumerate(labels.tolist()):
            per_class[int(label)].append(i)
        self.data_iter_list = [RandomCycleIter(x, rng) for x in per_class]
        self.num_samples = num_samples or max(len(x) for x in per_class) * classes
        self.num_samples_cls = num_samples_cls

    def __iter__(self) -> Iterator[int]:
        i = j = 0
        batch: tuple[int, ...] = ()
        while i < self.num_samples:
            if j >= self.num_samples_cls:
                j = 0
            if j == 0:
                batch = next(zip(*[self.data_iter_list[next(self.class_iter)]] * self.num_samples_cls, strict=True))
            yield batch[j]
            i, j = i + 1, j + 1

    def __len__(self) -> int:
        return self.num_samples


class _ArrayDataset(OfficialStyleDataset):
    """The official CIFAR datasets hold pixels in memory (``ToPILImage`` per item): no file decode."""

    def _image(self, i: int) -> Image.Image:
        return Image.fromarray(self.split.images[i].numpy(), "RGB")


class _DotProductClassifier(nn.Module):
    """The script's ``DotProduct_Classifier`` (S:39-50): fc, then ``x *= scales``; both train."""

    def __init__(self, fc: nn.Linear) -> None:
        super().__init__()
        self.fc = fc
        self.scales = nn.Parameter(torch.ones(fc.out_features, device=fc.weight.device))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x) * self.scales


class _Whole(nn.Module):
    """Backbone then classifier as one module, for the val pass's ``model(x)``."""

    def __init__(self, backbone: nn.Module, classifier: nn.Module) -> None:
        super().__init__()
        self.backbone, self.classifier = backbone, classifier

    def forward(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            feats = self.backbone.forward_features(x)
        return self.classifier(feats)


class OfficialStage2Loop:
    """The script's epoch: ``train`` over its class-aware loader, ``validate`` its val loader.

    Args:
        backbone: the stage-1 network (its ``fc`` seeds the classifier, S:84-85); frozen.
        criterion: per-sample loss (B,) (the script's LAS or CE with ``reduction='none'``).
        train_loader: batches on the host, as its DataLoader yields them.
        val_loader: the val batches (file order).
        num_classes: C.
        device: where the model runs.
    """

    def __init__(self, backbone: nn.Module, criterion: nn.Module, train_loader: DataLoader, val_loader: DataLoader,
                 num_classes: int, device: torch.device) -> None:
        self.backbone = backbone.requires_grad_(False)
        fc = nn.Linear(backbone.fc.in_features, num_classes).to(device)
        fc.load_state_dict(backbone.fc.state_dict())
        self.classifier = _DotProductClassifier(fc)
        self.optimizer = torch.optim.SGD(self.classifier.parameters(), lr=0.05, weight_decay=1e-4, momentum=0.9)
        self.criterion, self.device, self.num_classes = criterion.to(device), device, num_classes
        self.train_batches, self.val_loader = iter(train_loader), val_loader
        self.epoch_loss = 0.0

    def train(self, batches: int) -> None:
        """``batches`` iterations of S:122-137."""
        for _ in range(batches):
            x, y = next(self.train_batches)
            self.backbone.eval()
            x, y = x.to(self.device), y.to(self.device)  # blocking copies (S:125-126)
            self.optimizer.zero_grad()
            with torch.no_grad():
                feats = self.backbone.forward_features(x)
            loss = self.criterion(self.classifier(feats), y)
            self.epoch_loss += torch.sum(loss).item()  # sync point (S:133)
            torch.mean(loss).backward()
            self.optimizer.step()

    def validate(self) -> tuple[list[int], list[int]]:
        """The val pass of S:141-163: a host read per image."""
        whole = _Whole(self.backbone, self.classifier)
        return official_class_accuracy(whole, self.val_loader, self.num_classes, self.device, "cifar")


# ----------------------------------------------------------------------------------------------------------
# The benchmark


def _stage1_run(p: dict[str, Any], root: Path, device: str) -> Path:
    """A stage-1 run directory on the synthetic CIFAR-shaped set (randomly initialised weights: the cost of a
    stage-2 epoch does not depend on them)."""
    from dnet_fast.checkpoint import save_checkpoint
    from dnet_fast.config import DataConfig, ModelConfig, OptimConfig, RunConfig, TrainConfig, config_to_dict
    from dnet_fast.models import build_model

    run = root / "stage1"
    cfg = TrainConfig(
        data=DataConfig(dataset="synthetic", num_classes=p["classes"], max_count=p["max_count"],
                        imbalance=p["imbalance"], image_size=p["image"], val_per_class=p["val_per_class"],
                        test_per_class=1, augment="cifar"),
        model=ModelConfig(backbone=p["model"], width=p["width"]),
        optim=OptimConfig(epochs=1),
        run=RunConfig(seed=SEED, out_dir=str(run), device=device, progress=False, tensorboard=False),
    ).validate()
    torch.manual_seed(SEED)
    model = build_model(cfg.model, p["classes"])
    save_checkpoint(run / "last.pt", {"config": config_to_dict(cfg), "epoch": 1, "model": model.state_dict()})
    return run


@BENCHMARKS.register("stage2")
class Stage2Benchmark(Benchmark):
    """A stage-2 epoch (CIFAR-100-LT recipe, LAS): official-style loop vs dnet-fast, with and without augmentation.

    Variants: ``official`` and ``stage2`` (the stage-1 train transform; the same work), ``official_noaug`` and
    ``stage2_cached`` (no augmentation: dnet-fast trains on features cached once; the same work as each other).
    """

    name = "stage2"
    description = "stage-2 epoch: official-style loop vs dnet-fast (streamed backbone, cached features)"
    baseline = "official"

    def grid(self, profile: Profile) -> list[dict[str, Any]]:
        """CPU (and GPU): the CIFAR-100-LT point; quick: tiny shapes."""
        points = QUICK_POINTS if profile.quick else CPU_POINTS
        return [{**p, **profile.extra, "device": profile.device} for p in points]

    def profile_for(self, params: dict[str, Any], profile: Profile) -> Profile:
        """Caps warm-up, repeats and rounds at the point's ``calls`` (a smaller command-line value wins)."""
        w, r, n = params["calls"]
        return dataclasses.replace(profile, warmup=min(w, profile.warmup), repeats=min(r, profile.repeats),
                                   rounds=min(n, profile.rounds))

    def variants(self, params: dict[str, Any]) -> list[str]:  # noqa: ARG002
        """Both pairs of same-work variants, official first."""
        return list(VARIANTS)

    def ratios(self, params: dict[str, Any]) -> list[Ratio]:  # noqa: ARG002
        """The issue's target (same work, with augmentation) and the feature cache's ratios."""
        return [
            Ratio("stage-2 epoch speed-up over official-style (augmentation; same work)", "official", "stage2", 3.0),
            Ratio("cached-feature epoch speed-up over official-style, both without augmentation (same work)",
                  "official_noaug", "stage2_cached"),
            Ratio("cached-feature epoch (no augmentation) over official-style with augmentation", "official",
                  "stage2_cached"),
            Ratio("feature cache over the streamed dnet-fast epoch", "stage2", "stage2_cached"),
        ]

    def setup(self, params: dict[str, Any]) -> None:
        """Writes the stage-1 run and builds the data both loops read."""
        from dnet_fast.config import DataConfig
        from dnet_fast.data import DATASETS
        from dnet_fast.stage2.features import EPOCH_LENGTHS

        self.params, self.device = params, torch.device(params["device"])
        self._tmp = tempfile.TemporaryDirectory(prefix="bench_stage2_")
        self.root = Path(self._tmp.name)
        self.stage1 = _stage1_run(params, self.root, params["device"])
        data = DataConfig(dataset="synthetic", num_classes=params["classes"], max_count=params["max_count"],
                          imbalance=params["imbalance"], image_size=params["image"],
                          val_per_class=params["val_per_class"], test_per_class=1, augment="cifar")
        self.bundle = DATASETS.get("synthetic")(data, data.seed)
        self.full_batches = EPOCH_LENGTHS.get("classes_x_max")(self.bundle.class_counts, params["batch"]) // params[
            "batch"]
        self.units_per_call = self.full_batches * params["batch"]  # images of the epoch the times are scaled to
        self._live: dict[str, Any] = {}

    def teardown(self) -> None:
        """Drops the loops (their loader workers) and the temporary run directory."""
        self._live.clear()
        self._tmp.cleanup()

    def time_scale(self, variant: str) -> float:  # noqa: ARG002
        """Every call is ``batches`` of the epoch's ``full_batches`` (and that share of its val pass)."""
        return self.full_batches / self.params["batches"]

    def prepare(self, variant: str) -> Callable[[], object]:
        """Builds the variant (the feature cache and the loader workers start here) and runs it once."""
        fn = self._official(augment=variant == "official") if variant.startswith("official") else self._library(
            cached=variant == "stage2_cached")
        fn()
        return fn

    def _library(self, *, cached: bool) -> Callable[[], object]:
        from dnet_fast.stage2.train import Stage2Trainer, build_stage2_session, load_stage2_config

        p = self.params
        overrides = [f"stage2.batch_size={p['batch']}", f"stage2.augment={not cached}", "run.progress=false",
                     f"run.device={p['device']}", f"run.out_dir={self.root / 'stage2'}"]
        session = build_stage2_session(load_stage2_config(PRESET, self.stage1, overrides))
        trainer = Stage2Trainer(session)
        self._live["stage2_cached" if cached else "stage2"] = trainer
        epochs = iter(range(1 << 30))

        def call() -> object:
            trainer.train_epoch(next(epochs), max_batches=p["batches"])
            return trainer.validate()

        return call

    def _official(self, *, augment: bool) -> Callable[[], object]:
        from dnet_fast.models import build_model
        from dnet_fast.stage2.methods import STAGE2_METHODS
        from dnet_fast.stage2.train import load_stage2_config

        p, b, cuda = self.params, self.bundle, self.device.type == "cuda"
        cfg = load_stage2_config(PRESET, self.stage1, [f"run.out_dir={self.root / 'x'}"])
        backbone = build_model(cfg.model, b.num_classes).to(self.device)
        backbone.load_state_dict(torch.load(self.stage1 / "last.pt", weights_only=True)["model"])
        criterion = STAGE2_METHODS.get("las")().criterion(cfg.stage2, b.class_counts)
        kw = {"family": "cifar", "crop": p["image"], "mean": b.mean, "std": b.std}
        sampler = OfficialClassAwareSampler(b.train.labels, 4, seed=SEED, num_samples=1 << 40)
        train = DataLoader(_ArrayDataset(b.train, train=augment, **kw), batch_size=p["batch"], sampler=sampler,
                           num_workers=p["workers"], pin_memory=cuda)
        share = max(1, round(len(b.val) * p["batches"] / self.full_batches))  # this call's share of the val pass
        val_idx = np.linspace(0, len(b.val) - 1, share).round().astype(np.int64)
        val = DataLoader(_ArrayDataset(b.val.subset(val_idx), train=False, **kw), batch_size=100,
                         num_workers=p["workers"], pin_memory=cuda, persistent_workers=p["workers"] > 0)
        loop = OfficialStage2Loop(backbone, criterion, train, val, b.num_classes, self.device)
        self._live["official" if augment else "official_noaug"] = loop

        def call() -> object:
            loop.train(p["batches"])
            return loop.validate()

        return call

    def metrics(self, variant: str) -> dict[str, Any]:
        """The feature cache's build time (dnet-fast variants) and how the classifier saw the train set."""
        live = self._live.get(variant)
        if not variant.startswith("stage2") or live is None:
            return {}
        s = live.s
        out: dict[str, Any] = {"features": s.feature_source, "val_cache_s": s.val.seconds}
        if s.feature_source == "cached":
            out["train_cache_s"] = s.train.bank.seconds
        return out

    def derived(self, point: dict[str, Any]) -> dict[str, Any]:
        """Per-epoch seconds of each variant, and the cached variant with its cache amortised over the recipe's
        50 epochs."""
        rows = []
        for name, v in point["variants"].items():
            cache = v["metrics"].get("train_cache_s", 0.0) + v["metrics"].get("val_cache_s", 0.0)
            rows.append({"variant": f"`{name}`", "epoch s": v["best_median_s"], "cache build s": cache or None,
                         "epoch s, cache over 50 epochs": v["best_median_s"] + cache / 50})
        return {"tables": [{"title": f"Stage-2 epoch ({self.full_batches} batches of {self.params['batch']})",
                            "columns": list(rows[0]) if rows else [], "rows": rows}]}
