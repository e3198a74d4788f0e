"""Turns a runner payload into a Markdown report and, when matplotlib is importable, PNG throughput charts."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

__all__ = ["environment_lines", "markdown", "plot", "plots", "table"]


def _fmt(value: float | None, spec: str = ".2f", suffix: str = "") -> str:
    return "—" if value is None else f"{value:{spec}}{suffix}"


def _cell(value: Any) -> str:
    """A table cell: floats with 3–4 significant digits, booleans as yes/no, None as a dash."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    if isinstance(value, list | tuple):
        return ", ".join(_cell(v) for v in value)
    return str(value)


def table(columns: list[str], rows: list[dict[str, Any]]) -> list[str]:
    """A Markdown table of ``rows`` (dicts) over ``columns``; a missing key is a dash."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in columns) + " |" for r in rows]
    return lines


def environment_lines(payload: dict[str, Any]) -> list[str]:
    """The provenance block: command, date, machine, threads, versions, git state, extension, load."""
    env, prof = payload["environment"], payload["profile"]
    gpu = env.get("gpu")
    ext = env.get("dnet_fast_C", {})
    end = payload.get("environment_end", {})
    lines = [
        f"- command: `{payload['command']}`",
        f"- date (UTC): {env['date_utc']}",
        f"- machine: {env['cpu_model']}, {env['cpu_usable']} usable of {env['cpu_count']} CPUs, "
        f"{env['machine']}, {env['platform']}",
        f"- device: {prof['device']}"
        + (f" ({gpu['name']}, {gpu.get('memory_gib')} GiB, CUDA {env['cuda']})" if gpu else ""),
        f"- torch threads: {prof['threads']}; default warm-up {prof['warmup']}, {prof['repeats']} timed calls × "
        f"{prof['rounds']} interleaved rounds per variant{' (quick)' if prof['quick'] else ''}",
        f"- python {env['python']}, torch {env['torch']}, numpy {env['numpy']}",
        f"- git: {env['git_commit'] or 'no commit'}{' (dirty)' if env['git_dirty'] else ''}; "
        f"dnet_fast._C built: {ext.get('built')}",
        f"- load average (1/5/15 min) at start: {_loads(env.get('load_avg'))}; at end: {_loads(end.get('load_avg'))}",
    ]
    if end.get("wall_s") is not None:
        lines.append(f"- wall time of the whole run: {end['wall_s']:.0f} s")
    if prof.get("extra"):
        lines.append(f"- overrides (--set): `{json.dumps(prof['extra'])}`")
    return lines


def _loads(values: list[float] | None) -> str:
    return "—" if not values else " / ".join(f"{v:.2f}" for v in values)


def _variant_table(bench: dict[str, Any], point: dict[str, Any]) -> list[str]:
    unit = bench.get("unit", "img")
    lines = [
        f"| variant | ms/call (best round median) | median, all samples | IQR | min | {unit}/s | setup s "
        f"| speed-up vs `{bench['baseline']}` |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, v in point["variants"].items():
        t = v["timing"]
        scale = v.get("time_scale", 1.0)
        label = f"`{name}`" + (f" (timed on 1/{scale:g}, scaled)" if scale != 1.0 else "")
        lines.append(
            f"| {label} | {v['ms_per_call']:.1f} | {t['median'] * 1e3:.1f} | {t['iqr'] * 1e3:.1f} "
            f"| {t['min'] * 1e3:.1f} | {_fmt(v['units_per_s'], ',.1f')} | {_fmt(v['setup_s'], '.3f')} "
            f"| {_fmt(v['speedup_vs_baseline'], '.2f', '×')} |"
        )
    return lines


def _metrics_table(point: dict[str, Any]) -> list[str]:
    """Per-variant in-loop measurements (``metrics`` hook), one column per key in order of first appearance."""
    metrics = {n: v.get("metrics") or {} for n, v in point["variants"].items()}
    columns: list[str] = []
    for m in metrics.values():
        columns += [k for k in m if k not in columns]
    if not columns:
        return []
    rows = [{"variant": f"`{n}`", **m} for n, m in metrics.items()]
    return ["", "In-loop measurements (timed calls only):", "", *table(["variant", *columns], rows)]


def _verdict(r: dict[str, Any]) -> str:
    if r["passed"] is None:  # verdicts are judged on the best round medians
        return "—" if r["target"] is None else "not measured"
    return "met" if r["passed"] else "**MISSED**"


def _ratio_table(point: dict[str, Any]) -> list[str]:
    if not point.get("ratios"):
        return []
    pooled = {r["name"]: r["value"] for r in point.get("ratios_pooled", [])}
    fastest = {r["name"]: r["value"] for r in point.get("ratios_min", [])}
    lines = [
        "",
        "| ratio | value (best round medians) | (all-sample medians) | (fastest samples) | target | verdict |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for r in point["ratios"]:
        target = "—" if r["target"] is None else f"{r['op']} {r['target']:g}"
        lines.append(
            f"| {r['name']} (`{r['numerator']}` / `{r['denominator']}`) | {_fmt(r['value'], '.2f')} "
            f"| {_fmt(pooled.get(r['name']), '.2f')} | {_fmt(fastest.get(r['name']), '.2f')} | {target} "
            f"| {_verdict(r)} |"
        )
    return lines


def _derived_section(point: dict[str, Any]) -> list[str]:
    """Tables and absolute targets a benchmark derived from its measurements (``derived`` hook)."""
    derived = point.get("derived") or {}
    lines: list[str] = []
    for t in derived.get("tables", []):
        lines += ["", f"**{t['title']}**", ""]
        if t.get("note"):
            lines += [t["note"], ""]
        lines += table(t["columns"], t["rows"])
    targets = derived.get("targets", [])
    if targets:
        rows = [
            {
                "target": t["name"],
                "value": t["value"],
                "goal": f"{t['op']} {t['target']:g}",
                "verdict": _verdict(t),
            }
            for t in targets
        ]
        lines += ["", *table(["target", "value", "goal", "verdict"], rows)]
    return lines


def _point_section(bench: dict[str, Any], point: dict[str, Any]) -> list[str]:
    lines = ["", f"Parameters: `{json.dumps(point['params'])}`", ""]
    if "error" in point:
        return [*lines, f"**Error:** {point['error']}"]
    tp = point.get("timing_profile")
    if tp:
        lines += [f"Timing: warm-up {tp['warmup']}, {tp['repeats']} timed calls × {tp['rounds']} rounds.", ""]
    if point["variants"]:
        lines += [*_variant_table(bench, point), *_metrics_table(point), *_ratio_table(point)]
        lines += [*_derived_section(point), ""]
    for name, why in point.get("skipped", {}).items():
        lines.append(f"- skipped `{name}`: {why}")
    for key, text in point.get("notes", {}).items():
        lines.append(f"- note `{key}`: {text}")
    return lines


def markdown(payload: dict[str, Any]) -> str:
    """The whole report as Markdown: provenance, then per benchmark and grid point its tables and notes."""
    lines = ["# dnet-fast benchmark results", "", *environment_lines(payload)]
    for mod, err in payload.get("import_errors", {}).items():
        lines.append(f"- not loaded: `benchmarks.{mod}`: {err}")
    for bench in payload["benchmarks"]:
        lines += ["", f"## `{bench['name']}` — {bench['description']}"]
        if bench.get("wall_s") is not None:
            lines += ["", f"Wall time of this benchmark (set-up included): {bench['wall_s']:.0f} s."]
        for point in bench["points"]:
            lines += _point_section(bench, point)
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------------
# Plots


def _pyplot() -> Any:
    try:
        import matplotlib as mpl

        mpl.use("Agg")  # headless: never open a window
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _panels(benches: list[dict[str, Any]]) -> list[tuple[str, str, str, dict[str, Any]]]:
    """(title, unit, baseline, point) of every measured grid point."""
    out = []
    for b in benches:
        for p in b["points"]:
            if p.get("variants"):
                out.append((f"{b['name']}: {_short(p['params'])}", b.get("unit", "img"), b["baseline"], p))
    return out


def _throughput(v: dict[str, Any], unit: str) -> tuple[float, str]:
    if v.get("units_per_s"):
        return v["units_per_s"], f"{unit}/s"
    return 1.0 / v["best_median_s"], "calls/s"


def _draw(ax: Any, title: str, unit: str, point: dict[str, Any], baseline: str) -> None:
    names = list(point["variants"])
    values, label = zip(*(_throughput(point["variants"][n], unit) for n in names), strict=True)
    colours = ["0.6" if n == baseline else "tab:blue" for n in names]
    ax.barh(names[::-1], values[::-1], color=colours[::-1])
    if max(values) / max(min(values), 1e-12) > 50:
        ax.set_xscale("log")  # spans of 50x and more are unreadable on a linear axis
    for i, n in enumerate(names[::-1]):
        s = point["variants"][n].get("speedup_vs_baseline")
        if s is not None:
            ax.annotate(f" {s:.3g}×", (values[::-1][i], i), va="center", fontsize=7)
    ax.set_title(title, fontsize=8)
    ax.set_xlabel(f"{label[0]} (best round median; higher is better; grey = baseline)", fontsize=7)
    ax.tick_params(labelsize=7)


def plot(payload: dict[str, Any], path: Path, benches: list[dict[str, Any]] | None = None) -> Path | None:
    """Throughput bars (units/s, else calls/s) of every variant, one panel per grid point, baseline in grey.

    Args:
        payload: the runner payload.
        path: PNG to write.
        benches: the benchmarks to draw (default: all of ``payload``).

    Returns:
        The written PNG path, or None when matplotlib is missing or nothing was measured.
    """
    plt = _pyplot()
    benches = payload["benchmarks"] if benches is None else benches
    panels = _panels(benches)
    if plt is None or not panels:
        return None
    heights = [0.3 * len(p["variants"]) + 0.9 for *_, p in panels]
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, sum(heights) + 0.5), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    for ax, (title, unit, baseline, point) in zip(axes[:, 0], panels, strict=True):
        _draw(ax, title, unit, point, baseline)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plots(payload: dict[str, Any], out_dir: Path) -> list[Path]:
    """``results.png`` (every benchmark) and ``<name>.png`` per benchmark; empty when matplotlib is missing."""
    written = [plot(payload, out_dir / "results.png")]
    written += [plot(payload, out_dir / f"{b['name']}.png", [b]) for b in payload["benchmarks"]]
    return [p for p in written if p is not None]


def _short(params: dict[str, Any]) -> str:
    keys = ("name", "model", "precision", "crop", "batch", "device")
    return ", ".join(f"{k}={params[k]}" for k in keys if k in params)
