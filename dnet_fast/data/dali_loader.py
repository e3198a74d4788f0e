"""The ``dali`` loader: DALI decodes the converted tar shards ("mixed" GPU decode with CUDA, CPU otherwise)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from dnet_fast.data.base import LOADERS, Batch, LoaderSpec, SampleError
from dnet_fast.data.loaders import epoch_indices, num_batches, require_module, to_device_batch
from dnet_fast.data.shards import ShardSplit
from dnet_fast.data.transforms import CIFAR_PAD, RRC_RATIO, RRC_SCALE, eval_size

__all__ = ["DaliLoader", "build_dali", "read_webdataset_labels"]


def _mirror_normalize(images: Any, spec: LoaderSpec) -> Any:
    """Training: flip, normalise and HWC→CHW in one fused DALI op (a separate torch pass costs as much as the
    decode on a CPU); eval batches stay uint8 and use the shared torch ``normalize`` to match other loaders."""
    from nvidia.dali import fn, types

    mean = [255 * m for m in spec.mean]
    std = [255 * s for s in spec.std]
    return fn.crop_mirror_normalize(
        images, mirror=fn.random.coin_flip(), mean=mean, std=std, dtype=types.FLOAT, output_layout="CHW"
    )


def _recipe(images: Any, spec: LoaderSpec, hw: tuple[int, int]) -> Any:
    """The spec's training recipe (``dali_recipe``) on uint8 HWC images of size ``hw``; as is without one."""
    if spec.train_recipe is None:
        return images
    from dnet_fast.data.dali_recipe import apply_dali_recipe

    return apply_dali_recipe(images, spec.train_recipe, hw)


def _images(enc: Any, spec: LoaderSpec, gpu: bool, stored_hw: tuple[int, int]) -> Any:
    """The DALI graph from encoded bytes to float32 CHW (training) or uint8 HWC (eval) images."""
    from nvidia.dali import fn, types

    dev = "mixed" if gpu else "cpu"
    # Pillow and FFCV ignore EXIF orientation; so must DALI for the loaders to agree (the converter strips it).
    dec = {"device": dev, "output_type": types.RGB, "adjust_orientation": False}
    crop = spec.crop_size
    augment = spec.augment if spec.train else "none"
    if augment == "imagenet":
        images = fn.decoders.image_random_crop(
            enc, random_area=list(RRC_SCALE), random_aspect_ratio=list(RRC_RATIO), num_attempts=10, **dec
        )
        images = _recipe(fn.resize(images, size=[crop, crop]), spec, (crop, crop))
        return _mirror_normalize(images, spec)
    images = fn.decoders.image(enc, **dec)
    if augment == "cifar":
        # Zero-pad by CIFAR_PAD and crop back: a window of the stored size at a random offset in [-pad, pad].
        anchor = fn.random.uniform(range=[-CIFAR_PAD, CIFAR_PAD + 1], shape=[2], dtype=types.INT32)
        images = fn.slice(
            images, anchor, list(stored_hw), axes=[0, 1], out_of_bounds_policy="pad", fill_values=0
        )
        return _mirror_normalize(_recipe(images, spec, stored_hw), spec)
    if spec.eval_augment == "imagenet":
        images = fn.resize(images, resize_shorter=eval_size(crop))
        return fn.crop(images, crop=[crop, crop])
    return images


