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
  selected point; the gap to the pair's reference (source-only; target-only-k
  where the protocol gives labelled target samples or native feature spaces)
  as the mean of per-seed differences over the seeds both have ok, with a
  one-sided paired t-test over seeds per cell and the cell's minimum
  detectable effect (:mod:`dabench.verdicts`, calibrated by
  ``benchmarks/calibration``), and a verdict (negative transfer / n.s. /
  better); run health (:mod:`dabench.health`): cells whose adaptation never
  engaged or with a failed training are marked and are not findings; a
  label-free warning score and how well it predicts that verdict; an
  oracle-selection table (upper bound) and each validator's selection gap;
  source accuracy and forgetting (method source accuracy minus source-only
  source accuracy, paired by seed: negative means source accuracy was lost).
- Ranks (:mod:`dabench.ranking`): references (the baseline, each pair's
  reference, rows that use target labels) are not ranked; ranked methods
  applying to the same pairs are ranked by mean target accuracy (1 = best,
  ties share the average rank) over the pairs where each of them has a
  finding, and a method's average rank is over those pairs.
- Tracks (:mod:`dabench.tracks`): every row has the track its method ran
  under (``uda``, ``source-free``, ``test-time``; runs stored before the
  field existed are ``uda``).  Ranks are computed **within a track** only
  (the tracks give methods different data: a rank group never mixes
  tracks); the reference of every track is the same untouched source model
  (``source-only``), so gaps and negative-transfer verdicts are comparable
  across tracks.
- Suspicion (too good to be true): a cell whose method beats the pair's
  target-oracle reference by more than the seed spread (the two sample
  standard deviations added, at least :data:`SUSPICION_MARGIN`), or reaches
  near-perfect target accuracy (at least :data:`NEAR_PERFECT`) where the
  oracle does not, is flagged and left out of the ranks until a person
  clears it (``cleared``: ``METHOD`` or ``METHOD:SOURCE:TARGET``; the suite
  key ``cleared`` or ``--clear``).  Plugins are trusted code; this flag is
  how a method that found the labels some other way shows up.
- Memory: ``rss_peak_mb`` (the resident memory a run added above its
  worker's at the run's start) and ``gpu_peak_mb`` (the CUDA allocator's
  peak) are reported apart.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Collection, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from .health import ENGAGEMENT_RULES, FAILED_TRAINING_RULE, RunHealth, cell_engagement, run_health
from .ranking import RankGroup, rank_cells
from .verdicts import NT_ALPHA as _VERDICT_ALPHA
from .verdicts import NT_POWER, decode_bits, minimum_detectable_effect, nt_verdict, point_sd

__all__ = [
    "Leaderboard",
    "LeaderboardError",
    "build_leaderboard",
    "compute_leaderboard",
    "pair_label",
    "render",
    "to_csv",
    "to_json",
    "to_html",
    "to_markdown",
    "write_reports",
]

#: Version of the JSON layout written by :func:`to_json`.
JSON_FORMAT_VERSION = 3

#: Columns a run row must have.
_REQUIRED = ("pair", "method", "point", "seed", "status", "params")

#: Optional columns, filled with missing values when a row lacks them.
_OPTIONAL = (
    "key", "suite", "method_version", "family", "reference", "protocol", "budget", "backbone", "track", "reason",
    "target_acc", "target_f1", "source_acc", "wall_time_s", "rss_peak_mb", "gpu_peak_mb", "finished_at",
    "device", "threads", "torch_version",
)

#: Display order of the tracks (dabench.contract.TRACKS); unknown tracks sort after them.
TRACK_ORDER = ("uda", "source-free", "test-time")

#: A method beating the target-oracle by more than this (and more than the
#: two cells' seed spreads added) is flagged as suspicious.
SUSPICION_MARGIN = 0.01
#: Target accuracy counted as near-perfect: a method reaching it where the
#: target-oracle does not is flagged as suspicious.
NEAR_PERFECT = 0.99

#: What besides the suite determines a run's result, as stored with it:
#: ``Leaderboard.settings`` key -> run column.  ``not recorded`` stands for
#: runs stored without it (by an older dabench).
RESULT_SETTINGS = {"torch": "torch_version", "threads": "threads", "device": "device"}

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
      forgetting_n, rank, wall_time_s_mean, rss_peak_mb_mean, gpu_peak_mb_mean, protocol,
      budget``, the health columns ``engagement`` (``engaged``/``partly``/
      ``never``/None), ``engagement_note``, ``n_failed_training``,
      ``failed_training_note``, ``health`` (``ok``, ``not engaged``,
      ``failed training``), then the negative-transfer columns
      ``nt_reference`` (the pair's reference: source-only, or target-only-k
      with labelled target samples or native feature spaces; ``gap_*`` are
      against it), ``nt_n``, ``nt_t``, ``nt_p`` (two-sided), ``nt_p_worse``,
      ``nt_p_better`` (one-sided: the verdict's), ``nt_p_holm``, ``nt_mde``
      (minimum detectable loss), ``nt_flag`` (``negative transfer``,
      ``n.s.``, ``better``, ``n/a``, or ``failed training`` / ``not
      engaged`` / ``reference failed`` for cells that are not findings), the
      label-free warning's scores ``warn_*`` and ``warn_flag``, the
      suspicion columns ``suspicious`` (flagged and not cleared: left out of
      the ranks), ``suspicion`` (the reason, also when cleared) and
      ``suspicion_cleared``, and last the mean of every recorded health
      signal ``diag_<name>``.
    - ``selection``: per (method, pair, validator) with several points, the
      validator's and the oracle's choice and the selection gap.
    - ``nt_test`` and ``warning_eval``: the test's settings (and a power
      warning), and the warning's precision, recall and AUROC.
    - ``methods``: one row per method in display order (ranked methods by
      rank group and average rank, then the baseline and reference rows),
      with ``mean_acc`` (over the pairs with a result), ``complete`` (a result
      on every pair), ``avg_rank``, ``rank_group``,
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
    #: per (method, pair, validator): the point each validator picks and the
    #: oracle's (best mean target accuracy; an upper bound), and the gap
    selection: pd.DataFrame = field(default_factory=pd.DataFrame, repr=False)
    #: the negative-transfer test: name, alpha, correction, seeds, warnings
    nt_test: Mapping[str, Any] = field(default_factory=dict)
    #: how well the label-free warning predicts the labelled verdict
    warning_eval: Mapping[str, Any] = field(default_factory=dict)
    #: the methods ranked together and the pairs they are ranked over (:mod:`dabench.ranking`)
    rank_groups: tuple[RankGroup, ...] = ()
    #: the suspicion check's settings: oracle, margin, near-perfect level, cleared flags
    suspicion: Mapping[str, Any] = field(default_factory=dict)
    #: published numbers the suite cites (see :mod:`dabench.published`)
    published: Sequence[Mapping[str, Any]] = ()

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
        def flat(v: tuple[str, str], parts: tuple[int, ...]) -> dict[str, Any]:
            d: dict[str, Any] = {}
            for i in parts:
                obj = _json_obj(v[i])
                if isinstance(obj, dict):
                    d.update({str(k): val for k, val in obj.items()})
            return d

        # name variants by their differing protocol keys when those tell them
        # apart, else by the differing protocol and budget keys
        for parts in ((0,), (0, 1)):
            flats = {v: flat(v, parts) for v in variants}
            suffixes = {v: _variant_suffix(flats[v], [flats[o] for o in variants if o != v]) for v in variants}
            if all(suffixes.values()) and len(set(suffixes.values())) == len(variants):
                break
        names: dict[tuple[str, str], str] = {}
        for v in variants:
            suffix = suffixes[v] or f"variant {variants.index(v) + 1}"
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
    for c in ("target_acc", "target_f1", "source_acc", "wall_time_s", "rss_peak_mb", "gpu_peak_mb"):
        df[c] = pd.to_numeric(df[c], errors="coerce").astype(float)
    df["track"] = [("uda" if _isnan(t) or not str(t) else str(t)) for t in df["track"]]
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


