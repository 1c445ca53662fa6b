"""Standard domain adaptation datasets, read from their real on-disk formats
(entry point ``standard-data``).

Every domain here reads files that :mod:`dabench.data.download` fetched and
checked (``dabench data download NAME``) from the data root (``--data-root``,
``DABENCH_DATA``, or the per-user cache; see that module).  Registration
needs no data: suites naming these domains validate anywhere, and a missing
or corrupt file fails the run that needs it with a message naming the file
and the command to run.

Domains (label space in brackets), the format read, and the pairs of the
literature:

- **Digits** [``digits10``] (also pair with the embedded ``digits``/``mnist``):

  - ``mnist-full``: MNIST, the four IDX files (``*-idx3-ubyte.gz`` images,
    ``*-idx1-ubyte.gz`` labels), train then test: 70,000 × (1, 28, 28).
  - ``usps``: USPS, the LIBSVM ``usps.bz2`` / ``usps.t.bz2`` files (the copy
    torchvision reads): one ``label i:v ...`` line per digit, 256 values in
    [-1, 1] (16×16, row-major), labels 1..10 for digits 0..9; 9,298 ×
    (1, 16, 16), pixels mapped to ``(v + 1) / 2``.
  - ``svhn``: SVHN cropped digits, ``train_32x32.mat`` / ``test_32x32.mat``
    (``X`` of shape (32, 32, 3, n) uint8, ``y`` of shape (n, 1) with 10 for
    digit 0): 99,289 × (3, 32, 32).
  - ``mnistm-full``: MNIST-M as released by github.com/liyxi/mnist-m (the
    files torchvision's ``MNISTM`` reads): ``mnist_m_{train,test}.pt.tar.gz``,
    each holding a ``torch.save``'d ``(uint8 images (n, 28, 28, 3), labels)``
    pair, read with ``torch.load(weights_only=True)``: (3, 28, 28).

  Pairs: ``mnist-full:usps``, ``usps:mnist-full``, ``svhn:mnist-full``,
  ``mnist-full:mnistm-full`` (images are resized to the larger size and grey
  repeated to three channels by the host, ``feature_space = "shared"``).

- **Office-31** [``office31``]: ``domain_adaptation_images.tar.gz`` →
  ``{amazon,dslr,webcam}/images/<class>/*.jpg``; domains ``office31-amazon``,
  ``office31-dslr``, ``office31-webcam``; all 6 pairs.
- **Office-Home** [``officehome65``]: ``OfficeHomeDataset_10072016.zip`` →
  ``OfficeHomeDataset_10072016/{Art,Clipart,Product,Real World}/<class>/*.jpg``;
  domains ``officehome-art``, ``-clipart``, ``-product``, ``-realworld``;
  all 12 pairs.
- **VisDA-2017** [``visda12``]: ``train.tar`` (synthetic renderings) and
  ``validation.tar`` (real photos) → ``{train,validation}/image_list.txt``
  with one ``relative/path.jpg label`` line per image; synthetic → real.

- **Office-Caltech10 images** [``office-caltech10``]: TLlib's
  ``officecaltech.tgz`` → ``{amazon,caltech,dslr,webcam}/<class>/*.jpg``
  (10 classes); domains ``oc10-amazon``, ``oc10-caltech``, ``oc10-dslr``,
  ``oc10-webcam``; all 12 pairs.

  Office, VisDA and Office-Caltech10 images are **streamed** end to end:
  ``load`` lists the files and returns an
  :class:`~dabench.data.stream.ImageStream`; each training or prediction
  batch is decoded by loader workers (Pillow) at 3×224×224 after a 256×256
  resize (TLlib's transforms; the training augmentation is the suite's
  ``[protocol] augment``), so no domain is ever held in memory as arrays
  (VisDA's 207,000 images would take about 30 GB).  Every image dataset but
  Office-Caltech10 (which has its published SURF/DeCAF features below) is
  also offered as cached backbone features for the **head protocol**:
  ``<domain>@resnet50`` and ``<domain>@resnet101`` (2048-d, ImageNet
  weights through torchvision, extracted once per dataset × backbone ×
  preprocessing through the same loader, and cached on disk; see
  :mod:`dabench.data.features`).

- **Amazon reviews** [``sentiment2``]: the Multi-Domain Sentiment Dataset's
  ``processed_acl.tar.gz`` (Blitzer et al. 2007) →
  ``processed_acl/{books,dvd,electronics,kitchen}/{positive,negative}.review``,
  one review per line as ``feature:count ... #label#:positive``; domains
  ``amazon-books``, ``-dvd``, ``-electronics``, ``-kitchen`` (2,000 labelled
  reviews each); the 12 pairs.  Features: binary presence of the 5,000
  unigrams/bigrams with the highest document frequency over the labelled
  reviews of all four domains (no labels used), the dimensionality of the
  mSDA preprocessing (Chen et al. 2012) that DANN (Ganin et al. 2016, 5.1.3)
  used; the exact mSDA vocabulary file is not published with the raw data.
- **Office-Caltech10** [``office-caltech10``]: SURF (800-d bag of words,
  ``*_SURF_L10.mat``: ``fts``, ``labels``) and DeCAF6 (4096-d,
  ``*_decaf.mat``: ``feas``, ``labels``) features of the amazon, caltech,
  dslr and webcam images of the 10 shared classes; domains
  ``oc10-<domain>-surf`` / ``oc10-<domain>-decaf``.  SURF histograms are
  normalised as in the GFK code (Gong et al. 2012: each row divided by its
  sum, then z-scored per domain); DeCAF features are used as stored.
  Heterogeneous pairs (``feature_space = "native"``) map SURF of one domain
  to DeCAF of another.

Deviations from the papers' protocols, stated once: the host splits each
domain's samples (train and test files together) with its own seeded
protocol (see :mod:`dabench.data.core`) instead of the official train/test
files, and MNIST-M samples are not tied to their MNIST base images (the
release does not document its order), so ``mnist-full:mnistm-full`` may put
an MNIST digit in source train and its MNIST-M blend in target test, as the
published MNIST→MNIST-M protocol also does for train images.
"""

