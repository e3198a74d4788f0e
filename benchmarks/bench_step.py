"""The ``step`` benchmark: one training iteration of every meta mode (eager, and CUDA-graphed on a GPU) against the
naive references, side by side, on the stack the engine trains (``dnet_fast.stack.build_stack``).

CPU: the CIFAR ResNet-32 point (issue 2's targets). GPU (``--gpu``): ResNet-32 @32 fp32 and bf16, ResNet-50 @224
bf16 — graph vs eager vs official-style, exact and driver vs CE, warm-up and capture time, peak memory, the fraction
of the bf16 ceiling (``--set flops=true`` also counts FLOP per iteration, ``--set compile=true`` adds compiled
backbones, ``--set points=r50_bf16`` selects points).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from benchmarks import official
from benchmarks.harness import BENCHMARKS, Benchmark, Profile, Ratio
from benchmarks.naive import NaiveExactStep, NaiveState

__all__ = [
    "CPU_POINTS",
    "GPU_POINTS",
    "QUICK_POINTS",
    "StepBenchmark",
    "balanced_meta_indices",
    "library_stack",
    "synthetic_problem",
]

_R32 = {"model": "resnet32", "width": 16, "classes": 100, "image": 32, "batch": 128, "meta_batch": 100,
        "meta_per_class": 25, "precision": "fp32", "channels_last": False, "naive": True, "tree": "cifar"}
#: The issue's CPU setting: CIFAR-100 ResNet-32 at 32 px, batch 128, meta batch 100, 25 meta images per class.
CPU_POINTS = ({"name": "r32_fp32", **_R32, "iters": 1},)
#: GPU points; ``iters`` back-to-back iterations per timed call (replays are short; events need a long window).
GPU_POINTS = (
    {"name": "r32_fp32", **_R32, "iters": 50},
    {"name": "r32_bf16", **_R32, "precision": "bf16", "channels_last": True, "naive": False, "iters": 50},
    {"name": "r50_bf16", **_R32, "model": "resnet50", "classes": 1000, "image": 224, "meta_per_class": 1,
     "precision": "bf16", "channels_last": True, "naive": False, "tree": "imagenet_places", "iters": 15},
)
#: ``--quick``: tiny shapes; checks the plumbing, not the speed.
QUICK_POINTS = (
    {"name": "r32_quick", **_R32, "model": "resnet20", "width": 4, "classes": 10, "image": 8, "batch": 16,
     "meta_batch": 10, "meta_per_class": 3, "iters": 1},
)
FAST_MODES = ("off", "driver", "exact")
LR = 0.1  # main SGD lr, also the virtual-step size α
SEED = 0
#: FLOP per image of one CE training step (PERFORMANCE.md §1: 3 × 2 × MAC of the forward).
TRAIN_FLOP_PER_IMAGE = {"resnet32": 0.413e9, "resnet50": 24.5e9, "resnet20": 0.245e9, "resnet10": 5.34e9}
#: Dense bf16 peaks (PERFORMANCE.md §1) and the planning figure (≈80 % of the SXM peak).
PEAK_TFLOPS = {"H100 SXM": 989.4, "H100 PCIe": 756.0, "H200": 989.4}
PLANNING_TFLOPS = 790.0


@dataclasses.dataclass
class Problem:
    """Synthetic CIFAR-shaped data shared by every variant (the step benchmark excludes loading)."""

    x: Tensor  # (B, 3, H, W) normalised training batch
    y: Tensor  # (B,) long-tailed labels
    meta_x: Tensor  # (C·k, 3, H, W) resident meta set
    meta_y: Tensor  # (C·k,)
    acc: Tensor  # (C,) per-class accuracy, multiples of 1/k
    counts: np.ndarray  # (C,) training counts of an exponential profile, ρ = 100


def synthetic_problem(p: dict[str, Any], device: torch.device, seed: int = SEED) -> Problem:
    """A fixed training batch with long-tailed labels, a balanced meta set and an accuracy vector.

    Args:
        p: grid point (``classes``, ``image``, ``batch``, ``meta_per_class``).
        device: where the tensors live.
        seed: generator seed.
    """
    g = torch.Generator().manual_seed(seed)
    c, k, s = p["classes"], p["meta_per_class"], p["image"]
    counts = np.maximum(1, np.floor(500 * 100.0 ** (-np.arange(c) / max(c - 1, 1)))).astype(np.int64)
    prior = torch.as_tensor(counts / counts.sum())
    y = torch.multinomial(prior, p["batch"], replacement=True, generator=g)
    acc = torch.randint(0, k + 1, (c,), generator=g).float() / k
    return Problem(
        x=torch.randn(p["batch"], 3, s, s, generator=g).to(device),
        y=y.to(device),
        meta_x=torch.randn(c * k, 3, s, s, generator=g).to(device),
        meta_y=torch.arange(c).repeat_interleave(k).to(device),
        acc=acc.to(device),
        counts=counts,
    )


def balanced_meta_indices(meta_y: Tensor, seed: int = SEED) -> Callable[[int, int], Tensor]:
    """``fn(step, m) -> (m,) indices`` of a class-balanced meta batch, the fast path's draw (C++ sampler)."""
    from dnet_fast.sampling import MetaBatchSampler

    sampler = MetaBatchSampler(meta_y.cpu().numpy(), seed=seed)
    return lambda step, m: torch.from_numpy(sampler.batch(step, m)).to(meta_y.device)


