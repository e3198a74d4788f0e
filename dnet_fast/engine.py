"""The training loop: per-epoch A_C measurement, meta steps, the finite-value guard, checkpoints and resume."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dnet_fast import distributed
from dnet_fast.checkpoint import (
    PROGRESS_KEYS,
    check_resumable,
    load_checkpoint,
    run_state,
    save_checkpoint,
    set_rng_state,
)
from dnet_fast.config import TrainConfig, config_to_dict, resolve_paths
from dnet_fast.data import DATASETS, DataBundle, LoaderSpec, MetaSet, Recipe, make_loader
from dnet_fast.data.loaders import loader_workers, resolve_loader
from dnet_fast.distributed import LOCAL, Collective
from dnet_fast.evaluation import class_accuracy, evaluate, evaluate_from_accuracy, resolve_device
from dnet_fast.history import HistoryWriter
from dnet_fast.plugins import check_names
from dnet_fast.records import TrainCounts, history_row, weight_stats
from dnet_fast.rundir import check_fresh, new_run_dir
from dnet_fast.runlog import RunLog, epoch_line, progress
from dnet_fast.schedule import apply_lr, lr_factor
from dnet_fast.stack import TrainingStack, build_stack

__all__ = ["Session", "TrainingDiverged", "build_session", "fit", "recipe_of", "resolve_run_dir"]


class TrainingDiverged(RuntimeError):
    """A loss, gradient, parameter or class weight became NaN or infinite; the run stopped without reporting.

    Attributes:
        epoch: the epoch of the first non-finite iteration.
        global_step: its global iteration (0-based).
    """

    def __init__(self, epoch: int, global_step: int, iteration: int, checkpoint: Path) -> None:
        self.epoch, self.global_step = epoch, global_step
        kept = f"the last good checkpoint {checkpoint} is kept" if checkpoint.exists() else "no checkpoint was written"
        super().__init__(
            f"training diverged: a non-finite loss, gradient, parameter or class weight at epoch {epoch}, "
            f"iteration {iteration} of the epoch (global step {global_step}); {kept}; no accuracy is reported"
        )


@dataclass
class Session:
    """Everything one training run holds: the data and the training stack; built by :func:`build_session`."""

    cfg: TrainConfig
    bundle: DataBundle
    stack: TrainingStack  # model, optimiser, loss, meta mode, step
    loader: Any  # a dnet_fast.data Loader
    valset: MetaSet  # the val (= meta) images, eval-transformed once and kept on the device
    dist: Collective = LOCAL  # this process's rank under torchrun (dnet_fast.distributed); LOCAL otherwise
    loader_info: dict[str, Any] = dataclasses.field(default_factory=dict)  # resolved loader name and workers

    @property
    def device(self) -> torch.device:
        """The training device."""
        return self.stack.device


def recipe_of(cfg: TrainConfig) -> Recipe:
    """The stage-1 augmentation recipe the ``data`` section asks for (validated: a bad RandAugment spec raises
    ValueError naming the part)."""
    d = cfg.data
    return Recipe(autoaugment=d.autoaugment, randaugment=d.randaugment, color_jitter=d.color_jitter,
                  cutout=d.cutout)


def _loader_spec(cfg: TrainConfig, bundle: DataBundle, device: torch.device, *, train: bool,
                 dist: Collective = LOCAL) -> LoaderSpec:
    overrides = {} if cfg.data.augment == "auto" else {"augment": cfg.data.augment}
    return LoaderSpec.for_bundle(
        bundle, cfg.optim.batch_size if train else cfg.run.eval_batch, device=device, seed=cfg.run.seed,
        workers=loader_workers(cfg.data.workers, device), crop_size=cfg.data.crop_size, train=train,
        num_epochs=cfg.optim.epochs, recipe=recipe_of(cfg), rank=dist.rank, world_size=dist.world_size, **overrides,
    )


def build_session(cfg: TrainConfig) -> Session:
    """Builds data, the training stack and the loaders for ``cfg`` (validated; plugin names are checked here).

    Under torchrun it first joins the process group (``distributed.init_from_env``): the stack is then one rank's
    (DDP), and the loader reads this rank's shard of every epoch.

    Raises:
        ValueError: a plugin name is unknown, or the training set holds fewer images than one batch.
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
    name = resolve_loader(cfg.data.loader, bundle, spec)  # auto: the fastest available (data.loaders)
    loader = make_loader(name, bundle.train, spec, bundle)
    if len(loader) == 0:
        msg = (f"invalid config value optim.batch_size: {cfg.optim.batch_size} is larger than the training set "
               f"({len(bundle.train)} images): every epoch would run zero iterations")
        raise ValueError(msg)
    valset = MetaSet(
        bundle.val, bundle, device=device, seed=cfg.run.seed, sampler=cfg.meta.sampler,
        crop_size=cfg.data.crop_size, batch_size=cfg.run.eval_batch,
    )
    return Session(cfg, bundle, stack, loader, valset, dist, {"name": name, "workers": spec.workers})


