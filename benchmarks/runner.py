"""Benchmark runner: discovers ``benchmarks/bench_*.py``, measures every variant side by side, writes JSON/Markdown/PNG."""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import importlib
import pkgutil
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

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
from dnet_fast.info import load_average, usable_cpus

__all__ = ["HOOKS", "discover", "get_parser", "main", "run_benchmark", "run_point"]

DEFAULT_OUT = Path("runs") / "bench"

#: Optional methods a Benchmark subclass may define; the runner calls each only when present.
HOOKS = {
    "profile_for": "(params, profile) -> Profile: warm-up/repeats/rounds for one grid point",
    "sequential": "(params) -> bool: prepare, measure and release one variant at a time (large GPU models)",
    "metrics": "(variant) -> dict: in-loop measurements of the timed calls (data wait, GPU use, capture time)",
    "release": "(variant) -> None: frees a variant's state after it was measured (sequential points)",
    "derived": "(point) -> dict: tables and absolute targets computed from the measured point",
    "time_scale": "(variant) -> float: the variant times 1/scale of the work; samples are multiplied by scale",
}
#: A variant callable with a ``recording`` attribute gets it set False for warm-up calls and True for timed calls.
RECORDING_ATTR = "recording"


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


def _hook(bench: Benchmark, name: str) -> Callable[..., Any] | None:
    return getattr(bench, name, None)


def _set_recording(fn: Callable[[], object], on: bool) -> None:
    if hasattr(fn, RECORDING_ATTR):
        setattr(fn, RECORDING_ATTR, on)


def _scaled(t: Timing, scale: float) -> Timing:
    return Timing.from_samples(
        [s * scale for s in t.samples], t.clock, setup_s=t.setup_s, warmup_s=t.warmup_s * scale
    )


def _time_variant(fn: Callable[[], object], profile: Profile, scale: float) -> Timing:
    """One round of one variant: warm-up calls (not recorded), then the timed calls (recorded)."""
    sync = torch.cuda.synchronize if torch.device(profile.device).type == "cuda" else None
    _set_recording(fn, False)
    try:
        t = timeit(
            fn,
            warmup=profile.warmup,
            repeats=profile.repeats,
            device=profile.device,
            sync=sync,
            reset=lambda: _set_recording(fn, True),
        )
    finally:
        _set_recording(fn, False)
    return t if scale == 1.0 else _scaled(t, scale)


