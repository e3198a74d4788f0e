"""A split's tar shards: resume whole shards whose sources are unchanged, encode the rest in parallel."""

from __future__ import annotations

import contextlib
import hashlib
import multiprocessing as mp
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from dnet_fast.convert.encode import encode_task, init_worker
from dnet_fast.convert.images import BadImage, Prepared
from dnet_fast.convert.journal import Journal
from dnet_fast.convert.options import ConvertOptions
from dnet_fast.convert.sources import Source
from dnet_fast.convert.splitfile import ConversionError, Problem
from dnet_fast.shardformat import ShardWriter, sample_key

__all__ = ["RunState", "worker_pool", "write_split_shards"]


@dataclass
class RunState:
    """What a conversion found so far, for report.json: skipped bad entries and repaired images."""

    skipped: list[Problem]
    repaired: list[dict[str, str]]


def _shard_name(split: str, k: int) -> str:
    return f"{split}-{k:06d}.tar"


def write_split_shards(
    pool: Any,
    out: Path,
    split: str,
    source: Source,
    excluded: dict[int, Problem],
    opts: ConvertOptions,
    journal: Journal,
    state: RunState,
) -> None:
    """Writes the tar shards of ``split``, journaling each one as it completes.

    Journaled shards whose sources are unchanged are kept, the rest are encoded with ``pool`` (from
    :func:`worker_pool`), and the split's beton is dropped. Bad entries are skipped into ``state`` with
    ``opts.skip_bad``, else they stop the conversion.
    """
    pos, k, kept = _reuse_shards(split, source, journal, state)
    for stale in journal.shard_units(split)[k:]:
        journal.drop(stale)
    journal.drop(f"{split}/beton")
    seq = _ShardSequence(out, split, source, journal, state, opts, k, kept, pos)
    results = _Results(
        pool, source, [i for i in range(pos, len(source)) if i not in excluded], opts, desc=split
    )
    try:
        for i, res in results:
            seq.add(i, res)
        seq.finish()
    except BaseException:
        seq.abort()
        raise
    finally:
        results.close()


class _ShardSequence:
    """Fills shards ``k, k+1, ...`` of a split in sample order and journals each one as it completes."""

    def __init__(
        self,
        out: Path,
        split: str,
        source: Source,
        journal: Journal,
        state: RunState,
        opts: ConvertOptions,
        k: int,
        kept: int,
        start: int,
    ) -> None:
        self.out, self.split, self.source, self.journal, self.state, self.opts = (
            out,
            split,
            source,
            journal,
            state,
            opts,
        )
        self.k, self.kept, self.start = k, kept, start
        self.writer: ShardWriter | None = None
        self.members: list[int] = []
        self.skipped: list[Problem] = []
        self.repaired: list[dict[str, str]] = []

    def add(self, i: int, res: Prepared | BadImage) -> None:
        where = self.source.where(i)
        if isinstance(res, BadImage):
            problem = Problem(res.kind, where, str(res))
            if not self.opts.skip_bad:
                raise ConversionError.from_problems([problem])
            self.skipped.append(problem)
            return
        if res.notes:
            self.repaired.append({"where": where, "notes": "; ".join(res.notes)})
        if self.writer is None:
            self.writer = ShardWriter(self.out / _shard_name(self.split, self.k))
        self.writer.add(sample_key(self.kept), res.ext, res.data, int(self.source.labels[i]))
        self.members.append(i)
        self.kept += 1
        if len(self.writer) == self.opts.shard_size:
            self._close(stop=i + 1)

    def finish(self) -> None:
        if self.writer is not None:
            self._close(stop=len(self.source))
        else:
            # Trailing skipped entries belong to no shard; they are still reported.
            self.state.skipped.extend(self.skipped)
            self.state.repaired.extend(self.repaired)

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()

    def _close(self, stop: int) -> None:
        assert self.writer is not None
        self.writer.close()
        self.journal.record(
            f"{self.split}/shard/{self.k}",
            [self.writer.tar_path.name, self.writer.idx_path.name],
            start=self.start,
            stop=stop,
            digest=_stamp_digest(self.source, self.start, stop),
            members=self.members,
            skipped=[asdict(p) for p in self.skipped],
            repaired=self.repaired,
        )
        self.state.skipped.extend(self.skipped)
        self.state.repaired.extend(self.repaired)
        self.writer, self.members, self.skipped, self.repaired = None, [], [], []
        self.start, self.k = stop, self.k + 1


def _reuse_shards(split: str, source: Source, journal: Journal, state: RunState) -> tuple[int, int, int]:
    pos = k = kept = 0
    while True:
        name = f"{split}/shard/{k}"
        unit = journal.units.get(name)
        if unit is None or unit["start"] != pos or unit["stop"] > len(source):
            return pos, k, kept
        if not journal.valid(name, digest=_stamp_digest(source, unit["start"], unit["stop"])):
            return pos, k, kept
        state.skipped.extend(Problem(**p) for p in unit["skipped"])
        state.repaired.extend(unit["repaired"])
        pos, k, kept = unit["stop"], k + 1, kept + len(unit["members"])


def _stamp_digest(source: Source, start: int, stop: int) -> str:
    h = hashlib.sha256()
    for i in range(start, stop):
        h.update(f"{source.origin(i)}|{int(source.labels[i])}|{source.stamp(i)}\n".encode())
    return h.hexdigest()


def worker_pool(opts: ConvertOptions) -> Any:
    """One pool per conversion (worker start-up is paid once); None means encode in this process."""
    if opts.workers == 0:
        init_worker(opts.image)
        return contextlib.nullcontext(None)
    # spawn: forking a process that runs torch or tqdm threads can deadlock; the workers only import
    # dnet_fast.convert.encode (Pillow, NumPy).
    return mp.get_context("spawn").Pool(opts.workers, initializer=init_worker, initargs=(opts.image,))


class _Results:
    """Ordered (index, Prepared | BadImage) results with a progress bar (images/s, ETA)."""

    def __init__(self, pool: Any, source: Source, todo: list[int], opts: ConvertOptions, desc: str) -> None:
        tasks = (source.task(i) for i in todo)
        if pool is None:
            self._it = map(encode_task, tasks)
        else:
            self._it = pool.imap(
                encode_task, tasks, chunksize=max(1, min(64, len(todo) // (8 * opts.workers)))
            )
        self._bar = tqdm(
            total=len(todo),
            desc=desc,
            unit="img",
            disable=not opts.progress or not todo,
            file=sys.stderr,
            mininterval=0.5,
            smoothing=0.1,
        )

    def __iter__(self) -> Iterator[tuple[int, Prepared | BadImage]]:
        for item in self._it:
            self._bar.update(1)
            yield item

    def close(self) -> None:
        self._bar.close()
