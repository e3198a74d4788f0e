"""Stage-2 runs: the config read from a finished stage-1 run, the frozen-backbone session, training, the τ sweep.

``load_stage2_config(preset, source, overrides)`` takes data, model, head and loss from the stage-1 checkpoint and
the stage-2 recipe from a stage-2 preset; ``fit_stage2(cfg)`` builds and checks everything before it writes the
run directory (``config.yaml``, ``env.json``, ``metrics.jsonl``, ``last.pt`` / ``best.pt``, ``results.json``).

Selection is never on test: the τ of τ-norm and, with ``run.select=val``, the reported epoch come from the val
split; the test split is evaluated once, at the end.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import Tensor, nn

from dnet_fast.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from dnet_fast.config import (
    OptimConfig,
    Stage2Config,
    TrainConfig,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    preset_names,
    preset_path,
)
from dnet_fast.data import DATASETS, DataBundle, LoaderSpec, eval_batches, loader_workers, make_loader
from dnet_fast.evaluation import EvalResult, class_accuracy, evaluate_from_accuracy, resolve_device
from dnet_fast.metrics import class_counter
from dnet_fast.models import build_model
from dnet_fast.plugins import check_names
from dnet_fast.rundir import load_results, run_label
from dnet_fast.runlog import RunLog, progress
from dnet_fast.schedule import apply_lr, lr_factor
from dnet_fast.stage2.features import (
    BN_MODES,
    EPOCH_LENGTHS,
    CachedFeatures,
    FeatureBank,
    StreamedFeatures,
    extract_bank,
    set_stage2_modes,
)
from dnet_fast.stage2.methods import STAGE2_METHODS, Stage2Head, Stage2Method, tau_grid

__all__ = [
    "DATA_KEYS",
    "Stage1Run",
    "Stage2Session",
    "Stage2Trainer",
    "build_stage2_session",
    "fit_stage2",
    "load_stage2_config",
    "read_stage1",
    "stage2_presets",
]

#: data keys a stage-2 run may change (where the images live and how they load); the rest is the checkpoint's.
DATA_KEYS = ("root", "train_list", "val_list", "test_list", "loader", "workers")
_FREE_SECTIONS = ("stage2", "run")  # sections a stage-2 run sets itself (stage2.source only through --from)
_FORMAT = "dnet-fast/stage2"


# ----------------------------------------------------------------------------------------------------------
# The config: the stage-1 checkpoint's, plus a stage-2 preset and overrides


@dataclass(frozen=True)
class Stage1Run:
    """The stage-1 model a stage-2 run starts from.

    Attributes:
        cfg: its config (from the checkpoint).
        state: the checkpoint (``model`` is the state dict).
        path: the checkpoint file: ``best.pt`` when the run selected on val, else ``last.pt``.
    """

    cfg: TrainConfig
    state: dict[str, Any]
    path: Path


def read_stage1(run_dir: str | Path) -> Stage1Run:
    """Reads the finished stage-1 run in ``run_dir`` and checks that it can seed stage 2.

    Raises:
        ValueError: not a run directory, an unreadable checkpoint, a config that is not a mapping, a stage-2 run,
            or a run that stopped before its last epoch (the message says which).
    """
    run = Path(run_dir)
    last = run / "last.pt"
    if not run.is_dir() or not last.is_file():
        msg = f"--from {run}: not a stage-1 run directory (no {last.name})"
        raise ValueError(msg)
    state = load_checkpoint(last)
    cfg = _checkpoint_config(state, last)
    if cfg.stage2.method != "none":
        msg = (f"--from {run}: a stage-2 run ({cfg.stage2.method}); pass the stage-1 run it came from "
               f"({cfg.stage2.source})")
        raise ValueError(msg)
    if int(state.get("epoch", 0)) < cfg.optim.epochs:
        msg = (f"--from {run}: the stage-1 run stopped after {state.get('epoch', 0)} of {cfg.optim.epochs} epochs; "
               "finish it first (dnet-fast train ... --resume)")
        raise ValueError(msg)
    best = run / "best.pt"
    if cfg.run.select == "val" and best.is_file():  # the model stage 1 reported
        return Stage1Run(cfg, load_checkpoint(best), best)
    return Stage1Run(cfg, state, last)


def _checkpoint_config(state: dict[str, Any], path: Path) -> TrainConfig:
    raw = state["config"]
    if not isinstance(raw, Mapping) or not all(isinstance(v, Mapping) for v in raw.values()):
        msg = f"checkpoint {path}: its config is not a mapping of sections ({type(raw).__name__})"
        raise CheckpointError(msg)
    if not isinstance(state["model"], Mapping):
        msg = f"checkpoint {path}: its model entry is not a state dict"
        raise CheckpointError(msg)
    return config_from_dict({k: dict(v) for k, v in raw.items()}, source=str(path))


def stage2_presets() -> list[str]:
    """Names of the shipped stage-2 presets (``*_stage2.yaml``: only a ``stage2`` section)."""
    return [name for name in preset_names() if name.endswith("_stage2")]


def _preset_stage2(preset: str | None) -> Stage2Config:
    """The ``stage2`` section of a stage-2 preset (name or path); defaults without one."""
    if preset is None:
        return Stage2Config()
    path = preset_path(preset)
    raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    other = sorted(set(raw) - {"stage2"}) if isinstance(raw, dict) else ["<not a mapping>"]
    if other:
        msg = (f"{preset} is not a stage-2 preset (it sets {', '.join(other)}, which stage 2 reads from the "
               f"stage-1 checkpoint); stage-2 presets: {', '.join(stage2_presets())}")
        raise ValueError(msg)
    return config_from_dict(raw, source=str(path)).stage2


def load_stage2_config(preset: str | None, source: str | Path, overrides: Iterable[str] = ()) -> TrainConfig:
    """The validated config of a stage-2 run on the stage-1 run ``source``.

    Sections data, model, optim, loss, diffnet and meta are the stage-1 checkpoint's (``data.root`` and the other
    ``DATA_KEYS`` may be overridden: the images can move); ``stage2`` comes from the preset and overrides; ``run``
    is the stage-1 run's (seed included) with ``out_dir`` = ``SOURCE/<method>`` unless overridden.

    Raises:
        ValueError: a bad ``source`` (see :func:`read_stage1`), a preset that is not a stage-2 preset, an override
            of a key the checkpoint fixes, no method, or an invalid value.
    """
    overrides = list(overrides)
    if any(o.startswith("stage2.source=") for o in overrides):
        msg = "stage2.source is set by --from RUN_DIR"
        raise ValueError(msg)
    stage1 = read_stage1(source)
    cfg = dataclasses.replace(stage1.cfg, stage2=dataclasses.replace(_preset_stage2(preset), source=str(source)))
    cfg = apply_overrides(cfg, overrides)
    _check_same_model(cfg, stage1)  # an override may restate a stage-1 value, never change one
    if cfg.stage2.method == "none":
        msg = ("stage 2 needs a method: --method crt | lws | tau_norm | las, or a stage-2 preset "
               f"({', '.join(stage2_presets())})")
        raise ValueError(msg)
    if not any(o.startswith("run.out_dir=") for o in overrides):
        out = str(Path(source) / cfg.stage2.method)
        cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, out_dir=out))
    return check_names(cfg.validate())


def _check_same_model(cfg: TrainConfig, stage1: Stage1Run) -> None:
    """Everything but run, stage2 and the data location must be the stage-1 checkpoint's."""
    mine, theirs = config_to_dict(cfg), config_to_dict(stage1.cfg)
    for section, values in theirs.items():
        if section in _FREE_SECTIONS:
            continue
        for key, value in values.items():
            if (section != "data" or key not in DATA_KEYS) and mine[section][key] != value:
                msg = (f"stage 2: {section}.{key} is {mine[section][key]!r} but the stage-1 checkpoint "
                       f"{stage1.path} has {value!r}; stage 2 reads it from the checkpoint")
                raise ValueError(msg)