# ---------------------------------------------------------------- negative transfer

#: The reference on pairs that give the method target labels (k_target > 0)
#: or native (heterogeneous) feature spaces: a model trained on the k
#: labelled target samples alone.
FEWSHOT_REFERENCE = "target-only-k"
#: Per-cell significance level of the negative-transfer test (one-sided; see :mod:`dabench.verdicts`).
NT_ALPHA = _VERDICT_ALPHA
#: The loss a verdict should be able to see: the report lists the tested cells whose minimum
#: detectable effect is larger (their "n.s." cannot exclude a loss of this size).
NT_VISIBLE_LOSS = 0.05
#: The label-free warning fires when its score exceeds this.
WARN_THRESHOLD = 0.05
#: The label-free warning's score (see :func:`_negative_transfer`).
WARN_SCORE = "warn_prior_drift_beyond_noise"

NT_FLAGS = ("negative transfer", "n.s.", "better")
#: Verdicts of cells that are not findings (see :mod:`dabench.health`).
HEALTH_FLAGS = ("failed training", "not engaged", "reference failed")

#: Per-cell health columns (see :func:`_health_columns`).
HEALTH_COLUMNS = ("engagement", "engagement_note", "n_failed_training", "failed_training_note", "health")


def _health_columns(runs: Sequence[tuple[int, RunHealth]]) -> dict[str, Any]:
    """A cell's health from its ok runs ``(seed, health)``: engagement
    (``engaged``/``partly``/``never``/None) with a note, failed trainings, and
    ``health``: ``failed training`` (any run), ``not engaged`` (never) or ``ok``."""
    eng, note = cell_engagement([h for _, h in runs])
    failed = [(s, h.failed_training) for s, h in runs if h.failed_training]
    health = "failed training" if failed else "not engaged" if eng == "never" else "ok"
    return {
        "engagement": eng, "engagement_note": note or None, "n_failed_training": len(failed),
        "failed_training_note": "; ".join(f"seed {s}: {why}" for s, why in failed) or None, "health": health,
    }


def _pair_reference(protocol: Any, default: str) -> str:
    """``target-only-k`` where the protocol gives labelled target data or
    native feature spaces, else ``default`` (source-only)."""
    obj = _json_obj(protocol)
    if isinstance(obj, dict):
        try:
            k = int(obj.get("k_target") or 0)
        except (TypeError, ValueError):
            k = 0
        if k > 0 or obj.get("feature_space") == "native":
            return FEWSHOT_REFERENCE
    return default


