"""The official-style loops of ``benchmarks/official.py`` do what the released code does per iteration.

Host syncs, host-to-device copies, model builds, state copies, forwards and backwards are counted on CPU (by wrapping
the tensor methods and autograd entry points and keeping only calls made from the loop's own file) and compared with
numbers read from hitachi-rd-cv/Difficulty_Net @ c6d131566dd6fd860226aeeee982acd4d6ac7da0. ``C:n`` is line n of
``CIFAR-LT/cifar_train_exaugment.py``, ``I:n`` of ``ImageNet_Places-LT/train_stage1.py``. The same check failed on the
former ``benchmarks/naive.py`` ``OfficialStyleStep`` (per-sample ``.item()`` accuracy loop, ``int(label)`` per meta
index, no input/meta/A copies, first-order virtual step in its ``official`` variant) before that loop was removed.
"""

from __future__ import annotations

import sys
import warnings
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks import official
from dnet_fast.models import DifficultyNet
from tests.helpers import C, TinyNet

B, M = 8, 4  # train batch, meta batch (C = 5 classes: TinyNet's head)
N_META = 10  # meta images: passes of 4, 4 and 2
ACC = torch.tensor([0.9, 0.6, 0.4, 0.2, 0.05])  # (C,) A of a later epoch
LAMBDA = 0.3

# Per iteration, read from the code. "syncs": D2H reads by method; "h2d": non_blocking flag of every host-to-device
# tensor copy, in order (False = blocking, which PyTorch follows with cudaStreamSynchronize).
OFFICIAL: dict[str, dict[str, Any]] = {
    "cifar": {
        # C:150 and C:225 train_labels.cpu(); C:240 epoch_loss += torch.sum(train_loss).item()
        "syncs": {"cpu": 2, "item": 1},
        # C:147-148 inputs .cuda(); C:154, C:155 torch.cuda.FloatTensor(host array) (from epoch 1, C:254-271);
        # C:161 one-hot rows .cuda(); C:203-204 meta batch .cuda(); C:219 A again; C:230 one-hot rows
        "h2d": [False] * 9,
        "module_moves": 1,  # C:151 build_model -> C:41 model.cuda() (models/meta_resnet32.py:9-12 to_var)
        "builds": 1,  # C:151 a new ResNet32 every iteration
        "state_loads": 1,  # C:152 model_cpy.load_state_dict(model.state_dict())
        "forwards": [B, M, B],  # C:171 virtual (copy), C:207 meta (copy, updated weights), C:237 real (model)
        "grads": [True],  # C:183 autograd.grad(..., create_graph=True): second order
        "backwards": 2,  # C:209 meta_loss.backward() (double backward), C:244 train_loss.backward()
        "diffnet_forwards": 2,  # C:154 (train mode), C:219 (eval, no grad)
    },
    "imagenet_places": {
        # I:403 and I:443 -> I:336 labels.cpu(); I:463 losses.update(loss.item(), ...)
        "syncs": {"cpu": 2, "item": 1},
        # I:389-390 .cuda(non_blocking=True); I:337 one-hot rows .cuda(); I:426 meta batch .cuda(); I:337 again
        "h2d": [True, True, False, False, False, False],
        "module_moves": 0,  # the pseudo model is built once (I:160-162, I:210)
        "builds": 0,
        "state_loads": 1,  # I:392-397 pseudo <- model (two calls in the code, backbone and classifier: one module here)
        "forwards": [B, M, B],  # I:411-412 pseudo on b, I:434-435 pseudo on m, I:451-452 model on b
        "grads": [],  # first order: no autograd.grad
        "backwards": 3,  # I:418 pseudo, I:437 meta, I:459 real
        "diffnet_forwards": 2,  # I:399 (train mode), I:441 (eval, no grad)
    },
}
# I:471-472 progress line every print_freq iterations: utils/meter.py:20-22 formats top1/top5 val and avg, device
# tensors (I:464-465), one .item() each
PRINT_LINE_SYNCS = {"item": 4}
# C:131: in epoch 0 A is a device tensor, so C:154, C:155 and C:219 copy nothing
CIFAR_EPOCH0_H2D = [False] * 6

