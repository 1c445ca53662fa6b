"""Streamed image domains: image files decoded lazily, in loader worker processes.

An image domain too large for memory as float arrays (Office-Home at 224²
is about 9 GB per process, VisDA-2017 about 30 GB) is handed to methods as
an :class:`ImageStream`: the list of its image files plus how to decode
them.  It stands where an in-memory ``X`` array stands in a
:class:`dabench.Task` (``len(X)``, ``X.shape == (n, C*H*W)``, ``X[idx]``
gives the sub-stream of those rows), so the host's split protocol works on
indices and never decodes anything.  Pixels are only decoded for the batch
being trained on or predicted:

- :class:`dabench.training.TensorBatches` over a stream yields the same
  :class:`~dabench.training.Batch` objects as over arrays (float32 inputs in
  [0, 1], flattened, on the device), decoded by a
  :class:`torch.utils.data.DataLoader` with worker processes, pinned memory
  and deeper prefetch on CUDA;
- :class:`dabench.training.TorchPredictor` predicts on a stream batch by
  batch with the deterministic test transform.

Transforms (pixels are decoded with Pillow, RGB, then):

- test (``"none"``, and every prediction): resize to ``resize`` = (RH, RW)
  (bicubic), then the centre ``size`` = (H, W) crop (TLlib's
  ``ResizeImage(256)`` + ``CenterCrop(224)``);
- ``"crop-flip"`` (training batches): resize to ``resize``, a random resized
  crop (scale 0.08-1, aspect 3/4-4/3, torchvision's sampling with its
  10 tries and centre fallback) resized to ``size`` (bilinear), horizontal
  flip with probability 1/2 (TLlib's default training transform for
  Office-31 and Office-Home);
- ``"center-flip"``: the test crop plus the flip (TLlib's ``cen.crop``
  training transform for VisDA-2017).

JPEG files are decoded at a reduced DCT scale when they are at least twice
``resize`` (Pillow's ``draft``, never below ``resize``): much faster on large
photos, the output differs from a full decode only by the resampling filter.

Augmentation is seeded per sample from the batch stream's seed in the main
process, so a run's batches are the same whatever the number of workers.
An image that cannot be decoded raises :class:`~dabench.data.core.DataError`
naming the file (the pair is reported as having bad data; it is not stored).
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from .core import DataError

log = logging.getLogger("dabench.data")

#: Training transforms a suite's ``[protocol] augment`` may name.
AUGMENTATIONS = ("none", "crop-flip", "center-flip")
#: Environment variable fixing the number of loader worker processes.
WORKERS_VAR = "DABENCH_LOADER_WORKERS"
#: torchvision's RandomResizedCrop defaults (and TLlib's).
CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)


def default_resize(size: tuple[int, int]) -> tuple[int, int]:
    """The pre-crop size for ``size``: 256/224 of it (224 -> 256, as TLlib)."""
    return (max(size[0], round(size[0] * 256 / 224)), max(size[1], round(size[1] * 256 / 224)))


def is_stream(X: Any) -> bool:
    """Whether ``X`` is a streamed domain (an :class:`ImageStream`) rather than an array."""
    return bool(getattr(X, "__dabench_stream__", False))


@dataclass(frozen=True, eq=False)
class ImageStream:
    """Rows of a streamed image domain: image files and how to decode them.

    ``files`` are paths relative to ``root`` (bytes, one per row, in row
    order); ``size`` = (H, W) is the network's input, ``resize`` the size the
    image is brought to before the crop, ``augment`` the training transform
    (one of :data:`AUGMENTATIONS`; predictions always use the test
    transform).  Immutable and cheap to index and pickle (no pixels).
    """

    __dabench_stream__ = True

    name: str
    root: str
    files: np.ndarray = field(repr=False)
    size: tuple[int, int]
    resize: tuple[int, int]
    augment: str = "none"

    def __post_init__(self) -> None:
        files = np.asarray(self.files)
        if files.ndim != 1 or (files.size and files.dtype.kind != "S"):
            raise ValueError("ImageStream.files must be a 1-d array of bytes paths")
        files.setflags(write=False)
        object.__setattr__(self, "files", files)
        object.__setattr__(self, "size", (int(self.size[0]), int(self.size[1])))
        object.__setattr__(self, "resize", (int(self.resize[0]), int(self.resize[1])))
        if min(self.size) < 1 or self.resize[0] < self.size[0] or self.resize[1] < self.size[1]:
            raise ValueError(f"ImageStream {self.name!r}: resize {self.resize} must be at least size {self.size}")
        if self.augment not in AUGMENTATIONS:
            raise ValueError(f"ImageStream {self.name!r}: augment must be one of {AUGMENTATIONS}, got {self.augment!r}")

    @classmethod
    def from_paths(cls, name: str, paths: Sequence[str | os.PathLike], size: tuple[int, int],
                   resize: tuple[int, int] | None = None, augment: str = "none") -> "ImageStream":
        """A stream over ``paths`` (stored relative to their common folder)."""
        paths = [os.path.abspath(p) for p in paths]
        root = os.path.commonpath(paths) if paths else ""
        if paths and len(paths) == 1:
            root = os.path.dirname(paths[0])
        rel = np.array([os.fsencode(os.path.relpath(p, root)) for p in paths], dtype=bytes) if paths \
            else np.zeros(0, dtype="S1")
        return cls(name, root, rel, tuple(size), tuple(resize or default_resize(tuple(size))), augment)

    # ---- the array-like surface a Task's X offers

    @property
    def item_shape(self) -> tuple[int, int, int]:
        """Per-sample shape ``(3, H, W)``."""
        return (3, *self.size)

    @property
    def shape(self) -> tuple[int, int]:
        """``(n, 3*H*W)``: rows are flattened images, like a Task's arrays."""
        return (len(self.files), 3 * self.size[0] * self.size[1])

    ndim = 2
    dtype = np.dtype(np.float32)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, idx: Any) -> Any:
        """``X[i]`` is row ``i`` decoded (float32, test transform);
        ``X[slice]``, ``X[int array]``, ``X[bool mask]`` are sub-streams."""
        if isinstance(idx, (int, np.integer)):
            return self.images([int(idx)])[0].reshape(-1).astype(np.float32) / np.float32(255.0)
        if hasattr(idx, "detach"):  # a torch tensor
            idx = idx.detach().cpu().numpy()
        sub = self.files[idx]
        if sub.ndim != 1:
            raise IndexError(f"streamed domain {self.name!r}: index must select rows, got {idx!r}")
        return replace(self, files=sub)

    def __array__(self, *args: Any, **kwargs: Any) -> np.ndarray:
        raise TypeError(
            f"domain {self.name!r} is streamed from {len(self)} image files and is not an in-memory array; "
            "iterate it with dabench.training.TensorBatches and predict with dabench.training.TorchPredictor "
            "(a method that needs whole arrays declares requires = {'arrays'} and is skipped on streamed "
            "domains), or call X.materialize() on a small domain")

    def __repr__(self) -> str:
        return (f"ImageStream({self.name!r}, {len(self)} images under {self.root!r}, size={self.size}, "
                f"resize={self.resize}, augment={self.augment!r})")

    # ---- helpers

    def with_options(self, *, size: tuple[int, int] | None = None, augment: str | None = None) -> "ImageStream":
        """The same rows with another input ``size`` (``resize`` scaled alike) or training ``augment``."""
        new = self
        if size is not None and tuple(size) != self.size:
            size = (int(size[0]), int(size[1]))
            resize = (max(size[0], round(self.resize[0] * size[0] / self.size[0])),
                      max(size[1], round(self.resize[1] * size[1] / self.size[1])))
            new = replace(new, size=size, resize=resize)
        if augment is not None and augment != new.augment:
            new = replace(new, augment=augment)
        return new

    def path(self, row: int) -> str:
        return os.path.join(self.root, os.fsdecode(self.files[row]))

    @property
    def paths(self) -> list[str]:
        return [self.path(i) for i in range(len(self))]

    def images(self, rows: Iterable[int] | None = None) -> np.ndarray:
        """uint8 ``(k, 3, H, W)`` pixels of ``rows`` (default all) with the test
        transform, decoded in this process."""
        rows = range(len(self)) if rows is None else list(rows)
        out = np.empty((len(rows), 3, *self.size), dtype=np.uint8)
        for k, r in enumerate(rows):
            out[k] = decode(self.path(r), "test", self.size, self.resize)
        return out

    def materialize(self) -> np.ndarray:
        """All rows as an in-memory float32 ``(n, 3*H*W)`` array in [0, 1]
        (test transform): what an in-memory domain of the same images holds.
        Memory grows with the domain: for small domains and tests."""
        return (self.images().reshape(len(self), -1) / np.float32(255.0)).astype(np.float32)


