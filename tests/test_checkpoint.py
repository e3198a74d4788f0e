"""Atomic checkpoint writes and weights_only loading."""

from __future__ import annotations

import pytest
import torch

from dnet_fast.atomic import atomic_open
from dnet_fast.checkpoint import CheckpointError, load_checkpoint, save_checkpoint


def test_round_trip_weights_only(tmp_path):
    state = {"model": {"w": torch.arange(4.0)}, "config": {"run": {"seed": 1}}, "epoch": 3, "acc": None}
    save_checkpoint(tmp_path / "c.pt", state)
    loaded = load_checkpoint(tmp_path / "c.pt")
    assert torch.equal(loaded["model"]["w"], state["model"]["w"])
    assert loaded["epoch"] == 3


def _write_partial_then_fail(path):
    with atomic_open(path) as f:
        f.write(b"partial")
        raise RuntimeError("boom")


def test_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint(path, {"model": {}, "config": {}, "epoch": 1})
    with pytest.raises(RuntimeError, match="boom"):
        _write_partial_then_fail(path)
    assert load_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temporary file left behind


def test_truncated_and_foreign_files_are_rejected(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint(path, {"model": {"w": torch.ones(1000)}, "config": {}})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_checkpoint(path)
    torch.save({"weights": 1}, path)
    with pytest.raises(CheckpointError, match="not a dnet-fast checkpoint"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")


class Arbitrary:
    """A class outside torch's weights_only allow-list."""


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "c.pt"
    torch.save({"model": Arbitrary(), "config": {}}, path)
    with pytest.raises(CheckpointError):
        load_checkpoint(path)
