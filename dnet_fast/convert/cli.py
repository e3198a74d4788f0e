"""``dnet-fast convert DATASET``: one registered converter per dataset (split lists → shards; CIFAR pickles).

``places-lt`` and ``imagenet-lt`` read the OLTR split files (asked for explicitly: ``--split-dir`` or
``--<split>-list``) and check them against golden statistics; ``list`` converts any OLTR-style lists (a user's own
long-tailed set, iNaturalist-style lists) without that check unless ``--golden`` names one; ``cifar-lt`` stores
the CIFAR-10/100-LT bundle losslessly. Every input is validated before anything is written. ``tools/convert_*.py``
are thin wrappers around :func:`main`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from dnet_fast.convert.golden import GOLDEN, Golden, check_golden, summary_lines
from dnet_fast.convert.images import ImageOptions
from dnet_fast.convert.inputs import array_input, read_splits, split_file_input
from dnet_fast.convert.pipeline import ConvertOptions, ConvertResult, DatasetInput, convert
from dnet_fast.convert.sources import LAYOUT_NAMES
from dnet_fast.convert.splitfile import ConversionError, SplitFile, git_blob_sha1
from dnet_fast.convert.splitsets import IMAGENET_LT, PLACES_LT, SPLITS, SplitSet, SplitSetError, resolve_lists
from dnet_fast.registry import Registry

__all__ = ["CONVERTERS", "Converter", "add_output_args", "get_parser", "main", "options_from_args"]


@dataclass(frozen=True)
class Converter:
    """A ``dnet-fast convert`` subcommand: its help line, its arguments and what it runs (returns the exit code)."""

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace, list[str]], int]


CONVERTERS: Registry[Converter] = Registry("converter")


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
        "--formats", default="auto",
        help="outputs: wds (tar + DALI index, always) and/or ffcv; auto: wds, plus ffcv when ffcv imports",
    )
    p.add_argument("--shard-size", type=int, default=5000, help="samples per tar shard (the resume unit)")
    p.add_argument("--workers", type=int, default=4, help="encoding processes (0: in this process)")
    p.add_argument("--skip-bad", action="store_true", help="skip bad entries and list them in report.json")
    p.add_argument(
        "--strict", action="store_true", help="also refuse repairable images (CMYK, gray, PNG as .jpg)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace a conversion made with other arguments")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _formats(text: str) -> tuple[str, ...]:
    """``--formats``: the listed outputs, or for ``auto`` WebDataset plus FFCV when ffcv imports (said on stdout)."""
    if text != "auto":
        return tuple(f for f in text.split(",") if f)
    from dnet_fast.convert.beton import ffcv_available

    if ffcv_available():
        return ("wds", "ffcv")
    print("formats: wds only (ffcv is not installed: pip install 'dnet-fast[ffcv]' adds .beton files)")
    return ("wds",)


def options_from_args(args: argparse.Namespace) -> ConvertOptions:
    """ConvertOptions from parsed arguments."""
    image = ImageOptions(max_side=args.max_side, mode=args.mode, quality=args.quality, strict=args.strict)
    return ConvertOptions(
        image=image,
        formats=_formats(args.formats),
        shard_size=args.shard_size,
        workers=args.workers,
        skip_bad=args.skip_bad,
        progress=not args.no_progress,
        raw_fraction=args.raw_fraction,
        overwrite=args.overwrite,
    )


# ----------------------------------------------------------------------------------------------------------
# Split-list converters (places-lt, imagenet-lt, list)


def _split_list_args(splitset: SplitSet) -> Callable[[argparse.ArgumentParser], None]:
    names = ", ".join(splitset.file_names[s] for s in SPLITS)

    def add(p: argparse.ArgumentParser) -> None:
        p.add_argument("--root", required=True, type=Path, help="image root the split paths are relative to")
        p.add_argument("--split-dir", type=Path, default=None, help=f"folder holding {names}")
        for split in SPLITS:
            p.add_argument(f"--{split}-list", type=Path, default=None,
                           help=f"{split} split file (instead of --split-dir/{splitset.file_names[split]})")
        limit = splitset.num_classes
        p.add_argument("--num-classes", type=int, default=limit,
                       help=f"labels must be below this (default: {limit or 'any label >= 0'})")
        p.add_argument("--layout", choices=LAYOUT_NAMES, default="auto", help="how listed paths map to files")
        if splitset.golden is None:
            p.add_argument("--golden", choices=sorted(GOLDEN), default=None,
                           help="check the lists against a recorded dataset's golden numbers")
        else:
            p.add_argument("--no-golden", action="store_true",
                           help="skip the golden checks (subsets or custom lists)")
        add_output_args(p)

    return add


def _golden_errors(golden: Golden, splits: dict[str, SplitFile], lists: dict[str, Path]) -> list[str]:
    """Golden-statistics mismatches of the parsed lists, and of the train list's git blob."""
    errors = check_golden(splits, golden)
    blob = git_blob_sha1(lists["train"])
    if golden.train_blob and blob != golden.train_blob:
        errors.append(f"train list git blob: expected {golden.train_blob}, got {blob}")
    return errors


