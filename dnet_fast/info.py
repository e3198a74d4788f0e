"""Environment facts: versions, CUDA, git state and whether the C++ extension is built."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import torch

import dnet_fast

__all__ = ["environment", "extension_status", "format_environment", "load_average", "usable_cpus"]


def extension_status() -> dict[str, Any]:
    """Whether ``dnet_fast._C`` imports, where from, and which functions it exposes."""
    try:
        from dnet_fast.sampling import _C
    except ImportError as err:
        return {"built": False, "error": str(err)}
    names = sorted(n for n in dir(_C) if not n.startswith("_"))
    return {"built": True, "path": getattr(_C, "__file__", "?"), "functions": names}


def _git_state() -> dict[str, Any]:
    root = Path(dnet_fast.__file__).resolve().parent.parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True, timeout=5
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root, capture_output=True, text=True, check=True, timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": sha, "dirty": bool(dirty)}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_average() -> list[float] | None:
    """The 1/5/15-minute load averages (None where the OS has none): a busy machine skews timings."""
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def usable_cpus() -> int:
    """CPUs this process may run on (affinity, cgroup pinning), which can be fewer than ``os.cpu_count()``."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _cuda_state() -> dict[str, Any]:
    if not torch.cuda.is_available():
        return {"available": False, "torch_cuda": torch.version.cuda}
    props = torch.cuda.get_device_properties(0)
    return {
        "available": True,
        "torch_cuda": torch.version.cuda,
        "device": props.name,
        "count": torch.cuda.device_count(),
        "memory_gib": round(props.total_memory / 2**30, 1),
        "capability": f"{props.major}.{props.minor}",
        "cudnn": torch.backends.cudnn.version(),
    }


def environment() -> dict[str, Any]:
    """Provenance of a run or benchmark: machine, versions, CUDA, git commit, extension, date."""
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "dnet_fast": dnet_fast.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "hostname": platform.node(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_usable": usable_cpus(),
        "load_avg": load_average(),
        "torch_threads": torch.get_num_threads(),
        "cuda": _cuda_state(),
        "git": _git_state(),
        "extension": extension_status(),
    }


def format_environment(env: dict[str, Any]) -> str:
    """Human-readable block printed by ``dnet-fast info``."""
    ext = env["extension"]
    cuda = env["cuda"]
    lines = [
        f"dnet-fast   {env['dnet_fast']}",
        f"python      {env['python']}",
        f"torch       {env['torch']}  (threads: {env['torch_threads']})",
        f"numpy       {env['numpy']}",
        f"platform    {env['platform']}",
        f"cpu         {env['cpu']} x{env['cpu_count']}",
        "cuda        "
        + (f"yes: {cuda['device']} ({cuda['memory_gib']} GiB, sm_{cuda['capability']})" if cuda["available"]
           else "not available"),
        "extension   "
        + (f"built and importable: {ext['path']}" if ext["built"] else f"NOT built ({ext['error']})"),
        f"git         {env['git']['commit'] or 'unknown'}{' (dirty)' if env['git']['dirty'] else ''}",
    ]
    return "\n".join(lines)
