"""Domains, pairs and the split protocol.

A *domain* is a labelled dataset registered by a plugin (:class:`DomainSpec`).
A *pair* ``"source:target"`` is two domains with the same label space.  The
host splits a pair, per seed, into

- source train / source val / source test (stratified 60 / 20 / 20),
- target train (given to the method without labels) / target test (kept by
  the host; 50 / 50, stratified),

and optionally draws ``k`` labelled target samples per class from the target
*train* split.  When source and target derive from the same base images
(MNIST and MNIST-M), the two domains get disjoint halves of the base so no
image appears on both sides.

Pairs with different input shapes are made homogeneous for methods that need
one input space (``feature_space = "shared"``, the default): images are
resized (bilinear, antialiased) to the larger height/width and grey images
repeated to the larger channel count.  ``feature_space = "native"`` keeps
each domain's own space (heterogeneous DA).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..contract import Budget, Labeled, Task, Unlabeled


class DataError(RuntimeError):
    """Data is missing, corrupt or incompatible; the message says what to do."""


@dataclass(frozen=True)
class DomainSpec:
    """A domain a plugin registers through ``dabench_datasets``.

    ``load(data_root)`` returns ``(X, y)``: ``X`` float32 of shape
    ``(n, *shape)`` (images scaled to [0, 1], channels first), ``y`` int64 in
    ``[0, n_classes)``; for a ``streamed`` domain ``X`` is an
    :class:`~dabench.data.stream.ImageStream` over the image files
    (``shape`` is then its ``(3, H, W)`` network input).  ``base`` names the dataset the samples derive from
    (``"mnist"`` for MNIST-M) so pairs sharing a base get disjoint samples;
    a derived domain must have as many samples as its base, sample ``i``
    derived from base sample ``i``.
    """

    name: str
    label_space: str
    n_classes: int
    shape: tuple[int, ...]
    load: Callable[[Path | None], tuple[np.ndarray, np.ndarray]] = field(repr=False, compare=False)
    base: str | None = None
    description: str = ""
    source: str = ""  # provenance / licence, one line
    #: the frozen backbone whose cached features this domain holds (e.g.
    #: ``"resnet50"``), or None for raw inputs; such domains may only be used
    #: under the ``"head"`` training protocol (see :class:`Protocol`)
    features: str | None = None
    #: a digest of the domain's data (e.g. ``"sha256:..."`` of a suite's npz
    #: file) that enters the run key of every run using the domain, so edited
    #: data is computed again; None for data that is fixed by its name
    #: (embedded and checksummed standard datasets)
    fingerprint: str | None = None
    #: images decoded lazily from files (``load`` returns an ImageStream)
    streamed: bool = False
    #: the class names of labels 0..n_classes-1 when known (image folders,
    #: the standard datasets); a pair's two domains must agree on them
    classes: tuple[str, ...] | None = None

    @property
    def is_image(self) -> bool:
        return len(self.shape) == 3


@dataclass(frozen=True)
class Protocol:
    """How a pair is split and what the method receives (from the suite)."""

    k_target: int = 0
    feature_space: str = "shared"  # "shared" (homogenise) or "native"
    max_source: int | None = None  # cap on source samples before splitting
    max_target: int | None = None  # cap on target samples before splitting
    #: "end-to-end": methods train their backbone on the domains' inputs;
    #: "head": the domains hold frozen-backbone features extracted once and
    #: cached on disk (``<domain>@resnet50``), and methods adapt a head on them
    training: str = "end-to-end"
    #: input standardisation of *vector* domains (images are left in [0, 1];
    #: the image backbones rescale them): ``"source"`` (default) fits each
    #: feature's mean and standard deviation on the source train split and
    #: applies them to both domains (on a heterogeneous, ``native`` pair the
    #: target domain is standardised with its own *unlabelled* train split);
    #: ``"none"`` leaves inputs as loaded.  No target labels are used.
    standardize: str = "source"
    #: how the smaller images of a pair reach the shared shape (``"shared"``
    #: feature space): ``"bilinear"`` (default) rescales them; ``"pad"``
    #: zero-pads them, centred, at their own scale (e.g. MNIST 28x28 -> 32x32
    #: for MNIST-M, whose 32x32 images hold the 28x28 digit padded by 2).
    #: Grey images are repeated to the larger channel count either way.
    resize: str = "bilinear"
    #: training augmentation of *streamed image* domains, applied per batch
    #: (``dabench.data.stream.AUGMENTATIONS``): "none", "crop-flip" (random
    #: resized crop + horizontal flip, TLlib's Office recipe) or
    #: "center-flip" (centre crop + flip, TLlib's VisDA recipe); predictions
    #: always use the deterministic test transform
    augment: str = "none"
    #: mixed precision on CUDA: bf16 autocast around training and prediction
    #: (and channels-last convolutions); no effect on CPU
    amp: bool = False

    def as_dict(self) -> dict:
        """The protocol as stored with each run (part of the run key).

        ``training`` appears only when it is not the default
        ``"end-to-end"``, so run keys of suites written before the field
        existed do not change; its absence means end to end."""
        d = {
            "k_target": self.k_target,
            "feature_space": self.feature_space,
            "max_source": self.max_source,
            "max_target": self.max_target,
        }
        if self.training != "end-to-end":
            d["training"] = self.training
        d["standardize"] = self.standardize
        if self.resize != "bilinear":
            d["resize"] = self.resize
        # like ``training``: only when set, so older run keys stay valid
        if self.augment != "none":
            d["augment"] = self.augment
        if self.amp:
            d["amp"] = True
        return d


@dataclass(frozen=True)
class PairSplit:
    """The host's view of one pair for one seed, target test labels included."""

    name: str
    source_train: Labeled
    source_val: Labeled
    source_test: Labeled
    target_train: Labeled
    target_test: Labeled
    target_labeled: Labeled | None
    source_shape: tuple[int, ...]
    target_shape: tuple[int, ...]
    n_classes: int

    @property
    def same_feature_space(self) -> bool:
        return self.source_shape == self.target_shape

    def task(
        self,
        *,
        seed: int,
        device: str,
        budget: Budget,
        backbone: Callable,
        oracle: bool = False,
    ) -> Task:
        """The :class:`Task` a method sees.  ``oracle`` adds target *train*
        labels (for the target-oracle reference only); target test data is
        never part of a Task."""
        return Task(
            source_train=self.source_train,
            source_val=self.source_val,
            target_train=Unlabeled(self.target_train.X),
            target_labeled=self.target_labeled,
            source_shape=self.source_shape,
            target_shape=self.target_shape,
            same_feature_space=self.same_feature_space,
            n_classes=self.n_classes,
            device=device,
            seed=seed,
            budget=budget,
            backbone=backbone,
            target_train_labels=np.array(self.target_train.y) if oracle else None,
        )


