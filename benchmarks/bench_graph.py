"""CUDA-graph step benchmark (issue 5): graph vs eager vs official-style, CE vs driver vs exact, R32 and R50 bf16.

Standalone: ``python benchmarks/bench_graph.py --device cuda --out runs/bench/graph.json`` (one GPU, < 10 min);
``python benchmarks/bench_graph.py --quick --out /tmp/graph.json`` exercises every code path on the CPU in
seconds (eager only, tiny shapes; timings meaningless). Results are written after every variant, so a run cut
short still leaves what it measured.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` and ``dnet_fast`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from torch import Tensor

from benchmarks.harness import environment, write_json
from dnet_fast.config import DiffNetConfig, LossConfig, MetaConfig, ModelConfig, TrainConfig
from dnet_fast.losses import build_loss
from dnet_fast.meta import build_meta_mode
from dnet_fast.models import DifficultyNet, build_model
from dnet_fast.step import TrainStep

__all__ = ["QUICK", "SETTINGS", "Setting", "main", "measure_variant", "peak_tflops"]

#: FLOP per image of one CE training step (PERFORMANCE.md §1: 3 × 2 × MAC of the forward).
TRAIN_FLOP_PER_IMAGE = {"resnet32": 0.413e9, "resnet50": 24.5e9, "resnet20": 0.245e9, "resnet10": 5.34e9}
#: Dense bf16 peaks (PERFORMANCE.md §1) and the planning figure (≈80 % of the SXM peak).
PEAK_TFLOPS = {"H100 SXM": 989.4, "H100 PCIe": 756.0, "H200": 989.4}
PLANNING_TFLOPS = 790.0


@dataclass(frozen=True)
class Setting:
    """One benchmark configuration (backbone, shapes, precision) and the variants to time on it."""

    name: str
    backbone: str
    classes: int
    image: int
    batch: int
    meta_batch: int
    precision: str
    channels_last: bool
    width: int = 16
    meta_set_per_class: int = 25  # official-style meta loader: resident images per class
    official: bool = False  # also time the official-style iterations (benchmarks/naive.py)
    modes: tuple[str, ...] = ("off", "driver", "exact")
    iters: int = 30  # timed iterations per repeat
    repeats: int = 3
    grad: str = "jvp"  # exact mode's meta-gradient algorithm (jvp | double_backward)


SETTINGS = (
    Setting("r32_fp32", "resnet32", 100, 32, 128, 100, "fp32", False, official=True, iters=50),
    Setting("r32_bf16", "resnet32", 100, 32, 128, 100, "bf16", True, iters=50),
    Setting("r50_bf16", "resnet50", 1000, 224, 128, 100, "bf16", True, meta_set_per_class=1, iters=15),
)
#: ``--quick``: tiny CPU shapes, two timed iterations; checks the plumbing only.
QUICK = (
    Setting("r32_quick", "resnet20", 10, 8, 16, 10, "fp32", False, width=4, meta_set_per_class=3,
            official=True, iters=2, repeats=1),
    Setting("r50_quick", "resnet10", 10, 16, 4, 4, "fp32", True, meta_set_per_class=1, iters=1, repeats=1),
)
SEED = 0


# ----------------------------------------------------------------------------------------------------------
# Data and construction


@dataclass
class Data:
    """Synthetic inputs: a fixed training batch, a resident meta set and a few pre-drawn balanced meta batches."""

    x: Tensor  # (B, 3, S, S)
    y: Tensor  # (B,) long-tailed labels
    meta_x: Tensor  # (C·k, 3, S, S) resident meta set (official-style loader)
    meta_y: Tensor  # (C·k,)
    meta_batches: list[tuple[Tensor, Tensor]]  # balanced (x^m, y^m), cycled by the fast variants
    acc: Tensor  # (C,) per-class accuracy A
    counts: Tensor  # (C,) training counts, exponential profile ρ = 100


def make_data(s: Setting, device: torch.device) -> Data:
    """Deterministic synthetic data for ``s`` on ``device``."""
    g = torch.Generator().manual_seed(SEED)
    c, k, px = s.classes, s.meta_set_per_class, s.image
    counts = torch.floor(500 * 100.0 ** (-torch.arange(c, dtype=torch.float64) / max(c - 1, 1))).clamp_min(1)
    y = torch.multinomial(counts / counts.sum(), s.batch, replacement=True, generator=g)
    meta_x = torch.randn(c * k, 3, px, px, generator=g)
    meta_y = torch.arange(c).repeat_interleave(k)
    batches = []
    for _ in range(4):
        classes = torch.randperm(c, generator=g).repeat(math.ceil(s.meta_batch / c))[: s.meta_batch]
        idx = classes * k + torch.randint(0, k, (s.meta_batch,), generator=g)
        batches.append((meta_x[idx].to(device), meta_y[idx].to(device)))
    return Data(
        x=torch.randn(s.batch, 3, px, px, generator=g).to(device), y=y.to(device),
        meta_x=meta_x.to(device), meta_y=meta_y.to(device), meta_batches=batches,
        acc=(torch.randint(0, 11, (c,), generator=g).float() / 10).to(device), counts=counts.float(),
    )


def _model(s: Setting, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(SEED)
    cfg = ModelConfig(backbone=s.backbone, width=s.width, channels_last=s.channels_last)
    return build_model(cfg, s.classes).to(device).train()


def build_step(s: Setting, mode: str, device: torch.device, data: Data, *, graph: bool,
               compile_backbone: bool = False) -> TrainStep:
    """A `TrainStep` for ``mode`` (CE loss, SGD momentum 0.9, wd 2e-4, lr 0.1, Difficulty-Net H=128)."""
    cfg = TrainConfig(
        model=ModelConfig(backbone=s.backbone, width=s.width, channels_last=s.channels_last),
        diffnet=DiffNetConfig(hidden=128, lr=1e-5),
        meta=MetaConfig(mode=mode, grad=s.grad, meta_batch=s.meta_batch),
    )
    model = _model(s, device)
    groups = [{"params": list(model.parameters()), "lr": 0.1, "base_lr": 0.1}]
    opt = torch.optim.SGD(groups, lr=0.1, momentum=0.9, weight_decay=2e-4)
    criterion = build_loss(LossConfig(name="ce"), data.counts, 10).to(device)
    torch.manual_seed(SEED + 1)
    meta = build_meta_mode(cfg, model, criterion, opt, s.classes)
    meta.set_class_accuracy(data.acc)
    return TrainStep(meta, graph=graph, precision=s.precision, channels_last=s.channels_last,
                     compile_backbone=compile_backbone)


def build_official(s: Setting, device: torch.device, data: Data, *, second_order: bool) -> Callable[[], object]:
    """The official-style iteration of ``benchmarks/naive.py`` (fresh model copy, host one-hot, ``.item()``)."""
    from benchmarks.naive import NaiveState, OfficialMetaLoader, OfficialStyleStep

    model = _model(s, device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=2e-4)
    torch.manual_seed(SEED + 1)
    diffnet = DifficultyNet(s.classes, 128, bias=False).to(device)
    adam = torch.optim.Adam(diffnet.parameters(), lr=1e-5, weight_decay=1e-4)
    state = NaiveState(model, diffnet, opt, adam, data.acc.clone(), lambda_dr=0.3)
    loader = OfficialMetaLoader(data.meta_x, data.meta_y, s.meta_batch, seed=SEED)
    step = OfficialStyleStep(state, lambda: _model(s, device), loader, second_order=second_order)
    return lambda: step.step(data.x, data.y)


# ----------------------------------------------------------------------------------------------------------
# Timing


def _cuda(device: torch.device) -> bool:
    return device.type == "cuda"


def _time_iters(fn: Callable[[], object], n: int, device: torch.device) -> float:
    """Seconds per call over ``n`` back-to-back calls: CUDA events around the loop, else perf_counter."""
    if _cuda(device):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(n):
            fn()
        end.record()
        end.synchronize()  # sync point: reading the events
        return start.elapsed_time(end) / 1e3 / n
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def _sync(device: torch.device) -> None:
    if _cuda(device):
        torch.cuda.synchronize(device)  # sync point: phase boundaries of the benchmark


def peak_tflops(device: torch.device) -> tuple[str | None, float | None]:
    """(form factor, dense bf16 peak TFLOP/s) read from the device name; (None, None) when unknown."""
    if not _cuda(device):
        return None, None
    name = torch.cuda.get_device_name(device)
    if "H200" in name:
        return "H200", PEAK_TFLOPS["H200"]
    if "H100" in name:
        key = "H100 PCIe" if "PCIe" in name else "H100 SXM"
        return key, PEAK_TFLOPS[key]
    return None, None


def count_flops(fn: Callable[[], object]) -> float | None:
    """FLOP of one call by ``torch.utils.flop_counter`` (matmul/conv only); None if the counter fails."""
    from torch.utils.flop_counter import FlopCounterMode

    try:
        with FlopCounterMode(display=False) as counter:
            fn()
    except Exception:  # noqa: BLE001  (informative only: e.g. an op the counter cannot trace)
        return None
    return float(counter.get_total_flops())


def measure_variant(
    s: Setting, name: str, make: Callable[[], Callable[[], object]], device: torch.device, *,
    flops: bool = False,
) -> dict[str, Any]:
    """Builds a variant, runs its first call (capture for graph variants), warms up, times it.

    Returns:
        ms_per_iter (median over repeats), img_per_s, the per-repeat samples, first_call_s (build of lazy
        state, cuDNN autotuning, and for graphs warm-up + capture), warmup_s / capture_s of the graph, peak
        memory, and optionally the counted FLOP per iteration.
    """
    if _cuda(device):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    fn = make()
    _sync(device)
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    fn()
    _sync(device)
    first_s = time.perf_counter() - t0
    for _ in range(2 if _cuda(device) else 0):
        fn()
    samples = [_time_iters(fn, s.iters, device) for _ in range(s.repeats)]
    ms = statistics.median(samples) * 1e3
    step = getattr(fn, "train_step", None)
    out: dict[str, Any] = {
        "variant": name, "ms_per_iter": ms, "img_per_s": s.batch / (ms / 1e3),
        "samples_ms": [v * 1e3 for v in samples], "build_s": build_s, "first_call_s": first_s,
        "warmup_s": getattr(step, "warmup_seconds", None), "capture_s": getattr(step, "capture_seconds", None),
        "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if _cuda(device) else None,
    }
    if flops:
        out["flop_per_iter"] = count_flops(fn)
    return out


def _step_fn(step: TrainStep, data: Data) -> Callable[[], object]:
    batches, i = data.meta_batches, [0]

    def call() -> object:
        i[0] += 1
        return step.step(data.x, data.y, batches[i[0] % len(batches)])

    call.train_step = step  # type: ignore[attr-defined]  (for warm-up/capture times)
    return call


def variants(s: Setting, device: torch.device, data: Data, *, compile_backbone: bool) -> dict[str, Callable]:
    """Variant name → factory of a zero-argument iteration."""
    out: dict[str, Callable[[], Callable[[], object]]] = {}
    if s.official:
        out["official"] = lambda: build_official(s, device, data, second_order=False)
        out["official_2nd"] = lambda: build_official(s, device, data, second_order=True)
    graphs = (False, True) if _cuda(device) else (False,)
    for mode in s.modes:
        for graph in graphs:
            out[f"{mode}_{'graph' if graph else 'eager'}"] = (
                lambda mode=mode, graph=graph: _step_fn(build_step(s, mode, device, data, graph=graph), data)
            )
    if compile_backbone and _cuda(device):
        for mode in ("off", "driver"):
            out[f"{mode}_graph_compiled"] = lambda mode=mode: _step_fn(
                build_step(s, mode, device, data, graph=True, compile_backbone=True), data
            )
    return out


# ----------------------------------------------------------------------------------------------------------
# Ratios against the issue's targets


@dataclass
class Target:
    """``numerator/denominator`` of ms/iter compared with a bound (``>=`` for speed-ups, ``<=`` for costs)."""

    name: str
    slower: str  # variant whose time is the numerator
    faster: str  # variant whose time is the denominator
    bound: float | None
    op: str = ">="


def targets(s: Setting) -> list[Target]:
    """The issue-5 acceptance ratios for setting ``s`` (plus informative ones without a bound)."""
    r50 = s.backbone == "resnet50"
    out = [
        Target("exact cost over CE (graph)", "exact_graph", "off_graph", 3.0, "<="),
        Target("driver cost over CE (graph)", "driver_graph", "off_graph", 1.05, "<="),
        Target("exact cost over CE (eager)", "exact_eager", "off_eager", None, "<="),
    ]
    for mode in s.modes:
        bound = (1.1 if r50 else (3.0 if mode == "exact" else None))
        out.append(Target(f"{mode}: graph speed-up over eager", f"{mode}_eager", f"{mode}_graph", bound))
    if s.official:
        out += [
            Target("exact graph speed-up over official-style", "official", "exact_graph", 5.0),
            Target("exact graph speed-up over official-style (2nd order)", "official_2nd", "exact_graph", 5.0),
            Target("driver graph speed-up over official-style", "official", "driver_graph", None),
        ]
    out += [Target(f"{m}: compiled graph speed-up over graph", f"{m}_graph", f"{m}_graph_compiled", None)
            for m in ("off", "driver")]
    return out


def evaluate(s: Setting, results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Each target's value (ms ratio) and pass/fail; targets with a missing variant are left out."""
    out = []
    for t in targets(s):
        if "ms_per_iter" not in results.get(t.slower, {}) or "ms_per_iter" not in results.get(t.faster, {}):
            continue
        value = results[t.slower]["ms_per_iter"] / results[t.faster]["ms_per_iter"]
        ok = None if t.bound is None else (value >= t.bound if t.op == ">=" else value <= t.bound)
        out.append({**asdict(t), "value": value, "pass": ok})
    return out


