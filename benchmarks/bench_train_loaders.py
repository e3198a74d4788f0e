"""The ``train_loaders`` benchmark: training images/s of the whole loop with each loader feeding the same step.

A loader-only benchmark (``loaders``) measures batches/s with every core free for decoding; inside training the
loader's workers share the cores with the step's threads, so its ranking can flip (on 2 cores FFCV with 2 workers
ran 6x slower than with 1 and slower than naive). Here every variant is a real ``engine.build_session`` of one
config, differing only in ``data.loader`` / ``data.workers``: same model, same step (``build_stack``), same meta
batches; one timed call is ``iters`` iterations of loader → ``step.step(x, y, meta_batch)``. Variants use the
``auto`` worker rule (``engine.loader_workers``) unless named ``*_w2`` (the former default of 2 workers); ``auto``
is the loader the engine picks itself, and ``derived`` checks it against the fastest one measured.

Data: ``side``-px textured JPEGs (256: like Places365 ``data_256``) converted to shards (+ .beton with ffcv).

Standalone: ``python benchmarks/bench_train_loaders.py [--quick]``; or ``python -m benchmarks --only train_loaders``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_loaders import make_sources
from benchmarks.harness import BENCHMARKS, Benchmark, Profile, Ratio, SkipVariant
from benchmarks.loopstats import endless_batches

__all__ = ["TrainLoaderBenchmark", "main"]

SEED = 0
FULL = {"images": 384, "classes": 8, "side": 256, "crop": 64, "batch": 32, "iters": 3,
        "backbone": "resnet10", "meta": "driver"}
QUICK = {"images": 48, "classes": 4, "side": 64, "crop": 32, "batch": 8, "iters": 2,
         "backbone": "resnet10", "meta": "driver"}
#: variant -> (data.loader, data.workers); -1 is the engine's auto worker rule.
VARIANTS = {
    "naive": ("naive", -1),
    "naive_w2": ("naive", 2),
    "resident": ("resident", -1),
    "ffcv": ("ffcv", -1),
    "ffcv_w2": ("ffcv", 2),
    "dali": ("dali", -1),
    "auto": ("auto", -1),
}
AUTO_TOLERANCE = 0.9  # auto passes when it reaches this share of the best variant's images/s (timing noise)


class _Live:
    """One prepared variant: its session, endless batch stream and in-loop clocks."""

    def __init__(self, session: Any) -> None:
        self.session = session
        self.batches = endless_batches(session.loader.batches)
        self.step_index = 0
        self.recording = False
        self.wait_s = 0.0
        self.total_s = 0.0

    def iterate(self, iters: int) -> None:
        """``iters`` training iterations: next batch, next meta batch, one step."""
        s = self.session
        needs_meta = s.stack.meta.needs_meta_batch
        for _ in range(iters):
            t0 = time.perf_counter()
            x, y = next(self.batches)
            t1 = time.perf_counter()
            meta_batch = s.valset.batch(self.step_index, s.cfg.meta.meta_batch) if needs_meta else None
            s.stack.step.step(x, y, meta_batch)
            self.step_index += 1
            if self.recording:
                self.wait_s += t1 - t0
                self.total_s += time.perf_counter() - t0


class TrainLoaderBenchmark(Benchmark):
    """``iters`` full training iterations per call; images/s of the loop is the column that matters."""

    description = "training-loop images/s per loader (same model + step): naive, resident, ffcv, dali, auto"
    baseline = "naive"
    unit_name = "img"

    def grid(self, profile: Profile) -> list[dict[str, Any]]:
        """One point: 384 256-px JPEGs, ResNet-10 at 64 px, batch 32 (``--quick``: 48 at 64 px)."""
        return [{**(QUICK if profile.quick else FULL), **profile.extra, "device": profile.device}]

    def variants(self, params: dict[str, Any]) -> list[str]:  # noqa: ARG002 - same variants everywhere
        """Naive first."""
        return list(VARIANTS)

    def ratios(self, params: dict[str, Any]) -> list[Ratio]:  # noqa: ARG002
        """Every variant's speed-up over naive inside training."""
        return [Ratio(f"{v} over naive (in training)", "naive", v) for v in VARIANTS if v != "naive"]

    def setup(self, params: dict[str, Any]) -> None:
        """Generates the JPEGs and converts them (wds, + ffcv when installed) into a temporary directory."""
        from dnet_fast.convert import ConvertOptions, ImageOptions, convert, read_splits, split_file_input
        from dnet_fast.convert.beton import ffcv_available

        self.params, self._live = params, {}
        self._tmp = tempfile.TemporaryDirectory(prefix="bench_train_loaders_")
        base = Path(self._tmp.name)
        split = make_sources(base / "src", params["images"], params["classes"], params["side"])
        # The same list thrice (one file: no cross-split duplicates): train is read, val feeds the meta set.
        inp = split_file_input("bench", base / "src", read_splits(dict.fromkeys(("train", "val", "test"), split), None))
        formats = ("wds", "ffcv") if ffcv_available() else ("wds",)
        opts = ConvertOptions(image=ImageOptions(max_side=params["side"]), formats=formats, progress=False,
                              workers=1, shard_size=1000)
        convert(inp, base / "shards", opts)
        self.shards = base / "shards"
        self.units_per_call = params["batch"] * params["iters"]

    def teardown(self) -> None:
        """Deletes the temporary data."""
        self._live.clear()
        self._tmp.cleanup()

    def _overrides(self, loader: str, workers: int) -> list[str]:
        p = self.params
        return [
            "data.dataset=shards", f"data.root={self.shards}", f"data.crop_size={p['crop']}",
            "data.meta_per_class=4", f"data.loader={loader}", f"data.workers={workers}",
            f"model.backbone={p['backbone']}", "diffnet.bias=true", f"meta.mode={p['meta']}",
            f"optim.batch_size={p['batch']}", f"meta.meta_batch={p['batch']}", f"run.seed={SEED}",
            f"run.device={p['device']}", "run.progress=false", "run.tensorboard=false",
        ]

    def prepare(self, variant: str) -> Callable[[], object]:
        """Builds the variant's session (loader start, resident decode and FFCV's JIT count as setup)."""
        from dnet_fast.config import load_config
        from dnet_fast.engine import build_session

        loader, workers = VARIANTS[variant]
        cfg = load_config(None, self._overrides(loader, workers))
        try:
            session = build_session(cfg)
        except (ImportError, ValueError) as exc:  # loader not installed, or no .beton without ffcv
            raise SkipVariant(str(exc)) from exc
        info = session.loader_info
        self.notes[variant] = f"{info['name']}, {info['workers']} worker(s)"
        live = self._live[variant] = _Live(session)
        live.iterate(1)  # first batch: worker start-up and FFCV's compiled pipeline
        iters = self.params["iters"]

        class _Run:
            """The timed call; the runner sets ``recording`` for timed (not warm-up) calls."""

            def __init__(self) -> None:
                self.recording = False

            def __call__(self) -> None:
                live.recording = self.recording
                live.iterate(iters)

        return _Run()

    def metrics(self, variant: str) -> dict[str, Any]:
        """Share of the timed loop spent waiting for the next batch."""
        live = self._live[variant]
        return {"data_wait_share": live.wait_s / live.total_s if live.total_s else None}

    def derived(self, point: dict[str, Any]) -> dict[str, Any]:
        """``auto`` against the fastest measured variant (passes at ``AUTO_TOLERANCE`` of its images/s)."""
        times = {n: v["best_median_s"] for n, v in point["variants"].items()}
        if "auto" not in times:
            return {}
        best = min(times, key=times.get)
        share = times[best] / times["auto"]
        target = {
            "name": f"auto ({self.notes.get('auto')}) img/s over the fastest variant's ({best})",
            "value": share, "op": ">=", "target": AUTO_TOLERANCE, "passed": share >= AUTO_TOLERANCE,
        }
        return {"auto_picks": self.notes.get("auto"), "fastest": best, "targets": [target]}


def main(argv: list[str] | None = None) -> int:
    """Runs this benchmark alone through the runner (``python benchmarks/bench_train_loaders.py``)."""
    from benchmarks import runner

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes")
    p.add_argument("--out", type=Path, default=None, help="results folder")
    args, rest = p.parse_known_args(argv)
    forward = ["--only", "train_loaders", "--cpu", *(["--quick"] if args.quick else []), *rest]
    return runner.main([*forward, *(["--out", str(args.out)] if args.out else [])])


if __name__ == "__main__":
    sys.exit(main())  # the runner imports this file again as benchmarks.bench_train_loaders, which registers it
else:
    BENCHMARKS.register("train_loaders")(TrainLoaderBenchmark)
