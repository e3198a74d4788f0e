"""Smoke tests of the command line: train, eval, info, report and bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from dnet_fast.cli import main


def test_info(capsys):
    assert main(["info", "--presets"]) == 0
    out = capsys.readouterr().out
    assert "extension   built and importable" in out
    assert "places_lt_r152" in out


def test_console_script_is_installed():
    exe = shutil.which("dnet-fast") or str(Path(__import__("sys").executable).parent / "dnet-fast")
    done = subprocess.run([exe, "info", "--json"], capture_output=True, text=True, check=True, timeout=120)
    assert json.loads(done.stdout)["extension"]["built"] is True


def test_train_eval_report(tiny_overrides, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--meta", "exact", "--loss", "ce", *tiny_overrides]) == 0
    printed = capsys.readouterr().out
    assert "| test |" in printed
    for name in ("config.yaml", "env.json", "metrics.jsonl", "results.json", "last.pt"):
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