def add_ceiling(s: Setting, rec: dict[str, Any], device: torch.device) -> None:
    """Fraction of the bf16 ceiling: CE-equivalent (img/s × CE FLOP/img) and, if counted, actual FLOP/s."""
    form, peak = peak_tflops(device)
    ce_flop = TRAIN_FLOP_PER_IMAGE.get(s.backbone)
    rate = rec["img_per_s"]
    rec["gpu_form_factor"], rec["peak_bf16_tflops"] = form, peak
    if ce_flop is not None:
        ce_tflops = rate * ce_flop / 1e12
        rec["ce_equiv_tflops"] = ce_tflops
        rec["ce_equiv_frac_planning"] = ce_tflops / PLANNING_TFLOPS
        rec["ce_equiv_frac_peak"] = ce_tflops / peak if peak else None
    counted = rec.get("flop_per_iter")
    if counted:
        tflops = counted / (rec["ms_per_iter"] / 1e3) / 1e12
        rec["counted_tflops"] = tflops
        rec["counted_frac_planning"] = tflops / PLANNING_TFLOPS
        rec["counted_frac_peak"] = tflops / peak if peak else None


# ----------------------------------------------------------------------------------------------------------
# Driver


def run_setting(s: Setting, device: torch.device, payload: dict[str, Any], out: Path, *, deadline: float,
                compile_backbone: bool, flops: bool) -> None:
    """Times every variant of ``s`` into ``payload["settings"][s.name]``, writing ``out`` after each one."""
    data = make_data(s, device)
    entry = payload["settings"][s.name] = {"setting": asdict(s), "variants": {}, "ratios": []}
    for name, make in variants(s, device, data, compile_backbone=compile_backbone).items():
        if time.perf_counter() > deadline:
            entry["variants"][name] = {"skipped": "time budget exhausted"}
            continue
        print(f"[{s.name}] {name} ...", file=sys.stderr, flush=True)
        try:
            rec = measure_variant(s, name, make, device, flops=flops and name.endswith("_eager"))
            add_ceiling(s, rec, device)
        except Exception as exc:  # noqa: BLE001  (one failing variant, e.g. OOM or capture error, is data)
            rec = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(limit=8)}
        entry["variants"][name] = rec
        entry["ratios"] = evaluate(s, entry["variants"])
        write_json(out, payload)
        _release(device)
    _copy_counted_flops(entry)
    write_json(out, payload)