def library_stack(p: dict[str, Any], mode: str, problem: Problem, device: torch.device, *, grad: str = "jvp",
                  graph: bool = False, compile_backbone: bool = False) -> Any:
    """The engine's stack (``build_stack``) for ``mode`` at point ``p``: CE, SGD lr 0.1 momentum 0.9 wd 2e-4,
    Difficulty-Net H = 128 with Adam 1e-5; A set to the problem's accuracy vector."""
    from dnet_fast.config import DiffNetConfig, MetaConfig, ModelConfig, RunConfig, TrainConfig
    from dnet_fast.stack import build_stack

    cfg = TrainConfig(
        model=ModelConfig(backbone=p["model"], width=p["width"], channels_last=p["channels_last"]),
        diffnet=DiffNetConfig(hidden=128, lr=1e-5),
        meta=MetaConfig(mode=mode, grad=grad, meta_batch=p["meta_batch"]),
        run=RunConfig(seed=SEED, precision=p["precision"], graph="on" if graph else "off",
                      compile=compile_backbone),
    ).validate()
    stack = build_stack(cfg, problem.counts, device)
    stack.meta.set_class_accuracy(problem.acc)
    return stack


def peak_tflops(device: torch.device) -> tuple[str | None, float | None]:
    """(form factor, dense bf16 peak TFLOP/s) read from the device name; (None, None) when unknown."""
    if device.type != "cuda":
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