def paired_t_test(diffs: Sequence[float]) -> tuple[float, float]:
    """Two-sided paired t-test of ``mean(diffs) = 0``: ``(t, p)``.

    With zero spread the statistic is undefined (``t`` is NaN): identical
    non-zero differences in every seed give ``p = 0``, all-zero ones ``p = 1``.
    """
    from scipy import stats

    d = np.asarray(diffs, dtype=np.float64)
    n = len(d)
    if n < 2:
        return math.nan, math.nan
    mean, sd = float(d.mean()), float(d.std(ddof=1))
    if sd <= 1e-12 * max(1.0, abs(mean)):
        return (math.nan, 0.0) if abs(mean) > 1e-12 else (math.nan, 1.0)
    t = mean / (sd / math.sqrt(n))
    return t, float(2 * stats.t.sf(abs(t), df=n - 1))


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (NaN stays NaN and is not counted)."""
    p = [float(x) for x in pvalues]
    idx = [i for i, x in enumerate(p) if not math.isnan(x)]
    m = len(idx)
    out = [math.nan] * len(p)
    running = 0.0
    for rank, i in enumerate(sorted(idx, key=lambda i: p[i])):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out


def _prior(row: Mapping[str, Any], kind: str) -> np.ndarray | None:
    # a frame of several pairs has x_prior_* columns for the largest class count: NaN beyond this pair's
    keys = sorted((k for k in row if k.startswith(f"x_prior_{kind}_") and not _isnan(row[k])),
                  key=lambda k: int(k.rsplit("_", 1)[1]))
    if not keys or [int(k.rsplit("_", 1)[1]) for k in keys] != list(range(len(keys))):
        return None
    return np.asarray([row[k] for k in keys], dtype=np.float64)


def _preds(row: Mapping[str, Any]) -> np.ndarray | None:
    text = row.get("x_target_pred")
    if not isinstance(text, str) or not text:
        return None
    return np.asarray([int(c) for c in text.split(",")])


def _warning_scores(mine: Mapping[str, Any], ref: Mapping[str, Any], validators: Sequence[str]) -> dict[str, float]:
    """Label-free scores of one seed's method run against the reference run
    (higher = more likely negative transfer)."""
    out: dict[str, float] = {}
    pm, pr, q = _prior(mine, "pred"), _prior(ref, "pred"), _prior(ref, "bbse")
    if pm is not None and pr is not None and q is not None and len(pm) == len(pr) == len(q):
        # how much further the method's predicted target class prior is from the
        # reference model's label-shift (BBSE) estimate than the reference's own
        out["warn_prior_drift"] = 0.5 * float(np.abs(pm - q).sum() - np.abs(pr - q).sum())
    a, b = _preds(mine), _preds(ref)
    if a is not None and b is not None and len(a) == len(b) and len(a):
        out["warn_disagreement"] = float((a != b).mean())
    for v in validators:
        x, y = mine.get(f"val_{v}"), ref.get(f"val_{v}")
        if not _isnan(x) and not _isnan(y):
            out[f"warn_val_{v}"] = float(y) - float(x)  # the validator got worse
    return out


def _prior_spread(runs: Sequence[Mapping[str, Any]]) -> float:
    """Mean pairwise total variation between the predicted target priors of
    ``runs`` (one per seed); 0 with fewer than two."""
    priors = [p for p in (_prior(r, "pred") for r in runs) if p is not None]
    tv = [0.5 * float(np.abs(a - b).sum()) for i, a in enumerate(priors) for b in priors[i + 1:] if len(a) == len(b)]
    return float(np.mean(tv)) if tv else 0.0


def _negative_transfer(
    cells: pd.DataFrame, ok_runs: pd.DataFrame, pair_ref: Mapping[str, str],
    reference: Mapping[str, bool], validators: Sequence[str],
    failed_training: Collection[tuple[str, str, int]] = (),
) -> pd.DataFrame:
    """Add the labelled negative-transfer verdict and the label-free warning
    to every (method, pair) cell.

    Verdict (:func:`dabench.verdicts.nt_verdict`): the per-seed
    target-accuracy differences to the pair's reference run of the same seed,
    a one-sided paired t-test per cell at ``NT_ALPHA`` for "worse" (flag
    ``negative transfer``) and for "better" (``better``), else ``n.s.``, whose
    spread is never taken below the test points' sampling spread of a gap
    (``nt_point_sd``, from the stored per-point correctness), with the
    cell's minimum detectable effect ``nt_mde`` (the loss flagged with 80 %
    probability given that spread and the seed count); ``n/a`` for the
    reference itself, reference rows (target-supervised), and cells with fewer
    than 2 paired seeds.  Cells that are not findings get their health as
    verdict: ``failed training`` (a run of the cell), ``not engaged``
    (adaptation never engaged), ``reference failed`` (a paired reference run
    failed training); their numbers stay in the table.  ``nt_p`` is the
    two-sided p-value and ``nt_p_holm`` its Holm-Bonferroni adjustment over
    each method's tested pairs (a family-wise reading; not the verdict).

    Warning (no target labels): per seed, the method's mean predicted target
    class distribution is compared with the reference model's BBSE estimate
    of the target class prior (from source-validation confusions and target
    predictions); the score is how much further (total variation) the
    method's predictions are from that estimate than the reference's own
    predictions, averaged over seeds, minus the reference's seed-to-seed
    spread of its predicted prior (where the reference itself is unstable,
    e.g. extrapolating under covariate shift, its estimate is not trusted;
    ``warn_prior_drift_beyond_noise``).  Marginal alignment under a class-prior
    change pulls the predicted target prior towards the source prior
    (Zhao et al., ICML 2019), which this score sees.  Other label-free scores
    (prediction disagreement with the reference, drops of each validator)
    are kept as ``warn_*`` columns so the report can compare them.
    """
    by_run = {(r["pair"], r["method"], int(r["seed"])): r for r in ok_runs.to_dict("records")}
    failed = set(failed_training)
    keys = ("nt_n", "nt_t", "nt_p", "nt_p_worse", "nt_p_better", "nt_point_sd", "nt_mde", "nt_flag")
    cols: dict[str, list[Any]] = {k: [] for k in keys}
    warn_rows: list[dict[str, float]] = []
    for r in cells.to_dict("records"):
        ref = pair_ref[r["pair"]]
        testable = r["status"] == "ok" and r["method"] != ref and not reference.get(r["method"], False)
        diffs, seed_scores, ref_failed, bits = [], [], False, ([], [])
        if testable:
            for (pair, m, seed), run in by_run.items():
                if pair != r["pair"] or m != r["method"]:
                    continue
                base = by_run.get((pair, ref, seed))
                if base is None:
                    continue
                ref_failed |= (pair, ref, seed) in failed
                if not _isnan(run["target_acc"]) and not _isnan(base["target_acc"]):
                    diffs.append(float(run["target_acc"]) - float(base["target_acc"]))
                    bits[0].append(decode_bits(run.get("x_target_correct")))
                    bits[1].append(decode_bits(base.get("x_target_correct")))
                seed_scores.append(_warning_scores(run, base, validators))
        v = nt_verdict(diffs if testable else [], NT_ALPHA, NT_POWER, point_sd=point_sd(*bits) if testable else None)
        if not testable:
            flag = "n/a"
        elif r.get("health") == "failed training":
            flag = "failed training"
        elif ref_failed:
            flag = "reference failed"
        elif r.get("health") == "not engaged":
            flag = "not engaged"
        else:
            flag = v.flag
        two_sided = min(1.0, 2 * min(v.p_worse, v.p_better)) if v.n >= 2 else math.nan
        for k, x in zip(keys, (v.n, v.t, two_sided, v.p_worse, v.p_better, v.point_sd, v.mde, flag)):
            cols[k].append(x)
        names = sorted({k for d in seed_scores for k in d})
        w = {k: float(np.mean([d[k] for d in seed_scores if k in d])) for k in names}
        if "warn_prior_drift" in w:
            # the same drift, less the reference's own seed-to-seed spread of its predicted target prior
            # (mean pairwise total variation): drift within the reference's noise is not evidence
            w["warn_prior_drift_beyond_noise"] = w["warn_prior_drift"] - _prior_spread(
                [run for (pair, m, _), run in by_run.items() if pair == r["pair"] and m == ref])
        warn_rows.append(w)
    out = cells.assign(**cols)
    out["nt_p_holm"] = math.nan
    for m, idx in out.groupby("method").groups.items():
        out.loc[idx, "nt_p_holm"] = holm(out.loc[idx, "nt_p"].tolist())
    order = [c for c in out.columns if c not in ("nt_p_holm", "nt_point_sd", "nt_mde", "nt_flag")]
    i = order.index("nt_p_better") + 1
    out = out[order[:i] + ["nt_p_holm", "nt_point_sd", "nt_mde", "nt_flag"] + order[i:]]
    warn = pd.DataFrame(warn_rows, index=out.index)
    for c in ["warn_prior_drift", "warn_prior_drift_beyond_noise", "warn_disagreement",
              *[f"warn_val_{v}" for v in validators]]:
        out[c] = warn[c] if c in warn.columns else math.nan
    out["warn_flag"] = [
        (bool(s > WARN_THRESHOLD) if not _isnan(s) else None) for s in out[WARN_SCORE]
    ]
    return out


def _nt_test_info(cells: pd.DataFrame, seeds: Sequence[int]) -> dict[str, Any]:
    """What the report prints about the test: its settings, what the cells
    could see (minimum detectable effects) and a warning where a cell cannot
    see a loss of ``NT_VISIBLE_LOSS``."""
    from .verdicts import CALIBRATION

    tested = cells[cells["nt_flag"].isin(NT_FLAGS)]
    n = int(tested["nt_n"].min()) if len(tested) else 0
    per_method = tested.groupby("method").size()
    m = int(per_method.max()) if len(per_method) else 0
    mde = tested["nt_mde"].astype(float)
    blind = tested[~(mde <= NT_VISIBLE_LOSS)]
    info: dict[str, Any] = {
        "test": "one-sided paired t-test over seeds per cell (method vs the pair's reference, same seed), its "
                "spread never below the test points' sampling spread of a gap: negative transfer when "
                "significantly worse, better when significantly better",
        "correction": f"none: each cell is tested at level {NT_ALPHA}, so about {NT_ALPHA:.0%} of the cells without "
                      f"an effect are flagged by chance; nt_p_holm (CSV, JSON) is the two-sided p-value "
                      f"Holm-adjusted over each method's pairs, for a family-wise reading",
        "alpha": NT_ALPHA,
        "power": NT_POWER,
        "visible_loss": NT_VISIBLE_LOSS,
        "mde_rule": f"the loss the test flags with {NT_POWER:.0%} probability given the cell's spread of per-seed "
                    f"gaps (as the test uses it) and its number of paired seeds (noncentral t)",
        "n_seeds": len(seeds),
        "min_paired_seeds": n,
        "max_pairs_per_method": m,
        "n_cells_tested": int(len(tested)),
        "n_cells_not_findings": int(cells["nt_flag"].isin(HEALTH_FLAGS).sum()),
        "median_mde": float(mde.median()) if len(tested) else math.nan,
        "n_cells_mde_above_visible_loss": int(len(blind)),
        "reference_rule": f"{FEWSHOT_REFERENCE} on pairs with k_target > 0 or native feature spaces, "
                          f"else the baseline",
        "calibration": CALIBRATION,
        "power_warning": None,
    }
    if len(blind):
        sds = np.fmax(tested["gap_std"].astype(float), tested["nt_point_sd"].astype(float))
        more = [f"{k} seeds {sum(minimum_detectable_effect(sd, k) <= NT_VISIBLE_LOSS for sd in sds)}"
                for k in (5, 10, 20) if k > n]
        info["power_warning"] = (
            f"{len(blind)} of {len(tested)} tested cells cannot see a loss of {100 * NT_VISIBLE_LOSS:.0f} points "
            f"(their MDE is larger; median MDE {100 * info['median_mde']:.1f} points with {n} paired seeds): "
            f"'n.s.' there does not mean 'no effect'"
            + (f". At the same spread, the cells that could see it would number: " + ", ".join(more)
               + f" (of {len(tested)}); run more seeds" if more else "")
        )
    return info


def _evaluate_warning(cells: pd.DataFrame) -> dict[str, Any]:
    """Precision, recall and AUROC of the label-free warning against the
    labelled verdict (positive: ``negative transfer``), over the tested cells
    that have a warning score; the same AUROC for every candidate score."""
    tested = cells[cells["nt_flag"].isin(NT_FLAGS)]
    out: dict[str, Any] = {"score": WARN_SCORE, "threshold": WARN_THRESHOLD}
    have = tested[tested[WARN_SCORE].notna()]
    y = (have["nt_flag"] == "negative transfer").to_numpy()
    warned = np.array([bool(v) for v in have["warn_flag"]], dtype=bool)
    out.update({
        "n_cells": int(len(have)), "n_negative_transfer": int(y.sum()), "n_warned": int(warned.sum()),
        "true_positives": int((y & warned).sum()),
        "precision": float((y & warned).sum() / warned.sum()) if warned.sum() else math.nan,
        "recall": float((y & warned).sum() / y.sum()) if y.sum() else math.nan,
        "auroc": _auroc(y, have[WARN_SCORE].to_numpy()),
    })
    candidates = {}
    for c in sorted(c for c in cells.columns if c.startswith("warn_") and c != "warn_flag"):
        sub = tested[tested[c].notna()]
        candidates[c] = _auroc((sub["nt_flag"] == "negative transfer").to_numpy(), sub[c].to_numpy())
    out["candidate_auroc"] = candidates
    return out


def _auroc(y: np.ndarray, score: np.ndarray) -> float:
    """sklearn's ROC AUC; NaN unless both outcomes occur."""
    if len(y) == 0 or y.all() or not y.any():
        return math.nan
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y.astype(int), score.astype(float)))


