"""The package as users get it: sdist → wheel in a clean venv, its metadata, and a wheel used from a clone."""

from __future__ import annotations

import email
import importlib.machinery
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# The site-packages holding torch, numpy, yaml...: on PYTHONPATH of `python -S` runs, which read no .pth files
# (so no editable-install hook can hide which dnet_fast was imported).
DEPS_SITE = Path(torch.__file__).resolve().parents[1]
NOT_COPIED = shutil.ignore_patterns("__pycache__", "*.so", "*.pyd", "*.png")


def _extension_file() -> Path:
    from dnet_fast import _C

    return Path(_C.__file__)


def _clone_without_extension(base: Path) -> Path:
    """A source checkout as a wheel user has it: sources only, no compiled ``_C`` in ``dnet_fast/``."""
    clone = base / "clone"
    for folder in ("dnet_fast", "benchmarks"):
        shutil.copytree(REPO / folder, clone / folder, ignore=NOT_COPIED)
    return clone


def _fake_install(base: Path) -> Path:
    """A site folder holding a built ``dnet_fast`` (the sources plus this build's ``_C``)."""
    site = base / "site"
    shutil.copytree(REPO / "dnet_fast", site / "dnet_fast", ignore=NOT_COPIED)
    shutil.copy(_extension_file(), site / "dnet_fast" / _extension_file().name)
    return site


