"""Leaderboards: from the run store to tables a reader can trust.

Two layers, kept apart so later work (significance tests, plots, HTML) can
reuse the numbers:

- :func:`compute_leaderboard` turns run rows (``RunStore.rows()`` or a
  DataFrame of them) into a :class:`Leaderboard`: tidy pandas tables of
  per-(method, pair) cells, per-method summaries, the hyperparameter points
  considered and the failed/skipped runs.
- Renderers :func:`to_markdown`, :func:`to_csv` and :func:`to_json` format a
  board; they compute nothing new.  Output is deterministic: the same store
  gives byte-identical reports (no timestamps, stable ordering).

Rules (see DESIGN.md, "Leaderboards and negative transfer"):

- A column is a pair (``source:target``).  When one pair name was run under
  several protocols or budgets, each variant is its own column.
- Runs are grouped by (pair, method, point).  When a (pair, method) has
  several hyperparameter points, the one with the highest mean validator
  score (``val_<validator>``) over its ok seeds is selected, ties to the lowest
  point index.  Target labels are never used for selection.
- Per cell: target accuracy mean and sample std (ddof=1) over ok seeds of the
  selected point; the gap to the reference method (source-only) as the mean
  of per-seed differences over the seeds both have ok; source accuracy and
  forgetting (method source accuracy minus source-only source accuracy,
  paired by seed: negative means source accuracy was lost).
- Ranks per pair over ranked methods (not reference rows such as
  target-oracle) by mean target accuracy, 1 = best, ties share the average
  rank; a method's average rank is over the pairs where it has a result.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

__all__ = [
    "Leaderboard",
    "LeaderboardError",
    "build_leaderboard",
    "compute_leaderboard",
    "pair_label",
    "to_csv",
    "to_json",
    "to_markdown",
    "write_reports",
]

#: Version of the JSON layout written by :func:`to_json`.
JSON_FORMAT_VERSION = 1

#: Columns a run row must have.
_REQUIRED = ("pair", "method", "point", "seed", "status", "params")

#: Optional columns, filled with missing values when a row lacks them.
_OPTIONAL = (
    "key", "suite", "method_version", "family", "reference", "protocol", "budget", "backbone", "reason",
    "target_acc", "target_f1", "source_acc", "wall_time_s", "peak_mem_mb", "finished_at",
)

#: Decimals used when comparing mean accuracies for ranking, so that equal
#: means computed in a different summation order still tie.
_RANK_DECIMALS = 12


class LeaderboardError(ValueError):
    """The runs cannot make a leaderboard; the message says what to do."""


@dataclass(frozen=True)
class Leaderboard:
    """Everything a report shows, as tidy tables (fractions, not percentages).

    - ``cells``: one row per (method, pair), methods in display order, pairs in
      column order.  Columns: ``method, pair, pair_label, family, reference,
      ranked, status`` (``ok``/``failed``/``skipped``/``not run``)``,
      skip_reason, point, params, n_points, selection_score, n_seeds_ok,
      n_failed, n_skipped, target_acc_mean, target_acc_std, target_f1_mean,
      source_acc_mean, gap_mean, gap_std, gap_n, forgetting_mean,
      forgetting_n, rank, wall_time_s_mean, peak_mem_mb_mean, protocol,
      budget``.
    - ``methods``: one row per method in display order (ranked methods by
      average rank, then reference rows), with ``mean_acc`` (over the pairs
      with a result), ``complete`` (a result on every pair), ``avg_rank``,
      ``mean_gap``, ``mean_forgetting``, run counts and cost.
    - ``points``: one row per (pair, method, point) with its validator mean,
      run counts and ``selected``.
    - ``runs``: the ok runs of the selected points (for paired statistics).
    - ``issues``: every failed or skipped run, with its reason.
    """

    suite: str | None
    validator: str | None
    reference_method: str
    oracle_method: str
    pairs: tuple[str, ...]
    pair_labels: tuple[str, ...]
    seeds: tuple[int, ...]
    settings: Mapping[str, tuple[str, ...]]
    cells: pd.DataFrame = field(repr=False)
    methods: pd.DataFrame = field(repr=False)
    points: pd.DataFrame = field(repr=False)
    runs: pd.DataFrame = field(repr=False)
    issues: pd.DataFrame = field(repr=False)
    superseded_runs: int = 0

    def cell(self, method: str, pair: str) -> dict[str, Any]:
        """The cell of ``method`` on ``pair`` as a dict (KeyError when absent)."""
        sel = self.cells[(self.cells["method"] == method) & (self.cells["pair"] == pair)]
        if sel.empty:
            raise KeyError(f"no cell for method {method!r} on pair {pair!r}")
        return sel.iloc[0].to_dict()

    def method(self, method: str) -> dict[str, Any]:
        """The summary row of ``method`` as a dict (KeyError when absent)."""
        sel = self.methods[self.methods["method"] == method]
        if sel.empty:
            raise KeyError(f"no method {method!r} in this leaderboard")
        return sel.iloc[0].to_dict()


# ---------------------------------------------------------------- helpers


def pair_label(pair: str) -> str:
    """``"moons:moons-rot35"`` -> ``"moons→moons-rot35"`` (a variant suffix is kept)."""
    head, sep, rest = pair.partition(" ")
    return head.replace(":", "→", 1) + sep + rest


def _isnan(x: Any) -> bool:
    """None, NaN, pd.NA or NaT (a missing scalar)."""
    if x is None:
        return True
    if isinstance(x, (str, bytes, bool, int)):
        return False
    try:
        return bool(pd.isna(x))
    except (TypeError, ValueError):
        return False


def _mean(s: pd.Series) -> float:
    s = pd.to_numeric(s, errors="coerce").dropna()
    return float(s.mean()) if len(s) else math.nan


def _std(s: pd.Series) -> float:
    s = pd.to_numeric(s, errors="coerce").dropna()
    return float(s.std(ddof=1)) if len(s) > 1 else math.nan


def _truthy(v: Any) -> bool:
    if _isnan(v):
        return False
    if isinstance(v, str):
        return v.strip().lower() in ("1", "true", "yes")
    return bool(v)


def _json_obj(text: Any) -> Any:
    try:
        return json.loads(text) if isinstance(text, str) else None
    except ValueError:
        return None


def _variant_suffix(variant: Mapping[str, Any], others: Sequence[Mapping[str, Any]]) -> str:
    """``k_target=5, steps=600``: the protocol/budget keys where this variant differs."""
    parts = []
    for k in sorted(variant):
        if any(o.get(k) != variant[k] for o in others):
            parts.append(f"{k}={variant[k]}")
    return ", ".join(parts)


def _columns(df: pd.DataFrame) -> pd.Series:
    """Column id per run: the pair name, or ``pair [differing settings]`` when
    the same pair was run under several protocols/budgets."""
    settings = pd.Series(
        [("" if _isnan(p) else str(p), "" if _isnan(b) else str(b)) for p, b in zip(df["protocol"], df["budget"])],
        index=df.index, dtype=object,
    )
    col = df["pair"].astype(str).copy()
    for pair, idx in df.groupby("pair", sort=True).groups.items():
        variants = sorted(set(settings.loc[idx]))
        if len(variants) < 2:
            continue
        flat: dict[tuple[str, str], dict[str, Any]] = {}
        for v in variants:
            proto, budget = v
            d: dict[str, Any] = {}
            for obj in (_json_obj(proto), _json_obj(budget)):
                if isinstance(obj, dict):
                    d.update({str(k): val for k, val in obj.items()})
            flat[v] = d
        names: dict[tuple[str, str], str] = {}
        for v in variants:
            suffix = _variant_suffix(flat[v], [flat[o] for o in variants if o != v]) or f"variant {variants.index(v) + 1}"
            names[v] = f"{pair} [{suffix}]"
        col.loc[idx] = settings.loc[idx].map(names)
    return col


def _frame(runs: Iterable[Mapping[str, Any]] | pd.DataFrame) -> pd.DataFrame:
    df = runs.copy() if isinstance(runs, pd.DataFrame) else pd.DataFrame(list(runs))
    if df.empty:
        raise LeaderboardError("no runs to rank: run a suite first (`dabench run SUITE --results FOLDER`)")
    missing = [c for c in _REQUIRED if c not in df.columns]
    if missing:
        raise LeaderboardError(f"run rows lack the column(s) {missing}; pass RunStore.rows() or RunStore.dataframe()")
    for c in _OPTIONAL:
        if c not in df.columns:
            df[c] = None
    df = df.astype({"pair": str, "method": str, "status": str, "params": str})
    df["point"] = pd.to_numeric(df["point"]).astype(int)
    df["seed"] = pd.to_numeric(df["seed"]).astype(int)
    for c in ("target_acc", "target_f1", "source_acc", "wall_time_s", "peak_mem_mb"):
        df[c] = pd.to_numeric(df[c], errors="coerce").astype(float)
    bad = sorted(set(df["status"]) - {"ok", "failed", "skipped"})
    if bad:
        raise LeaderboardError(f"unknown run status(es) {bad}; expected ok, failed or skipped")
    return df


def _supersede(df: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """Keep one run per (column, method, point, seed): the latest finished one
    (e.g. after a method's version was bumped and the suite rerun)."""
    order = df.assign(
        _fin=df["finished_at"].fillna("").astype(str), _key=df["key"].fillna("").astype(str)
    ).sort_values(["column", "method", "point", "seed", "_fin", "_key"], kind="mergesort")
    kept = order.drop_duplicates(["column", "method", "point", "seed"], keep="last").drop(columns=["_fin", "_key"])
    return kept, len(df) - len(kept)


# ---------------------------------------------------------------- compute


def compute_leaderboard(
    runs: Iterable[Mapping[str, Any]] | pd.DataFrame,
    validator: str | None = None,
    *,
    reference_method: str = "source-only",
    oracle_method: str = "target-oracle",
    suite: str | None = None,
) -> Leaderboard:
    """Build a :class:`Leaderboard` from run rows of one store.

    ``runs`` are ``RunStore.rows()`` dicts (or a DataFrame of them).
    ``validator`` names the validator used to choose among several
    hyperparameter points of a (pair, method) (its scores are the
    ``val_<validator>`` columns); with ``None`` every (pair, method) must have
    a single point.  ``reference_method`` is the baseline for gaps and
    forgetting (ranked like any method); ``oracle_method`` and every method
    whose runs have ``reference`` set are shown but never ranked.  ``suite``
    keeps only that suite's runs (required when the store holds several).
    """
    df = _frame(runs)

    suites = sorted({str(s) for s in df["suite"] if not _isnan(s)})
    if suite is not None:
        df = df[df["suite"] == suite]
        if df.empty:
            raise LeaderboardError(f"no runs of suite {suite!r}; the runs are from suite(s) {suites}")
        suites = [suite]
    elif len(suites) > 1:
        raise LeaderboardError(f"the runs come from several suites {suites}: pass suite=NAME (CLI: --suite NAME)")

    df = df.assign(column=_columns(df))
    df, superseded = _supersede(df)

    val_col = f"val_{validator}" if validator else None
    available = sorted(c[4:] for c in df.columns if c.startswith("val_"))

    ref_flag = df.groupby("method")["reference"].agg(lambda s: any(_truthy(v) for v in s))
    reference = {m: bool(ref_flag[m]) or m == oracle_method for m in ref_flag.index}

    # ---- points: one row per (column, method, point)
    point_rows = []
    for (col, m, p), g in df.groupby(["column", "method", "point"], sort=True):
        params = sorted(set(g["params"]))
        if len(params) > 1:
            raise LeaderboardError(
                f"method {m!r} point {p} on pair {col!r} has runs with different hyperparameters {params}: "
                f"the suite's points changed; use a new --results folder for the edited suite"
            )
        ok = g[g["status"] == "ok"]
        point_rows.append({
            "pair": col, "method": m, "point": int(p), "params": params[0],
            "n_ok": len(ok), "n_failed": int((g["status"] == "failed").sum()),
            "n_skipped": int((g["status"] == "skipped").sum()),
            "selection_score": _mean(ok[val_col]) if val_col and val_col in ok.columns else math.nan,
            "target_acc_mean": _mean(ok["target_acc"]),
        })
    points = pd.DataFrame(point_rows)

    # ---- selection per (column, method), never by target accuracy
    selected: dict[tuple[str, str], int] = {}
    for (col, m), g in points.groupby(["pair", "method"], sort=True):
        g = g.sort_values("point")
        if len(g) == 1:
            selected[(col, m)] = int(g["point"].iloc[0])
            continue
        if not validator:
            raise LeaderboardError(
                f"method {m!r} has {len(g)} hyperparameter points on pair {col!r}: pass validator=NAME "
                f"(CLI: --validator NAME) to choose among them without target labels; stored validators: {available}"
            )
        if val_col not in df.columns:
            raise LeaderboardError(
                f"no scores of validator {validator!r} in the store (needed to choose among the {len(g)} points of "
                f"{m!r} on {col!r}); stored validators: {available}"
            )
        scored = g[g["selection_score"].notna()]
        if scored.empty:  # nothing to choose by: fall back to the first point with ok runs, else the first
            with_ok = g[g["n_ok"] > 0]
            selected[(col, m)] = int((with_ok if len(with_ok) else g)["point"].iloc[0])
        else:
            best = scored["selection_score"].max()
            selected[(col, m)] = int(scored[scored["selection_score"] == best]["point"].min())
    points["selected"] = [selected[(r.pair, r.method)] == r.point for r in points.itertuples()]
    points["n_points"] = points.groupby(["pair", "method"])["point"].transform("count").astype(int)

    # ---- the runs that make each cell
    sel_key = set((c, m, p) for (c, m), p in selected.items())
    in_sel = [(c, m, p) in sel_key for c, m, p in zip(df["column"], df["method"], df["point"])]
    sel_runs = df[in_sel]
    ok_runs = sel_runs[sel_runs["status"] == "ok"]

    columns = sorted(set(df["column"]))
    pair_first = {c: df.loc[df["column"] == c].iloc[0] for c in columns}
    methods_all = sorted(set(df["method"]))
    seeds = tuple(sorted(set(int(s) for s in df["seed"])))

    def per_seed(col: str, m: str, metric: str) -> pd.Series:
        r = ok_runs[(ok_runs["column"] == col) & (ok_runs["method"] == m)]
        return r.set_index("seed")[metric].dropna().sort_index()

    family = df.groupby("method")["family"].agg(lambda s: next((str(v) for v in s if not _isnan(v)), ""))

    cell_rows = []
    for m in methods_all:
        for col in columns:
            g = sel_runs[(sel_runs["column"] == col) & (sel_runs["method"] == m)]
            pt = points[(points["pair"] == col) & (points["method"] == m) & points["selected"]]
            row: dict[str, Any] = {
                "method": m, "pair": col, "pair_label": pair_label(col), "family": family.get(m, ""),
                "reference": reference.get(m, False), "ranked": not reference.get(m, False),
            }
            ok = g[g["status"] == "ok"]
            n_failed, n_skipped = int((g["status"] == "failed").sum()), int((g["status"] == "skipped").sum())
            if g.empty:
                status = "not run"
            elif len(ok):
                status = "ok"
            elif n_failed:
                status = "failed"
            else:
                status = "skipped"
            reasons = sorted({str(r) for r in g.loc[g["status"] == "skipped", "reason"] if not _isnan(r)})
            row.update({
                "status": status,
                "skip_reason": "; ".join(reasons) if status == "skipped" else None,
                "point": int(pt["point"].iloc[0]) if len(pt) else None,
                "params": str(pt["params"].iloc[0]) if len(pt) else None,
                "n_points": int(pt["n_points"].iloc[0]) if len(pt) else 0,
                "selection_score": float(pt["selection_score"].iloc[0]) if len(pt) else math.nan,
                "n_seeds_ok": len(ok), "n_failed": n_failed, "n_skipped": n_skipped,
                "target_acc_mean": _mean(ok["target_acc"]), "target_acc_std": _std(ok["target_acc"]),
                "target_f1_mean": _mean(ok["target_f1"]), "source_acc_mean": _mean(ok["source_acc"]),
            })
            for name, metric in (("gap", "target_acc"), ("forgetting", "source_acc")):
                mine, base = per_seed(col, m, metric), per_seed(col, reference_method, metric)
                common = mine.index.intersection(base.index)
                diff = mine.loc[common] - base.loc[common]
                row[f"{name}_mean"] = float(diff.mean()) if len(diff) else math.nan
                if name == "gap":
                    row["gap_std"] = float(diff.std(ddof=1)) if len(diff) > 1 else math.nan
                row[f"{name}_n"] = int(len(diff))
            row["rank"] = math.nan
            row["wall_time_s_mean"] = _mean(ok["wall_time_s"])
            row["peak_mem_mb_mean"] = _mean(ok["peak_mem_mb"])
            first = pair_first[col]
            row["protocol"] = None if _isnan(first["protocol"]) else str(first["protocol"])
            row["budget"] = None if _isnan(first["budget"]) else str(first["budget"])
            cell_rows.append(row)
    cells = pd.DataFrame(cell_rows)
    # a fixed column order for the CSV
    order = ["method", "pair", "pair_label", "family", "reference", "ranked", "status", "skip_reason", "point",
             "params", "n_points", "selection_score", "n_seeds_ok", "n_failed", "n_skipped", "target_acc_mean",
             "target_acc_std", "target_f1_mean", "source_acc_mean", "gap_mean", "gap_std", "gap_n",
             "forgetting_mean", "forgetting_n", "rank", "wall_time_s_mean", "peak_mem_mb_mean", "protocol", "budget"]
    cells = cells[order]

    # ---- ranks per pair among ranked methods with a result
    has = (cells["status"] == "ok") & cells["ranked"] & cells["target_acc_mean"].notna()
    for col in columns:
        idx = cells.index[has & (cells["pair"] == col)]
        acc = cells.loc[idx, "target_acc_mean"].round(_RANK_DECIMALS)
        cells.loc[idx, "rank"] = acc.rank(ascending=False, method="average")

    # ---- per-method summary
    n_pairs = len(columns)
    meth_rows = []
    for m in methods_all:
        c = cells[cells["method"] == m]
        res = c[(c["status"] == "ok") & c["target_acc_mean"].notna()]
        r_all = df[df["method"] == m]
        ok_all = r_all[r_all["status"] == "ok"]
        meth_rows.append({
            "method": m, "family": family.get(m, ""), "reference": reference[m], "ranked": not reference[m],
            "baseline": m == reference_method,
            "n_pairs": n_pairs, "n_pairs_ok": len(res), "complete": len(res) == n_pairs,
            "mean_acc": float(res["target_acc_mean"].mean()) if len(res) else math.nan,
            "avg_rank": float(res["rank"].mean()) if len(res) and not reference[m] else math.nan,
            "n_ranked_pairs": int(res["rank"].notna().sum()),
            "mean_gap": _mean(c["gap_mean"]), "mean_forgetting": _mean(c["forgetting_mean"]),
            "n_runs": len(r_all), "n_ok": len(ok_all), "n_failed": int((r_all["status"] == "failed").sum()),
            "n_skipped": int((r_all["status"] == "skipped").sum()),
            "wall_time_s_mean": _mean(ok_all["wall_time_s"]),
            "wall_time_s_total": float(ok_all["wall_time_s"].dropna().sum()),
            "peak_mem_mb_mean": _mean(ok_all["peak_mem_mb"]),
            "peak_mem_mb_max": float(ok_all["peak_mem_mb"].max()) if ok_all["peak_mem_mb"].notna().any() else math.nan,
        })
    methods = pd.DataFrame(meth_rows)
    methods = methods.assign(
        _ref=methods["reference"].astype(int),
        _norank=methods["avg_rank"].isna().astype(int),
        _rank=methods["avg_rank"].fillna(0.0).round(_RANK_DECIMALS),
        _acc=-methods["mean_acc"].fillna(-1.0).round(_RANK_DECIMALS),
    ).sort_values(["_ref", "_norank", "_rank", "_acc", "method"], kind="mergesort")
    methods = methods.drop(columns=["_ref", "_norank", "_rank", "_acc"]).reset_index(drop=True)

    pos_m = {m: i for i, m in enumerate(methods["method"])}
    pos_c = {c: i for i, c in enumerate(columns)}
    cells = cells.assign(_m=cells["method"].map(pos_m), _c=cells["pair"].map(pos_c))
    cells = cells.sort_values(["_m", "_c"]).drop(columns=["_m", "_c"]).reset_index(drop=True)

    issues = df[df["status"] != "ok"][["status", "method", "column", "point", "params", "seed", "reason"]]
    issues = issues.rename(columns={"column": "pair"}).assign(pair_label=lambda d: d["pair"].map(pair_label))
    issues = issues.sort_values(["status", "method", "pair", "point", "seed"], kind="mergesort").reset_index(drop=True)

    runs_out = ok_runs.rename(columns={"pair": "store_pair", "column": "pair"})
    runs_out = runs_out.sort_values(["method", "pair", "seed"], kind="mergesort").reset_index(drop=True)

    settings = {
        k: tuple(sorted({str(v) for v in df[k] if not _isnan(v)})) for k in ("protocol", "budget", "backbone")
    }
    return Leaderboard(
        suite=suites[0] if len(suites) == 1 else None,
        validator=validator,
        reference_method=reference_method,
        oracle_method=oracle_method,
        pairs=tuple(columns),
        pair_labels=tuple(pair_label(c) for c in columns),
        seeds=seeds,
        settings=settings,
        cells=cells,
        methods=methods,
        points=points.sort_values(["pair", "method", "point"]).reset_index(drop=True),
        runs=runs_out,
        issues=issues,
        superseded_runs=int(superseded),
    )


def build_leaderboard(
    store_folder: str | Path,
    validator: str | None = None,
    *,
    reference_method: str = "source-only",
    oracle_method: str = "target-oracle",
    suite: str | None = None,
) -> Leaderboard:
    """Read a results folder's run store and :func:`compute_leaderboard` it."""
    from .store import RunStore

    store = RunStore(store_folder, create=False)
    try:
        rows = store.rows()
    finally:
        store.close()
    return compute_leaderboard(
        rows, validator, reference_method=reference_method, oracle_method=oracle_method, suite=suite
    )


# ---------------------------------------------------------------- renderers


def _pct(x: Any) -> str:
    return "—" if _isnan(x) else f"{100 * float(x):.1f}"


def _signed_pct(x: Any) -> str:
    if _isnan(x):
        return "—"
    s = f"{100 * float(x):+.1f}"
    return "+0.0" if s == "-0.0" else s


def _num(x: Any, fmt: str) -> str:
    return "—" if _isnan(x) else format(float(x), fmt)


def _md_escape(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _md_table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[bool]) -> list[str]:
    """A padded GitHub-style pipe table (plain string widths: deterministic)."""
    cells = [[_md_escape(h) for h in headers]] + [[_md_escape(c) for c in r] for r in rows]
    widths = [max(3, *(len(r[i]) for r in cells)) for i in range(len(headers))]

    def line(r: Sequence[str]) -> str:
        return "| " + " | ".join(c.rjust(w) if rt else c.ljust(w) for c, w, rt in zip(r, widths, right)) + " |"

    sep = "| " + " | ".join(("-" * (w - 1) + ":") if rt else "-" * w for w, rt in zip(widths, right)) + " |"
    return [line(cells[0]), sep] + [line(r) for r in cells[1:]]


def _method_label(board: Leaderboard, row: Mapping[str, Any]) -> str:
    if row["reference"]:
        return f"{row['method']} (reference)"
    if row["method"] == board.reference_method:
        return f"{row['method']} (baseline)"
    return str(row["method"])


def _seed_list(seeds: Iterable[Any]) -> str:
    return ", ".join(str(int(s)) for s in seeds)


def to_markdown(board: Leaderboard) -> str:
    """The report as Markdown: the main table, selected hyperparameters,
    source accuracy/forgetting, cost per run, and failed/skipped runs."""
    out: list[str] = []
    title = f"Leaderboard: {board.suite}" if board.suite else "Leaderboard"
    out += [f"# {title}", ""]
    if board.validator:
        out.append(
            f"Hyperparameters selected by validator `{board.validator}` (highest mean score over seeds; "
            f"target labels never used)."
        )
    else:
        out.append("Hyperparameters: one point per method and pair (no selection).")
    out.append(f"Seeds: {len(board.seeds)} ({_seed_list(board.seeds)}).")
    for key, name in (("protocol", "Protocol"), ("budget", "Budget"), ("backbone", "Backbone")):
        vals = board.settings.get(key, ())
        if vals:
            out.append(f"{name}: " + "; ".join(f"`{v}`" for v in vals) + ".")
    if board.superseded_runs:
        out.append(
            f"{board.superseded_runs} older run(s) superseded by a later run of the same "
            f"(pair, method, point, seed) are left out."
        )
    out += [
        "",
        f"Cells: target accuracy (%) as mean ± sample std over seeds; in parentheses the gap to "
        f"`{board.reference_method}` in percentage points, averaged over the seeds both have ok. "
        f"Mean: over pairs. Avg rank: over pairs, 1 = best, ties share the average rank; "
        f"reference rows use target labels and are not ranked.",
        "",
    ]

    n_max = max([int(n) for n in board.cells["n_seeds_ok"]] + [0])
    notes: dict[str, int] = {}
    partial: list[str] = []
    rows = []
    for mrow in board.methods.to_dict("records"):
        m = mrow["method"]
        line = [_method_label(board, mrow)]
        for col in board.pairs:
            c = board.cell(m, col)
            if c["status"] == "ok":
                s = f"{_pct(c['target_acc_mean'])} ± {_pct(c['target_acc_std'])}"
                if not _isnan(c["gap_mean"]):
                    s += f" ({_signed_pct(c['gap_mean'])})"
                if int(c["n_seeds_ok"]) < n_max:
                    s += f" [n={int(c['n_seeds_ok'])}]"
            elif c["status"] == "skipped":
                reason = c["skip_reason"] or "no reason given"
                notes.setdefault(reason, len(notes) + 1)
                s = f"skipped [{notes[reason]}]"
            else:
                s = str(c["status"])
            line.append(s)
        mean = _pct(mrow["mean_acc"])
        if not mrow["complete"] and not _isnan(mrow["mean_acc"]):
            mean += "*"
            missing = [pair_label(c) for c in board.pairs if board.cell(m, c)["status"] != "ok"]
            partial.append(f"{m}: {mrow['n_pairs_ok']} of {mrow['n_pairs']} pairs (no result on {', '.join(missing)})")
        line.append(mean)
        line.append("—" if _isnan(mrow["avg_rank"]) else f"{float(mrow['avg_rank']):.2f}")
        rows.append(line)
    headers = ["Method", *board.pair_labels, "Mean", "Avg rank"]
    out += _md_table(headers, rows, [False] + [False] * len(board.pairs) + [True, True])
    if n_max and any(int(n) < n_max for n in board.cells.loc[board.cells["status"] == "ok", "n_seeds_ok"]):
        out += ["", "[n=k]: only k seeds ok in that cell (the others failed or are missing)."]
    if notes:
        out.append("")
        out += [f"[{i}] skipped: {_md_escape(reason)}" for reason, i in notes.items()]
    if partial:
        out += ["", "\\* mean over the pairs with a result only:"]
        out += [f"- {p}" for p in partial]

    multi = board.cells[(board.cells["n_points"] > 1)]
    if len(multi):
        out += ["", "## Selected hyperparameters", ""]
        score = f"{board.validator} (mean)" if board.validator else "score"
        rows = [
            [r["method"], r["pair_label"], str(int(r["point"])), f"`{r['params']}`", _num(r["selection_score"], ".4g"),
             str(int(r["n_points"]))]
            for r in multi.to_dict("records")
        ]
        out += _md_table(["Method", "Pair", "Point", "Params", score, "Points"], rows,
                         [False, False, True, False, True, True])

    out += [
        "",
        "## Source accuracy after adaptation",
        "",
        f"Source test accuracy (%) mean over seeds; in parentheses forgetting: method − `{board.reference_method}` "
        f"source accuracy in percentage points, paired by seed (negative = source accuracy lost).",
        "",
    ]
    rows = []
    for mrow in board.methods.to_dict("records"):
        line = [_method_label(board, mrow)]
        for col in board.pairs:
            c = board.cell(mrow["method"], col)
            if c["status"] != "ok" or _isnan(c["source_acc_mean"]):
                line.append("—")
                continue
            s = _pct(c["source_acc_mean"])
            if not _isnan(c["forgetting_mean"]):
                s += f" ({_signed_pct(c['forgetting_mean'])})"
            line.append(s)
        rows.append(line)
    out += _md_table(["Method", *board.pair_labels], rows, [False] * (1 + len(board.pairs)))

    out += ["", "## Cost per run", "", "Mean over ok runs of every hyperparameter point.", ""]
    rows = [
        [_method_label(board, r), str(int(r["n_ok"])), _num(r["wall_time_s_mean"], ".2f"),
         _num(r["wall_time_s_total"], ".1f"), _num(r["peak_mem_mb_mean"], ".1f")]
        for r in board.methods.to_dict("records")
    ]
    out += _md_table(["Method", "Runs ok", "Wall time (s)", "Total wall time (s)", "Peak memory (MB)"], rows,
                     [False, True, True, True, True])

    out += ["", "## Failed and skipped runs", ""]
    if board.issues.empty:
        out.append("None.")
    else:
        groups = board.issues.assign(reason=board.issues["reason"].fillna("no reason given").astype(str))
        for (status, m, pair, point, params, reason), g in groups.groupby(
            ["status", "method", "pair", "point", "params", "reason"], sort=True
        ):
            seeds = _seed_list(sorted(g["seed"]))
            label = "seed" if len(g) == 1 else "seeds"
            out.append(
                f"- {status}: {m} on {pair_label(pair)}, point {int(point)} `{params}`, {label} {seeds}: "
                f"{_md_escape(reason)}"
            )
    return "\n".join(out) + "\n"


def to_csv(board: Leaderboard) -> str:
    """Tidy long CSV: one row per (method, pair) with every number (fractions)."""
    return board.cells.to_csv(index=False, lineterminator="\n")


def _plain(v: Any) -> Any:
    if isinstance(v, (np.bool_, bool)):
        return bool(v)
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, (np.floating, float)):
        return None if math.isnan(float(v)) else float(v)
    if v is None or (not isinstance(v, str) and pd.isna(v)):
        return None
    return v


