"""Published numbers next to dabench's: "how far from the paper, and why".

A suite may cite published results for its (pair, method) cells::

    [[published]]
    pair = "mnist:mnistm-real"
    method = "dann"
    accuracy = 76.66                 # target accuracy in %, as published
    baseline = 52.25                 # optional: the same publication's source-only number
    source = "Ganin et al., JMLR 17(59), 2016, Table 2 (MNIST -> MNIST-M)"
    setting = "60k MNIST, full MNIST-M test, 5x5-conv net, ..."   # optional: what they ran
    note = "..."                     # optional: why dabench differs, what was tried

``dabench run`` keeps the entries with the store; every report then has a
"Published vs dabench" table: dabench's mean ± std over seeds (the point
chosen without target labels), the published number, the gap, and — since
absolute numbers depend on data sizes, networks and budgets — the *gain over
source-only* on each side where the publication gives its baseline.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

FIELDS = {"pair", "method", "accuracy", "baseline", "source", "setting", "note"}


class PublishedError(ValueError):
    def __init__(self, key: str, message: str) -> None:
        self.key, self.message = key, message
        super().__init__(f"{key}: {message}")


def _pct(v: Any, key: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not 0 <= v <= 100:
        raise PublishedError(key, f"expected a percentage in [0, 100], got {v!r}")
    return float(v)


def parse_published(raw: Any, pairs: Sequence[str], methods: Sequence[str]) -> list[dict[str, Any]]:
    """Validate a suite's ``[[published]]`` entries against its pairs and methods."""
    if not isinstance(raw, list):
        raise PublishedError("published", "expected an array of tables ([[published]] entries)")
    out = []
    for i, e in enumerate(raw):
        where = f"published[{i}]"
        if not isinstance(e, dict):
            raise PublishedError(where, "expected a table")
        unknown = sorted(set(e) - FIELDS)
        if unknown:
            raise PublishedError(f"{where}.{unknown[0]}", f"unknown key; allowed: {sorted(FIELDS)}")
        for k in ("pair", "method", "accuracy", "source"):
            if k not in e:
                raise PublishedError(f"{where}.{k}", "missing")
        for k in ("pair", "method", "source", "setting", "note"):
            if k in e and (not isinstance(e[k], str) or not e[k].strip()):
                raise PublishedError(f"{where}.{k}", "expected a non-empty string")
        if e["pair"] not in pairs:
            raise PublishedError(f"{where}.pair", f"{e['pair']!r} is not a pair of this suite; it has {sorted(set(pairs))}")
        if e["method"] not in methods:
            raise PublishedError(f"{where}.method", f"{e['method']!r} is not a method of this suite; "
                                                    f"it has {sorted(methods)}")
        entry = {"pair": e["pair"], "method": e["method"], "accuracy": _pct(e["accuracy"], f"{where}.accuracy"),
                 "source": e["source"].strip()}
        if "baseline" in e:
            entry["baseline"] = _pct(e["baseline"], f"{where}.baseline")
        for k in ("setting", "note"):
            if k in e:
                entry[k] = e[k].strip()
        out.append(entry)
    return out


def _cell(cells: Any, method: str, pair: str) -> Mapping[str, Any] | None:
    rows = cells[(cells["method"] == method) & (cells["pair"] == pair)]
    if rows.empty:  # a pair shown under a protocol variant: "pair [k=v]"
        rows = cells[(cells["method"] == method) & cells["pair"].astype(str).str.startswith(pair + " [")]
    return None if rows.empty else rows.iloc[0].to_dict()


def _num(x: Any) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(v) else v


def comparison(board: Any) -> list[dict[str, Any]]:
    """One row per published entry with dabench's figures (percent)."""
    rows = []
    for e in getattr(board, "published", None) or []:
        c = _cell(board.cells, e["method"], e["pair"])
        mean = _num(c.get("target_acc_mean")) if c else None
        std = _num(c.get("target_acc_std")) if c else None
        gap_so = _num(c.get("gap_mean")) if c else None
        n = int(c.get("n_seeds_ok") or 0) if c else 0
        row = dict(e)
        row.update({
            "dabench_mean": None if mean is None else 100 * mean,
            "dabench_std": None if std is None else 100 * std,
            "n_seeds": n,
            "gap": None if mean is None else 100 * mean - e["accuracy"],
            "published_gain": (e["accuracy"] - e["baseline"]) if "baseline" in e else None,
            "dabench_gain": None if gap_so is None or e["method"] == board.reference_method else 100 * gap_so,
            "status": (c or {}).get("status", "not run"),
        })
        rows.append(row)
    return rows


def _f(x: Any, signed: bool = False) -> str:
    if x is None:
        return "—"
    return f"{x:+.1f}" if signed else f"{x:.1f}"


def to_markdown(board: Any) -> list[str]:
    """The "Published vs dabench" section (empty when the suite cites nothing)."""
    rows = comparison(board)
    if not rows:
        return []
    from .leaderboard import _md_escape, _md_table, pair_label

    out = ["", "## Published vs dabench", "",
           "Target accuracy (%). dabench: mean ± std over seeds of the hyperparameter point chosen without "
           "target labels. *Gap* = dabench − published. *Gains* are over each side's own source-only "
           "model (the publication's baseline where it gives one); they are the comparable quantity when "
           "data sizes, networks or budgets differ (see *Setting*).", ""]
    table = []
    for r in rows:
        if r["dabench_mean"] is None:
            dab = "—"
        elif r["n_seeds"] == 1:  # one seed has no spread: say so rather than print ± 0.0
            dab = f"{r['dabench_mean']:.1f} (1, no spread)"
        else:
            dab = f"{r['dabench_mean']:.1f} ± {r['dabench_std'] or 0:.1f} ({r['n_seeds']})"
        table.append([pair_label(r["pair"]), _md_escape(r["method"]), _f(r["accuracy"]), dab, _f(r["gap"], True),
                      _f(r["published_gain"], True), _f(r["dabench_gain"], True), _md_escape(r["source"])])
    out += _md_table(["Pair", "Method", "Published", "dabench (seeds)", "Gap", "Published gain", "dabench gain",
                      "Source"], table, [False, False, True, True, True, True, True, False])
    notes = [r for r in rows if r.get("setting") or r.get("note")]
    if notes:
        out += ["", "Settings and notes:", ""]
        for r in notes:
            parts = [f"**{pair_label(r['pair'])}, {_md_escape(r['method'])}**"]
            if r.get("setting"):
                parts.append(f"published setting: {_md_escape(r['setting'])}")
            if r.get("note"):
                parts.append(_md_escape(r["note"]))
            out.append("- " + "; ".join(parts) + ".")
    return out


__all__ = ["PublishedError", "comparison", "parse_published", "to_markdown"]
