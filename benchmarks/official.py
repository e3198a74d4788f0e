"""Official-style baseline loops: one per tree of the released Difficulty-Net code, iteration for iteration.

Written from hitachi-rd-cv/Difficulty_Net @ c6d131566dd6fd860226aeeee982acd4d6ac7da0. Line citations:
``C:n`` = ``CIFAR-LT/cifar_train_exaugment.py``, ``I:n`` = ``ImageNet_Places-LT/train_stage1.py``; other files by
path. Each loop does the code's per-iteration work and host syncs, in the code's order, on our models
(``dnet_fast.models``) instead of the code's ``MetaModule`` networks. It shares nothing with ``dnet_fast.meta``.

Host syncs kept on purpose (each marked ``# sync point``): the D2H reads (``.cpu()``, ``.item()``) and the blocking
host-to-device copies (``non_blocking=False``), which PyTorch follows with ``cudaStreamSynchronize``. Pass train
batches as the DataLoader yields them (on the host, pinned for ``imagenet_places``) to charge the code's input copies;
device-resident batches skip them.

Where our models differ from the code's: the CIFAR copy moves one tensor per state entry to the device (188 for our
ResNet-32, BatchNorm's ``num_batches_tracked`` included; the code's MetaModule ResNet32 has 157); ImageNet/Places
backbone, extra block and classifier are one module (one ``load_state_dict`` and one forward call per pass).

Not charged per iteration (per-epoch data, ``epoch_extras`` in ``benchmarks/official_epoch.py``): DataLoader worker
start-up at each (re)start, image decode and augmentation (done in worker processes), evaluation passes, checkpoints.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks.official_epoch import (
    OFFICIAL_SETS,
    EpochExtras,
    EvalPass,
    cifar_official_train_size,
    epoch_extras,
)

__all__ = [
    "OFFICIAL_COMMIT",
    "OFFICIAL_SETS",
    "TREES",
    "CifarLoop",
    "EpochExtras",
    "EvalPass",
    "ImageNetPlacesLoop",
    "Loop",
    "OfficialBalancedSoftmax",
    "ShuffledMetaLoader",
    "build",
    "cifar_official_train_size",
    "epoch_extras",
    "official_optimizers",
]

OFFICIAL_COMMIT = "c6d131566dd6fd860226aeeee982acd4d6ac7da0"
TREES = ("cifar", "imagenet_places")
_EPS = 1e-12  # C:155, I:400: ε of the driver-loss target 1 - a / (Σa + ε)


# ----------------------------------------------------------------------------------------------------------
# Pieces both trees share


class ShuffledMetaLoader:
    """The code's meta loader: ``DataLoader(meta_set, batch_size=100, shuffle=True)`` over the val set (C:466;
    ``datasets/imagenet.py``:265-268, ``datasets/places.py``:257-260, meta set = val set).

    Every ``iter`` is one pass in a new random order, in batches of ``batch_size`` with a smaller last one
    (``drop_last=False``), then ``StopIteration``. The order comes from a seeded private generator (the code's loader
    is unseeded). Batches stay on the host, as a Dataset's do; ``pin_memory`` pins each one as the ImageNet/Places
    loaders do; ``prefetch`` gathers the next batch in a background thread, as the code's worker processes do
    (so the main thread does not pay the gather).

    Args:
        images: (N, 3, H, W) eval-transformed meta images.
        labels: (N,) labels.
        batch_size: meta batch size (100 in both trees).
        seed: seed of the private generator.
        pin_memory: pin every batch (needs CUDA).
        prefetch: gather one batch ahead in a thread.
    """

    def __init__(
        self, images: Tensor, labels: Tensor, batch_size: int, *, seed: int, pin_memory: bool = False,
        prefetch: bool = False,
    ) -> None:
        self.images = images.detach().cpu().contiguous()
        self.labels = labels.detach().cpu().to(torch.int64)
        self.batch_size, self.pin_memory = batch_size, pin_memory
        self.starts = 0  # passes begun: the epoch-start iter() plus every restart
        self._gen = torch.Generator().manual_seed(seed)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="meta-loader") if prefetch else None

    def __len__(self) -> int:
        """Batches per pass."""
        return math.ceil(len(self.labels) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        """One pass: (x (≤m, 3, H, W), y (≤m,)) host batches."""
        self.starts += 1
        chunks = list(torch.randperm(len(self.labels), generator=self._gen).split(self.batch_size))
        return self._prefetched(chunks) if self._pool is not None else map(self._collate, chunks)

    def _collate(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        x, y = self.images.index_select(0, idx), self.labels.index_select(0, idx)
        return (x.pin_memory(), y.pin_memory()) if self.pin_memory else (x, y)

    def _prefetched(self, chunks: list[Tensor]) -> Iterator[tuple[Tensor, Tensor]]:
        assert self._pool is not None
        pending: Future[tuple[Tensor, Tensor]] = self._pool.submit(self._collate, chunks[0])
        for nxt in chunks[1:]:
            batch = pending.result()
            pending = self._pool.submit(self._collate, nxt)
            yield batch
        yield pending.result()

    def close(self) -> None:
        """Stops the prefetch thread."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)


