"""Batched extraction of mean-pooled multi-level features.

Preprocessing follows the paper: decode to RGB, resize to the backbone's native square with
bilinear interpolation (no crop), scale to [0, 1], normalise with the weights' mean/std.
JPEG files decode at a reduced DCT scale that keeps both sides >= ``JPEG_DRAFT_FACTOR`` x the
target size (Pillow draft mode) before the resize, which more than halves their decode time;
with a factor of 2 the bilinear resize still dominates the result (None: full-size decode).

A thread pool decodes and resizes images into uint8 arrays while the model runs on the
previous batch (Pillow and torch release the GIL); at most ``PREFETCH_BATCHES`` batches are
decoded ahead. After each batch, as many decoding threads run (up to ``workers``) as it
takes to decode a batch while the model runs one (:class:`DecodeGate`): spare decoding
threads take the cores from torch's threads where decoding is cheap, and are needed where
it is dear.
Normalisation happens on the device, in one pass from the uint8 NHWC batch to a float
channels_last tensor (no copy in between). The model runs channels_last everywhere: on CUDA
under bf16 autocast (fp16 without bf16 support) on inputs copied from pinned memory, on CPU
in float32. Pooling is always accumulated and returned in float32.
While batches run, freed activations stay in the heap for the next batch
(:mod:`gaussian_ad.features.heap`) and BLAS runs single-threaded beside torch's threads.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from itertools import islice

import numpy as np
import torch
from PIL import Image
from threadpoolctl import threadpool_limits
from tqdm.auto import tqdm

from gaussian_ad.backbones.models import Backbone
from gaussian_ad.config import DEFAULT_LOADER, LoaderOptions
from gaussian_ad.data.images import ImageDecodeError, ImageError, ImageSource, load_rgb
from gaussian_ad.features.heap import reuse_freed_memory
from gaussian_ad.features.layout import PatchLayout
from gaussian_ad.features.patches import patch_features

logger = logging.getLogger(__name__)

PREFETCH_BATCHES = 2
JPEG_DRAFT_FACTOR: int | None = 2

Transform = Callable[[Image.Image], Image.Image]


@dataclass
class Batch:
    """One backbone pass over a batch: the images that decoded and the errors of the rest."""

    index: np.ndarray  # (n,) int64 positions into the input sequence
    pooled: list[np.ndarray]  # per backbone level, (n, d_l) float32
    patches: np.ndarray | None  # (n, P, d) float32 with a patch layout
    errors: list[ImageError]


@dataclass
class Features:
    """All batches of a pass, concatenated (see :class:`Batch` and :func:`collect`)."""

    index: np.ndarray
    pooled: list[np.ndarray]
    patches: np.ndarray | None
    errors: list[ImageError]


def pick_levels(
    pooled: Sequence[np.ndarray], computed: Sequence[int], wanted: Sequence[int]
) -> list[np.ndarray]:
    """The pooled features of the ``wanted`` levels, out of those of the ``computed`` ones."""
    computed = list(computed)
    return [pooled[computed.index(level)] for level in wanted]


def decode_resized(
    source: ImageSource, size: int, transform: Transform | None = None, name: str | None = None
) -> np.ndarray:
    """Decode ``source``, apply ``transform``, resize bilinearly to size x size: (H, W, 3) uint8.

    Raises ImageDecodeError when the image cannot be decoded.
    """
    draft_size = None if JPEG_DRAFT_FACTOR is None else JPEG_DRAFT_FACTOR * size
    image = load_rgb(source, draft_size=draft_size, name=name)
    if transform is not None:
        image = transform(image)
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(image)


def source_label(source: ImageSource, position: int) -> str:
    """How a source is named in error records and folds: its path, else its position."""
    return os.fspath(source) if isinstance(source, str | os.PathLike) else f"<item {position}>"


class InputNormalizer:
    """Turns (B, H, W, 3) uint8 host batches into normalised model inputs on ``device``."""

    def __init__(self, backbone: Backbone, device: torch.device):
        self.device = device
        std = torch.tensor(backbone.spec.std, dtype=torch.float32, device=device)
        mean = torch.tensor(backbone.spec.mean, dtype=torch.float32, device=device)
        # (x / 255 - mean) / std == x * scale + shift
        self.scale = (1.0 / (255.0 * std)).view(1, 3, 1, 1)
        self.shift = (-mean / std).view(1, 3, 1, 1)

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        on_cuda = self.device.type == "cuda"
        if on_cuda:
            pixels = pixels.pin_memory()
        x = pixels.to(self.device, non_blocking=on_cuda).permute(0, 3, 1, 2)
        return x.float() * self.scale + self.shift  # NHWC storage: already channels_last


def autocast_for(device: torch.device) -> AbstractContextManager:
    """bf16 autocast on CUDA (fp16 where the GPU lacks bf16); nothing (float32) on CPU."""
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return nullcontext()


def forward(
    backbone: Backbone, x: torch.Tensor, layout: PatchLayout | None = None
) -> tuple[list[np.ndarray], np.ndarray | None]:
    """One backbone pass over a normalised batch: (B, d_l) float32 pooled features per
    selected level and, with a ``layout``, the (B, P, d) float32 patch features.

    On CUDA under bf16 autocast (fp16 where the GPU lacks bf16); on CPU in float32.
    """
    with torch.inference_mode():
        if layout is None:
            with autocast_for(x.device):
                pooled = backbone(x)
            return [p.float().cpu().numpy() for p in pooled], None
        with autocast_for(x.device):
            maps = backbone.forward_maps(x)
        pooled = [m.mean(dim=(2, 3), dtype=torch.float32).cpu().numpy() for m in maps]
        chosen = [maps[backbone.levels.index(level)] for level in layout.levels]
        return pooled, patch_features(chosen, layout.grid, np.asarray(layout.channel_index))


def _per_source(value, n: int, what: str) -> Sequence:
    """One value per source: a sequence of length n, or one value repeated."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) != n:
            raise ValueError(f"{what}: {len(value)} given for {n} sources")
        return value
    return [value] * n


