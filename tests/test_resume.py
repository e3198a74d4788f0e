"""Resume is exact: 2 epochs straight equal 1 epoch + --resume 1 epoch, bit for bit on CPU."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from dnet_fast import plots
from dnet_fast.checkpoint import load_checkpoint
from dnet_fast.config import load_config
from dnet_fast.engine import fit
from tests.helpers import flatten_state


@pytest.mark.parametrize("mode", ["exact", "driver"])
def test_resume_is_bit_exact(tiny_overrides, tmp_path, mode):
    straight = load_config(None, [*tiny_overrides, f"meta.mode={mode}", f"run.out_dir={tmp_path / 'a'}"])
    split = load_config(None, [*tiny_overrides, f"meta.mode={mode}", f"run.out_dir={tmp_path / 'b'}"])
    full = fit(straight)
    partial = fit(split, stop_after=1)
    assert "test" not in partial
    assert load_checkpoint(tmp_path / "b" / "last.pt")["epoch"] == 1
    resumed = fit(split, resume=True)

    a = dict(flatten_state({k: v for k, v in load_checkpoint(tmp_path / "a" / "last.pt").items() if k != "config"}))
    b = dict(flatten_state({k: v for k, v in load_checkpoint(tmp_path / "b" / "last.pt").items() if k != "config"}))
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key
    assert full["test"] == resumed["test"]
    # The per-class history: no duplicate or missing refresh, the same rows, hence the same figures.
    assert (tmp_path / "a" / "history.jsonl").read_bytes() == (tmp_path / "b" / "history.jsonl").read_bytes()
    straight, again = plots.load_runs([tmp_path / "a"]), plots.load_runs([tmp_path / "b"])
    for figure in (plots.difficulty_data, plots.entropy_data, plots.weights_data):
        for da, db in zip(figure(straight), figure(again), strict=True):
            for field in dataclasses.fields(da):
                a_val, b_val = getattr(da, field.name), getattr(db, field.name)
                if isinstance(a_val, np.ndarray):
                    np.testing.assert_array_equal(a_val, b_val)


def test_resume_refuses_a_different_config(tiny_overrides, tmp_path):
    cfg = load_config(None, [*tiny_overrides, "meta.mode=driver"])
    fit(cfg, stop_after=1)
    other = load_config(None, [*tiny_overrides, "meta.mode=driver", "optim.lr=0.5"])
    with pytest.raises(ValueError, match=r"optim\.lr"):
        fit(other, resume=True)


def test_acc_every_remeasures_class_accuracy_mid_epoch(tiny_overrides, monkeypatch):
    from dnet_fast import engine

    calls = []
    real = engine._val_accuracy
    monkeypatch.setattr(engine, "_val_accuracy", lambda s: calls.append(s) or real(s))
    cfg = load_config(None, [*tiny_overrides, "meta.mode=driver", "meta.acc_every=2"])
    fit(cfg)
    steps = len(engine.build_session(cfg).loader) * cfg.optim.epochs
    # once before epoch 0 (init_acc=eval), once after each epoch, and at every 2nd step after the first
    assert len(calls) == 1 + cfg.optim.epochs + (steps - 1) // 2
