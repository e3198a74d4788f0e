"""Every command README.md shows parses as written, and the ones that fit the CPU box run, in README order.

Commands come from the ```bash blocks (continuation lines joined, comments dropped). Each ``dnet-fast`` command
(also under ``torchrun`` and through ``tools/convert_*.py``) must parse with the real parsers, and a ``train``
command's preset and overrides must make a valid config. The runnable ones (no external data, checkpoint or
download) are executed by bash in one scratch directory, so earlier commands create the runs later ones read;
only size overrides are appended (a few epochs).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from dnet_fast import cli
from dnet_fast.config import load_config
from dnet_fast.convert.cli import get_parser as convert_parser
from dnet_fast.plugins import check_names

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BLOCK = re.compile(r"```bash\n(.*?)```", re.S)
COMMENT = re.compile(r"(^|\s)#.*$")
# What the CPU box cannot run from a fresh checkout: real datasets, downloads, the GPU-sized presets.
EXTERNAL = re.compile(r"/data\b|~/|shards/|\.pth\b|--root\b|--data\b|--nnodes|nproc-per-node 8|imagenet|places|cifar")
# The sizes appended to a command that trains, so that it fits a test.
SIZES = {"stage1": ["optim.epochs=3"], "stage2": ["stage2.epochs=1"]}  # 3 = the demo's warm-up + 1


@dataclass(frozen=True)
class Command:
    """One README command: the shell text and the ``dnet-fast`` argv it amounts to (None: not a dnet-fast one)."""

    text: str
    argv: tuple[str, ...] | None


SHELL_OPERATORS = {"|", "||", "&&", ";", ">", ">>", "2>", "2>&1"}


def _argv(words: list[str]) -> tuple[str, ...] | None:
    """The dnet-fast arguments of a command line (up to a pipe or redirection), or None when it runs no dnet-fast."""
    words = words[: next((i for i, w in enumerate(words) if w in SHELL_OPERATORS), len(words))]
    while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):  # VAR=value prefixes
        words = words[1:]
    if not words:
        return None
    program = Path(words[0]).name
    if program == "dnet-fast":
        return tuple(words[1:])
    if program == "torchrun":
        for i, word in enumerate(words):
            if word == "dnet_fast" and words[i - 1] == "-m" or Path(word).name == "dnet-fast":
                return tuple(words[i + 1:])
        return None
    if program.startswith("python") and len(words) > 1:
        script = Path(words[1]).name
        if script.startswith("convert_") and script.endswith(".py"):
            name = script.removeprefix("convert_").removesuffix(".py").replace("_", "-")
            return ("convert", name, *words[2:])
    return None


def readme_commands(text: str) -> list[Command]:
    """Every command line of the bash blocks of ``text``, in order."""
    found = []
    for block in BLOCK.findall(text):
        for line in block.replace("\\\n", " ").splitlines():
            line = COMMENT.sub("", line).strip()
            if line:
                found.append(Command(line, _argv(shlex.split(line))))
    return found


COMMANDS = readme_commands(README.read_text())
DNET = [c for c in COMMANDS if c.argv is not None]


def test_the_extraction_sees_every_kind_of_command():
    sample = """```bash
dnet-fast train demo --seed 1   # a comment
dnet-fast eval runs/x/last.pt --json | head -5
torchrun --nproc-per-node 2 -m dnet_fast train demo \\
    --out runs/x
.venv/bin/python tools/convert_places_lt.py --root R
make demo
```"""
    got = readme_commands(sample)
    assert [c.argv for c in got] == [
        ("train", "demo", "--seed", "1"),
        ("eval", "runs/x/last.pt", "--json"),
        ("train", "demo", "--out", "runs/x"),
        ("convert", "places-lt", "--root", "R"),
        None,
    ]
    assert len(DNET) >= 20  # the README's usage, stage-2, data and torchrun blocks
    assert any(c.argv[0] == "convert" for c in DNET)
    assert any("torchrun" in c.text for c in DNET)


@pytest.mark.parametrize("command", DNET, ids=[c.text[:80] for c in DNET])
def test_readme_command_parses(command):
    argv = list(command.argv)
    if argv[0] == "convert":
        convert_parser().parse_args(argv[1:])
        return
    if argv[0] == "bench":
        from benchmarks.runner import get_parser as bench_parser

        bench_parser().parse_args(argv[1:])
        return
    args = cli._parse(argv)  # argparse exits on anything it does not accept
    if args.command == "train" and args.from_run is None:
        check_names(load_config(args.preset, cli._train_overrides(args)))


def _runnable(command: Command) -> bool:
    return (command.argv[0] in {"train", "eval", "report", "compare", "plot", "info"}
            and not EXTERNAL.search(command.text))


def _sized(command: Command) -> str:
    argv = command.argv
    if argv[0] != "train" or "--print-config" in argv:
        return command.text
    return " ".join([command.text, *SIZES["stage2" if "--from" in argv else "stage1"]])


@pytest.mark.slow
def test_readme_commands_run(tmp_path):
    runnable = [c for c in DNET if _runnable(c)]
    assert len(runnable) >= 10
    assert any("--from" in c.argv for c in runnable)
    assert any("torchrun" in c.text for c in runnable)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": str(ROOT)}
    for command in runnable:
        done = subprocess.run(["bash", "-c", _sized(command)], cwd=tmp_path, env=env, capture_output=True,
                              text=True, check=False, timeout=600)
        assert done.returncode == 0, f"README command failed: {_sized(command)}\n{done.stdout}\n{done.stderr}"
