"""The feature cache of the "head" protocol.

Under the head protocol a frozen, pretrained backbone maps every image of a
domain to a feature vector once, and every method adapts a head on those
vectors.  Extraction is the expensive part (a ResNet-50 pass over 280,000
VisDA images), so features are cached on disk, keyed and checked like the
run store keys runs:

- the **key** is the sha256 of the canonical JSON of everything that changes
  the features: the domain, the list of image files (relative path, size,
  modification time and label of each), the sha256 of the dataset's
  archives when known, the extractor's name, its weights and its
  preprocessing, and :data:`FEATURE_FORMAT`;
- an entry is ``<cache>/<domain>@<extractor>/<key>.npz`` (``X`` float32,
  ``y`` int64) plus ``<key>.json``, a manifest holding the key, the fields
  it hashes, the shapes and the sha256 of the ``.npz`` bytes, written last
  so a half-written entry has no manifest; both are written through
  temporary names unique to the writer and renamed atomically, so several
  processes (``--jobs``, or two ``dabench run``) may write one entry at once;
- on use the manifest must exist, carry the same key and the same ``.npz``
  sha256, and the arrays must have the recorded shapes; otherwise the entry
  is **rebuilt** (the new files replace the broken ones), never silently
  used.  Readers never delete (a writer may be between its two renames).
  Entries of the same domain and extractor with another key are stale
  (images or extractor changed) and are removed when a new entry is written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from ..atomic import atomic_path, atomic_write_text
from .core import DataError

log = logging.getLogger("dabench.data")

#: Bump when the cache layout or the meaning of a key field changes.
FEATURE_FORMAT = 1


@dataclass(frozen=True)
class FeatureExtractor:
    """A frozen feature extractor for the head protocol.

    ``build()`` returns ``extract(batch) -> features``: ``batch`` is uint8
    ``(b, 3, crop, crop)`` RGB pixels (images resized so their shorter side is
    ``resize``, then centre-cropped), the result float32 ``(b, out_dim)``.
    ``weights`` and ``preprocessing`` are part of the cache key: change them
    whenever the features would change.
    """

    name: str
    weights: str
    preprocessing: str
    out_dim: int
    build: Callable[[], Callable[[np.ndarray], np.ndarray]]
    resize: int = 256
    crop: int = 224
    batch_size: int = 64


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def files_fingerprint(items: Sequence[tuple[Path, int]], base: Path) -> str:
    """sha256 over ``relative path, size, mtime_ns, label`` of every image (stat only, no reads)."""
    h = hashlib.sha256()
    for path, label in items:
        try:
            st = os.stat(path)
        except OSError as exc:
            raise DataError(f"{path}: image listed but not readable ({exc})") from exc
        try:
            rel = os.path.relpath(path, base)
        except ValueError:  # pragma: no cover - other drive on Windows
            rel = str(path)
        h.update(f"{rel}\t{st.st_size}\t{st.st_mtime_ns}\t{label}\n".encode())
    return h.hexdigest()


def cache_key(domain: str, items: Sequence[tuple[Path, int]], extractor: FeatureExtractor,
              base: Path, extra: dict | None = None) -> tuple[str, dict]:
    fields = {
        **(extra or {}),
        "format": FEATURE_FORMAT,
        "domain": domain,
        "n": len(items),
        "files": files_fingerprint(items, base),
        "extractor": extractor.name,
        "weights": extractor.weights,
        "preprocessing": f"{extractor.preprocessing}; resize {extractor.resize}, centre crop {extractor.crop}",
        "out_dim": extractor.out_dim,
    }
    key = hashlib.sha256(json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    return key, fields


def _entry_paths(cache_dir: Path, domain: str, extractor: FeatureExtractor, key: str) -> tuple[Path, Path]:
    folder = cache_dir / f"{domain}@{extractor.name}"
    return folder / f"{key}.npz", folder / f"{key}.json"


def _remove(*paths: Path) -> None:
    for p in paths:
        try:
            p.unlink()
        except FileNotFoundError:
            pass


def read_entry(cache_dir: Path, domain: str, extractor: FeatureExtractor, key: str,
               n: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The cached ``(X, y)`` when the entry is present and intact; None (after
    removing whatever is broken) otherwise."""
    npz, manifest = _entry_paths(cache_dir, domain, extractor, key)
    if not npz.is_file() and not manifest.is_file():
        return None
    why = None
    try:
        meta = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        meta, why = None, "its manifest is missing or unreadable"
    if meta is not None:
        if meta.get("key") != key:
            why = f"its manifest names key {meta.get('key')!r}"
        elif not npz.is_file():
            why = "its .npz file is missing"
        elif _sha256_file(npz) != meta.get("sha256"):
            why = f"its .npz sha256 differs from the manifest's {meta.get('sha256')}"
    if why is None:
        try:
            with np.load(npz, allow_pickle=False) as z:
                X, y = z["X"], z["y"]
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
            X = y = None
            why = f"its arrays cannot be read ({type(exc).__name__})"
        if X is not None and (X.shape != (n, extractor.out_dim) or y.shape != (n,) or X.dtype != np.float32):
            why = f"its arrays have shapes {X.shape}/{y.shape}, expected ({n}, {extractor.out_dim})/({n},)"
    if why is not None:
        # not removed here: another process may be writing this entry right now; the rebuild replaces it
        log.warning("feature cache entry %s is unusable (%s); it is rebuilt", npz, why)
        return None
    return X, y


