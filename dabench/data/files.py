"""Domains from a user's own files, declared in a suite (no plugin needed).

A suite may declare domains in ``[domains.NAME]`` tables and use ``NAME`` in
its pairs like any registered dataset::

    [domains.usps-real]
    path = "usps.npz"          # relative: --data-root ($DABENCH_DATA), then the suite's folder
    format = "npz"
    label_space = "digits10"   # pairs need one label space; n_classes comes from a
                               # registered domain with this label space, else `n_classes`
    # optional:
    n_classes = 10
    x = "X"                    # array names in the file
    y = "y"
    scale = 255.0              # inputs are divided by it (default: 255 for uint8, else 1)
    base = "mnist-test"        # domains derived from one base get disjoint samples
    description = "..."

``format = "npz"``: a NumPy ``.npz`` archive (loaded with
``allow_pickle=False``) holding inputs ``x`` of shape ``(n, C, H, W)``
(images, channels first), ``(n, H, W)`` (grey images: one channel is
added) or ``(n, d)`` (vectors), uint8 or float, and integer labels ``y`` of
shape ``(n,)`` in ``[0, n_classes)``.  Images are expected in ``[0, 1]``
after scaling (the image backbones rescale them); a warning says when they
are not.

Everything that can be checked without the target labels' meaning is
checked when the suite is read (file readable, array names, shapes, dtypes,
label range), with an error naming the suite file, the key and what to do;
non-finite inputs are found when the arrays are loaded for a run.  A file
that is not there when the suite is read is *missing data*: its pairs are
reported once and not run (like a standard dataset that was not
downloaded), the rest of the suite runs.

The file's sha256 is the domain's *fingerprint*, part of every run key that
uses the domain: edit the file and its runs are computed again instead of
being taken from the store.

``format = "imagefolder"``: a **streamed** image domain (see
:mod:`dabench.data.stream`; never held in memory)::

    [domains.studio]
    path = "photos/studio"     # <class>/<image> sub-folders (torchvision's ImageFolder layout)
    format = "imagefolder"
    label_space = "animals"
    size = [224, 224]          # the network's input (required)
    # optional:
    resize = [256, 256]        # resized to this, then cropped to size (default size x 256/224)
    list = "images.txt"        # instead of class folders: `relative/path label` lines
    classes = ["cat", "dog"]   # names and order of the classes (default: sorted folder names)

Class folder names are the classes (a label space registered with names,
such as ``office31``, imposes its names and order); images may sit at any
depth below their class folder; hidden files and other suffixes are
ignored.  The fingerprint hashes every image's relative path, size,
modification time and label (``stat`` only, no reads) with the options;
loading lists the folder again and refuses a folder that changed since the
suite was read.  **Unreadable images are refused, not skipped**: loading
reads every image's header and raises one DataError counting the images
Pillow cannot identify and naming the first ones (a pair reported like
missing data); an image that fails to decode during training does the same.

``format = "csv"`` / ``"parquet"`` (Parquet needs pyarrow): a table with one
row per sample::

    [domains.lab]
    path = "sensors/lab.csv"
    format = "csv"
    label_space = "grades"
    label = "grade"            # the label column (default "label")
    # optional:
    features = ["t0", "t1"]    # the feature columns (default: every other column)
    classes = ["low", "high"]  # names of named labels, in label order
    sep = ";"                  # CSV only

Features must be numeric and finite; labels are integers in ``[0,
n_classes)`` or class names (mapped through ``classes``, the label space's
registered names, or their sorted distinct values).  Errors name the key,
the column and the row.  The fingerprint is the file's sha256 plus the
options.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .core import DataError, DomainSpec

log = logging.getLogger("dabench")

#: The formats a ``[domains.NAME]`` table may name, with the parser of each.
FORMATS: dict[str, Callable[..., DomainSpec]] = {}

_COMMON_KEYS = {"path", "format", "label_space", "n_classes", "base", "description"}


class DomainTableError(ValueError):
    """A malformed ``[domains.NAME]`` table: ``key`` is relative to the table."""

    def __init__(self, key: str, message: str) -> None:
        self.key, self.message = key, message
        super().__init__(f"{key}: {message}" if key else message)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def resolve_path(raw: str, suite_dir: Path, data_root: Path | None) -> tuple[Path | None, list[Path]]:
    """``(found, tried)``: an absolute path is taken as is; a relative one is
    looked up under ``data_root`` first, then ``suite_dir``."""
    p = Path(raw).expanduser()
    tried = [p] if p.is_absolute() else [d / p for d in (data_root, suite_dir) if d is not None]
    for t in tried:
        if t.exists():
            return t.resolve(), tried
    return None, tried


def _missing_loader_message(name: str, raw: str, tried: list[Path]) -> str:
    where = ", ".join(str(t) for t in tried)
    return (f"domain {name!r}: file {raw!r} not found (looked in: {where}); put the file there, or "
            f"pass --data-root DIR with DIR holding it (relative paths resolve against --data-root / "
            f"$DABENCH_DATA, then the suite's folder)")


@dataclass(frozen=True)
class MissingFile:
    """The loader of a domain whose file was not found: raises DataError
    (missing data: its pairs are reported, not run)."""

    message: str

    def __call__(self, data_root: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
        raise DataError(self.message)


# ---------------------------------------------------------------------- npz


def _npz_header(path: Path, member: str) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of one array of an ``.npz`` without reading its data."""
    with zipfile.ZipFile(path) as zf:
        with zf.open(member + ".npy") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(f)
            else:
                shape, _, dtype = np.lib.format.read_array_header_2_0(f)
    return tuple(int(s) for s in shape), np.dtype(dtype)