# --------------------------------------------------------------------------
# decoding (runs in loader workers)
# --------------------------------------------------------------------------


def _open_rgb(path: str, draft: tuple[int, int] | None):  # -> PIL.Image.Image
    from PIL import Image

    im = Image.open(path)
    if draft is not None and im.format == "JPEG" and im.size[0] >= 2 * draft[0] and im.size[1] >= 2 * draft[1]:
        im.draft("RGB", draft)
    return im if im.mode == "RGB" else im.convert("RGB")


def random_resized_crop_box(rng: np.random.Generator, width: int, height: int,
                            scale: tuple[float, float] = CROP_SCALE,
                            ratio: tuple[float, float] = CROP_RATIO) -> tuple[int, int, int, int]:
    """``(left, top, w, h)`` of a random resized crop, sampled as torchvision's
    ``RandomResizedCrop.get_params`` does (10 tries, then a centre crop)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return left, top, w, h
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def decode(path: str, mode: str, size: tuple[int, int], resize: tuple[int, int],
           seed: int | None = None) -> np.ndarray:
    """uint8 ``(3, H, W)`` pixels of one image under transform ``mode``
    (``"test"``, ``"crop-flip"``, ``"center-flip"``; the random ones need ``seed``)."""
    from PIL import Image, UnidentifiedImageError

    H, W = size
    RH, RW = resize
    try:
        im = _open_rgb(path, (RW, RH))
        if im.size != (RW, RH):
            im = im.resize((RW, RH), Image.BICUBIC)
        rng = np.random.default_rng(seed) if mode != "test" else None
        if mode == "crop-flip":
            left, top, w, h = random_resized_crop_box(rng, RW, RH)
            im = im.resize((W, H), Image.BILINEAR, box=(left, top, left + w, top + h))
        elif (RH, RW) != (H, W):
            top, left = int(round((RH - H) / 2.0)), int(round((RW - W) / 2.0))
            im = im.crop((left, top, left + W, top + H))
        a = np.asarray(im, dtype=np.uint8)
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"{path}: cannot decode image ({type(exc).__name__}: {exc}); remove or replace the "
                        f"file (dabench refuses unreadable images rather than skipping them)") from None
    if mode != "test" and rng.random() < 0.5:
        a = a[:, ::-1]
    return a.transpose(2, 0, 1)


def decode_extract(path: str, resize: int, crop: int) -> np.ndarray:
    """The head protocol's extraction transform (shorter side to ``resize``,
    centre ``crop`` square): :func:`dabench.data.standard.decode_image`."""
    from .standard import decode_image

    return decode_image(Path(path), (resize, resize), crop=crop)


# --------------------------------------------------------------------------
# batches through a DataLoader
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class _Failed:
    """What a worker returns instead of a batch when an image cannot be decoded."""

    message: str


class _BatchDecoder:
    """A map-style dataset whose items are whole batches: ``dataset[(rows,
    seeds)]`` decodes ``rows`` of ``stream`` into one uint8 ``(b, 3, H, W)``
    tensor (one call per batch: no per-sample collation)."""

    def __init__(self, stream: ImageStream, mode: str, extract: tuple[int, int] | None = None) -> None:
        self.stream, self.mode, self.extract = stream, mode, extract

    def __getitem__(self, spec: tuple[np.ndarray, np.ndarray | None]) -> Any:
        import torch

        rows, seeds = spec
        s = self.stream
        shape = (3, self.extract[1], self.extract[1]) if self.extract else (3, *s.size)
        out = np.empty((len(rows), *shape), dtype=np.uint8)
        try:
            for k, r in enumerate(rows):
                if self.extract:
                    out[k] = decode_extract(s.path(int(r)), *self.extract)
                else:
                    out[k] = decode(s.path(int(r)), self.mode, s.size, s.resize,
                                    None if seeds is None else int(seeds[k]))
        except DataError as exc:
            return _Failed(f"domain {s.name!r}: {exc}")
        return torch.from_numpy(out), torch.from_numpy(np.asarray(rows, dtype=np.int64))

    def __len__(self) -> int:  # pragma: no cover - the sampler drives the loader
        return len(self.stream)


def loader_workers() -> int:
    """Loader worker processes per batch stream.

    ``$DABENCH_LOADER_WORKERS`` when set; else 0 in a daemonic process (which
    may not start processes: decoding then runs in the run's own process);
    else one fewer than this process's cores, at least 1 and at most 8.
    """
    env = os.environ.get(WORKERS_VAR, "").strip()
    if env:
        try:
            n = int(env)
        except ValueError:
            raise ValueError(f"{WORKERS_VAR}={env!r}: expected a non-negative integer") from None
        if n < 0:
            raise ValueError(f"{WORKERS_VAR}={env!r}: expected a non-negative integer")
        return n
    if multiprocessing.current_process().daemon:
        return 0
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    return max(1, min(8, cores - 1))


_warned_daemon = False


def _worker_init(_: int) -> None:
    import torch

    torch.set_num_threads(1)


def stream_batches(stream: ImageStream, specs: Iterable[tuple[np.ndarray, np.ndarray | None]], *,
                   mode: str = "test", device: Any = "cpu", workers: int | None = None,
                   extract: tuple[int, int] | None = None, raw: bool = False) -> Iterator[tuple[Any, Any]]:
    """Decode the batches ``specs`` (``(rows, seeds)``, seeds None for the
    test transform) of ``stream`` in loader workers and yield ``(x, rows)``
    on ``device``: ``x`` float32 ``(b, 3*H*W)`` in [0, 1], or with ``raw``
    the uint8 ``(b, 3, H, W)`` pixels left on the CPU.

    Workers: :func:`loader_workers` unless given; on CUDA the batches are
    pinned and four per worker are prefetched (two on CPU).
    """
    import torch
    from torch.utils.data import DataLoader

    global _warned_daemon
    device = torch.device(device)
    cuda = device.type == "cuda"
    n_workers = loader_workers() if workers is None else int(workers)
    if n_workers == 0 and workers is None and multiprocessing.current_process().daemon and not _warned_daemon:
        _warned_daemon = True
        log.warning("images of %r are decoded in the run's own process: a daemonic worker process cannot "
                    "start loader workers (set %s to override)", stream.name, WORKERS_VAR)
    kw: dict[str, Any] = {}
    if n_workers > 0:
        kw = {"num_workers": n_workers, "prefetch_factor": 4 if cuda else 2, "worker_init_fn": _worker_init}
    loader = DataLoader(_BatchDecoder(stream, mode, extract), batch_size=None, sampler=specs,  # type: ignore[arg-type]
                        pin_memory=cuda and not raw, **kw)
    for item in loader:
        if isinstance(item, _Failed):
            raise DataError(item.message)
        xb, rows = item
        if raw:
            yield xb, rows
            continue
        xb = xb.to(device, non_blocking=cuda)
        rows = rows.to(device, non_blocking=cuda)
        yield xb.to(torch.float32).div_(255.0).reshape(len(xb), -1), rows


def sequential_specs(n: int, batch_size: int) -> list[tuple[np.ndarray, None]]:
    """Rows ``0..n-1`` in order, in batches of ``batch_size`` (test transform)."""
    return [(np.arange(i, min(n, i + batch_size)), None) for i in range(0, n, batch_size)]


__all__ = ["AUGMENTATIONS", "ImageStream", "WORKERS_VAR", "decode", "default_resize", "is_stream",
           "loader_workers", "random_resized_crop_box", "sequential_specs", "stream_batches"]
