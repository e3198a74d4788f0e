"""The training loop: per-epoch A_C measurement, meta steps, evaluation, checkpoints and resume."""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dnet_fast.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from dnet_fast.config import TrainConfig, config_from_dict, config_to_dict
from dnet_fast.data import (
    DATASETS,
    DataBundle,
    LoaderSpec,
    MetaSet,
    eval_batches,
    group_accuracies,
    make_loader,
)
from dnet_fast.data.loaders import resolve_loader
from dnet_fast.info import usable_cpus
from dnet_fast.metrics import DeviceClassCounter
from dnet_fast.models import build_model
from dnet_fast.plugins import check_names
from dnet_fast.runlog import RunLog, progress
from dnet_fast.schedule import apply_lr, lr_factor
from dnet_fast.stack import TrainingStack, build_stack

__all__ = [
    "EvalResult",
    "Session",
    "build_session",
    "evaluate",
    "evaluate_checkpoint",
    "fit",
    "loader_workers",
    "resolve_device",
    "resolve_paths",
]


@dataclass(frozen=True)
class EvalResult:
    """Accuracy of a model on one split: overall top-1, shot groups and per-class values (fractions)."""

    top1: float
    many: float
    medium: float
    few: float
    per_class: tuple[float, ...]

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        """Scalars keyed ``{prefix}top1`` etc. (per-class values left out)."""
        return {f"{prefix}{k}": getattr(self, k) for k in ("top1", "many", "medium", "few")}


@dataclass
class Session:
    """Everything one training run holds: the data and the training stack; built by :func:`build_session`."""

    cfg: TrainConfig
    bundle: DataBundle
    stack: TrainingStack  # model, optimiser, loss, meta mode, step
    loader: Any  # a dnet_fast.data Loader
    valset: MetaSet  # the val (= meta) images, eval-transformed once and kept on the device
    loader_info: dict[str, Any] = dataclasses.field(default_factory=dict)  # resolved loader name and workers

    @property
    def device(self) -> torch.device:
        """The training device."""
        return self.stack.device


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available; asking for CUDA without it is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        msg = "run.device=cuda but CUDA is not available (torch.cuda.is_available() is False)"
        raise ValueError(msg)
    return torch.device(name)


_PATH_KEYS = ("root", "train_list", "val_list", "test_list")  # DataConfig keys naming files or folders


def _absolute(section: Any, keys: Iterable[str]) -> Any:
    paths = {k: str(Path(v).expanduser().resolve()) for k in keys if (v := getattr(section, k))}
    return dataclasses.replace(section, **paths) if paths else section


