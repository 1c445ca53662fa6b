"""How well the label-free negative-transfer warning predicts the labelled verdict.

For each results folder (a run store: ``results/quick``, ``results/reproduce-digits``, ...)
the leaderboard is built as ``dabench leaderboard`` builds it (the suite's
validator), and the warning's evaluation over the cells that got a verdict
(``negative transfer`` / ``n.s.`` / ``better``: cells that are not findings,
failed trainings and never-engaged cells, are left out) is printed: cells,
cells with negative transfer, warned cells, precision, recall and the AUROC
of the warning's score, plus the AUROC of every other label-free score the
board keeps.  With several folders the cells are also pooled.

Usage::

    python benchmarks/calibration/warning_auroc.py results/quick results/reproduce-digits [--out auroc.md]

Works on stores written before the calibrated verdict (the warning's
statistics are label-free extras every run has stored since they were
introduced; the verdict is recomputed from the stored accuracies).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from dabench.leaderboard import NT_FLAGS, WARN_SCORE, _evaluate_warning, build_leaderboard  # noqa: E402
from dabench.store import RunStore  # noqa: E402


def evaluate(folder: Path, validator: str | None) -> tuple[dict, pd.DataFrame]:
    with RunStore.open_readonly(folder) as st:
        v = validator or st.get_meta("validator") or "source-val"
    board = build_leaderboard(folder, validator=v)
    return dict(board.warning_eval), board.cells.assign(store=str(folder))


def _line(name: str, ev: dict) -> str:
    def f(x: float) -> str:
        return "—" if x is None or x != x else f"{x:.2f}"

    cands = "; ".join(f"{k} {f(x)}" for k, x in sorted(ev.get("candidate_auroc", {}).items()))
    return (f"| {name} | {ev['n_cells']} | {ev['n_negative_transfer']} | {ev['n_warned']} | {f(ev['precision'])} | "
            f"{f(ev['recall'])} | **{f(ev['auroc'])}** | {cands} |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folders", nargs="+", type=Path)
    ap.add_argument("--validator", default=None, help="default: the suite's (stored in the store)")
    ap.add_argument("--out", type=Path, default=None, help="also write the table to this Markdown file")
    args = ap.parse_args(argv)
    lines = [f"Label-free warning `{WARN_SCORE}` against the calibrated labelled verdict (positive: negative "
             f"transfer), over the cells with a verdict ({', '.join(NT_FLAGS)}).", "",
             "| Results | Cells | Negative transfer | Warned | Precision | Recall | AUROC | Other scores' AUROC |",
             "|---|--:|--:|--:|--:|--:|--:|---|"]
    pooled = []
    for folder in args.folders:
        ev, cells = evaluate(folder, args.validator)
        lines.append(_line(str(folder), ev))
        pooled.append(cells)
    if len(pooled) > 1:
        allc = pd.concat(pooled, ignore_index=True)
        lines.append(_line("pooled", _evaluate_warning(allc)))
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    np.seterr(all="ignore")
    raise SystemExit(main())
