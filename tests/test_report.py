"""Result tables: grouping runs over seeds and mean ± std."""

from __future__ import annotations

import json

import pytest

from dnet_fast.report import runs_table


def _write(run, mode, loss, top1):
    run.mkdir(parents=True)
    cfg = {"meta": {"mode": mode}, "loss": {"name": loss}}
    test = {"top1": top1, "many": 0.9, "medium": 0.5, "few": None}
    (run / "results.json").write_text(json.dumps({"config": cfg, "test": test}))


def test_groups_seeds_and_computes_mean_and_std(tmp_path):
    for seed, top1 in enumerate([0.5, 0.6, 0.7]):
        _write(tmp_path / "a" / f"exact-seed{seed}", "exact", "ce", top1)
    _write(tmp_path / "a" / "ce-seed0", "off", "ce", 0.4)
    _write(tmp_path / "b" / "exact-seed0", "exact", "ce", 0.1)
    table = runs_table([str(p) for p in sorted(tmp_path.glob("*/*"))]).splitlines()
    rows = {line.split("|")[1].strip(): line for line in table[2:]}
    # std with ddof=1 of (50, 60, 70) is 10; the missing few-shot group stays n/a rather than poisoning the mean.
    assert "| 3 | 60.00 ± 10.00 | 90.00 ± 0.00 | 50.00 ± 0.00 | n/a |" in rows[
        f"Difficulty-Net (exact) + CE [{tmp_path / 'a' / 'exact'}]"]
    assert "| 1 | 40.00 |" in rows["CE"]
    assert f"Difficulty-Net (exact) + CE [{tmp_path / 'b' / 'exact'}]" in rows


def test_unfinished_runs_are_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="results.json"):
        runs_table([str(tmp_path)])
    (tmp_path / "results.json").write_text(json.dumps({"config": {}, "epochs_done": 1}))
    with pytest.raises(ValueError, match="stopped before the end"):
        runs_table([str(tmp_path)])