# ----------------------------------------------------------------------------------------------------------
# The session: everything built and checked before anything is written


@dataclass
class Stage2Session:
    """One stage-2 run: data, the stage-2 model, the method and where the classifier's features come from.

    Attributes:
        model: the stage-1 network with ``fc`` replaced by a :class:`Stage2Head`; backbone parameters frozen.
        head: ``model.fc``.
        shifted: the BatchNorm layers in train mode during training (shift BN); empty when frozen.
        train: class-balanced feature batches (cached or streamed); None for a method that does not train.
        val: val features, computed once when no BatchNorm statistics move (None: recomputed per epoch).
        stage1: the stage-1 run (config, checkpoint, path).
    """

    cfg: TrainConfig
    bundle: DataBundle
    model: nn.Module
    head: Stage2Head
    method: Stage2Method
    shifted: list[nn.Module]
    train: CachedFeatures | StreamedFeatures | None
    val: FeatureBank | None
    stage1: Stage1Run
    device: torch.device

    @property
    def feature_source(self) -> str:
        """How the classifier sees the train set: cached | streamed | none."""
        return {CachedFeatures: "cached", StreamedFeatures: "streamed"}.get(type(self.train), "none")


def _train_spec(cfg: TrainConfig, bundle: DataBundle, device: torch.device) -> LoaderSpec:
    """The class-balanced train loader of the recipe: k per class visit, the recipe's epoch length."""
    s = cfg.stage2
    family = bundle.augment if cfg.data.augment == "auto" else cfg.data.augment
    return LoaderSpec.for_bundle(
        bundle, s.batch_size, device=device, seed=cfg.run.seed, workers=loader_workers(cfg.data.workers, device),
        crop_size=cfg.data.crop_size, train=True, order="class_aware", per_visit=s.per_visit,
        num_samples=EPOCH_LENGTHS.get(s.epoch_length)(bundle.class_counts, s.batch_size), num_epochs=s.epochs,
        augment=family if s.augment else "none",
    )


