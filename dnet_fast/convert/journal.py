"""Output-directory bookkeeping: file names, the resume journal with checksums, and stray-file cleanup."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from dnet_fast.atomic import TMP_SUFFIX, atomic_write_json
from dnet_fast.shardformat import file_ok, file_record

__all__ = ["JOURNAL_NAME", "REPORT_NAME", "Journal", "is_output_name", "remove_tmp_files"]

JOURNAL_NAME = "progress.json"  # resume journal of completed units while a conversion runs
REPORT_NAME = "report.json"
_OUTPUT_NAME = re.compile(r"[A-Za-z0-9_]+(-\d{6}\.(tar|idx)|\.beton|\.samples\.tsv)")


def remove_tmp_files(directory: str | Path) -> list[Path]:
    """Deletes the ``*.tmp`` files an interrupted conversion left in its output directory; returns them."""
    removed = sorted(Path(directory).glob(f"*{TMP_SUFFIX}"))
    for p in removed:
        p.unlink(missing_ok=True)
    return removed


def is_output_name(name: str) -> bool:
    """Whether ``name`` is a file this converter writes (no other file in the output directory is touched)."""
    return name == REPORT_NAME or _OUTPUT_NAME.fullmatch(name) is not None


class Journal:
    """Completed units (a shard, a beton) with their files' checksums; persisted after each unit.

    Args:
        out: the output directory.
        fingerprint: identity of the inputs and arguments; a journal of another fingerprint is ignored.
        keep: names never deleted as strays (meta.json).
    """

    def __init__(self, out: Path, fingerprint: str, keep: tuple[str, ...] = ()) -> None:
        self.out = out
        self.fingerprint = fingerprint
        self.keep = keep
        path = out / JOURNAL_NAME
        data = json.loads(path.read_text()) if path.is_file() else {}
        self.units: dict[str, dict[str, Any]] = (
            data.get("units", {}) if data.get("fingerprint") == fingerprint else {}
        )
        self._remove_unjournaled()

    def _remove_unjournaled(self) -> None:
        # A file renamed into place just before a crash has no journal entry: it is never trusted.
        known = {name for u in self.units.values() for name in u["files"]} | {JOURNAL_NAME, *self.keep}
        for p in self.out.iterdir():
            if p.is_file() and p.name not in known and is_output_name(p.name):
                p.unlink()

    def shard_units(self, split: str) -> list[str]:
        """Names of the journaled shard units of ``split`` (``<split>/shard/<k>``), in shard order."""
        prefix = f"{split}/shard/"
        return sorted((n for n in self.units if n.startswith(prefix)), key=lambda n: int(n.rsplit("/", 1)[1]))

    def valid(self, name: str, **expect: Any) -> bool:
        unit = self.units.get(name)
        if unit is None or any(unit.get(k) != v for k, v in expect.items()):
            return False
        return all(file_ok(self.out / f, rec) for f, rec in unit["files"].items())

    def record(self, name: str, files: list[str], **info: Any) -> None:
        self.units[name] = {"files": {f: file_record(self.out / f) for f in files}, **info}
        atomic_write_json(self.out / JOURNAL_NAME, {"fingerprint": self.fingerprint, "units": self.units})

    def drop(self, name: str) -> None:
        for f in self.units.pop(name, {"files": {}})["files"]:
            (self.out / f).unlink(missing_ok=True)
