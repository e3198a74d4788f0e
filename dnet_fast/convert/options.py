"""ConvertOptions: the output settings of one conversion (shared by the driver and the shard writers)."""

from __future__ import annotations

from dataclasses import dataclass, field

from dnet_fast.convert.images import ImageOptions

__all__ = ["ConvertOptions"]


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
        if not 0.0 <= self.raw_fraction <= 1.0:  # also refuses NaN, which meta.json could not hold
            msg = f"raw_fraction must lie in [0, 1], got {self.raw_fraction}"
            raise ValueError(msg)