@dataclass(frozen=True)
class NpzLoader:
    """Loads ``(X, y)`` from an ``.npz`` file: X float32 scaled by ``1/scale``
    and reshaped to ``shape`` per sample, y int64.  Picklable (worker
    processes get it with the run)."""

    name: str
    path: str
    x: str
    y: str
    scale: float
    shape: tuple[int, ...]

    def __call__(self, data_root: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
        try:
            with np.load(self.path, allow_pickle=False) as z:
                X = z[self.x]
                y = z[self.y]
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
            raise DataError(f"domain {self.name!r}: cannot read {self.path}: {exc}") from None
        X = np.asarray(X, dtype=np.float32).reshape(len(X), *self.shape)
        if self.scale != 1.0:
            X = X / np.float32(self.scale)
        bad = ~np.isfinite(X)
        if bad.any():
            rows = np.flatnonzero(bad.reshape(len(X), -1).any(1))
            raise DataError(f"domain {self.name!r}: {self.path} array {self.x!r} has non-finite values (NaN/inf) "
                            f"in {len(rows)} sample(s), e.g. row {int(rows[0])}; remove or impute them")
        return X, np.asarray(y).astype(np.int64)


def _npz_domain(name: str, table: dict, found: Path | None, raw_path: str, tried: list[Path],
                label_space: str, n_classes: int | None, common: dict,
                registered: dict[str, DomainSpec] | None = None) -> DomainSpec:
    allowed = _COMMON_KEYS | {"x", "y", "scale"}
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise DomainTableError(unknown[0], f"unknown key for format \"npz\"; allowed keys: {sorted(allowed)}")
    xk = _str(table, "x", "X")
    yk = _str(table, "y", "y")
    scale_raw = table.get("scale")
    if scale_raw is not None and (isinstance(scale_raw, bool) or not isinstance(scale_raw, (int, float))
                                  or not math.isfinite(scale_raw) or scale_raw <= 0):
        raise DomainTableError("scale", f"expected a positive number (inputs are divided by it), got {scale_raw!r}")
    if found is None:
        if n_classes is None:
            raise DomainTableError("n_classes", f"label space {label_space!r} is not used by a registered "
                                                "dataset and the file is absent: set n_classes")
        return DomainSpec(name, label_space, n_classes, (), MissingFile(
            _missing_loader_message(name, raw_path, tried)), **common)
    try:
        with zipfile.ZipFile(found) as zf:
            members = {m[:-4] for m in zf.namelist() if m.endswith(".npy")}
    except (OSError, zipfile.BadZipFile) as exc:
        raise DomainTableError("path", f"{found} is not a readable .npz archive ({exc}); "
                                       f"write it with numpy.savez / savez_compressed") from None
    for key, member in (("x", xk), ("y", yk)):
        if member not in members:
            raise DomainTableError(key, f"{found} has no array {member!r}; it has {sorted(members)} "
                                        f"(set {key} = \"NAME\" to use another)")
    try:
        x_shape, x_dtype = _npz_header(found, xk)
        y_shape, y_dtype = _npz_header(found, yk)
    except (OSError, ValueError) as exc:
        raise DomainTableError("path", f"{found}: cannot read the array headers ({exc})") from None
    if x_dtype.kind not in "uif" or x_dtype.kind == "b":
        raise DomainTableError("x", f"{found} array {xk!r} has dtype {x_dtype}; expected uint8/int or float inputs")
    if len(x_shape) not in (2, 3, 4) or x_shape[0] < 1:
        raise DomainTableError("x", f"{found} array {xk!r} has shape {x_shape}; expected (n, C, H, W) images, "
                                    f"(n, H, W) grey images or (n, d) vectors")
    if y_shape != (x_shape[0],):
        raise DomainTableError("y", f"{found} array {yk!r} has shape {y_shape}; expected ({x_shape[0]},): "
                                    f"one integer label per row of {xk!r}")
    if y_dtype.kind not in "iu":
        raise DomainTableError("y", f"{found} array {yk!r} has dtype {y_dtype}; expected integer class labels")
    shape = x_shape[1:]
    if len(shape) == 2:
        shape = (1, *shape)
    if len(shape) == 3 and shape[0] > 4 and shape[2] <= 4:
        raise DomainTableError("x", f"{found} array {xk!r} has shape {x_shape}, which looks channels-last "
                                    f"(n, H, W, C); store images channels-first (n, C, H, W), e.g. "
                                    f"X.transpose(0, 3, 1, 2)")
    with np.load(found, allow_pickle=False) as z:
        y = np.asarray(z[yk])
    k = n_classes if n_classes is not None else int(y.max()) + 1
    if y.min() < 0 or y.max() >= k:
        bad = y[(y < 0) | (y >= k)]
        raise DomainTableError("y", f"{found} array {yk!r} has labels outside [0, {k}) (e.g. {int(bad[0])}) "
                                    f"for label space {label_space!r} with {k} classes")
    if n_classes is None:
        n_classes = k
    scale = float(scale_raw) if scale_raw is not None else (255.0 if x_dtype == np.uint8 else 1.0)
    loader = NpzLoader(name, str(found), xk, yk, scale, tuple(shape))
    if len(shape) == 3 and x_dtype != np.uint8 and scale_raw is None:
        with np.load(found, allow_pickle=False) as z:
            hi = float(np.nanmax(z[xk]))
        if hi > 1.0 + 1e-6:
            log.warning("domain %r: image values reach %.4g; image backbones expect [0, 1] "
                        "(set scale = %s in [domains.%s] if they are 0-255)", name, hi,
                        "255.0" if hi <= 255 else "...", name)
    return DomainSpec(name, label_space, int(n_classes), tuple(shape), loader,
                      fingerprint=f"sha256:{_sha256(found)}", **common)


FORMATS["npz"] = _npz_domain


# ---------------------------------------------------------------------- shared helpers


def _registered_classes(label_space: str, registered: dict[str, DomainSpec]) -> tuple[str, ...] | None:
    """The class names a registered domain gives ``label_space``, if any."""
    for d in registered.values():
        if d.label_space == label_space and d.classes:
            return tuple(d.classes)
    return None


def _str_list(table: dict, key: str) -> tuple[str, ...] | None:
    if key not in table:
        return None
    v = table[key]
    if not isinstance(v, list) or not v or not all(isinstance(c, str) and c for c in v):
        raise DomainTableError(key, f"expected a non-empty list of non-empty strings, got {v!r}")
    if len(set(v)) != len(v):
        dup = sorted({c for c in v if v.count(c) > 1})
        raise DomainTableError(key, f"lists {dup[0]!r} twice")
    return tuple(v)


def _class_names(table: dict, label_space: str, registered: dict[str, DomainSpec],
                 n_classes: int | None) -> tuple[str, ...] | None:
    """``classes = [...]`` of the table, checked against the label space's
    registered class names and ``n_classes``; else the registered names."""
    own = _str_list(table, "classes")
    reg = _registered_classes(label_space, registered)
    if own is not None and reg is not None and own != reg:
        raise DomainTableError("classes", f"label space {label_space!r} has the classes {list(reg[:4])}... "
                                          f"({len(reg)}) in the registered datasets; list the same names in "
                                          f"the same order, or drop classes = [...] to use them")
    if own is not None and n_classes is not None and len(own) != n_classes:
        raise DomainTableError("classes", f"lists {len(own)} classes but label space {label_space!r} has {n_classes}")
    return own if own is not None else reg


def _options_digest(**options: Any) -> str:
    """A short digest of the table options that change the data a run sees."""
    return hashlib.sha256(json.dumps(options, sort_keys=True, default=list).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------- imagefolder

#: File suffixes read as images (torchvision's ``IMG_EXTENSIONS`` plus ``.gif``).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")


def _int_pair(table: dict, key: str, low: int) -> tuple[int, int] | None:
    if key not in table:
        return None
    v = table[key]
    if (not isinstance(v, list) or len(v) != 2 or any(isinstance(x, bool) or not isinstance(x, int) for x in v)
            or min(v) < low):
        raise DomainTableError(key, f"expected [H, W], two integers >= {low}, got {v!r}")
    return int(v[0]), int(v[1])


def scan_class_folders(folder: Path, classes: tuple[str, ...] | None) -> tuple[list[str], np.ndarray, tuple[str, ...]]:
    """``(relative paths, labels, classes)`` of an ImageFolder layout: one
    sub-folder per class (sorted names unless ``classes`` fixes them and
    their order), images anywhere below it (sorted; hidden files and other
    suffixes ignored).  Raises DataError naming what is wrong."""
    found = sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))
    if not found:
        raise DataError(f"{folder} has no class sub-folders; expected {folder}/<class>/<image> (the ImageFolder "
                        f"layout), or set list = \"FILE\" for a list of `relative/path label` lines")
    if classes is None:
        classes = tuple(found)
    else:
        missing = [c for c in classes if c not in found]
        extra = [c for c in found if c not in classes]
        if missing or extra:
            parts = ([f"no folder for class(es) {missing[:5]}"] if missing else []) + \
                    ([f"folder(s) {extra[:5]} not in the label space's classes"] if extra else [])
            raise DataError(f"{folder}: {'; '.join(parts)} (classes: {list(classes[:6])}{'...' if len(classes) > 6 else ''})")
    rels: list[str] = []
    labels: list[int] = []
    for label, c in enumerate(classes):
        for dirpath, dirnames, filenames in os.walk(folder / c, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            base = os.path.relpath(dirpath, folder)
            for f in sorted(filenames):
                if not f.startswith(".") and f.lower().endswith(IMAGE_SUFFIXES):
                    rels.append(os.path.join(base, f))
                    labels.append(label)
    if not rels:
        raise DataError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) under its class folders")
    return rels, np.asarray(labels, dtype=np.int64), classes