def _run_split_lists(splitset: SplitSet) -> Callable[[argparse.Namespace, list[str]], int]:
    def run(args: argparse.Namespace, argv: list[str]) -> int:
        chosen = splitset
        if getattr(args, "golden", None):
            chosen = replace(splitset, golden=GOLDEN[args.golden])
        if getattr(args, "no_golden", False):
            chosen = replace(splitset, golden=None)
        explicit = {s: getattr(args, f"{s}_list") for s in SPLITS}
        lists = resolve_lists(splitset, args.split_dir, explicit)
        if not args.root.is_dir():
            msg = f"image root not found: {args.root}"
            raise SplitSetError(msg)
        splits = read_splits(lists, args.num_classes)
        print("\n".join(summary_lines(splits)))
        if chosen.golden is not None:
            errors = _golden_errors(chosen.golden, splits, lists)
            if errors:
                print("golden check failed (pass --no-golden for subsets or custom lists):\n  "
                      + "\n  ".join(errors), file=sys.stderr)
                return 2
            print(f"golden check passed ({chosen.dataset})")
        inp = split_file_input(splitset.dataset, args.root, splits, args.layout)
        inp.provenance["argv"] = list(argv)
        return _convert_and_report(inp, args)

    return run


CONVERTERS.register("places-lt")(Converter(
    "Places-LT: Places365 images (data_256/val_256 or OLTR train/val layout) + the OLTR split files",
    _split_list_args(PLACES_LT), _run_split_lists(PLACES_LT),
))
CONVERTERS.register("imagenet-lt")(Converter(
    "ImageNet-LT: ILSVRC2012 train/val images + the OLTR split files (ImageNet_LT_train.txt user-supplied)",
    _split_list_args(IMAGENET_LT), _run_split_lists(IMAGENET_LT),
))
_CUSTOM = SplitSet("custom", None, {s: f"{s}.txt" for s in SPLITS})


def _list_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="custom", help="name recorded in meta.json")
    _split_list_args(_CUSTOM)(p)


def _run_list(args: argparse.Namespace, argv: list[str]) -> int:
    return _run_split_lists(replace(_CUSTOM, dataset=args.dataset))(args, argv)


CONVERTERS.register("list")(Converter(
    "any OLTR-style split lists ('<relative path> <class id>' per line): your own long-tailed set, iNaturalist",
    _list_args, _run_list,
))


# ----------------------------------------------------------------------------------------------------------
# CIFAR-LT


def _cifar_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--root", required=True, type=Path, help="folder holding cifar-10-batches-py/ or cifar-100-python/"
    )
    p.add_argument("--classes", type=int, choices=(10, 100), default=100)
    p.add_argument("--imbalance", type=float, default=100.0, help="ρ = n_max / n_min")
    p.add_argument("--variant", choices=("standard", "official"), default="standard")
    p.add_argument("--val-per-class", type=int, default=25, help="meta/val images per class (SPEC §3)")
    p.add_argument("--seed", type=int, default=0, help="seeds the standard variant's draws")
    add_output_args(p, mode="raw", max_side=0)


def _run_cifar(args: argparse.Namespace, argv: list[str]) -> int:
    """Builds the long-tailed bundle (``cifar10_lt`` / ``cifar100_lt``) and stores its splits losslessly."""
    from dnet_fast.config import DataConfig
    from dnet_fast.data import DATASETS

    cfg = DataConfig(
        dataset=f"cifar{args.classes}_lt",
        root=str(args.root),
        imbalance=args.imbalance,
        cifar_variant=args.variant,
        val_per_class=args.val_per_class,
    )
    bundle = DATASETS.get(cfg.dataset)(cfg, args.seed)
    arrays = {s: (getattr(bundle, s).images.numpy(), getattr(bundle, s).labels) for s in SPLITS}
    inp = array_input(cfg.dataset, arrays, bundle.class_names, {"bundle_info": bundle.info, "argv": argv})
    inp.mean, inp.std, inp.val_is_meta = bundle.mean, bundle.std, True
    for name, (x, _) in arrays.items():
        print(f"{name}: {len(x)} images")
    return _convert_and_report(inp, args)


CONVERTERS.register("cifar-lt")(Converter(
    "CIFAR-10/100-LT from the python pickles (LT profile and meta set as the cifar*_lt datasets), lossless",
    _cifar_args, _run_cifar,
))


# ----------------------------------------------------------------------------------------------------------
# Output and entry point


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


def get_parser(prog: str = "dnet-fast convert") -> argparse.ArgumentParser:
    """The converter parser: one subcommand per registered converter."""
    p = argparse.ArgumentParser(prog=prog, description="Convert a dataset to WebDataset/DALI shards and FFCV .beton files.")
    sub = p.add_subparsers(dest="converter", required=True, metavar="DATASET")
    for name in CONVERTERS.names():
        conv = CONVERTERS.get(name)
        conv.add_arguments(sub.add_parser(name, help=conv.help, description=conv.help))
    return p


def main(argv: Sequence[str] | None = None, prog: str = "dnet-fast convert") -> int:
    """Parses ``argv`` (``DATASET --flags``), validates every input, converts; returns the exit code.

    Missing or unreadable inputs end with one error line on stderr and status 2, before anything is written;
    a failed golden check returns 2, bad entries in the data 1.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    args = get_parser(prog).parse_args(argv)
    try:
        return CONVERTERS.get(args.converter).run(args, argv)
    except (ValueError, OSError) as err:  # SplitSetError included: missing lists, root, unreadable files
        print(f"{prog} {args.converter}: error: {err}", file=sys.stderr)
        return 2
