"""Split-file reading and validation: lines, paths, labels, duplicates, statistics, git blob ids; bad-input errors."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from dnet_fast.data.groups import group_sizes

__all__ = [
    "MAX_LISTED",
    "ConversionError",
    "Entry",
    "Problem",
    "SplitFile",
    "SplitStats",
    "class_name_of",
    "find_cross_duplicates",
    "git_blob_sha1",
    "read_split",
    "split_stats",
]

MAX_LISTED = 20  # bad entries or files named in one error message
_BOM = b"\xef\xbb\xbf"  # UTF-8 byte-order mark that Windows editors put at the start of a text file


@dataclass(frozen=True)
class Entry:
    """One valid-looking line of a split file.

    Attributes:
        path: the relative image path exactly as written (POSIX separators).
        label: the original integer class id.
        line: 1-based line number in ``source``.
        source: the split file's name (for messages).
    """

    path: str
    label: int
    line: int
    source: str

    @property
    def where(self) -> str:
        """``file:line path`` for messages and reports."""
        return f"{self.source}:{self.line} {self.path}"


@dataclass(frozen=True)
class Problem:
    """A bad input found while converting.

    Attributes:
        kind: short machine-readable kind (``malformed``, ``duplicate``, ``escapes_root``,
            ``label_out_of_range``, ``missing``, ``empty``, ``corrupt``, ``too_large``, ...).
        where: ``file:line path`` (or another origin) of the offending entry.
        detail: a human-readable explanation.
    """

    kind: str
    where: str
    detail: str

    def __str__(self) -> str:
        return f"{self.where}: {self.kind}: {self.detail}"


class ConversionError(RuntimeError):
    """Bad input (default mode) or an inconsistent output directory; the message names files and lines."""

    @classmethod
    def from_problems(cls, problems: Sequence[Problem]) -> ConversionError:
        """The error that stops a conversion on bad input, listing the first ``MAX_LISTED`` problems."""
        lines = [str(p) for p in problems[:MAX_LISTED]]
        more = f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
        return cls(
            f"{len(problems)} bad input entr{'y' if len(problems) == 1 else 'ies'} (fix them or pass --skip-bad "
            "to skip and list them in report.json):\n  " + "\n  ".join(lines) + more
        )


@dataclass(frozen=True)
class SplitFile:
    """The parsed split file: accepted entries plus every line-level problem, in file order."""

    path: Path
    entries: tuple[Entry, ...]
    problems: tuple[Problem, ...]

    @property
    def labels(self) -> np.ndarray:
        """int64 (N,) labels of the accepted entries."""
        return np.fromiter((e.label for e in self.entries), dtype=np.int64, count=len(self.entries))


def read_split(path: str | Path, num_classes: int | None = None) -> SplitFile:
    """Parses ``<relative path><space><integer class id>`` lines (SPEC §9) and validates each one.

    Blank lines are ignored. Windows line ends (CRLF) and a UTF-8 byte-order mark are accepted: one CR before
    each LF and a BOM at the start are dropped (they cannot be part of a path or a label), so a list saved on
    Windows converts exactly like the LF original. A line is a problem when it does not hold exactly two
    whitespace-separated columns (paths contain no whitespace), has a non-integer or out-of-range label, names
    an absolute path or one that climbs out of the root with ``..``, or repeats an earlier path of the file.

    Args:
        path: the split file.
        num_classes: labels must lie in ``[0, num_classes)``; None accepts any label >= 0.

    Returns:
        The accepted entries and the problems, both in line order.
    """
    path = Path(path)
    entries: list[Entry] = []
    problems: list[Problem] = []
    seen: dict[str, int] = {}
    data = path.read_bytes().removeprefix(_BOM)
    # Split on LF only and drop one CR before it: a CR anywhere else is reported (see _parse_line).
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        raw = raw.removesuffix(b"\r")
        result = _parse_line(raw, lineno, path.name, num_classes)
        if result is None:
            continue
        if isinstance(result, Problem):
            problems.append(result)
            continue
        first = seen.setdefault(result.path, lineno)
        if first != lineno:
            problems.append(Problem("duplicate", result.where, f"same path as line {first}"))
            continue
        entries.append(result)
    return SplitFile(path, tuple(entries), tuple(problems))


def _parse_line(raw: bytes, lineno: int, source: str, num_classes: int | None) -> Entry | Problem | None:
    where = f"{source}:{lineno}"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return Problem("malformed", where, "line is not valid UTF-8")
    if not text.strip():
        return None
    fields = text.split()
    if len(fields) != 2:
        # A CR inside a line: a file with CR-only line ends (classic Mac OS), all of it read as one line.
        hint = "; the line holds a CR (CR-only line ends?)" if "\r" in text else ""
        shown = " ".join(fields)[:200]
        detail = f"expected '<path> <label>', got {len(fields)} column{'s' * (len(fields) != 1)}{hint}"
        return Problem("malformed", f"{where} {shown}", detail)
    rel, label_text = fields
    where = f"{where} {rel}"
    try:
        label = int(label_text)
    except ValueError:
        return Problem("malformed", where, f"class id '{label_text}' is not an integer")
    if label < 0 or (num_classes is not None and label >= num_classes):
        limit = f"[0, {num_classes})" if num_classes is not None else ">= 0"
        return Problem("label_out_of_range", where, f"class id {label} is outside {limit}")
    bad_path = _path_problem(rel)
    if bad_path:
        return Problem("escapes_root", where, bad_path)
    return Entry(rel, label, lineno, source)


def _path_problem(rel: str) -> str:
    pure = PurePosixPath(rel)
    if rel.startswith(("/", "\\")) or pure.is_absolute() or (len(rel) > 1 and rel[1] == ":"):
        return "absolute path; paths must be relative to the image root"
    if ".." in pure.parts or ".." in rel.split("\\"):
        return "path contains '..' and could leave the image root"
    return ""


def find_cross_duplicates(splits: Sequence[SplitFile]) -> list[Problem]:
    """Entries whose path already appears in an earlier split (train/val/test must be disjoint)."""
    first: dict[str, Entry] = {}
    problems: list[Problem] = []
    for split in splits:
        for e in split.entries:
            prev = first.setdefault(e.path, e)
            if prev is not e and prev.source != e.source:
                problems.append(Problem("duplicate", e.where, f"also listed at {prev.source}:{prev.line}"))
    return problems


def class_name_of(rel: str) -> str:
    """The class folder of an OLTR-style path (``train/<class>/x.jpg``; Places365 ``data_256/a/<class>/x``)."""
    parts = PurePosixPath(rel).parts
    if parts and parts[0] == "data_256" and len(parts) >= 4:
        return "-".join(parts[2:-1])
    return parts[-2] if len(parts) >= 2 else ""


@dataclass(frozen=True)
class SplitStats:
    """Summary numbers of one split (the golden-check subject)."""

    images: int
    classes: int
    max_per_class: int
    min_per_class: int
    groups: dict[str, int] | None = None


def split_stats(labels: Iterable[int] | np.ndarray, with_groups: bool = False) -> SplitStats:
    """Counts images and classes of a split; ``with_groups`` adds many/medium/few (train splits)."""
    labels = np.asarray(list(labels) if not isinstance(labels, np.ndarray) else labels, dtype=np.int64)
    counts = np.bincount(labels) if labels.size else np.zeros(0, np.int64)
    present = counts[counts > 0]
    groups = group_sizes(present) if with_groups else None
    return SplitStats(
        images=int(labels.size),
        classes=int(present.size),
        max_per_class=int(present.max()) if present.size else 0,
        min_per_class=int(present.min()) if present.size else 0,
        groups=groups,
    )


def git_blob_sha1(path: str | Path) -> str:
    """What ``git hash-object`` prints for the file (SPEC §9 identifies the official split files this way)."""
    data = Path(path).read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data, usedforsecurity=False).hexdigest()