def resolve_paths(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with the data paths and the pretrained checkpoint made absolute (against the current directory),
    so that the run's config.yaml and checkpoints name the same files from any working directory (``dnet-fast
    eval`` elsewhere)."""
    return dataclasses.replace(cfg, data=_absolute(cfg.data, _PATH_KEYS), model=_absolute(cfg.model, ("pretrained",)))


def loader_workers(requested: int, device: torch.device) -> int:
    """Loader workers/threads for ``data.workers`` (-1 = auto: what the training threads leave of the CPUs).

    Training on the CPU keeps ``torch.get_num_threads()`` cores busy; on CUDA one host thread feeds the GPU.
    More loader workers than the cores left over only contend with the step (FFCV with 2 workers beside 2 torch
    threads on a 2-core box ran 6x slower than with 1).
    """
    if requested >= 0:
        return requested
    training = torch.get_num_threads() if device.type == "cpu" else 1
    return max(1, usable_cpus() - training)


def _loader_spec(cfg: TrainConfig, bundle: DataBundle, device: torch.device, *, train: bool) -> LoaderSpec:
    overrides = {} if cfg.data.augment == "auto" else {"augment": cfg.data.augment}
    return LoaderSpec.for_bundle(
        bundle, cfg.optim.batch_size if train else cfg.run.eval_batch, device=device, seed=cfg.run.seed,
        workers=loader_workers(cfg.data.workers, device), crop_size=cfg.data.crop_size, train=train,
        num_epochs=cfg.optim.epochs, **overrides,
    )


def build_session(cfg: TrainConfig) -> Session:
    """Builds data, the training stack and the loaders for ``cfg`` (validated; plugin names are checked here)."""
    check_names(cfg)
    device = resolve_device(cfg.run.device)
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    bundle = DATASETS.get(cfg.data.dataset)(cfg.data, cfg.data.seed)
    stack = build_stack(cfg, bundle.class_counts, device)
    spec = _loader_spec(cfg, bundle, device, train=True)
    name = resolve_loader(cfg.data.loader, bundle, spec)  # auto: the fastest available (data.loaders)
    loader = make_loader(name, bundle.train, spec, bundle)
    valset = MetaSet(
        bundle.val, bundle, device=device, seed=cfg.run.seed, sampler=cfg.meta.sampler,
        crop_size=cfg.data.crop_size, batch_size=cfg.run.eval_batch,
    )
    return Session(cfg, bundle, stack, loader, valset, {"name": name, "workers": spec.workers})


@torch.no_grad()
def class_accuracy(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], num_classes: int,
                   cfg: TrainConfig, device: torch.device) -> torch.Tensor:
    """Per-class accuracy (C,) of ``model`` over ``batches`` in eval mode, counted on the device."""
    was_training = model.training
    model.eval()
    counter = DeviceClassCounter(num_classes, device)
    for x, y in batches:
        with _autocast(cfg, device):
            logits = model(_memory_format(x, cfg))
        counter.update(logits.float(), y)
    model.train(was_training)
    return counter.per_class_accuracy()


def _val_accuracy(s: Session) -> torch.Tensor:
    """A_C on the device-resident val set (no re-decoding per epoch)."""
    n, bs = len(s.valset), s.cfg.run.eval_batch
    batches = ((s.valset.images[i : i + bs], s.valset.labels[i : i + bs]) for i in range(0, n, bs))
    return class_accuracy(s.stack.model, batches, s.bundle.num_classes, s.cfg, s.device)


def evaluate(model: nn.Module, split: Any, bundle: DataBundle, cfg: TrainConfig,
             device: torch.device) -> EvalResult:
    """Balanced top-1 and many/medium/few accuracies (groups from the training counts)."""
    batches = eval_batches(split, bundle, cfg.run.eval_batch, device, cfg.data.crop_size)
    return evaluate_from_accuracy(class_accuracy(model, batches, bundle.num_classes, cfg, device), split, bundle)


def _autocast(cfg: TrainConfig, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    if cfg.run.precision == "bf16" and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _memory_format(x: torch.Tensor, cfg: TrainConfig) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if cfg.model.channels_last else x


# ----------------------------------------------------------------------------------------------------------
# Checkpoint state


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


_PROGRESS = ("epoch", "global_step", "next_acc", "best_val", "best_epoch")


def _checkpoint_state(s: Session, progress_state: dict[str, Any]) -> dict[str, Any]:
    """Config, RNG, progress and everything the meta mode owns (``MetaMode.owned``: model, criterion,
    optimisers, auxiliary nets, A), each under its declared name."""
    return {
        "format": "dnet-fast/2",
        "config": config_to_dict(s.cfg),
        "rng": _rng_state(),
        **progress_state,
        **s.stack.meta.state_dict(),
    }


def _restore(s: Session, state: dict[str, Any]) -> dict[str, Any]:
    s.stack.meta.load_state_dict(state)
    _set_rng_state(state["rng"])
    return {k: state[k] for k in _PROGRESS}


def _check_resumable(cfg: TrainConfig, saved: dict[str, Any], path: Path) -> None:
    """A resumed run must use the checkpoint's config (only run.* and optim.epochs may differ)."""
    mine = config_to_dict(cfg)
    for section, values in saved.items():
        for key, value in values.items():
            if section == "run" or (section, key) == ("optim", "epochs"):
                continue
            if mine[section][key] != value:
                msg = (f"cannot resume from {path}: {section}.{key} is {mine[section][key]!r} but the checkpoint "
                       f"was trained with {value!r}")
                raise ValueError(msg)


# ----------------------------------------------------------------------------------------------------------
# The loop


def _initial_accuracy(s: Session) -> torch.Tensor:
    """A_C for epoch 0: zeros (CIFAR presets) or the initial model's val accuracy (ImageNet/Places)."""
    if s.cfg.diffnet.init_acc == "zeros":
        return torch.zeros(s.bundle.num_classes, device=s.device)
    return _val_accuracy(s)


def _capped(cfg: TrainConfig, global_step: int) -> bool:
    """Whether ``run.max_iters`` (0: no cap) iterations have been run in total."""
    return 0 < cfg.run.max_iters <= global_step


