"""The ``e2e`` benchmark: whole training loops (data, meta batches, step) of dnet-fast against the official-style loop."""

from __future__ import annotations

import dataclasses
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from benchmarks import e2e_epoch, official
from benchmarks.e2e_data import (
    OfficialStyleDataset,
    build_sources,
    fast_bundle,
    official_class_accuracy,
    official_eval_loader,
    official_train_loader,
)
from benchmarks.harness import BENCHMARKS, Benchmark, Profile, Ratio, SkipVariant, timeit
from benchmarks.loopstats import GpuUtilSampler, TimedLoop, endless_batches

__all__ = ["CPU_POINTS", "GPU_POINTS", "QUICK_POINTS", "E2EBenchmark"]

SEED = 0
#: The official recipes of each family (SPEC §6.1, §6.3); both loops run the same ops (the fast one batched).
RECIPES = {"cifar": {"autoaugment": "cifar10", "cutout": 16}, "imagenet": {"color_jitter": 0.4}}
_CIFAR = {
    "family": "cifar", "model": "resnet32", "width": 16, "classes": 100, "image": 32, "crop": 32,
    "max_count": 500, "imbalance": 100.0, "meta_per_class": 25, "batch": 128, "meta_batch": 100,
    "precision": "fp32", "channels_last": False, "diffnet_hidden": 128, "diffnet_bias": False, "diffnet_lr": 1e-5,
}
_PLACES = {
    "family": "imagenet", "classes": 365, "image": 256, "crop": 224, "meta_per_class": 2, "batch": 128,
    "meta_batch": 100, "precision": "bf16", "channels_last": True, "diffnet_hidden": 512, "diffnet_bias": True,
    "diffnet_lr": 1e-3, "width": 16,
}
#: ``calls`` = (warm-up, repeats, rounds) caps per point; a smaller command-line value wins.
CPU_POINTS = (
    {"name": "cifar_r32", **_CIFAR, "iters": 2, "workers": 2, "eval_images": 512, "eval_repeats": 3,
     "calls": [1, 3, 2]},
    {"name": "r50_tiny", **_PLACES, "model": "resnet50", "precision": "fp32", "channels_last": False,
     "train_images": 365, "meta_per_class": 1, "batch": 4, "meta_batch": 4, "iters": 1, "workers": 2,
     "eval_images": 8, "eval_repeats": 1, "calls": [0, 2, 1], "max_point_s": 120},
)
GPU_POINTS = (
    {"name": "cifar_r32", **_CIFAR, "iters": 20, "workers": 8, "eval_images": 2500, "eval_repeats": 3,
     "calls": [1, 3, 1]},
    {"name": "r50_224", **_PLACES, "model": "resnet50", "train_images": 2560, "iters": 8, "workers": 12,
     "eval_images": 730, "eval_repeats": 2, "calls": [1, 3, 1]},
    {"name": "r152_224", **_PLACES, "model": "resnet152", "train_images": 2560, "iters": 6, "workers": 12,
     "eval_images": 730, "eval_repeats": 2, "calls": [1, 3, 1]},
)
QUICK_POINTS = (
    {"name": "cifar_quick", **_CIFAR, "model": "resnet20", "width": 4, "classes": 5, "image": 8, "crop": 8,
     "max_count": 40, "imbalance": 10.0, "meta_per_class": 2, "batch": 8, "meta_batch": 5, "iters": 2,
     "workers": 1, "diffnet_hidden": 16, "eval_images": 8, "eval_repeats": 1, "calls": [1, 2, 1]},
    {"name": "places_quick", **_PLACES, "model": "resnet10", "classes": 6, "image": 40, "crop": 32,
     "train_images": 48, "meta_per_class": 1, "batch": 4, "meta_batch": 6, "iters": 1, "workers": 1,
     "precision": "fp32", "channels_last": False, "diffnet_hidden": 16, "eval_images": 6, "eval_repeats": 1,
     "calls": [1, 2, 1]},
)
FAST_MODES = ("off", "driver", "exact")


@dataclasses.dataclass
class _Live:
    """A prepared variant: its loop and what must be closed or reported with it."""

    loop: TimedLoop
    extra: dict[str, Any]
    close: list[Callable[[], object]]