def _copy_counted_flops(entry: dict[str, Any]) -> None:
    """A graph variant does the same math as its eager twin: reuse the eager FLOP count for its fraction."""
    variants_ = entry["variants"]
    for name, rec in variants_.items():
        twin = variants_.get(name.replace("_graph", "_eager"), {})
        if name.endswith("_graph") and twin.get("flop_per_iter") and "ms_per_iter" in rec:
            rec["flop_per_iter"] = twin["flop_per_iter"]
            tflops = rec["flop_per_iter"] / (rec["ms_per_iter"] / 1e3) / 1e12
            rec["counted_tflops"], rec["counted_frac_planning"] = tflops, tflops / PLANNING_TFLOPS
            if rec.get("peak_bf16_tflops"):
                rec["counted_frac_peak"] = tflops / rec["peak_bf16_tflops"]


def _release(device: torch.device) -> None:
    import gc

    gc.collect()
    if _cuda(device):
        torch.cuda.empty_cache()


def summary(payload: dict[str, Any]) -> str:
    """A plain-text table of every variant and ratio."""
    lines = []
    for name, entry in payload["settings"].items():
        lines.append(f"## {name}")
        lines.append(f"{'variant':28s} {'ms/iter':>9s} {'img/s':>10s} {'peak GiB':>9s} {'warmup s':>9s} "
                     f"{'capture s':>9s} {'CE-eq %peak':>11s}")
        for vname, rec in entry["variants"].items():
            if "ms_per_iter" not in rec:
                lines.append(f"{vname:28s} {rec.get('error') or rec.get('skipped')}")
                continue

            def fmt(v: Any, spec: str) -> str:
                return format(v, spec) if isinstance(v, (int, float)) else "-"

            frac = rec.get("ce_equiv_frac_peak")
            lines.append(
                f"{vname:28s} {rec['ms_per_iter']:9.3f} {rec['img_per_s']:10.0f} {fmt(rec['peak_mem_gib'], '9.2f')} "
                f"{fmt(rec['warmup_s'], '9.2f')} {fmt(rec['capture_s'], '9.2f')} "
                f"{fmt(None if frac is None else 100 * frac, '11.2f')}"
            )
        for r in entry["ratios"]:
            bound = "" if r["bound"] is None else f" (target {r['op']} {r['bound']}: {'PASS' if r['pass'] else 'FAIL'})"
            lines.append(f"  {r['name']}: {r['value']:.2f}{bound}")
    return "\n".join(lines)