class OfficialBalancedSoftmax(nn.Module):
    """The ImageNet tree's criterion under ``bal_softmax: True`` (I:83-92, I:259-260; set by every shipped ImageNet
    config). It returns (B, 1, 1), so the code's ``(B,) * loss`` broadcasts to (B, 1, B) (SPEC §13 #2); kept as is,
    the baseline does the code's work.

    Args:
        class_counts: (C,) training images per class (``cls_num_list``, counts, not ratios).
    """

    def __init__(self, class_counts: Tensor | list[int]) -> None:
        super().__init__()
        self.register_buffer("class_freq", torch.as_tensor(class_counts, dtype=torch.float32).unsqueeze(0))

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        """(B, C) logits, (B,) labels → (B, 1, 1) losses, computed as the code does (no max-subtraction)."""
        exp_logits = torch.exp(logits) * self.class_freq
        picked = torch.log(torch.gather(exp_logits, 1, target.unsqueeze(1)))  # (B, 1)
        loss = -1 * (picked - torch.log(exp_logits.sum(1, keepdim=True) + 1e-12))
        return loss.unsqueeze(1)


def _host_one_hot_weights(w: Tensor, target_var: Tensor, device: torch.device) -> Tensor:
    """Per-sample weights (B,) from class weights w (C,) as both trees build them (C:159-166, C:228-234,
    I:334-343): a host identity matrix, host one-hot rows copied to the device, a detached copy of w, repeat,
    multiply, sum."""
    eye = torch.eye(w.numel())  # (C, C) on the host
    one_hot = eye[target_var].float().to(device)  # (B, C)  sync point: blocking host-to-device copy
    weights = w.clone().detach().float()  # torch.tensor(w): a detached copy, so no meta gradient reaches θ
    weights = weights.unsqueeze(0).repeat(one_hot.shape[0], 1) * one_hot  # (B, C)
    return weights.sum(1)  # (B,)


def _set_tensor(module: nn.Module, name: str, value: Tensor) -> None:
    """Puts a plain tensor where parameter ``name`` was, walking the dotted name (``models/meta_resnet32.py``:72-82
    ``set_param``)."""
    *path, leaf = name.split(".")
    owner = module
    for part in path:
        owner = getattr(owner, part)
    owner._parameters.pop(leaf, None)  # a Parameter slot refuses a non-leaf tensor (the code keeps weights as buffers)
    setattr(owner, leaf, value)


@contextlib.contextmanager
def _cudnn_benchmark(enabled: bool, device: torch.device) -> Iterator[None]:
    """Runs the block with ``cudnn.benchmark = enabled`` on CUDA and restores the caller's value afterwards."""
    if device.type != "cuda":
        yield
        return
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