def _eval_bank(model: nn.Module, split: Any, bundle: DataBundle, cfg: TrainConfig,
               device: torch.device) -> FeatureBank:
    """Features of every sample of ``split`` (eval transform, eval mode: the current BatchNorm statistics)."""
    batches = eval_batches(split, bundle, cfg.run.eval_batch, device, cfg.data.crop_size)
    return extract_bank(model, batches, cfg)


def _train_source(cfg: TrainConfig, bundle: DataBundle, model: nn.Module, shifted: list[nn.Module],
                  device: torch.device) -> CachedFeatures | StreamedFeatures:
    spec = _train_spec(cfg, bundle, device)
    if not cfg.stage2.augment and not shifted:
        # Fixed images and frozen statistics: the features are a fixed function of the sample, computed once.
        bank = _eval_bank(model, bundle.train, bundle, cfg, device)
        return CachedFeatures(bank, bundle.train.labels, spec)
    return StreamedFeatures(make_loader(cfg.data.loader, bundle.train, spec, bundle), model, cfg)


def _load_stage1_model(cfg: TrainConfig, stage1: Stage1Run, num_classes: int, device: torch.device) -> nn.Module:
    model = build_model(dataclasses.replace(cfg.model, pretrained=""), num_classes).to(device)
    try:
        model.load_state_dict(stage1.state["model"])
    except RuntimeError as err:
        msg = f"checkpoint {stage1.path} does not match its own config's model: {err}"
        raise CheckpointError(msg) from err
    return model


def build_stage2_session(cfg: TrainConfig) -> Stage2Session:
    """Reads the stage-1 run, builds data and the stage-2 model, and checks everything; writes nothing.

    Raises:
        ValueError: see :func:`read_stage1`; a config that differs from the checkpoint's; an output directory that
            is the stage-1 run itself; a BatchNorm mode the backbone cannot do.
    """
    check_names(cfg)
    if not cfg.stage2.source:
        msg = "stage 2 needs its stage-1 run: stage2.source (--from RUN_DIR)"
        raise ValueError(msg)
    if Path(cfg.run.out_dir).resolve() == Path(cfg.stage2.source).resolve():
        msg = f"run.out_dir {cfg.run.out_dir} is the stage-1 run itself; stage 2 writes its own directory"
        raise ValueError(msg)
    stage1 = read_stage1(cfg.stage2.source)
    _check_same_model(cfg, stage1)
    device = resolve_device(cfg.run.device)
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    bundle = DATASETS.get(cfg.data.dataset)(cfg.data, cfg.data.seed)
    model = _load_stage1_model(cfg, stage1, bundle.num_classes, device)
    method = STAGE2_METHODS.get(cfg.stage2.method)()
    model.fc = method.head(model.fc, cfg)
    model.requires_grad_(False)  # the backbone, and every head parameter the method does not train
    shifted = BN_MODES.get(method.bn(cfg.stage2))(model)
    train = _train_source(cfg, bundle, model, shifted, device) if method.trains else None
    val = None if shifted else _eval_bank(model, bundle.val, bundle, cfg, device)
    return Stage2Session(cfg, bundle, model, model.fc, method, shifted, train, val, stage1, device)


# ----------------------------------------------------------------------------------------------------------
# Evaluation on features


def _feature_cfg(cfg: TrainConfig) -> TrainConfig:
    # The head sees (B, F) features: no channels_last conversion of its input.
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, channels_last=False))


def _head_accuracy(s: Stage2Session, bank: FeatureBank) -> Tensor:
    """Per-class accuracy (C,) of the head on a feature bank."""
    return class_accuracy(s.head, bank.chunks(s.cfg.run.eval_batch), s.bundle.num_classes, _feature_cfg(s.cfg),
                          s.device)