def _train_epoch(s: Session, epoch: int, global_step: int, log: RunLog) -> tuple[int, dict[str, Any]]:
    """Runs one epoch of meta steps (ending early at ``run.max_iters``); returns the new global step and the
    epoch statistics."""
    cfg, meta, step = s.cfg, s.stack.meta, s.stack.step
    s.stack.model.train()
    start, images = time.perf_counter(), 0
    batches = progress(s.loader.batches(epoch), total=len(s.loader), desc=f"epoch {epoch}",
                       images_per_item=cfg.optim.batch_size, enabled=cfg.run.progress)
    stats: dict[str, torch.Tensor] = {}
    step.counter.reset()
    for x, y in batches:
        if cfg.meta.acc_every and global_step % cfg.meta.acc_every == 0 and global_step > 0:
            meta.set_class_accuracy(_val_accuracy(s))
        meta_batch = s.valset.batch(global_step, cfg.meta.meta_batch) if meta.needs_meta_batch else None
        stats = _scalars(step.step(x, y, meta_batch))
        global_step += 1
        images += y.shape[0]
        if global_step % cfg.run.log_every == 0:
            log.log("train", global_step, {**stats, "lr": s.stack.optimizer.param_groups[0]["lr"]})  # sync point
        if _capped(cfg, global_step):
            break
    seconds = time.perf_counter() - start
    correct, total = step.counter.correct.sum(), step.counter.total.sum()
    return global_step, {"epoch_seconds": seconds, "images_per_s": images / max(seconds, 1e-9),
                         "train_top1": correct / total.clamp_min(1),
                         **{f"last_{k}": v for k, v in stats.items()}}