def _host_built(factory: Callable[[], nn.Module], seed: int) -> nn.Module:
    """``factory()`` on the host with a seeded, forked RNG (the code's initialisations draw the global RNG)."""
    with torch.random.fork_rng(devices=[]), torch.device("cpu"):
        torch.default_generator.manual_seed(seed)  # the CPU generator only (torch.manual_seed would reseed CUDA's)
        return factory()


@dataclass(frozen=True)
class _Parts:
    model: nn.Module  # the trained classifier f(·; φ)
    model_factory: Callable[[], nn.Module]  # builds a fresh, randomly initialised f (any device; moved here)
    diffnet: nn.Module  # Difficulty-Net D(·; θ)
    main_optimizer: torch.optim.Optimizer  # over model's parameters
    diff_optimizer: torch.optim.Optimizer  # Adam over diffnet's parameters


@dataclass(frozen=True)
class _Options:
    lambda_dr: float  # λ (C:324 default 0.3; every ImageNet/Places config 0.3)
    seed: int  # seeds the meta order and the fresh models' initialisation
    criterion: Callable[[Tensor, Tensor], Tensor]  # per-sample training loss
    print_freq: int  # ImageNet/Places progress line every print_freq iterations
    data_parallel: bool  # ImageNet/Places: wrap in nn.DataParallel on CUDA (I:209-212)


class Loop:
    """An official-style loop. ``step(x, y)`` runs one training iteration of the official code on the train batch
    x (B, 3, H, W), y (B,) (meta batches are drawn inside); ``start_epoch`` does what the code does between epochs.

    Attributes:
        tree: ``cifar`` or ``imagenet_places``.
        cudnn_benchmark: the ``torch.backends.cudnn.benchmark`` value the code trains with (applied during
            ``step`` on CUDA).
        meta_loader: the meta loader; ``meta_loader.starts`` counts its (re)starts.
        epoch: current epoch; iteration: iterations done in it.
    """

    tree: ClassVar[str]
    cudnn_benchmark: ClassVar[bool]

    def __init__(self, parts: _Parts, meta_loader: ShuffledMetaLoader, opts: _Options) -> None:
        self.parts, self.meta_loader, self.opts = parts, meta_loader, opts
        self.device = next(parts.model.parameters()).device
        self.num_classes = 0
        self.epoch = self.iteration = 0
        self._meta_iter: Iterator[tuple[Tensor, Tensor]] = iter(())

    def step(self, x: Tensor, y: Tensor) -> None:
        """One training iteration on x (B, 3, H, W), y (B,)."""
        with _cudnn_benchmark(self.cudnn_benchmark, self.device):
            self._step(x, y)
        self.iteration += 1

    def start_epoch(self, epoch: int, acc: Tensor) -> None:
        """Begins epoch ``epoch`` with per-class accuracy ``acc`` (C,): the meta loader's epoch-start ``iter``."""
        self.epoch, self.iteration, self.num_classes = epoch, 0, acc.numel()
        self._meta_iter = iter(self.meta_loader)

    def close(self) -> None:
        """Releases the meta loader's thread."""
        self.meta_loader.close()

    def _next_meta(self) -> tuple[Tensor, Tensor]:
        # C:193-198, I:421-425: the next meta batch; a new pass when the loader is exhausted
        try:
            return next(self._meta_iter)
        except StopIteration:
            self._meta_iter = iter(self.meta_loader)
            return next(self._meta_iter)

    def _step(self, x: Tensor, y: Tensor) -> None:
        raise NotImplementedError


# ----------------------------------------------------------------------------------------------------------
# CIFAR-LT/cifar_train_exaugment.py


