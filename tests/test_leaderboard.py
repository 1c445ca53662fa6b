"""Leaderboard: selection without target labels, paired gaps, ranks, reports."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pandas as pd
import pytest

from dabench.leaderboard import (
    LeaderboardError,
    build_leaderboard,
    compute_leaderboard,
    pair_label,
    to_csv,
    to_json,
    to_markdown,
    write_reports,
)
from dabench.store import RunStore, canonical_json, run_key

P1 = "moons:moons-rot35"
P2 = "moons:moons-rot60"
SKIP_REASON = "needs labelled target train data; this pair has none"
FAIL_REASON = "RuntimeError: loss diverged"
PROTOCOL = canonical_json({"k_target": 0, "feature_space": "shared", "max_source": 4000, "max_target": 4000})
BUDGET = canonical_json({"steps": 100, "batch_size": 64})

# (pair, method, point) -> params, validator score per seed, target acc per seed, source acc per seed.
# dann's selected point differs from its best-target point on both pairs.
SPEC = {
    (P1, "source-only", 0): ({}, [0.50, 0.50, 0.50], [0.70, 0.72, 0.74], [0.95, 0.96, 0.97]),
    (P1, "dann", 0): ({"lambda_max": 0.1}, [0.90, 0.90, 0.90], [0.80, 0.82, 0.84], [0.90, 0.92, 0.93]),
    (P1, "dann", 1): ({"lambda_max": 1.0}, [0.80, 0.80, 0.80], [0.90, 0.91, 0.92], [0.80, 0.80, 0.80]),
    (P1, "target-oracle", 0): ({}, [0.99, 0.99, 0.99], [0.95, 0.96, 0.97], [0.90, 0.90, 0.90]),
    (P2, "source-only", 0): ({}, [0.40, 0.40, 0.40], [0.60, 0.62, 0.64], [0.94, 0.95, 0.96]),
    (P2, "dann", 0): ({"lambda_max": 0.1}, [0.50, 0.50, 0.50], [0.70, 0.71, 0.72], [0.90, 0.90, 0.90]),
    (P2, "dann", 1): ({"lambda_max": 1.0}, [0.60, 0.60, 0.60], [0.61, 0.62, 0.63], [0.92, 0.95, 0.95]),
}
FAILED = {(P1, "dann", 0, 2)}  # dann point 0 seed 2 on P1 failed


def _record(pair, method, point, seed, params, status="ok", reason=None, tacc=None, sacc=None):
    return {
        "key": run_key(pair=pair, method=method, params=params, seed=seed),
        "suite": "quick", "pair": pair, "method": method, "method_version": "1",
        "family": {"source-only": "baseline", "dann": "adversarial"}.get(method, "reference"),
        "reference": int(method == "target-oracle"), "params": canonical_json(params), "point": point,
        "seed": seed, "protocol": PROTOCOL, "budget": BUDGET, "backbone": "default", "status": status,
        "reason": reason, "target_acc": tacc, "target_f1": None if tacc is None else tacc - 0.01,
        "source_acc": sacc, "wall_time_s": 1.0 + point if status == "ok" else 0.1,
        "peak_mem_mb": 100.0 * (1 + point) if status == "ok" else None, "device": "cpu",
        "started_at": "2024-01-01T00:00:00+00:00", "finished_at": "2024-01-01T00:00:01+00:00",
        "dabench_version": "0.1.0",
    }


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("results")
    with RunStore(folder) as st:
        for (pair, method, point), (params, vals, taccs, saccs) in SPEC.items():
            for seed in range(3):
                if (pair, method, point, seed) in FAILED:
                    st.write(_record(pair, method, point, seed, params, "failed", FAIL_REASON))
                    continue
                st.write(_record(pair, method, point, seed, params, tacc=taccs[seed], sacc=saccs[seed]),
                         {"source-val": vals[seed], "entropy": -taccs[seed]})
        for seed in range(3):  # the oracle cannot run on P2
            st.write(_record(P2, "target-oracle", 0, seed, {}, "skipped", SKIP_REASON))
    return folder


@pytest.fixture(scope="module")
def board(store_dir):
    return build_leaderboard(store_dir, validator="source-val")


def test_selection_uses_validator_not_target_accuracy(board):
    assert board.cell("dann", P1)["point"] == 0  # validator 0.90 > 0.80; target acc would pick point 1
    assert board.cell("dann", P2)["point"] == 1  # validator 0.60 > 0.50; target acc would pick point 0
    assert board.cell("dann", P1)["params"] == canonical_json({"lambda_max": 0.1})
    assert board.cell("dann", P2)["params"] == canonical_json({"lambda_max": 1.0})
    pts = board.points[(board.points["method"] == "dann")].set_index(["pair", "point"])
    assert pts.loc[(P1, 0), "selected"] and not pts.loc[(P1, 1), "selected"]
    assert pts.loc[(P1, 1), "target_acc_mean"] > pts.loc[(P1, 0), "target_acc_mean"]
    assert pts.loc[(P2, 1), "selection_score"] == pytest.approx(0.60)


def test_selection_by_another_validator_changes_choice(store_dir):
    b = build_leaderboard(store_dir, validator="entropy")  # -target acc over ok seeds: lower acc wins
    assert b.cell("dann", P1)["point"] == 0
    assert b.cell("dann", P2)["point"] == 1


def test_selection_tie_goes_to_lowest_point():
    rows = []
    for point in (0, 1):
        for seed in range(2):
            r = _record(P1, "dann", point, seed, {"lambda_max": float(point)}, tacc=0.5 + 0.1 * point, sacc=0.9)
            r["val_v"] = 0.3
            rows.append(r)
    assert compute_leaderboard(rows, "v").cell("dann", P1)["point"] == 0


def test_cell_numbers_match_hand_computation(board):
    so1, so2 = board.cell("source-only", P1), board.cell("source-only", P2)
    assert so1["target_acc_mean"] == pytest.approx(0.72)
    assert so1["target_acc_std"] == pytest.approx(0.02)
    assert so1["gap_mean"] == 0 and so1["forgetting_mean"] == 0 and so1["gap_n"] == 3

    d1 = board.cell("dann", P1)  # seeds 0 and 1 only (seed 2 failed)
    assert d1["n_seeds_ok"] == 2 and d1["n_failed"] == 1 and d1["n_skipped"] == 0
    assert d1["target_acc_mean"] == pytest.approx(0.81)
    assert d1["target_acc_std"] == pytest.approx(math.sqrt(0.0002))
    assert d1["gap_mean"] == pytest.approx(0.10) and d1["gap_n"] == 2
    assert d1["source_acc_mean"] == pytest.approx(0.91)
    assert d1["forgetting_mean"] == pytest.approx(((0.90 - 0.95) + (0.92 - 0.96)) / 2)

    d2 = board.cell("dann", P2)
    assert d2["target_acc_mean"] == pytest.approx(0.62)
    assert d2["gap_mean"] == pytest.approx(0.0, abs=1e-12)
    assert d2["gap_std"] == pytest.approx(0.01)
    assert d2["forgetting_mean"] == pytest.approx(((0.92 - 0.94) + (0.95 - 0.95) + (0.95 - 0.96)) / 3)
    assert so2["target_acc_mean"] == pytest.approx(0.62)

    o1 = board.cell("target-oracle", P1)
    assert o1["target_acc_mean"] == pytest.approx(0.96)
    assert o1["gap_mean"] == pytest.approx(0.24)


def test_ranks_ties_and_reference_rows(board):
    assert board.cell("dann", P1)["rank"] == 1 and board.cell("source-only", P1)["rank"] == 2
    # equal means (0.62) from different seed values tie
    assert board.cell("dann", P2)["rank"] == 1.5 and board.cell("source-only", P2)["rank"] == 1.5
    assert math.isnan(board.cell("target-oracle", P1)["rank"])  # best accuracy, never ranked
    assert board.method("dann")["avg_rank"] == pytest.approx(1.25)
    assert board.method("source-only")["avg_rank"] == pytest.approx(1.75)
    assert math.isnan(board.method("target-oracle")["avg_rank"])
    assert list(board.methods["method"]) == ["dann", "source-only", "target-oracle"]


def test_means_and_partial_means(board):
    assert board.method("dann")["mean_acc"] == pytest.approx((0.81 + 0.62) / 2)
    assert board.method("dann")["complete"]
    oracle = board.method("target-oracle")
    assert not oracle["complete"] and oracle["n_pairs_ok"] == 1
    assert oracle["mean_acc"] == pytest.approx(0.96)


def test_failed_and_skipped_counted(board):
    assert board.method("dann")["n_failed"] == 1
    assert board.method("target-oracle")["n_skipped"] == 3
    sk = board.cell("target-oracle", P2)
    assert sk["status"] == "skipped" and sk["skip_reason"] == SKIP_REASON and sk["n_skipped"] == 3
    failed = board.issues[board.issues["status"] == "failed"]
    assert len(failed) == 1 and failed.iloc[0]["reason"] == FAIL_REASON


def test_markdown(board, store_dir):
    md = to_markdown(board)
    assert md.startswith("# Leaderboard: quick\n")
    assert "validator `source-val`" in md
    assert "Seeds: 3 (0, 1, 2)." in md
    assert "moons→moons-rot35" in md and "moons:moons-rot35" not in md
    assert "81.0 ± 1.4 (+10.0) [n=2]" in md
    assert "72.0 ± 2.0 (+0.0)" in md
    assert "skipped [1]" in md and f"[1] skipped: {SKIP_REASON}" in md
    assert "96.0*" in md
    assert FAIL_REASON in md and "seed 2" in md
    lines = md.splitlines()
    order = [next(i for i, l in enumerate(lines) if l.startswith(f"| {m}")) for m in
             ("dann", "source-only (baseline)", "target-oracle (reference)")]
    assert order == sorted(order)
    # deterministic: same store, same bytes; input order does not matter
    assert to_markdown(build_leaderboard(store_dir, validator="source-val")) == md
    with RunStore(store_dir) as st:
        rows = st.rows()
    assert to_markdown(compute_leaderboard(rows[::-1], "source-val")) == md


def test_csv_round_trip(board):
    df = pd.read_csv(io.StringIO(to_csv(board)))
    assert len(df) == 3 * 2
    row = df[(df["method"] == "dann") & (df["pair"] == P1)].iloc[0]
    cell = board.cell("dann", P1)
    for col in ("target_acc_mean", "target_acc_std", "gap_mean", "forgetting_mean", "source_acc_mean", "rank"):
        assert row[col] == cell[col]
    assert row["n_failed"] == 1 and row["point"] == 0
    assert df[(df["method"] == "target-oracle") & (df["pair"] == P2)].iloc[0]["status"] == "skipped"


def test_json_loads(board):
    doc = json.loads(to_json(board))
    assert doc["validator"] == "source-val" and doc["seeds"] == [0, 1, 2]
    assert [m["method"] for m in doc["methods"]] == ["dann", "source-only", "target-oracle"]
    cell = next(c for c in doc["cells"] if c["method"] == "target-oracle" and c["pair"] == P1)
    assert cell["rank"] is None and cell["reference"] is True and cell["target_acc_std"] == pytest.approx(0.01)


def test_write_reports(store_dir, tmp_path):
    paths = write_reports(store_dir, tmp_path / "out", "source-val")
    assert set(paths) == {"md", "csv"}
    assert paths["md"].read_text(encoding="utf-8") == to_markdown(build_leaderboard(store_dir, "source-val"))
    again = write_reports(store_dir, tmp_path / "out2", "source-val")
    assert again["md"].read_bytes() == paths["md"].read_bytes()
    assert again["csv"].read_bytes() == paths["csv"].read_bytes()


def test_all_failed_cell_and_single_seed():
    rows = [
        _record(P1, "source-only", 0, 0, {}, tacc=0.7, sacc=0.9),
        _record(P1, "dann", 0, 0, {}, "failed", FAIL_REASON),
        _record(P1, "mcc", 0, 0, {}, tacc=0.75, sacc=0.9),
    ]
    b = compute_leaderboard(pd.DataFrame(rows))
    assert b.cell("dann", P1)["status"] == "failed"
    assert math.isnan(b.cell("mcc", P1)["target_acc_std"])
    md = to_markdown(b)
    assert "| failed" in md
    assert "75.0 ± — (+5.0)" in md
    assert list(b.methods["method"]) == ["mcc", "source-only", "dann"]  # no result: last among ranked


def test_several_points_need_a_validator(store_dir):
    with pytest.raises(LeaderboardError, match="validator"):
        build_leaderboard(store_dir)
    with pytest.raises(LeaderboardError, match="stored validators"):
        build_leaderboard(store_dir, validator="snd")


def test_protocol_variants_are_separate_columns():
    rows = []
    for k in (0, 5):
        r = _record(P1, "source-only", 0, 0, {"k": k}, tacc=0.7 + k / 100, sacc=0.9)
        r["protocol"] = canonical_json({"k_target": k})
        r["key"] = f"k{k}"
        rows.append(r)
    b = compute_leaderboard(rows)
    assert b.pairs == (f"{P1} [k_target=0]", f"{P1} [k_target=5]")
    assert b.pair_labels[1] == "moons→moons-rot35 [k_target=5]"


def test_errors_say_what_to_do():
    with pytest.raises(LeaderboardError, match="run a suite"):
        compute_leaderboard([])
    rows = [_record(P1, "source-only", 0, 0, {}, tacc=0.7, sacc=0.9)]
    other = dict(rows[0], suite="digits", key="x")
    with pytest.raises(LeaderboardError, match="suite=NAME"):
        compute_leaderboard(rows + [other])
    assert compute_leaderboard(rows + [other], suite="digits").suite == "digits"


def test_pair_label():
    assert pair_label("moons:moons-rot35") == "moons→moons-rot35"


# ---------------------------------------------------------------- negative transfer, warning, selection


def test_holm_known_answer():
    from dabench.leaderboard import holm

    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    out = holm([0.5, math.nan, 0.01])
    assert out[0] == pytest.approx(0.5) and math.isnan(out[1]) and out[2] == pytest.approx(0.02)


def test_paired_t_test_matches_scipy():
    from scipy import stats

    from dabench.leaderboard import paired_t_test

    a, b = [0.61, 0.60, 0.66], [0.70, 0.72, 0.74]
    t, p = paired_t_test([x - y for x, y in zip(a, b)])
    ref = stats.ttest_rel(a, b)
    assert t == pytest.approx(ref.statistic) and p == pytest.approx(ref.pvalue)
    assert paired_t_test([0.1, 0.1, 0.1])[1] == 0.0  # identical non-zero differences
    assert paired_t_test([0.0, 0.0])[1] == 1.0
    assert math.isnan(paired_t_test([0.1])[1])


def _nt_rows():
    """Three pairs, 3 seeds: 'aligner' hurts on P1 (consistently), helps on P2, is noisy on P3.
    Extras: the aligner drags its predicted prior away from the reference's BBSE estimate on P1."""
    P3 = "covshift-source:covshift-target"
    so = {P1: [0.70, 0.72, 0.74], P2: [0.60, 0.62, 0.64], P3: [0.50, 0.60, 0.70]}
    al = {P1: [0.40, 0.43, 0.44], P2: [0.80, 0.83, 0.84], P3: [0.62, 0.55, 0.68]}
    rows = []
    for pair in (P1, P2, P3):
        for seed in range(3):
            for method, acc in (("source-only", so), ("aligner", al)):
                r = _record(pair, method, 0, seed, {}, tacc=acc[pair][seed], sacc=0.9)
                r["key"] = f"{pair}-{method}-{seed}"
                r["val_source-val"] = 0.9
                drift = method == "aligner" and pair == P1
                r.update({"x_prior_pred_0": 0.8 if drift else 0.3, "x_prior_pred_1": 0.2 if drift else 0.7,
                          "x_prior_bbse_0": 0.25, "x_prior_bbse_1": 0.75,
                          "x_target_pred": "0,0,0,0" if drift else "1,1,0,1"})
                rows.append(r)
    return rows, P3


