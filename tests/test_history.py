"""history.jsonl: compact rows, validation, torn lines, resume without duplicate or orphaned steps, entropy."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from dnet_fast.history import HISTORY_FILE, HistoryRow, HistoryWriter, entropy, read_history
from dnet_fast.rundir import read_jsonl


def _row(step, epoch, scale=1.0):
    return HistoryRow(step=step, epoch=epoch, acc=[0.2 * scale, 0.4, 0.8], difficulty=[0.6, 0.5, 0.4],
                      weights=[1.2, 1.0, 0.8], train_acc=[0.1, 0.3, 0.9], val_acc=[0.2 * scale, 0.4, 0.8])


def _write(run, rows, resume_step=None):
    with HistoryWriter(run, 3, resume_step=resume_step) as writer:
        for row in rows:
            writer.append(row)


def _steps(run):
    return [json.loads(line)["step"] for line in (run / HISTORY_FILE).read_text().splitlines()]


def test_row_format_is_compact_json(tmp_path):
    with HistoryWriter(tmp_path, 3, resume_step=None) as writer:
        writer.append(HistoryRow(step=0, epoch=0, acc=np.array([1 / 3, 0.0, float("nan")]),
                                 weights=torch.tensor([1.0, 2.0, float("inf")], dtype=torch.float64)))
    line = (tmp_path / HISTORY_FILE).read_text()
    assert line == ('{"step":0,"epoch":0,"acc":[0.333333,0.0,null],"difficulty":null,"weights":[1.0,2.0,null],'
                    '"train_acc":null,"val_acc":null}\n')


def test_read_back_stacks_rows_with_nan_for_null(tmp_path):
    _write(tmp_path, [HistoryRow(step=0, epoch=0, acc=[0.0, 0.0, 0.0]), _row(5, 1), _row(10, 2, scale=2)])
    h = read_history(tmp_path)
    assert len(h) == 3
    assert h.num_classes == 3
    np.testing.assert_array_equal(h.step, [0, 5, 10])
    np.testing.assert_array_equal(h.epoch, [0, 1, 2])
    np.testing.assert_allclose(h.acc[2], [0.4, 0.4, 0.8])
    assert np.isnan(h.difficulty[0]).all()
    np.testing.assert_allclose(h.weights[1], [1.2, 1.0, 0.8])
    np.testing.assert_allclose(h.train_acc[1], [0.1, 0.3, 0.9])
    assert h.last_row_with("difficulty") == 2
    assert h.last_row_with("train_acc") == 2
    # d = (0.6, 0.5, 0.4): C·d/Σd = 2d = (1.2, 1.0, 0.8) -> E = −(log 1.2 + log 1 + log 0.8)/3
    expected = -(math.log(1.2) + math.log(0.8)) / 3
    assert np.isnan(h.entropy[0])
    assert h.entropy[1] == pytest.approx(expected, rel=1e-12)


def test_entropy_is_zero_for_uniform_and_scale_invariant():
    assert entropy(np.full(7, 0.3)) == pytest.approx(0.0, abs=1e-15)
    d = np.array([[0.9, 0.1], [0.45, 0.05]])
    # C·d/Σd = (1.8, 0.2) in both rows: E = −(log 1.8 + log 0.2)/2
    np.testing.assert_allclose(entropy(d), -(math.log(1.8) + math.log(0.2)) / 2)


@pytest.mark.parametrize(
    ("row", "message"),
    [
        (HistoryRow(step=0, epoch=0, acc=[0.1, 0.2]), r"acc must have shape \(3,\)"),
        (HistoryRow(step=0, epoch=0, acc=[0.1, 0.2, 0.3], difficulty=np.zeros((1, 3))), "difficulty must have"),
        (HistoryRow(step=-1, epoch=0, acc=[0.1, 0.2, 0.3]), "step must be an int >= 0"),
        (HistoryRow(step=1.5, epoch=0, acc=[0.1, 0.2, 0.3]), "step must be an int"),
        (HistoryRow(step=0, epoch=0, acc=None), "acc .* is required"),
    ],
)
def test_append_validates(tmp_path, row, message):
    with HistoryWriter(tmp_path, 3, resume_step=None) as writer, pytest.raises(ValueError, match=message):
        writer.append(row)
    assert (tmp_path / HISTORY_FILE).read_text() == ""


def test_steps_must_increase(tmp_path):
    with HistoryWriter(tmp_path, 3, resume_step=None) as writer:
        writer.append(_row(4, 1))
        with pytest.raises(ValueError, match="not after the last written step 4"):
            writer.append(_row(4, 1))
        assert writer.last_step == 4


def test_torn_last_line_is_ignored_but_a_damaged_middle_line_is_an_error(tmp_path):
    _write(tmp_path, [_row(0, 0), _row(5, 1)])
    path = tmp_path / HISTORY_FILE
    with path.open("a") as f:
        f.write('{"step":10,"epoch":2,"acc":[0.1,')  # killed mid-write
    np.testing.assert_array_equal(read_history(tmp_path).step, [0, 5])
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], lines[2], lines[1]]) + "\n")
    with pytest.raises(ValueError, match=r"history.jsonl:2: not a JSON line"):
        read_history(tmp_path)


def test_last_row_per_step_wins_and_rows_are_sorted(tmp_path):
    path = tmp_path / HISTORY_FILE
    rows = [{"step": 5, "epoch": 1, "acc": [0.5, 0.5, 0.5]}, {"step": 0, "epoch": 0, "acc": [0, 0, 0]},
            {"step": 5, "epoch": 1, "acc": [0.25, 0.5, 0.75]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    h = read_history(tmp_path)
    np.testing.assert_array_equal(h.step, [0, 5])
    np.testing.assert_allclose(h.acc[1], [0.25, 0.5, 0.75])


def test_reader_rejects_missing_empty_and_ragged_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no history file"):
        read_history(tmp_path)
    (tmp_path / HISTORY_FILE).write_text("")
    with pytest.raises(ValueError, match="no rows yet"):
        read_history(tmp_path)
    rows = [{"step": 0, "epoch": 0, "acc": [0, 0, 0]}, {"step": 1, "epoch": 0, "acc": [0, 0]}]
    (tmp_path / HISTORY_FILE).write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=r"step 1\): acc must be a list of 3 numbers"):
        read_history(tmp_path)


def test_resume_drops_rows_after_the_checkpoint_and_the_torn_line(tmp_path):
    # The killed run wrote refreshes at 0, 5, 10 and 15 (and tore 20); its last checkpoint is at step 10.
    _write(tmp_path, [_row(0, 0), _row(5, 1), _row(10, 2), _row(15, 3)])
    with (tmp_path / HISTORY_FILE).open("a") as f:
        f.write('{"step":20,')
    _write(tmp_path, [_row(15, 3, scale=2), _row(20, 4)], resume_step=10)
    assert _steps(tmp_path) == [0, 5, 10, 15, 20]  # no duplicate, no orphan
    h = read_history(tmp_path)
    assert h.acc[3, 0] == pytest.approx(0.4)  # the resumed run's row at 15, not the killed run's
    assert not list(tmp_path.glob("*.tmp"))


def test_resume_continues_after_the_kept_rows(tmp_path):
    _write(tmp_path, [_row(0, 0), _row(5, 1)])
    with HistoryWriter(tmp_path, 3, resume_step=5) as writer:
        assert writer.last_step == 5
        with pytest.raises(ValueError, match="not after"):
            writer.append(_row(5, 1))  # the checkpoint's own refresh was written before the checkpoint


def test_fresh_run_replaces_an_old_history(tmp_path):
    _write(tmp_path, [_row(0, 0), _row(5, 1)])
    _write(tmp_path, [_row(0, 0)])
    assert _steps(tmp_path) == [0]


def test_resume_without_history_or_with_another_class_count(tmp_path):
    _write(tmp_path / "new", [_row(7, 2)], resume_step=5)  # checkpoint from before history files existed
    assert _steps(tmp_path / "new") == [7]
    _write(tmp_path / "old", [_row(0, 0)])
    with pytest.raises(ValueError, match="acc must be a list of 4 numbers"):
        HistoryWriter(tmp_path / "old", 4, resume_step=5)
    assert _steps(tmp_path / "old") == [0]  # left untouched


def test_rows_are_durable_lines_readable_while_the_writer_is_open(tmp_path):
    with HistoryWriter(tmp_path, 3, resume_step=None) as writer:
        writer.append(_row(0, 0))
        assert [r["step"] for r in read_jsonl(tmp_path / HISTORY_FILE)] == [0]
