"""The frozen configuration tree: sections, YAML presets, dotted overrides and validation.

A leaf module: it imports no other dnet_fast module and no torch, so reading a config is cheap. It owns the closed
enumerations that are part of the schema (``DEVICES``, ``PRECISIONS``, ...; the code that branches on them imports
them from here). Keys that name a plugin (dataset, loader, backbone, head, loss, meta mode, meta-gradient
algorithm, lr schedule, stage-2 method) are checked against their registries by ``dnet_fast.plugins.check_names``, which every
entry point runs right after ``load_config``, before anything is written.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "AUGMENT_FAMILIES",
    "CIFAR_VARIANTS",
    "DEVICES",
    "GRAPH_CHOICES",
    "INIT_ACC",
    "META_SAMPLERS",
    "NORMALIZATIONS",
    "PRECISIONS",
    "SELECTIONS",
    "STAGE2_BN",
    "STAGE2_EPOCH_LENGTHS",
    "DataConfig",
    "DiffNetConfig",
    "LossConfig",
    "MetaConfig",
    "ModelConfig",
    "OptimConfig",
    "RunConfig",
    "Stage2Config",
    "TrainConfig",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "dump_yaml",
    "load_config",
    "preset_names",
    "preset_path",
    "read_preset",
]

PRESET_DIR = Path(__file__).parent / "configs"

# Closed enumerations of the schema (plugin names are checked by dnet_fast.plugins instead).
AUGMENT_FAMILIES = ("cifar", "imagenet", "none")  # train augmentation families ("auto": the dataset's)
CIFAR_VARIANTS = ("standard", "official")  # CIFAR-LT construction (SPEC §8)
META_SAMPLERS = ("balanced", "shuffle")  # meta-batch draws (SPEC §3)
NORMALIZATIONS = ("sum_to_C", "none")  # difficulties → class weights (SPEC §1)
INIT_ACC = ("zeros", "eval")  # epoch-0 accuracy vector (SPEC §2)
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("fp32", "bf16")  # bf16: autocast without GradScaler, CUDA only
GRAPH_CHOICES = ("auto", "on", "off")  # CUDA-graph step: auto = iff CUDA
SELECTIONS = ("last", "val")  # reported model: last epoch or best val accuracy (never test)
STAGE2_EPOCH_LENGTHS = ("classes_x_max", "dataset_plus_one")  # stage-2 epoch: C·n_max samples | ⌈N/B⌉+1 batches
STAGE2_BN = ("frozen", "shift", "shift_extra_block")  # LAS BatchNorm: eval | backbone BN train | extra block only


@dataclass(frozen=True, slots=True)
class DataConfig:
    """Where the images come from and how they are loaded."""

    dataset: str = "synthetic"  # dataset registry name: synthetic | cifar10_lt | cifar100_lt | splits | shards
    root: str = ""  # dataset root: CIFAR python folder, image root, or shard folder
    seed: int = 0  # seed of the data itself (generated images, LT subsets, meta draws); run.seed varies training
    imbalance: float = 100.0  # ρ = n_max / n_min of the exponential profile (synthetic, CIFAR-LT)
    num_classes: int = 10  # number of classes (synthetic only; others read it from the data)
    max_count: int = 200  # images of the head class (synthetic only)
    image_size: int = 16  # side of generated images in px (synthetic only)
    crop_size: int = 224  # train/eval crop in px for file-based data (ImageNet-style transforms)
    val_per_class: int = 20  # balanced val (= meta) images per class (synthetic, CIFAR-LT)
    test_per_class: int = 50  # balanced test images per class (synthetic only)
    cifar_variant: str = "standard"  # CIFAR-LT: standard (seeded draw) | official (last 25/class held out)
    train_list: str = ""  # split file for the train set (splits dataset): "relative/path label" per line
    val_list: str = ""  # split file for the val (= meta) set
    test_list: str = ""  # split file for the test set
    meta_per_class: int = 10  # meta/val images per class drawn from the val split file (splits dataset)
    # train loader registry name: resident | naive | ffcv | dali, or auto = the fastest that fits the data:
    # resident (decoded set in memory) when the split is in memory or its decoded size fits the device's budget,
    # else ffcv (.beton converted, ffcv importable), else dali (shards, DALI importable), else naive
    loader: str = "auto"
    # loader worker processes/threads; -1 = auto: max(1, usable CPUs − training threads), where the training
    # threads are torch.get_num_threads() on the CPU and 1 on CUDA (more workers only contend with the step)
    workers: int = -1
    augment: str = "auto"  # train augmentation family: auto | cifar | imagenet | none (crop and flip)
    autoaugment: str = ""  # AutoAugment policy after crop/flip: "" | cifar10 (SPEC §6.1)
    randaugment: str = ""  # timm RandAugment spec, e.g. rand-n2-m10-mstd0.5 ("" = off; SPEC §6.2)
    color_jitter: float = 0.0  # ColorJitter brightness = contrast = saturation strength (0.4 in SPEC §6.2/6.3)
    cutout: int = 0  # Cutout square side in px after the other ops (16 in SPEC §6.1; 0 = off)


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """The classifier network."""

    backbone: str = "resnet32"  # model registry name (resnet32, resnet10, ..., resnet152, places_resnet152)
    head: str = "linear"  # classifier head: linear | cosine
    head_scale: float = 30.0  # cosine head scale s (logits = s·cos)
    pretrained: str = ""  # torchvision-layout .pth file to load into the backbone ("" = random init)
    width: int = 16  # first-stage width of CIFAR ResNets (channels)
    channels_last: bool = False  # use the channels_last memory format
    sync_bn: bool = False  # under torchrun: SyncBatchNorm (global batch statistics; CUDA, off/driver modes only)


@dataclass(frozen=True, slots=True)
class OptimConfig:
    """The main (classifier) optimiser and learning-rate schedule."""

    epochs: int = 30  # training epochs
    batch_size: int = 128  # training batch size (images)
    lr: float = 0.1  # peak learning rate of freshly initialised parameters
    pretrained_lr_mult: float = 1.0  # lr factor for parameters loaded from --pretrained (Places-LT: 0.1)
    momentum: float = 0.9  # SGD momentum
    nesterov: bool = False  # Nesterov momentum
    weight_decay: float = 2e-4  # coupled L2 weight decay on every parameter
    schedule: str = "step"  # lr schedule: step | cosine | constant
    warmup_epochs: int = 0  # linear warm-up epochs to the peak lr
    milestones: tuple[int, ...] = ()  # step schedule: epochs (0-based) where lr is multiplied by gamma
    gamma: float = 0.1  # step schedule factor
    min_lr: float = 0.0  # cosine schedule floor


@dataclass(frozen=True, slots=True)
class LossConfig:
    """The per-sample training loss (see dnet_fast.losses)."""

    name: str = "ce"  # loss registry name
    focal_gamma: float = 1.0  # focal loss γ
    cb_beta: float = 0.9999  # class-balanced (effective number) β
    ldam_max_margin: float = 0.5  # LDAM largest margin Δ
    ldam_scale: float = 30.0  # LDAM logit scale s
    drw_epoch: int = -1  # deferred re-weighting starts at this epoch (-1: never)
    eql_lambda: float = 0.005  # EQL frequency threshold on π_j
    eql_gamma: float = 0.9  # EQL probability of applying the suppression
    cdb_tau: float = 1.0  # CDB-CE exponent τ on (1 - a_c); negative = dynamic τ
    la_tau: float = 1.0  # logit-adjustment τ (1 = Balanced Softmax)


@dataclass(frozen=True, slots=True)
class DiffNetConfig:
    """Difficulty-Net: the accuracy → difficulty MLP and its Adam optimiser."""

    hidden: int = 128  # hidden width H of both hidden layers
    bias: bool = False  # Linear layers with biases (ImageNet/Places: yes, CIFAR: no)
    lr: float = 1e-5  # Adam learning rate β
    weight_decay: float = 1e-4  # Adam coupled L2 weight decay
    normalize: str = "sum_to_C"  # class weights: sum_to_C (w = C·d/Σd) | none (w = d)
    temperature: float = 1.0  # beyond the paper, opt-in: sum_to_C with w = C·d^(1/T)/Σd^(1/T) (1 = the paper)
    init_acc: str = "zeros"  # epoch-0 accuracy vector: zeros | eval


@dataclass(frozen=True, slots=True)
class MetaConfig:
    """The meta-learning update (``META_MODES``: exact | driver | off | mwn and the Table 4 ablations)."""

    mode: str = "exact"  # meta mode registry name: off | driver | exact | mwn | frozen | exact_absolute | ...
    lambda_dr: float = 0.3  # driver-loss weight λ
    meta_batch: int = 100  # balanced meta batch size m
    sampler: str = "balanced"  # meta batches: balanced | shuffle
    acc_every: int = 0  # re-measure A_C every N iterations (0: once per epoch)
    grad: str = "jvp"  # exact meta-gradient algorithm: jvp | double_backward
    mwn_hidden: int = 100  # MWN baseline: hidden width of V(ℓ)
    mwn_lr: float = 1e-5  # MWN baseline: SGD learning rate of V (the class-imbalance reference: 1e-5)
    mwn_momentum: float = 0.9  # MWN baseline: SGD momentum of V (reference: 0.9)
    mwn_nesterov: bool = True  # MWN baseline: Nesterov momentum for V (reference: yes)
    mwn_weight_decay: float = 5e-4  # MWN baseline: coupled L2 weight decay of V (reference: 5e-4)


@dataclass(frozen=True, slots=True)
class RunConfig:
    """Where and how the run executes."""

    seed: int = 0  # the seed of every random draw of the run
    name: str = ""  # run name ("": the preset's name, or "train"); names the default run directory
    out_dir: str = ""  # run directory; "": a new runs/<name>/<UTC time>-<mode>-s<seed> for every run
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "fp32"  # fp32 | bf16 (autocast, CUDA only)
    eval_batch: int = 256  # evaluation batch size
    log_every: int = 20  # iterations between metric log lines
    tensorboard: bool = True  # also write TensorBoard event files
    progress: bool = True  # show a progress bar
    select: str = "last"  # reported model: last | val (best val accuracy; never test)
    threads: int = 0  # torch CPU threads (0: leave torch's default)
    compile: bool = False  # torch.compile the backbone
    graph: str = "auto"  # CUDA-graph step: auto | on | off
    dist_timeout: int = 600  # under torchrun: seconds a collective waits for the other ranks before failing
    max_iters: int = 0  # stop after this many iterations in total, then evaluate and finish (0: no cap; smoke runs)


@dataclass(frozen=True, slots=True)
class Stage2Config:
    """Decoupled stage 2 (SPEC §7): a new classifier on the frozen backbone of a finished stage-1 run."""

    method: str = "none"  # stage-2 method registry name: crt | lws | tau_norm | las ("none": a stage-1 run)
    source: str = ""  # the finished stage-1 run directory whose backbone is frozen (set by --from)
    epochs: int = 10  # classifier-training epochs (tau_norm trains nothing)
    batch_size: int = 128  # images per classifier step
    lr: float = 0.05  # peak learning rate (LAS: of the per-class scale; the classifier gets lr · las_classifier_lr_mult)
    schedule: str = "cosine"  # per-epoch lr schedule registry name (official: cosine to 0)
    momentum: float = 0.9  # SGD momentum
    weight_decay: float = 2e-4  # coupled L2 weight decay on every trained parameter
    per_visit: int = 4  # class-balanced sampler: images taken per class visit (k)
    epoch_length: str = "dataset_plus_one"  # classes_x_max: C·n_max samples (CIFAR) | dataset_plus_one: ⌈N/B⌉+1 batches
    augment: bool = True  # stage-1 train transform; false: eval-transformed images, backbone features cached once
    las_eps_head: float = 0.3  # LAS smoothing ε_1 of the most frequent class
    las_eps_tail: float = 0.0  # LAS smoothing ε_K of the least frequent class
    las_eps_by_ratio: bool = False  # LAS: (ε_head, ε_tail) from the imbalance ratio n_max/n_min (official CIFAR rule)
    las_classifier_lr_mult: float = 0.05  # LAS: classifier lr = lr · this (MiSLAS lr_factor); the scale trains at lr
    las_bn: str = "frozen"  # LAS BatchNorm: frozen | shift (backbone BN in train mode) | shift_extra_block (Places)
    tau_min: float = 0.0  # tau_norm: smallest τ of the val sweep
    tau_max: float = 2.0  # tau_norm: largest τ of the val sweep
    tau_points: int = 41  # tau_norm: evenly spaced τ values swept on val (the best one is applied to test)


@dataclass(frozen=True, slots=True)
class TrainConfig:
    """The whole resolved configuration of a training run."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    diffnet: DiffNetConfig = field(default_factory=DiffNetConfig)
    meta: MetaConfig = field(default_factory=MetaConfig)
    run: RunConfig = field(default_factory=RunConfig)
    stage2: Stage2Config = field(default_factory=Stage2Config)

    def validate(self) -> TrainConfig:
        """Checks every value and cross-field invariant of the schema; returns self.

        Plugin names are checked by ``dnet_fast.plugins.check_names`` (it needs the registries).

        Raises:
            ValueError: a value is out of range or not one of its enumeration (the message says which and why).
        """
        for check in _CHECKS:
            check(self)
        return self