def test_negative_transfer_verdicts_paired_test_and_holm():
    from scipy import stats

    rows, P3 = _nt_rows()
    b = compute_leaderboard(rows)
    c1, c2, c3 = (b.cell("aligner", p) for p in (P1, P2, P3))
    assert c1["nt_flag"] == "negative transfer" and c1["gap_mean"] < 0
    assert c2["nt_flag"] == "better"
    assert c3["nt_flag"] == "n.s."
    # the p-values are paired t-tests, Holm-corrected over the method's three pairs
    raw = [stats.ttest_rel([r for r in al], so).pvalue for al, so in (
        ([0.40, 0.43, 0.44], [0.70, 0.72, 0.74]), ([0.80, 0.83, 0.84], [0.60, 0.62, 0.64]),
        ([0.62, 0.55, 0.68], [0.50, 0.60, 0.70]))]
    assert c1["nt_p"] == pytest.approx(raw[0])
    from dabench.leaderboard import holm

    assert [c1["nt_p_holm"], c2["nt_p_holm"], c3["nt_p_holm"]] == pytest.approx(holm(raw))
    assert c1["nt_n"] == 3
    # the reference itself is not tested
    assert b.cell("source-only", P1)["nt_flag"] == "n/a"
    # a significantly better cell is never flagged
    assert not ((b.cells["nt_flag"] == "negative transfer") & (b.cells["gap_mean"] > 0)).any()
    info = b.nt_test
    assert info["alpha"] == 0.05 and "paired t-test" in info["test"] and "Holm" in info["correction"]
    assert info["n_seeds"] == 3 and "only 3 paired seeds" in info["power_warning"]
    md = to_markdown(b)
    assert "## Negative transfer" in md and "**Warning**: only 3 paired seeds" in md
    assert "**negative transfer**" in md and " **NT**" in md
    assert "Wilcoxon" in md