def _val_accuracy(s: Session) -> torch.Tensor:
    """A_C on the device-resident val set (no re-decoding per epoch); under torchrun each rank counts its share
    and the counts are summed, so every rank gets the same A_C."""
    images, labels = s.dist.shard(s.valset.images), s.dist.shard(s.valset.labels)
    n, bs = len(labels), s.cfg.run.eval_batch
    batches = ((images[i : i + bs], labels[i : i + bs]) for i in range(0, n, bs))
    shown = progress(batches, total=-(-n // bs), desc="A_C (val)", images_per_item=bs,
                     enabled=s.cfg.run.progress and s.dist.is_main)
    return class_accuracy(s.stack.model, shown, s.bundle.num_classes, s.cfg, s.device, collective=s.dist)


# ----------------------------------------------------------------------------------------------------------
# Run directory and resume


def resolve_run_dir(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with ``run.out_dir`` set: a new directory per run when it is empty (see ``rundir.new_run_dir``)."""
    if cfg.run.out_dir:
        return cfg
    out = new_run_dir(cfg.run.name, cfg.meta.mode, cfg.run.seed)
    return dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, out_dir=str(out)))


def _resume_state(cfg: TrainConfig, device: torch.device) -> dict[str, Any]:
    """The checkpoint a resumed run continues from, checked against ``cfg`` before anything is written."""
    path = Path(cfg.run.out_dir) / "last.pt"
    state = load_checkpoint(path, map_location=device)
    check_resumable(config_to_dict(cfg), state["config"], path)
    return state


# ----------------------------------------------------------------------------------------------------------
# The loop


def _initial_accuracy(s: Session) -> torch.Tensor:
    """A_C for epoch 0: zeros (CIFAR presets) or the initial model's val accuracy (ImageNet/Places)."""
    if s.cfg.diffnet.init_acc == "zeros":
        return torch.zeros(s.bundle.num_classes, device=s.device)
    return _val_accuracy(s)


def _install_accuracy(s: Session, epoch: int, acc: torch.Tensor) -> None:
    """A_C for the iterations from now on: into the meta mode's static buffer and the loss's epoch buffers."""
    s.stack.meta.set_class_accuracy(acc.to(s.device))
    s.stack.criterion.start_epoch(epoch, acc.to(s.device))


class _Guard:
    """Reads the step's finite-value flag (a host sync) and raises `TrainingDiverged` naming the iteration."""

    def __init__(self, s: Session, first_step: int, epoch_starts: dict[int, int]) -> None:
        self.guard, self.first_step, self.epoch_starts = s.stack.step.guard, first_step, epoch_starts
        self.checkpoint = Path(s.cfg.run.out_dir) / "last.pt"

    def check(self) -> None:
        bad = self.guard.first_bad_iteration()
        if bad is None:
            return
        step = self.first_step + bad
        epoch = max(e for e, start in self.epoch_starts.items() if start <= step)
        raise TrainingDiverged(epoch, step, step - self.epoch_starts[epoch], self.checkpoint)


def _capped(cfg: TrainConfig, global_step: int) -> bool:
    """Whether ``run.max_iters`` (0: no cap) iterations have been run in total."""
    return 0 < cfg.run.max_iters <= global_step


def _train_epoch(s: Session, epoch: int, global_step: int, log: RunLog, history: HistoryWriter,
                 guard: _Guard) -> tuple[int, dict[str, Any], np.ndarray]:
    """Runs one epoch of meta steps (ending early at ``run.max_iters``); returns the new global step, epoch
    statistics and the train accuracy of the epoch's last refresh interval."""
    cfg, meta, step = s.cfg, s.stack.meta, s.stack.step
    s.stack.model.train()
    start, images = time.perf_counter(), 0
    batches = progress(s.loader.batches(epoch), total=len(s.loader), desc=f"epoch {epoch}",
                       images_per_item=cfg.optim.batch_size * s.dist.world_size,
                       enabled=cfg.run.progress and s.dist.is_main)
    stats: dict[str, torch.Tensor] = {}
    step.counter.reset()
    train_counts = TrainCounts(step.counter, s.dist)
    for x, y in batches:
        if cfg.meta.acc_every and global_step % cfg.meta.acc_every == 0 and global_step > 0:
            guard.check()  # a diverged model's accuracy is not fed back
            acc = _val_accuracy(s)
            meta.set_class_accuracy(acc)
            if global_step != history.last_step:  # at an epoch start the epoch's own refresh row covers it
                history.append(history_row(s.stack, cfg.diffnet.normalize, global_step, epoch, acc,
                                           train_counts.accuracy(), measured=True))
                train_counts.mark()
        # Under torchrun rank r draws batch step·N + r of the meta stream: the ranks never share a batch.
        meta_step = s.dist.stream_index(global_step)
        meta_batch = s.valset.batch(meta_step, cfg.meta.meta_batch) if meta.needs_meta_batch else None
        stats = _scalars(step.step(x, y, meta_batch))
        global_step += 1
        images += y.shape[0]
        if global_step % cfg.run.log_every == 0:
            guard.check()
            logged = s.dist.mean_scalars(stats)  # the global batch's loss under torchrun
            log.log("train", global_step, {**logged, "lr": s.stack.optimizer.param_groups[0]["lr"]})  # sync point
        if _capped(cfg, global_step):
            break
    guard.check()  # before anything of this epoch is evaluated or checkpointed
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


def fit(cfg: TrainConfig, *, resume: bool = False, stop_after: int | None = None) -> dict[str, Any]:
    """Trains per ``cfg``, checkpointing after every epoch, and evaluates the selected model on the test set.

    With ``run.max_iters`` the run ends after that many iterations in total (mid-epoch: that epoch counts as
    done); it is then evaluated and written like a finished run. Data paths are made absolute first
    (``config.resolve_paths``). Everything that can be checked is checked before the run directory is touched: plugin names, the data, the
    batch size against the training set, a fresh directory (or, with ``resume``, a loadable checkpoint whose
    config matches). A non-finite loss, gradient, parameter or class weight stops the run (`TrainingDiverged`)
    at the next logging point; no non-finite state is ever checkpointed or evaluated.

    Args:
        cfg: validated configuration; an empty ``run.out_dir`` becomes a new directory (`resolve_run_dir`).
        resume: continue from ``run.out_dir/last.pt`` (bit-exact on CPU).
        stop_after: stop after this many epochs in this call (as if interrupted); the test set is not evaluated.

    Returns:
        The results written to ``results.json`` (empty test entries when stopped early).

    Raises:
        ValueError: a bad config or run directory (nothing written). TrainingDiverged: see above.
    """
    if resume and not cfg.run.out_dir:
        msg = "--resume needs the run to continue: set run.out_dir=RUN_DIR"
        raise ValueError(msg)
    cfg = resolve_paths(cfg)
    if distributed.launched() and not cfg.run.out_dir:
        msg = "under torchrun every rank must write to the same run: set run.out_dir=RUN_DIR"
        raise ValueError(msg)
    cfg = resolve_run_dir(cfg)
    out = Path(cfg.run.out_dir)
    state = None
    if resume:
        state = _resume_state(cfg, resolve_device(cfg.run.device))
    else:
        check_fresh(out)
    s = build_session(cfg)
    progress_state = {"epoch": 0, "global_step": 0, "next_acc": None, "best_val": -1.0, "best_epoch": -1}
    if state is not None:
        s.stack.meta.load_state_dict(state)
        set_rng_state(state["rng"])
        progress_state = {k: state[k] for k in PROGRESS_KEYS}
        s.stack.step.reset()  # the optimizer's state tensors were replaced: rebind the static step to them
    log = RunLog(out, tensorboard=cfg.run.tensorboard, enabled=s.dist.is_main,
                 resume=None if state is None else (progress_state["global_step"], progress_state["epoch"]))
    log.write_config(cfg)
    log.write_json("meta_set.json", {"indices": [int(i) for i in s.valset.indices]})
    if s.dist.distributed:
        log.write_json("distributed.json", _distributed_info(s))
    history = _history_writer(s, out, None if state is None else progress_state["global_step"])
    try:
        results = _run(s, out, log, history, progress_state, stop_after)
    finally:
        log.close()
        history.close()
    return results


def _run(s: Session, out: Path, log: RunLog, history: HistoryWriter, progress_state: dict[str, Any],
         stop_after: int | None) -> dict[str, Any]:
    """The epochs of `fit` after set-up: train, measure A_C, log, record, checkpoint; then the test evaluation."""
    cfg = s.cfg
    acc = progress_state["next_acc"]
    if acc is None:
        acc = _initial_accuracy(s)
        _install_accuracy(s, 0, acc)
        history.append(history_row(s.stack, cfg.diffnet.normalize, 0, 0, acc, None,
                                   measured=cfg.diffnet.init_acc == "eval"))
    first = progress_state["epoch"]
    last = cfg.optim.epochs if stop_after is None else min(cfg.optim.epochs, first + stop_after)
    epoch_starts: dict[int, int] = {}
    guard = _Guard(s, progress_state["global_step"], epoch_starts)
    started = time.perf_counter()
    for epoch in range(first, last):
        if _capped(cfg, progress_state["global_step"]):
            break
        epoch_starts[epoch] = progress_state["global_step"]
        apply_lr(s.stack.optimizer, lr_factor(epoch, cfg.optim))
        _install_accuracy(s, epoch, acc)
        weights = weight_stats(s.stack)
        global_step, train_stats, train_acc = _train_epoch(s, epoch, progress_state["global_step"], log, history,
                                                           guard)
        # The val accuracy at the end of epoch e is A_C for epoch e + 1 (the model does not change in between).
        acc = _val_accuracy(s)
        val = evaluate_from_accuracy(acc, s.bundle.val, s.bundle)
        improved = val.top1 > progress_state["best_val"]
        progress_state = {
            "epoch": epoch + 1, "global_step": global_step, "next_acc": acc,
            "best_val": max(val.top1, progress_state["best_val"]),
            "best_epoch": epoch if improved else progress_state["best_epoch"],
        }
        row = {**train_stats, **val.as_dict("val_"), **weights,
               "lr": s.stack.optimizer.param_groups[0]["base_lr"] * lr_factor(epoch, cfg.optim)}
        log.log("epoch", epoch, row)
        # The next epoch's refresh is installed and recorded now, so its row is durable before this checkpoint.
        _install_accuracy(s, epoch + 1, acc)
        history.append(history_row(s.stack, cfg.diffnet.normalize, global_step, epoch + 1, acc, train_acc,
                                   measured=True))
        if s.dist.is_main:  # the ranks' states are equal; any world size can load the file
            state = run_state(config_to_dict(cfg), s.stack.meta.state_dict(), progress_state)
            save_checkpoint(out / "last.pt", state)
            if cfg.run.select == "val" and improved:
                save_checkpoint(out / "best.pt", state)
            elapsed = time.perf_counter() - started
            eta = elapsed / (epoch + 1 - first) * (last - epoch - 1)
            print(epoch_line(epoch, cfg.optim.epochs, row, eta_s=eta), flush=True)
        s.dist.barrier()  # the files exist before any rank may read them
    finished = progress_state["epoch"] >= cfg.optim.epochs or _capped(cfg, progress_state["global_step"])
    results = _final_results(s, out, progress_state, finished=finished)
    log.write_json("results.json", results)
    return results


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
    if s.dist.is_main:
        print(f"test: evaluating {len(s.bundle.test)} images ({results['selected']})", flush=True)
    test = evaluate(s.stack.model, s.bundle.test, s.bundle, s.cfg, s.device, collective=s.dist,
                    show_progress=s.cfg.run.progress and s.dist.is_main)
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
