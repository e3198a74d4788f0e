"""Result tables: grouping runs over seeds and mean ± std."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from dnet_fast.history import HistoryRow
from dnet_fast.plots import plot_runs
from dnet_fast.report import format_report, runs_table
from dnet_fast.rundir import run_label
from tests.runfiles import write_history


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


def _with_history(run, weights, difficulty):
    write_history(run, [HistoryRow(step=0, epoch=0, acc=[0.0] * 3, difficulty=[0.5] * 3, weights=[1.0] * 3),
                        HistoryRow(step=8, epoch=1, acc=[0.2, 0.5, 0.9], difficulty=difficulty, weights=weights)],
                  num_classes=3)


def test_table_shows_the_final_weight_spread_and_entropy(tmp_path):
    for seed, w in enumerate([[1.5, 1.0, 0.5], [1.2, 1.0, 0.8]]):
        run = tmp_path / f"exact-seed{seed}"
        _write(run, "exact", "ce", 0.5)
        _with_history(run, w, [x / 2 for x in w])
    _write(tmp_path / "ce-seed0", "off", "ce", 0.4)  # no history.jsonl: the spread is n/a
    table = runs_table([str(p) for p in sorted(tmp_path.iterdir())]).splitlines()
    assert table[0].endswith("| few | w_max/w_min | E |")
    rows = {line.split("|")[1].strip(): line for line in table[2:]}
    # ratios 3 and 1.5: mean 2.25 ± 1.061; E = −mean log w: (−log 1.5 − log 0.5)/3 = 0.09589, (−log 1.2 − log 0.8)/3
    e = [-(math.log(1.5) + math.log(0.5)) / 3, -(math.log(1.2) + math.log(0.8)) / 3]
    spread = f"| 2.25 ± 1.061 | {np.mean(e):.3g} ± {np.std(e, ddof=1):.3g} |"
    assert rows["Difficulty-Net (exact) + CE"].endswith(spread)
    assert rows["CE"].endswith("| n/a | n/a |")


def test_report_lists_plotted_figures_and_the_compare_command(tmp_path):
    run = tmp_path / "exact-seed0"
    _write(run, "exact", "ce", 0.5)
    _with_history(run, [1.5, 1.0, 0.5], [0.75, 0.5, 0.25])
    assert "figures" not in format_report([str(run)])
    written = plot_runs([run]).written
    text = format_report([str(run)])
    assert "figures (dnet-fast plot):" in text
    for path in written:
        assert f"  {path}" in text
    assert "dnet-fast compare A_RUN... --vs B_RUN..." in text


@pytest.mark.parametrize(
    ("mode", "temperature", "label"),
    [
        ("exact", 1.0, "Difficulty-Net (exact) + CE"),
        ("exact", 0.2, "Difficulty-Net (exact) + CE, T = 0.2"),
        ("frozen", 0.5, "Difficulty-Net (frozen) + CE, T = 0.5"),
        ("off", 0.2, "CE"),  # no Difficulty-Net: the value does nothing, so it is not named
    ],
)
def test_labels_name_a_difficulty_temperature(mode, temperature, label):
    cfg = {"meta": {"mode": mode, "lambda_dr": 0.3}, "loss": {"name": "ce"}, "diffnet": {"temperature": temperature}}
    assert run_label({"config": cfg}) == label
    if mode == "exact":
        assert run_label({"config": cfg}, with_lambda=True) == f"{label}, λ = 0.3"