def test_label_free_warning_and_its_evaluation():
    rows, P3 = _nt_rows()
    b = compute_leaderboard(rows)
    c1, c2 = b.cell("aligner", P1), b.cell("aligner", P2)
    # predicted prior (0.8, 0.2) vs BBSE (0.25, 0.75): TV 0.55; the reference's (0.3, 0.7): TV 0.05
    assert c1["warn_prior_drift"] == pytest.approx(0.50)
    assert c2["warn_prior_drift"] == pytest.approx(0.0)
    assert c1["warn_flag"] is True and c2["warn_flag"] is False
    assert c1["warn_disagreement"] == pytest.approx(0.75)  # 3 of the 4 stored predictions differ
    assert c1["warn_val_source-val"] == pytest.approx(0.0)
    ev = b.warning_eval
    assert ev["n_cells"] == 3 and ev["n_negative_transfer"] == 1
    assert ev["precision"] == 1.0 and ev["recall"] == 1.0 and ev["auroc"] == 1.0
    assert set(ev["candidate_auroc"]) >= {"warn_prior_drift", "warn_disagreement", "warn_val_source-val"}
    md = to_markdown(b)
    assert "## Label-free negative-transfer warning" in md and "AUROC 1.00" in md
    doc = json.loads(to_json(b))
    assert doc["warning_evaluation"]["auroc"] == 1.0
    cell = next(c for c in doc["cells"] if c["method"] == "aligner" and c["pair"] == P1)
    assert cell["nt_flag"] == "negative transfer" and cell["warn_flag"] is True


