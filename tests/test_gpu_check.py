"""The GPU verification script's dry run: every path, module, test selection and benchmark it calls exists."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ITEMS = ("env", "build", "tests_step", "bench_step", "bench_e2e", "tests_other", "loaders", "augment", "stage2", "ddp")


@pytest.mark.slow
def test_dry_run_checks_every_item(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(ROOT / "tools" / "gpu_check.sh"), str(tmp_path), "--dry-run"],
                          capture_output=True, text=True, env=env, timeout=600, check=False)
    rows = [line.split("|")[1:3] for line in (tmp_path / "summary.md").read_text().splitlines()[2:] if "|" in line]
    status = {name.strip(): state.strip() for name, state in rows}
    assert list(status) == list(ITEMS)
    failed = {name: (tmp_path / f"{name}.log").read_text()[-2000:] for name, s in status.items() if s != "dry-run ok"}
    assert not failed, failed
    assert done.returncode == 0, done.stdout + done.stderr


def test_an_item_that_does_not_fit_the_budget_is_skipped_with_its_reason(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable}
    subprocess.run(["bash", str(ROOT / "tools" / "gpu_check.sh"), str(tmp_path), "--only", "bench_step",
                    "--budget", "5"], capture_output=True, text=True, env=env, timeout=60, check=True)
    summary = (tmp_path / "summary.md").read_text()
    assert "| bench_step | skipped: " in summary
    assert "budget left, the item needs 170s" in summary