# ----------------------------------------------------------------------------------------------------------
# Validation: each check raises ValueError naming the key.


def _require(ok: bool, key: str, why: str) -> None:
    if not ok:
        msg = f"invalid config value {key}: {why}"
        raise ValueError(msg)


def _choice(value: str, key: str, valid: typing.Iterable[str]) -> None:
    valid = list(valid)
    _require(value in valid, key, f"unknown value '{value}'; valid: {', '.join(valid)}")


def _check_data(c: TrainConfig) -> None:
    d = c.data
    _require(d.imbalance >= 1, "data.imbalance", f"must be >= 1, got {d.imbalance}")
    _require(d.num_classes >= 2, "data.num_classes", f"must be >= 2, got {d.num_classes}")
    _require(d.max_count >= 1, "data.max_count", f"must be >= 1, got {d.max_count}")
    _require(d.image_size >= 8, "data.image_size", f"must be >= 8, got {d.image_size}")
    _require(d.crop_size >= 8, "data.crop_size", f"must be >= 8, got {d.crop_size}")
    _require(d.val_per_class >= 1, "data.val_per_class", f"must be >= 1, got {d.val_per_class}")
    _require(d.test_per_class >= 1, "data.test_per_class", f"must be >= 1, got {d.test_per_class}")
    _require(d.meta_per_class >= 1, "data.meta_per_class", f"must be >= 1, got {d.meta_per_class}")
    _require(d.workers >= -1, "data.workers", f"must be >= 0 or -1 (auto), got {d.workers}")
    _choice(d.cifar_variant, "data.cifar_variant", CIFAR_VARIANTS)
    _choice(d.augment, "data.augment", ["auto", *AUGMENT_FAMILIES])
    _require(d.color_jitter >= 0, "data.color_jitter", f"must be >= 0, got {d.color_jitter}")
    _require(d.cutout >= 0, "data.cutout", f"must be >= 0, got {d.cutout}")


