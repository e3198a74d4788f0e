"""Datasets, splits, loaders, transforms and shot groups; importing registers every built-in dataset and loader."""

from __future__ import annotations

# Importing a module registers its datasets/loaders; the shard dataset and the FFCV/DALI loaders import their
# optional dependencies lazily, so they register on every install.
from dnet_fast.data import cifar_lt, dali_loader, ffcv_loader, shards, splits, synthetic
from dnet_fast.data.base import DATASETS, LOADERS, DataBundle, FileSplit, Loader, LoaderSpec, TensorSplit
from dnet_fast.data.groups import FEW_THRESHOLD, MANY_THRESHOLD, group_accuracies, group_sizes, shot_groups
from dnet_fast.data.loaders import eval_batches, loader_workers, make_loader, resolve_loader
from dnet_fast.data.metaset import MetaSet
from dnet_fast.data.policies import Recipe

__all__ = [
    "DATASETS",
    "FEW_THRESHOLD",
    "LOADERS",
    "MANY_THRESHOLD",
    "DataBundle",
    "FileSplit",
    "Loader",
    "LoaderSpec",
    "MetaSet",
    "Recipe",
    "TensorSplit",
    "cifar_lt",
    "dali_loader",
    "eval_batches",
    "ffcv_loader",
    "group_accuracies",
    "group_sizes",
    "loader_workers",
    "make_loader",
    "resolve_loader",
    "shards",
    "shot_groups",
    "splits",
    "synthetic",
]