def test_warning_without_extras_is_missing_not_wrong(board):
    c = board.cell("dann", P1)
    assert math.isnan(c["warn_prior_drift"]) and c["warn_flag"] is None
    assert math.isnan(board.warning_eval["auroc"])
    assert "## Label-free negative-transfer warning" in to_markdown(board)


def test_negative_transfer_per_protocol_variant_of_one_pair():
    """One pair run under two protocols (shared, and native with k labels) is two
    columns; each column's verdict pairs the method with that column's own
    reference runs (source-only / target-only-k), never the other variant's."""
    rows = []
    shared = canonical_json({"k_target": 0, "feature_space": "shared"})
    native = canonical_json({"k_target": 3, "feature_space": "native"})
    for seed in range(3):
        for proto, method, acc in ((shared, "source-only", 0.50), (shared, "dann", 0.30),
                                   (native, "target-only-k", 0.60), (native, "stn", 0.70)):
            r = _record(P1, method, 0, seed, {}, tacc=acc + 0.01 * seed * (method in ("dann", "stn")), sacc=0.9)
            r["protocol"] = proto
            r["key"] = f"{method}{seed}"
            rows.append(r)
    b = compute_leaderboard(rows)
    (col_shared,) = [c for c in b.pairs if "feature_space=shared" in c]
    (col_native,) = [c for c in b.pairs if "feature_space=native" in c]
    assert b.cell("dann", col_shared)["nt_reference"] == "source-only"
    assert b.cell("dann", col_shared)["nt_flag"] == "negative transfer"
    assert b.cell("dann", col_shared)["nt_n"] == 3
    assert b.cell("stn", col_native)["nt_reference"] == "target-only-k"
    assert b.cell("stn", col_native)["nt_flag"] == "better"
    assert b.cell("stn", col_native)["nt_n"] == 3