def read_list_file(folder: Path, list_file: str, classes: tuple[str, ...] | None,
                   n_classes: int | None) -> tuple[list[str], np.ndarray]:
    """``(relative paths, labels)`` from ``folder/list_file``: one
    ``relative/path label`` line per image (VisDA's ``image_list.txt``); the
    label is a class index, or a class name when the classes are named."""
    path = folder / list_file
    if not path.is_file():
        raise DataError(f"list file {path} is missing; expected one `relative/path label` line per image")
    index = {c: i for i, c in enumerate(classes)} if classes else {}
    rels: list[str] = []
    labels: list[int] = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.rsplit(None, 1)
        if len(parts) != 2:
            raise DataError(f"{path}, line {lineno}: expected `relative/path label`, got {line!r}")
        rel, lab = parts[0].strip(), parts[1]
        if lab in index:
            label = index[lab]
        else:
            try:
                label = int(lab)
            except ValueError:
                raise DataError(f"{path}, line {lineno}: label {lab!r} is neither a class index nor one of the "
                                f"classes {list(classes or ())[:6]}") from None
            if n_classes is not None and not 0 <= label < n_classes:
                raise DataError(f"{path}, line {lineno}: label {label} is not in the label space "
                                f"(labels 0..{n_classes - 1})")
            if label < 0:
                raise DataError(f"{path}, line {lineno}: negative label {label}")
        if os.path.isabs(rel) or ".." in Path(rel).parts:
            raise DataError(f"{path}, line {lineno}: {rel!r} must be a path relative to {folder}")
        rels.append(rel)
        labels.append(label)
    if not rels:
        raise DataError(f"{path}: no images listed")
    return rels, np.asarray(labels, dtype=np.int64)