@BENCHMARKS.register("step")
class StepBenchmark(Benchmark):
    """``iters`` training iterations per call (data loading excluded) of every meta mode vs the naive references.

    Variants: ``official`` (the released code's iteration for the point's tree, ``benchmarks/official.py``: CIFAR's
    fresh model copy and second-order virtual step, or ImageNet/Places' persistent pseudo model; its own shuffled
    meta loader, host syncs and input copies; train batches handed over on the host as its DataLoader yields
    them), ``naive_exact`` (model copy + plain double backward), the library modes ``off``, ``driver``, ``exact``
    (meta.grad=jvp), ``exact_double_backward`` (eager ``TrainStep``), and on CUDA ``off_graph``, ``driver_graph``,
    ``exact_graph`` (captured). Every variant draws its meta batch per iteration (part of the measured work).
    """

    name = "step"
    description = "training iterations: naive references vs meta modes, eager and CUDA-graphed"
    baseline = "official"

    def grid(self, profile: Profile) -> list[dict[str, Any]]:
        """CPU: ResNet-32; GPU: ResNet-32 fp32/bf16 and ResNet-50 bf16; quick: tiny shapes. ``--set`` keys
        override point values (``points=a,b`` selects; ``flops``, ``compile``, ``iters``, ``grad``)."""
        points = QUICK_POINTS if profile.quick else GPU_POINTS if profile.device == "cuda" else CPU_POINTS
        extra = dict(profile.extra)
        chosen = extra.pop("points", None)
        names = str(chosen).split(",") if chosen else [p["name"] for p in points]
        return [{**p, **extra, "device": profile.device} for p in points if p["name"] in names]

    def sequential(self, params: dict[str, Any]) -> bool:
        """One variant at a time on CUDA (peak memory per variant; large captured models do not fit together)."""
        return params["device"] == "cuda"

    def variants(self, params: dict[str, Any]) -> list[str]:
        """Naive references first, then the eager modes, then (CUDA) the graphed ones."""
        out = ["official", *(["naive_exact"] if params["naive"] else [])]
        out += [*FAST_MODES, "exact_double_backward"]
        if params["device"] == "cuda":
            out += [f"{m}_graph" for m in FAST_MODES]
            if params.get("compile"):
                out += ["off_graph_compiled", "driver_graph_compiled"]
        return out

    def ratios(self, params: dict[str, Any]) -> list[Ratio]:
        """Issue 2's eager targets, issue 15's graph targets (CUDA), and informational ratios."""
        out = [
            Ratio("driver speed-up over official-style", "official", "driver", 2.5),
            Ratio("driver overhead over off", "driver", "off", 1.05, higher_is_better=False),
            Ratio("exact speed-up over naive exact", "naive_exact", "exact", 1.5),
            Ratio("exact (double_backward) speed-up over naive exact", "naive_exact", "exact_double_backward"),
            Ratio("exact cost over off (SPEC est. 3.4-3.8)", "exact", "off", higher_is_better=False),
            Ratio("exact: double_backward / jvp", "exact_double_backward", "exact", higher_is_better=False),
            Ratio("official-style cost over off (PERFORMANCE est. 2.78)", "official", "off", higher_is_better=False),
        ]
        if params["device"] != "cuda":
            return out
        r50 = params["model"] == "resnet50"
        out += [
            Ratio("exact cost over CE (graph)", "exact_graph", "off_graph", 3.0, higher_is_better=False),
            Ratio("driver cost over CE (graph)", "driver_graph", "off_graph", 1.05, higher_is_better=False),
            Ratio("exact graph speed-up over official-style", "official", "exact_graph", None if r50 else 5.0),
            Ratio("driver graph speed-up over official-style", "official", "driver_graph"),
        ]
        for mode in FAST_MODES:
            bound = 1.1 if r50 else (3.0 if mode == "exact" else None)
            out.append(Ratio(f"{mode}: graph speed-up over eager", mode, f"{mode}_graph", bound))
        out += [Ratio(f"{m}: compiled graph speed-up over graph", f"{m}_graph", f"{m}_graph_compiled")
                for m in ("off", "driver")]
        return out

    def setup(self, params: dict[str, Any]) -> None:
        """Builds the shared data; cuDNN autotuning on for the library variants (the official loops set the flag
        their tree uses while they run)."""
        self.params = params
        self.device = torch.device(params["device"])
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        self.data = synthetic_problem(params, self.device)
        pin = self.device.type == "cuda" and params["tree"] == "imagenet_places"  # its DataLoader pins (I:389)
        self.host_batch = tuple(t.cpu().pin_memory() if pin else t.cpu() for t in (self.data.x, self.data.y))
        self.meta_indices = balanced_meta_indices(self.data.meta_y)
        self.units_per_call = params["batch"] * params["iters"]
        self._live: dict[str, Any] = {}

    def teardown(self) -> None:
        """Closes what is still live and drops the shared tensors."""
        for name in list(self._live):
            self.release(name)
        self.data = None

    # -- construction helpers -------------------------------------------------------------------------

    def _fresh_model(self) -> nn.Module:
        from dnet_fast.config import ModelConfig
        from dnet_fast.models import build_model

        torch.manual_seed(SEED)  # the same initial weights as build_stack gives the library variants
        cfg = ModelConfig(backbone=self.params["model"], width=self.params["width"])
        return build_model(cfg, self.params["classes"]).to(self.device).train()

    def _official(self) -> Callable[[], object]:
        from dnet_fast.models import DifficultyNet

        p, d = self.params, self.data
        model = self._fresh_model()
        torch.manual_seed(SEED + 1)
        diffnet = DifficultyNet(p["classes"], 128, bias=False).to(self.device)
        main, adam = official.official_optimizers(p["tree"], model, diffnet)
        loop = official.build(p["tree"], model, self._host_model, diffnet, main, adam, d.acc, d.meta_x.cpu(),
                              d.meta_y.cpu(), meta_batch=p["meta_batch"], seed=SEED)
        self._live["official"] = loop
        x, y = self.host_batch
        return self._iterations(lambda *_: loop.step(x, y), needs_meta=False)

    def _host_model(self) -> nn.Module:
        """A fresh classifier on the host, as the official code builds one (the loop seeds and moves it)."""
        from dnet_fast.config import ModelConfig
        from dnet_fast.models import build_model

        return build_model(ModelConfig(backbone=self.params["model"], width=self.params["width"]),
                           self.params["classes"])

    def _naive_state(self) -> NaiveState:
        from dnet_fast.models import DifficultyNet

        model = self._fresh_model()
        opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9, weight_decay=2e-4)
        torch.manual_seed(SEED + 1)
        diffnet = DifficultyNet(self.params["classes"], 128, bias=False).to(self.device)
        adam = torch.optim.Adam(diffnet.parameters(), lr=1e-5, weight_decay=1e-4)
        return NaiveState(model, diffnet, opt, adam, self.data.acc.clone(), lambda_dr=0.3)

    def _meta_batch(self, step: int) -> tuple[Tensor, Tensor]:
        idx = self.meta_indices(step, self.params["meta_batch"])
        return self.data.meta_x.index_select(0, idx), self.data.meta_y.index_select(0, idx)

    def _iterations(self, step_fn: Callable[..., object], *, needs_meta: bool) -> Callable[[], object]:
        """``iters`` iterations per call; each draws the next meta batch (drawing is part of the measured work)."""
        counter = iter(range(1 << 62))
        d, iters = self.data, self.params["iters"]

        def call() -> object:
            out = None
            for _ in range(iters):
                meta = self._meta_batch(next(counter)) if needs_meta else None
                out = step_fn(d.x, d.y, meta)
            return out

        return call

    # -- variants ---------------------------------------------------------------------------------------

    def prepare(self, variant: str) -> Callable[[], object]:
        """Builds ``variant`` from the initial weights and runs one untimed call (capture for graph variants)."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        if variant == "official":
            fn = self._official()
        elif variant == "naive_exact":
            fn = self._iterations(NaiveExactStep(self._naive_state()).step, needs_meta=True)
        else:
            fn = self._library(variant)
        fn()
        return fn

    def _library(self, variant: str) -> Callable[[], object]:
        mode = variant.split("_")[0]
        grad = "double_backward" if "double_backward" in variant else self.params.get("grad", "jvp")
        stack = library_stack(self.params, mode, self.data, self.device, grad=grad, graph="graph" in variant,
                              compile_backbone=variant.endswith("compiled"))
        self._live[variant] = stack
        reason = getattr(stack.meta, "grad_fallback_reason", None)
        if reason:
            self.notes[variant] = f"meta.grad=jvp fell back to double_backward: {reason}"
        return self._iterations(stack.step.step, needs_meta=stack.meta.needs_meta_batch)

    # -- measurements beyond time -----------------------------------------------------------------------

    def metrics(self, variant: str) -> dict[str, Any]:
        """Graph warm-up/capture seconds, peak memory (CUDA) and, with ``flops``, FLOP per iteration."""
        out: dict[str, Any] = {}
        stack = self._live.get(variant)
        if variant == "official":
            out["meta_loader_starts"] = stack.meta_loader.starts
            return out | self._peak()
        if stack is not None and stack.step.graph:
            out |= {"graph_warmup_s": stack.step.warmup_seconds, "capture_s": stack.step.capture_seconds}
        if self.params.get("flops") and stack is not None and not stack.step.graph:
            mb = self._meta_batch(0) if stack.meta.needs_meta_batch else None
            out["flop_per_iter"] = count_flops(lambda: stack.step.step(self.data.x, self.data.y, mb))
        return out | self._peak()

    def _peak(self) -> dict[str, float]:
        if self.device.type != "cuda":
            return {}
        return {"peak_mem_gib": torch.cuda.max_memory_allocated(self.device) / 2**30}

    def release(self, variant: str) -> None:
        """Drops the variant's stack or loop (sequential CUDA points)."""
        live = self._live.pop(variant, None)
        if variant == "official" and live is not None:
            live.close()

    def derived(self, point: dict[str, Any]) -> dict[str, Any]:
        """Fraction of the bf16 ceiling per variant (CUDA): CE-equivalent TFLOP/s and, if counted, actual."""
        form, peak = peak_tflops(self.device)
        ce_flop = TRAIN_FLOP_PER_IMAGE.get(self.params["model"])
        if peak is None or ce_flop is None:
            return {}
        counted = {n: v["metrics"].get("flop_per_iter") for n, v in point["variants"].items()}
        rows = []
        for name, v in point["variants"].items():
            flop = counted.get(name) or counted.get(name.replace("_graph", "").replace("_compiled", ""))
            tflops = v["units_per_s"] * ce_flop / 1e12
            row = {"variant": f"`{name}`", "img/s": v["units_per_s"], "CE-equiv TFLOP/s": tflops,
                   "% of planning 790": 100 * tflops / PLANNING_TFLOPS, f"% of {form} peak": 100 * tflops / peak}
            if flop:
                counted_tflops = flop / (v["best_median_s"] / self.params["iters"]) / 1e12
                row["counted TFLOP/s"] = counted_tflops
                row[f"counted % of {form} peak"] = 100 * counted_tflops / peak
            rows.append(row)
        columns = list(dict.fromkeys(k for r in rows for k in r))
        return {"tables": [{"title": f"Fraction of the dense bf16 ceiling ({form}, {peak} TFLOP/s)",
                            "columns": columns, "rows": rows}]}
