"""Benchmark runner: discovers ``benchmarks/bench_*.py``, measures every variant side by side, writes JSON/Markdown/PNG."""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import os
import pkgutil
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

import benchmarks
from benchmarks import report
from benchmarks.harness import (
    BENCHMARKS,
    Benchmark,
    Profile,
    SkipVariant,
    Timing,
    environment,
    timeit,
    write_json,
)

__all__ = ["discover", "get_parser", "main", "run_benchmark", "run_point"]

DEFAULT_OUT = Path("runs") / "bench"


def discover() -> dict[str, str]:
    """Imports every ``benchmarks.bench_*`` module so that it registers into ``BENCHMARKS``.

    Returns:
        Modules that failed to import, mapped to the error (they are reported, never fatal).
    """
    failed = {}
    for info in pkgutil.iter_modules(benchmarks.__path__):
        if not info.name.startswith("bench_"):
            continue
        try:
            importlib.import_module(f"benchmarks.{info.name}")
        except Exception as exc:  # a broken or unfinished module must not stop the others
            failed[info.name] = f"{type(exc).__name__}: {exc}"
    return failed


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _prepare_all(bench: Benchmark, names: list[str]) -> tuple[dict[str, Callable[[], object]], dict, dict]:
    """Builds every variant; returns (callables, setup seconds, skip reasons)."""
    fns, setup_s, skipped = {}, {}, {}
    for name in names:
        t0 = time.perf_counter()
        try:
            fns[name] = bench.prepare(name)
        except SkipVariant as exc:
            skipped[name] = str(exc)
            continue
        setup_s[name] = time.perf_counter() - t0
    return fns, setup_s, skipped


def _measure(
    fns: dict[str, Callable[[], object]], profile: Profile
) -> tuple[dict[str, Timing], dict[str, list]]:
    """Round-robin timing: each round times every variant once, the order rotated per round, so that slow drifts
    of a shared machine's load hit all variants alike. Returns pooled Timings and per-round medians."""
    names = list(fns)
    pooled: dict[str, Timing] = {}
    rounds: dict[str, list[float]] = {n: [] for n in names}
    sync = torch.cuda.synchronize if torch.device(profile.device).type == "cuda" else None
    for r in range(profile.rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            t = timeit(
                fns[name], warmup=profile.warmup, repeats=profile.repeats, device=profile.device, sync=sync
            )
            rounds[name].append(t.median)
            pooled[name] = pooled[name].merged(t) if name in pooled else t
            _log(f"    round {r + 1}/{profile.rounds} {name:>24s}: median {t.median * 1e3:9.2f} ms")
    return pooled, rounds


def _variant_rows(bench: Benchmark, pooled: dict[str, Timing], rounds: dict, setup_s: dict) -> dict[str, Any]:
    rows = {}
    best = {n: min(rounds[n]) for n in pooled}
    for name, t in pooled.items():
        base = best.get(bench.baseline)
        rows[name] = {
            "timing": t.to_dict(),
            "round_medians_s": rounds[name],
            "best_median_s": best[name],
            "ms_per_call": best[name] * 1e3,
            "units_per_s": bench.units_per_call / best[name] if bench.units_per_call else None,
            "speedup_vs_baseline": base / best[name] if base else None,
            "setup_s": setup_s.get(name),
        }
    return rows


def run_point(bench: Benchmark, params: dict[str, Any], profile: Profile) -> dict[str, Any]:
    """Measures every variant of ``bench`` at one grid point.

    Returns:
        ``{"params", "variants": {name: {...}}, "skipped": {name: why}, "ratios": [...], "notes": {...}}``;
        ``ratios`` use the best round median of each variant, ``ratios_pooled`` the median over all samples and
        ``ratios_min`` the fastest sample (the least disturbed estimate on a shared machine).
    """
    out: dict[str, Any] = {"params": params, "variants": {}, "skipped": {}, "ratios": []}
    bench.notes = {}
    try:
        bench.setup(params)
    except SkipVariant as exc:
        out["skipped"]["*"] = str(exc)
        return out
    try:
        fns, setup_s, out["skipped"] = _prepare_all(bench, bench.variants(params))
        pooled, rounds = _measure(fns, profile)
    finally:
        out["notes"] = dict(bench.notes)
        bench.teardown()
    out["variants"] = _variant_rows(bench, pooled, rounds, setup_s)
    best = {n: v["best_median_s"] for n, v in out["variants"].items()}
    medians = {n: t.median for n, t in pooled.items()}
    fastest = {n: t.min for n, t in pooled.items()}
    out["ratios"] = [r.evaluate(best) for r in bench.ratios(params)]
    out["ratios_pooled"] = [r.evaluate(medians) for r in bench.ratios(params)]
    out["ratios_min"] = [r.evaluate(fastest) for r in bench.ratios(params)]
    return out


def run_benchmark(name: str, profile: Profile) -> dict[str, Any]:
    """Runs every grid point of the registered benchmark ``name``; an unexpected error is recorded, not raised."""
    cls = BENCHMARKS.get(name)
    bench = cls()
    result: dict[str, Any] = {
        "name": name,
        "description": cls.description,
        "baseline": cls.baseline,
        "unit": cls.unit_name,
        "points": [],
    }
    for params in bench.grid(profile):
        _log(f"[{name}] {params}")
        try:
            result["points"].append(run_point(bench, params, profile))
        except Exception as exc:  # keep the other benchmarks' numbers when one breaks
            _log(traceback.format_exc())
            result["points"].append({"params": params, "error": f"{type(exc).__name__}: {exc}"})
    return result


# ----------------------------------------------------------------------------------------------------------
# Command line


def get_parser() -> argparse.ArgumentParser:
    """The ``python -m benchmarks`` argument parser (also used by ``dnet-fast bench``)."""
    p = argparse.ArgumentParser(prog="python -m benchmarks", description="dnet-fast benchmarks")
    p.add_argument("--quick", action="store_true", help="tiny sizes, one repeat: a smoke test in seconds")
    dev = p.add_mutually_exclusive_group()
    dev.add_argument("--cpu", action="store_true", help="run on the CPU (default without CUDA)")
    dev.add_argument("--gpu", action="store_true", help="run on the GPU (error without CUDA)")
    p.add_argument("--only", action="append", default=[], metavar="NAME", help="benchmark name (repeatable)")
    p.add_argument("--out", type=Path, default=None, help=f"output folder (default {DEFAULT_OUT}/<UTC time>)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls per variant and round (default 2)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per variant and round (default 5)")
    p.add_argument(
        "--rounds", type=int, default=None, help="interleaved rounds; best round median wins (default 3)"
    )
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: every usable core)")
    p.add_argument("--list", action="store_true", help="list the registered benchmarks and exit")
    return p