from __future__ import annotations

import bz2
import collections
import functools
import gzip
import logging
import math
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from dabench import hookimpl

from .core import DataError, DomainSpec
from .download import dataset_fingerprint, require_extracted, require_file, resolve_data_root

log = logging.getLogger("dabench.data")

#: Size of raw Office images (end-to-end protocol): (C, H, W).
IMAGE_SHAPE = (3, 224, 224)
#: Feature extractors offered for the head protocol, with their output width.
FEATURE_BACKBONES = {"resnet50": 2048, "resnet101": 2048}
AMAZON_VOCAB = 5000

OFFICE31_CLASSES = (
    "back_pack", "bike", "bike_helmet", "bookcase", "bottle", "calculator", "desk_chair", "desk_lamp",
    "desktop_computer", "file_cabinet", "headphones", "keyboard", "laptop_computer", "letter_tray",
    "mobile_phone", "monitor", "mouse", "mug", "paper_notebook", "pen", "phone", "printer", "projector",
    "punchers", "ring_binder", "ruler", "scissors", "speaker", "stapler", "tape_dispenser", "trash_can",
)
OFFICEHOME_CLASSES = (
    "Alarm_Clock", "Backpack", "Batteries", "Bed", "Bike", "Bottle", "Bucket", "Calculator", "Calendar",
    "Candles", "Chair", "Clipboards", "Computer", "Couch", "Curtains", "Desk_Lamp", "Drill", "Eraser",
    "Exit_Sign", "Fan", "File_Cabinet", "Flipflops", "Flowers", "Folder", "Fork", "Glasses", "Hammer",
    "Helmet", "Kettle", "Keyboard", "Knives", "Lamp_Shade", "Laptop", "Marker", "Monitor", "Mop", "Mouse",
    "Mug", "Notebook", "Oven", "Pan", "Paper_Clip", "Pen", "Pencil", "Postit_Notes", "Printer", "Push_Pin",
    "Radio", "Refrigerator", "Ruler", "Scissors", "Screwdriver", "Shelf", "Sink", "Sneakers", "Soda",
    "Speaker", "Spoon", "TV", "Table", "Telephone", "ToothBrush", "Toys", "Trash_Can", "Webcam",
)
#: Office-Caltech10: the 10 classes Office-31 shares with Caltech-256 (Gong et al. 2012), TLlib's names.
OC10_CLASSES = ("back_pack", "bike", "calculator", "headphones", "keyboard", "laptop_computer", "monitor", "mouse",
                "mug", "projector")