class DecodeGate:
    """How many decoding threads may run at once: all ``limit`` at first, then as many as
    decoding needs to keep up with the model (:meth:`fit_to`), at least one.

    On 2 cores, two decoding threads beside torch's two made scoring 256 px PNGs 10%
    slower than one (the flow 0.88x the model alone against 0.98x), and one made 900x900
    PNGs 23% dearer in CPU per image than two: the number depends on the images.
    """

    def __init__(self, limit: int):
        self.limit = max(1, limit)
        self.allowed = self.limit
        self._running = 0
        self._changed = threading.Condition()

    def __enter__(self) -> DecodeGate:
        with self._changed:
            self._changed.wait_for(lambda: self._running < self.allowed)
            self._running += 1
        return self

    def __exit__(self, *exc_info: object) -> None:
        with self._changed:
            self._running -= 1
            self._changed.notify()

    def fit_to(self, decode_seconds: float, model_seconds: float) -> None:
        """Allow the threads that decode a batch (``decode_seconds`` of CPU) while the model
        runs one (``model_seconds``): their ratio, rounded up, within [1, limit]."""
        needed = math.ceil(decode_seconds / max(model_seconds, 1e-9))
        allowed = min(max(1, needed), self.limit)
        if allowed != self.allowed:
            logger.debug("decoding on %d threads", allowed)
            with self._changed:
                self.allowed = allowed
                self._changed.notify_all()


def _decode_batches(
    sources: Sequence[ImageSource],
    size: int,
    batch_size: int,
    workers: int,
    transform: Transform | Sequence[Transform | None] | None,
    names: Sequence[str] | None,
) -> Iterator[list[tuple[int, np.ndarray | ImageError]]]:
    """Yield batches of (position, pixels or error), decoding up to PREFETCH_BATCHES ahead."""
    transforms = _per_source(transform, len(sources), "transform")

    gate = DecodeGate(workers)
    decode_cpu = [0.0, 0]  # CPU seconds of decoding, images decoded
    counting = threading.Lock()

    def decode(position: int, source: ImageSource) -> np.ndarray | ImageError:
        name = names[position] if names is not None else source_label(source, position)
        started = time.thread_time()
        with gate:
            try:
                return decode_resized(source, size, transforms[position], name)
            except ImageDecodeError as exc:
                return ImageError(exc.path, exc.reason)
            finally:
                with counting:
                    decode_cpu[0] += time.thread_time() - started
                    decode_cpu[1] += 1

    handed_out = None  # when the model got its last batch

    def take(batch: list[tuple[int, Future]]) -> list[tuple[int, np.ndarray | ImageError]]:
        nonlocal handed_out
        if handed_out is not None and decode_cpu[1]:
            per_image = decode_cpu[0] / decode_cpu[1]
            gate.fit_to(per_image * len(batch), time.perf_counter() - handed_out)
        decoded = [(i, future.result()) for i, future in batch]
        handed_out = time.perf_counter()
        return decoded

    numbered = enumerate(sources)
    pool = ThreadPoolExecutor(max_workers=gate.limit, thread_name_prefix="decode")
    pending: deque[list[tuple[int, Future]]] = deque()
    try:
        while batch := list(islice(numbered, batch_size)):
            pending.append([(i, pool.submit(decode, i, source)) for i, source in batch])
            if len(pending) > PREFETCH_BATCHES:
                yield take(pending.popleft())
        while pending:
            yield take(pending.popleft())
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _resolve_device(backbone: Backbone, device: str | torch.device | None) -> torch.device:
    """The device to run on; moves the backbone there if it sits elsewhere."""
    target = backbone.device if device is None else torch.device(device)
    if target.type == "cuda" and target.index is None:
        target = torch.device("cuda", torch.cuda.current_device())
    if target != backbone.device:
        backbone.to(target, memory_format=torch.channels_last)
    return target