def _selection(points: pd.DataFrame, df: pd.DataFrame, validators: Sequence[str], main: str | None) -> pd.DataFrame:
    """Per (method, pair) with several points: the oracle's point (highest
    mean target accuracy, ties to the lowest point: an upper bound that uses
    target labels) and, for each stored validator, its point and the
    selection gap (oracle-selected minus validator-selected accuracy)."""
    rows = []
    for (col, m), g in points.groupby(["pair", "method"], sort=True):
        g = g[g["n_ok"] > 0].sort_values("point")
        if len(g) < 2 or g["target_acc_mean"].isna().all():
            continue
        best = g["target_acc_mean"].max()
        o = g[g["target_acc_mean"] == best].iloc[0]
        for v in validators:
            scored = g[g[f"val_mean_{v}"].notna()]
            if scored.empty:
                continue
            top = scored[f"val_mean_{v}"].max()
            s = scored[scored[f"val_mean_{v}"] == top].iloc[0]
            rows.append({
                "method": m, "pair": col, "pair_label": pair_label(col), "validator": v,
                "main_validator": v == main, "n_points": len(g),
                "point": int(s["point"]), "target_acc_mean": float(s["target_acc_mean"]),
                "oracle_point": int(o["point"]), "oracle_acc_mean": float(o["target_acc_mean"]),
                "oracle_acc_std": float(o["target_acc_std"]),
                "selection_gap": float(o["target_acc_mean"] - s["target_acc_mean"]),
            })
    cols = ["method", "pair", "pair_label", "validator", "main_validator", "n_points", "point", "target_acc_mean",
            "oracle_point", "oracle_acc_mean", "oracle_acc_std", "selection_gap"]
    return pd.DataFrame(rows, columns=cols)


def _is_cleared(method: str, column: str, cleared: Collection[str]) -> bool:
    pair = str(column).split(" ", 1)[0]
    return method in cleared or f"{method}:{pair}" in cleared or f"{method}:{column}" in cleared


def _suspicion(cells: pd.DataFrame, oracle_method: str, cleared: Collection[str]) -> tuple[pd.DataFrame, list[str]]:
    """Flag cells too good to be true (see the module docstring), compared
    with the pair's ``oracle_method`` cell (trained on the target train
    labels, an upper reference).  Without an oracle cell nothing is flagged.

    Beating the oracle only means something where the oracle is an upper
    reference: on a pair where it is below the pair's own reference
    (source-only; e.g. a budget too small to train it) only the
    near-perfect rule applies; those pairs are returned."""
    cleared = set(cleared)

    def ok_cell(method: str, col: str) -> dict | None:
        c = cells[(cells["method"] == method) & (cells["pair"] == col) & (cells["status"] == "ok")]
        if c.empty or _isnan(c["target_acc_mean"].iloc[0]):
            return None
        return c.iloc[0].to_dict()

    def sd(c: Mapping[str, Any]) -> float:
        return 0.0 if _isnan(c["target_acc_std"]) else float(c["target_acc_std"])

    weak_oracle: list[str] = []
    for col in dict.fromkeys(cells["pair"]):
        o = ok_cell(oracle_method, col)
        ref_name = cells.loc[cells["pair"] == col, "nt_reference"].iloc[0]
        ref = ok_cell(ref_name, col) if ref_name != oracle_method else None
        if o is not None and ref is not None and float(o["target_acc_mean"]) < float(ref["target_acc_mean"]):
            weak_oracle.append(col)
    reasons: list[str | None] = []
    for r in cells.to_dict("records"):
        reason = None
        o = ok_cell(oracle_method, r["pair"])
        if r["status"] == "ok" and not r["reference"] and not _isnan(r["target_acc_mean"]) and o is not None:
            m_acc, o_acc = float(r["target_acc_mean"]), float(o["target_acc_mean"])
            margin = max(SUSPICION_MARGIN, sd(r) + sd(o))
            if m_acc - o_acc > margin and r["pair"] not in weak_oracle:
                reason = (f"beats {oracle_method} ({100 * m_acc:.1f}% vs {100 * o_acc:.1f}%) by more than the "
                          f"seed spread ({100 * margin:.1f} points)")
            elif m_acc >= NEAR_PERFECT and o_acc < NEAR_PERFECT:
                reason = (f"near-perfect target accuracy ({100 * m_acc:.1f}%) where {oracle_method} reaches "
                          f"{100 * o_acc:.1f}%")
        reasons.append(reason)
    was = [x is not None for x in reasons]
    clear = [w and _is_cleared(m, c, cleared) for w, m, c in zip(was, cells["method"], cells["pair"])]
    out = cells.assign(suspicious=[w and not c for w, c in zip(was, clear)], suspicion=reasons,
                       suspicion_cleared=clear)
    return out, weak_oracle


# ---------------------------------------------------------------- compute


