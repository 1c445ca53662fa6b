"""Calibrated negative-transfer verdicts, minimum detectable effects, run health."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pandas as pd
import pytest

from conftest import write
from dabench.health import at_chance, cell_engagement, run_health
from dabench.leaderboard import compute_leaderboard, to_csv, to_json, to_markdown, write_reports
from dabench.verdicts import (
    decode_bits,
    encode_bits,
    hierarchical_bootstrap_p,
    minimum_detectable_effect,
    nt_verdict,
    one_sided_t,
    points_only_p,
)
from test_leaderboard import P1, P2, _record

# ---------------------------------------------------------------- statistics


def test_bits_round_trip_and_bad_input():
    rng = np.random.default_rng(0)
    for n in (0, 1, 7, 8, 9, 1000):
        m = rng.random(n) < 0.6
        text = encode_bits(m)
        assert text.startswith(f"{n}:") and np.array_equal(decode_bits(text), m)
    assert len(encode_bits(np.ones(1000, bool))) <= 180  # compact: a scalar text per run
    for bad in (None, 3.0, "", "x:AAAA", "5:not base64!", "100:AA=="):
        assert decode_bits(bad) is None


def test_one_sided_t_matches_scipy():
    from scipy import stats

    d = [-0.03, -0.01, -0.05, 0.01]
    t, pw, pb = one_sided_t(d)
    assert t == pytest.approx(stats.ttest_1samp(d, 0.0).statistic)
    assert pw == pytest.approx(stats.ttest_1samp(d, 0.0, alternative="less").pvalue)
    assert pb == pytest.approx(stats.ttest_1samp(d, 0.0, alternative="greater").pvalue)
    assert one_sided_t([-0.1, -0.1])[1:] == (0.0, 1.0)
    assert one_sided_t([0.0, 0.0])[1:] == (1.0, 1.0)
    assert all(math.isnan(x) for x in one_sided_t([0.1]))


def test_mde_is_the_loss_flagged_with_80_percent_power():
    from scipy import stats

    for n in (3, 5, 10):
        mde = minimum_detectable_effect(0.02, n)
        crit = stats.t.isf(0.05, n - 1)
        assert stats.nct.sf(crit, n - 1, mde * math.sqrt(n) / 0.02) == pytest.approx(0.8, abs=1e-6)
    # more seeds see smaller losses; large n approaches the normal formula
    assert minimum_detectable_effect(0.02, 3) > minimum_detectable_effect(0.02, 5) > minimum_detectable_effect(0.02, 10)
    z = stats.norm.isf(0.05) + stats.norm.isf(0.2)
    assert minimum_detectable_effect(0.02, 400) == pytest.approx(z * 0.02 / 20, rel=0.01)
    assert math.isnan(minimum_detectable_effect(0.02, 1)) and minimum_detectable_effect(0.0, 3) == 0.0


def test_verdict_is_calibrated_on_simulated_seeds():
    """Normal per-seed gaps, 3 seeds: no effect is flagged in about 5 % of cells; a loss is flagged
    in at least 80 % of the cells whose stated MDE it exceeds (the issue's two requirements)."""
    rng = np.random.default_rng(1)
    sims = 1500
    null = [nt_verdict(rng.normal(0.0, 0.03, 3)).flag == "negative transfer" for _ in range(sims)]
    assert 0.03 < np.mean(null) < 0.07
    hits = []
    for _ in range(sims):
        v = nt_verdict(rng.normal(-0.05, 0.03, 3))
        if 0.05 > v.mde:
            hits.append(v.flag == "negative transfer")
    assert len(hits) > 100 and np.mean(hits) >= 0.8


def test_tests_kept_for_the_calibration():
    rng = np.random.default_rng(2)
    ref = [rng.random(500) < 0.7 for _ in range(3)]
    worse = [r & (rng.random(500) < 0.8) for r in ref]  # loses ~14 points on every seed
    assert hierarchical_bootstrap_p(worse, ref, n_boot=300) < 0.01
    assert points_only_p(worse, ref) < 0.001
    assert hierarchical_bootstrap_p(ref, ref, n_boot=300) > 0.5 and points_only_p(ref, ref) == 1.0


# ---------------------------------------------------------------- health


def test_engagement_rules_per_signal():
    def h(**diag):
        return run_health({f"x_diag_{k}": v for k, v in diag.items()})

    assert h().engaged is None
    assert h(engaged=0.0).engaged is False and h(engaged=1.0, mask_rate=0.0).engaged is True  # decides alone
    assert h(disc_acc_start=0.57, disc_acc_end=0.81).engaged is False  # never fooled
    assert h(disc_acc_start=0.9, disc_acc_end=0.85).engaged is True  # was being fooled
    assert h(disc_acc_start=0.55, disc_acc_end=0.6).engaged is True
    assert h(mask_rate=0.0005, mask_rate_q1=0.0, mask_rate_q2=0.0, mask_rate_q3=0.0, mask_rate_q4=0.002).engaged is False
    assert h(mask_rate=0.2, mask_rate_q4=0.6).engaged is True
    assert h(pseudo_label_rate=0.25).engaged is True and h(pseudo_label_rate=0.0).engaged is False
    assert h(kept_fraction=0.0, cluster_agreement=0.5).engaged is False and h(kept_fraction=0.4).engaged is True
    assert h(weight_ess=0.999).engaged is False and h(weight_ess=0.6).engaged is True
    assert h(seed_seen=3.0).engaged is None  # not a conventional signal
    assert "disc_acc_end 0.81" in h(disc_acc_start=0.57, disc_acc_end=0.81).never_signals[0]
    eng, note = cell_engagement([h(mask_rate=0.0), h(mask_rate=0.3), h()])
    assert eng == "partly" and "1 of 2" in note and "mask_rate" in note
    assert cell_engagement([h(mask_rate=0.0)] * 3)[0] == "never"
    assert cell_engagement([h(), h()])[0] is None


def test_failed_training_at_chance():
    assert at_chance(0.51, 0.5, 400) and not at_chance(0.56, 0.5, 400)  # 2 SE of 400 points = 5 points
    assert at_chance(0.105, 0.1, 10_000) and not at_chance(0.13, 0.1, 10_000)  # at least 1 point
    ok = {"source_acc": 0.95, "target_acc": 0.6, "x_source_chance": 0.5, "x_source_n": 400.0}
    assert run_health(ok).failed_training is None
    assert "at chance" in run_health(dict(ok, source_acc=0.5)).failed_training
    assert "shared source model" in run_health(dict(ok, x_source_model_val_acc=0.49)).failed_training
    # a target-only model (no source accuracy) is judged on the target
    tgt = {"source_acc": None, "target_acc": 0.11, "x_target_chance": 0.11, "x_target_n": 1000.0}
    assert "without source data" in run_health(tgt).failed_training
    # an old store without source_chance: 1 / classes from the stored predicted prior
    assert run_health({"source_acc": 0.34, "x_prior_pred_0": 0.3, "x_prior_pred_1": 0.3,
                       "x_prior_pred_2": 0.4}).failed_training


def _health_rows():
    """P1: 'aligner' never engaged (domain classifier never fooled), 'failing' learned nothing on one
    seed; P2: the reference failed training on seed 0."""
    rows = []
    for pair in (P1, P2):
        for seed in range(3):
            for m, acc in (("source-only", 0.70), ("aligner", 0.72), ("failing", 0.60), ("fine", 0.75)):
                sacc = 0.95
                if m == "failing" and pair == P1 and seed == 1:
                    sacc = 0.5
                if m == "source-only" and pair == P2 and seed == 0:
                    sacc = 0.49
                r = _record(pair, m, 0, seed, {}, tacc=acc + 0.01 * seed * (m != "source-only"), sacc=sacc)
                r.update({"key": f"{pair}{m}{seed}", "x_source_chance": 0.5, "x_source_n": 400.0})
                if m == "aligner":
                    r.update({"x_diag_disc_acc_start": 0.6, "x_diag_disc_acc_end": 0.95 if pair == P1 else 0.7})
                if m == "fine":
                    r.update({"x_diag_mask_rate": 0.3, "x_diag_mask_rate_q1": 0.1, "x_diag_mask_rate_q2": 0.2,
                              "x_diag_mask_rate_q3": 0.4, "x_diag_mask_rate_q4": 0.5})
                rows.append(r)
    return rows


def test_report_marks_cells_that_are_not_findings():
    b = compute_leaderboard(_health_rows())
    a1, f1, ok1 = b.cell("aligner", P1), b.cell("failing", P1), b.cell("fine", P1)
    assert a1["health"] == "not engaged" and a1["nt_flag"] == "not engaged" and math.isnan(a1["rank"])
    assert a1["diag_disc_acc_end"] == pytest.approx(0.95)
    assert f1["health"] == "failed training" and f1["nt_flag"] == "failed training" and f1["n_failed_training"] == 1
    assert "seed 1: source accuracy 50.0 %" in f1["failed_training_note"] and math.isnan(f1["rank"])
    assert ok1["health"] == "ok" and ok1["nt_flag"] == "better" and ok1["engagement"] == "engaged"
    # the reference failed on P2: no verdict against it, and the baseline's own cell is flagged
    assert b.cell("source-only", P2)["health"] == "failed training"
    assert {b.cell(m, P2)["nt_flag"] for m in ("aligner", "fine")} == {"reference failed"}
    assert b.cell("failing", P2)["nt_flag"] == "reference failed"
    # ranking: P1 has unhealthy cells, so only P2 ranks (the reference's failure does not void the accuracies)
    (g,) = b.rank_groups
    assert g.pairs == (P2,) and b.method("fine")["avg_rank"] == 1
    # not findings: left out of the warning's evaluation
    assert b.warning_eval["n_cells"] == 0 or all(
        c["nt_flag"] in ("negative transfer", "n.s.", "better") for c in b.cells.to_dict("records")
        if not math.isnan(c.get("warn_prior_drift_beyond_noise", math.nan)))
    md = to_markdown(b)
    assert "[not engaged]" in md and "[failed training]" in md
    assert "## Engagement and training health" in md
    assert re.search(r"\| aligner +\| moons→moons-rot35 +\| not engaged +\| never engaged in 3 runs \(disc_acc_end\)", md)
    assert re.search(r"\| aligner +\| moons→moons-rot35 +\| never +\| +0\.60 \| +0\.95 \|", md)
    assert "the features never fooled it" in md  # the rule, documented in the report
    assert "0.30 (0.10/0.20/0.40/0.50)" in md  # the per-quarter mask rates
    assert "reference failed" in md
    csv = pd.read_csv(__import__("io").StringIO(to_csv(b)))
    row = csv[(csv["method"] == "aligner") & (csv["pair"] == P1)].iloc[0]
    assert row["health"] == "not engaged" and row["diag_disc_acc_end"] == pytest.approx(0.95)
    doc = json.loads(to_json(b))
    cell = next(c for c in doc["cells"] if c["method"] == "failing" and c["pair"] == P1)
    assert cell["health"] == "failed training" and cell["nt_mde"] is not None
    assert doc["negative_transfer_test"]["n_cells_not_findings"] >= 5


RECORDER = """
from dabench import Method, diagnostics, hookimpl
from dabench.training import TorchPredictor, fit_supervised
import torch

class Inert(Method):
    '''A test method whose adaptation never engages: its confidence mask stays shut.'''
    name = "inert"
    def fit(self, task):
        diagnostics.quarters([0.0] * 40, "mask_rate")
        enc, clf = torch.nn.Identity(), torch.nn.Linear(task.source_dim, task.n_classes)
        fit_supervised(enc, clf, task.source_train.X, task.source_train.y, steps=40, batch_size=64, lr=0.1,
                       weight_decay=0.0, device="cpu", seed=task.seed)
        return TorchPredictor(enc, clf)

@hookimpl
def dabench_methods(register):
    register(Inert)
"""


def test_a_plugin_that_never_engages_is_marked_in_every_format(tmp_path):
    """End to end (in-process; tests/test_diagnostics.py covers the CLI and worker processes): a
    plugin records its signals through dabench.diagnostics; the stored run carries them and the
    host's labelled extras; every report format marks the cell."""
    from dabench.store import RunStore

    from dabench.plugins import get_registry
    from dabench.runner import Runner
    from dabench.suite import parse_suite

    write(tmp_path / "p" / "inert.py", RECORDER)
    reg = get_registry(tmp_path / "p")
    suite = parse_suite(write(tmp_path / "s.toml", 'name = "h"\nseeds = 2\npairs = ["moons:moons-rot35"]\n'
                                                   '[budget]\nsteps = 30\n[methods.source-only]\n[methods.inert]\n'),
                        reg)
    res = tmp_path / "res"
    with RunStore(res) as st:
        Runner(reg, st, device="cpu", plugins_dir=tmp_path / "p").run(suite)
        rows = st.rows()
    one = next(x for x in rows if x["method"] == "inert")
    assert one["x_diag_mask_rate_q4"] == 0.0 and decode_bits(one["x_target_correct"]) is not None
    assert len(decode_bits(one["x_target_correct"])) == int(one["x_target_n"])
    assert one["x_source_chance"] == pytest.approx(0.5, abs=0.05)
    paths = write_reports(res, tmp_path / "out", formats=("md", "csv", "json", "html"))
    for fmt, path in paths.items():
        assert "not engaged" in path.read_text(encoding="utf-8"), fmt


def test_models_trained_on_target_labels_are_judged_on_the_target():
    """An oracle's source accuracy can sit at chance legitimately (e.g. under conditional shift
    the target's concept contradicts the source's): it failed only if its *target* accuracy is at chance."""
    oracle = {"source_acc": 0.5, "target_acc": 0.97, "x_source_chance": 0.5, "x_source_n": 400.0,
              "x_target_chance": 0.5, "x_target_n": 1000.0}
    assert run_health(oracle, target_trained=True).failed_training is None
    assert "trained on target labels" in run_health(dict(oracle, target_acc=0.5), target_trained=True).failed_training
    rows = []
    for seed in range(2):
        for m, tacc in (("source-only", 0.6), ("target-oracle", 0.97)):
            r = _record(P1, m, 0, seed, {}, tacc=tacc, sacc=0.5 if m == "target-oracle" else 0.95)
            r.update({"key": f"{m}{seed}", "x_source_chance": 0.5, "x_source_n": 400.0, "x_target_chance": 0.5,
                      "x_target_n": 1000.0})
            rows.append(r)
    assert compute_leaderboard(rows).cell("target-oracle", P1)["health"] == "ok"