class CifarLoop(Loop):
    """The CIFAR tree's iteration (C:144-245): a fresh model per iteration, a second-order virtual step on it, the
    meta loss through it (double backward), Adam on θ, then the real step.

    A: epoch 0 uses the device zeros of C:131; later epochs hold the host float64 array of C:254-271, converted
    by ``torch.cuda.FloatTensor`` (a blocking copy) at C:154, C:155 and C:219.
    """

    tree = "cifar"
    cudnn_benchmark = True  # C:40-42: build_model sets it whenever CUDA is available

    def __init__(self, parts: _Parts, meta_loader: ShuffledMetaLoader, opts: _Options) -> None:
        super().__init__(parts, meta_loader, opts)
        self._acc_device: Tensor | None = None
        self._acc_host: np.ndarray | None = None
        self.epoch_loss, self.total_train_samples = 0.0, 0
        self._builds = 0

    def start_epoch(self, epoch: int, acc: Tensor) -> None:
        """Epoch ``epoch`` with A = ``acc`` (C,); resets the epoch loss (C:136-137) and the meta iterator (C:142)."""
        super().start_epoch(epoch, acc)
        self.epoch_loss, self.total_train_samples = 0.0, 0
        if epoch == 0:
            self._acc_device, self._acc_host = acc.detach().to(self.device, torch.float32), None
        else:
            self._acc_device, self._acc_host = None, acc.detach().cpu().double().numpy()

    def _acc_row(self) -> Tensor:
        # torch.cuda.FloatTensor(class_wise_accuracy): an alias of the epoch-0 device tensor, a copy of the array later
        if self._acc_host is None:
            return self._acc_device
        return torch.from_numpy(self._acc_host).to(device=self.device, dtype=torch.float32)  # sync point

    def _driver_target(self) -> Tensor:
        # C:155: t = 1 - a / (Σa + ε), computed on the device (epoch 0) or in NumPy and then copied (later epochs)
        if self._acc_host is None:
            a = self._acc_device
            return 1 - a / (a.sum() + _EPS)
        a = self._acc_host
        return torch.from_numpy(1 - a / (a.sum() + _EPS)).to(device=self.device, dtype=torch.float32)  # sync point

    def _step(self, x: Tensor, y: Tensor) -> None:
        p, dev, c = self.parts, self.device, self.num_classes
        p.model.train()  # C:145
        p.diffnet.train()  # C:146
        x, y = x.to(dev), y.to(dev)  # C:147-148 .cuda()  sync point: blocking copies
        target_var = y.cpu()  # C:150  sync point
        model_cpy = self._fresh_copy()  # C:151-153
        d = p.diffnet(self._acc_row().unsqueeze(0))  # C:154  (C,)
        diffloss = F.mse_loss(d, self._driver_target())  # C:155 (MSE over (1, C) = over (C,))
        w = d / d.sum() * c  # C:156-157
        weights = _host_one_hot_weights(w, target_var, dev)  # C:159-166  (B,)
        F.one_hot(y, c).float()  # C:169: computed and never used
        loss = torch.mean(self.opts.criterion(model_cpy(x), y) * weights)  # C:171-181: virtual forward on b
        self._virtual_step(model_cpy, loss)  # C:182-188
        xm, ym = self._next_meta()  # C:193-198
        self._meta_step(model_cpy, xm, ym, diffloss)  # C:201-210
        weights = self._updated_weights(y)  # C:217-234
        self._real_step(x, y, weights)  # C:235-245

    def _fresh_copy(self) -> nn.Module:
        # C:151 build_model: a new network built on the host (MetaModule copies each tensor to the GPU as it is
        # built, models/meta_resnet32.py:9-12) and moved (C:41 model.cuda()): one blocking copy per tensor
        self._builds += 1
        model_cpy = _host_built(self.parts.model_factory, self.opts.seed + self._builds).to(self.device)
        model_cpy.load_state_dict(self.parts.model.state_dict())  # C:152
        return model_cpy.train()  # C:153

    def _virtual_step(self, model_cpy: nn.Module, loss: Tensor) -> None:
        named = list(model_cpy.named_parameters())
        model_cpy.zero_grad()  # C:182
        grads = torch.autograd.grad(loss, [t for _, t in named], create_graph=True)  # C:183
        lr = self.parts.main_optimizer.param_groups[0]["lr"]  # C:185: meta_lr is the main schedule's lr (C:48)
        for (name, t), g in zip(named, grads, strict=True):  # C:187, models/meta_resnet32.py:47-58 update_params
            _set_tensor(model_cpy, name, t - lr * g)

    def _meta_step(self, model_cpy: nn.Module, xm: Tensor, ym: Tensor, diffloss: Tensor) -> None:
        p, dev = self.parts, self.device
        validation_loss = nn.CrossEntropyLoss()  # C:201: a new module every iteration
        xm, ym = xm.to(dev), ym.to(dev)  # C:203-204  sync point: blocking copies
        p.diff_optimizer.zero_grad()  # C:206
        meta_loss = validation_loss(model_cpy(xm), ym) + self.opts.lambda_dr * diffloss  # C:207-208: meta forward on m
        meta_loss.backward()  # C:209: through φ̂ = φ - α·g into the double backward; θ gets only λ·L_dr
        p.diff_optimizer.step()  # C:210

    def _updated_weights(self, y: Tensor) -> Tensor:
        p = self.parts
        p.diffnet.eval()  # C:217
        with torch.no_grad():
            d = p.diffnet(self._acc_row().unsqueeze(0))  # C:218-219
        w = d / d.sum() * self.num_classes  # C:223
        target_var = y.cpu()  # C:225  sync point
        return _host_one_hot_weights(w, target_var, self.device)  # C:228-234

    def _real_step(self, x: Tensor, y: Tensor, weights: Tensor) -> None:
        p = self.parts
        p.main_optimizer.zero_grad()  # C:235
        per_sample = self.opts.criterion(p.model(x), y)  # C:237-239  (B,)
        self.epoch_loss += torch.sum(per_sample).item()  # C:240  sync point
        self.total_train_samples += len(y)  # C:241
        torch.mean(per_sample * weights).backward()  # C:242-244
        p.main_optimizer.step()  # C:245