def listing_fingerprint(folder: Path, rels: list[str], labels: np.ndarray, options: str) -> str:
    """sha256 over every image's relative path, size, modification time and
    label (stat only: a 200k-image domain costs a second, not a read of
    every file), and the table's options."""
    h = hashlib.sha256(options.encode())
    for rel, label in zip(rels, labels.tolist()):
        try:
            st = os.stat(folder / rel)
        except OSError as exc:
            raise DataError(f"{folder / rel}: image listed but not readable ({exc.strerror or exc})") from None
        h.update(f"{rel}\t{st.st_size}\t{st.st_mtime_ns}\t{label}\n".encode("utf-8", "surrogateescape"))
    return "files:sha256:" + h.hexdigest()


def check_image_headers(name: str, folder: Path, rels: list[str], show: int = 5) -> None:
    """Refuse a domain with images Pillow cannot identify (header read only,
    no decode).  The error counts them and names the first few."""
    from PIL import Image, UnidentifiedImageError

    bad: list[str] = []
    for rel in rels:
        try:
            with Image.open(folder / rel) as im:
                im.size  # noqa: B018 - the header is parsed on open
        except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as exc:
            bad.append(f"{folder / rel} ({type(exc).__name__})")
    if bad:
        raise DataError(f"domain {name!r}: {len(bad)} of {len(rels)} images cannot be read, e.g. "
                        f"{'; '.join(bad[:show])}; remove or replace them (unreadable images are refused, "
                        f"not skipped, so that no run silently trains on fewer images)")


