"""The converted-shard dataset ``shards``: a directory written by ``dnet_fast.convert`` (meta.json, tars, betons)."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dnet_fast.config import DataConfig
from dnet_fast.data.base import DATASETS, DataBundle, FileSplit, TensorSplit
from dnet_fast.data.splits import draw_per_class
from dnet_fast.shardformat import (
    META_NAME,
    ShardReader,
    file_ok,
    read_meta,
    read_samples,
    sample_sources,
    samples_name,
)
from dnet_fast.shardverify import verify_checksums

__all__ = ["ShardSplit", "build_shards", "decode_split", "load_meta", "open_split"]


@dataclass(frozen=True, eq=False)
class ShardSplit(FileSplit):
    """A split stored in a converted directory; images are read from the tar shards by index, never unpacked.

    It is a FileSplit whose ``path(i)`` is an in-memory file of the stored image bytes (Pillow opens it like a
    path), so the ``naive`` and ``resident`` loaders read it unchanged; ``ffcv`` reads ``beton`` and ``dali``
    reads ``tars`` directly.

    Attributes:
        name: the stored split (``train``, ``val``, ``test``).
        tars: absolute paths of the split's tar shards (each with a ``.idx`` beside it).
        beton: absolute path of the split's FFCV file, or None when not converted to FFCV.
        rows: (N,) int64 positions of these samples in the stored split (a subset keeps a subset of rows).
    """

    name: str = "train"
    tars: tuple[str, ...] = ()
    beton: str | None = None
    rows: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    _reader: list[ShardReader] = field(default_factory=list, repr=False)

    def reader(self) -> ShardReader:
        """The (lazily opened, per-process) random-access reader of the split's tars."""
        if not self._reader:
            self._reader.append(ShardReader([Path(t) for t in self.tars]))
        return self._reader[0]

    def open(self, i: int) -> io.BytesIO:
        """Stored image bytes of sample ``i`` as a file object."""
        return io.BytesIO(self.reader().image_bytes(int(self.rows[i])))

    def path(self, i: int) -> io.BytesIO:  # type: ignore[override]
        """Same as ``open``: loaders pass it to ``PIL.Image.open``."""
        return self.open(i)

    def where(self, i: int) -> str:
        """``<tar>: sample <key> (source <path>)`` of sample ``i``, for messages (reads samples.tsv once more)."""
        row = int(self.rows[i])
        sources = sample_sources(Path(self.root) / samples_name(self.name))
        source = sources[row] if row < len(sources) else "?"
        return f"{self.reader().tar_of(row)}: sample {self.paths[i]} (source {source})"

    def subset(self, indices: np.ndarray) -> ShardSplit:
        """The split restricted to ``indices`` (in that order), sharing the shards."""
        idx = np.asarray(indices, dtype=np.int64)
        return ShardSplit(
            self.root,
            tuple(self.paths[i] for i in idx),
            self.labels[idx],
            self.name,
            self.tars,
            self.beton,
            self.rows[idx],
            self._reader,
        )

    def __getstate__(self) -> dict[str, Any]:
        # Worker processes reopen the memory maps themselves.
        state = {k: getattr(self, k) for k in self.__dataclass_fields__}
        state["_reader"] = []
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        for k, v in state.items():
            object.__setattr__(self, k, v)


def load_meta(root: str | Path) -> dict[str, Any]:
    """Reads ``root/meta.json`` and checks every recorded file: present, recorded size, recorded SHA-256.

    The checksums are verified once per file and machine (``dnet_fast.shardverify``: later calls only ``stat``
    files that passed), so a file damaged after conversion stops the caller before any data is trusted.

    Raises:
        FileNotFoundError: no meta.json (not a converted directory, or an interrupted conversion) or a file gone.
        ShardDataError: meta.json is damaged, or a file's SHA-256 differs from it (``ShardIntegrityError``);
            one line naming the file.
    """
    root = Path(root)
    meta = read_meta(root)
    if meta is None:
        msg = f"{root}: no {META_NAME}: not a converted shard directory, or its conversion did not finish"
        raise FileNotFoundError(msg)
    for name, rec in meta["files"].items():
        if not file_ok(root / name, rec, checksum=False):
            msg = f"{root}: {name} is missing or has changed size since conversion (see {root / META_NAME})"
            raise FileNotFoundError(msg)
    verify_checksums(root, meta["files"])
    return meta


def open_split(root: str | Path, name: str, meta: dict[str, Any] | None = None) -> ShardSplit:
    """The stored split ``name`` of a converted directory as a ShardSplit (labels from ``<name>.samples.tsv``).

    Without ``meta`` the directory is checked first (:func:`load_meta`); a given ``meta`` is trusted as checked.
    """
    root = Path(root).resolve()
    meta = meta if meta is not None else load_meta(root)
    info = meta["splits"][name]
    keys, labels = read_samples(root / info["samples"])
    beton = root / info["beton"] if info.get("beton") else None
    return ShardSplit(
        root,
        keys,
        labels,
        name,
        tuple(str(root / t) for t in info["shards"]),
        str(beton) if beton else None,
        np.arange(len(labels), dtype=np.int64),
    )


def decode_split(split: ShardSplit) -> TensorSplit:
    """Decodes every image of ``split`` as stored (all must have one size, e.g. CIFAR) into a TensorSplit."""
    arrays = [np.asarray(split.image(i)) for i in range(len(split))]
    return TensorSplit(torch.from_numpy(np.stack(arrays)), split.labels)


@DATASETS.register("shards")
def build_shards(cfg: DataConfig, seed: int) -> DataBundle:
    """A converted directory (``cfg.root``) as a DataBundle of ShardSplits.

    The meta/val set is ``cfg.meta_per_class`` images per class drawn (seeded) from the stored val split, as the
    ``splits`` dataset does (SPEC §3), unless the conversion stored the meta set itself (CIFAR-LT).

    Args:
        cfg: uses root and meta_per_class.
        seed: seeds the meta/val draw.
    """
    meta = load_meta(cfg.root)
    train, val, test = (open_split(cfg.root, s, meta) for s in ("train", "val", "test"))
    info: dict[str, Any] = {"root": str(Path(cfg.root).resolve()), "dataset": meta["dataset"], "seed": seed}
    if not meta.get("val_is_meta", False):
        chosen = draw_per_class(val.labels, cfg.meta_per_class, seed)
        info.update(meta_per_class=cfg.meta_per_class, meta_indices=chosen.tolist())
        val = val.subset(chosen)
    return DataBundle(
        train=train,
        val=val,
        test=test,
        num_classes=int(meta["num_classes"]),
        class_names=tuple(c["name"] for c in meta["classes"]),
        augment=meta["augment"],
        mean=tuple(meta["mean"]),
        std=tuple(meta["std"]),
        info=info,
    )