# ----------------------------------------------------------------------------------------------------------
# ImageNet_Places-LT/train_stage1.py


class _AverageMeter:
    """``utils/meter.py``:1-22: running value and mean; tensors stay tensors (device arithmetic, no sync)."""

    def __init__(self) -> None:
        self.val: float | Tensor = 0
        self.sum: float | Tensor = 0
        self.count = 0
        self.avg: float | Tensor = 0

    def update(self, val: float | Tensor, n: int = 1) -> None:
        self.val = val
        self.sum += val * n
        self.count += n
        self.avg = self.sum / self.count

    def text(self) -> str:
        # utils/meter.py:20-22 formats val and avg; a 0-dim device tensor's format is an .item()
        val, avg = (v.item() if isinstance(v, Tensor) else v for v in (self.val, self.avg))  # sync point (tensors)
        return f"{val:6.3f} ({avg:6.3f})"


def _accuracy(output: Tensor, target: Tensor, topk: tuple[int, ...]) -> list[Tensor]:
    """``utils/metric.py``:4-18: top-k accuracies in % as (1,) device tensors (no sync). ``reshape`` where the code
    has ``view``, which current PyTorch refuses on the transposed comparison."""
    with torch.no_grad():
        maxk = max(topk)
        _, pred = output.topk(maxk, 1, True, True)
        pred = pred.t()  # (k, B)
        correct = pred.eq(target.view(1, -1).expand_as(pred))
        return [correct[:k].reshape(-1).float().sum(0, keepdim=True).mul_(100.0 / target.size(0)) for k in topk]