def _stratified_parts(y: np.ndarray, fractions: list[float], rng: np.random.Generator) -> list[np.ndarray]:
    """Split indices of ``y`` into parts with the given fractions, per class."""
    parts: list[list[np.ndarray]] = [[] for _ in fractions]
    cum = np.cumsum(fractions)
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        idx = idx[rng.permutation(len(idx))]
        cuts = np.round(cum[:-1] * len(idx)).astype(int)
        for i, chunk in enumerate(np.split(idx, cuts)):
            parts[i].append(chunk)
    return [np.sort(np.concatenate(p)) if p else np.array([], dtype=int) for p in parts]


def _moments(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and standard deviation (float32) for standardisation;
    a constant feature gets a standard deviation of 1 (as scikit-learn's
    ``StandardScaler``), so it maps to 0 instead of dividing by 0."""
    mean = X.mean(0, dtype=np.float64)
    std = X.std(0, dtype=np.float64)
    std[std < 1e-12] = 1.0
    return mean.astype(np.float32), std.astype(np.float32)


def _cap(n: int, cap: int | None, rng: np.random.Generator) -> np.ndarray:
    idx = np.arange(n)
    if cap is not None and n > cap:
        idx = np.sort(rng.choice(n, size=cap, replace=False))
    return idx


def resize_images(X: np.ndarray, shape: tuple[int, int, int], mode: str = "bilinear") -> np.ndarray:
    """Resize ``(n, c, h, w)`` images to ``shape`` = (C, H, W): bilinear
    (antialiased when shrinking), or with ``mode="pad"`` zero-padded, centred
    (never shrunk: a larger image is an error), and grey-to-colour by channel
    repetition."""
    import torch
    import torch.nn.functional as F

    C, H, W = shape
    n, c, h, w = X.shape
    if c not in (1, C):
        raise DataError(f"cannot map {c}-channel images to {C} channels")
    out = torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32))
    if (h, w) != (H, W) and mode == "pad":
        if h > H or w > W:
            raise DataError(f"cannot pad {h}x{w} images to {H}x{W}: they are larger")
        top, left = (H - h) // 2, (W - w) // 2
        out = F.pad(out, (left, W - w - left, top, H - h - top))
    elif (h, w) != (H, W):
        out = F.interpolate(out, size=(H, W), mode="bilinear", align_corners=False, antialias=(H < h or W < w))
    if c != C:
        out = out.repeat(1, C, 1, 1)
    return out.clamp_(0.0, 1.0).numpy()


def common_shape(a: tuple[int, ...], b: tuple[int, ...], where: str) -> tuple[int, ...]:
    """The shape both domains are mapped to in the shared feature space."""
    if a == b:
        return a
    if len(a) == 3 and len(b) == 3:
        return (max(a[0], b[0]), max(a[1], b[1]), max(a[2], b[2]))
    raise DataError(
        f"{where}: domains have shapes {a} and {b} that cannot be made homogeneous; "
        f'set feature_space = "native" for a heterogeneous pair'
    )


def check_domain_arrays(spec: DomainSpec, X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate what a dataset plugin's ``load`` returned; DataError names the dataset."""
    from .stream import is_stream

    if spec.streamed != is_stream(X):
        raise DataError(f"dataset {spec.name!r}: load() returned {'an ImageStream' if is_stream(X) else 'arrays'} "
                        f"but the domain is declared streamed={spec.streamed}")
    if is_stream(X):
        y = np.asarray(y)
        if tuple(X.item_shape) != tuple(spec.shape):
            raise DataError(f"dataset {spec.name!r}: load() returned images of shape {X.item_shape}, "
                            f"declared {tuple(spec.shape)}")
        if y.shape != (len(X),):
            raise DataError(f"dataset {spec.name!r}: load() returned {len(X)} images but labels of shape {y.shape}")
        if not np.issubdtype(y.dtype, np.integer) or (len(y) and (y.min() < 0 or y.max() >= spec.n_classes)):
            raise DataError(f"dataset {spec.name!r}: labels must be integers in [0, {spec.n_classes})")
        return X, y.astype(np.int64)
    X = np.asarray(X, dtype=np.float32)
    y = np.asarray(y)
    if X.shape[1:] != tuple(spec.shape):
        raise DataError(f"dataset {spec.name!r}: load() returned inputs of shape {X.shape[1:]}, declared {tuple(spec.shape)}")
    if y.shape != (len(X),):
        raise DataError(f"dataset {spec.name!r}: load() returned {len(X)} inputs but labels of shape {y.shape}")
    if not np.issubdtype(y.dtype, np.integer) or (len(y) and (y.min() < 0 or y.max() >= spec.n_classes)):
        raise DataError(f"dataset {spec.name!r}: labels must be integers in [0, {spec.n_classes})")
    if not np.isfinite(X).all():
        raise DataError(f"dataset {spec.name!r}: load() returned non-finite inputs")
    return X, y.astype(np.int64)


def make_split(
    name: str,
    source: DomainSpec,
    target: DomainSpec,
    src_data: tuple[np.ndarray, np.ndarray],
    tgt_data: tuple[np.ndarray, np.ndarray],
    seed: int,
    protocol: Protocol,
) -> PairSplit:
    """Split one pair for one seed (deterministic in ``seed``)."""
    if source.label_space != target.label_space or source.n_classes != target.n_classes:
        raise DataError(
            f"pair {name!r}: {source.name!r} has label space {source.label_space!r} "
            f"({source.n_classes} classes) but {target.name!r} has {target.label_space!r} "
            f"({target.n_classes} classes); a pair needs one label space"
        )
    from .stream import is_stream

    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xDA]))
    Xs, ys = src_data
    Xt, yt = tgt_data
    streamed = is_stream(Xs)
    if streamed != is_stream(Xt):
        raise DataError(f"pair {name!r}: one domain is streamed from image files and the other is in-memory "
                        f"arrays; pair streamed image domains with each other")
    s_idx = np.arange(len(ys))
    t_idx = np.arange(len(yt))
    if (source.base or source.name) == (target.base or target.name):
        # one base (MNIST and MNIST-M, or a domain paired with itself): sample
        # i of each side derives from base sample i, so disjoint halves of
        # the index range keep every base image on one side only
        if len(ys) != len(yt):
            raise DataError(
                f"pair {name!r}: {source.name!r} and {target.name!r} share the base "
                f"{source.base or source.name!r} but have {len(ys)} and {len(yt)} samples; "
                f"a derived domain must keep sample i derived from base sample i"
            )
        perm = rng.permutation(len(ys))
        s_idx, t_idx = np.sort(perm[: len(perm) // 2]), np.sort(perm[len(perm) // 2 :])
    s_idx = s_idx[_cap(len(s_idx), protocol.max_source, rng)]
    t_idx = t_idx[_cap(len(t_idx), protocol.max_target, rng)]
    Xs, ys, Xt, yt = Xs[s_idx], ys[s_idx], Xt[t_idx], yt[t_idx]

    s_shape, t_shape = tuple(source.shape), tuple(target.shape)
    if protocol.feature_space == "shared" and s_shape != t_shape:
        shape = common_shape(s_shape, t_shape, f"pair {name!r}")
        if streamed:  # decoded at the common size: nothing to resize here
            Xs, Xt = Xs.with_options(size=shape[1:]), Xt.with_options(size=shape[1:])
        else:
            if s_shape != shape:
                Xs = resize_images(Xs, shape, protocol.resize)
            if t_shape != shape:
                Xt = resize_images(Xt, shape, protocol.resize)
        s_shape = t_shape = shape

    if streamed:  # rows are flattened images already; the protocol picks the training transform
        Xs, Xt = Xs.with_options(augment=protocol.augment), Xt.with_options(augment=protocol.augment)
    else:
        Xs = Xs.reshape(len(Xs), -1)
        Xt = Xt.reshape(len(Xt), -1)
    s_tr, s_va, s_te = _stratified_parts(ys, [0.6, 0.2, 0.2], rng)
    t_tr, t_te = _stratified_parts(yt, [0.5, 0.5], rng)
    if protocol.standardize == "source":
        if len(s_shape) == 1:
            mean, std = _moments(Xs[s_tr])
            Xs = (Xs - mean) / std
            if len(t_shape) == 1 and s_shape == t_shape:
                Xt = (Xt - mean) / std
        if len(t_shape) == 1 and s_shape != t_shape:
            mean, std = _moments(Xt[t_tr])
            Xt = (Xt - mean) / std

    target_labeled = None
    if protocol.k_target > 0:
        picks = []
        for c in range(target.n_classes):
            idx = t_tr[yt[t_tr] == c]
            if len(idx) < protocol.k_target:
                raise DataError(f"pair {name!r}: class {c} has only {len(idx)} target train samples, k_target = {protocol.k_target}")
            picks.append(rng.choice(idx, size=protocol.k_target, replace=False))
        kl = np.sort(np.concatenate(picks))
        target_labeled = Labeled(Xt[kl], yt[kl])

    return PairSplit(
        name=name,
        source_train=Labeled(Xs[s_tr], ys[s_tr]),
        source_val=Labeled(Xs[s_va], ys[s_va]),
        source_test=Labeled(Xs[s_te], ys[s_te]),
        target_train=Labeled(Xt[t_tr], yt[t_tr]),
        target_test=Labeled(Xt[t_te], yt[t_te]),
        target_labeled=target_labeled,
        source_shape=s_shape,
        target_shape=t_shape,
        n_classes=source.n_classes,
    )