def compute_leaderboard(
    runs: Iterable[Mapping[str, Any]] | pd.DataFrame,
    validator: str | None = None,
    *,
    reference_method: str = "source-only",
    oracle_method: str = "target-oracle",
    suite: str | None = None,
    cleared: Collection[str] = (),
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
    ``cleared`` lists suspicion flags a person has checked (``METHOD`` or
    ``METHOD:SOURCE:TARGET``): those cells are ranked again.
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
            "target_acc_std": _std(ok["target_acc"]),
            **{f"val_mean_{v}": _mean(ok[f"val_{v}"]) for v in available},
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

    pair_ref = {c: _pair_reference(pair_first[c]["protocol"], reference_method) for c in columns}
    family = df.groupby("method")["family"].agg(lambda s: next((str(v) for v in s if not _isnan(v)), ""))
    # references are never ranked: rows that use target labels, the baseline and each pair's reference
    references = {reference_method, *pair_ref.values()}
    ranked = {m: not reference.get(m, False) and m not in references for m in methods_all}
    # run health (dabench.health): engagement from the methods' signals, failed trainings
    health = {(r["column"], r["method"], int(r["seed"])):
              run_health(r, target_trained=reference.get(r["method"], False) or r["method"] == FEWSHOT_REFERENCE)
              for r in ok_runs.to_dict("records")}
    diag_cols = sorted(c for c in df.columns if c.startswith("x_diag_"))
    track = df.groupby("method")["track"].agg(lambda s: next((str(v) for v in s if not _isnan(v)), "uda"))

    cell_rows = []
    for m in methods_all:
        for col in columns:
            g = sel_runs[(sel_runs["column"] == col) & (sel_runs["method"] == m)]
            pt = points[(points["pair"] == col) & (points["method"] == m) & points["selected"]]
            row: dict[str, Any] = {
                "method": m, "pair": col, "pair_label": pair_label(col), "family": family.get(m, ""),
                "track": track.get(m, "uda"),
                "reference": reference.get(m, False), "ranked": ranked[m],
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
            row["nt_reference"] = pair_ref[col]
            for name, metric in (("gap", "target_acc"), ("forgetting", "source_acc")):
                ref_m = pair_ref[col] if name == "gap" else reference_method
                mine, base = per_seed(col, m, metric), per_seed(col, ref_m, metric)
                common = mine.index.intersection(base.index)
                diff = mine.loc[common] - base.loc[common]
                row[f"{name}_mean"] = float(diff.mean()) if len(diff) else math.nan
                if name == "gap":
                    row["gap_std"] = float(diff.std(ddof=1)) if len(diff) > 1 else math.nan
                row[f"{name}_n"] = int(len(diff))
            row["rank"] = math.nan
            row.update(_health_columns([(int(s), health[(col, m, int(s))]) for s in ok["seed"]]))
            row.update({f"diag_{c[len('x_diag_'):]}": _mean(ok[c]) for c in diag_cols})
            row["wall_time_s_mean"] = _mean(ok["wall_time_s"])
            row["rss_peak_mb_mean"] = _mean(ok["rss_peak_mb"])
            row["gpu_peak_mb_mean"] = _mean(ok["gpu_peak_mb"])
            first = pair_first[col]
            row["protocol"] = None if _isnan(first["protocol"]) else str(first["protocol"])
            row["budget"] = None if _isnan(first["budget"]) else str(first["budget"])
            cell_rows.append(row)
    cells = pd.DataFrame(cell_rows)
    # a fixed column order for the CSV
    order = ["method", "pair", "pair_label", "family", "track", "reference", "ranked", "status", "skip_reason", "point",
             "params", "n_points", "selection_score", "n_seeds_ok", "n_failed", "n_skipped", "target_acc_mean",
             "target_acc_std", "target_f1_mean", "source_acc_mean", "gap_mean", "gap_std", "gap_n",
             "forgetting_mean", "forgetting_n", "rank", "wall_time_s_mean", "rss_peak_mb_mean", "gpu_peak_mb_mean",
             "protocol", "budget",
             *HEALTH_COLUMNS]
    diag_out = [f"diag_{c[len('x_diag_'):]}" for c in diag_cols]
    cells = cells[order + ["nt_reference"]].assign(**{c: cells[c] for c in diag_out})
    # keyed by column: one pair run under two protocols (e.g. shared and native) is two columns
    failed = {k for k, h in health.items() if h.failed_training}
    cells = _negative_transfer(cells, ok_runs.assign(pair=ok_runs["column"]), pair_ref, reference, available,
                               failed_training=failed)
    cells = cells[[c for c in cells.columns if c not in diag_out] + diag_out]  # diagnostics last

    cells, weak_oracle = _suspicion(cells, oracle_method, cleared)

    # ---- ranks per pair over the pairs every ranked method (of its group, within its track) has a
    # finding on; suspicious cells are not findings until cleared
    cells["rank"], rank_groups = rank_cells(cells, ranked, columns, _RANK_DECIMALS)
    group_of = {m: g for g in rank_groups for m in g.methods}

    # ---- per-method summary
    n_pairs = len(columns)
    meth_rows = []
    for m in methods_all:
        c = cells[cells["method"] == m]
        res = c[(c["status"] == "ok") & c["target_acc_mean"].notna()]
        r_all = df[df["method"] == m]
        ok_all = r_all[r_all["status"] == "ok"]
        meth_rows.append({
            "method": m, "family": family.get(m, ""), "track": track.get(m, "uda"), "reference": reference[m],
            "ranked": ranked[m],
            "baseline": m == reference_method,
            "n_pairs": n_pairs, "n_pairs_ok": len(res), "complete": len(res) == n_pairs,
            "mean_acc": float(res["target_acc_mean"].mean()) if len(res) else math.nan,
            "avg_rank": float(res["rank"].mean()) if res["rank"].notna().any() else math.nan,
            "n_ranked_pairs": int(res["rank"].notna().sum()),
            "rank_group": group_of[m].index if m in group_of else None,
            "mean_gap": _mean(c["gap_mean"]), "mean_forgetting": _mean(c["forgetting_mean"]),
            "n_runs": len(r_all), "n_ok": len(ok_all), "n_failed": int((r_all["status"] == "failed").sum()),
            "n_skipped": int((r_all["status"] == "skipped").sum()),
            "wall_time_s_mean": _mean(ok_all["wall_time_s"]),
            "wall_time_s_total": float(ok_all["wall_time_s"].dropna().sum()),
            "rss_peak_mb_mean": _mean(ok_all["rss_peak_mb"]),
            "rss_peak_mb_max": float(ok_all["rss_peak_mb"].max()) if ok_all["rss_peak_mb"].notna().any() else math.nan,
            "gpu_peak_mb_mean": _mean(ok_all["gpu_peak_mb"]),
            "gpu_peak_mb_max": float(ok_all["gpu_peak_mb"].max()) if ok_all["gpu_peak_mb"].notna().any() else math.nan,
            "n_suspicious": int(c["suspicious"].sum()),
        })
    methods = pd.DataFrame(meth_rows)
    # ranked methods first (by rank group, then average rank), then the baseline, the few-shot
    # reference and the rows that use target labels
    methods = methods.assign(
        _ref=[0 if r else (1 if m == reference_method else 2 if m in references else 3)
               for m, r in zip(methods["method"], methods["ranked"])],
        _track=[TRACK_ORDER.index(t) if t in TRACK_ORDER else len(TRACK_ORDER) for t in methods["track"]],
        _tname=methods["track"],
        _norank=methods["avg_rank"].isna().astype(int),
        _group=methods["rank_group"].fillna(len(rank_groups)).astype(int),
        _rank=methods["avg_rank"].fillna(0.0).round(_RANK_DECIMALS),
        _acc=-methods["mean_acc"].fillna(-1.0).round(_RANK_DECIMALS),
    ).sort_values(["_track", "_tname", "_ref", "_norank", "_group", "_rank", "_acc", "method"], kind="mergesort")
    methods = methods.drop(columns=["_ref", "_track", "_tname", "_norank", "_group", "_rank", "_acc"]
                           ).reset_index(drop=True)

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
    done = df[df["status"] != "skipped"]  # a skipped run computed nothing
    for key, col in RESULT_SETTINGS.items():
        rows = done[done["status"] == "ok"] if col == "device" else done  # a failed run has no device
        vals = {str(int(v)) if col == "threads" else str(v) for v in rows[col] if not _isnan(v)}
        missing = any(_isnan(v) for v in rows[col])
        settings[key] = tuple(sorted(vals, key=lambda v: (len(v), v))) + (("not recorded",) if missing else ())
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
        selection=_selection(points, df, available, validator),
        nt_test=_nt_test_info(cells, seeds),
        warning_eval=_evaluate_warning(cells),
        rank_groups=tuple(rank_groups),
        suspicion={"oracle_method": oracle_method, "margin": SUSPICION_MARGIN, "near_perfect": NEAR_PERFECT,
                   "cleared": sorted(set(cleared)), "oracle_below_reference": [pair_label(c) for c in weak_oracle],
                   "oracle_present": bool(((cells["method"] == oracle_method) & (cells["status"] == "ok")).any())},
    )


def build_leaderboard(
    store_folder: str | Path,
    validator: str | None = None,
    *,
    reference_method: str = "source-only",
    oracle_method: str = "target-oracle",
    suite: str | None = None,
    keys: Collection[str] | None = None,
    cleared: Collection[str] = (),
) -> Leaderboard:
    """Read a results folder's run store (read-only) and :func:`compute_leaderboard` it.

    ``keys``, when given, keeps only the runs with those run keys (the runs
    of a suite as it is now: stored runs of grid points since removed from
    the suite are left out)."""
    from .store import RunStore

    store = RunStore.open_readonly(store_folder)
    try:
        rows = store.rows()
        published = _json_obj(store.get_meta("published")) or []
    finally:
        store.close()
    if keys is not None:
        wanted = set(keys)
        rows = [r for r in rows if r["key"] in wanted]
    board = compute_leaderboard(
        rows, validator, reference_method=reference_method, oracle_method=oracle_method, suite=suite,
        cleared=cleared,
    )
    if isinstance(published, list) and published:
        board = dataclasses.replace(board, published=tuple(published))
    return board


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


def _tracks_present(board: Leaderboard) -> list[str]:
    present = set(board.methods["track"]) if "track" in board.methods else {"uda"}
    return [t for t in TRACK_ORDER if t in present] + sorted(present - set(TRACK_ORDER))


def _track_label(board: Leaderboard, row: Mapping[str, Any]) -> str:
    """The Track column: the method's track; the baseline is every track's reference."""
    track = str(row.get("track") or "uda")
    if row["method"] == board.reference_method and len(_tracks_present(board)) > 1:
        return f"{track} (reference of all)"
    return track


def _md_tracks(board: Leaderboard) -> list[str]:
    """What each track present gives its methods, and how ranks treat tracks."""
    from .contract import TRACKS

    tracks = _tracks_present(board)
    if tracks == ["uda"]:
        return [f"Track: every method ran under `uda` ({TRACKS['uda']}).", ""]
    out = ["Tracks (what a method is given; see `dabench.tracks`):", ""]
    out += [f"- `{t}`: {TRACKS.get(t, 'a track this dabench does not know')}." for t in tracks]
    out += [
        "",
        "**Ranks are within a track**: methods of different tracks see different data and are never ranked "
        "against each other (Avg rank compares a method with the others of its track only). Every track's "
        f"gaps and negative-transfer verdicts are against the same reference, `{board.reference_method}` (the "
        "untouched shared source model, the starting point of every source-free and test-time method; it does "
        "not adapt, so its accuracy is the same in every track), so gaps compare across tracks. Validators see "
        "what the method saw: those needing source data (`source-val`, `dev`) have no score for source-free and "
        "test-time runs, so a method of those tracks with several hyperparameter points keeps its first point "
        "unless the suite's validator works on target data alone (`entropy`, `im`, `snd`, `bnm`).",
        "",
    ]
    return out


def _seed_list(seeds: Iterable[Any]) -> str:
    return ", ".join(str(int(s)) for s in seeds)


def _reference_phrase(board: Leaderboard) -> str:
    refs = sorted(set(board.cells["nt_reference"])) if "nt_reference" in board.cells else [board.reference_method]
    if refs == [board.reference_method]:
        return f"`{board.reference_method}`"
    return (f"`{board.reference_method}`; `{FEWSHOT_REFERENCE}` on pairs with labelled target samples or "
            f"native feature spaces")


def _p(x: Any) -> str:
    if _isnan(x):
        return "—"
    x = float(x)
    return "<0.001" if x < 0.001 else f"{x:.3f}"


def _md_negative_transfer(board: Leaderboard) -> list[str]:
    info = board.nt_test
    if not info:
        return []
    out = ["", "## Negative transfer", ""]
    out.append(
        f"Test: {info['test']}. Correction: {info['correction']}. "
        f"Seeds: {info['n_seeds']} (at least {info['min_paired_seeds']} paired per tested cell); "
        f"{info['n_cells_tested']} cells tested. Reference: {info['reference_rule']}. "
        f"Each cell states its minimum detectable effect (**MDE**): {info['mde_rule']}; a loss smaller than the "
        f"MDE may go unflagged, so 'n.s.' says only that no loss of at least the MDE was likely. "
        f"Cells: gap to the reference in percentage points, one-sided p of the verdict, MDE in points, verdict "
        f"(**negative transfer**: significantly worse; better: significantly better; n.s.: not significant; "
        f"failed training / not engaged / reference failed: not a finding, see \"Engagement and training health\")."
    )
    if info.get("calibration"):
        out += ["", f"Calibration: {info['calibration']}."]
    if info.get("power_warning"):
        out += ["", f"**Warning**: {info['power_warning']}."]
    out.append("")
    rows = []
    for mrow in board.methods.to_dict("records"):
        m = mrow["method"]
        cells = [board.cell(m, col) for col in board.pairs]
        if all(c["nt_flag"] == "n/a" for c in cells):
            continue
        line = [m, _track_label(board, mrow)]
        for c in cells:
            if c["nt_flag"] == "n/a":
                line.append("—")
                continue
            if c["nt_flag"] in HEALTH_FLAGS:
                line.append(f"{_signed_pct(c['gap_mean'])} {c['nt_flag']}")
                continue
            verdict = "**negative transfer**" if c["nt_flag"] == "negative transfer" else c["nt_flag"]
            pv = _p(c["nt_p_better"] if c["nt_flag"] == "better" else c["nt_p_worse"])
            line.append(f"{_signed_pct(c['gap_mean'])} (p{pv if pv.startswith('<') else '=' + pv}, "
                        f"MDE {_num(100 * float(c['nt_mde']) if not _isnan(c['nt_mde']) else math.nan, '.1f')}) "
                        f"{verdict}")
        rows.append(line)
    if rows:
        out += _md_table(["Method", "Track", *board.pair_labels], rows, [False] * (2 + len(board.pairs)))
    else:
        out.append("No cell could be tested (each needs a method and its reference ok on at least 2 seeds).")
    return out


#: Conventional health signals the report's diagnostics table shows (dabench.diagnostics).
_DIAG_SHOWN = ("engaged", "disc_acc_start", "disc_acc_end", "mask_rate", "pseudo_label_rate", "kept_fraction",
               "cluster_agreement", "weight_ess")


def _md_health(board: Leaderboard) -> list[str]:
    cells = board.cells
    out = ["", "## Engagement and training health", ""]
    out.append(
        "A cell is a finding only if its runs trained and its adaptation acted. **Failed training**: "
        f"{FAILED_TRAINING_RULE}; a cell with such a run is marked [failed training], not ranked and given no "
        "verdict, and cells compared with a failed reference run get none either (reference failed). "
        "**Never engaged**, from the health signals methods record (`dabench.diagnostics`), per signal:"
    )
    out.append("")
    out += [f"- `{name}`: {text}" for name, text in ENGAGEMENT_RULES]
    out += ["", "A run engaged when any recorded signal says so and never engaged when every one says it did not; "
                "a cell never engaged when none of its runs with signals engaged: it is marked [not engaged] and is "
                "neither ranked nor given a verdict. Cells without signals are not judged.", ""]
    bad = cells[(cells["health"] != "ok") | (cells["nt_flag"] == "reference failed")
                | (cells["engagement"] == "partly")]
    if len(bad):
        rows = []
        for r in cells.loc[bad.index].to_dict("records"):
            if r["health"] == "failed training":
                status, why = "failed training", r["failed_training_note"]
            elif r["health"] == "not engaged":
                status, why = "not engaged", r["engagement_note"]
            elif r["nt_flag"] == "reference failed":
                status, why = "reference failed", f"a paired run of the reference {r['nt_reference']} failed training"
            else:
                status, why = "partly engaged", r["engagement_note"]
            rows.append([r["method"], r["pair_label"], status, "—" if _isnan(why) else str(why)])
        out += _md_table(["Method", "Pair", "Status", "Why"], rows, [False] * 4)
    else:
        out.append("Every cell trained; no cell is marked never engaged.")
    diag = [c for c in cells.columns if c.startswith("diag_")]
    shown = [d for d in _DIAG_SHOWN if f"diag_{d}" in diag]
    if shown:
        out += ["", "### Health signals", "",
                "Mean over each cell's ok runs; self-training rates with their per-quarter means (q1/q2/q3/q4). "
                "Every recorded signal is in the CSV and JSON reports (`diag_*` columns).", ""]
        rows = []
        for r in cells.to_dict("records"):
            vals = []
            for d in shown:
                v = r.get(f"diag_{d}")
                if _isnan(v):
                    vals.append("—")
                    continue
                text = _num(v, ".2f")
                qs = [r.get(f"diag_{d}_q{q}") for q in range(1, 5)]
                if all(not _isnan(q) for q in qs):
                    text += " (" + "/".join(_num(q, ".2f") for q in qs) + ")"
                vals.append(text)
            if all(v == "—" for v in vals):
                continue
            rows.append([r["method"], r["pair_label"], r["engagement"] or "—", *vals])
        out += _md_table(["Method", "Pair", "Engagement", *shown], rows, [False, False, False] + [True] * len(shown))
    return out


def _md_warning(board: Leaderboard) -> list[str]:
    ev = board.warning_eval
    if not ev:
        return []
    out = ["", "## Label-free negative-transfer warning", ""]
    out.append(
        "Computed without target labels, per seed against the reference run of the same seed, then averaged: "
        "how much further (total variation) the method's predicted target class distribution lies from the "
        "reference model's label-shift estimate of the target class prior (BBSE: Lipton et al., ICML 2018; "
        "from source-validation confusions and target predictions) than the reference's own predictions, "
        "less the reference's own seed-to-seed spread of its predicted target prior (mean pairwise total "
        "variation), so that drift within the reference's noise is not counted. "
        f"Marginal alignment under a class-prior change drags predictions towards the source prior (Zhao et al., "
        f"ICML 2019). The warning fires when the score exceeds {ev['threshold']}."
    )
    out.append("")
    rows = []
    for r in board.cells.to_dict("records"):
        if r["nt_flag"] not in NT_FLAGS or _isnan(r.get(WARN_SCORE)):
            continue
        rows.append([r["method"], r["pair_label"], _num(r[WARN_SCORE], "+.3f"),
                     "warning" if r["warn_flag"] else "—", r["nt_flag"]])
    if rows:
        out += _md_table(["Method", "Pair", "Score", "Warning", "Labelled verdict"], rows,
                         [False, False, True, False, False])
    else:
        out.append("No cell has the statistics the warning needs (runs stored before they were recorded).")
        return out
    out += [
        "",
        f"How well it predicts the labelled verdict over {ev['n_cells']} tested cells "
        f"({ev['n_negative_transfer']} with negative transfer, {ev['n_warned']} warned): "
        f"precision {_num(ev['precision'], '.2f')}, recall {_num(ev['recall'], '.2f')}, "
        f"AUROC {_num(ev['auroc'], '.2f')}"
        + (" (AUROC needs cells of both kinds)." if _isnan(ev["auroc"]) else "."),
    ]
    cand = {k: v for k, v in ev.get("candidate_auroc", {}).items()}
    if cand:
        out += ["", "AUROC of other label-free scores tried (higher score = more suspicious): " + "; ".join(
            f"`{k}` {_num(v, '.2f')}" for k, v in cand.items()) + "."]
    return out


def _md_ranking(board: Leaderboard) -> list[str]:
    groups = board.rank_groups
    if not groups:
        return []
    out = ["", "## Ranking", ""]
    several = len({g.track for g in groups}) > 1
    for g in groups:
        head = ((f"track {g.track}: " if several else "") + f"{', '.join(g.methods)}: ranked over {len(g.pairs)} pair(s)"
                + (f" ({', '.join(pair_label(p) for p in g.pairs)})" if g.pairs else ""))
        out.append(f"- {head}" + ("." if not g.left_out else "; left out: " + "; ".join(
            f"{pair_label(p)} ({why})" for p, why in g.left_out) + "."))
    return out


def _md_selection(board: Leaderboard) -> list[str]:
    sel = board.selection
    if sel is None or sel.empty:
        return []
    out = ["", "## Oracle selection (upper bound: uses target labels)", ""]
    out.append(
        "For each method and pair with several hyperparameter points, the point with the best mean target "
        "accuracy. No real deployment can choose this way; it bounds what any validator could reach."
    )
    out.append("")
    first = sel.drop_duplicates(["method", "pair"])
    rows = []
    for m, g in first.groupby("method", sort=False):
        line = [m]
        by = {r["pair"]: r for r in g.to_dict("records")}
        for col in board.pairs:
            r = by.get(col)
            line.append("—" if r is None else
                        f"{_pct(r['oracle_acc_mean'])} ± {_pct(r['oracle_acc_std'])} [point {r['oracle_point']}]")
        rows.append(line)
    out += _md_table(["Method", *board.pair_labels], rows, [False] * (1 + len(board.pairs)))
    out += ["", "### Selection gap per validator", "",
            "Oracle-selected minus validator-selected target accuracy in percentage points, mean over the pairs "
            "with several points (0 = the validator found the best point); "
            + (f"`{board.validator}` chose the main table's points." if board.validator else ""), ""]
    validators = sorted(set(sel["validator"]))
    rows = []
    for m, g in sel.groupby("method", sort=True):
        rows.append([m] + [_num(100 * g[g["validator"] == v]["selection_gap"].mean(), ".1f")
                           if (g["validator"] == v).any() else "—" for v in validators])
    g = sel.groupby("validator")["selection_gap"].mean()
    rows.append(["all methods"] + [_num(100 * g.get(v, math.nan), ".1f") for v in validators])
    heads = [f"{v} (main)" if v == board.validator else v for v in validators]
    out += _md_table(["Method", *heads], rows, [False] + [True] * len(validators))
    return out


def _md_suspicion(board: Leaderboard) -> list[str]:
    info = board.suspicion
    if not info:
        return []
    flagged = board.cells[board.cells["suspicion"].notna()] if "suspicion" in board.cells else board.cells.iloc[:0]
    out = ["", "## Too good to be true", ""]
    oracle = info.get("oracle_method", board.oracle_method)
    rule = (f"A cell is flagged **SUSPECT** when its method beats `{oracle}` (trained on the target train labels) by "
            f"more than the seed spread (the two cells' standard deviations added, at least "
            f"{100 * float(info['margin']):.0f} point), or reaches near-perfect target accuracy (at least "
            f"{100 * float(info['near_perfect']):.0f}%) where `{oracle}` does not. Flagged cells are not ranked "
            f"until a person has checked the method and cleared them (suite key `cleared = [\"METHOD:SOURCE:TARGET\"]` "
            f"or `--clear METHOD:SOURCE:TARGET`). Plugins are trusted code that runs in dabench's processes; the "
            f"host keeps target test labels out of the process that runs `fit`, and this flag shows a method that "
            f"found them some other way (e.g. by reloading a public dataset).")
    out.append(rule)
    out.append("")
    if not info.get("oracle_present"):
        out.append(f"No `{oracle}` results in this board: the check could not run.")
        return out
    weak = info.get("oracle_below_reference") or []
    if weak:
        out += [f"`{oracle}` is below the pair's reference on {', '.join(weak)} (not an upper reference there, "
                f"e.g. a budget too small to train it): only the near-perfect rule applies on those pairs.", ""]
    if flagged.empty:
        out.append("No cell is flagged.")
        return out
    rows = [[r["method"], r["pair_label"], _pct(r["target_acc_mean"]), str(r["suspicion"]),
             "cleared (ranked)" if r["suspicion_cleared"] else "flagged (not ranked)"]
            for r in flagged.to_dict("records")]
    out += _md_table(["Method", "Pair", "Target acc (%)", "Why", "Status"], rows, [False, False, True, False, False])
    return out


def _md_computed_with(board: Leaderboard) -> str:
    """``Computed with: torch `2.13.0`, 1 thread per run, device `cpu`.``: the
    settings besides the suite's that determine the results (a rerun with
    the same ones reproduces the tables)."""
    parts = []
    torch_v = board.settings.get("torch", ())
    if torch_v:
        parts.append("torch " + " and ".join(f"`{v}`" for v in torch_v))
    threads = board.settings.get("threads", ())
    if threads:
        parts.append(" and ".join(f"`{t}`" for t in threads) + " torch thread" + ("" if threads == ("1",) else "s")
                     + " per run")
    device = board.settings.get("device", ())
    if device:
        parts.append("device " + " and ".join(f"`{d}`" for d in device))
    if not parts:
        return ""
    line = "Computed with: " + ", ".join(parts) + "."
    if len(torch_v) > 1 or len(threads) > 1:
        line += (" The runs were computed with different settings: rerunning them with one setting may change "
                 "results in the last digits.")
    return line


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
    computed = _md_computed_with(board)
    if computed:
        out.append(computed)
    if board.superseded_runs:
        out.append(
            f"{board.superseded_runs} older run(s) superseded by a later run of the same "
            f"(pair, method, point, seed) are left out."
        )
    out += [
        "",
        f"Cells: target accuracy (%) as mean ± sample std over seeds; in parentheses the gap to the pair's "
        f"reference ({_reference_phrase(board)}) in percentage points, averaged over the seeds both have ok; "
        f"**NT**: significant negative transfer, see below. "
        f"**SUSPECT**: too good to be true, not ranked until cleared (see below). "
        f"Mean: over pairs. Avg rank: 1 = best, ties share the average rank, over the pairs every ranked method "
        f"(of those applying to the same pairs, within one track) has a finding on (see \"Ranking\"); the "
        f"baseline, the pairs' references and rows that use target labels are not ranked.",
        "",
    ]
    out += _md_tracks(board)

    n_max = max([int(n) for n in board.cells["n_seeds_ok"]] + [0])
    unhealthy: set[str] = set()
    notes: dict[str, int] = {}
    partial: list[str] = []
    rows = []
    for mrow in board.methods.to_dict("records"):
        m = mrow["method"]
        line = [_method_label(board, mrow), _track_label(board, mrow)]
        for col in board.pairs:
            c = board.cell(m, col)
            if c["status"] == "ok":
                s = f"{_pct(c['target_acc_mean'])} ± {_pct(c['target_acc_std'])}"
                if not _isnan(c["gap_mean"]):
                    s += f" ({_signed_pct(c['gap_mean'])})"
                if c.get("nt_flag") == "negative transfer":
                    s += " **NT**"
                if c.get("health") in ("failed training", "not engaged"):
                    s += f" [{c['health']}]"
                    unhealthy.add(c["health"])
                if c.get("suspicious"):
                    s += " **SUSPECT**"
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
    headers = ["Method", "Track", *board.pair_labels, "Mean", "Avg rank"]
    out += _md_table(headers, rows, [False, False] + [False] * len(board.pairs) + [True, True])
    if n_max and any(int(n) < n_max for n in board.cells.loc[board.cells["status"] == "ok", "n_seeds_ok"]):
        out += ["", "[n=k]: only k seeds ok in that cell (the others failed or are missing)."]
    if unhealthy:
        marks = {"failed training": "[failed training]: a run of the cell learned nothing (source accuracy at chance)",
                 "not engaged": "[not engaged]: the method's adaptation never acted"}
        out += ["", "; ".join(marks[k] for k in sorted(unhealthy)) + ". Not a finding: not ranked, no verdict "
                    "(see \"Engagement and training health\")."]
    if notes:
        out.append("")
        out += [f"[{i}] skipped: {_md_escape(reason)}" for reason, i in notes.items()]
    if partial:
        out += ["", "\\* mean over the pairs with a result only:"]
        out += [f"- {p}" for p in partial]
    out += _md_suspicion(board)

    out += _md_ranking(board)

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

    out += _md_negative_transfer(board)
    out += _md_health(board)
    out += _md_warning(board)
    out += _md_selection(board)

    from .published import to_markdown as published_md

    out += published_md(board)
    out += ["", "## Cost per run", "",
            "Mean over ok runs of every hyperparameter point. Peak RSS: the resident memory a run added above its "
            "worker process's at the run's start (CPU); GPU peak: the peak of torch's CUDA allocator during the run.",
            ""]
    rows = [
        [_method_label(board, r), str(int(r["n_ok"])), _num(r["wall_time_s_mean"], ".2f"),
         _num(r["wall_time_s_total"], ".1f"), _num(r["rss_peak_mb_mean"], ".1f"), _num(r["gpu_peak_mb_mean"], ".1f")]
        for r in board.methods.to_dict("records")
    ]
    out += _md_table(["Method", "Runs ok", "Wall time (s)", "Total wall time (s)", "Peak RSS (MB)", "GPU peak (MB)"],
                     rows, [False, True, True, True, True, True])

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


def _plain_tree(v: Any) -> Any:
    if isinstance(v, Mapping):
        return {str(k): _plain_tree(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain_tree(x) for x in v]
    return _plain(v)


def _records(df: pd.DataFrame) -> list[dict[str, Any]]:
    return [{k: _plain(v) for k, v in r.items()} for r in df.to_dict("records")]


def to_json(board: Leaderboard) -> str:
    """Every number and flag of the board as JSON (fractions; NaN -> null;
    the published comparison in percent)."""
    from .published import comparison as published_comparison

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
        "selection": _records(board.selection) if board.selection is not None else [],
        "negative_transfer_test": _plain_tree(board.nt_test),
        "warning_evaluation": _plain_tree(board.warning_eval),
        "rank_groups": [{"track": g.track, "methods": list(g.methods), "pairs": list(g.pairs),
                         "left_out": [{"pair": p, "why": why} for p, why in g.left_out]} for g in board.rank_groups],
        "suspicion": _plain_tree(board.suspicion),
        "published": _plain_tree(published_comparison(board)),
    }
    return json.dumps(doc, indent=2, ensure_ascii=False, allow_nan=False) + "\n"


def to_html(board: Leaderboard) -> str:
    """The self-contained HTML page (see :mod:`dabench.report_html`; needs matplotlib)."""
    from .report_html import to_html as render

    return render(board)


_RENDERERS = {"md": to_markdown, "csv": to_csv, "json": to_json, "html": to_html}
#: The report formats :func:`write_reports` and ``dabench leaderboard --format`` know.
FORMATS = tuple(_RENDERERS)


def render(board: Leaderboard, fmt: str) -> str:
    """The board in one of :data:`FORMATS`."""
    if fmt not in _RENDERERS:
        raise LeaderboardError(f"unknown report format {fmt!r}; choose from {list(FORMATS)}")
    return _RENDERERS[fmt](board)


def write_reports(
    store_folder: str | Path,
    out_dir: str | Path,
    validator: str | None = None,
    *,
    formats: Sequence[str] = ("md", "csv"),
    reference_method: str = "source-only",
    oracle_method: str = "target-oracle",
    suite: str | None = None,
    keys: Collection[str] | None = None,
    cleared: Collection[str] = (),
) -> dict[str, Path]:
    """Write ``leaderboard.<fmt>`` for each of ``formats`` (``md``, ``csv``,
    ``json``, ``html``) into ``out_dir``; return ``{fmt: path}``."""
    unknown = [f for f in formats if f not in _RENDERERS]
    if unknown:
        raise LeaderboardError(f"unknown report format(s) {unknown}; choose from {sorted(_RENDERERS)}")
    board = build_leaderboard(
        store_folder, validator, reference_method=reference_method, oracle_method=oracle_method, suite=suite,
        keys=keys, cleared=cleared,
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
