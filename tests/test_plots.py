"""dnet-fast plot: each figure's data checked against hand-made run files; file names; atomic PNG writes."""

from __future__ import annotations

from pathlib import Path

import matplotlib.figure
import numpy as np
import pytest

from dnet_fast.history import HistoryRow
from dnet_fast.plots import (
    FIGURES,
    class_accuracy_data,
    curves_data,
    difficulty_data,
    entropy_data,
    figure_paths,
    load_runs,
    plot_runs,
    representative_classes,
    weights_data,
)
from tests.runfiles import COUNTS, write_history, write_metrics, write_results

_ACC_0 = [0.0] * 6
_ACC_1 = [0.9, 0.7, 0.9, 0.3, 0.1, 0.5]  # sorted: 4 (0.1), 3 (0.3), 5 (0.5), 1 (0.7), 0 and 2 tie (0.9)
_D_1 = [0.2, 0.3, 0.25, 0.6, 0.8, 0.5]
_W_1 = [0.5, 1.0, 0.5, 1.5, 2.0, 0.5]  # sums to 6 = C


def _dnet_run(tmp_path, name="dnet-seed0", *, seed=0, lambda_dr=0.3):
    run = tmp_path / name
    write_results(run, seed=seed, lambda_dr=lambda_dr,
                  test={"top1": 0.5, "many": 0.8, "medium": 0.4, "few": 0.0,
                        "per_class": [0.9, 0.8, 0.7, 0.5, 0.3, None]})
    d0 = [0.5] * 6
    write_history(run, [
        HistoryRow(step=0, epoch=0, acc=_ACC_0, difficulty=d0, weights=[1.0] * 6),
        HistoryRow(step=10, epoch=1, acc=_ACC_1, difficulty=_D_1, weights=_W_1, train_acc=_ACC_1, val_acc=_ACC_1),
        HistoryRow(step=20, epoch=2, acc=_ACC_1, train_acc=_ACC_1),  # a refresh whose difficulties were lost
    ])
    write_metrics(run, [
        {"kind": "train", "step": 2, "loss": 2.0},
        {"kind": "train", "step": 4, "loss": 1.5},
        {"kind": "epoch", "step": 0, "val_top1": 0.25},
        {"kind": "train", "step": 4, "loss": 1.25},  # re-logged by a resumed run: the later row wins
        {"kind": "train", "step": 6, "loss": None},  # a NaN loss logged as null is left out
        {"kind": "epoch", "step": 1, "val_top1": 0.5},
    ])
    return run


def _cdb_run(tmp_path, name="cdb-seed0"):
    """An off-mode CDB-CE run: the loss's own weights, no difficulties, no metrics."""
    run = write_results(tmp_path / name, mode="off", loss="cdb_ce", test=None)
    write_history(run, [
        HistoryRow(step=0, epoch=0, acc=_ACC_0, weights=[1.0] * 6),
        HistoryRow(step=10, epoch=1, acc=_ACC_1, weights=[0.3, 0.9, 0.3, 1.2, 2.1, 1.2]),
    ])
    return run


def test_representative_classes_are_the_median_count_class_of_each_group():
    # many = 0, 1, 2 (400, 200, 120): median 200 -> class 1; medium = 3, 4 (60, 30): lower median 30 -> 4; few = 5
    assert representative_classes(np.array(COUNTS)) == {"many": 1, "medium": 4, "few": 5}
    # ties in count go by class index; an empty group is left out
    assert representative_classes(np.array([50, 50, 50, 200])) == {"many": 3, "medium": 1}


def test_fig2_uses_the_last_refresh_with_difficulties_sorted_by_accuracy(tmp_path):
    (item,) = difficulty_data(load_runs([_dnet_run(tmp_path)]))
    assert item.label == "Difficulty-Net (exact) + CE, λ = 0.3"
    assert item.step == 10
    np.testing.assert_array_equal(item.classes, [4, 3, 5, 1, 0, 2])
    np.testing.assert_allclose(item.acc, [0.1, 0.3, 0.5, 0.7, 0.9, 0.9])
    np.testing.assert_allclose(item.difficulty, [0.8, 0.6, 0.5, 0.3, 0.2, 0.25])


def test_fig3_entropy_per_refresh_with_difficulties(tmp_path):
    (curve,) = entropy_data(load_runs([_dnet_run(tmp_path), _cdb_run(tmp_path)]))
    np.testing.assert_array_equal(curve.x, [0, 10])
    d = np.array(_D_1)
    # uniform d at step 0 gives E = 0; at step 10 E = −mean log(6 d / Σ d), Σ d = 2.65
    np.testing.assert_allclose(curve.y, [0.0, -np.mean(np.log(6 * d / 2.65))], atol=1e-15)


def test_fig4_normalised_weights_of_the_chosen_classes(tmp_path):
    runs = load_runs([_cdb_run(tmp_path), _dnet_run(tmp_path)])
    cdb, dnet = weights_data(runs)
    assert cdb.label == "CDB-CE"
    assert (dnet.groups, dnet.classes, dnet.counts) == (("many", "medium", "few"), (1, 4, 5), (200, 30, 10))
    np.testing.assert_array_equal(dnet.steps, [0, 10])  # the step-20 row has no weights
    np.testing.assert_allclose(dnet.weights, [[1.0, 1.0, 1.0], [1.0, 2.0, 0.5]])
    np.testing.assert_allclose(cdb.weights, [[1.0, 1.0, 1.0], [0.9, 2.1, 1.2]])


