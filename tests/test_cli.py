"""Smoke tests of the command line: train, eval, info, report, plot, compare and bad input."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dnet_fast.cli import main
from tests.runfiles import write_results


def test_info(capsys):
    assert main(["info", "--presets"]) == 0
    out = capsys.readouterr().out
    assert "extension   built and importable" in out
    assert "places_lt_r152" in out
    for row in ("1_focal", "4_cdb_ce_mwn", "5_no_dr_no_ml", "8_sample", "9_ours"):  # Table 4
        assert f"cifar100_lt_r32_ir100_t4_{row}" in out


@pytest.mark.parametrize(
    ("mode", "label"),
    [
        ("frozen", "Difficulty-Net (frozen) + CE"),
        ("exact_absolute", "Difficulty-Net (exact, absolute) + CE"),
        ("exact_sample", "Difficulty-Net (exact, sample-level) + CE"),
    ],
)
def test_table4_modes_train_end_to_end(tiny_overrides, tmp_path, capsys, mode, label):
    """One epoch of each ablation mode through the engine: loaders, A_C, history, checkpoint, label."""
    assert main(["train", "--meta", mode, *tiny_overrides, "optim.epochs=1", "run.tensorboard=false"]) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert 0.0 <= results["test"]["top1"] <= 1.0
    assert main(["report", str(tmp_path / "run")]) == 0
    assert label in capsys.readouterr().out


def test_console_script_is_installed():
    exe = shutil.which("dnet-fast") or str(Path(sys.executable).parent / "dnet-fast")
    done = subprocess.run([exe, "info", "--json"], capture_output=True, text=True, check=True, timeout=120)
    assert json.loads(done.stdout)["extension"]["built"] is True


def test_train_eval_report(tiny_overrides, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--meta", "exact", "--loss", "ce", *tiny_overrides]) == 0
    printed = capsys.readouterr().out
    assert "| test |" in printed
    for name in ("config.yaml", "env.json", "metrics.jsonl", "results.json", "last.pt", "history.jsonl"):
        assert (run / name).is_file(), name
    results = json.loads((run / "results.json").read_text())
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "epoch"] == [0, 1]
    assert any(r["kind"] == "train" for r in rows)

    assert main(["eval", str(run / "last.pt"), "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["top1"] == pytest.approx(results["test"]["top1"])

    assert main(["report", str(run)]) == 0
    assert "Difficulty-Net (exact) + CE" in capsys.readouterr().out

    # plot reads the real run's results.json, metrics.jsonl and history.jsonl
    assert main(["plot", str(run)]) == 0
    captured = capsys.readouterr()
    written = captured.out.split()
    for name in ("fig2_difficulty", "fig3_entropy", "fig4_weights", "per_class_accuracy", "curves"):
        assert str(run / f"{name}.png") in written, name
    assert all(Path(p).is_file() for p in written)


def test_plot_and_compare_hand_made_runs(tmp_path, capsys):
    test = {"top1": 0.5, "many": 0.9, "medium": 0.5, "few": 0.1, "per_class": [0.9, 0.8, 0.7, 0.5, 0.3, 0.1]}
    a = [write_results(tmp_path / f"ce-seed{s}", seed=s, mode="off", test=test) for s in range(3)]
    b = [write_results(tmp_path / f"dnet-seed{s}", seed=s, test={**test, "top1": 0.5 + s / 100})
         for s in range(2)]
    assert main(["plot", *map(str, a[:1] + b[:1]), "--out", str(tmp_path / "figs")]) == 0
    captured = capsys.readouterr()
    assert captured.out.split() == [str(tmp_path / "figs" / "per_class_accuracy-ce-seed0+dnet-seed0.png")]
    assert "note: fig2_difficulty: left out" in captured.err

    assert main(["compare", *map(str, a), "--vs", *map(str, b)]) == 0
    out = capsys.readouterr().out
    assert "95 % Student-t confidence interval" in out
    assert "| top-1 | 2 | +0.50 |" in out
    assert f"left out (no run with the same seed on the other side): {a[2]} (seed 2)" in out
    assert main(["compare", *map(str, a), "--vs", *map(str, b), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["metrics"]["top1"]["n"] == 2


def test_plot_and_compare_errors_are_one_line(tmp_path, capsys):
    assert main(["plot", str(tmp_path / "nope")]) == 2
    assert main(["compare", str(tmp_path / "nope"), "--vs", str(tmp_path)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert re.fullmatch(r"dnet-fast plot: error: .* not a run directory", err[0])
    assert re.fullmatch(r"dnet-fast compare: error: .* no results\.json \(has the run finished\?\)", err[1])
    with pytest.raises(SystemExit):
        main(["compare", str(tmp_path)])  # --vs is required


def test_tensorboard_events_written(tiny_overrides, tmp_path):
    assert main(["train", "--meta", "driver", *tiny_overrides, "optim.epochs=1", "run.tensorboard=true"]) == 0
    assert list((tmp_path / "run" / "tb").glob("events.out.tfevents.*"))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--lambda", "-1"], "meta.lambda_dr"),
        (["--batch-size", "0"], "optim.batch_size"),
        (["--imbalance", "0.5"], "data.imbalance"),
        (["--loss", "nope"], "valid: .*balanced_softmax"),
        (["--backbone", "vgg"], "valid: .*resnet32"),
        (["--meta", "fast"], "valid: .*driver"),
    ],
)
def test_bad_values_fail_before_writing(tiny_overrides, tmp_path, capsys, args, message):
    assert main(["train", *tiny_overrides, *args]) == 2
    err = capsys.readouterr().err
    assert "error" in err
    assert __import__("re").search(message, err)
    assert not (tmp_path / "run").exists()


def test_eval_of_missing_or_corrupt_checkpoint(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "none.pt")]) == 2
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    assert main(["eval", str(bad)]) == 2
    assert "cannot read checkpoint" in capsys.readouterr().err


def test_bench_passes_its_flags_to_the_runner(monkeypatch):
    seen = {}
    import benchmarks.runner

    monkeypatch.setattr(benchmarks.runner, "main", lambda argv: seen.setdefault("argv", argv) and 0)
    assert main(["bench", "--cpu", "--only", "step"]) == 0
    assert seen["argv"] == ["--cpu", "--only", "step"]


# ----------------------------------------------------------------------------------------------------------
# Flags and overrides in any order, --print-config, --max-iters


def _printed_config(capsys, argv):
    assert main(argv) == 0
    return yaml.safe_load(capsys.readouterr().out)


def test_flags_and_overrides_in_any_order(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = _printed_config(
        capsys, ["train", "cifar100_lt_r32_ir100", "--root", "cifar", "optim.epochs=200", "--print-config"]
    )
    assert (cfg["data"]["dataset"], cfg["optim"]["epochs"]) == ("cifar100_lt", 200)
    assert cfg["data"]["root"] == str(tmp_path / "cifar")  # absolute: the run stores where the data was
    cfg = _printed_config(capsys, ["train", "demo", "--resume", "run.out_dir=runs/demo", "--print-config"])
    assert cfg["run"]["out_dir"] == "runs/demo"
    cfg = _printed_config(
        capsys, ["train", "optim.lr=0.5", "--seed", "3", "demo", "meta.lambda_dr=0.2", "--print-config"]
    )
    assert (cfg["optim"]["lr"], cfg["run"]["seed"], cfg["meta"]["lambda_dr"]) == (0.5, 3, 0.2)
    assert not (tmp_path / "runs").exists()


def test_print_config_is_the_resolved_config_and_writes_nothing(tiny_overrides, tmp_path, capsys):
    from dnet_fast.config import config_to_dict, load_config

    cfg = _printed_config(capsys, ["train", *tiny_overrides, "--max-iters", "3", "--print-config"])
    assert cfg == config_to_dict(load_config(None, [*tiny_overrides, "run.max_iters=3"]))
    assert not (tmp_path / "run").exists()


def test_positional_tokens_that_are_not_overrides_are_rejected(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "demo", "cifar100_lt_r32_ir100", "--print-config"])
    assert exc.value.code == 2
    assert "unrecognized arguments: cifar100_lt_r32_ir100" in capsys.readouterr().err


def test_max_iters_stops_the_run_and_still_evaluates(tiny_overrides, tmp_path, capsys):
    half = len(tiny_overrides) // 2  # flags between the overrides
    argv = ["train", *tiny_overrides[:half], "--meta", "driver", *tiny_overrides[half:], "--max-iters", "3"]
    assert main(argv) == 0
    assert "| test |" in capsys.readouterr().out
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert (results["iterations"], results["epochs_done"]) == (3, 1)  # 5 batches per epoch: stopped in epoch 0
    assert "top1" in results["test"]
    assert results["loader"] == {"name": "resident", "workers": results["loader"]["workers"]}
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in rows if r["kind"] == "train") <= 3
    assert main(["train", *tiny_overrides, "--max-iters", "-1"]) == 2
    assert "run.max_iters" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------
# eval from any working directory, --data, a closed pipe


@pytest.fixture(scope="module")
def shard_run(tmp_path_factory):
    """A 2-epoch run (1 batch each) on converted Places-LT-like shards, trained with a relative data root."""
    from dnet_fast.convert import ConvertOptions, ImageOptions, convert, read_splits, split_file_input
    from tests.conftest import TINY_OVERRIDES
    from tests.places_tree import build_tree

    base = tmp_path_factory.mktemp("shard_run")
    tree = build_tree(base)
    opts = ConvertOptions(image=ImageOptions(max_side=64), formats=("wds",), progress=False, workers=0)
    convert(split_file_input("places_lt", tree.root, read_splits(tree.lists, 365)), base / "shards", opts)
    tiny = [o for o in TINY_OVERRIDES if not o.startswith("data.")]
    cwd = Path.cwd()
    os.chdir(base)
    try:
        argv = ["train", "--data", "shards", *tiny, "data.crop_size=16", "data.meta_per_class=2", "--out", "run"]
        assert main(argv) == 0
    finally:
        os.chdir(cwd)
    return base


def test_eval_from_another_directory_and_with_data(shard_run, tmp_path, monkeypatch, capsys):
    ckpt = shard_run / "run" / "last.pt"
    monkeypatch.chdir(tmp_path)  # the run used a relative data root: it was stored absolute
    assert main(["eval", str(ckpt), "--json"]) == 0
    first = json.loads(capsys.readouterr().out)
    moved = tmp_path / "moved"
    shutil.copytree(shard_run / "shards", moved)
    (moved / "train.samples.tsv").rename(moved / "x")  # the copy is damaged: --data must be what is read
    assert main(["eval", str(ckpt), "--data", "moved"]) == 2
    assert "moved" in capsys.readouterr().err
    (moved / "x").rename(moved / "train.samples.tsv")
    assert main(["eval", str(ckpt), "--data", "moved", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["top1"] == first["top1"]


def test_eval_into_a_closed_pipe_exits_quietly(shard_run):
    read, write = os.pipe()
    os.close(read)  # the reader is gone before anything is written (`| head` that already finished)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "dnet_fast", "eval", str(shard_run / "run" / "last.pt"), "--json"],
            stdout=write, stderr=subprocess.PIPE, text=True, timeout=120, cwd=shard_run,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
        )
    finally:
        os.close(write)
    assert done.stderr == ""
    assert done.returncode == 0