class DaliLoader:
    """Batches decoded by DALI from ``split.tars``; images are fed by an external source in the engine's order.

    DALI's webdataset reader only shuffles within a buffer (NVIDIA/DALI #5429), so the training order and the
    class-balanced orders come from ``sampling`` and the samples are read from the tars through their index. A
    training ``spec.recipe`` runs as DALI ops (``dali_recipe``: the same policies from DALI's auto_aug module,
    with DALI's randomness and interpolation).

    Args:
        split: a ShardSplit of a converted directory.
        spec: batch size, device (``cuda``: mixed GPU decoding), seed, workers (DALI threads), augmentation, order.
    """

    def __init__(self, split: ShardSplit, spec: LoaderSpec) -> None:
        if not isinstance(split, ShardSplit):
            msg = "the dali loader needs a split of a converted directory (data.dataset=shards)"
            raise ValueError(msg)
        self.split, self.spec = split, spec
        self.device = torch.device(spec.device)
        self._order = np.zeros(0, np.int64)
        self._running, self._fed = False, -1  # _fed: the last iteration whose batch DALI was given
        self.pipe = self._pipeline()
        self.pipe.build()

    def _pipeline(self) -> Any:
        """The DALI pipeline; a training recipe needs conditionals, hence ``pipeline_def`` (AutoGraph)."""
        from nvidia.dali import Pipeline, fn, pipeline_def, types

        spec = self.spec
        gpu = self.device.type == "cuda" and torch.cuda.is_available()
        hw = self._stored_hw()

        def graph() -> tuple[Any, Any]:
            enc, labels = fn.external_source(
                source=self._source,
                num_outputs=2,
                batch=True,
                batch_info=True,
                dtype=[types.UINT8, types.INT64],
            )
            return _images(enc, spec, gpu, hw), labels

        # device_id=None is DALI's CPU-only mode; any GPU operator would then fail (PERFORMANCE §7).
        options = {
            "batch_size": spec.batch_size,
            "num_threads": max(1, spec.workers),
            "device_id": (self.device.index or 0) if gpu else None,
            "seed": spec.seed & 0x7FFFFFFF,
            "prefetch_queue_depth": 2,
        }
        if spec.train_recipe is not None:
            return pipeline_def(enable_conditionals=True)(graph)(**options)
        pipe = Pipeline(**options)
        with pipe:
            pipe.set_outputs(*graph())
        return pipe

    def _stored_hw(self) -> tuple[int, int]:
        w, h = self.split.image(0).size
        return h, w

    def _source(self, info: Any) -> tuple[list[np.ndarray], list[np.ndarray]]:
        bs = self.spec.batch_size
        rows = self._order[info.iteration * bs : (info.iteration + 1) * bs]
        if len(rows) == 0:
            raise StopIteration
        self._fed = max(self._fed, info.iteration)
        reader = self.split.reader()
        enc = [np.frombuffer(reader.image_bytes(int(self.split.rows[i])), dtype=np.uint8) for i in rows]
        return enc, [self.split.labels[i : i + 1] for i in rows]

    def __len__(self) -> int:
        return num_batches(len(self.split), self.spec)

    def batches(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        """Batches of ``epoch`` from batch index ``start`` on; see ``Loader``."""
        from nvidia.dali.plugin.pytorch.torch_utils import to_torch_tensor

        self._finish_epoch()
        spec = self.spec
        order = epoch_indices(self.split.labels, spec, epoch)[: len(self) * spec.batch_size]
        self._order = order[start * spec.batch_size :]
        self._running, self._fed = True, -1
        for done in itertools.count():
            try:
                images, labels = self.pipe.run()
            except StopIteration:
                break
            except RuntimeError as err:
                raise self._decode_failure(err, done) from err
            # x: train (B, 3, h, w) float32, eval (B, h, w, 3) uint8
            x = to_torch_tensor(images.as_tensor(), copy=True)
            y = to_torch_tensor(labels.as_tensor(), copy=True).view(-1)
            yield to_device_batch(x, y, spec)
        self.pipe.reset()
        self._running = False

    def _decode_failure(self, err: RuntimeError, done: int) -> Exception:
        """The error to raise for a failed batch: DALI's decoder names no sample, so the batches fed to it but not
        returned yet (``done`` were returned) are decoded with Pillow to find the one that is bad."""
        text = str(err)
        if "decoders" not in text:
            return err  # not a decoding failure: DALI's own error
        bs = self.spec.batch_size
        suspects = [int(i) for i in self._order[done * bs : (max(self._fed, done) + 1) * bs]]
        for i in suspects:
            try:
                self.split.image(i)
            except SampleError as bad:
                return bad
        lines = [ln.strip() for ln in text.split("encountered:", 1)[-1].splitlines() if ln.strip()]
        first, last = self.split.where(suspects[0]), self.split.where(suspects[-1])
        detail = lines[0] if lines else "decoding failed"
        return SampleError(f"DALI could not decode one of the samples from {first} to {last}: {detail}")

    def _finish_epoch(self) -> None:
        # An epoch abandoned midway still has prefetched batches queued: run it out before the next one.
        if not self._running:
            return
        try:
            while True:
                self.pipe.run()
        except StopIteration:
            pass
        self.pipe.reset()
        self._running = False


def read_webdataset_labels(split: ShardSplit, batch_size: int = 64) -> np.ndarray:
    """Labels of every sample read back with DALI's own ``fn.readers.webdataset`` (index files, file order).

    Checks that the shards and their ``.idx`` files are what DALI's reader expects; returns int64 (N,).
    """
    from nvidia.dali import Pipeline, fn, types

    pipe = Pipeline(batch_size=batch_size, num_threads=1, device_id=None)
    with pipe:
        _, cls = fn.readers.webdataset(
            paths=list(split.tars),
            index_paths=[t[: -len(".tar")] + ".idx" for t in split.tars],
            ext=["jpg;png", "cls"],
            missing_component_behavior="error",
            dtypes=[types.UINT8, types.UINT8],
            name="wds",
            pad_last_batch=False,
        )
        pipe.set_outputs(cls)
    pipe.build()
    total = pipe.epoch_size("wds")
    out: list[int] = []
    while len(out) < total:
        (cls_batch,) = pipe.run()
        out.extend(int(bytes(np.asarray(cls_batch[i])).decode()) for i in range(len(cls_batch)))
    return np.asarray(out[:total], dtype=np.int64)


@LOADERS.register("dali")
def build_dali(split: ShardSplit, spec: LoaderSpec) -> DaliLoader:
    """The DALI loader (needs the ``dali-cuda12`` or ``dali-cuda13`` extra)."""
    hint = ("the dali loader needs DALI: pip install 'dnet-fast[dali-cuda13]' (CUDA 13 or CPU only) or "
            "'dnet-fast[dali-cuda12]' (CUDA 12); see docs/INSTALL.md")
    require_module("nvidia.dali", hint)
    return DaliLoader(split, spec)
