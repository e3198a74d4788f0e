"""The ``e2e`` benchmark: training-loop images/s (loader + meta batches + step) of the fast path vs the naive one."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

from benchmarks.harness import BENCHMARKS, Benchmark, Profile, Ratio, SkipVariant
from benchmarks.naive import NaiveState, OfficialMetaLoader, OfficialStyleStep

__all__ = ["E2EBenchmark"]

#: CIFAR-100-LT-shaped synthetic data (ρ = 100, 500 head images, 25 val/meta images per class), ResNet-32.
FULL = {
    "model": "resnet32",
    "classes": 100,
    "image": 32,
    "max_count": 500,
    "batch": 128,
    "meta_batch": 100,
    "val_per_class": 25,
    "iters": 4,
    "workers": 2,
}
QUICK = {
    "model": "resnet20",
    "classes": 5,
    "image": 8,
    "max_count": 40,
    "batch": 8,
    "meta_batch": 5,
    "val_per_class": 2,
    "iters": 2,
    "workers": 0,
}
SEED = 0


def _cycle(batches: Callable[[int], Iterator[tuple[Tensor, Tensor]]]) -> Iterator[tuple[Tensor, Tensor]]:
    """Endless batches, epoch after epoch (a loader's iterator lives across timed calls, as in training)."""
    epoch = 0
    while True:
        yield from batches(epoch)
        epoch += 1


@BENCHMARKS.register("e2e")
class E2EBenchmark(Benchmark):
    """``iters`` training iterations per call, data loading and meta-batch draws included.

    Variants: ``official`` (torch DataLoader with per-image PIL transforms, official-style step and Python
    class-aware meta sampler) and the fast path (resident uint8 loader with batched augmentation, device meta set,
    eager ``off`` / ``driver`` / ``exact``). Per-epoch A_C evaluation is not included yet.
    """

    name = "e2e"
    description = "training loop images/s (loader + step), official-style vs fast path"
    baseline = "official"
    unit_name = "img"

    def grid(self, profile: Profile) -> list[dict[str, Any]]:
        """One point: CIFAR-100-LT-shaped, or tiny with ``--quick``."""
        return [{**(QUICK if profile.quick else FULL), "device": profile.device}]

    def variants(self, params: dict[str, Any]) -> list[str]:  # noqa: ARG002  (same variants everywhere)
        """Naive first."""
        return ["official", "off", "driver", "exact"]

    def ratios(self, params: dict[str, Any]) -> list[Ratio]:  # noqa: ARG002
        """Speed-ups of the fast path over the official-style loop."""
        return [
            Ratio("driver loop speed-up over official-style", "official", "driver", 2.5),
            Ratio("exact loop cost over off", "exact", "off", higher_is_better=False),
        ]

    def setup(self, params: dict[str, Any]) -> None:
        """Generates the synthetic long-tailed bundle once."""
        try:
            from dnet_fast.config import DataConfig
            from dnet_fast.data import DATASETS
        except ImportError as exc:
            msg = f"dnet_fast.data not importable: {exc}"
            raise SkipVariant(msg) from exc
        self.params, self.device = params, torch.device(params["device"])
        cfg = DataConfig(
            dataset="synthetic",
            num_classes=params["classes"],
            max_count=params["max_count"],
            imbalance=100.0,
            image_size=params["image"],
            val_per_class=params["val_per_class"],
            test_per_class=1,
        )
        self.bundle = DATASETS.get("synthetic")(cfg, SEED)
        self.units_per_call = params["batch"] * params["iters"]

    def teardown(self) -> None:
        """Drops the bundle."""
        self.bundle = None

    def _config(self, mode: str) -> Any:
        from dnet_fast.config import DataConfig, MetaConfig, ModelConfig, OptimConfig, RunConfig, TrainConfig

        p = self.params
        return TrainConfig(
            data=DataConfig(num_classes=p["classes"], workers=p["workers"]),
            model=ModelConfig(backbone=p["model"]),
            optim=OptimConfig(batch_size=p["batch"]),
            meta=MetaConfig(mode=mode, meta_batch=p["meta_batch"]),
            run=RunConfig(device=p["device"], seed=SEED),
        )

    def _loader(self, name: str) -> Iterator[tuple[Tensor, Tensor]]:
        from dnet_fast.data import LOADERS, LoaderSpec

        p = self.params
        spec = LoaderSpec.for_bundle(
            self.bundle, p["batch"], device=self.device, seed=SEED, workers=p["workers"], crop_size=p["image"]
        )
        return _cycle(LOADERS.get(name)(self.bundle.train, spec).batches)

    def _model(self) -> torch.nn.Module:
        from dnet_fast.models import build_model

        torch.manual_seed(SEED)
        return build_model(self._config("off").model, self.params["classes"]).to(self.device).train()

    def prepare(self, variant: str) -> Callable[[], object]:
        """Builds the loop of ``variant``; returns ``iters`` iterations."""
        return self._official() if variant == "official" else self._fast(variant)

    def _official(self) -> Callable[[], object]:
        from dnet_fast.data import MetaSet
        from dnet_fast.models import DifficultyNet

        p = self.params
        model = self._model()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=2e-4)
        diffnet = DifficultyNet(p["classes"], 128).to(self.device)
        adam = torch.optim.Adam(diffnet.parameters(), lr=1e-5, weight_decay=1e-4)
        acc = torch.full((p["classes"],), 0.5, device=self.device)
        state = NaiveState(model, diffnet, opt, adam, acc)
        meta = MetaSet(self.bundle.val, self.bundle, device=self.device, seed=SEED)
        step = OfficialStyleStep(
            state, self._model, OfficialMetaLoader(meta.images, meta.labels, p["meta_batch"])
        )
        batches = self._loader("naive")

        def run() -> None:
            for _ in range(p["iters"]):
                x, y = next(batches)
                step.step(x, y)

        return run

    def _fast(self, mode: str) -> Callable[[], object]:
        from dnet_fast.data import MetaSet
        from dnet_fast.losses import build_loss
        from dnet_fast.meta import build_meta_mode

        p, cfg = self.params, self._config(mode)
        model = self._model()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=2e-4)
        criterion = build_loss(cfg.loss, self.bundle.class_counts, cfg.optim.epochs).to(self.device)
        mm = build_meta_mode(cfg, model, criterion, opt, p["classes"])
        mm.set_class_accuracy(torch.full((p["classes"],), 0.5, device=self.device))
        meta = (
            MetaSet(self.bundle.val, self.bundle, device=self.device, seed=SEED)
            if mm.needs_meta_batch
            else None
        )
        batches, counter = self._loader("resident"), iter(range(1 << 62))

        def run() -> None:
            for _ in range(p["iters"]):
                x, y = next(batches)
                step = next(counter)
                mm.step(x, y, meta.batch(step, p["meta_batch"]) if meta is not None else None)

        return run
