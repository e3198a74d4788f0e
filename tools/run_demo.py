"""``make demo``: paired seeds of CE, Balanced Softmax and Difficulty-Net (exact) on the embedded dataset, then the
paired comparisons, the runs table and the figures.

Every run is ``dnet-fast train demo`` with the method's overrides (the preset pins one CPU thread, so the numbers
do not depend on the machine's core count); ``--jobs`` runs that many at once. A run that already finished is
reused; an unfinished one is trained again from scratch.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

METHODS = {
    "ce": ["meta.mode=off", "loss.name=ce"],
    "bs": ["meta.mode=off", "loss.name=balanced_softmax"],
    "exact": ["meta.mode=exact", "loss.name=ce"],
}


def _finished(run: Path) -> bool:
    path = run / "results.json"
    return path.is_file() and "test" in json.loads(path.read_text())


def _train(out: Path, method: str, seed: int) -> tuple[str, int, float]:
    run = out / f"{method}-seed{seed}"
    if _finished(run):
        return method, seed, 0.0
    shutil.rmtree(run, ignore_errors=True)  # an interrupted demo run: start it again
    args = ["train", "demo", *METHODS[method], f"run.seed={seed}", f"run.out_dir={run}", "run.progress=false"]
    start = time.perf_counter()
    log = out / "logs" / f"{method}-seed{seed}.log"  # beside, not inside, the runs: globs see run folders only
    log.parent.mkdir(exist_ok=True)
    with log.open("w") as f:
        done = subprocess.run([sys.executable, "-m", "dnet_fast", *args], stdout=f, stderr=subprocess.STDOUT,
                              check=False)
    if done.returncode != 0:
        print(log.read_text(), file=sys.stderr)
        msg = f"demo run {run} failed (exit {done.returncode}); its log is {log}"
        raise SystemExit(msg)
    return method, seed, time.perf_counter() - start


def _cli(*args: str) -> None:
    print(f"\n$ dnet-fast {' '.join(args)}", flush=True)
    subprocess.run([sys.executable, "-m", "dnet_fast", *args], check=True)


def main(argv: list[str] | None = None) -> int:
    """Trains the missing runs, then prints ``report``, two ``compare`` tables and writes the figures."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("runs/demo"))
    p.add_argument("--seeds", type=int, nargs="+", default=list(range(7)))
    p.add_argument("--jobs", type=int, default=2, help="runs at once (each uses one CPU thread)")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    # Difficulty-Net runs first: they take about 2.7x a CE run, so the two workers finish close together.
    todo = [(m, s) for m in sorted(METHODS, key=lambda m: m != "exact") for s in args.seeds]
    start = time.perf_counter()
    with ThreadPoolExecutor(args.jobs) as pool:
        for method, seed, seconds in pool.map(lambda ms: _train(args.out, *ms), todo):
            print(f"{method:>5s} seed {seed}: {'reused' if seconds == 0 else f'{seconds:.0f} s'}", flush=True)
    print(f"trained in {time.perf_counter() - start:.0f} s", flush=True)
    runs = {m: [str(args.out / f"{m}-seed{s}") for s in args.seeds] for m in METHODS}
    _cli("report", *runs["ce"], *runs["bs"], *runs["exact"])
    _cli("compare", *runs["ce"], "--vs", *runs["exact"])
    _cli("compare", *runs["bs"], "--vs", *runs["exact"])
    _cli("plot", runs["ce"][0], runs["bs"][0], runs["exact"][0], "--out", str(args.out))
    _cli("plot", runs["exact"][0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