def test_fig4_rows_are_normalised_to_mean_one(tmp_path):
    run = write_results(tmp_path / "r", test=None)
    write_history(run, [HistoryRow(step=0, epoch=0, acc=_ACC_0, weights=[2.0] * 6)])
    (panel,) = weights_data(load_runs([run]))
    np.testing.assert_allclose(panel.weights, [[1.0, 1.0, 1.0]])


def test_class_accuracy_against_counts_and_group_means(tmp_path):
    (item,) = class_accuracy_data(load_runs([_dnet_run(tmp_path), _cdb_run(tmp_path)]))
    np.testing.assert_array_equal(item.counts, COUNTS)
    np.testing.assert_allclose(item.acc, [0.9, 0.8, 0.7, 0.5, 0.3, np.nan])
    assert item.group_means["many"] == pytest.approx(0.8)
    assert item.group_means["medium"] == pytest.approx(0.4)
    assert np.isnan(item.group_means["few"])  # the only few-shot class is absent from the test set


def test_curves_from_metrics_last_row_per_step(tmp_path):
    (item,) = curves_data(load_runs([_dnet_run(tmp_path), _cdb_run(tmp_path)]))
    np.testing.assert_array_equal(item.loss_steps, [2, 4])
    np.testing.assert_allclose(item.loss, [2.0, 1.25])
    np.testing.assert_array_equal(item.epochs, [0, 1])
    np.testing.assert_allclose(item.val_top1, [0.25, 0.5])


def test_labels_are_made_unique(tmp_path):
    a = _dnet_run(tmp_path / "x", "dnet-seed0")
    b = _dnet_run(tmp_path / "y", "dnet-seed0", lambda_dr=0)
    c = _dnet_run(tmp_path / "z", "dnet-seed0", lambda_dr=0)
    labels = [r.label for r in load_runs([a, b, c])]
    assert labels[0] == "Difficulty-Net (exact) + CE, λ = 0.3"
    assert labels[1:] == [f"Difficulty-Net (exact) + CE, λ = 0 [{b}]", f"Difficulty-Net (exact) + CE, λ = 0 [{c}]"]


def test_figure_names(tmp_path):
    one = figure_paths([tmp_path / "a"])
    assert one["fig2_difficulty"] == tmp_path / "a" / "fig2_difficulty.png"
    two = figure_paths([tmp_path / "b-seed1", tmp_path / "a-seed0"])
    assert two["fig3_entropy"] == tmp_path / "fig3_entropy-a-seed0+b-seed1.png"
    other = figure_paths([tmp_path / "a-seed0", tmp_path / "c-seed0"])
    assert other["fig3_entropy"] != two["fig3_entropy"]
    into = figure_paths([tmp_path / "a"], tmp_path / "figs")
    assert into["curves"] == tmp_path / "figs" / "curves-a.png"
    many = figure_paths([tmp_path / f"a-very-long-run-name-seed{i}" for i in range(5)])
    name = many["curves"].name
    assert len(name) < 90
    assert name.startswith("curves-a-very-long-run-name-seed0+")


def test_plot_runs_writes_every_figure_with_data(tmp_path):
    dnet, cdb = _dnet_run(tmp_path), _cdb_run(tmp_path)
    done = plot_runs([dnet, cdb])
    paths = figure_paths([dnet, cdb])
    assert set(done.written) == set(paths.values())
    for path in done.written:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"fig2_difficulty: left out {cdb} (needs difficulties in history.jsonl)" in done.skipped
    assert f"curves: left out {cdb} (needs metrics.jsonl)" in done.skipped
    assert not list(tmp_path.glob("*.tmp"))


def test_single_run_plots_into_its_directory(tmp_path):
    run = _cdb_run(tmp_path)
    done = plot_runs([run])
    assert {p.name for p in done.written} == {"fig4_weights.png"}
    assert done.written[0].parent == run


def test_nothing_to_plot_and_missing_runs_are_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="nothing to plot"):
        plot_runs([tmp_path / "empty"])
    with pytest.raises(FileNotFoundError, match="not a run directory"):
        plot_runs([tmp_path / "missing"])


def test_a_failing_render_leaves_the_old_png_intact(tmp_path, monkeypatch):
    run = _dnet_run(tmp_path)
    plot_runs([run])
    target = figure_paths([run])["fig2_difficulty"]
    before = target.read_bytes()

    def broken_savefig(self, fname, **kwargs):
        with open(fname, "wb") as f:
            f.write(b"\x89PNG half")  # a partial file under the temporary name
        raise RuntimeError("renderer crashed")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", broken_savefig)
    with pytest.raises(RuntimeError, match="renderer crashed"):
        FIGURES["fig2_difficulty"].render(difficulty_data(load_runs([run])), target)
    assert target.read_bytes() == before
    assert not list(run.glob("*.tmp"))


def test_common_parent_keeps_relative_paths_relative(tmp_path, monkeypatch):
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    paths = figure_paths(["runs/a-seed0", "runs/b-seed0"])
    assert paths["curves"] == Path("runs/curves-a-seed0+b-seed0.png")
    paths = figure_paths(["../x/a", "b"])
    assert paths["curves"].parent == Path("..")
    assert paths["curves"].name == "curves-work_b+x_a.png"