VISDA_CLASSES = ("aeroplane", "bicycle", "bus", "car", "horse", "knife", "motorcycle", "person", "plant",
                 "skateboard", "train", "truck")
AMAZON_DOMAINS = ("books", "dvd", "electronics", "kitchen")
OC10_DOMAINS = {"amazon": ("amazon_SURF_L10.mat", "amazon_decaf.mat"),
                "caltech": ("Caltech10_SURF_L10.mat", "caltech_decaf.mat"),
                "dslr": ("dslr_SURF_L10.mat", "dslr_decaf.mat"),
                "webcam": ("webcam_SURF_L10.mat", "webcam_decaf.mat")}
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp"}


def _root(data_root: Path | str | None) -> Path:
    return resolve_data_root(data_root).path


# --------------------------------------------------------------------------
# digits
# --------------------------------------------------------------------------


def read_idx(path: Path) -> np.ndarray:
    """An IDX array (LeCun's MNIST format: ``0 0 type ndim``, big-endian
    uint32 dims, then the data) from a gzip-compressed file; only the unsigned
    byte type (0x08) that MNIST uses is accepted."""
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: not a readable gzip file ({type(exc).__name__}: {exc})") from exc
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] != 0x08 or not 1 <= data[3] <= 4:
        raise DataError(f"{path}: not an IDX file of unsigned bytes (header {data[:4].hex()})")
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != math.prod(dims):
        raise DataError(f"{path}: IDX header declares {dims} ({math.prod(dims)} bytes) but holds {body.size}")
    return body.reshape(dims)


