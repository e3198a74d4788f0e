"""The training loop: per-epoch A_C measurement, meta steps, the per-class history, checkpoints and resume."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dnet_fast import distributed
from dnet_fast.checkpoint import load_checkpoint, save_checkpoint
from dnet_fast.config import TrainConfig, config_to_dict
from dnet_fast.data import DATASETS, DataBundle, LoaderSpec, MetaSet, make_loader
from dnet_fast.distributed import LOCAL, Collective
from dnet_fast.evaluation import class_accuracy, evaluate, evaluate_from_accuracy, resolve_device
from dnet_fast.history import HistoryRow, HistoryWriter
from dnet_fast.meta import class_weights
from dnet_fast.plugins import check_names
from dnet_fast.runlog import RunLog, progress
from dnet_fast.schedule import apply_lr, lr_factor
from dnet_fast.stack import TrainingStack, build_stack

__all__ = ["Session", "build_session", "fit"]


@dataclass
class Session:
    """Everything one training run holds: the data and the training stack; built by :func:`build_session`."""

    cfg: TrainConfig
    bundle: DataBundle
    stack: TrainingStack  # model, optimiser, loss, meta mode, step
    loader: Any  # a dnet_fast.data Loader
    valset: MetaSet  # the val (= meta) images, eval-transformed once and kept on the device
    dist: Collective = LOCAL  # this process's rank under torchrun (dnet_fast.distributed); LOCAL otherwise

    @property
    def device(self) -> torch.device:
        """The training device."""
        return self.stack.device


def _loader_spec(cfg: TrainConfig, bundle: DataBundle, device: torch.device, *, train: bool,
                 dist: Collective = LOCAL) -> LoaderSpec:
    overrides = {} if cfg.data.augment == "auto" else {"augment": cfg.data.augment}
    return LoaderSpec.for_bundle(
        bundle, cfg.optim.batch_size if train else cfg.run.eval_batch, device=device, seed=cfg.run.seed,
        workers=cfg.data.workers, crop_size=cfg.data.crop_size, train=train, num_epochs=cfg.optim.epochs,
        rank=dist.rank, world_size=dist.world_size, **overrides,
    )


def build_session(cfg: TrainConfig) -> Session:
    """Builds data, the training stack and the loaders for ``cfg`` (validated; plugin names are checked here).

    Under torchrun it first joins the process group (``distributed.init_from_env``): the stack is then one rank's
    (DDP), and the loader reads this rank's shard of every epoch.
    """
    check_names(cfg)
    device = resolve_device(cfg.run.device)
    dist = distributed.init_from_env(device, cfg.run.dist_timeout, capture=cfg.run.graph != "off")
    device = dist.device(device)
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    bundle = DATASETS.get(cfg.data.dataset)(cfg.data, cfg.data.seed)
    stack = build_stack(cfg, bundle.class_counts, device, collective=dist)
    spec = _loader_spec(cfg, bundle, device, train=True, dist=dist)
    loader = make_loader(cfg.data.loader, bundle.train, spec, bundle)
    valset = MetaSet(
        bundle.val, bundle, device=device, seed=cfg.run.seed, sampler=cfg.meta.sampler,
        crop_size=cfg.data.crop_size, batch_size=cfg.run.eval_batch,
    )
    return Session(cfg, bundle, stack, loader, valset, dist)


def _val_accuracy(s: Session) -> torch.Tensor:
    """A_C on the device-resident val set (no re-decoding per epoch); under torchrun each rank counts its share
    and the counts are summed, so every rank gets the same A_C."""
    images, labels = s.dist.shard(s.valset.images), s.dist.shard(s.valset.labels)
    n, bs = len(labels), s.cfg.run.eval_batch
    batches = ((images[i : i + bs], labels[i : i + bs]) for i in range(0, n, bs))
    return class_accuracy(s.stack.model, batches, s.bundle.num_classes, s.cfg, s.device, collective=s.dist)


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


# ----------------------------------------------------------------------------------------------------------
# The per-class history (dnet_fast.history): one row per A_C refresh


def _loss_factors(s: Session) -> np.ndarray | None:
    """(C,) factor on each sample's loss now: Difficulty-Net's w times the loss's own class weights (CB, LDAM-DRW,
    CDB-CE); None when weights are per sample (MWN) and the loss has none."""
    w = s.stack.meta.class_weights()  # ones for off, None for mwn
    own = getattr(s.stack.criterion, "class_weight", None)
    if w is None and own is None:
        return None
    factors = torch.ones(s.bundle.num_classes, dtype=torch.float64)
    for part in (w, own):
        if part is not None:
            factors = factors * part.detach().double().cpu()  # sync point
    return factors.numpy()


def _difficulties(s: Session) -> np.ndarray | None:
    meta = s.stack.meta
    if meta.diffnet is None:
        return None
    with torch.no_grad():
        _, d = class_weights(meta.diffnet, meta.acc, s.cfg.diffnet.normalize)
    return d.double().cpu().numpy()  # sync point


class _TrainCounts:
    """Per-class train accuracy over the batches since the last refresh, from the step's running counters
    (summed over ranks under torchrun)."""

    def __init__(self, counter: Any, dist: Collective = LOCAL) -> None:
        self.counter, self.dist = counter, dist
        self.mark()

    def mark(self) -> None:
        """Starts a new interval at the counters' current values."""
        self._since = (self.counter.correct.clone(), self.counter.total.clone())

    def accuracy(self) -> np.ndarray:
        """(C,) accuracy since the mark; NaN for classes without a sample in the interval."""
        correct, total = self.dist.summed(self.counter.correct - self._since[0], self.counter.total - self._since[1])
        correct, total = correct.double().cpu(), total.double().cpu()  # sync point
        return torch.where(total > 0, correct / total.clamp_min(1), torch.nan).numpy()