def get_parser() -> argparse.ArgumentParser:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=Path("runs/bench/graph.json"))
    p.add_argument("--quick", action="store_true", help="tiny shapes, eager only on CPU: a smoke test")
    p.add_argument("--only", nargs="*", default=None, help="setting names to run (default: all)")
    p.add_argument("--compile", action="store_true", help="also time torch.compile'd backbones (off, driver)")
    p.add_argument("--flops", action="store_true", help="count FLOP of each eager variant (FlopCounterMode)")
    p.add_argument("--iters", type=int, default=None, help="override timed iterations per repeat")
    p.add_argument("--grad", choices=["jvp", "double_backward"], default=None,
                   help="exact mode's meta-gradient (default: jvp)")
    p.add_argument("--budget-s", type=float, default=540.0, help="stop starting new variants after this")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Runs the benchmark and writes the JSON; returns the payload."""
    args = get_parser().parse_args(argv)
    device = torch.device(args.device)
    if _cuda(device) and not torch.cuda.is_available():
        msg = "--device cuda but CUDA is not available"
        raise SystemExit(msg)
    torch.backends.cudnn.benchmark = True
    if args.quick and not _cuda(device):
        torch.set_num_threads(1)  # tiny shapes: extra threads only add contention on a shared CPU
    settings = QUICK if args.quick else SETTINGS
    if args.only:
        settings = tuple(s for s in settings if s.name in args.only)
    if args.iters:
        settings = tuple(replace(s, iters=args.iters) for s in settings)
    if args.grad:
        settings = tuple(replace(s, grad=args.grad) for s in settings)
    deadline = time.perf_counter() + args.budget_s
    form, peak = peak_tflops(device)
    payload: dict[str, Any] = {
        "benchmark": "graph", "quick": args.quick, "device": str(device), "environment": environment(),
        "gpu_form_factor": form, "peak_bf16_tflops": peak, "planning_tflops": PLANNING_TFLOPS, "settings": {},
    }
    for s in settings:
        run_setting(s, device, payload, args.out, deadline=deadline, compile_backbone=args.compile,
                    flops=args.flops)
    print(summary(payload))
    return payload


if __name__ == "__main__":
    main()