def write_entry(cache_dir: Path, domain: str, extractor: FeatureExtractor, key: str, fields: dict,
                X: np.ndarray, y: np.ndarray) -> Path:
    npz, manifest = _entry_paths(cache_dir, domain, extractor, key)
    npz.parent.mkdir(parents=True, exist_ok=True)
    for old in npz.parent.glob("*.json"):  # stale entries: other images or another extractor version
        if old.stem != key and not old.name.startswith("."):  # (hidden: another writer's temporary file)
            log.info("removing stale feature cache entry %s", old.with_suffix(".npz"))
            _remove(old, old.with_suffix(".npz"))
    with atomic_path(npz) as tmp:
        np.savez(tmp, X=X, y=y)
        sha = _sha256_file(tmp)
    meta = {"key": key, "fields": fields, "sha256": sha, "shape": list(X.shape)}
    atomic_write_text(manifest, json.dumps(meta, indent=1, sort_keys=True))
    return npz


def extract_features(items: Sequence[tuple[Path, int]], extractor: FeatureExtractor,
                     batches: Iterable[np.ndarray] | None = None) -> np.ndarray:
    from .standard import image_batches

    fn = extractor.build()
    out = np.empty((len(items), extractor.out_dim), dtype=np.float32)
    i = 0
    for b in batches if batches is not None else image_batches(items, extractor.batch_size, extractor.resize,
                                                                extractor.crop):
        f = np.asarray(fn(b), dtype=np.float32)
        if f.shape != (len(b), extractor.out_dim):
            raise DataError(f"feature extractor {extractor.name!r} returned shape {f.shape} for a batch of "
                            f"{len(b)}; expected ({len(b)}, {extractor.out_dim})")
        out[i:i + len(b)] = f
        i += len(b)
        log.info("%s: %d/%d images", extractor.name, i, len(items))
    if not np.isfinite(out).all():
        raise DataError(f"feature extractor {extractor.name!r} produced non-finite features")
    return out


def cached_features(domain: str, items: Sequence[tuple[Path, int]], extractor: FeatureExtractor,
                    cache_dir: str | os.PathLike, extra: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(X, y)`` features of ``items`` by ``extractor``, from the cache or
    extracted once and cached (see the module docstring).  ``extra`` adds
    fields to the key (the standard datasets add the sha256 of their
    archives)."""
    cache_dir = Path(cache_dir)
    key, fields = cache_key(domain, items, extractor, cache_dir.parent, extra)
    y = np.asarray([lbl for _, lbl in items], dtype=np.int64)
    hit = read_entry(cache_dir, domain, extractor, key, len(items))
    if hit is not None:
        X, y_cached = hit
        if np.array_equal(y_cached, y):
            log.info("%s@%s: features from cache %s", domain, extractor.name, key[:12])
            return np.array(X), y
        log.warning("feature cache entry %s has other labels than the image list; rebuilt", key[:12])
    log.info("%s@%s: extracting features of %d images (cached afterwards)", domain, extractor.name, len(items))
    X = extract_features(items, extractor)
    write_entry(cache_dir, domain, extractor, key, fields, X, y)
    return X, y


__all__ = ["FEATURE_FORMAT", "FeatureExtractor", "cache_key", "cached_features", "extract_features",
           "files_fingerprint", "read_entry", "write_entry"]