def _mirror_optimizer(main: torch.optim.Optimizer, model: nn.Module, twin: nn.Module) -> torch.optim.Optimizer:
    """An optimiser of main's type and per-group settings over twin's matching parameters (I:283-286, I:272-276)."""
    position = {id(t): k for k, t in enumerate(model.parameters())}
    twin_params = list(twin.parameters())
    groups = [
        {**{k: v for k, v in g.items() if k != "params"}, "params": [twin_params[position[id(t)]] for t in g["params"]]}
        for g in main.param_groups
    ]
    return type(main)(groups, **main.defaults)


class ImageNetPlacesLoop(Loop):
    """The ImageNet/Places tree's iteration (I:381-472): copy the weights into the persistent pseudo model, a
    first-order pseudo step with its own SGD (momentum state kept across iterations), a meta forward/backward on
    the pseudo model, Adam on θ, then the real step and the training meters.

    The code's separate backbone, extra block (Places) and classifier are one module here, so one
    ``load_state_dict`` (I:392-397 makes two, three for Places) and one DataParallel forward per pass (two or three
    in the code) copy and run the same tensors.
    """

    tree = "imagenet_places"
    cudnn_benchmark = False  # I:101-104 touch it only under config.deterministic (False in every config): default

    def __init__(self, parts: _Parts, meta_loader: ShuffledMetaLoader, opts: _Options) -> None:
        super().__init__(parts, meta_loader, opts)
        pseudo = _host_built(parts.model_factory, opts.seed).to(self.device)  # I:160-162: its own random init
        self.pseudo_optimizer = _mirror_optimizer(parts.main_optimizer, parts.model, pseudo)  # I:283-286
        self.model, self.pseudo = self._parallel(parts.model), self._parallel(pseudo)  # I:209-212
        self.acc = torch.zeros(0)
        self.last_display = ""

    def _parallel(self, module: nn.Module) -> nn.Module:
        # I:207-212: config.gpu is null in every config, so the code runs nn.DataParallel (one device here)
        if self.device.type == "cuda" and self.opts.data_parallel:
            return nn.DataParallel(module, device_ids=[self.device])
        return module

    def start_epoch(self, epoch: int, acc: Tensor) -> None:
        """Epoch ``epoch`` with A = ``acc`` (C,) from the epoch-start validate (I:302): the pseudo optimiser takes the
        main one's learning rates (I:295-296), fresh meters (I:349-354), train mode (I:372-375), meta iter (I:359)."""
        super().start_epoch(epoch, acc)
        for twin, main in zip(self.pseudo_optimizer.param_groups, self.parts.main_optimizer.param_groups, strict=True):
            twin["lr"] = main["lr"]
        self.acc = acc.detach().to(self.device, torch.float32)  # validate's acc_classes: already a device tensor
        self.batch_time, self.losses, self.top1, self.top5 = (_AverageMeter() for _ in range(4))
        self._end = time.time()
        self.model.train()
        self.pseudo.train()

    def _step(self, x: Tensor, y: Tensor) -> None:
        p, dev, a = self.parts, self.device, self.acc
        x = x.to(dev, non_blocking=True)  # I:389
        y = y.to(dev, non_blocking=True)  # I:390
        self.pseudo.load_state_dict(self.model.state_dict())  # I:392-397
        p.diffnet.train()  # I:398
        d = p.diffnet(a.unsqueeze(0))  # I:399  (C,); torch.cuda.FloatTensor(accs) aliases the device tensor
        driver_loss = F.mse_loss(d, 1 - a / (a.sum() + _EPS))  # I:400
        w = d / d.sum() * len(d)  # I:401-402
        batch_weights = _host_one_hot_weights(w, y.cpu(), dev)  # I:403 -> I:334-343  sync point: labels.cpu()
        self._pseudo_step(x, y, batch_weights)  # I:406-419
        xm, ym = self._next_meta()  # I:421-425
        self._meta_step(xm, ym, driver_loss)  # I:426-438
        batch_weights = self._updated_weights(y)  # I:439-443
        output, loss = self._real_step(x, y, batch_weights)  # I:444-460
        self._log(output, y, loss)  # I:462-472

    def _pseudo_step(self, x: Tensor, y: Tensor, batch_weights: Tensor) -> None:
        output = self.pseudo(x)  # I:410-412 (Places I:406-409): pseudo forward on b
        loss = torch.mean(batch_weights * self.opts.criterion(output, y))  # I:416
        self.pseudo_optimizer.zero_grad()  # I:417
        loss.backward()  # I:418
        self.pseudo_optimizer.step()  # I:419: a real, first-order SGD step on the pseudo model

    def _meta_step(self, xm: Tensor, ym: Tensor, driver_loss: Tensor) -> None:
        p, dev = self.parts, self.device
        xm, ym = xm.to(dev), ym.to(dev)  # I:426  sync point: blocking copies (from pinned batches)
        p.diff_optimizer.zero_grad()  # I:427
        output = self.pseudo(xm)  # I:434-435 (Places I:430-432): meta forward on m
        meta_loss = torch.mean(self.opts.criterion(output, ym)) + self.opts.lambda_dr * driver_loss  # I:436
        meta_loss.backward()  # I:437: reaches the pseudo model and, through L_dr only, θ
        p.diff_optimizer.step()  # I:438

    def _updated_weights(self, y: Tensor) -> Tensor:
        p = self.parts
        p.diffnet.eval()  # I:439
        with torch.no_grad():
            d = p.diffnet(self.acc.unsqueeze(0))  # I:440-441
        w = d / d.sum() * len(d)  # I:442
        return _host_one_hot_weights(w, y.cpu(), self.device)  # I:443 -> I:334-343  sync point: labels.cpu()

    def _real_step(self, x: Tensor, y: Tensor, batch_weights: Tensor) -> tuple[Tensor, Tensor]:
        p = self.parts
        output = self.model(x)  # I:451-452 (Places I:446-449)
        loss = torch.mean(batch_weights * self.opts.criterion(output, y))  # I:457
        p.main_optimizer.zero_grad()  # I:458
        loss.backward()  # I:459
        p.main_optimizer.step()  # I:460
        return output, loss

    def _log(self, output: Tensor, y: Tensor, loss: Tensor) -> None:
        n = y.size(0)
        acc1, acc5 = _accuracy(output, y, topk=(1, min(5, self.num_classes)))  # I:462 (top-5 needs C ≥ 5)
        self.losses.update(loss.item(), n)  # I:463  sync point
        self.top1.update(acc1[0], n)  # I:464
        self.top5.update(acc5[0], n)  # I:465
        self.batch_time.update(time.time() - self._end)  # I:468
        self._end = time.time()  # I:469
        if self.iteration % self.opts.print_freq == 0:  # I:471-472: the progress line (logged; kept, not printed)
            meters = (self.batch_time, self.losses, self.top1, self.top5)
            self.last_display = f"Epoch: [{self.epoch}][{self.iteration}]\t" + "\t".join(m.text() for m in meters)


