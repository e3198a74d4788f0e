"""Runs that never lie: divergence stops the run, bad inputs write nothing, run directories and resume stay clean."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dnet_fast import engine
from dnet_fast.checkpoint import load_checkpoint, save_checkpoint
from dnet_fast.cli import main
from dnet_fast.config import load_config
from dnet_fast.engine import TrainingDiverged, fit, resolve_run_dir


def _nan_from_epoch(monkeypatch, first_bad_epoch: int) -> None:
    """Every training batch of epochs >= ``first_bad_epoch`` holds a NaN pixel (a diverging input)."""
    real = engine.make_loader

    class Poisoned:
        def __init__(self, loader):
            self.loader = loader

        def __len__(self):
            return len(self.loader)

        def batches(self, epoch, start=0):
            for x, y in self.loader.batches(epoch, start):
                yield (x * math.nan if epoch >= first_bad_epoch else x), y

    monkeypatch.setattr(engine, "make_loader", lambda *a, **k: Poisoned(real(*a, **k)))


def test_a_diverged_run_stops_keeps_the_last_good_checkpoint_and_reports_nothing(tiny_overrides, tmp_path,
                                                                                 monkeypatch):
    _nan_from_epoch(monkeypatch, 1)
    cfg = load_config(None, [*tiny_overrides, "meta.mode=exact"])
    with pytest.raises(TrainingDiverged, match=r"epoch 1, iteration 0 of the epoch") as err:
        fit(cfg)
    run = tmp_path / "run"
    assert "last good checkpoint" in str(err.value)
    state = load_checkpoint(run / "last.pt")
    assert state["epoch"] == 1  # the epoch-0 checkpoint, never overwritten by the non-finite state
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert not (run / "results.json").exists()


def test_cli_lr_1e6_exits_non_zero_naming_the_epoch_and_prints_no_accuracy(tiny_overrides, tmp_path, capsys):
    assert main(["train", *tiny_overrides, "--lr", "1e6"]) == 3
    captured = capsys.readouterr()
    assert "training diverged" in captured.err
    assert "epoch 0" in captured.err
    assert "| test |" not in captured.out
    assert not (tmp_path / "run" / "results.json").exists()
    assert not (tmp_path / "run" / "last.pt").exists()  # no epoch ever finished finite


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.lr=inf", "optim.lr"),
        ("optim.lr=nan", "optim.lr"),
        ("meta.lambda_dr=.nan", "meta.lambda_dr"),
        ("optim.batch_size=100000", "larger than the training set"),
    ],
)
def test_bad_inputs_are_rejected_before_anything_is_written(tiny_overrides, tmp_path, capsys, override, message):
    assert main(["train", *tiny_overrides, override]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_preset_path_that_does_not_exist_is_an_error(tmp_path, capsys):
    assert main(["train", str(tmp_path / "missing" / "demo.yaml"), f"run.out_dir={tmp_path / 'run'}"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_checkpoint_whose_config_is_not_a_mapping_is_one_clear_error(tmp_path, capsys):
    path = tmp_path / "odd.pt"
    save_checkpoint(path, {"model": {}, "config": ["not", "a", "mapping"]})
    assert main(["eval", str(path)]) == 2
    err = capsys.readouterr().err
    assert "not a mapping" in err
    assert "Traceback" not in err


def test_training_into_an_existing_run_is_refused_and_appends_nothing(tiny_overrides, tmp_path, capsys):
    fit(load_config(None, [*tiny_overrides, "optim.epochs=1"]))
    metrics = (tmp_path / "run" / "metrics.jsonl").read_bytes()
    assert main(["train", *tiny_overrides, "optim.epochs=1"]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (tmp_path / "run" / "metrics.jsonl").read_bytes() == metrics


def test_the_default_run_directory_is_new_for_every_run_and_named_after_the_preset(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config("imagenet_lt_r10")
    first, second = resolve_run_dir(cfg).run.out_dir, resolve_run_dir(cfg).run.out_dir
    assert Path(first).parts[:2] == ("runs", "imagenet_lt_r10")
    Path(first).mkdir(parents=True)
    assert resolve_run_dir(cfg).run.out_dir != first
    assert Path(second).parts[:2] == ("runs", "imagenet_lt_r10")
    assert Path(resolve_run_dir(load_config(None)).run.out_dir).parts[:2] == ("runs", "train")


def test_a_refused_resume_writes_nothing(tiny_overrides, tmp_path, capsys):
    missing = tmp_path / "nothing-here"
    assert main(["train", *tiny_overrides, f"run.out_dir={missing}", "--resume"]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    assert not missing.exists()
    fit(load_config(None, [*tiny_overrides, "optim.epochs=1"]))
    config = (tmp_path / "run" / "config.yaml").read_bytes()
    assert main(["train", *tiny_overrides, "optim.lr=0.5", "--resume"]) == 2
    assert "optim.lr" in capsys.readouterr().err
    assert (tmp_path / "run" / "config.yaml").read_bytes() == config  # the refused values were not written


def test_resume_after_a_kill_during_a_checkpoint_write_logs_no_step_twice(tiny_overrides, tmp_path):
    cfg = load_config(None, [*tiny_overrides, "optim.epochs=3"])
    run = tmp_path / "run"
    fit(cfg, stop_after=1)
    shutil.copy(run / "last.pt", tmp_path / "epoch1.pt")
    fit(cfg, resume=True, stop_after=1)
    # The kill: epoch 2's rows are logged but its checkpoint write never completed (a torn temporary file).
    shutil.copy(tmp_path / "epoch1.pt", run / "last.pt")
    (run / "last.pt.tmp").write_bytes(b"torn")
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"kind": "train", "st')
    fit(cfg, resume=True)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    keys = [(r["kind"], r["step"]) for r in rows]
    assert len(keys) == len(set(keys))
    assert [r["step"] for r in rows if r["kind"] == "epoch"] == [0, 1, 2]


def test_one_summary_line_per_epoch_on_stdout_and_strict_json_results(tiny_overrides, tmp_path, capsys):
    assert main(["train", *tiny_overrides]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("epoch ")]
    assert [line.split(" | ")[0] for line in lines] == ["epoch 1/2", "epoch 2/2"]
    assert all("ETA" in line and "val top-1" in line for line in lines)
    assert "test: evaluating" in out

    def reject(constant):
        raise ValueError(constant)

    json.loads((tmp_path / "run" / "results.json").read_text(), parse_constant=reject)  # no NaN / Infinity


def test_warnings_reach_the_user(tiny_overrides, tmp_path):
    """Python logging is configured by the CLI: the ignored compile request of exact mode is printed."""
    args = [*tiny_overrides, "optim.epochs=1", "run.compile=true", "meta.mode=exact"]
    done = subprocess.run([sys.executable, "-m", "dnet_fast", "train", *args], capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    assert "run.compile ignored for meta.mode=exact" in done.stderr


def test_the_augmentation_recipe_reaches_the_loader_and_a_bad_spec_writes_nothing(tiny_overrides, tmp_path,
                                                                                  capsys):
    cfg = load_config(None, [*tiny_overrides, "data.autoaugment=cifar10", "data.cutout=4"])
    spec = engine.build_session(cfg).loader.spec
    assert (spec.recipe.autoaugment, spec.recipe.cutout) == ("cifar10", 4)
    assert main(["train", *tiny_overrides, "data.randaugment=rand-n2-m10-inc1"]) == 2
    assert "inc1" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
