"""Dataset → FFCV .beton / WebDataset shard conversion: split validation, image checks, writers, meta.json."""

from __future__ import annotations

from dnet_fast.convert.golden import GOLDEN, Golden, check_golden, summary_lines
from dnet_fast.convert.images import BadImage, ImageOptions, Prepared
from dnet_fast.convert.inputs import array_input, read_splits, split_file_input
from dnet_fast.convert.pipeline import (
    CONVERTER_VERSION,
    ConvertOptions,
    ConvertResult,
    DatasetInput,
    convert,
    verify_output,
)
from dnet_fast.convert.splitfile import (
    ConversionError,
    Entry,
    Problem,
    SplitFile,
    git_blob_sha1,
    read_split,
    split_stats,
)
from dnet_fast.shardformat import META_NAME, ShardReader, read_index

__all__ = [
    "CONVERTER_VERSION",
    "GOLDEN",
    "META_NAME",
    "BadImage",
    "ConversionError",
    "ConvertOptions",
    "ConvertResult",
    "DatasetInput",
    "Entry",
    "Golden",
    "ImageOptions",
    "Prepared",
    "Problem",
    "ShardReader",
    "SplitFile",
    "array_input",
    "check_golden",
    "convert",
    "git_blob_sha1",
    "read_index",
    "read_split",
    "read_splits",
    "split_file_input",
    "split_stats",
    "summary_lines",
    "verify_output",
]