@dataclass(frozen=True)
class ImageFolderLoader:
    """Loads a streamed image domain: lists the folder (or its list file)
    again, checks that it is the listing the suite was read with (same
    fingerprint), refuses unreadable images, and returns ``(ImageStream,
    labels)``.  Picklable, holds no file list."""

    name: str
    folder: str
    list_file: str | None
    classes: tuple[str, ...] | None
    n_classes: int
    size: tuple[int, int]
    resize: tuple[int, int]
    fingerprint: str

    def __call__(self, data_root: Path | None = None) -> tuple[Any, np.ndarray]:
        from .stream import ImageStream

        folder = Path(self.folder)
        if not folder.is_dir():
            raise DataError(f"domain {self.name!r}: folder {folder} is gone")
        rels, labels = _image_listing(self.name, folder, self.list_file, self.classes, self.n_classes)[:2]
        options = _options_digest(size=self.size, resize=self.resize, classes=self.classes, list=self.list_file)
        if listing_fingerprint(folder, rels, labels, options) != self.fingerprint:
            raise DataError(f"domain {self.name!r}: the images under {folder} changed since the suite was read "
                            f"(files added, removed or modified); run the suite again")
        check_image_headers(self.name, folder, rels)
        files = np.array([os.fsencode(r) for r in rels], dtype=bytes)
        return ImageStream(self.name, str(folder), files, self.size, self.resize), labels


def _image_listing(name: str, folder: Path, list_file: str | None, classes: tuple[str, ...] | None,
                   n_classes: int | None) -> tuple[list[str], np.ndarray, tuple[str, ...] | None]:
    if list_file is not None:
        rels, labels = read_list_file(folder, list_file, classes, n_classes)
        return rels, labels, classes
    return scan_class_folders(folder, classes)


