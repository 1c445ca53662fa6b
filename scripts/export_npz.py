#!/usr/bin/env python
"""Write a registered dabench domain to an ``.npz`` array file that a suite's
``[domains.NAME]`` table (``format = "npz"``) reads: ``X`` uint8 (images
scaled back from [0, 1] to 0-255) or float32 (vectors), and ``y`` int64.

Used to make the array files of ``suites/reproduce-digits.toml`` from the
standard downloads, e.g.::

    dabench data download usps
    python scripts/export_npz.py usps DIR/usps.npz

``--rows START:STOP`` keeps a slice of the domain's rows (in the loader's
order).  The script only reads data the loaders already check (hashes) and
writes one file, through a temporary name and an atomic rename.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _rows(text: str | None, n: int) -> slice:
    if not text:
        return slice(0, n)
    try:
        a, b = text.split(":")
        start, stop = int(a or 0), int(b or n)
    except ValueError:
        raise SystemExit(f"--rows: expected START:STOP (integers), got {text!r}") from None
    if not 0 <= start < stop <= n:
        raise SystemExit(f"--rows {text}: the domain has {n} rows")
    return slice(start, stop)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("domain", help="a domain name from `dabench list datasets` (e.g. usps, mnistm-full)")
    ap.add_argument("out", help="the .npz file to write")
    ap.add_argument("--data-root", default=None, help="where `dabench data download` put the data")
    ap.add_argument("--rows", default=None, help="START:STOP, a slice of the domain's rows")
    args = ap.parse_args(argv)

    from dabench.data.core import DataError
    from dabench.names import did_you_mean
    from dabench.plugins import get_registry

    registry = get_registry()
    spec = registry.datasets.get(args.domain)
    if spec is None:
        hint = did_you_mean(args.domain, registry.datasets)
        raise SystemExit(f"unknown domain {args.domain!r}; {hint + ' ' if hint else ''}see `dabench list datasets`")
    if spec.streamed or spec.features:
        raise SystemExit(f"domain {args.domain!r} is {'streamed image files' if spec.streamed else 'cached features'}: "
                         f"use it in a suite directly")
    try:
        X, y = spec.load(Path(args.data_root) if args.data_root else None)
    except DataError as exc:
        raise SystemExit(str(exc)) from None
    X, y = np.asarray(X), np.asarray(y, dtype=np.int64)
    sl = _rows(args.rows, len(y))
    X, y = X[sl], y[sl]
    if spec.is_image:
        X = np.clip(np.rint(X.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)
    else:
        X = X.astype(np.float32)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp.npz")
    try:
        np.savez_compressed(tmp, X=X, y=y)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    print(f"wrote {out}: X {X.dtype} {X.shape}, y {y.dtype} {y.shape}, classes {sorted(set(y.tolist()))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
