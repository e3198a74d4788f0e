"""The ``step`` benchmark: one training iteration of the eager modes against the naive references, side by side."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from benchmarks.harness import BENCHMARKS, Benchmark, Profile, Ratio, SkipVariant
from benchmarks.naive import NaiveExactStep, NaiveState, OfficialMetaLoader, OfficialStyleStep

__all__ = ["FULL", "QUICK", "StepBenchmark", "balanced_meta_indices", "synthetic_problem"]

#: The issue's setting: CIFAR-100 ResNet-32 at 32 px, batch 128, meta batch 100, 25 meta images per class.
FULL = {
    "model": "resnet32",
    "width": 16,
    "classes": 100,
    "image": 32,
    "batch": 128,
    "meta_batch": 100,
    "meta_per_class": 25,
}
#: Tiny shapes for ``--quick`` (seconds; checks the plumbing, not the speed).
QUICK = {
    "model": "resnet20",
    "width": 4,
    "classes": 10,
    "image": 8,
    "batch": 16,
    "meta_batch": 10,
    "meta_per_class": 3,
}

LR = 0.1  # main SGD lr, also the virtual-step size α
SEED = 0


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
    """``fn(step, m) -> (m,) indices`` of a class-balanced meta batch, the fast path's draw.

    Uses ``dnet_fast.sampling.MetaBatchSampler`` (C++) when it imports; otherwise a seeded torch draw with the same
    shape and balance (one image per class in a per-step random class order), so the benchmark runs before the
    extension is built.
    """
    labels = meta_y.cpu().numpy()
    try:
        from dnet_fast.sampling import MetaBatchSampler

        sampler = MetaBatchSampler(labels, seed=seed)
    except ImportError:
        return _torch_balanced(meta_y, seed)
    return lambda step, m: torch.from_numpy(sampler.batch(step, m)).to(meta_y.device)


def _torch_balanced(meta_y: Tensor, seed: int) -> Callable[[int, int], Tensor]:
    c = int(meta_y.max()) + 1
    k = meta_y.numel() // c  # meta sets here hold k images of every class, in class order

    def draw(step: int, m: int) -> Tensor:
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        classes = torch.randperm(c, generator=g).repeat(math.ceil(m / c))[:m]
        return (classes * k + torch.randint(0, k, (m,), generator=g)).to(meta_y.device)

    return draw


@BENCHMARKS.register("step")
class StepBenchmark(Benchmark):
    """One training iteration (data loading excluded) of every meta mode against the naive references.

    Variants: ``official`` (official-style loop, first-order virtual step on a fresh model copy), ``official_2nd``
    (the same with the CIFAR code's ``create_graph=True`` virtual step), ``naive_exact`` (model copy + plain double
    backward), and the eager library modes ``off``, ``driver``, ``exact`` (meta.grad=jvp) and
    ``exact_double_backward``. Every variant starts from the same weights.
    """

    name = "step"
    description = "one training iteration, naive references vs eager meta modes"
    baseline = "official"
    VARIANTS = ("official", "official_2nd", "naive_exact", "off", "driver", "exact", "exact_double_backward")

    def grid(self, profile: Profile) -> list[dict[str, Any]]:
        """One point: the issue's ResNet-32 setting, or tiny shapes with ``--quick``."""
        return [{**(QUICK if profile.quick else FULL), "device": profile.device}]

    def variants(self, params: dict[str, Any]) -> list[str]:  # noqa: ARG002  (same variants everywhere)
        """All variants, naive ones first."""
        return list(self.VARIANTS)

    def ratios(self, params: dict[str, Any]) -> list[Ratio]:  # noqa: ARG002  (targets do not depend on size)
        """The issue's targets, plus informational ratios."""
        return [
            Ratio("driver speed-up over official-style", "official", "driver", 2.5),
            Ratio("driver speed-up over official-style, 2nd-order CIFAR code", "official_2nd", "driver", 2.5),
            Ratio("driver overhead over off", "driver", "off", 1.05, higher_is_better=False),
            Ratio("exact speed-up over naive exact", "naive_exact", "exact", 1.5),
            Ratio(
                "exact (double_backward) speed-up over naive exact", "naive_exact", "exact_double_backward"
            ),
            Ratio("exact cost over off (SPEC est. 3.4-3.8)", "exact", "off", higher_is_better=False),
            Ratio("exact: double_backward / jvp", "exact_double_backward", "exact", higher_is_better=False),
            Ratio(
                "official-style cost over off (PERFORMANCE est. 2.78)",
                "official",
                "off",
                higher_is_better=False,
            ),
        ]

    def setup(self, params: dict[str, Any]) -> None:
        """Builds the shared data and the reference initial weights."""
        try:
            from dnet_fast.models import build_model  # noqa: F401  (availability check)
        except ImportError as exc:
            msg = f"dnet_fast.models not importable: {exc}"
            raise SkipVariant(msg) from exc
        self.params = params
        self.device = torch.device(params["device"])
        self.data = synthetic_problem(params, self.device)
        self.meta_indices = balanced_meta_indices(self.data.meta_y)
        self.init_state = {k: v.clone() for k, v in self._fresh_model(seed=SEED).state_dict().items()}
        self.units_per_call = params["batch"]
        self.notes = {}

    def teardown(self) -> None:
        """Drops the shared tensors."""
        self.data = self.init_state = None

    # -- construction helpers -------------------------------------------------------------------------

    def _fresh_model(self, seed: int | None = None) -> nn.Module:
        from dnet_fast.config import ModelConfig
        from dnet_fast.models import build_model

        if seed is not None:
            torch.manual_seed(seed)
        cfg = ModelConfig(backbone=self.params["model"], width=self.params["width"])
        return build_model(cfg, self.params["classes"]).to(self.device).train()

    def _start_model(self) -> tuple[nn.Module, torch.optim.Optimizer]:
        model = self._fresh_model(seed=SEED)
        model.load_state_dict(self.init_state)
        opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9, weight_decay=2e-4)
        return model, opt

    def _meta_batch(self, step: int) -> tuple[Tensor, Tensor]:
        idx = self.meta_indices(step, self.params["meta_batch"])
        return self.data.meta_x.index_select(0, idx), self.data.meta_y.index_select(0, idx)

    def _naive_state(self) -> NaiveState:
        from dnet_fast.models import DifficultyNet

        model, opt = self._start_model()
        torch.manual_seed(SEED + 1)
        diffnet = DifficultyNet(self.params["classes"], 128, bias=False).to(self.device)
        adam = torch.optim.Adam(diffnet.parameters(), lr=1e-5, weight_decay=1e-4)
        return NaiveState(model, diffnet, opt, adam, self.data.acc.clone(), lambda_dr=0.3)

    # -- variants ---------------------------------------------------------------------------------------

    def prepare(self, variant: str) -> Callable[[], object]:
        """Builds ``variant`` from the initial weights; returns one training iteration."""
        if variant.startswith("official"):
            return self._official(second_order=variant == "official_2nd")
        if variant == "naive_exact":
            return self._counted(NaiveExactStep(self._naive_state()).step, needs_meta=True)
        return self._library_mode(variant)

    def _official(self, *, second_order: bool) -> Callable[[], object]:
        state = self._naive_state()
        d = self.data
        loader = OfficialMetaLoader(d.meta_x, d.meta_y, self.params["meta_batch"], seed=SEED)
        step = OfficialStyleStep(state, self._fresh_model, loader, second_order=second_order)
        return lambda: step.step(d.x, d.y)

    def _counted(self, step_fn: Callable[..., object], *, needs_meta: bool) -> Callable[[], object]:
        """Wraps a step so each call draws the next meta batch (drawing is part of the measured work)."""
        counter = iter(range(1 << 62))
        d = self.data

        def call() -> object:
            meta = self._meta_batch(next(counter)) if needs_meta else None
            return step_fn(d.x, d.y, meta)

        return call

    def _library_mode(self, variant: str) -> Callable[[], object]:
        try:
            from dnet_fast.config import MetaConfig, ModelConfig, TrainConfig
            from dnet_fast.losses import build_loss
            from dnet_fast.meta import build_meta_mode
        except ImportError as exc:
            msg = f"dnet_fast.meta / losses not importable yet: {exc}"
            raise SkipVariant(msg) from exc
        mode, grad = ("exact", "double_backward") if variant == "exact_double_backward" else (variant, "jvp")
        p = self.params
        cfg = TrainConfig(
            model=ModelConfig(backbone=p["model"], width=p["width"]),
            meta=MetaConfig(mode=mode, grad=grad, meta_batch=p["meta_batch"]),
        )
        model, opt = self._start_model()
        criterion = build_loss(cfg.loss, self.data.counts, cfg.optim.epochs).to(self.device)
        torch.manual_seed(SEED + 1)
        mm = build_meta_mode(cfg, model, criterion, opt, p["classes"])
        mm.set_class_accuracy(self.data.acc)
        reason = getattr(mm, "grad_fallback_reason", None)
        if reason:
            self.notes[variant] = f"meta.grad=jvp fell back to double_backward: {reason}"
        return self._counted(mm.step, needs_meta=mm.needs_meta_batch)
