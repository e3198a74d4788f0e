"""The ``loaders`` benchmark: training images/s of the ffcv, dali, resident and naive loaders, side by side.

Every variant does the same work: 224-px random-resized-crop + flip + normalise of 256-px JPEG sources (``--quick``:
56 px from 64 px), the order from ``sampling.epoch_order``, with the same worker count. ``naive`` reads the
source files (the baseline users have today); ``ffcv`` and ``dali`` read the converted shards of the same images;
``resident`` holds them decoded (uint8, R×R) and augments whole batches with tensor ops.

Run it with ``python -m benchmarks --only loaders`` (``--set images=N --set workers=W`` override the point).
"""

from __future__ import annotations

import io
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from benchmarks.harness import BENCHMARKS, Benchmark, Profile, Ratio, SkipVariant
from benchmarks.loopstats import endless_batches

__all__ = ["LoaderBenchmark", "make_sources"]

SEED = 0
FULL = {"images": 2000, "classes": 20, "side": 256, "crop": 224, "batch": 64, "iters": 8, "workers": 2}
QUICK = {"images": 96, "classes": 6, "side": 64, "crop": 56, "batch": 16, "iters": 2, "workers": 1}


def make_sources(root: Path, images: int, classes: int, side: int) -> Path:
    """Writes ``images`` textured side×side JPEGs (q90, like Places365 ``data_256``) and a split file.

    Returns:
        The split file (``train/<class>/<n>.jpg <label>`` lines, long-tailed counts).
    """
    rng = np.random.Generator(np.random.PCG64(SEED))
    weights = 0.8 ** np.arange(classes)
    labels = np.sort(rng.choice(classes, size=images, p=weights / weights.sum()))
    lines = []
    for i, y in enumerate(labels):
        rel = f"train/c{y:03d}/{i:08d}.jpg"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        # Smooth noise compresses like a photo (≈ 15–25 KB at 256 px), unlike flat colour or white noise.
        small = rng.integers(0, 256, size=(side // 8, side // 8, 3), dtype=np.uint8)
        img = Image.fromarray(small, "RGB").resize((side, side), Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        (root / rel).write_bytes(buf.getvalue())
        lines.append(f"{rel} {y}")
    split = root / "train.txt"
    split.write_text("\n".join(lines) + "\n")
    return split


@BENCHMARKS.register("loaders")
class LoaderBenchmark(Benchmark):
    """``iters`` training batches per call from each loader; images/s is the column that matters."""

    description = "loader images/s: ffcv, dali, resident vs naive (RRC 224 + flip from 256-px JPEGs)"
    baseline = "naive"
    unit_name = "img"

    def grid(self, profile: Profile) -> list[dict[str, Any]]:
        """One point: 2,000 256-px images (``--quick``: 96 at 64 px)."""
        return [{**(QUICK if profile.quick else FULL), **profile.extra, "device": profile.device}]

    def variants(self, params: dict[str, Any]) -> list[str]:  # noqa: ARG002 - same variants everywhere
        """Naive first."""
        return ["naive", "ffcv", "dali", "resident"]

    def ratios(self, params: dict[str, Any]) -> list[Ratio]:  # noqa: ARG002
        """Speed-ups over the naive loader (ISSUE 4 targets: ffcv and dali ≥ 2×)."""
        return [
            Ratio("ffcv speed-up over naive", "naive", "ffcv", 2.0),
            Ratio("dali speed-up over naive", "naive", "dali", 2.0),
            Ratio("resident speed-up over naive", "naive", "resident"),
        ]

    def setup(self, params: dict[str, Any]) -> None:
        """Generates the sources and converts them (wds + ffcv when installed) into a temporary directory."""
        from dnet_fast.convert import ConvertOptions, ImageOptions, convert, read_splits, split_file_input
        from dnet_fast.convert.beton import ffcv_available

        self.params, self._tmp = params, tempfile.TemporaryDirectory(prefix="bench_loaders_")
        base = Path(self._tmp.name)
        split = make_sources(base / "src", params["images"], params["classes"], params["side"])
        lists = {"train": split, "val": split, "test": split}
        # The same list thrice: every split holds all images; only train is read.
        inp = split_file_input("bench", base / "src", read_splits(lists, None))
        inp.problems = []
        formats = ("wds", "ffcv") if ffcv_available() else ("wds",)
        opts = ConvertOptions(
            image=ImageOptions(max_side=params["side"]),
            formats=formats,
            progress=False,
            workers=params["workers"],
            shard_size=1000,
        )
        convert(inp, base / "shards", opts)
        self.shards, self.sources = base / "shards", inp.sources["train"]
        self.units_per_call = params["batch"] * params["iters"]

    def teardown(self) -> None:
        """Deletes the temporary data."""
        self._tmp.cleanup()

    def _spec(self) -> Any:
        from dnet_fast.data.base import IMAGENET_MEAN, IMAGENET_STD, LoaderSpec

        p = self.params
        return LoaderSpec(
            batch_size=p["batch"],
            device=p["device"],
            seed=SEED,
            workers=p["workers"],
            augment="imagenet",
            eval_augment="imagenet",
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            crop_size=p["crop"],
        )

    def _split(self, variant: str) -> Any:
        from dnet_fast.data.base import FileSplit
        from dnet_fast.data.shards import open_split

        if variant == "naive":  # the source JPEG files, as a user without converted shards has them
            src = self.sources
            return FileSplit(src.root, tuple(e.path for e in src.entries), src.labels)
        return open_split(self.shards, "train")

    def prepare(self, variant: str) -> Callable[[], object]:
        """Builds the loader (FFCV's JIT and the resident decode count as setup) and one warm batch."""
        import dnet_fast.data.dali_loader
        import dnet_fast.data.ffcv_loader
        import dnet_fast.data.loaders  # noqa: F401  (registers every loader)
        from dnet_fast.data.base import LOADERS

        try:
            loader = LOADERS.get(variant)(self._split(variant), self._spec())
        except ImportError as exc:
            raise SkipVariant(str(exc)) from exc
        batches, iters = endless_batches(loader.batches), self.params["iters"]
        next(batches)

        def run() -> None:
            for _ in range(iters):
                next(batches)

        return run