def _imagefolder_domain(name: str, table: dict, found: Path | None, raw_path: str, tried: list[Path],
                        label_space: str, n_classes: int | None, common: dict,
                        registered: dict[str, DomainSpec]) -> DomainSpec:
    from .stream import default_resize

    allowed = _COMMON_KEYS | {"size", "resize", "list", "classes"}
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise DomainTableError(unknown[0], f"unknown key for format \"imagefolder\"; allowed keys: {sorted(allowed)}")
    size = _int_pair(table, "size", 1)
    if size is None:
        raise DomainTableError("size", "missing; the network's input size [H, W] (e.g. [224, 224]); images "
                                       "are resized and cropped to it as they are decoded")
    resize = _int_pair(table, "resize", 1) or default_resize(size)
    if resize[0] < size[0] or resize[1] < size[1]:
        raise DomainTableError("resize", f"{list(resize)} is smaller than size {list(size)}; images are resized "
                                         f"to resize, then cropped to size")
    list_file = _str(table, "list") if "list" in table else None
    classes = _class_names(table, label_space, registered, n_classes)
    if classes is not None:
        n_classes = len(classes)
    if found is None:
        if n_classes is None:
            raise DomainTableError("n_classes", f"label space {label_space!r} is not used by a registered dataset "
                                                f"and the folder is absent: set n_classes or classes = [...]")
        msg = _missing_loader_message(name, raw_path, tried).replace("file", "folder", 1)
        return DomainSpec(name, label_space, n_classes, (3, *size), MissingFile(msg), streamed=True,
                          classes=classes, **common)
    if not found.is_dir():
        raise DomainTableError("path", f"{found} is not a folder; format \"imagefolder\" reads a folder with one "
                                       f"sub-folder per class (or a list file: list = \"FILE\")")
    try:
        rels, labels, classes = _image_listing(name, found, list_file, classes, n_classes)
        if classes is not None:
            n_classes = len(classes)
        elif n_classes is None:
            n_classes = int(labels.max()) + 1
        if n_classes < 2:
            raise DataError(f"{found}: {n_classes} class; a domain needs at least 2")
        options = _options_digest(size=size, resize=resize, classes=classes, list=list_file)
        fingerprint = listing_fingerprint(found, rels, labels, options)
    except DataError as exc:
        raise DomainTableError("list" if list_file else "path", str(exc)) from None
    loader = ImageFolderLoader(name, str(found), list_file, classes, int(n_classes), size, resize, fingerprint)
    return DomainSpec(name, label_space, int(n_classes), (3, *size), loader, fingerprint=fingerprint,
                      streamed=True, classes=classes, **common)


FORMATS["imagefolder"] = _imagefolder_domain


# ---------------------------------------------------------------------- csv / parquet


def _read_frame(fmt: str, path: Path, sep: str) -> Any:
    """The table as a pandas DataFrame; DataError says why it cannot be read."""
    import pandas as pd

    try:
        if fmt == "csv":
            return pd.read_csv(path, sep=sep)
        try:
            import pyarrow  # noqa: F401 - pandas' parquet engine
        except ImportError:
            raise DataError(f"reading {path} (format \"parquet\") needs pyarrow: pip install pyarrow "
                            f"(or pip install \"dabench[parquet]\")") from None
        return pd.read_parquet(path)
    except DataError:
        raise
    except Exception as exc:  # pandas/pyarrow raise many types (ParserError, ArrowInvalid, UnicodeDecodeError...)
        raise DataError(f"{path} is not a readable {fmt} file ({type(exc).__name__}: {str(exc)[:200]})") from None


def _row(fmt: str, i: int) -> str:
    return f"data row {i + 1} (line {i + 2})" if fmt == "csv" else f"row {i}"


