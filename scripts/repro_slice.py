#!/usr/bin/env python
"""Reproduction check: a slice of the quick suite, run exactly as the README's
main command runs it (the default executor, jobs and threads), must give the
committed results bit for bit.

The slice covers the three kinds of computation whose rounding depends on
the thread count: an MLP pair (``moons``), a vector pair whose reweighting
fits a scikit-learn model (``covshift``, BLAS), and a CNN pair (``mnist →
mnistm``, convolutions), with ``source-only``, both ``dann`` grid points and
``iw-discriminative``, seed 0: 12 runs, about half a minute on 2 cores.

``tests/test_reproduction.py`` runs it in CI against
``tests/data/repro-quick-slice.json``.  After a change that alters results
(a method, a budget, torch), regenerate the expectations with::

    python scripts/repro_slice.py --write

and commit the file with the change.  ``python scripts/repro_slice.py`` alone
runs the slice and compares, printing every difference.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
EXPECTED = ROOT / "tests" / "data" / "repro-quick-slice.json"
SUITE = "suites/quick.toml"
PAIRS = "moons:moons-rot35,covshift-source:covshift-target,mnist:mnistm"
METHODS = "source-only,dann,iw-discriminative"
#: the README's main command restricted to the slice (no executor, jobs or thread option: the defaults)
ARGS = ["run", SUITE, "--pairs", PAIRS, "--methods", METHODS, "--seeds", "1"]
#: what is compared, bit for bit (validator scores: every ``val_*`` column)
METRICS = ("status", "target_acc", "target_f1", "source_acc")


def run_slice(results: Path, extra: list[str] | None = None) -> dict[str, Any]:
    """Run the slice into ``results`` with ``python -m dabench`` (a fresh
    process, as a user would) and return ``{"settings": ..., "runs": ...}``."""
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env.pop(var, None)  # as on a fresh machine: dabench's defaults, not the caller's environment
    r = subprocess.run([sys.executable, "-m", "dabench", *ARGS, "--results", str(results), *(extra or [])],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    if r.returncode != 0:
        raise RuntimeError(f"the slice failed (exit {r.returncode}):\n{r.stderr}")
    sys.path.insert(0, str(ROOT))
    from dabench.store import RunStore

    with RunStore(results, create=False) as st:
        rows = st.rows()
    runs = {}
    for row in rows:
        name = f"{row['pair']} {row['method']} point {row['point']} seed {row['seed']}"
        runs[name] = {"params": row["params"], **{m: row[m] for m in METRICS},
                      **{k: row[k] for k in sorted(row) if k.startswith("val_")}}
    settings = sorted({(row["torch_version"], row["threads"]) for row in rows})
    return {"command": "dabench " + " ".join(ARGS), "settings": [{"torch": t, "threads": n} for t, n in settings],
            "runs": dict(sorted(runs.items()))}


def differences(expected: dict[str, Any], got: dict[str, Any]) -> list[str]:
    """One line per run or value that differs (an empty list: reproduced)."""
    out = []
    exp_runs, got_runs = expected["runs"], got["runs"]
    for name in sorted(set(exp_runs) | set(got_runs)):
        if name not in got_runs or name not in exp_runs:
            out.append(f"{name}: {'missing' if name not in got_runs else 'not expected'}")
            continue
        e, g = exp_runs[name], got_runs[name]
        for k in sorted(set(e) | set(g)):
            a, b = e.get(k), g.get(k)
            same = a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))
            if not same:
                out.append(f"{name}: {k} expected {a!r}, got {b!r}")
    if expected.get("settings") != got.get("settings"):
        out.append(f"settings: expected {expected.get('settings')}, got {got.get('settings')}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--write", action="store_true", help=f"write the expectations to {EXPECTED.relative_to(ROOT)}")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="dabench-repro-") as tmp:
        got = run_slice(Path(tmp) / "res")
    if args.write:
        EXPECTED.parent.mkdir(parents=True, exist_ok=True)
        EXPECTED.write_text(json.dumps(got, indent=1, sort_keys=False) + "\n", encoding="utf-8")
        print(f"wrote {EXPECTED.relative_to(ROOT)}: {len(got['runs'])} runs, settings {got['settings']}")
        return 0
    diffs = differences(json.loads(EXPECTED.read_text(encoding="utf-8")), got)
    for line in diffs:
        print(line)
    print("reproduced" if not diffs else f"{len(diffs)} difference(s)")
    return 1 if diffs else 0


if __name__ == "__main__":
    sys.exit(main())