def _profile(args: argparse.Namespace) -> Profile:
    if args.gpu and not torch.cuda.is_available():
        msg = "--gpu given but CUDA is not available"
        raise SystemExit(msg)
    device = "cuda" if args.gpu or (not args.cpu and torch.cuda.is_available()) else "cpu"
    quick_defaults = (1, 2, 1) if args.quick else (2, 5, 3)
    warmup, repeats, rounds = (
        v if v is not None else d
        for v, d in zip((args.warmup, args.repeats, args.rounds), quick_defaults, strict=True)
    )
    return Profile(quick=args.quick, device=device, warmup=warmup, repeats=repeats, rounds=rounds)


def _set_threads(requested: int) -> int:
    usable = len(_usable_cpus())
    torch.set_num_threads(requested or usable)
    return torch.get_num_threads()


def _usable_cpus() -> set[int]:
    return os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))


def _write_outputs(out_dir: Path, payload: dict[str, Any]) -> list[Path]:
    written = [write_json(out_dir / "results.json", payload)]
    md = out_dir / "results.md"
    md.write_text(report.markdown(payload))
    written.append(md)
    png = report.plot(payload, out_dir / "results.png")
    if png is not None:
        written.append(png)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the selected benchmarks and writes ``results.json``, ``results.md`` and ``results.png`` (if matplotlib).

    Sets ``torch.set_num_threads`` for the process (``--threads``; default every usable core).

    Returns:
        0 on success, 2 for an unknown benchmark name.
    """
    args = get_parser().parse_args(argv)
    import_errors = discover()
    for mod, err in import_errors.items():
        _log(f"warning: benchmarks.{mod} not loaded: {err}")
    if args.list:
        for name in BENCHMARKS.names():
            print(f"{name:16s} {BENCHMARKS.get(name).description}")
        return 0
    names = [n for item in args.only for n in item.split(",") if n] or BENCHMARKS.names()
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        _log(f"unknown benchmark(s) {', '.join(unknown)}; valid: {', '.join(BENCHMARKS.names())}")
        return 2
    profile = _profile(args)
    threads = _set_threads(args.threads)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out_dir = args.out or DEFAULT_OUT / stamp
    payload: dict[str, Any] = {
        "command": " ".join(["python -m benchmarks", *(argv if argv is not None else sys.argv[1:])]),
        "profile": {
            "quick": profile.quick,
            "device": profile.device,
            "warmup": profile.warmup,
            "repeats": profile.repeats,
            "rounds": profile.rounds,
            "threads": threads,
        },
        "environment": environment(),
        "import_errors": import_errors,
        "benchmarks": [],
    }
    for name in names:
        payload["benchmarks"].append(run_benchmark(name, profile))
        write_json(out_dir / f"{name}.json", payload["benchmarks"][-1])  # partial results survive a crash
    payload["environment_end"] = {"load_avg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}
    for path in _write_outputs(out_dir, payload):
        _log(f"wrote {path}")
    print(report.markdown(payload))
    return 0