def table_arrays(fmt: str, path: Path, frame: Any, label: str, features: tuple[str, ...] | None,
                 classes: tuple[str, ...] | None, n_classes: int | None,
                 label_space: str) -> tuple[np.ndarray, np.ndarray, tuple[str, ...] | None]:
    """``(X float32 (n, d), y int64, classes)`` from a table; DomainTableError
    (naming the key, the column and the row) when a feature is not numeric
    or a label is not in the label space."""
    import pandas as pd

    cols = [str(c) for c in frame.columns]
    if len(frame) == 0:
        raise DomainTableError("path", f"{path} has no rows")
    if label not in cols:
        raise DomainTableError("label", f"{path} has no column {label!r}; its columns: {cols[:12]}"
                                        f"{'...' if len(cols) > 12 else ''} (set label = \"COLUMN\")")
    if features is None:
        features = tuple(c for c in cols if c != label)
    else:
        missing = [c for c in features if c not in cols]
        if missing:
            raise DomainTableError("features", f"{path} has no column(s) {missing[:5]}; its columns: {cols[:12]}")
        if label in features:
            raise DomainTableError("features", f"the label column {label!r} is listed as a feature")
    if not features:
        raise DomainTableError("features", f"{path} has no feature columns besides the label {label!r}")
    frame.columns = cols
    X = np.empty((len(frame), len(features)), dtype=np.float32)
    for j, c in enumerate(features):
        col = frame[c]
        if col.dtype == bool:
            col = col.astype(np.float32)
        num = pd.to_numeric(col, errors="coerce") if col.dtype.kind not in "iufb" else col
        bad = num.isna() & col.notna()
        if bad.any():
            i = int(np.flatnonzero(bad.to_numpy())[0])
            raise DomainTableError("features", f"{path}: column {c!r} is not numeric: {_row(fmt, i)} holds "
                                               f"{col.iloc[i]!r}; features must be numbers (encode categories "
                                               f"as numbers, or leave the column out with features = [...])")
        v = num.to_numpy(dtype=np.float64, na_value=np.nan)
        nonfinite = ~np.isfinite(v)
        if nonfinite.any():
            i = int(np.flatnonzero(nonfinite)[0])
            raise DomainTableError("features", f"{path}: column {c!r} has {int(nonfinite.sum())} missing or "
                                               f"non-finite value(s), e.g. {_row(fmt, i)}; remove or impute them")
        X[:, j] = v
    lab = frame[label]
    if lab.isna().any():
        i = int(np.flatnonzero(lab.isna().to_numpy())[0])
        raise DomainTableError("label", f"{path}: column {label!r} has no label in {_row(fmt, i)}")
    space = f"label space {label_space!r}"
    if lab.dtype.kind in "iu" or (lab.dtype.kind == "f" and np.all(np.mod(lab.to_numpy(), 1) == 0)):
        y = lab.to_numpy().astype(np.int64)
        k = len(classes) if classes is not None else n_classes if n_classes is not None else int(y.max()) + 1
        out = (y < 0) | (y >= k)
        if out.any():
            i = int(np.flatnonzero(out)[0])
            raise DomainTableError("label", f"{path}: label {int(y[i])} in {_row(fmt, i)} is not in the {space} "
                                            f"({k} classes: labels 0..{k - 1})")
        return X, y, classes
    names = lab.astype(str).to_numpy()
    if classes is None:
        classes = tuple(sorted(set(names.tolist())))
        if n_classes is not None and len(classes) != n_classes:
            raise DomainTableError("label", f"{path}: column {label!r} holds {len(classes)} class names but the "
                                            f"{space} has {n_classes} classes; list them with classes = [...]")
    index = {c: i for i, c in enumerate(classes)}
    y = np.fromiter((index.get(v, -1) for v in names), dtype=np.int64, count=len(names))
    if (y < 0).any():
        i = int(np.flatnonzero(y < 0)[0])
        raise DomainTableError("label", f"{path}: label {names[i]!r} in {_row(fmt, i)} is not in the {space} "
                                        f"(classes: {list(classes[:8])}{'...' if len(classes) > 8 else ''})")
    return X, y, classes