def _history_row(s: Session, step: int, epoch: int, acc: torch.Tensor, train_acc: np.ndarray | None, *,
                 measured: bool) -> HistoryRow:
    """The refresh just installed in the meta mode and the loss, as a history row."""
    host_acc = acc.detach().double().cpu().numpy()  # sync point
    return HistoryRow(step=step, epoch=epoch, acc=host_acc, difficulty=_difficulties(s), weights=_loss_factors(s),
                      train_acc=train_acc, val_acc=host_acc if measured else None)


def _install_accuracy(s: Session, epoch: int, acc: torch.Tensor) -> None:
    """A_C for the iterations from now on: into the meta mode's static buffer and the loss's epoch buffers."""
    s.stack.meta.set_class_accuracy(acc.to(s.device))
    s.stack.criterion.start_epoch(epoch, acc.to(s.device))


def _train_epoch(s: Session, epoch: int, global_step: int, log: RunLog,
                 history: HistoryWriter) -> tuple[int, dict[str, Any], np.ndarray]:
    """Runs one epoch of meta steps; returns the new global step, epoch statistics and the train accuracy of the
    epoch's last refresh interval."""
    cfg, meta, step = s.cfg, s.stack.meta, s.stack.step
    s.stack.model.train()
    start, images = time.perf_counter(), 0
    batches = progress(s.loader.batches(epoch), total=len(s.loader), desc=f"epoch {epoch}",
                       images_per_item=cfg.optim.batch_size * s.dist.world_size,
                       enabled=cfg.run.progress and s.dist.is_main)
    stats: dict[str, torch.Tensor] = {}
    step.counter.reset()
    train_counts = _TrainCounts(step.counter, s.dist)
    for x, y in batches:
        if cfg.meta.acc_every and global_step % cfg.meta.acc_every == 0 and global_step > 0:
            acc = _val_accuracy(s)
            meta.set_class_accuracy(acc)
            if global_step != history.last_step:  # at an epoch start the epoch's own refresh row covers it
                history.append(_history_row(s, global_step, epoch, acc, train_counts.accuracy(), measured=True))
                train_counts.mark()
        # Under torchrun rank r draws batch step·N + r of the meta stream: the ranks never share a batch.
        meta_step = s.dist.stream_index(global_step)
        meta_batch = s.valset.batch(meta_step, cfg.meta.meta_batch) if meta.needs_meta_batch else None
        stats = _scalars(step.step(x, y, meta_batch))
        global_step += 1
        images += y.shape[0]
        if global_step % cfg.run.log_every == 0:
            logged = s.dist.mean_scalars(stats)  # the global batch's loss under torchrun
            log.log("train", global_step, {**logged, "lr": s.stack.optimizer.param_groups[0]["lr"]})  # sync point
    seconds = time.perf_counter() - start
    correct, total = s.dist.summed(step.counter.correct.sum(), step.counter.total.sum())
    images *= s.dist.world_size  # every rank's batches: the run's throughput
    epoch_stats = {"epoch_seconds": seconds, "images_per_s": images / max(seconds, 1e-9),
                   "train_top1": correct / total.clamp_min(1),
                   **{f"last_{k}": v for k, v in s.dist.mean_scalars(stats).items()}}
    return global_step, epoch_stats, train_counts.accuracy()


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

    Args:
        cfg: validated configuration.
        resume: continue from ``run.out_dir/last.pt`` (bit-exact on CPU).
        stop_after: stop after this many epochs in this call (as if interrupted); the test set is not evaluated.

    Returns:
        The results written to ``results.json`` (empty test entries when stopped early).
    """
    s = build_session(cfg)
    out = Path(cfg.run.out_dir)
    log = RunLog(out, tensorboard=cfg.run.tensorboard, enabled=s.dist.is_main)
    log.write_config(cfg)
    log.write_json("meta_set.json", {"indices": [int(i) for i in s.valset.indices]})
    if s.dist.distributed:
        log.write_json("distributed.json", _distributed_info(s))
    progress_state = {"epoch": 0, "global_step": 0, "next_acc": None, "best_val": -1.0, "best_epoch": -1}
    if resume:
        path = out / "last.pt"
        state = load_checkpoint(path, map_location=s.device)
        _check_resumable(cfg, state["config"], path)
        progress_state = _restore(s, state)
        s.stack.step.reset()  # the optimizer's state tensors were replaced: rebind the static step to them
    history = _history_writer(s, out, progress_state["global_step"] if resume else None)
    acc = progress_state["next_acc"]
    if acc is None:
        acc = _initial_accuracy(s)
        _install_accuracy(s, 0, acc)
        history.append(_history_row(s, 0, 0, acc, None, measured=cfg.diffnet.init_acc == "eval"))
    first = progress_state["epoch"]
    last = cfg.optim.epochs if stop_after is None else min(cfg.optim.epochs, first + stop_after)
    for epoch in range(first, last):
        apply_lr(s.stack.optimizer, lr_factor(epoch, cfg.optim))
        _install_accuracy(s, epoch, acc)
        weights = _weight_stats(s)
        global_step, train_stats, train_acc = _train_epoch(s, epoch, progress_state["global_step"], log, history)
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
        # The next epoch's refresh is installed and recorded now, so its row is durable before this checkpoint.
        _install_accuracy(s, epoch + 1, acc)
        history.append(_history_row(s, global_step, epoch + 1, acc, train_acc, measured=True))
        if s.dist.is_main:  # the ranks' states are equal; any world size can load the file
            state = _checkpoint_state(s, progress_state)
            save_checkpoint(out / "last.pt", state)
            if cfg.run.select == "val" and improved:
                save_checkpoint(out / "best.pt", state)
        s.dist.barrier()  # the files exist before any rank may read them
    results = _final_results(s, out, progress_state, finished=progress_state["epoch"] >= cfg.optim.epochs)
    log.write_json("results.json", results)
    log.close()
    history.close()
    return results


def _final_results(s: Session, out: Path, progress_state: dict[str, Any], *, finished: bool) -> dict[str, Any]:
    results: dict[str, Any] = {
        "config": config_to_dict(s.cfg),
        "epochs_done": progress_state["epoch"],
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
    test = evaluate(s.stack.model, s.bundle.test, s.bundle, s.cfg, s.device, collective=s.dist)
    results["test"] = {**test.as_dict(), "per_class": list(test.per_class)}
    return results


# ----------------------------------------------------------------------------------------------------------
# torchrun: rank 0 writes (dnet_fast.distributed)


def _history_writer(s: Session, out: Path, resume_step: int | None) -> HistoryWriter | distributed.MutedHistory:
    """The history writer on rank 0; on the other ranks a muted one that starts at rank 0's last step."""
    history = HistoryWriter(out, s.bundle.num_classes, resume_step=resume_step) if s.dist.is_main else None
    last_step = s.dist.broadcast_object(history.last_step if history is not None else None)
    return history if history is not None else distributed.MutedHistory(last_step)


def _distributed_info(s: Session) -> dict[str, Any]:
    """distributed.json: how the run was spread (one iteration = one step of the global batch)."""
    n, b = s.dist.world_size, s.cfg.optim.batch_size
    return {"world_size": n, "backend": torch.distributed.get_backend(s.dist.group), "batch_per_rank": b,
            "global_batch": n * b, "meta_batch_per_rank": s.cfg.meta.meta_batch,
            "global_meta_batch": n * s.cfg.meta.meta_batch, "sync_bn": s.cfg.model.sync_bn,
            "graph": s.stack.step.graph}