def _measure(
    fns: dict[str, Callable[[], object]], profile: Profile, scales: dict[str, float]
) -> tuple[dict[str, Timing], dict[str, list]]:
    """Round-robin timing: each round times every variant once, the order rotated per round, so that slow drifts
    of a shared machine's load hit all variants alike. Returns pooled Timings and per-round medians."""
    names = list(fns)
    pooled: dict[str, Timing] = {}
    rounds: dict[str, list[float]] = {n: [] for n in names}
    for r in range(profile.rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            t = _time_variant(fns[name], profile, scales.get(name, 1.0))
            rounds[name].append(t.median)
            pooled[name] = pooled[name].merged(t) if name in pooled else t
            _log(f"    round {r + 1}/{profile.rounds} {name:>24s}: median {t.median * 1e3:9.2f} ms")
    return pooled, rounds


def _prepare(bench: Benchmark, name: str) -> tuple[Callable[[], object] | None, float, str | None]:
    """Builds one variant; returns (callable or None, setup seconds, skip reason or None)."""
    t0 = time.perf_counter()
    try:
        fn = bench.prepare(name)
    except SkipVariant as exc:
        return None, 0.0, str(exc)
    return fn, time.perf_counter() - t0, None


def _metrics(bench: Benchmark, name: str) -> dict[str, Any]:
    hook = _hook(bench, "metrics")
    if hook is None:
        return {}
    try:
        return dict(hook(name))
    except Exception as exc:  # a broken statistic must not discard the timings
        return {"error": f"{type(exc).__name__}: {exc}"}


def _release(bench: Benchmark, name: str) -> None:
    hook = _hook(bench, "release")
    if hook is not None:
        hook(name)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the next variant must not inherit this one's cached blocks


class _Collected:
    """What measuring a point's variants produced: timings, per-round medians, setup times, metrics, skips."""

    def __init__(self) -> None:
        self.pooled: dict[str, Timing] = {}
        self.rounds: dict[str, list[float]] = {}
        self.setup_s: dict[str, float] = {}
        self.metrics: dict[str, dict[str, Any]] = {}
        self.skipped: dict[str, str] = {}


def _scales(bench: Benchmark, names: list[str]) -> dict[str, float]:
    hook = _hook(bench, "time_scale")
    return {n: float(hook(n)) for n in names} if hook is not None else {}


def _run_interleaved(bench: Benchmark, names: list[str], profile: Profile) -> _Collected:
    """Prepares every variant, then measures them round-robin (shared CPU: drifts hit all alike)."""
    c, fns = _Collected(), {}
    for name in names:
        fn, setup_s, why = _prepare(bench, name)
        if fn is None:
            c.skipped[name] = why
            continue
        fns[name], c.setup_s[name] = fn, setup_s
    c.pooled, c.rounds = _measure(fns, profile, _scales(bench, list(fns)))
    c.metrics = {n: _metrics(bench, n) for n in fns}
    return c


def _run_sequential(bench: Benchmark, names: list[str], profile: Profile, deadline: float | None) -> _Collected:
    """Prepares, measures and releases one variant at a time (several large GPU models do not fit together).

    An error of one variant (e.g. out of memory) is recorded as its skip reason; the others still run.
    """
    c = _Collected()
    for name in names:
        if deadline is not None and time.perf_counter() > deadline:
            c.skipped[name] = "time budget exhausted (--budget-s)"
            continue
        fn = None
        try:
            fn, setup_s, why = _prepare(bench, name)
            if fn is None:
                c.skipped[name] = why
                continue
            c.setup_s[name] = setup_s
            pooled, rounds = _measure({name: fn}, profile, _scales(bench, [name]))
            c.pooled[name], c.rounds[name] = pooled[name], rounds[name]
            c.metrics[name] = _metrics(bench, name)
        except Exception as exc:  # keep the other variants' numbers (e.g. torch.cuda.OutOfMemoryError)
            _log(traceback.format_exc())
            c.skipped[name] = f"error: {type(exc).__name__}: {exc}"
        finally:
            del fn
            _release(bench, name)
    return c


def _variant_rows(bench: Benchmark, c: _Collected, scales: dict[str, float]) -> dict[str, Any]:
    rows = {}
    best = {n: min(c.rounds[n]) for n in c.pooled}
    base = best.get(bench.baseline)
    for name, t in c.pooled.items():
        rows[name] = {
            "timing": t.to_dict(),
            "round_medians_s": c.rounds[name],
            "best_median_s": best[name],
            "ms_per_call": best[name] * 1e3,
            "units_per_s": bench.units_per_call / best[name] if bench.units_per_call else None,
            "speedup_vs_baseline": base / best[name] if base else None,
            "setup_s": c.setup_s.get(name),
            "time_scale": scales.get(name, 1.0),
            "metrics": c.metrics.get(name, {}),
        }
    return rows


def _point_profile(bench: Benchmark, params: dict[str, Any], profile: Profile) -> Profile:
    hook = _hook(bench, "profile_for")
    return hook(params, profile) if hook is not None else profile


def run_point(
    bench: Benchmark, params: dict[str, Any], profile: Profile, deadline: float | None = None
) -> dict[str, Any]:
    """Measures every variant of ``bench`` at one grid point (the optional ``HOOKS`` are honoured).

    Returns:
        ``{"params", "timing_profile", "variants": {name: {...}}, "skipped": {name: why}, "ratios": [...],
        "notes": {...}, "derived": {...}}``; ``ratios`` use the best round median of each variant,
        ``ratios_pooled`` the median over all samples and ``ratios_min`` the fastest sample (the least disturbed
        estimate on a shared machine).
    """
    profile = _point_profile(bench, params, profile)
    out: dict[str, Any] = {
        "params": params,
        "timing_profile": {"warmup": profile.warmup, "repeats": profile.repeats, "rounds": profile.rounds},
        "variants": {},
        "skipped": {},
        "ratios": [],
    }
    bench.notes = {}
    try:
        bench.setup(params)
    except SkipVariant as exc:
        out["skipped"]["*"] = str(exc)
        return out
    names = bench.variants(params)
    sequential = _hook(bench, "sequential")
    try:
        if sequential is not None and sequential(params):
            c = _run_sequential(bench, names, profile, deadline)
        else:
            c = _run_interleaved(bench, names, profile)
        out["skipped"] = c.skipped
        out["variants"] = _variant_rows(bench, c, _scales(bench, list(c.pooled)))
        derived = _hook(bench, "derived")
        if derived is not None:
            out["derived"] = derived(out)
    finally:
        out["notes"] = dict(bench.notes)
        bench.teardown()
    best = {n: v["best_median_s"] for n, v in out["variants"].items()}
    medians = {n: v["timing"]["median"] for n, v in out["variants"].items()}
    fastest = {n: v["timing"]["min"] for n, v in out["variants"].items()}
    out["ratios"] = [r.evaluate(best) for r in bench.ratios(params)]
    out["ratios_pooled"] = [r.evaluate(medians) for r in bench.ratios(params)]
    out["ratios_min"] = [r.evaluate(fastest) for r in bench.ratios(params)]
    return out


def run_benchmark(name: str, profile: Profile, deadline: float | None = None) -> dict[str, Any]:
    """Runs every grid point of the registered benchmark ``name``; an unexpected error is recorded, not raised.

    Points that would start after ``deadline`` (a ``time.perf_counter`` value) are recorded as skipped.
    """
    cls = BENCHMARKS.get(name)
    bench = cls()
    start = time.perf_counter()
    result: dict[str, Any] = {
        "name": name,
        "description": cls.description,
        "baseline": cls.baseline,
        "unit": cls.unit_name,
        "points": [],
    }
    for params in bench.grid(profile):
        if deadline is not None and time.perf_counter() > deadline:
            why = "time budget exhausted (--budget-s)"
            result["points"].append({"params": params, "variants": {}, "skipped": {"*": why}, "ratios": []})
            continue
        _log(f"[{name}] {params}")
        try:
            result["points"].append(run_point(bench, params, profile, deadline))
        except Exception as exc:  # keep the other benchmarks' numbers when one breaks
            _log(traceback.format_exc())
            result["points"].append({"params": params, "error": f"{type(exc).__name__}: {exc}"})
    result["wall_s"] = time.perf_counter() - start
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
    p.add_argument(
        "--budget-s", type=float, default=None, help="wall-clock budget: later points/variants are skipped"
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="benchmark-specific override (YAML value), e.g. --set points=r50_224 (repeatable)",
    )
    p.add_argument("--list", action="store_true", help="list the registered benchmarks and exit")
    return p


def _extra(items: list[str]) -> dict[str, Any]:
    extra = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            msg = f"--set expects KEY=VALUE, got {item!r}"
            raise SystemExit(msg)
        extra[key.strip()] = yaml.safe_load(value)
    return extra


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
    return Profile(
        quick=args.quick, device=device, warmup=warmup, repeats=repeats, rounds=rounds, extra=_extra(args.set)
    )


def _set_threads(requested: int) -> int:
    torch.set_num_threads(requested or usable_cpus())
    return torch.get_num_threads()


def _write_outputs(out_dir: Path, payload: dict[str, Any]) -> list[Path]:
    written = [write_json(out_dir / "results.json", payload)]
    md = out_dir / "results.md"
    md.write_text(report.markdown(payload))
    written.append(md)
    written += report.plots(payload, out_dir)
    return written


def _payload(argv: Sequence[str] | None, profile: Profile, threads: int, args: argparse.Namespace) -> dict:
    return {
        "command": " ".join(["python -m benchmarks", *(argv if argv is not None else sys.argv[1:])]),
        "profile": {
            "quick": profile.quick,
            "device": profile.device,
            "warmup": profile.warmup,
            "repeats": profile.repeats,
            "rounds": profile.rounds,
            "threads": threads,
            "budget_s": args.budget_s,
            "extra": profile.extra,
        },
        "environment": environment(),
        "benchmarks": [],
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the selected benchmarks and writes ``results.json``, ``results.md`` and PNG plots (if matplotlib).

    Sets ``torch.set_num_threads`` for the process (``--threads``; default every usable core).

    Returns:
        0 on success, 2 for an unknown benchmark name.
    """
    if argv is not None and list(argv[:1]) == ["--"]:
        argv = list(argv[1:])  # ``dnet-fast bench -- --cpu``: argparse hands the separator on
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
    deadline = time.perf_counter() + args.budget_s if args.budget_s else None
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out_dir = args.out or DEFAULT_OUT / stamp
    payload = _payload(argv, profile, threads, args)
    payload["import_errors"] = import_errors
    start = time.perf_counter()
    for name in names:
        payload["benchmarks"].append(run_benchmark(name, profile, deadline))
        write_json(out_dir / f"{name}.json", payload["benchmarks"][-1])  # partial results survive a crash
    payload["environment_end"] = {"load_avg": load_average(), "wall_s": time.perf_counter() - start}
    for path in _write_outputs(out_dir, payload):
        _log(f"wrote {path}")
    print(report.markdown(payload))
    return 0