LOOP_FILES = frozenset({official.__file__})
SYNC_METHODS = ("item", "cpu", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__")


class Recorder:
    """Counts what the loop code (``LOOP_FILES``) calls while ``on``; torch's own internals are not counted."""

    def __init__(self, mp: pytest.MonkeyPatch) -> None:
        self.on = False
        self.reset()
        for name in SYNC_METHODS:
            self._wrap_tensor(mp, name, lambda name, args, kwargs: self.syncs.update([name]))
        for name in ("to", "cuda"):
            self._wrap_tensor(mp, name, self._note_copy)
        self._wrap_callables(mp)
        self.hook = torch.nn.modules.module.register_module_forward_hook(self._forward_hook)

    def reset(self) -> None:
        self.syncs: Counter[str] = Counter()
        self.h2d: list[bool] = []
        self.module_moves = self.builds = self.state_loads = self.backwards = self.diffnet_forwards = 0
        self.forwards: list[int] = []
        self.grads: list[bool] = []

    def counts(self) -> dict[str, Any]:
        keys = ("h2d", "module_moves", "builds", "state_loads", "forwards", "grads", "backwards", "diffnet_forwards")
        return {"syncs": dict(self.syncs), **{k: getattr(self, k) for k in keys}}

    def _from_loop(self) -> bool:
        return self.on and sys._getframe(2).f_code.co_filename in LOOP_FILES  # the wrapper's caller

    def _wrap_tensor(self, mp: pytest.MonkeyPatch, name: str, note: Callable[[str, tuple, dict], None]) -> None:
        orig = getattr(torch.Tensor, name)

        def wrapper(t: Tensor, *args: Any, **kwargs: Any) -> Any:
            if self._from_loop():
                note(name, args, kwargs)
            return orig(t, *args, **kwargs)

        mp.setattr(torch.Tensor, name, wrapper)

    def _note_copy(self, name: str, args: tuple, kwargs: dict) -> None:
        device = kwargs.get("device", next((a for a in args if isinstance(a, torch.device | str)), None))
        if name == "cuda" or device is not None:  # a dtype-only .to() copies nothing across devices
            self.h2d.append(bool(kwargs.get("non_blocking", False)))

    def _wrap_callables(self, mp: pytest.MonkeyPatch) -> None:
        grad, backward = torch.autograd.grad, torch.Tensor.backward
        module_to, load = nn.Module.to, nn.Module.load_state_dict

        def counted_grad(*args: Any, **kwargs: Any) -> Any:
            out = grad(*args, **kwargs)
            if self._from_loop():  # second order: the graph kept and the gradients themselves differentiable
                self.grads.append(bool(kwargs.get("create_graph")) and all(g.requires_grad for g in out))
            return out

        def counted_backward(t: Tensor, *args: Any, **kwargs: Any) -> Any:
            self.backwards += self._from_loop()
            return backward(t, *args, **kwargs)

        def counted_to(m: nn.Module, *args: Any, **kwargs: Any) -> Any:
            self.module_moves += self._from_loop()
            return module_to(m, *args, **kwargs)

        def counted_load(m: nn.Module, *args: Any, **kwargs: Any) -> Any:
            self.state_loads += self._from_loop()
            return load(m, *args, **kwargs)

        mp.setattr(torch.autograd, "grad", counted_grad)
        mp.setattr(torch.Tensor, "backward", counted_backward)
        mp.setattr(nn.Module, "to", counted_to)
        mp.setattr(nn.Module, "load_state_dict", counted_load)

    def _forward_hook(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self.on and isinstance(module, TinyNet):
            self.forwards.append(args[0].shape[0])
        elif self.on and isinstance(module, DifficultyNet):
            self.diffnet_forwards += 1

    def factory(self) -> nn.Module:
        """A fresh classifier, counted as a build."""
        self.builds += self.on
        return TinyNet()

    def measure(self, fn: Callable[[], object]) -> dict[str, Any]:
        """Counts of one call of ``fn``."""
        self.reset()
        self.on = True
        try:
            fn()
        finally:
            self.on = False
        return self.counts()


@pytest.fixture
def rec(monkeypatch: pytest.MonkeyPatch):
    r = Recorder(monkeypatch)
    yield r
    r.hook.remove()


def mismatches(counts: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    """Names of the counts that differ from the official ones."""
    return [k for k, v in expected.items() if counts[k] != v]


def check_official(counts: dict[str, Any], expected: dict[str, Any]) -> None:
    """The check every official-style loop must pass: all counts as read from the code."""
    wrong = mismatches(counts, expected)
    assert wrong == [], {k: (counts[k], expected[k]) for k in wrong}


def meta_set() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(N_META, 3, 8, 8, generator=g), torch.arange(N_META) % C


def train_batch(step: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(B, 3, 8, 8, generator=g), torch.randint(0, C, (B,), generator=g)


def parts(tree: str) -> tuple[TinyNet, DifficultyNet, torch.optim.Optimizer, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = TinyNet()
    diffnet = DifficultyNet(C, 8, bias=tree != "cifar")  # biases as in each tree (C:358 VNet, I:45-53)
    return model, diffnet, *official.official_optimizers(tree, model, diffnet)


def make_loop(tree: str, factory: Callable[[], nn.Module], **kwargs: Any) -> official.Loop:
    model, diffnet, main, adam = parts(tree)
    return official.build(tree, model, factory, diffnet, main, adam, ACC, *meta_set(), meta_batch=M,
                          lambda_dr=LAMBDA, **kwargs)


@pytest.mark.parametrize(("epoch", "h2d"), [(1, OFFICIAL["cifar"]["h2d"]), (0, CIFAR_EPOCH0_H2D)])
def test_cifar_loop_matches_official_counts(rec: Recorder, epoch: int, h2d: list[bool]) -> None:
    loop = make_loop("cifar", rec.factory, epoch=epoch)
    for step in range(2):
        check_official(rec.measure(lambda step=step: loop.step(*train_batch(step))), {**OFFICIAL["cifar"], "h2d": h2d})
    # only the real forward touches the model's BatchNorm statistics: the copies absorb theirs (C:171, C:207)
    assert int(loop.parts.model.bn.num_batches_tracked) == 2


def test_imagenet_places_loop_matches_official_counts(rec: Recorder) -> None:
    loop = make_loop("imagenet_places", rec.factory, print_freq=3)
    line = {**OFFICIAL["imagenet_places"]["syncs"]}
    line.update({k: line.get(k, 0) + v for k, v in PRINT_LINE_SYNCS.items()})
    for step, syncs in enumerate([line, OFFICIAL["imagenet_places"]["syncs"]] * 2):  # iterations 0 and 3 print
        if step == 2:
            loop.step(*train_batch(9))
        counts = rec.measure(lambda step=step: loop.step(*train_batch(step)))
        check_official(counts, {**OFFICIAL["imagenet_places"], "syncs": syncs})
    assert loop.last_display.startswith("Epoch: [1][3]")
    assert int(loop.parts.model.bn.num_batches_tracked) == 5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(("tree", "syncs"), [("cifar", 3 + 9 + 8), ("imagenet_places", 3 + 4)])
def test_cuda_synchronizing_calls_per_iteration(tree: str, syncs: int) -> None:
    """On CUDA, torch's sync debug mode flags every synchronising call: the three D2H reads and the blocking copies
    of OFFICIAL (CIFAR 9, ImageNet/Places 4: its pinned train batch goes non-blocking), plus, for CIFAR, one per
    state tensor moved with the fresh copy (TinyNet has 8)."""
    dev = torch.device("cuda")
    model, diffnet, main, adam = parts(tree)
    model.to(dev)
    diffnet.to(dev)
    loop = official.build(tree, model, TinyNet, diffnet, main, adam, ACC, *meta_set(), meta_batch=M,
                          lambda_dr=LAMBDA, prefetch=False, print_freq=1000)

    def batch(step: int) -> list[Tensor]:
        return [t.pin_memory() if tree == "imagenet_places" else t for t in train_batch(step)]

    loop.step(*batch(0))  # warm-up; iteration 0 also writes the progress line
    torch.cuda.synchronize(dev)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            loop.step(*batch(1))
        finally:
            torch.cuda.set_sync_debug_mode("default")
    loop.close()
    assert sum("synchroniz" in str(w.message) for w in seen) == syncs


@pytest.mark.parametrize("tree", official.TREES)
def test_theta_gets_only_the_driver_loss_gradient(tree: str) -> None:
    """Both trees detach the weights (``torch.tensor``, C:163, I:339; SPEC §4.2): θ's gradient is λ·∂L_dr/∂θ."""
    loop = make_loop(tree, TinyNet)
    diffnet, adam = loop.parts.diffnet, loop.parts.diff_optimizer
    theta = list(diffnet.parameters())
    d = diffnet(ACC)
    expected = torch.autograd.grad(LAMBDA * F.mse_loss(d, 1 - ACC / (ACC.sum() + 1e-12)), theta)
    seen: list[list[Tensor]] = []
    adam_step = adam.step
    adam.step = lambda *a, **k: (seen.append([t.grad.clone() for t in theta]), adam_step(*a, **k))[1]
    loop.step(*train_batch(0))
    assert len(seen) == 1
    for got, want in zip(seen[0], expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-8)


def test_imagenet_pseudo_model_keeps_its_own_optimizer() -> None:
    """I:160-162 and I:283-286: a separate pseudo model and SGD (same settings), momentum kept across iterations."""
    loop = make_loop("imagenet_places", TinyNet)
    assert isinstance(loop, official.ImageNetPlacesLoop)
    for step in range(2):
        loop.step(*train_batch(step))
    opt, main = loop.pseudo_optimizer, loop.parts.main_optimizer
    assert type(opt) is type(main)
    assert opt is not main
    settings = ("lr", "momentum", "weight_decay", "nesterov")
    assert [[g[k] for k in settings] for g in opt.param_groups] == [[g[k] for k in settings] for g in main.param_groups]
    pseudo = list(loop.pseudo.parameters())
    assert {id(t) for t in pseudo}.isdisjoint(id(t) for t in loop.parts.model.parameters())
    assert all("momentum_buffer" in opt.state[t] for t in pseudo)


def test_meta_batches_are_a_shuffled_pass_restarted_when_exhausted(rec: Recorder) -> None:
    """C:466 / ``datasets/imagenet.py``:265-268: shuffle=True, batch 100 (M here), last batch smaller; C:193-198 /
    I:421-425 restart on StopIteration; C:142 / I:359 a new iterator every epoch."""
    loop = make_loop("cifar", TinyNet)
    sizes = []
    for step in range(7):
        sizes.append(rec.measure(lambda step=step: loop.step(*train_batch(step)))["forwards"][1])
    assert sizes == [4, 4, 2, 4, 4, 2, 4]
    assert loop.meta_loader.starts == 3
    loop.start_epoch(2, ACC)
    assert loop.meta_loader.starts == 4
    assert rec.measure(lambda: loop.step(*train_batch(0)))["forwards"][1] == 4


@pytest.mark.parametrize("prefetch", [False, True])
def test_meta_loader_passes_are_seeded_permutations(prefetch: bool) -> None:
    images = torch.arange(N_META, dtype=torch.float32).view(N_META, 1, 1, 1).expand(N_META, 3, 2, 2)
    labels = torch.arange(N_META) % C

    def passes(loader: official.ShuffledMetaLoader) -> list[list[int]]:
        return [[int(v) for x, _ in loader for v in x[:, 0, 0, 0]] for _ in range(2)]

    plain = official.ShuffledMetaLoader(images, labels, M, seed=3)
    loader = official.ShuffledMetaLoader(images, labels, M, seed=3, prefetch=prefetch)
    got = passes(loader)
    assert [sorted(p) for p in got] == [list(range(N_META))] * 2
    assert got[0] != got[1]
    assert got == passes(plain)
    assert loader.starts == 2
    assert len(loader) == 3
    assert [len(y) for _, y in loader] == [4, 4, 2]
    loader.close()


def test_epoch_extras_read_from_the_code() -> None:
    # the official CIFAR split: 25/class val removed, then int(475·(1/ρ)^(c/99)) (data/data_preprocessing.py:73-101)
    assert official.cifar_official_train_size(100) == 10302
    assert official.cifar_official_train_size(200) == 9022
    extras = {name: official.epoch_extras(tree, train_images=n, meta_images=m, test_images=t)
              for name, (tree, n, m, t) in official.OFFICIAL_SETS.items()}
    # (iterations, meta batches per pass, meta loader starts, all loader starts): train 1 (C:144, I:381), meta
    # C:142/I:359 + restarts C:196/I:424, val 1 (C:257, I:302), test 1 (C:300, I:308)
    got = {k: (e.iterations, e.meta_batches_per_pass, e.meta_loader_starts, e.loader_starts) for k, e in extras.items()}
    assert got == {"cifar100_lt_r100": (81, 25, 4, 7), "cifar100_lt_r200": (71, 25, 3, 6),
                   "imagenet_lt": (906, 100, 10, 13), "places_lt": (489, 37, 14, 17)}
    cifar, imagenet = extras["cifar100_lt_r100"], extras["imagenet_lt"]
    assert [(p.name, p.batches) for p in cifar.passes] == [("val", 10), ("test", 40)]  # batch 256 (C:467, C:469)
    assert cifar.passes[0].syncs(correct=1000) == 10 + 2500 + 1000  # C:262 per batch, C:268 per image, C:269
    assert (cifar.workers_per_start, cifar.checkpoint_saves, cifar.meta_restarts) == (8, (0, 1), 3)
    assert [(p.name, p.batches) for p in imagenet.passes] == [("val", 79), ("test", 391)]
    assert imagenet.passes[1].syncs(correct=0) == 4 * 391 + 5 + 4 * 2  # I:514+I:526-528, I:542, I:534-535
    assert (imagenet.workers_per_start, imagenet.checkpoint_saves) == (48, (1, 1))


def test_cudnn_benchmark_as_the_code_sets_it() -> None:
    assert official.CifarLoop.cudnn_benchmark is True  # C:40-42
    assert official.ImageNetPlacesLoop.cudnn_benchmark is False  # I:101-104 only under deterministic: default
    before = torch.backends.cudnn.benchmark
    with official._cudnn_benchmark(not before, torch.device("cuda")):
        assert torch.backends.cudnn.benchmark is (not before)
    with official._cudnn_benchmark(not before, torch.device("cpu")):
        assert torch.backends.cudnn.benchmark is before
    assert torch.backends.cudnn.benchmark is before


def test_balanced_softmax_broadcasts_as_the_code() -> None:
    """I:83-92 returns (B, 1, 1); times the (B,) weights (I:416) it is (B, 1, B), whose mean is mean(w)·mean(ℓ)."""
    logits, y = torch.randn(B, C), torch.randint(0, C, (B,))
    w = torch.rand(B)
    loss = official.OfficialBalancedSoftmax(torch.tensor([40, 20, 10, 5, 2]))(logits, y)
    assert loss.shape == (B, 1, 1)
    assert (w * loss).shape == (B, 1, B)
    torch.testing.assert_close(torch.mean(w * loss), w.mean() * loss.mean())


def test_official_optimizers() -> None:
    model, diffnet, main, adam = parts("cifar")
    assert len(main.param_groups) == len(list(model.parameters()))  # C:89-93: one group per parameter
    assert (main.defaults["lr"], main.defaults["momentum"], adam.defaults["lr"]) == (0.1, 0.9, 1e-5)  # C:96-97
    _, _, main, adam = parts("imagenet_places")
    assert main.defaults["nesterov"]
    assert (main.defaults["lr"], adam.defaults["lr"]) == (0.05, 1e-3)
    with pytest.raises(ValueError, match="unknown tree"):
        official.build("cifar10", model, TinyNet, diffnet, main, adam, ACC, *meta_set())