def test_reference_is_target_only_k_with_labelled_target_samples():
    rows = []
    for seed in range(3):
        for method, acc in (("source-only", 0.5), ("target-only-k", 0.8), ("fewshot", 0.7)):
            r = _record(P1, method, 0, seed, {}, tacc=acc + 0.01 * seed * (method == "fewshot"), sacc=0.9)
            r["protocol"] = canonical_json({"k_target": 5, "feature_space": "shared"})
            r["key"] = f"{method}{seed}"
            rows.append(r)
    b = compute_leaderboard(rows)
    c = b.cell("fewshot", P1)
    assert c["nt_reference"] == "target-only-k"
    assert c["gap_mean"] == pytest.approx(-0.09)  # against target-only-k, not source-only
    assert c["forgetting_mean"] == pytest.approx(0.0)  # forgetting stays against source-only
    assert c["nt_flag"] == "negative transfer"
    assert b.cell("source-only", P1)["nt_flag"] in ("negative transfer", "n.s.")  # tested against target-only-k
    assert b.cell("target-only-k", P1)["nt_flag"] == "n/a"


def test_oracle_selection_and_selection_gap(board):
    sel = board.selection.set_index(["method", "pair", "validator"])
    r = sel.loc[("dann", P1, "source-val")]
    assert r["point"] == 0 and r["oracle_point"] == 1
    assert r["oracle_acc_mean"] == pytest.approx(0.91)
    assert r["selection_gap"] == pytest.approx(0.91 - 0.81)
    r2 = sel.loc[("dann", P2, "source-val")]
    assert r2["point"] == 1 and r2["oracle_point"] == 0 and r2["selection_gap"] == pytest.approx(0.71 - 0.62)
    assert sel.loc[("dann", P1, "entropy")]["selection_gap"] == pytest.approx(0.10)
    assert ("source-only", P1, "source-val") not in sel.index  # one point: nothing to select
    md = to_markdown(board)
    assert "## Oracle selection (upper bound: uses target labels)" in md
    assert "91.0 ± 1.0 [point 1]" in md
    assert "### Selection gap per validator" in md and "source-val (main)" in md
    assert "9.5" in md  # mean gap of source-val over the two pairs, in points
    doc = json.loads(to_json(board))
    assert {s["validator"] for s in doc["selection"]} == {"source-val", "entropy"}