def _evaluate(s: Stage2Session, split: Any, bank: FeatureBank | None = None) -> EvalResult:
    """Top-1 and shot groups on ``split``, from ``bank`` or from features computed now (current statistics)."""
    bank = bank if bank is not None else _eval_bank(s.model, split, s.bundle, s.cfg, s.device)
    return evaluate_from_accuracy(_head_accuracy(s, bank), split, s.bundle)


# ----------------------------------------------------------------------------------------------------------
# Training


def _optimizer(s: Stage2Session) -> torch.optim.SGD:
    """SGD over the method's groups (each at lr · lr_mult, carrying ``base_lr`` for the schedule)."""
    groups = []
    for g in s.method.groups(s.head, s.cfg.stage2):
        for p in g.params:
            p.requires_grad_(True)
        lr = s.cfg.stage2.lr * g.lr_mult
        groups.append({"name": g.name, "params": g.params, "lr": lr, "base_lr": lr})
    st = s.cfg.stage2
    return torch.optim.SGD(groups, lr=st.lr, momentum=st.momentum, weight_decay=st.weight_decay)


def _schedule(st: Stage2Config) -> OptimConfig:
    """The stage-2 recipe as the schedule module's input (per-epoch factor of each group's base lr)."""
    return OptimConfig(epochs=st.epochs, lr=st.lr, schedule=st.schedule, momentum=st.momentum,
                       weight_decay=st.weight_decay)


class Stage2Trainer:
    """The classifier steps of a session: the method's optimiser and loss, the lr schedule, the step count.

    Args:
        session: from :func:`build_stage2_session` (its method must train).
    """

    def __init__(self, session: Stage2Session) -> None:
        if session.train is None:
            msg = f"stage-2 method {session.cfg.stage2.method} trains nothing"
            raise ValueError(msg)
        self.s = session
        self.optimizer = _optimizer(session)
        self.criterion = session.method.criterion(session.cfg.stage2, session.bundle.class_counts).to(session.device)
        self.step = 0

    def train_epoch(self, epoch: int, log: RunLog | None = None, max_batches: int | None = None) -> dict[str, Any]:
        """One class-balanced epoch (its first ``max_batches`` batches if given) at the epoch's lr.

        Returns:
            Epoch statistics: seconds, images/s, train top-1 (a 0-d tensor), last loss.
        """
        s, cfg = self.s, self.s.cfg
        apply_lr(self.optimizer, lr_factor(epoch, _schedule(cfg.stage2)))
        set_stage2_modes(s.model, s.shifted)
        counter = class_counter(s.bundle.num_classes, s.device)
        start, images, loss = time.perf_counter(), 0, torch.zeros(())
        total = len(s.train) if max_batches is None else min(max_batches, len(s.train))
        batches = progress(itertools.islice(s.train.batches(epoch), total), total=total,
                           desc=f"stage 2 epoch {epoch}", images_per_item=cfg.stage2.batch_size,
                           enabled=cfg.run.progress)
        for f, y in batches:
            logits = s.head(f)  # (B, C)
            loss = self.criterion(logits, y).mean()
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            counter.update(logits.detach(), y)
            self.step, images = self.step + 1, images + len(y)
            if log is not None and self.step % cfg.run.log_every == 0:
                log.log("train", self.step, {"loss": loss.detach(), "lr": self.optimizer.param_groups[0]["lr"]})
        s.model.eval()
        seconds = time.perf_counter() - start
        correct, seen = counter.correct.sum(), counter.total.sum()
        return {"epoch_seconds": seconds, "images_per_s": images / max(seconds, 1e-9),
                "train_top1": correct / seen.clamp_min(1), "last_loss": loss.detach()}

    def validate(self) -> EvalResult:
        """Val accuracy of the current head (and, under shift BN, the current statistics)."""
        return _evaluate(self.s, self.s.bundle.val, self.s.val)


def _state(s: Stage2Session, opt: torch.optim.SGD | None, progress_state: dict[str, Any]) -> dict[str, Any]:
    return {"format": _FORMAT, "config": config_to_dict(s.cfg), **progress_state, "model": s.model.state_dict(),
            "optimizer": {} if opt is None else opt.state_dict(), "tau": s.head.tau}


