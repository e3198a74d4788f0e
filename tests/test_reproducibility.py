"""The same config and seed give the same numbers whatever the core count (README, Reproducibility).

The demo preset pins ``run.threads: 1``; a run under ``OMP_NUM_THREADS=1`` and one under ``OMP_NUM_THREADS=2``
(what the 2-core box offers) must agree bit for bit: model, Difficulty-Net, history and test results.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dnet_fast.checkpoint import load_checkpoint
from dnet_fast.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def _train(out: Path, threads: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "dnet_fast", "train", "demo", "optim.epochs=3", "run.progress=false",
           "run.tensorboard=false", f"run.out_dir={out}"]
    done = subprocess.run(cmd, cwd=ROOT, env=env, check=False, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr


@pytest.mark.slow
def test_demo_results_do_not_depend_on_the_thread_count(tmp_path):
    assert load_config("demo").run.threads == 1  # the pin this test is about
    one, two = tmp_path / "t1", tmp_path / "t2"
    _train(one, 1)
    _train(two, 2)
    r1, r2 = (json.loads((d / "results.json").read_text()) for d in (one, two))
    assert r1["test"] == r2["test"]
    assert r1["best_val"] == r2["best_val"]
    assert (one / "history.jsonl").read_bytes() == (two / "history.jsonl").read_bytes()
    s1, s2 = load_checkpoint(one / "last.pt"), load_checkpoint(two / "last.pt")
    for part in ("model", "diffnet"):
        assert s1[part].keys() == s2[part].keys()
        for name, value in s1[part].items():
            assert torch.equal(value, s2[part][name]), f"{part}.{name}"
