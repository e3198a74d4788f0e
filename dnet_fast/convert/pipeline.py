"""The conversion driver: validate inputs, encode in parallel, write shards/betons/meta.json, resume safely."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dnet_fast.atomic import atomic_write_json
from dnet_fast.convert.images import ImageOptions
from dnet_fast.convert.journal import JOURNAL_NAME, REPORT_NAME, Journal, remove_tmp_files
from dnet_fast.convert.sources import Source
from dnet_fast.convert.split_shards import RunState, worker_pool, write_split_shards
from dnet_fast.convert.splitfile import MAX_LISTED, ConversionError, Problem, split_stats
from dnet_fast.data.base import IMAGENET_MEAN, IMAGENET_STD
from dnet_fast.data.groups import shot_groups
from dnet_fast.shardformat import (
    META_NAME,
    file_ok,
    file_record,
    read_meta,
    sample_key,
    samples_name,
    write_samples,
)

__all__ = [
    "CONVERTER_VERSION",
    "ConvertOptions",
    "ConvertResult",
    "DatasetInput",
    "convert",
    "verify_output",
]

CONVERTER_VERSION = "1"


@dataclass(frozen=True)
class ConvertOptions:
    """Output settings of one conversion.

    Attributes:
        image: how images are checked and stored.
        formats: outputs to write: ``wds`` (tar shards + DALI index, always needed) and ``ffcv`` (.beton).
        shard_size: samples per tar shard (also the resume granularity).
        workers: image-encoding processes (0: in this process).
        skip_bad: skip bad entries and list them in report.json instead of stopping.
        progress: show a progress bar (images/s and ETA).
        raw_fraction: share of samples stored raw in the FFCV ``proportion`` mode.
        overwrite: replace an existing conversion made with different arguments.
    """

    image: ImageOptions = field(default_factory=ImageOptions)
    formats: tuple[str, ...] = ("wds", "ffcv")
    shard_size: int = 5000
    workers: int = 0
    skip_bad: bool = False
    progress: bool = True
    raw_fraction: float = 0.5
    overwrite: bool = False

    def __post_init__(self) -> None:
        unknown = set(self.formats) - {"wds", "ffcv"}
        if unknown or "wds" not in self.formats:
            msg = f"formats must include 'wds' and may add 'ffcv', got {self.formats}"
            raise ValueError(msg)
        if self.shard_size < 1 or self.workers < 0:
            msg = f"need shard_size >= 1 and workers >= 0, got {self.shard_size}, {self.workers}"
            raise ValueError(msg)


@dataclass
class DatasetInput:
    """Everything a conversion reads.

    Attributes:
        dataset: dataset name recorded in meta.json (``places_lt``, ``imagenet_lt``, ``cifar100_lt``, ...).
        sources: split name -> source, labels already contiguous ``0..C-1``.
        class_names: C names.
        original_ids: C original class ids (``original_ids[c]`` is class ``c`` in the split files).
        augment: transform family of the data (``imagenet`` or ``cifar``).
        mean, std: per-channel normalisation of the data in [0, 1] pixel units.
        problems: bad entries found while reading the split files (line-level).
        provenance: recorded verbatim in meta.json (split files, hashes, arguments).
    """

    dataset: str
    sources: dict[str, Source]
    class_names: tuple[str, ...]
    original_ids: tuple[int, ...]
    augment: str = "imagenet"
    problems: list[Problem] = field(default_factory=list)
    provenance: dict[str, Any] = field(default_factory=dict)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    val_is_meta: bool = False  # the val split already is the meta set (CIFAR-LT); else draw per class from it


@dataclass
class ConvertResult:
    """What ``convert`` did: ``verified`` is True when an identical complete conversion was already there."""

    out_dir: Path
    meta: dict[str, Any]
    verified: bool
    skipped: list[Problem]
    repaired: list[dict[str, str]]


def convert(inp: DatasetInput, out_dir: str | Path, opts: ConvertOptions) -> ConvertResult:
    """Converts ``inp`` into ``out_dir`` (tar shards + index, optional betons, samples.tsv, report, meta.json).

    Every file is written under a temporary name and renamed when complete; completed units are journaled,
    so a re-run after a crash resumes, and a re-run after success only verifies checksums.

    Raises:
        ConversionError: bad input without ``skip_bad`` (the message lists file:line of each), or ``out_dir``
            holds a conversion made with other arguments (without ``overwrite``).
    """
    out = Path(out_dir)
    fingerprint = _fingerprint(inp, opts)
    if out.is_dir():
        remove_tmp_files(out)
        done = _verified_meta(out, fingerprint, opts.overwrite)
        if done is not None:
            return ConvertResult(out, done, True, [], [])
    _require_ffcv(opts)  # before anything is written, not after the shards
    out.mkdir(parents=True, exist_ok=True)
    (out / META_NAME).unlink(missing_ok=True)
    journal = Journal(out, fingerprint, keep=(META_NAME,))
    excluded = _precheck(inp, opts.skip_bad)
    state = RunState(skipped=[*inp.problems], repaired=[])
    state.skipped.extend(p for s in excluded.values() for p in s.values())
    with worker_pool(opts) as pool:
        for split, source in inp.sources.items():
            write_split_shards(pool, out, split, source, excluded[split], opts, journal, state)
    if "ffcv" in opts.formats:
        for split, source in inp.sources.items():
            _write_split_beton(out, split, source, opts, journal)
    meta = _finish(out, inp, opts, journal, state, fingerprint)
    return ConvertResult(out, meta, False, state.skipped, state.repaired)


def _require_ffcv(opts: ConvertOptions) -> None:
    from dnet_fast.convert.beton import ffcv_available

    if "ffcv" in opts.formats and not ffcv_available():
        msg = "ffcv is not installed: pip install 'dnet-fast[ffcv]' (docs/INSTALL.md) or convert with --formats wds"
        raise ConversionError(msg)


# ---------------------------------------------------------------------------------------------------------------
# Fingerprint, verification and journal.


def _fingerprint(inp: DatasetInput, opts: ConvertOptions) -> str:
    args = {k: v for k, v in asdict(opts).items() if k not in ("workers", "progress", "overwrite")}
    body = {
        "version": CONVERTER_VERSION,
        "dataset": inp.dataset,
        "args": args,
        "sources": {s: src.fingerprint() for s, src in inp.sources.items()},
    }
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


def verify_output(out_dir: str | Path) -> dict[str, Any]:
    """Checks that ``out_dir`` holds a complete conversion: meta.json present and every file's checksum right.

    Returns:
        The parsed meta.json.

    Raises:
        ConversionError: meta.json missing (an unfinished or killed conversion) or a file missing/changed.
    """
    out = Path(out_dir)
    meta = read_meta(out)
    if meta is None:
        msg = f"{out}: no {META_NAME}; the conversion did not finish (run the converter again to resume it)"
        raise ConversionError(msg)
    bad = [name for name, rec in meta["files"].items() if not file_ok(out / name, rec)]
    if bad:
        msg = f"{out}: files missing or changed since conversion: {', '.join(bad[:MAX_LISTED])}"
        raise ConversionError(msg)
    return meta


def _verified_meta(out: Path, fingerprint: str, overwrite: bool) -> dict[str, Any] | None:
    meta = read_meta(out)
    if meta is None:
        return None
    if meta.get("fingerprint") != fingerprint:
        if not overwrite:
            msg = (
                f"{out} holds a conversion made with other inputs or arguments "
                f"(see {out / META_NAME}); choose another output directory or pass --overwrite"
            )
            raise ConversionError(msg)
        return None
    try:
        return verify_output(out)
    except ConversionError:
        # Some file changed after conversion: the journal in meta.json lets the run redo just what is needed.
        atomic_write_json(out / JOURNAL_NAME, {"fingerprint": fingerprint, "units": meta["units"]})
        return None


# ---------------------------------------------------------------------------------------------------------------
# Validation before any image is written.


def _precheck(inp: DatasetInput, skip_bad: bool) -> dict[str, dict[int, Problem]]:
    """Missing and 0-byte files of every split, found with one stat per file; stops unless ``skip_bad``."""
    excluded: dict[str, dict[int, Problem]] = {}
    for split, source in inp.sources.items():
        excluded[split] = {}
        for i in range(len(source)):
            stamp = source.stamp(i)
            if stamp in ("missing", "empty"):
                what = "file does not exist" if stamp == "missing" else "0-byte file"
                excluded[split][i] = Problem(stamp, source.where(i), what)
    problems = [*inp.problems, *(p for s in excluded.values() for p in s.values())]
    if problems and not skip_bad:
        raise ConversionError.from_problems(problems)
    return excluded


# Betons, samples.tsv, report and meta.json.


def _split_shards(journal: Journal, split: str) -> list[str]:
    units = journal.shard_units(split)
    return [next(f for f in journal.units[n]["files"] if f.endswith(".tar")) for n in units]


def _members(journal: Journal, split: str) -> list[int]:
    return [i for n in journal.shard_units(split) for i in journal.units[n]["members"]]


def _write_split_beton(out: Path, split: str, source: Source, opts: ConvertOptions, journal: Journal) -> None:
    from dnet_fast.convert.beton import write_beton

    tars = _split_shards(journal, split)
    inputs = hashlib.sha256(
        "".join(
            journal.units[f"{split}/shard/{k}"]["files"][t]["sha256"] for k, t in enumerate(tars)
        ).encode()
    ).hexdigest()
    name = f"{split}/beton"
    if journal.valid(name, inputs=inputs):
        return
    labels = source.labels[np.asarray(_members(journal, split), dtype=np.int64)]
    beton = out / f"{split}.beton"
    write_beton(
        [out / t for t in tars],
        labels,
        beton,
        opts.image,
        workers=max(1, opts.workers),
        raw_fraction=opts.raw_fraction,
    )
    journal.record(name, [beton.name], inputs=inputs)


def _write_tsv(out: Path, split: str, source: Source, members: list[int]) -> str:
    name = samples_name(split)
    write_samples(out / name, ((sample_key(k), source.labels[i], source.origin(i)) for k, i in enumerate(members)))
    return name


def _finish(
    out: Path, inp: DatasetInput, opts: ConvertOptions, journal: Journal, state: RunState, fingerprint: str
) -> dict[str, Any]:
    splits, counts = {}, {}
    extra_files = []
    for split, source in inp.sources.items():
        members = _members(journal, split)
        labels = source.labels[np.asarray(members, dtype=np.int64)]
        counts[split] = np.bincount(labels, minlength=len(inp.class_names)).tolist()
        extra_files.append(_write_tsv(out, split, source, members))
        splits[split] = {
            "images": len(members),
            "shards": _split_shards(journal, split),
            "beton": f"{split}.beton" if "ffcv" in opts.formats else None,
            "samples": samples_name(split),
        }
    report = {"skipped": [asdict(p) for p in state.skipped], "repaired": state.repaired}
    atomic_write_json(out / REPORT_NAME, report)
    extra_files.append(REPORT_NAME)
    train_counts = np.asarray(counts["train"])
    stats = split_stats(np.repeat(np.arange(len(train_counts)), train_counts), with_groups=True)
    files = {f: rec for u in journal.units.values() for f, rec in u["files"].items()}
    files.update({f: file_record(out / f) for f in extra_files})
    meta = {
        "format": "dnet-fast-shards",
        "converter_version": CONVERTER_VERSION,
        "dataset": inp.dataset,
        "augment": inp.augment,
        "mean": list(inp.mean),
        "std": list(inp.std),
        "val_is_meta": inp.val_is_meta,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "fingerprint": fingerprint,
        "args": json.loads(json.dumps(asdict(opts), default=str)),
        "provenance": inp.provenance,
        "num_classes": len(inp.class_names),
        "classes": [
            {"id": c, "name": n, "original_id": int(o)}
            for c, (n, o) in enumerate(zip(inp.class_names, inp.original_ids, strict=True))
        ],
        "class_counts": counts,
        "groups": stats.groups,
        "class_groups": shot_groups(train_counts).tolist(),
        "splits": splits,
        "image": {**asdict(opts.image), "ext": opts.image.ext},
        "skipped": len(state.skipped),
        "repaired": len(state.repaired),
        "report": REPORT_NAME,
        "files": dict(sorted(files.items())),
        "units": journal.units,
    }
    atomic_write_json(out / META_NAME, meta)
    (out / JOURNAL_NAME).unlink(missing_ok=True)
    return meta