def _records(df: pd.DataFrame) -> list[dict[str, Any]]:
    return [{k: _plain(v) for k, v in r.items()} for r in df.to_dict("records")]


def to_json(board: Leaderboard) -> str:
    """Every number and flag of the board as JSON (fractions; NaN -> null)."""
    doc = {
        "format": "dabench-leaderboard",
        "format_version": JSON_FORMAT_VERSION,
        "suite": board.suite,
        "validator": board.validator,
        "reference_method": board.reference_method,
        "oracle_method": board.oracle_method,
        "pairs": [{"pair": p, "label": lab} for p, lab in zip(board.pairs, board.pair_labels)],
        "seeds": list(board.seeds),
        "settings": {k: list(v) for k, v in board.settings.items()},
        "superseded_runs": board.superseded_runs,
        "methods": _records(board.methods),
        "cells": _records(board.cells),
        "points": _records(board.points),
        "issues": _records(board.issues),
    }
    return json.dumps(doc, indent=2, ensure_ascii=False, allow_nan=False) + "\n"


_RENDERERS = {"md": to_markdown, "csv": to_csv, "json": to_json}


def write_reports(
    store_folder: str | Path,
    out_dir: str | Path,
    validator: str | None = None,
    *,
    formats: Sequence[str] = ("md", "csv"),
    reference_method: str = "source-only",
    oracle_method: str = "target-oracle",
    suite: str | None = None,
) -> dict[str, Path]:
    """Write ``leaderboard.<fmt>`` for each of ``formats`` (``md``, ``csv``,
    ``json``) into ``out_dir``; return ``{fmt: path}``."""
    unknown = [f for f in formats if f not in _RENDERERS]
    if unknown:
        raise LeaderboardError(f"unknown report format(s) {unknown}; choose from {sorted(_RENDERERS)}")
    board = build_leaderboard(
        store_folder, validator, reference_method=reference_method, oracle_method=oracle_method, suite=suite
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for fmt in formats:
        path = out / f"leaderboard.{fmt}"
        with open(path, "w", encoding="utf-8", newline="\n") as f:
            f.write(_RENDERERS[fmt](board))
        paths[fmt] = path
    return paths