def _check_optim(c: TrainConfig) -> None:
    o = c.optim
    _require(o.epochs >= 1, "optim.epochs", f"must be >= 1, got {o.epochs}")
    _require(o.batch_size >= 1, "optim.batch_size", f"must be >= 1, got {o.batch_size}")
    _require(o.lr > 0, "optim.lr", f"must be > 0, got {o.lr}")
    _require(o.pretrained_lr_mult >= 0, "optim.pretrained_lr_mult", "must be >= 0")
    _require(0 <= o.momentum < 1, "optim.momentum", f"must be in [0, 1), got {o.momentum}")
    _require(not o.nesterov or o.momentum > 0, "optim.nesterov", "needs momentum > 0")
    _require(o.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {o.weight_decay}")
    _require(0 <= o.warmup_epochs < o.epochs, "optim.warmup_epochs", "must be in [0, epochs)")
    _require(all(m >= 0 for m in o.milestones), "optim.milestones", "must be >= 0")
    _require(list(o.milestones) == sorted(o.milestones), "optim.milestones", "must be increasing")
    _require(0 < o.gamma <= 1, "optim.gamma", f"must be in (0, 1], got {o.gamma}")
    _require(o.min_lr >= 0, "optim.min_lr", "must be >= 0")


def _check_loss(c: TrainConfig) -> None:
    s = c.loss
    _require(s.focal_gamma >= 0, "loss.focal_gamma", "must be >= 0")
    _require(0 <= s.cb_beta < 1, "loss.cb_beta", f"must be in [0, 1), got {s.cb_beta}")
    _require(s.ldam_max_margin > 0, "loss.ldam_max_margin", "must be > 0")
    _require(s.ldam_scale > 0, "loss.ldam_scale", "must be > 0")
    _require(s.drw_epoch >= -1, "loss.drw_epoch", "must be >= -1")
    _require(0 <= s.eql_gamma <= 1, "loss.eql_gamma", "must be in [0, 1]")
    _require(s.eql_lambda >= 0, "loss.eql_lambda", "must be >= 0")


def _check_diffnet(c: TrainConfig) -> None:
    n = c.diffnet
    _require(n.hidden >= 1, "diffnet.hidden", f"must be >= 1, got {n.hidden}")
    _require(n.lr > 0, "diffnet.lr", f"must be > 0, got {n.lr}")
    _require(n.weight_decay >= 0, "diffnet.weight_decay", "must be >= 0")
    _choice(n.normalize, "diffnet.normalize", NORMALIZATIONS)
    _require(n.temperature > 0, "diffnet.temperature", f"must be > 0, got {n.temperature}")
    _require(n.temperature == 1.0 or n.normalize == "sum_to_C", "diffnet.temperature",
             f"applies to diffnet.normalize=sum_to_C only, got normalize={n.normalize!r}")
    _choice(n.init_acc, "diffnet.init_acc", INIT_ACC)


def _check_meta(c: TrainConfig) -> None:
    m = c.meta
    _require(m.lambda_dr >= 0, "meta.lambda_dr", f"must be >= 0, got {m.lambda_dr}")
    _require(m.meta_batch >= 1, "meta.meta_batch", f"must be >= 1, got {m.meta_batch}")
    _choice(m.sampler, "meta.sampler", META_SAMPLERS)
    _require(m.acc_every >= 0, "meta.acc_every", "must be >= 0")
    _require(m.mwn_hidden >= 1, "meta.mwn_hidden", "must be >= 1")
    _require(m.mwn_lr > 0, "meta.mwn_lr", "must be > 0")
    _require(0 <= m.mwn_momentum < 1, "meta.mwn_momentum", f"must be in [0, 1), got {m.mwn_momentum}")
    _require(not m.mwn_nesterov or m.mwn_momentum > 0, "meta.mwn_nesterov", "needs meta.mwn_momentum > 0")
    _require(m.mwn_weight_decay >= 0, "meta.mwn_weight_decay", "must be >= 0")


def _check_run(c: TrainConfig) -> None:
    r = c.run
    _choice(r.device, "run.device", DEVICES)
    _choice(r.precision, "run.precision", PRECISIONS)
    _require(r.eval_batch >= 1, "run.eval_batch", "must be >= 1")
    _require(r.log_every >= 1, "run.log_every", "must be >= 1")
    _choice(r.select, "run.select", SELECTIONS)
    _require(r.threads >= 0, "run.threads", "must be >= 0")
    _require(r.max_iters >= 0, "run.max_iters", f"must be >= 0 (0: no cap), got {r.max_iters}")
    _choice(r.graph, "run.graph", GRAPH_CHOICES)
    _require(r.dist_timeout >= 1, "run.dist_timeout", f"must be >= 1 second, got {r.dist_timeout}")


def _check_stage2(c: TrainConfig) -> None:
    s = c.stage2
    staged = s.method != "none"
    _require(staged or not s.source, "stage2.source", "is set but stage2.method is none")
    _require(not staged or bool(s.source), "stage2.source", "a stage-2 run needs its stage-1 run (--from RUN_DIR)")
    _require(s.epochs >= 1, "stage2.epochs", f"must be >= 1, got {s.epochs}")
    _require(s.batch_size >= 1, "stage2.batch_size", f"must be >= 1, got {s.batch_size}")
    _require(s.lr > 0, "stage2.lr", f"must be > 0, got {s.lr}")
    _require(0 <= s.momentum < 1, "stage2.momentum", f"must be in [0, 1), got {s.momentum}")
    _require(s.weight_decay >= 0, "stage2.weight_decay", f"must be >= 0, got {s.weight_decay}")
    _require(s.per_visit >= 1, "stage2.per_visit", f"must be >= 1, got {s.per_visit}")
    _choice(s.epoch_length, "stage2.epoch_length", STAGE2_EPOCH_LENGTHS)
    for key in ("las_eps_head", "las_eps_tail"):
        value = getattr(s, key)
        _require(0 <= value <= 1, f"stage2.{key}", f"must be in [0, 1], got {value}")
    _require(s.las_classifier_lr_mult >= 0, "stage2.las_classifier_lr_mult", "must be >= 0")
    _choice(s.las_bn, "stage2.las_bn", STAGE2_BN)
    _require(s.tau_min <= s.tau_max, "stage2.tau_min", f"must be <= tau_max, got {s.tau_min} > {s.tau_max}")
    _require(s.tau_points >= 1, "stage2.tau_points", f"must be >= 1, got {s.tau_points}")


_CHECKS = (_check_data, _check_optim, _check_loss, _check_diffnet, _check_meta, _check_run, _check_stage2)


# ----------------------------------------------------------------------------------------------------------
# Conversion between the dataclass tree, plain dicts, YAML files and dotted overrides.


def config_to_dict(cfg: TrainConfig) -> dict[str, dict[str, Any]]:
    """The config as nested plain dicts (tuples become lists), suitable for YAML/JSON and checkpoints."""

    def plain(v: Any) -> Any:
        return list(v) if isinstance(v, tuple) else v

    return {
        f.name: {g.name: plain(getattr(getattr(cfg, f.name), g.name)) for g in fields(getattr(cfg, f.name))}
        for f in fields(cfg)
    }


def config_from_dict(raw: dict[str, Any], source: str = "<dict>") -> TrainConfig:
    """Builds a TrainConfig from nested dicts; unknown sections or keys raise ValueError naming ``source``."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        msg = f"{source}: the config must be a mapping of sections, got {type(raw).__name__}"
        raise ValueError(msg)
    sections = {f.name: f for f in fields(TrainConfig)}
    built = {}
    for name, values in raw.items():
        if name not in sections:
            msg = f"{source}: unknown config section '{name}'; valid: {', '.join(sections)}"
            raise ValueError(msg)
        if not isinstance(values, dict):
            msg = f"{source}: section '{name}' must be a mapping"
            raise ValueError(msg)
        built[name] = _section_from_dict(_section_type(name), values, f"{source}: {name}")
    return TrainConfig(**built)


def _section_type(name: str) -> type:
    return typing.get_type_hints(TrainConfig)[name]


def _section_from_dict(cls: type, values: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    valid = {f.name for f in fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in valid:
            msg = f"{where}: unknown key '{key}'; valid: {', '.join(sorted(valid))}"
            raise ValueError(msg)
        kwargs[key] = _coerce(value, hints[key], f"{where}.{key}")
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Converts a YAML/CLI value to the annotated type, rejecting values of the wrong kind."""
    origin = typing.get_origin(hint)
    if origin is tuple:
        items = value if isinstance(value, list | tuple) else _parse_list(value, key)
        (item_type, _) = typing.get_args(hint)
        return tuple(_coerce(v, item_type, key) for v in items)
    if origin in (typing.Union, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    try:
        if hint is bool:
            return _to_bool(value)
        if hint is int:
            if isinstance(value, float) and not value.is_integer():
                raise TypeError
            return int(value)
        if hint is float:
            number = float(value)
        if hint is str:
            if isinstance(value, bool):
                # YAML 1.1 reads a bare off/on as a boolean; every string option spells them as words.
                return "on" if value else "off"
            return "" if value is None else str(value)
    except (TypeError, ValueError):
        msg = f"invalid config value {key}: cannot read {value!r} as {hint.__name__}"
        raise ValueError(msg) from None
    if hint is float:
        return _finite(number, value, key)
    return value


def _finite(number: float, value: Any, key: str) -> float:
    """``number`` unless it is NaN or ±inf: no config value is meaningful there (an infinite lr diverges)."""
    if not math.isfinite(number):
        msg = f"invalid config value {key}: {value!r} is not a finite number"
        raise ValueError(msg)
    return number


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(value)


def _parse_list(value: Any, key: str) -> list[Any]:
    parsed = yaml.safe_load(str(value)) if isinstance(value, str) else value
    if parsed is None:
        return []
    if isinstance(parsed, int | float):
        return [parsed]
    if not isinstance(parsed, list):
        msg = f"invalid config value {key}: expected a list such as [160,180], got {value!r}"
        raise ValueError(msg)
    return parsed


def apply_overrides(cfg: TrainConfig, overrides: typing.Iterable[str]) -> TrainConfig:
    """Returns a copy of ``cfg`` with ``section.key=value`` overrides applied (values parsed as YAML scalars)."""
    for item in overrides:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            msg = f"override '{item}' must look like section.key=value (e.g. optim.lr=0.05)"
            raise ValueError(msg)
        dotted, text = item.split("=", 1)
        section, key = dotted.split(".", 1)
        value = yaml.safe_load(text) if text.strip() else ""
        current = dataclasses.asdict(getattr(cfg, section)) if hasattr(cfg, section) else None
        if current is None:
            msg = f"override '{item}': unknown config section '{section}'"
            raise ValueError(msg)
        current[key] = value
        cfg = replace(cfg, **{section: _section_from_dict(_section_type(section), current, section)})
    return cfg


def preset_names() -> list[str]:
    """Names of the shipped YAML presets (file stems in dnet_fast/configs)."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def preset_path(name_or_path: str) -> Path:
    """Resolves a preset: a shipped name (``demo``) or the path of a YAML file, which must exist.

    Raises:
        ValueError: neither a shipped preset nor an existing file (the message lists the presets).
    """
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or len(path.parts) > 1:  # a path, never a shipped preset's name
        if path.is_file():
            return path
        msg = f"preset file {name_or_path} does not exist (shipped presets: {', '.join(preset_names())})"
        raise ValueError(msg)
    candidate = PRESET_DIR / f"{name_or_path}.yaml"
    if candidate.is_file():
        return candidate
    msg = f"unknown preset '{name_or_path}'; valid: {', '.join(preset_names())} (or a path to a .yaml file)"
    raise ValueError(msg)


def read_preset(name_or_path: str, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The raw sections of a preset, with its ``base:`` preset (if any) merged underneath, key by key.

    A preset that only changes a few keys of another one (the Table 4 ablations of ``cifar100_lt_r32_ir100``)
    names it as ``base: <preset>`` and lists only what differs, so the shared recipe is written once.

    Raises:
        ValueError: unknown preset, a ``base`` that is not a preset name, or a cycle of bases.
    """
    path = preset_path(name_or_path).resolve()
    if path in _seen:
        msg = f"preset {path}: its base presets form a cycle ({' -> '.join(p.stem for p in (*_seen, path))})"
        raise ValueError(msg)
    with path.open() as f:
        raw = yaml.safe_load(f) or {}
    base = raw.pop("base", None)
    if base is None:
        return raw
    if not isinstance(base, str) or not base:
        msg = f"{path}: base must be a preset name, got {base!r}"
        raise ValueError(msg)
    merged = read_preset(base, (*_seen, path))
    for section, values in raw.items():
        below = merged.get(section) or {}
        both = isinstance(below, dict) and isinstance(values, dict)
        merged[section] = {**below, **values} if both else values  # config_from_dict rejects a non-dict
    return merged


def load_config(preset: str | None = None, overrides: typing.Iterable[str] = ()) -> TrainConfig:
    """Loads a preset (name or path; None = defaults), applies overrides and validates the schema.

    Cheap (no torch): plugin names are checked separately by ``dnet_fast.plugins.check_names``.
    """
    cfg = TrainConfig()
    if preset:
        path = preset_path(preset)
        cfg = config_from_dict(read_preset(preset), source=str(path))
        if not cfg.run.name:  # the default run directory is named after the preset
            cfg = replace(cfg, run=replace(cfg.run, name=path.stem))
    return apply_overrides(cfg, overrides).validate()


def dump_yaml(cfg: TrainConfig) -> str:
    """The resolved config as YAML text."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


_PATH_KEYS = ("root", "train_list", "val_list", "test_list")  # DataConfig keys naming files or folders


def _absolute(section: Any, keys: typing.Iterable[str]) -> Any:
    paths = {k: str(Path(v).expanduser().resolve()) for k in keys if (v := getattr(section, k))}
    return replace(section, **paths) if paths else section


def resolve_paths(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with the data paths and the pretrained checkpoint made absolute (against the current directory),
    so that the run's config.yaml and checkpoints name the same files from any working directory (``dnet-fast
    eval`` elsewhere)."""
    return replace(cfg, data=_absolute(cfg.data, _PATH_KEYS), model=_absolute(cfg.model, ("pretrained",)))
