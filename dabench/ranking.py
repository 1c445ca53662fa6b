"""Average ranks over the pairs every ranked method has.

A method's average rank means something only against the methods it was
ranked with, over the same pairs.  Rules:

- Reference rows are never ranked: the baseline (``source-only``), the
  few-shot reference (``target-only-k``) and rows that use target labels
  (``target-oracle``).
- Ranked methods are grouped by their track (``uda``, ``source-free``,
  ``test-time``: the tracks give methods different data, so a group never
  mixes them) and by the pairs they apply to (the pairs where
  they were not skipped): e.g. unsupervised methods on the shared-space
  pairs, heterogeneous methods on the native-space pairs.  Each group is
  ranked over its **common pairs**: the pairs where every method of the group
  has a result that is a finding (runs ok, training did not fail, adaptation
  engaged; :mod:`dabench.health`; not flagged as too good to be true, unless
  a person cleared it).  A pair where one method has no such
  result is left out for the whole group and the report says why.  A method
  with no finding at all is left out of its group (nothing to rank).
- Per common pair, ranks by mean target accuracy (1 = best, ties share the
  average rank); the average rank is the mean over the group's common pairs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import pandas as pd

__all__ = ["RankGroup", "rank_cells"]


@dataclass(frozen=True)
class RankGroup:
    """Methods ranked together over ``pairs`` (their common pairs); ``left_out``:
    ``(pair, why)`` for the pairs of the group that are not ranked."""

    index: int
    methods: tuple[str, ...]
    pairs: tuple[str, ...]
    left_out: tuple[tuple[str, str], ...]
    track: str = "uda"


def rank_cells(cells: pd.DataFrame, ranked: Mapping[str, bool], pairs: Sequence[str],
               decimals: int = 12) -> tuple[pd.Series, list[RankGroup]]:
    """Per-cell ranks (NaN outside the common pairs) and the rank groups,
    largest first.  ``cells`` needs ``method, pair, status, health,
    target_acc_mean`` (and uses ``track`` and ``suspicious`` when present);
    ``ranked[m]`` says whether method ``m`` is ranked."""
    rank = pd.Series(math.nan, index=cells.index, dtype=float)
    by = {(r.method, r.pair): (i, r) for i, r in zip(cells.index, cells.itertuples())}
    methods = [m for m in dict.fromkeys(cells["method"]) if ranked.get(m, False)]

    def finding(m: str, p: str) -> bool:
        hit = by.get((m, p))
        if hit is None:
            return False
        r = hit[1]
        return (r.status == "ok" and r.health == "ok" and not pd.isna(r.target_acc_mean)
                and not bool(getattr(r, "suspicious", False)))

    def why(m: str, p: str) -> str:
        hit = by.get((m, p))
        if hit is None:
            return "not run"
        r = hit[1]
        if r.status != "ok":
            return str(r.status)
        if r.health != "ok":
            return str(r.health)
        return "suspect (not cleared)" if bool(getattr(r, "suspicious", False)) else "no accuracy"

    # the leaderboard has already read a missing track (a store from before tracks) as "uda"
    track_of = dict(zip(cells["method"], cells["track"])) if "track" in cells else {}

    applies: dict[tuple[str, frozenset], list[str]] = {}
    for m in methods:
        mine = frozenset(p for p in pairs if (m, p) in by and by[(m, p)][1].status not in ("skipped", "not run"))
        if any(finding(m, p) for p in mine):
            applies.setdefault((track_of.get(m, "uda"), mine), []).append(m)
    ordered = sorted(applies.items(), key=lambda kv: (-len(kv[1]), -len(kv[0][1]), sorted(kv[1])))
    groups = []
    for gi, ((track, ps), ms) in enumerate(ordered):
        gpairs = [p for p in pairs if p in ps]
        common = [p for p in gpairs if all(finding(m, p) for m in ms)]
        left = []
        for p in gpairs:
            if p in common:
                continue
            bad = [f"{m} {why(m, p)}" for m in ms if not finding(m, p)]
            left.append((p, "; ".join(bad)))
        for p in common:
            idx = [by[(m, p)][0] for m in ms]
            acc = cells.loc[idx, "target_acc_mean"].astype(float).round(decimals)
            rank.loc[idx] = acc.rank(ascending=False, method="average")
        groups.append(RankGroup(gi, tuple(ms), tuple(common), tuple(left), track))
    return rank, groups