def iter_batches(
    backbone: Backbone,
    sources: Sequence[ImageSource],
    options: LoaderOptions = DEFAULT_LOADER,
    *,
    layout: PatchLayout | None = None,
    transform: Transform | Sequence[Transform | None] | None = None,
    names: Sequence[str] | None = None,
    progress: bool = False,
) -> Iterator[Batch]:
    """Stream one :class:`Batch` per ``options.batch_size`` sources, in input order.

    ``sources`` are paths, bytes, PIL images or uint8 arrays (HxWx3 or HxW);
    ``transform`` maps PIL -> PIL after decoding and before resizing (one for all, or
    one per source); ``names`` label the sources in error records (default: the path,
    or the position for in-memory sources). Images that fail to decode become
    ImageError records; the batch goes on without them. With a patch ``layout`` each
    batch also carries patch features from the same pass. ``options.device`` defaults
    to the backbone's (the backbone is moved if another is given).
    """
    if names is not None and len(names) != len(sources):
        raise ValueError(f"names: {len(names)} given for {len(sources)} sources")
    target = _resolve_device(backbone, options.device)
    logger.info(
        "%d images through %s on %s: batches of %d, %d decoding threads",
        len(sources),
        backbone.spec.name,
        target,
        options.batch_size,
        options.workers,
    )
    normalize = InputNormalizer(backbone, target)
    size = backbone.spec.image_size
    batches = _decode_batches(sources, size, options.batch_size, options.workers, transform, names)
    if progress:
        total = math.ceil(len(sources) / options.batch_size)
        batches = tqdm(batches, total=total, desc="features", unit="batch")
    # torch's intra-op threads use the cores: BLAS calls between batches (the consumer's
    # statistics) run single-threaded instead of waking threads that then spin.
    with reuse_freed_memory(), threadpool_limits(1, user_api="blas"):
        for batch in batches:
            yield _run_batch(backbone, batch, normalize, layout)


def _run_batch(
    backbone: Backbone,
    batch: list[tuple[int, np.ndarray | ImageError]],
    normalize: InputNormalizer,
    layout: PatchLayout | None,
) -> Batch:
    """The backbone pass over one decoded batch; its errors pass through."""
    decoded = [(i, item) for i, item in batch if isinstance(item, np.ndarray)]
    errors = [item for _, item in batch if isinstance(item, ImageError)]
    index = np.array([i for i, _ in decoded], dtype=np.int64)
    if decoded:
        x = normalize(torch.from_numpy(np.stack([item for _, item in decoded])))
        pooled, patches = forward(backbone, x, layout)
    else:
        pooled = [np.empty((0, d), dtype=np.float32) for d in backbone.level_dims]
        patches = None if layout is None else np.empty(layout.feature_shape(0), np.float32)
    return Batch(index, pooled, patches, errors)


def collect(
    batches: Iterable[Batch], backbone: Backbone, layout: PatchLayout | None = None
) -> Features:
    """All of :func:`iter_batches`' batches of one pass, concatenated."""
    batches = list(batches)
    empty = [np.empty((0, d), dtype=np.float32) for d in backbone.level_dims]
    pooled = [
        np.concatenate([empty[i], *(b.pooled[i] for b in batches)]) for i in range(len(empty))
    ]
    patches = None
    if layout is not None:
        empty_patches = np.empty(layout.feature_shape(0), np.float32)
        patches = np.concatenate([empty_patches, *(b.patches for b in batches)])
    return Features(
        index=np.concatenate([np.empty(0, np.int64), *(b.index for b in batches)]),
        pooled=pooled,
        patches=patches,
        errors=[e for b in batches for e in b.errors],
    )


def extract(
    backbone: Backbone,
    sources: Sequence[ImageSource],
    options: LoaderOptions = DEFAULT_LOADER,
    layout: PatchLayout | None = None,
) -> Features:
    """One pass over ``sources``, collected: ``collect(iter_batches(...))`` for the common
    case (no per-source transforms or names)."""
    return collect(iter_batches(backbone, sources, options, layout=layout), backbone, layout)
