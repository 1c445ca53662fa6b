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
"""

from __future__ import annotations

import hashlib
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
                label_space: str, n_classes: int | None, common: dict) -> DomainSpec:
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
    common.setdefault("description", f"{fmt} file {found or raw_path} (declared in the suite)")
    common["source"] = f"suite file domain ({fmt}): {found or raw_path}"
    return FORMATS[fmt](name, table, found, raw_path, tried, label_space, n_classes, common)


__all__ = ["FORMATS", "DomainTableError", "MissingFile", "NpzLoader", "parse_domain_table", "resolve_path"]