# ---------------------------------------------------------------- label-free run statistics in the store


def test_store_keeps_extras_and_opens_old_stores(tmp_path):
    import sqlite3

    from dabench.store import RunScores

    rec = _record(P1, "dann", 0, 0, {}, tacc=0.7, sacc=0.9)
    with RunStore(tmp_path) as st:
        st.write(rec, RunScores({"snd": 1.5}, extras={"prior_pred_0": 0.25, "target_pred": "0,1,1"}))
        row = st.rows()[0]
    assert row["val_snd"] == 1.5 and row["x_prior_pred_0"] == 0.25 and row["x_target_pred"] == "0,1,1"
    with RunStore(tmp_path) as st:  # a rewrite of the run replaces its extras
        st.write(rec, {"snd": 1.0})
        assert "x_prior_pred_0" not in st.rows()[0]
    # a store written before the extras table existed still opens, and gains the table
    old = tmp_path / "old"
    with RunStore(old) as st:
        st.write(rec, {"snd": 1.0})
    with sqlite3.connect(old / "runs.sqlite") as con:
        con.execute("DROP TABLE extras")
    with RunStore(old) as st:
        assert st.rows()[0]["val_snd"] == 1.0
        st.write(dict(rec, key="new"), RunScores(extras={"prior_pred_0": 0.5}))
        assert {r["key"]: r.get("x_prior_pred_0") for r in st.rows()}["new"] == 0.5


