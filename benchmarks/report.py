"""Turns a runner payload into a Markdown report and, when matplotlib is importable, a PNG bar chart."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["environment_lines", "markdown", "plot"]


def _fmt(value: float | None, spec: str = ".2f", suffix: str = "") -> str:
    return "—" if value is None else f"{value:{spec}}{suffix}"


def environment_lines(payload: dict[str, Any]) -> list[str]:
    """The provenance block: command, date, machine, threads, versions, git state, extension, load."""
    env, prof = payload["environment"], payload["profile"]
    gpu = env.get("gpu")
    ext = env.get("dnet_fast_C", {})
    load_end = payload.get("environment_end", {}).get("load_avg")
    return [
        f"- command: `{payload['command']}`",
        f"- date (UTC): {env['date_utc']}",
        f"- machine: {env['cpu_model']}, {env['cpu_usable']} usable of {env['cpu_count']} CPUs, "
        f"{env['machine']}, {env['platform']}",
        f"- device: {prof['device']}" + (f" ({gpu['name']}, CUDA {env['cuda']})" if gpu else ""),
        f"- torch threads: {prof['threads']}; warm-up {prof['warmup']}, {prof['repeats']} timed calls × "
        f"{prof['rounds']} interleaved rounds per variant{' (quick)' if prof['quick'] else ''}",
        f"- python {env['python']}, torch {env['torch']}, numpy {env['numpy']}",
        f"- git: {env['git_commit'] or 'no commit'}{' (dirty)' if env['git_dirty'] else ''}; "
        f"dnet_fast._C built: {ext.get('built')}",
        f"- load average (1/5/15 min) at start: {_loads(env.get('load_avg'))}; at end: {_loads(load_end)}",
    ]


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
        lines.append(
            f"| `{name}` | {v['ms_per_call']:.1f} | {t['median'] * 1e3:.1f} | {t['iqr'] * 1e3:.1f} "
            f"| {t['min'] * 1e3:.1f} | {_fmt(v['units_per_s'], '.1f')} | {_fmt(v['setup_s'], '.3f')} "
            f"| {_fmt(v['speedup_vs_baseline'], '.2f', '×')} |"
        )
    return lines


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


def _point_section(bench: dict[str, Any], point: dict[str, Any]) -> list[str]:
    lines = ["", f"Parameters: `{json.dumps(point['params'])}`", ""]
    if "error" in point:
        return [*lines, f"**Error:** {point['error']}"]
    if point["variants"]:
        lines += [*_variant_table(bench, point), *_ratio_table(point), ""]
    for name, why in point.get("skipped", {}).items():
        lines.append(f"- skipped `{name}`: {why}")
    for key, text in point.get("notes", {}).items():
        lines.append(f"- note `{key}`: {text}")
    return lines


def markdown(payload: dict[str, Any]) -> str:
    """The whole report as Markdown: provenance, then per benchmark and grid point a variant and a ratio table."""
    lines = ["# dnet-fast benchmark results", "", *environment_lines(payload)]
    for mod, err in payload.get("import_errors", {}).items():
        lines.append(f"- not loaded: `benchmarks.{mod}`: {err}")
    for bench in payload["benchmarks"]:
        lines += ["", f"## `{bench['name']}` — {bench['description']}"]
        for point in bench["points"]:
            lines += _point_section(bench, point)
    return "\n".join(lines) + "\n"


def plot(payload: dict[str, Any], path: Path) -> Path | None:
    """Horizontal bars of ms per call for every variant of every grid point; None when matplotlib is missing.

    Returns:
        The written PNG path, or None.
    """
    try:
        import matplotlib as mpl

        mpl.use("Agg")  # headless: never open a window
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [
        (f"{b['name']} {_short(p['params'])} {name}", v["ms_per_call"])
        for b in payload["benchmarks"]
        for p in b["points"]
        for name, v in p.get("variants", {}).items()
    ]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(9, 0.35 * len(rows) + 1.2))
    ax.barh([r[0] for r in rows][::-1], [r[1] for r in rows][::-1])
    ax.set_xlabel("ms per call (best round median, lower is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _short(params: dict[str, Any]) -> str:
    return ",".join(f"{k}={v}" for k, v in params.items() if k in ("model", "batch", "device"))