@dataclass(frozen=True)
class TableLoader:
    """Loads ``(X, y)`` from a CSV or Parquet table with the options the
    suite was read with.  Picklable."""

    name: str
    fmt: str
    path: str
    sep: str
    label: str
    features: tuple[str, ...] | None
    classes: tuple[str, ...] | None
    n_classes: int
    label_space: str

    def __call__(self, data_root: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
        path = Path(self.path)
        frame = _read_frame(self.fmt, path, self.sep)
        try:
            X, y, _ = table_arrays(self.fmt, path, frame, self.label, self.features, self.classes,
                                   self.n_classes, self.label_space)
        except DomainTableError as exc:
            raise DataError(f"domain {self.name!r}: {exc.message}") from None
        return X, y


def _table_domain(fmt: str, name: str, table: dict, found: Path | None, raw_path: str, tried: list[Path],
                  label_space: str, n_classes: int | None, common: dict,
                  registered: dict[str, DomainSpec]) -> DomainSpec:
    allowed = _COMMON_KEYS | {"label", "features", "classes"} | ({"sep"} if fmt == "csv" else set())
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise DomainTableError(unknown[0], f"unknown key for format {fmt!r}; allowed keys: {sorted(allowed)}")
    label = _str(table, "label", "label")
    features = _str_list(table, "features")
    sep = _str(table, "sep", ",") if fmt == "csv" else ","
    classes = _class_names(table, label_space, registered, n_classes)
    if classes is not None:
        n_classes = len(classes)
    if found is None:
        if n_classes is None:
            raise DomainTableError("n_classes", f"label space {label_space!r} is not used by a registered "
                                                "dataset and the file is absent: set n_classes or classes = [...]")
        # the width is unknown without the file (and unused: a missing domain never loads)
        return DomainSpec(name, label_space, n_classes, (len(features),) if features else (1,), MissingFile(
            _missing_loader_message(name, raw_path, tried)), classes=classes, **common)
    if found.is_dir():
        raise DomainTableError("path", f"{found} is a folder; format {fmt!r} reads one {fmt} file")
    try:
        frame = _read_frame(fmt, found, sep)
    except DataError as exc:
        raise DomainTableError("format" if "pyarrow" in str(exc) else "path", str(exc)) from None
    X, y, classes = table_arrays(fmt, found, frame, label, features, classes, n_classes, label_space)
    if classes is not None:
        n_classes = len(classes)
    elif n_classes is None:
        n_classes = int(y.max()) + 1
    if n_classes < 2:
        raise DomainTableError("label", f"{found}: column {label!r} has {n_classes} class; a domain needs at least 2")
    feats = features if features is not None else tuple(str(c) for c in frame.columns if str(c) != label)
    options = _options_digest(label=label, features=feats, classes=classes, sep=sep)
    loader = TableLoader(name, fmt, str(found), sep, label, feats, classes, int(n_classes), label_space)
    return DomainSpec(name, label_space, int(n_classes), (X.shape[1],), loader,
                      fingerprint=f"sha256:{_sha256(found)}:{options}", classes=classes, **common)


FORMATS["csv"] = functools.partial(_table_domain, "csv")
FORMATS["parquet"] = functools.partial(_table_domain, "parquet")


# ---------------------------------------------------------------------- the table


def _str(table: dict, key: str, default: str | None = None) -> str:
    v = table.get(key, default)
    if not isinstance(v, str) or not v:
        raise DomainTableError(key, f"expected a non-empty string, got {v!r}")
    return v


def parse_domain_table(name: str, table: Any, *, suite_dir: Path, data_root: Path | None,
                       registered: dict[str, DomainSpec]) -> DomainSpec:
    """The :class:`DomainSpec` of one ``[domains.NAME]`` table; raises
    :class:`DomainTableError` (key relative to the table) when malformed."""
    if not isinstance(table, dict):
        raise DomainTableError("", f"expected a table with path, format and label_space, got {table!r}")
    if not name or ":" in name or "," in name or name != name.strip():
        raise DomainTableError("", "a domain name must be non-empty, without ':' or ',' or surrounding spaces")
    if name in registered:
        raise DomainTableError("", f"a dataset named {name!r} is already registered by a plugin; "
                                   "give the suite's domain another name")
    for key in ("path", "format", "label_space"):
        if key not in table:
            raise DomainTableError(key, "missing" + (f"; one of {sorted(FORMATS)}" if key == "format" else ""))
    fmt = _str(table, "format")
    if fmt not in FORMATS:
        raise DomainTableError("format", f"unknown format {fmt!r}; one of {sorted(FORMATS)}")
    raw_path = _str(table, "path")
    label_space = _str(table, "label_space")
    known = {d.n_classes for d in registered.values() if d.label_space == label_space}
    n_classes: int | None = None
    if "n_classes" in table:
        n = table["n_classes"]
        if isinstance(n, bool) or not isinstance(n, int) or n < 2:
            raise DomainTableError("n_classes", f"expected an integer >= 2, got {n!r}")
        if known and n not in known:
            raise DomainTableError("n_classes", f"label space {label_space!r} has {sorted(known)[0]} classes "
                                                f"in the registered datasets, not {n}")
        n_classes = n
    elif known:
        n_classes = sorted(known)[0]
    common: dict[str, Any] = {}
    if "base" in table:
        common["base"] = _str(table, "base")
    if "description" in table:
        d = table["description"]
        if not isinstance(d, str):
            raise DomainTableError("description", f"expected a string, got {d!r}")
        common["description"] = d
    found, tried = resolve_path(raw_path, suite_dir, data_root)
    if found is not None and not os.access(found, os.R_OK):
        raise DomainTableError("path", f"{found} is not readable (permissions)")
    what = "folder" if fmt == "imagefolder" else "file"
    common.setdefault("description", f"{fmt} {what} {found or raw_path} (declared in the suite)")
    common["source"] = f"suite file domain ({fmt}): {found or raw_path}"
    return FORMATS[fmt](name, table, found, raw_path, tried, label_space, n_classes, common, registered=registered)


__all__ = ["FORMATS", "IMAGE_SUFFIXES", "DomainTableError", "ImageFolderLoader", "MissingFile", "NpzLoader",
           "TableLoader", "check_image_headers", "listing_fingerprint", "parse_domain_table", "read_list_file",
           "resolve_path", "scan_class_folders", "table_arrays"]