# ----------------------------------------------------------------------------------------------------------
# Construction


def build(
    tree: str,
    model: nn.Module,
    model_factory: Callable[[], nn.Module],
    diffnet: nn.Module,
    main_optimizer: torch.optim.Optimizer,
    diff_optimizer: torch.optim.Optimizer,
    acc: Tensor,
    meta_images: Tensor,
    meta_labels: Tensor,
    *,
    meta_batch: int = 100,
    lambda_dr: float = 0.3,
    seed: int = 0,
    epoch: int = 1,
    criterion: Callable[[Tensor, Tensor], Tensor] | None = None,
    print_freq: int = 200,
    data_parallel: bool = True,
    prefetch: bool | None = None,
) -> Loop:
    """The official-style loop of ``tree``, ready for ``step`` in epoch ``epoch``.

    Args:
        tree: ``cifar`` or ``imagenet_places``.
        model: the trained classifier on its device (CPU or CUDA), logits (B, C).
        model_factory: builds a fresh, randomly initialised classifier of the same architecture; called on the host
            (CIFAR: every iteration; ImageNet/Places: once, for the pseudo model).
        diffnet: ``dnet_fast.models.DifficultyNet`` on the model's device.
        main_optimizer: optimiser over ``model``'s parameters (see ``official_optimizers``).
        diff_optimizer: Adam over ``diffnet``'s parameters.
        acc: (C,) per-class accuracy A for the epoch.
        meta_images: (N, 3, H, W) eval-transformed meta/val images (kept on the host, as the code's Dataset).
        meta_labels: (N,) labels.
        meta_batch: meta batch size (100 in both trees: C:466, ``datasets/imagenet.py``:267).
        lambda_dr: λ.
        seed: seeds the meta order and the fresh models' initialisation.
        epoch: CIFAR: 0 holds A as the code's epoch-0 device zeros, later epochs as its host array.
        criterion: per-sample training loss (B, C), (B,) → (B,); default CE (C:103, I:262). Pass
            ``OfficialBalancedSoftmax`` for the ImageNet configs (``bal_softmax: True``).
        print_freq: ImageNet/Places progress-line period (configs: 300 ResNet-10, 200 ResNet-50, 100 Places).
        data_parallel: ImageNet/Places on CUDA: wrap model and pseudo model in ``nn.DataParallel`` as the code does.
        prefetch: gather meta batches in a thread like the code's workers; default: on CUDA only.

    Raises:
        ValueError: unknown tree.
    """
    if tree not in TREES:
        raise ValueError(f"unknown tree {tree!r}; expected one of {TREES}")
    device = next(model.parameters()).device
    cuda = device.type == "cuda"
    if criterion is None:
        criterion = nn.CrossEntropyLoss(reduction="none")
    if isinstance(criterion, nn.Module):
        criterion = criterion.to(device)
    pin = cuda and tree == "imagenet_places"  # pin_memory=True in datasets/imagenet.py:268, places.py:260
    meta = ShuffledMetaLoader(meta_images, meta_labels, meta_batch, seed=seed, pin_memory=pin,
                              prefetch=cuda if prefetch is None else prefetch)
    parts = _Parts(model, model_factory, diffnet, main_optimizer, diff_optimizer)
    opts = _Options(lambda_dr, seed, criterion, print_freq, data_parallel)
    loop = (CifarLoop if tree == "cifar" else ImageNetPlacesLoop)(parts, meta, opts)
    loop.start_epoch(epoch, acc)
    return loop