def _fit_trained(s: Stage2Session, out: Path, log: RunLog) -> dict[str, Any]:
    """Trains the method's groups for ``stage2.epochs``, evaluating val after every epoch; returns progress."""
    trainer = Stage2Trainer(s)
    state: dict[str, Any] = {"epoch": 0, "best_val": -1.0, "best_epoch": -1}
    for epoch in range(s.cfg.stage2.epochs):
        stats = trainer.train_epoch(epoch, log)
        val = trainer.validate()
        improved = val.top1 > state["best_val"]
        state = {"epoch": epoch + 1, "best_val": max(val.top1, state["best_val"]),
                 "best_epoch": epoch if improved else state["best_epoch"]}
        log.log("epoch", epoch, {**stats, **val.as_dict("val_"), "lr": trainer.optimizer.param_groups[0]["lr"]})
        checkpoint = _state(s, trainer.optimizer, state)
        save_checkpoint(out / "last.pt", checkpoint)
        if s.cfg.run.select == "val" and improved:
            save_checkpoint(out / "best.pt", checkpoint)
    if s.cfg.run.select == "val":
        s.model.load_state_dict(load_checkpoint(out / "best.pt", map_location=s.device)["model"])
        return {**state, "selected": f"best val (epoch {state['best_epoch']})"}
    return {**state, "selected": "last epoch"}


def _fit_tau(s: Stage2Session, out: Path, log: RunLog) -> dict[str, Any]:
    """Sweeps τ on the val features, applies the best (first best on ties) and saves the model with it."""
    grid, sweep = tau_grid(s.cfg.stage2), []
    for i, tau in enumerate(grid):
        s.head.tau = tau
        val = _evaluate(s, s.bundle.val, s.val)
        sweep.append({"tau": tau, "val_top1": val.top1})
        log.log("tau", i, {"tau": tau, **val.as_dict("val_")})
    best = int(np.argmax([row["val_top1"] for row in sweep]))
    s.head.tau = grid[best]
    state = {"epoch": 0, "best_val": sweep[best]["val_top1"], "best_epoch": -1}
    save_checkpoint(out / "last.pt", _state(s, None, state))
    return {**state, "selected": f"τ = {grid[best]:.4g} (best of {len(grid)} on val)", "tau_sweep": sweep}


# ----------------------------------------------------------------------------------------------------------
# Results


def _stage1_summary(s: Stage2Session) -> dict[str, Any]:
    """Where the backbone came from, and the stage-1 test result when its results.json is there."""
    summary: dict[str, Any] = {"run": s.cfg.stage2.source, "checkpoint": s.stage1.path.name,
                               "epoch": s.stage1.state.get("epoch")}
    try:
        results = load_results(s.cfg.stage2.source)
    except (OSError, ValueError):
        return summary
    summary["label"] = run_label(results)
    summary["test"] = {k: v for k, v in results["test"].items() if k != "per_class"}
    return summary


def _stage2_summary(s: Stage2Session, progress_state: dict[str, Any]) -> dict[str, Any]:
    st, counts = s.cfg.stage2, s.bundle.class_counts
    groups = s.method.groups(s.head, st)
    summary = {
        "method": st.method, "label": s.method.label, "bn": s.method.bn(st), "features": s.feature_source,
        "trained": {g.name: g.lr_mult for g in groups}, **s.method.describe(st, counts), "tau": s.head.tau,
    }
    if s.train is not None:
        summary |= {"epoch_samples": len(s.train) * st.batch_size, "batches_per_epoch": len(s.train)}
    if "tau_sweep" in progress_state:
        summary["tau_sweep"] = progress_state["tau_sweep"]
    return summary


def _final_results(s: Stage2Session, progress_state: dict[str, Any]) -> dict[str, Any]:
    val = _evaluate(s, s.bundle.val, s.val)
    test = _evaluate(s, s.bundle.test)  # the only pass over the test split
    return {
        "config": config_to_dict(s.cfg),
        "epochs_done": progress_state["epoch"],
        "best_val": progress_state["best_val"],
        "best_epoch": progress_state["best_epoch"],
        "class_counts": [int(c) for c in s.bundle.class_counts],
        "selected": progress_state["selected"],
        "stage1": _stage1_summary(s),
        "stage2": _stage2_summary(s, progress_state),
        "val": val.as_dict(),
        "test": {**test.as_dict(), "per_class": list(test.per_class)},
    }


def fit_stage2(cfg: TrainConfig) -> dict[str, Any]:
    """Runs stage 2 per ``cfg`` (from :func:`load_stage2_config`) and evaluates the selected model on test.

    Everything is read and checked first (:func:`build_stage2_session`); only then is ``run.out_dir`` written.

    Returns:
        The results written to ``results.json``.
    """
    s = build_stage2_session(cfg)
    out = Path(cfg.run.out_dir)
    log = RunLog(out, tensorboard=cfg.run.tensorboard)
    log.write_config(cfg)
    progress_state = (_fit_trained if s.method.trains else _fit_tau)(s, out, log)
    results = _final_results(s, progress_state)
    log.write_json("results.json", results)
    log.close()
    return results
