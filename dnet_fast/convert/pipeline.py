"""The conversion driver: validate inputs, encode in parallel, write shards/betons/meta.json, resume safely."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dnet_fast.atomic import atomic_write_json, finite_json
from dnet_fast.convert.journal import JOURNAL_NAME, REPORT_NAME, Journal, remove_tmp_files
from dnet_fast.convert.options import ConvertOptions
from dnet_fast.convert.sources import Source
from dnet_fast.convert.split_shards import RunState, worker_pool, write_split_shards
from dnet_fast.convert.splitfile import MAX_LISTED, ConversionError, Problem, split_stats
from dnet_fast.data.base import IMAGENET_MEAN, IMAGENET_STD
from dnet_fast.data.groups import shot_groups
from dnet_fast.shardformat import (
    META_NAME,
    ShardDataError,
    file_ok,
    file_record,
    meta_digest,
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
    so a re-run after a crash (or after fixing an image that stopped it) resumes, and a re-run after success
    only verifies checksums. Input that can be checked without decoding (split-file lines, missing and empty
    files, splits left without any usable entry) is checked before anything is created or deleted in
    ``out_dir``; report.json, the sample tables and meta.json are written only when every split has images.

    Raises:
        ConversionError: bad input without ``skip_bad`` (the message lists file:line of each), a split with no
            usable entry, or ``out_dir`` holds a conversion made with other arguments (without ``overwrite``).
    """
    out = Path(out_dir)
    fingerprint = _fingerprint(inp, opts)
    done, resume_units = _verified_meta(out, fingerprint, opts.overwrite)
    if done is not None:
        return ConvertResult(out, done, True, [], [])
    excluded = _precheck(inp, opts.skip_bad)
    _require_ffcv(opts)  # before anything is written, not after the shards
    out.mkdir(parents=True, exist_ok=True)
    remove_tmp_files(out)
    if resume_units is not None:
        # Some file changed after conversion: the units in meta.json let the run redo just what is needed.
        atomic_write_json(out / JOURNAL_NAME, {"fingerprint": fingerprint, "units": resume_units})
    (out / META_NAME).unlink(missing_ok=True)
    journal = Journal(out, fingerprint, keep=(META_NAME,))
    state = RunState(skipped=[*inp.problems], repaired=[])
    state.skipped.extend(p for s in excluded.values() for p in s.values())
    with worker_pool(opts) as pool:
        for split, source in inp.sources.items():
            write_split_shards(pool, out, split, source, excluded[split], opts, journal, state)
    _check_nonempty(journal, inp, state)
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
    meta = _read_meta(out)
    if meta is None:
        msg = f"{out}: no {META_NAME}; the conversion did not finish (run the converter again to resume it)"
        raise ConversionError(msg)
    bad = [name for name, rec in meta["files"].items() if not file_ok(out / name, rec)]
    if bad:
        msg = f"{out}: files missing or changed since conversion: {', '.join(bad[:MAX_LISTED])}"
        raise ConversionError(msg)
    return meta


def _read_meta(out: Path) -> dict[str, Any] | None:
    try:
        return read_meta(out)
    except ShardDataError as err:
        msg = f"{err} (or delete {out / META_NAME} to convert again from the journaled units)"
        raise ConversionError(msg) from None


def _verified_meta(
    out: Path, fingerprint: str, overwrite: bool
) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """(meta of an identical complete conversion, or None; its units to resume from when some file changed).

    Reads only: nothing in ``out`` is changed before the inputs are validated.
    """
    meta = _read_meta(out)
    if meta is None:
        return None, None
    if meta.get("fingerprint") != fingerprint:
        if not overwrite:
            msg = (
                f"{out} holds a conversion made with other inputs or arguments "
                f"(see {out / META_NAME}); choose another output directory or pass --overwrite"
            )
            raise ConversionError(msg)
        return None, None
    try:
        return verify_output(out), None
    except ConversionError:
        return None, meta["units"]


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
    for split, source in inp.sources.items():
        if len(source) == len(excluded[split]):
            _no_images(split, list(excluded[split].values()) or _list_problems(inp, split))
    return excluded


def _list_problems(inp: DatasetInput, split: str) -> list[Problem]:
    """The line-level problems of ``split``'s list file (named in the provenance of split-file inputs)."""
    name = inp.provenance.get("lists", {}).get(split, {}).get("name")
    return [p for p in inp.problems if name and p.where.startswith(f"{name}:")] or inp.problems


def _no_images(split: str, problems: list[Problem]) -> None:
    example = f" (first bad entry: {problems[0]})" if problems else ""
    msg = f"split '{split}' has no usable image{example}; nothing was converted"
    raise ConversionError(msg)


def _check_nonempty(journal: Journal, inp: DatasetInput, state: RunState) -> None:
    """A split whose every image was skipped while encoding (``skip_bad``) stops before betons and tables."""
    for split in inp.sources:
        if not _members(journal, split):
            _no_images(split, state.skipped)


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
    write_samples(
        out / name, ((sample_key(k), source.labels[i], source.origin(i)) for k, i in enumerate(members))
    )
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
    try:
        return _write_meta(out, inp, opts, journal, state, fingerprint, splits, counts, extra_files)
    except BaseException:
        # Tables and report without meta.json would look like a finished conversion's: remove them.
        for name in extra_files:
            (out / name).unlink(missing_ok=True)
        raise


def _write_meta(
    out: Path,
    inp: DatasetInput,
    opts: ConvertOptions,
    journal: Journal,
    state: RunState,
    fingerprint: str,
    splits: dict[str, Any],
    counts: dict[str, list[int]],
    extra_files: list[str],
) -> dict[str, Any]:
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
    # Through JSON once: what is written (NaN as null, tuples as lists) is what the digest covers.
    meta = json.loads(json.dumps(finite_json(meta), allow_nan=False, default=str))
    meta["digest"] = meta_digest(meta)
    atomic_write_json(out / META_NAME, meta)
    (out / JOURNAL_NAME).unlink(missing_ok=True)
    return meta