def official_optimizers(
    tree: str, model: nn.Module, diffnet: nn.Module
) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
    """The main and Difficulty-Net optimisers as the code builds them.

    ``cifar``: SGD lr 0.1, momentum 0.9, with **one parameter group per parameter**, each weight decay 1e-4
    (C:84-96); Adam lr 1e-5, weight decay 1e-4 (C:97). ``imagenet_places``: the ImageNet configs' SGD lr 0.05,
    momentum 0.9, nesterov, weight decay 5e-4 (I:279-282, ``config/imagenet/*_stage1.yaml``); Adam lr 1e-3, weight
    decay 1e-4 (I:288). Places-LT's three groups (backbone lr 0.001, I:267-271) need the caller's own groups.
    """
    if tree == "cifar":
        groups = [{"params": t, "weight_decay": 1e-4} for t in model.parameters()]
        main = torch.optim.SGD(groups, lr=0.1, momentum=0.9)
        return main, torch.optim.Adam(diffnet.parameters(), lr=1e-5, weight_decay=1e-4)
    if tree == "imagenet_places":
        main = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True)
        return main, torch.optim.Adam(diffnet.parameters(), lr=1e-3, weight_decay=1e-4)
    raise ValueError(f"unknown tree {tree!r}; expected one of {TREES}")