@BENCHMARKS.register("e2e")
class E2EBenchmark(Benchmark):
    """``iters`` whole training iterations per call: loader, meta-batch draw, step; per-epoch A_C eval measured
    apart and added in the per-epoch extrapolation.

    Variants: ``official`` (the released code's iteration of the point's tree, ``benchmarks/official.py``: CIFAR's
    fresh model copy with a second-order virtual step, or ImageNet/Places' persistent pseudo model; its shuffled
    meta loader over the val set, its host syncs and input copies; fed by a DataLoader that PIL-decodes JPEG files
    and transforms each image in worker processes with the official recipe (``RECIPES``: AutoAugment + Cutout for
    CIFAR, ColorJitter for Places; reflect padding as the code has it); fp32 as released), ``official_bf16``
    (the same under bf16 autocast; GPU bf16 points) and the fast path ``off`` / ``driver`` / ``exact`` (resident
    uint8 loader with the same recipe batched, device meta set, C++ meta sampler, ``TrainStep``: CUDA graph on
    GPU, eager on CPU).
    """

    name = "e2e"
    description = "training loop images/s (loader + meta batch + step), official-style vs dnet-fast"
    baseline = "official"
    unit_name = "img"

    def __init__(self) -> None:
        self._live: dict[str, _Live] = {}
        self._tmp: tempfile.TemporaryDirectory | None = None

    # -- grid -------------------------------------------------------------------------------------------

    def grid(self, profile: Profile) -> list[dict[str, Any]]:
        """Quick: tiny CIFAR and Places shapes; CPU: CIFAR ResNet-32 and a tiny ResNet-50; GPU: CIFAR ResNet-32,
        ResNet-50 and ResNet-152 at 224 px. ``--set points=a,b`` selects points, other ``--set`` keys override."""
        points = QUICK_POINTS if profile.quick else GPU_POINTS if profile.device == "cuda" else CPU_POINTS
        extra = dict(profile.extra)
        chosen = extra.pop("points", None)
        names = str(chosen).split(",") if chosen else [p["name"] for p in points]
        return [{**p, **extra, "device": profile.device} for p in points if p["name"] in names]

    def profile_for(self, params: dict[str, Any], profile: Profile) -> Profile:
        """The point's ``calls`` caps applied to the profile (a smaller command-line value wins)."""
        w, r, n = params["calls"]
        return dataclasses.replace(
            profile, warmup=min(profile.warmup, w), repeats=min(profile.repeats, r), rounds=min(profile.rounds, n)
        )

    def sequential(self, params: dict[str, Any]) -> bool:
        """One variant at a time on CUDA (several captured large models do not fit together); interleaved on
        CPU so that the shared machine's load drift hits every variant alike."""
        return params["device"] == "cuda"

    def variants(self, params: dict[str, Any]) -> list[str]:
        """The official-style loop first (and its bf16 twin on GPU bf16 points), then the fast modes."""
        return ["official", *(["official_bf16"] if self._bf16(params) else []), *FAST_MODES]

    def ratios(self, params: dict[str, Any]) -> list[Ratio]:
        """Fast vs official-style (issue 6: the fast loop must beat the naive loop), and exact vs off."""
        out = [
            Ratio("off e2e speed-up over official-style", "official", "off"),
            Ratio("driver e2e speed-up over official-style (issue 6: > 1)", "official", "driver", 1.0),
            Ratio("exact e2e speed-up over official-style", "official", "exact"),
            Ratio("exact e2e cost over off", "exact", "off", higher_is_better=False),
        ]
        if self._bf16(params):
            out += [Ratio(f"{m} e2e speed-up over official-style bf16", "official_bf16", m) for m in FAST_MODES]
        return out

    @staticmethod
    def _bf16(params: dict[str, Any]) -> bool:
        return params["precision"] == "bf16" and params["device"] == "cuda"

    # -- shared state -----------------------------------------------------------------------------------

    def setup(self, params: dict[str, Any]) -> None:
        """Projects the point's run time (``max_point_s``), writes the JPEG sources, builds the resident train
        set and the device meta set shared by all variants, and measures the A_C evaluation costs."""
        try:
            from dnet_fast.data import MetaSet
            from dnet_fast.data.loaders import ResidentLoader
        except ImportError as exc:
            msg = f"dnet_fast.data not importable: {exc}"
            raise SkipVariant(msg) from exc
        self.params, self.device = params, torch.device(params["device"])
        self.cuda = self.device.type == "cuda"
        self._check_budget()
        self._cuda_settings()
        self._tmp = tempfile.TemporaryDirectory(prefix="bench_e2e_")
        t0 = time.perf_counter()
        workers = max(1, _workers(params))
        self.files, source = build_sources(params, Path(self._tmp.name), workers, SEED)
        self.notes["sources"] = f"{source}; written in {time.perf_counter() - t0:.1f} s"
        t0 = time.perf_counter()
        self.bundle = fast_bundle(self.files, workers)  # CIFAR: decodes the JPEGs into memory once
        self.resident = ResidentLoader(self.bundle.train, self._spec())
        self.notes["resident"] = (
            f"train set decoded once into device memory in {time.perf_counter() - t0:.1f} s "
            f"({self.resident.images.numel() / 2**20:.0f} MiB uint8); not part of any timed call"
        )
        self.metaset = MetaSet(
            self.bundle.val, self.bundle, device=self.device, seed=SEED, crop_size=params["crop"]
        )
        c = params["classes"]
        self.acc = torch.linspace(0.9, 0.05, c, device=self.device)  # a fixed, long-tailed A for the epoch
        self.units_per_call = params["batch"] * params["iters"]
        self.eval_costs = self._measure_eval()
        where = "in-memory val split" if params["family"] == "cifar" else "val files, decoded every pass (workers=0)"
        self.notes["A_C"] = f"dnet-fast's engine A_C pass reads the {where}, as `fit` does for this kind of dataset"

    def _check_budget(self) -> None:
        """Skips the point when one measured CE step projects its whole run past ``max_point_s``."""
        limit = self.params.get("max_point_s")
        if not limit:
            return
        p = self.params
        model = self._model(self._config("off").model)
        x = torch.randn(p["batch"], 3, p["crop"], p["crop"], device=self.device)
        y = torch.randint(0, p["classes"], (p["batch"],), device=self.device)
        times = []
        for _ in range(2):  # the first call pays one-time initialisation; the second is closer to steady state
            t0 = time.perf_counter()
            nn.functional.cross_entropy(model(x), y).backward()
            times.append(time.perf_counter() - t0)
        ce = min(times)
        projected = e2e_epoch.projected_point_s(p, ce)
        if projected > limit:
            msg = (
                f"projected {projected:.0f} s > {limit} s budget for this point (one CE step at batch "
                f"{p['batch']}, {p['crop']} px measured {ce:.2f} s)"
            )
            raise SkipVariant(msg)
        self.notes["budget"] = f"projected {projected:.0f} s ≤ {limit} s from a {ce:.2f} s CE step"

    def _cuda_settings(self) -> None:
        if not self.cuda:
            return
        cudnn = bool(self.params.get("cudnn_benchmark", False))
        torch.backends.cudnn.benchmark = cudnn
        self.notes["cuda"] = (
            f"cudnn.benchmark={cudnn} (torch default; dnet-fast's engine leaves it unset), "
            f"cudnn.allow_tf32={torch.backends.cudnn.allow_tf32}, "
            f"matmul.allow_tf32={torch.backends.cuda.matmul.allow_tf32}"
        )

    def _spec(self) -> Any:
        from dnet_fast.data import LoaderSpec

        p = self.params
        return LoaderSpec.for_bundle(
            self.bundle, p["batch"], device=self.device, seed=SEED, workers=_workers(p), crop_size=p["crop"],
            recipe=self._recipe(),
        )

    def _recipe(self) -> Any:
        from dnet_fast.data import Recipe

        return Recipe(**RECIPES[self.params["family"]])

    def teardown(self) -> None:
        """Closes every live variant and deletes the JPEG files."""
        for name in list(self._live):
            self.release(name)
        self.files = self.bundle = self.resident = self.metaset = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    # -- construction -----------------------------------------------------------------------------------

    def _config(self, mode: str) -> Any:
        from dnet_fast.config import (
            DataConfig,
            DiffNetConfig,
            MetaConfig,
            ModelConfig,
            OptimConfig,
            RunConfig,
            TrainConfig,
        )

        p = self.params
        return TrainConfig(
            data=DataConfig(num_classes=p["classes"], workers=_workers(p), crop_size=p["crop"]),
            model=ModelConfig(backbone=p["model"], width=p["width"], channels_last=p["channels_last"]),
            optim=OptimConfig(batch_size=p["batch"]),
            diffnet=DiffNetConfig(hidden=p["diffnet_hidden"], bias=p["diffnet_bias"], lr=p["diffnet_lr"]),
            meta=MetaConfig(mode=mode, meta_batch=p["meta_batch"]),
            run=RunConfig(device=p["device"], precision=p["precision"], seed=SEED, progress=False,
                          tensorboard=False),
        ).validate()

    def _model(self, cfg: Any, *, seed: int | None = SEED) -> nn.Module:
        from dnet_fast.models import build_model

        if seed is not None:
            torch.manual_seed(seed)
        return build_model(cfg, self.params["classes"]).to(self.device).train()

    def _official_model_cfg(self) -> Any:
        """The released code's model: no channels_last (it never sets a memory format)."""
        return dataclasses.replace(self._config("off").model, channels_last=False)

    def prepare(self, variant: str) -> Callable[[], object]:
        """Builds the loop of ``variant`` and runs one untimed iteration (graph capture on CUDA)."""
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        live = self._official(variant) if variant.startswith("official") else self._fast(variant)
        self._live[variant] = live
        t0 = time.perf_counter()
        live.loop()  # recording is off: this iteration warms up (and captures) without being counted
        if self.cuda:
            torch.cuda.synchronize(self.device)  # sync point: the first iteration's time is reported apart
        live.extra["first_iter_s"] = time.perf_counter() - t0
        return live.loop

    def _sampler(self) -> GpuUtilSampler | None:
        return GpuUtilSampler(self.device.index or 0) if self.cuda else None

    def _tree(self) -> str:
        """The official tree this point's family follows."""
        return "cifar" if self.params["family"] == "cifar" else "imagenet_places"

    def _official(self, variant: str) -> _Live:
        from dnet_fast.models import DifficultyNet, build_model

        p, dev = self.params, self.device
        model = self._model(self._official_model_cfg())
        torch.manual_seed(SEED + 1)
        diffnet = DifficultyNet(p["classes"], p["diffnet_hidden"], bias=p["diffnet_bias"]).to(dev)
        main, adam = official.official_optimizers(self._tree(), model, diffnet)
        loop = official.build(
            self._tree(), model, lambda: build_model(self._official_model_cfg(), p["classes"]), diffnet, main, adam,
            self.acc, self.metaset.images.cpu(), self.metaset.labels.cpu(), meta_batch=p["meta_batch"], seed=SEED,
        )
        ds = OfficialStyleDataset(self.files.train, p["family"], train=True, crop=p["crop"],
                                  mean=self.bundle.mean, std=self.bundle.std, recipe=self._recipe())
        loader = official_train_loader(ds, p["batch"], _workers(p), cuda=self.cuda, samples=p["batch"] * 10**6)
        t0 = time.perf_counter()
        it = iter(loader)
        first = [next(it)]  # worker start + first batch: paid again at every loader start (not persistent)
        start_s = time.perf_counter() - t0

        def fetch() -> tuple[Tensor, Tensor]:
            return first.pop() if first else next(it)  # host batches: the loop copies them as the code does

        bf16 = variant == "official_bf16"

        def train(batch: tuple[Tensor, Tensor]) -> None:
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
                loop.step(*batch)

        sampler = self._sampler()
        timed = TimedLoop(fetch, train, p["iters"], cuda=self.cuda, sampler=sampler)
        extra = {"loader_start_s": start_s, "precision": "bf16 autocast" if bf16 else "fp32", "graph": False,
                 "tree": self._tree()}
        closers = [*([sampler.close] if sampler else []), getattr(it, "_shutdown_workers", lambda: None), loop.close]
        return _Live(timed, extra, closers)

    def _fast(self, mode: str) -> _Live:
        from dnet_fast.stack import build_stack

        p = self.params
        stack = build_stack(self._config(mode), self.bundle.class_counts, self.device)
        mm, step = stack.meta, stack.step
        mm.set_class_accuracy(self.acc)
        batches, counter = endless_batches(self.resident.batches), iter(range(1 << 62))

        def fetch() -> tuple[Tensor, Tensor, tuple[Tensor, Tensor] | None]:
            x, y = next(batches)
            i = next(counter)
            return x, y, self.metaset.batch(i, p["meta_batch"]) if mm.needs_meta_batch else None

        sampler = self._sampler()
        loop = TimedLoop(fetch, lambda b: step.step(*b), p["iters"], cuda=self.cuda, sampler=sampler)
        extra = {"precision": p["precision"] if self.cuda else "fp32", "graph": step.graph, "_step": step}
        if getattr(mm, "grad_fallback_reason", None):
            self.notes[mode] = f"meta.grad=jvp fell back to double_backward: {mm.grad_fallback_reason}"
        return _Live(loop, extra, [sampler.close] if sampler else [])

    # -- results ----------------------------------------------------------------------------------------

    def metrics(self, variant: str) -> dict[str, Any]:
        """Data-wait shares, GPU utilisation, first-iteration/capture times, loader start and peak memory."""
        live = self._live[variant]
        extra = {k: v for k, v in live.extra.items() if not k.startswith("_")}
        step = live.extra.get("_step")
        if step is not None and step.graph:
            extra |= {"graph_warmup_s": step.warmup_seconds, "capture_s": step.capture_seconds}
        if self.cuda:
            extra["peak_mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        return {**live.loop.stats(), **extra}

    def release(self, variant: str) -> None:
        """Stops the variant's loader workers and samplers and drops its model."""
        live = self._live.pop(variant, None)
        if live is not None:
            for close in live.close:
                close()

    def derived(self, point: dict[str, Any]) -> dict[str, Any]:
        """Per-epoch extrapolation, A_C evaluation costs and the absolute GPU targets (see ``e2e_epoch``)."""
        return e2e_epoch.derive(self.params, point, self.eval_costs)

    # -- A_C evaluation cost ----------------------------------------------------------------------------

    def _measure_eval(self) -> dict[str, Any]:
        """Seconds per image of one A_C pass: the released code's (DataLoader + PIL + its tree's host reads, fp32) and
        dnet-fast's (``evaluation.class_accuracy`` over the val images kept on the device, as ``fit`` runs it)."""
        p = self.params
        n = min(p["eval_images"], len(self.bundle.val))
        first = np.arange(n)
        timing = {"warmup": 1, "repeats": p["eval_repeats"], "device": self.device}
        out: dict[str, Any] = {"images": n, "official": self._official_eval(self.files.val.subset(first), timing) / n}
        cfg = self._config("off")
        model = self._model(cfg.model)
        out["engine"] = timeit(lambda: self._resident_eval(model, cfg, n), **timing).median / n
        out["resident"] = out["engine"]  # fit measures A_C on the resident val set: the same pass
        return out

    def _official_eval(self, sub: Any, timing: dict[str, Any]) -> float:
        """Median seconds of one released-code A_C pass over ``sub`` (eval loader workers persist: their start
        is costed once per epoch in the extrapolation, not here)."""
        p = self.params
        model = self._model(self._official_model_cfg())
        ds = OfficialStyleDataset(sub, p["family"], train=False, crop=p["crop"], mean=self.bundle.mean,
                                  std=self.bundle.std)
        loader = official_eval_loader(ds, 128, _workers(p), cuda=self.cuda)
        tree = self._tree()
        return timeit(lambda: official_class_accuracy(model, loader, p["classes"], self.device, tree),
                      **timing).median

    def _resident_eval(self, model: nn.Module, cfg: Any, n: int) -> Tensor:
        """Per-class accuracy from the engine's forward over the first ``n`` resident meta images."""
        from dnet_fast.evaluation import class_accuracy

        images, labels, bs = self.metaset.images[:n], self.metaset.labels[:n], cfg.run.eval_batch
        batches = ((images[s : s + bs], labels[s : s + bs]) for s in range(0, n, bs))
        return class_accuracy(model, batches, self.params["classes"], cfg, self.device)


def _workers(params: dict[str, Any]) -> int:
    """Loader worker processes: the point's ``workers``, at most the usable cores less one (the main process)."""
    from dnet_fast.info import usable_cpus

    return max(0, min(int(params["workers"]), usable_cpus() - 1)) if params["workers"] else 0