def _scalars(outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The step's 0-d outputs (the logged statistics; the logits are counted inside the step)."""
    return {k: v for k, v in outputs.items() if v.ndim == 0}


def _weight_stats(s: Session) -> dict[str, float]:
    w = s.stack.meta.class_weights()
    if w is None:
        return {}
    w = w.detach().float().cpu()  # sync point
    e = float(-(torch.log(w.clamp_min(1e-12))).mean())
    return {"w_min": float(w.min()), "w_max": float(w.max()), "E": e}


def fit(cfg: TrainConfig, *, resume: bool = False, stop_after: int | None = None) -> dict[str, Any]:
    """Trains per ``cfg``, checkpointing after every epoch, and evaluates the selected model on the test set.

    With ``run.max_iters`` the run ends after that many iterations in total (mid-epoch: that epoch counts as
    done); it is then evaluated and written like a finished run. Data paths are made absolute first
    (:func:`resolve_paths`).

    Args:
        cfg: validated configuration.
        resume: continue from ``run.out_dir/last.pt`` (bit-exact on CPU).
        stop_after: stop after this many epochs in this call (as if interrupted); the test set is not evaluated.

    Returns:
        The results written to ``results.json`` (empty test entries when stopped early).
    """
    cfg = resolve_paths(cfg)
    s = build_session(cfg)
    out = Path(cfg.run.out_dir)
    log = RunLog(out, tensorboard=cfg.run.tensorboard)
    log.write_config(cfg)
    log.write_json("meta_set.json", {"indices": [int(i) for i in s.valset.indices]})
    progress_state = {"epoch": 0, "global_step": 0, "next_acc": None, "best_val": -1.0, "best_epoch": -1}
    if resume:
        path = out / "last.pt"
        state = load_checkpoint(path, map_location=s.device)
        _check_resumable(cfg, state["config"], path)
        progress_state = _restore(s, state)
        s.stack.step.reset()  # the optimizer's state tensors were replaced: rebind the static step to them
    acc = progress_state["next_acc"]
    if acc is None:
        acc = _initial_accuracy(s)
    first = progress_state["epoch"]
    last = cfg.optim.epochs if stop_after is None else min(cfg.optim.epochs, first + stop_after)
    for epoch in range(first, last):
        if _capped(cfg, progress_state["global_step"]):
            break
        apply_lr(s.stack.optimizer, lr_factor(epoch, cfg.optim))
        s.stack.meta.set_class_accuracy(acc.to(s.device))
        s.stack.criterion.start_epoch(epoch, acc.to(s.device))
        weights = _weight_stats(s)
        global_step, train_stats = _train_epoch(s, epoch, progress_state["global_step"], log)
        # The val accuracy at the end of epoch e is A_C for epoch e + 1 (the model does not change in between).
        acc = _val_accuracy(s)
        val = evaluate_from_accuracy(acc, s.bundle.val, s.bundle)
        improved = val.top1 > progress_state["best_val"]
        progress_state = {
            "epoch": epoch + 1, "global_step": global_step, "next_acc": acc,
            "best_val": max(val.top1, progress_state["best_val"]),
            "best_epoch": epoch if improved else progress_state["best_epoch"],
        }
        log.log("epoch", epoch, {**train_stats, **val.as_dict("val_"), **weights,
                                 "lr": s.stack.optimizer.param_groups[0]["base_lr"] * lr_factor(epoch, cfg.optim)})
        state = _checkpoint_state(s, progress_state)
        save_checkpoint(out / "last.pt", state)
        if cfg.run.select == "val" and improved:
            save_checkpoint(out / "best.pt", state)
    finished = progress_state["epoch"] >= cfg.optim.epochs or _capped(cfg, progress_state["global_step"])
    results = _final_results(s, out, progress_state, finished=finished)
    log.write_json("results.json", results)
    log.close()
    return results


def evaluate_from_accuracy(acc: torch.Tensor, split: Any, bundle: DataBundle) -> EvalResult:
    """EvalResult from a per-class accuracy vector already measured on ``split``."""
    per_class = acc.detach().float().cpu().numpy()  # sync point
    counts = np.bincount(split.labels, minlength=bundle.num_classes)
    present = counts > 0
    groups = group_accuracies(per_class[present], bundle.class_counts[present])
    top1 = float((per_class * counts).sum() / counts.sum())
    return EvalResult(top1, groups["many"], groups["medium"], groups["few"], tuple(float(a) for a in per_class))


def _final_results(s: Session, out: Path, progress_state: dict[str, Any], *, finished: bool) -> dict[str, Any]:
    results: dict[str, Any] = {
        "config": config_to_dict(s.cfg),
        "epochs_done": progress_state["epoch"],
        "iterations": progress_state["global_step"],
        "loader": s.loader_info,
        "best_val": progress_state["best_val"],
        "best_epoch": progress_state["best_epoch"],
        "class_counts": [int(c) for c in s.bundle.class_counts],
    }
    if not finished:
        return results
    if s.cfg.run.select == "val" and (out / "best.pt").exists():
        s.stack.model.load_state_dict(load_checkpoint(out / "best.pt", map_location=s.device)["model"])
        results["selected"] = f"best val (epoch {progress_state['best_epoch']})"
    else:
        results["selected"] = "last epoch"
    test = evaluate(s.stack.model, s.bundle.test, s.bundle, s.cfg, s.device)
    results["test"] = {**test.as_dict(), "per_class": list(test.per_class)}
    return results


def evaluate_checkpoint(
    path: str | Path, *, split: str = "test", device: str = "auto", data_root: str | Path | None = None
) -> dict[str, Any]:
    """Rebuilds the run of checkpoint ``path`` and evaluates its model on ``split`` (val or test).

    Args:
        path: a checkpoint written by :func:`fit`.
        split: ``test`` or ``val``.
        device: ``auto`` | ``cpu`` | ``cuda``.
        data_root: replaces the checkpoint's ``data.root`` (the data was moved or copied); relative paths are
            taken from the current directory.
    """
    state = load_checkpoint(path, map_location="cpu")
    cfg = config_from_dict(state["config"], source=str(path))
    data = cfg.data if data_root is None else dataclasses.replace(cfg.data, root=str(data_root))
    run = dataclasses.replace(cfg.run, device=device, progress=False)
    cfg = resolve_paths(dataclasses.replace(cfg, data=data, run=run)).validate()
    check_names(cfg)
    dev = resolve_device(device)
    bundle = DATASETS.get(cfg.data.dataset)(cfg.data, cfg.data.seed)
    model = build_model(dataclasses.replace(cfg.model, pretrained=""), bundle.num_classes).to(dev)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:
        msg = f"checkpoint {path} does not match its own config's model: {err}"
        raise CheckpointError(msg) from err
    result = evaluate(model, getattr(bundle, split), bundle, cfg, dev)
    return {"checkpoint": str(path), "split": split, "epoch": state.get("epoch"), **result.as_dict(),
            "per_class": list(result.per_class)}