def test_bbse_recovers_a_shifted_class_prior():
    from dabench.runner import bbse_prior

    rng = np.random.default_rng(0)
    # a classifier that is right 90% of the time on both classes
    def proba(y):
        right = rng.random(len(y)) < 0.9
        pred = np.where(right, y, 1 - y)
        return np.eye(2)[pred] * 0.98 + 0.01
    ys = rng.integers(0, 2, 4000)  # source 50/50
    yt = (rng.random(4000) < 0.8).astype(int)  # target 20/80
    q = bbse_prior(proba(ys), ys, proba(yt))
    assert q == pytest.approx([0.2, 0.8], abs=0.03)


def test_evaluate_records_label_free_extras(registry):
    from conftest import make_task

    from dabench.runner import N_STORED_PREDICTIONS, evaluate

    task, split = make_task(registry, "condshift-source:condshift-target", steps=30, source_lr=0.01)
    pred = registry.methods["source-only"]().fit(task)
    metrics, scores = evaluate(pred, split, task, {"bnm": registry.validators["bnm"]})
    assert set(scores) == {"bnm"}
    ex = scores.extras
    p = pred.predict_proba(task.target_train.X)
    assert [ex["prior_pred_0"], ex["prior_pred_1"]] == pytest.approx(p.mean(0))
    assert ex["prior_bbse_0"] + ex["prior_bbse_1"] == pytest.approx(1.0)
    labels = ex["target_pred"].split(",")
    assert len(labels) == min(N_STORED_PREDICTIONS, len(task.target_train.X))
    assert labels == [str(c) for c in p[:len(labels)].argmax(1)]


def test_warning_discounts_drift_within_the_references_seed_noise():
    rows, P3 = _nt_rows()
    # on P3 the reference's own predicted prior jumps between seeds, and the aligner drifts
    ref_priors = {0: (0.3, 0.7), 1: (0.7, 0.3), 2: (0.3, 0.7)}
    for r in rows:
        if r["pair"] == P3:
            p0, p1 = ref_priors[r["seed"]] if r["method"] == "source-only" else (0.8, 0.2)
            r.update({"x_prior_pred_0": p0, "x_prior_pred_1": p1})
    c = compute_leaderboard(rows).cell("aligner", P3)
    # per seed: TV(aligner, bbse) - TV(ref, bbse) = 0.55 - {0.05, 0.45, 0.05} = {0.5, 0.1, 0.5}
    assert c["warn_prior_drift"] == pytest.approx((0.5 + 0.1 + 0.5) / 3)
    spread = (0.4 + 0.0 + 0.4) / 3  # mean pairwise TV of the reference's priors over seeds
    assert c["warn_prior_drift_beyond_noise"] == pytest.approx(c["warn_prior_drift"] - spread)
