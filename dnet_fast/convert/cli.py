"""Command-line front end shared by the ``tools/convert_*.py`` scripts (each passes its dataset's defaults)."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

from dnet_fast.convert.golden import Golden, check_golden, summary_lines
from dnet_fast.convert.images import ImageOptions
from dnet_fast.convert.inputs import array_input, read_splits, split_file_input
from dnet_fast.convert.pipeline import ConvertOptions, ConvertResult, DatasetInput, convert
from dnet_fast.convert.sources import LAYOUT_NAMES
from dnet_fast.convert.splitfile import ConversionError, git_blob_sha1

__all__ = [
    "SplitDefaults",
    "add_output_args",
    "get_parser",
    "options_from_args",
    "run_cifar",
    "run_split_converter",
]


@dataclass(frozen=True)
class SplitDefaults:
    """Per-dataset defaults of a split-file converter."""

    dataset: str
    num_classes: int
    lists: dict[str, str] = field(default_factory=dict)  # split -> default list path ("" = required)
    golden: Golden | None = None


def add_output_args(p: argparse.ArgumentParser, mode: str = "jpg", max_side: int = 256) -> None:
    """Options shared by every converter: storage, formats, sharding, workers, bad-input policy."""
    p.add_argument(
        "--out", required=True, type=Path, help="output directory (created; re-runs verify or resume)"
    )
    p.add_argument(
        "--max-side", type=int, default=max_side, help="longest stored side in px; 0 keeps the source"
    )
    p.add_argument(
        "--mode",
        choices=("jpg", "raw", "proportion"),
        default=mode,
        help="image storage: JPEG, lossless (raw FFCV pixels, PNG shards), or a raw share in FFCV",
    )
    p.add_argument("--quality", type=int, default=90, help="JPEG quality of re-encoded images")
    p.add_argument("--raw-fraction", type=float, default=0.5, help="raw share in FFCV for --mode proportion")
    p.add_argument(
        "--formats", default="wds,ffcv", help="outputs: wds (tar + DALI index, always) and/or ffcv"
    )
    p.add_argument("--shard-size", type=int, default=5000, help="samples per tar shard (the resume unit)")
    p.add_argument("--workers", type=int, default=4, help="encoding processes (0: in this process)")
    p.add_argument("--skip-bad", action="store_true", help="skip bad entries and list them in report.json")
    p.add_argument(
        "--strict", action="store_true", help="also refuse repairable images (CMYK, gray, PNG as .jpg)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace a conversion made with other arguments")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def get_parser(defaults: SplitDefaults) -> argparse.ArgumentParser:
    """The argument parser of a split-file converter with ``defaults`` filled in."""
    p = argparse.ArgumentParser(
        description=f"Convert {defaults.dataset} (image root + split files) to shards."
    )
    p.add_argument("--root", required=True, type=Path, help="image root the split paths are relative to")
    for split in ("train", "val", "test"):
        default = defaults.lists.get(split, "")
        p.add_argument(
            f"--{split}-list",
            default=default or None,
            required=not default,
            help=f"{split} split file (default: {default or 'required'})",
        )
    p.add_argument("--num-classes", type=int, default=defaults.num_classes, help="labels must be below this")
    p.add_argument("--layout", choices=LAYOUT_NAMES, default="auto", help="how listed paths map to files")
    p.add_argument(
        "--no-golden", action="store_true", help="skip the golden checks (subsets or custom lists)"
    )
    add_output_args(p)
    return p


def options_from_args(args: argparse.Namespace) -> ConvertOptions:
    """ConvertOptions from parsed arguments."""
    image = ImageOptions(max_side=args.max_side, mode=args.mode, quality=args.quality, strict=args.strict)
    return ConvertOptions(
        image=image,
        formats=tuple(f for f in args.formats.split(",") if f),
        shard_size=args.shard_size,
        workers=args.workers,
        skip_bad=args.skip_bad,
        progress=not args.no_progress,
        raw_fraction=args.raw_fraction,
        overwrite=args.overwrite,
    )


def run_split_converter(argv: list[str] | None, defaults: SplitDefaults) -> int:
    """Parses ``argv``, prints split statistics, runs the golden checks, converts; returns the exit code."""
    args = get_parser(defaults).parse_args(argv)
    lists = {"train": args.train_list, "val": args.val_list, "test": args.test_list}
    splits = read_splits(lists, args.num_classes)
    print("\n".join(summary_lines(splits)))
    if defaults.golden is not None and not args.no_golden:
        errors = check_golden(splits, defaults.golden)
        blob = git_blob_sha1(lists["train"])
        if defaults.golden.train_blob and blob != defaults.golden.train_blob:
            errors.append(f"train list git blob: expected {defaults.golden.train_blob}, got {blob}")
        if errors:
            print(
                "golden check failed (pass --no-golden for subsets or custom lists):\n  "
                + "\n  ".join(errors),
                file=sys.stderr,
            )
            return 2
        print(f"golden check passed ({defaults.dataset})")
    inp = split_file_input(defaults.dataset, args.root, splits, args.layout)
    inp.provenance["argv"] = list(sys.argv[1:] if argv is None else argv)
    return _convert_and_report(inp, args)


def run_cifar(argv: list[str] | None) -> int:
    """CIFAR-LT: builds the long-tailed bundle (``cifar10_lt`` / ``cifar100_lt``) and stores its splits losslessly."""
    from dnet_fast.config import DataConfig
    from dnet_fast.data import DATASETS

    p = argparse.ArgumentParser(description="Convert CIFAR-10/100-LT (python pickles) to shards.")
    p.add_argument(
        "--root", required=True, type=Path, help="folder holding cifar-10-batches-py/ or cifar-100-python/"
    )
    p.add_argument("--classes", type=int, choices=(10, 100), default=100)
    p.add_argument("--imbalance", type=float, default=100.0, help="ρ = n_max / n_min")
    p.add_argument("--variant", choices=("standard", "official"), default="standard")
    p.add_argument("--val-per-class", type=int, default=25, help="meta/val images per class (SPEC §3)")
    p.add_argument("--seed", type=int, default=0, help="seeds the standard variant's draws")
    add_output_args(p, mode="raw", max_side=0)
    args = p.parse_args(argv)
    cfg = DataConfig(
        dataset=f"cifar{args.classes}_lt",
        root=str(args.root),
        imbalance=args.imbalance,
        cifar_variant=args.variant,
        val_per_class=args.val_per_class,
    )
    bundle = DATASETS.get(cfg.dataset)(cfg, args.seed)
    arrays = {
        s: (getattr(bundle, s).images.numpy(), getattr(bundle, s).labels) for s in ("train", "val", "test")
    }
    inp = array_input(cfg.dataset, arrays, bundle.class_names, {"bundle_info": bundle.info, "argv": argv})
    inp.mean, inp.std, inp.val_is_meta = bundle.mean, bundle.std, True
    for name, (x, _) in arrays.items():
        print(f"{name}: {len(x)} images")
    return _convert_and_report(inp, args)


def _convert_and_report(inp: DatasetInput, args: argparse.Namespace) -> int:
    try:
        result = convert(inp, args.out, options_from_args(args))
    except ConversionError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    _print_result(result)
    return 0


def _print_result(result: ConvertResult) -> None:
    meta = result.meta
    state = "verified (already complete, nothing rewritten)" if result.verified else "written"
    print(f"{result.out_dir}: {state}")
    for name, info in meta["splits"].items():
        print(f"  {name}: {info['images']} images in {len(info['shards'])} shard(s)")
    print(f"  classes {meta['num_classes']}, many/medium/few {'/'.join(map(str, meta['groups'].values()))}")
    if meta["skipped"] or meta["repaired"]:
        print(
            f"  skipped {meta['skipped']}, repaired {meta['repaired']}: see {result.out_dir / meta['report']}"
        )