def load_mnist(data_root: Path | str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """MNIST train + test from the IDX files: (70000, 1, 28, 28) in [0, 1]."""
    xs, ys = [], []
    for prefix in ("train", "t10k"):
        x = read_idx(require_file("mnist", f"{prefix}-images-idx3-ubyte.gz", data_root))
        y = read_idx(require_file("mnist", f"{prefix}-labels-idx1-ubyte.gz", data_root))
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise DataError(f"MNIST {prefix} files: images {x.shape} and labels {y.shape} do not match")
        xs.append(x)
        ys.append(y)
    X = np.concatenate(xs).astype(np.float32)[:, None] / 255.0
    return X, np.concatenate(ys).astype(np.int64)


def read_libsvm_usps(path: Path, n_features: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """A bz2 LIBSVM file (``label index:value ...``, 1-based indices) as a
    dense ``(n, n_features)`` float32 array and int64 labels."""
    rows: list[np.ndarray] = []
    labels: list[int] = []
    try:
        with bz2.open(path, "rt", encoding="ascii") as f:
            for lineno, line in enumerate(f, 1):
                parts = line.split()
                if not parts:
                    continue
                row = np.zeros(n_features, dtype=np.float32)
                try:
                    labels.append(int(float(parts[0])))
                    for tok in parts[1:]:
                        i, v = tok.split(":")
                        row[int(i) - 1] = float(v)
                except (ValueError, IndexError) as exc:
                    raise DataError(f"{path}, line {lineno}: not LIBSVM `label index:value` data ({exc})") from exc
                rows.append(row)
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not a readable bzip2 text file ({type(exc).__name__}: {exc})") from exc
    if not rows:
        raise DataError(f"{path}: no samples")
    return np.stack(rows), np.asarray(labels, dtype=np.int64)


def load_usps(data_root: Path | str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """USPS train + test from the LIBSVM files: (9298, 1, 16, 16) in [0, 1]."""
    xs, ys = [], []
    for name in ("usps.bz2", "usps.t.bz2"):
        x, y = read_libsvm_usps(require_file("usps", name, data_root))
        if y.min() < 1 or y.max() > 10:
            raise DataError(f"USPS {name}: labels must be 1..10 (digit + 1), found {y.min()}..{y.max()}")
        xs.append(x)
        ys.append(y - 1)
    X = np.clip((np.concatenate(xs) + 1.0) / 2.0, 0.0, 1.0).reshape(-1, 1, 16, 16)
    return X.astype(np.float32), np.concatenate(ys)


def _loadmat(path: Path) -> dict:
    try:
        from scipy.io import loadmat
    except ImportError as exc:  # pragma: no cover - scipy comes with scikit-learn
        raise DataError(f"reading {path} needs scipy: pip install scipy") from exc
    try:
        return loadmat(path)
    except Exception as exc:  # scipy raises ValueError, TypeError, MatReadError...
        raise DataError(f"{path}: not a readable MATLAB .mat file ({type(exc).__name__}: {exc})") from exc


def load_svhn(data_root: Path | str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """SVHN train + test from the format-2 .mat files: (n, 3, 32, 32) in [0, 1]."""
    xs, ys = [], []
    for name in ("train_32x32.mat", "test_32x32.mat"):
        path = require_file("svhn", name, data_root)
        m = _loadmat(path)
        if "X" not in m or "y" not in m:
            raise DataError(f"{path}: expected variables X and y, found {sorted(k for k in m if not k.startswith('__'))}")
        x, y = np.asarray(m["X"]), np.asarray(m["y"]).reshape(-1)
        if x.ndim != 4 or x.shape[:3] != (32, 32, 3) or x.shape[3] != len(y):
            raise DataError(f"{path}: X has shape {x.shape}, expected (32, 32, 3, {len(y)})")
        xs.append(x.transpose(3, 2, 0, 1))
        ys.append(y.astype(np.int64) % 10)  # label 10 is digit 0
    return np.concatenate(xs).astype(np.float32) / 255.0, np.concatenate(ys)


def load_mnistm(data_root: Path | str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """MNIST-M (liyxi/mnist-m release) train + test: (n, 3, 28, 28) in [0, 1]."""
    import torch

    xs, ys = [], []
    for split in ("train", "test"):
        folder = require_extracted("mnistm", f"mnist_m_{split}.pt.tar.gz", data_root, probe=f"mnist_m_{split}.pt")
        path = folder / f"mnist_m_{split}.pt"
        if not path.is_file():
            raise DataError(f"{path} is missing although its archive was extracted; delete "
                            f"{folder}/.mnist_m_{split}.pt.tar.gz.extracted and run `dabench data download mnistm`")
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
            x, y = obj
            x, y = np.asarray(x.numpy() if hasattr(x, "numpy") else x), np.asarray(y.numpy() if hasattr(y, "numpy") else y)
        except Exception as exc:
            raise DataError(f"{path}: not a torch-saved (images, labels) pair ({type(exc).__name__}: {exc})") from exc
        if x.ndim != 4 or x.shape[1:] != (28, 28, 3) or x.dtype != np.uint8 or y.shape != (len(x),):
            raise DataError(f"{path}: images {x.shape} {x.dtype}, labels {y.shape}; expected uint8 (n, 28, 28, 3) and (n,)")
        xs.append(x.transpose(0, 3, 1, 2))
        ys.append(y.astype(np.int64))
    return np.concatenate(xs).astype(np.float32) / 255.0, np.concatenate(ys)


# --------------------------------------------------------------------------
# image folders and lists
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageDomain:
    """Where one image domain's files are and how they are labelled."""

    name: str
    dataset: str  # download registry name
    archive: str  # archive whose extraction holds the images
    probe: str  # glob telling that the archive was extracted by hand
    classes: tuple[str, ...]
    folder: str  # relative to <root>/<dataset>
    list_file: str | None = None  # VisDA: "relative/path label" lines
    #: other places the folder may be (archives repacked with an extra top folder)
    alternatives: tuple[str, ...] = ()

    def items(self, data_root: Path | str | None = None) -> list[tuple[Path, int]]:
        """``(image path, label)`` for every image, in a stable order."""
        root = require_extracted(self.dataset, self.archive, data_root, probe=self.probe)
        # the first candidate folder that holds the list file or a class folder
        candidates = [root / self.folder] + [root / alt for alt in self.alternatives]
        base = next((c for c in candidates if (c / self.list_file).is_file()), candidates[0]) if self.list_file \
            else next((c for c in candidates if any((c / k).is_dir() for k in self.classes)), candidates[0])
        if self.list_file:
            return _read_image_list(base, self.list_file, len(self.classes))
        return _scan_class_folders(base, self.classes, self.name)


def _scan_class_folders(base: Path, classes: Sequence[str], domain: str) -> list[tuple[Path, int]]:
    if not base.is_dir():
        raise DataError(f"domain {domain!r}: folder {base} is missing; expected {base}/<class>/*.jpg")
    found = sorted(p.name for p in base.iterdir() if p.is_dir())
    unknown = sorted(set(found) - set(classes))
    missing = sorted(set(classes) - set(found))
    if unknown or missing:
        raise DataError(f"domain {domain!r}: {base} has class folders that do not match the dataset's "
                        f"{len(classes)} classes (missing: {missing[:5]}, unexpected: {unknown[:5]})")
    items = []
    for label, c in enumerate(classes):
        files = sorted(p for p in (base / c).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        items += [(p, label) for p in files]
    if not items:
        raise DataError(f"domain {domain!r}: no images under {base}")
    return items


def _read_image_list(base: Path, list_file: str, n_classes: int) -> list[tuple[Path, int]]:
    path = base / list_file
    if not path.is_file():
        raise DataError(f"{path} is missing; expected one `relative/path.jpg label` line per image")
    items = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.rsplit(None, 1)
        try:
            label = int(parts[1])
        except (IndexError, ValueError):
            raise DataError(f"{path}, line {lineno}: expected `relative/path label`, got {line!r}") from None
        if not 0 <= label < n_classes:
            raise DataError(f"{path}, line {lineno}: label {label} outside [0, {n_classes})")
        items.append((base / parts[0], label))
    if not items:
        raise DataError(f"{path}: no images listed")
    return items


def decode_image(path: Path, size: tuple[int, int], crop: int | None = None) -> np.ndarray:
    """uint8 ``(3, H, W)`` RGB pixels of ``path``.

    Without ``crop``: resized to ``size`` = (H, W) (bilinear).  With
    ``crop``: the shorter side resized to ``size[0]`` keeping the aspect
    ratio, then the centre ``crop × crop`` square (torchvision's
    ``Resize(256) + CenterCrop(224)`` evaluation transform).
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if crop is None:
                im = im.resize((size[1], size[0]), Image.BILINEAR)
            else:
                w, h = im.size
                s = size[0] / min(w, h)
                im = im.resize((max(crop, round(w * s)), max(crop, round(h * s))), Image.BILINEAR)
                w, h = im.size
                left, top = (w - crop) // 2, (h - crop) // 2
                im = im.crop((left, top, left + crop, top + crop))
            return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1)
    except (OSError, UnidentifiedImageError) as exc:
        raise DataError(f"{path}: cannot decode image ({type(exc).__name__}: {exc})") from exc


def load_images(items: Sequence[tuple[Path, int]], shape: tuple[int, int, int] = IMAGE_SHAPE) -> tuple[np.ndarray, np.ndarray]:
    X = np.empty((len(items), *shape), dtype=np.float32)
    for i, (p, _) in enumerate(items):
        X[i] = decode_image(p, shape[1:]) / np.float32(255.0)
    return X, np.asarray([lbl for _, lbl in items], dtype=np.int64)


def image_batches(items: Sequence[tuple[Path, int]], batch: int, resize: int = 256,
                  crop: int = 224, device: str | None = None) -> Iterator[np.ndarray]:
    """uint8 ``(b, 3, crop, crop)`` batches for feature extraction (shorter
    side resized to ``resize``, centre crop), decoded in loader worker
    processes through the streamed-domain path
    (:func:`dabench.data.stream.stream_batches`), in order."""
    from .stream import ImageStream, sequential_specs, stream_batches

    if not items:
        return
    stream = ImageStream.from_paths("feature extraction", [p for p, _ in items], (crop, crop), (crop, crop))
    for xb, _ in stream_batches(stream, sequential_specs(len(items), batch), extract=(resize, crop), raw=True):
        yield xb.numpy()


IMAGE_DOMAINS: dict[str, ImageDomain] = {}
for _d in ("amazon", "dslr", "webcam"):
    IMAGE_DOMAINS[f"office31-{_d}"] = ImageDomain(
        f"office31-{_d}", "office31", "domain_adaptation_images.tar.gz", f"*{_d}/images",
        OFFICE31_CLASSES, f"{_d}/images", alternatives=(f"domain_adaptation_images/{_d}/images",))
for _d, _folder in (("art", "Art"), ("clipart", "Clipart"), ("product", "Product"), ("realworld", "Real World")):
    IMAGE_DOMAINS[f"officehome-{_d}"] = ImageDomain(
        f"officehome-{_d}", "officehome", "OfficeHomeDataset_10072016.zip", "OfficeHomeDataset_10072016/*",
        OFFICEHOME_CLASSES, f"OfficeHomeDataset_10072016/{_folder}")
IMAGE_DOMAINS["visda-synthetic"] = ImageDomain("visda-synthetic", "visda2017", "train.tar", "train/image_list.txt",
                                               VISDA_CLASSES, "train", "image_list.txt")
IMAGE_DOMAINS["visda-real"] = ImageDomain("visda-real", "visda2017", "validation.tar", "validation/image_list.txt",
                                          VISDA_CLASSES, "validation", "image_list.txt")
for _d in ("amazon", "caltech", "dslr", "webcam"):
    IMAGE_DOMAINS[f"oc10-{_d}"] = ImageDomain(
        f"oc10-{_d}", "office-caltech10-images", "officecaltech.tgz", f"{_d}/*", OC10_CLASSES, _d,
        alternatives=(f"{_d}/images", f"office_caltech_10/{_d}", f"officecaltech/{_d}"))
#: Image domains offered end to end (streamed: decoded per batch, never held in memory).
RAW_IMAGE_DOMAINS = tuple(IMAGE_DOMAINS)
#: The label space of each image dataset.
IMAGE_LABEL_SPACES = {"office31": "office31", "officehome": "officehome65", "visda2017": "visda12",
                      "office-caltech10-images": "office-caltech10"}


@dataclass(frozen=True)
class StreamedImageLoader:
    """Loads a standard image domain end to end as an
    :class:`~dabench.data.stream.ImageStream` (decoded lazily, per batch, at
    ``IMAGE_SHAPE`` after a 256x256 resize: TLlib's transforms)."""

    domain: ImageDomain

    def __call__(self, data_root: Path | None = None) -> tuple[object, np.ndarray]:
        from .stream import ImageStream

        items = self.domain.items(data_root)
        stream = ImageStream.from_paths(self.domain.name, [p for p, _ in items], IMAGE_SHAPE[1:])
        return stream, np.asarray([lbl for _, lbl in items], dtype=np.int64)


def _raw_loader(domain: ImageDomain) -> StreamedImageLoader:
    return StreamedImageLoader(domain)


def _feature_loader(domain: ImageDomain, backbone: str) -> Callable[[Path | None], tuple[np.ndarray, np.ndarray]]:
    def load(data_root: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
        from ..image_backbones import get_feature_extractor
        from .features import cached_features

        items = domain.items(data_root)
        extra = {"dataset_sha256": dataset_fingerprint(domain.dataset, data_root)}
        return cached_features(domain.name, items, get_feature_extractor(backbone), _root(data_root) / "features",
                               extra)

    return load


# --------------------------------------------------------------------------
# Amazon reviews (processed_acl)
# --------------------------------------------------------------------------


def parse_review_line(line: str) -> tuple[dict[str, int], str]:
    """``feature:count ... #label#:positive`` -> (counts, label)."""
    feats: dict[str, int] = {}
    label = ""
    for tok in line.split():
        key, _, val = tok.rpartition(":")
        if key == "#label#":
            label = val
        elif key:
            feats[key] = int(val)
    return feats, label


@functools.lru_cache(maxsize=2)
def _amazon_docs(folder: str) -> dict[str, tuple[list[frozenset[str]], np.ndarray]]:
    out = {}
    for dom in AMAZON_DOMAINS:
        docs, labels = [], []
        for fname, want in (("positive.review", "positive"), ("negative.review", "negative")):
            path = Path(folder) / "processed_acl" / dom / fname
            if not path.is_file():
                raise DataError(f"{path} is missing; expected processed_acl/<domain>/{fname} "
                                f"(run `dabench data download amazon`)")
            for lineno, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    feats, label = parse_review_line(line)
                except ValueError:
                    raise DataError(f"{path}, line {lineno}: not `feature:count ... #label#:{want}`") from None
                if label != want:
                    raise DataError(f"{path}, line {lineno}: label {label!r} in the {want} file")
                docs.append(frozenset(feats))
                labels.append(1 if want == "positive" else 0)
        out[dom] = (docs, np.asarray(labels, dtype=np.int64))
    return out


def amazon_vocabulary(docs_by_domain: dict[str, tuple[list[frozenset[str]], np.ndarray]],
                      size: int = AMAZON_VOCAB) -> list[str]:
    """The ``size`` features with the highest document frequency over all
    domains' labelled reviews (ties by name); labels are not used."""
    df: collections.Counter[str] = collections.Counter()
    for docs, _ in docs_by_domain.values():
        for d in docs:
            df.update(d)
    return [w for w, _ in sorted(df.items(), key=lambda kv: (-kv[1], kv[0]))[:size]]


def load_amazon(domain: str, data_root: Path | str | None = None) -> tuple[np.ndarray, np.ndarray]:
    folder = require_extracted("amazon", "processed_acl.tar.gz", data_root, probe="processed_acl/books")
    by_dom = _amazon_docs(str(folder))
    vocab = amazon_vocabulary(by_dom, AMAZON_VOCAB)
    index = {w: i for i, w in enumerate(vocab)}
    docs, y = by_dom[domain]
    X = np.zeros((len(docs), AMAZON_VOCAB), dtype=np.float32)
    for r, d in enumerate(docs):
        cols = [index[w] for w in d if w in index]
        X[r, cols] = 1.0
    return X, y


# --------------------------------------------------------------------------
# Office-Caltech10 SURF / DeCAF
# --------------------------------------------------------------------------


def load_oc10(domain: str, kind: str, data_root: Path | str | None = None) -> tuple[np.ndarray, np.ndarray]:
    fname = OC10_DOMAINS[domain][0 if kind == "surf" else 1]
    path = require_file("office-caltech10", fname, data_root)
    m = _loadmat(path)
    key = "fts" if kind == "surf" else "feas"
    if key not in m or "labels" not in m:
        raise DataError(f"{path}: expected variables {key!r} and 'labels', found "
                        f"{sorted(k for k in m if not k.startswith('__'))}")
    X = np.asarray(m[key], dtype=np.float64)
    y = np.asarray(m["labels"]).reshape(-1).astype(np.int64) - 1
    dim = 800 if kind == "surf" else 4096
    if X.ndim != 2 or X.shape != (len(y), dim):
        raise DataError(f"{path}: {key} has shape {X.shape}, expected ({len(y)}, {dim})")
    if kind == "surf":  # GFK's normalisation: row sums to 1, then z-score per feature (population sd)
        X = X / np.maximum(X.sum(1, keepdims=True), 1e-12)
        sd = X.std(0)
        X = (X - X.mean(0)) / np.where(sd > 0, sd, 1.0)
    return X.astype(np.float32), y


# --------------------------------------------------------------------------
# registration
# --------------------------------------------------------------------------


def domains() -> list[DomainSpec]:
    """Every standard domain (no data needed)."""
    out = [
        DomainSpec("mnist-full", "digits10", 10, (1, 28, 28), load_mnist,
                   description="MNIST, 70,000 digits (IDX files; `dabench data download mnist`)",
                   source="LeCun, Cortes, Burges; CC BY-SA 3.0"),
        DomainSpec("usps", "digits10", 10, (1, 16, 16), load_usps,
                   description="USPS, 9,298 digits 16x16 (LIBSVM bz2; `dabench data download usps`)",
                   source="Hull 1994; LIBSVM data page"),
        DomainSpec("svhn", "digits10", 10, (3, 32, 32), load_svhn,
                   description="SVHN cropped digits, 99,289 (format-2 .mat; `dabench data download svhn`)",
                   source="Netzer et al. 2011; non-commercial"),
        DomainSpec("mnistm-full", "digits10", 10, (3, 28, 28), load_mnistm,
                   description="MNIST-M (liyxi/mnist-m release; `dabench data download mnistm`)",
                   source="Ganin & Lempitsky 2015"),
    ]
    for name, dom in IMAGE_DOMAINS.items():
        label_space = IMAGE_LABEL_SPACES[dom.dataset]
        if name in RAW_IMAGE_DOMAINS:
            out.append(DomainSpec(name, label_space, len(dom.classes), IMAGE_SHAPE, _raw_loader(dom),
                                  description=f"{name} images, streamed at 224x224 (end-to-end; "
                                              f"`dabench data download {dom.dataset}`)",
                                  source=dom.dataset, streamed=True, classes=dom.classes))
        if dom.dataset == "office-caltech10-images":
            continue  # the SURF/DeCAF features below are the published Office-Caltech10 features
        for bb, dim in FEATURE_BACKBONES.items():
            out.append(DomainSpec(f"{name}@{bb}", label_space, len(dom.classes), (dim,), _feature_loader(dom, bb),
                                  description=f"{name} {bb} ImageNet features (head protocol, cached on disk)",
                                  source=dom.dataset, features=bb))
    for d in AMAZON_DOMAINS:
        out.append(DomainSpec(f"amazon-{d}", "sentiment2", 2, (AMAZON_VOCAB,), functools.partial(_amazon_load, d),
                              description=f"Amazon {d} reviews, 2,000, 5,000 binary uni/bigram features",
                              source="Blitzer et al. 2007 (processed_acl)"))
    for d in OC10_DOMAINS:
        for kind, dim in (("surf", 800), ("decaf", 4096)):
            out.append(DomainSpec(f"oc10-{d}-{kind}", "office-caltech10", 10, (dim,),
                                  functools.partial(_oc10_load, d, kind),
                                  description=f"Office-Caltech10 {d}, {kind.upper()} features ({dim}-d)",
                                  source="Gong et al. 2012; Donahue et al. 2014"))
    return out


def _amazon_load(domain: str, data_root: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    return load_amazon(domain, data_root)


def _oc10_load(domain: str, kind: str, data_root: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    return load_oc10(domain, kind, data_root)


@hookimpl
def dabench_datasets(register: Callable[[DomainSpec], None]) -> None:
    """Register the standard domains (their data is loaded only when a run needs it)."""
    for spec in domains():
        register(spec)


__all__ = ["IMAGE_DOMAINS", "ImageDomain", "dabench_datasets", "decode_image", "domains", "image_batches",
           "load_amazon", "load_mnist", "load_mnistm", "load_oc10", "load_svhn", "load_usps", "read_idx",
           "read_libsvm_usps"]