def _run_isolated(args: list[str], cwd: Path, site: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(DEPS_SITE)])}
    return subprocess.run([sys.executable, "-S", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def _check_clone_uses_installed(clone: Path, site: Path, console_script: Path) -> None:
    where = _run_isolated(["-c", "import benchmarks, dnet_fast; print(dnet_fast.__file__)"], clone, site)
    assert where.returncode == 0, where.stderr
    assert Path(where.stdout.strip()).parent == site / "dnet_fast"
    for argv in (["-m", "benchmarks", "--list"], [str(console_script), "bench", "--list"]):
        done = _run_isolated(argv, clone, site)
        assert done.returncode == 0, done.stderr
        assert "not loaded" not in done.stderr, done.stderr
        listed = {line.split()[0] for line in done.stdout.splitlines() if line.strip()}
        assert {"step", "loaders", "train_loaders", "engine"} <= listed, done.stdout


def test_benchmarks_from_a_clone_use_the_installed_build(tmp_path):
    clone, site = _clone_without_extension(tmp_path), _fake_install(tmp_path)
    script = tmp_path / "bin" / "dnet-fast"  # a console script: its folder, not the clone, is sys.path[0]
    script.parent.mkdir()
    script.write_text("import sys\nfrom dnet_fast.cli import main\nsys.exit(main())\n")
    _check_clone_uses_installed(clone, site, script)


def test_bench_outside_a_clone_says_what_to_do(tmp_path):
    site = _fake_install(tmp_path)
    script = tmp_path / "bin" / "dnet-fast"
    script.parent.mkdir()
    script.write_text("import sys\nfrom dnet_fast.cli import main\nsys.exit(main())\n")
    done = _run_isolated([str(script), "bench", "--list"], tmp_path, site)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [done.stderr.strip()]  # one line
    assert "clone of the dnet-fast repository" in done.stderr


# ----------------------------------------------------------------------------------------------------------
# sdist → wheel in a clean venv (the build requirements come from pip's configured indexes)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(sdist, wheel): the sdist built from this checkout, the wheel pip builds from it in a fresh venv."""
    pytest.importorskip("scikit_build_core")
    base = tmp_path_factory.mktemp("package")
    sdist_dir, wheel_dir, venv = base / "sdist", base / "wheel", base / "venv"
    hook = "import sys; from scikit_build_core.build import build_sdist; print(build_sdist(sys.argv[1]))"
    done = subprocess.run([sys.executable, "-c", hook, str(sdist_dir)], cwd=REPO, capture_output=True,
                          text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    sdist = sdist_dir / done.stdout.strip().splitlines()[-1]
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check"]
    # Build isolation: pip installs the [build-system] requirements itself, so a missing one fails here.
    done = subprocess.run([*pip, "wheel", "--no-deps", "-w", str(wheel_dir), str(sdist)], capture_output=True,
                          text=True, timeout=900, check=False)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    (wheel,) = wheel_dir.glob("dnet_fast-*.whl")
    return sdist, wheel, pip


@pytest.mark.slow
def test_sdist_holds_the_sources_and_no_build_outputs(built):
    sdist, _, _ = built
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    for needed in ("LICENSE", "pyproject.toml", "CMakeLists.txt", "csrc/bindings.cpp", "README.md",
                   "dnet_fast/configs/places_lt_r152.yaml", "dnet_fast/convert/cli.py"):
        assert needed in names, needed
    assert not [n for n in names if n.endswith((".so", ".pyc")) or n.startswith(("runs/", "build/"))]


@pytest.mark.slow
def test_wheel_contents_and_metadata(built):
    _, wheel, _ = built
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        (meta_name,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        meta = email.message_from_bytes(zf.read(meta_name))
        entry_points = zf.read(meta_name.replace("METADATA", "entry_points.txt")).decode()
    suffixes = tuple(importlib.machinery.EXTENSION_SUFFIXES)
    assert any(n.startswith("dnet_fast/_C") and n.endswith(suffixes) for n in names)
    assert {"dnet_fast/_C.pyi", "dnet_fast/configs/demo.yaml", "dnet_fast/convert/cli.py"} <= names
    assert any(n.endswith(".dist-info/licenses/LICENSE") or n.endswith(".dist-info/LICENSE") for n in names)
    assert "dnet-fast = dnet_fast.cli:main" in entry_points
    requires = meta.get_all("Requires-Dist")
    core = [r for r in requires if "extra ==" not in r]
    assert "torch>=2.4" in core  # never pinned: users run other torch builds
    torch_specs = [r.split(";")[0] for r in requires if re.match(r"torch\b(?!vision)", r)]
    assert torch_specs == ["torch>=2.4"]
    assert not [r for r in core if r.startswith("tensorboard")]  # optional, an extra
    assert {"tensorboard", "vision", "ffcv", "dali-cuda12", "dali-cuda13", "dev"} <= set(
        meta.get_all("Provides-Extra")
    )
    assert meta["License"] == "MIT" or "MIT" in (meta.get("License-Expression") or "")
    assert meta.get_all("Project-URL")


@pytest.mark.slow
def test_installed_wheel_runs_the_benchmarks_from_a_clone(built, tmp_path):
    _, wheel, pip = built
    site = tmp_path / "site"  # a non-editable install of the wheel (pip --target lays it out like site-packages)
    done = subprocess.run([*pip, "install", "--no-deps", "--no-index", "--target", str(site), str(wheel)],
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    _check_clone_uses_installed(_clone_without_extension(tmp_path), site, site / "bin" / "dnet-fast")


@pytest.mark.slow
def test_installed_wheel_converts_places_lt_trains_resnet152_and_benchmarks(built, tmp_path):
    """Issue 13's path for a user: the wheel alone (no checkout on the path) converts a miniature Places365 tree
    made from the real split files, trains ResNet-152 on the shards for one iteration, and runs the quick
    benchmarks from a clone."""
    from tests.places_tree import build_tree

    _, wheel, pip = built
    site = tmp_path / "site"
    done = subprocess.run([*pip, "install", "--no-deps", "--no-index", "--target", str(site), str(wheel)],
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    script = site / "bin" / "dnet-fast"
    tree = build_tree(tmp_path / "places365")
    shards, run, elsewhere = tmp_path / "shards", tmp_path / "run", tmp_path / "cwd"
    elsewhere.mkdir()
    convert = [str(script), "convert", "places-lt", "--root", str(tree.root), "--train-list", str(tree.lists["train"]),
               "--val-list", str(tree.lists["val"]), "--test-list", str(tree.lists["test"]), "--no-golden",
               "--out", str(shards), "--max-side", "64", "--workers", "0", "--no-progress"]
    done = _run_isolated(convert, elsewhere, site)
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads((shards / "meta.json").read_text())["splits"]["train"]["images"] == len(tree.lines["train"])
    train = [str(script), "train", "--backbone", "resnet152", "--data", str(shards), "--max-iters", "1",
             "--out", str(run), "optim.epochs=1", "optim.warmup_epochs=0", "optim.batch_size=4",
             "meta.meta_batch=5", "data.crop_size=32", "run.eval_batch=16", "run.tensorboard=false"]
    done = _run_isolated(train, elsewhere, site)
    assert done.returncode == 0, done.stdout + done.stderr
    results = json.loads((run / "results.json").read_text())
    assert results["iterations"] == 1
    assert results["config"]["model"]["backbone"] == "resnet152"
    assert 0.0 <= results["test"]["top1"] <= 1.0
    done = _run_isolated([str(script), "bench", "--quick", "--out", str(tmp_path / "bench")],
                         _clone_without_extension(tmp_path), site)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "not loaded" not in done.stderr, done.stderr


@pytest.mark.skipif(shutil.which("cmake") is None, reason="needs cmake")
def test_warnings_are_errors_only_in_development_builds(tmp_path):
    pybind11 = pytest.importorskip("pybind11")

    def compile_commands(*defines: str) -> list[dict]:
        build = tmp_path / f"build{len(defines)}"
        cmd = ["cmake", "-S", str(REPO), "-B", str(build), "-DCMAKE_EXPORT_COMPILE_COMMANDS=ON",
               f"-Dpybind11_DIR={pybind11.get_cmake_dir()}", f"-DPython_EXECUTABLE={sys.executable}", *defines]
        subprocess.run(cmd, check=True, capture_output=True, timeout=300)
        return json.loads((build / "compile_commands.json").read_text())

    user = compile_commands()  # what pip install runs: no option given
    assert user
    assert not [c for c in user if "-Werror" in c["command"]]
    assert all("-Werror" in c["command"] for c in compile_commands("-DDNET_WERROR=ON"))
    assert "-Ccmake.define.DNET_WERROR=ON" in (REPO / "Makefile").read_text()  # make / CI builds


def test_ffcv_extra_names_its_missing_system_packages(monkeypatch):
    from dnet_fast.data import ffcv_loader

    monkeypatch.setattr(ffcv_loader.shutil, "which", lambda _name: None)  # no pkg-config at all
    assert ffcv_loader.missing_system_packages() == ["pkg-config", "libopencv-dev", "libturbojpeg0-dev"]

    def broken_import(_name: str, hint: str) -> None:
        raise ImportError(hint) from ImportError("libopencv_core.so.406: cannot open shared object file")

    monkeypatch.setattr(ffcv_loader, "require_module", broken_import)
    with pytest.raises(ImportError, match="missing here: pkg-config libopencv-dev libturbojpeg0-dev") as exc:
        ffcv_loader.build_ffcv(None, None)
    assert "pip install 'dnet-fast[ffcv]'" in str(exc.value)
    assert "libopencv_core.so.406" in str(exc.value)  # the import's own error is kept
