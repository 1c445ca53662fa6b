"""Tests that kill plausible one-line bugs a mutation spot-check found
surviving the suite (``scripts/mutation_check.py`` re-applies each one and
checks that these, or other, tests catch it):

- the negative-transfer verdict (one-sided, per cell: dabench.verdicts)
  flagging a cell that is significantly *better*, or dropping the test
  points' floor under the seeds' spread;
- Holm's correction (the reported ``nt_p_holm``) applied over all methods
  instead of per method;
- reference rows (target-oracle) no longer excluded from the test;
- ``backbone`` dropped from the run key;
- CBST's class-threshold rank ceiled instead of floored (the reference's
  ``kc_parameters`` floors ``portion * N_c``);
- the kit leaving target *train* labels unguarded for non-oracle methods.
"""

from __future__ import annotations

import math

import pytest

from conftest import write
from dabench.leaderboard import compute_leaderboard, paired_t_test
from dabench.store import canonical_json

REF_ACC = [0.70, 0.70, 0.70]
#: gaps of -10, -13, -7 points: t = 5.77 with 2 degrees of freedom, p = 0.029
SIGNIFICANT = [-0.10, -0.13, -0.07]
#: gaps of -10, +10, +5 points: p = 0.84
NOISE = [-0.10, 0.10, 0.05]


def _rows(spec: dict[tuple[str, str], list[float]], oracle: dict[str, list[float]] | None = None) -> list[dict]:
    """Run rows: ``spec[(method, pair)]`` are per-seed gaps to source-only."""
    rows = []
    pairs = sorted({p for _, p in spec})

    def add(method: str, pair: str, accs: list[float]) -> None:
        for seed, acc in enumerate(accs):
            rows.append({"key": f"{method}/{pair}/{seed}", "suite": "s", "pair": pair, "method": method, "point": 0,
                         "seed": seed, "status": "ok", "params": canonical_json({}), "target_acc": acc,
                         "source_acc": 0.9, "reference": int(method == "target-oracle"), "family": "x",
                         "protocol": canonical_json({"k_target": 0, "feature_space": "shared"})})

    for pair in pairs:
        add("source-only", pair, REF_ACC)
    for (method, pair), gaps in spec.items():
        add(method, pair, [r + g for r, g in zip(REF_ACC, gaps)])
    for pair, accs in (oracle or {}).items():
        add("target-oracle", pair, accs)
    return rows


def test_preconditions_of_the_crafted_gaps():
    assert 0.025 < paired_t_test(SIGNIFICANT)[1] < 0.05
    assert paired_t_test(NOISE)[1] > 0.5


def test_the_verdict_is_one_sided_and_read_per_cell():
    # SIGNIFICANT is a loss (one-sided p = 0.015): negative transfer; the same gaps as a gain are "better"
    board = compute_leaderboard(_rows({("m", "a:b"): SIGNIFICANT, ("m", "c:d"): [-g for g in SIGNIFICANT]}))
    assert board.cell("m", "a:b")["nt_flag"] == "negative transfer"
    assert board.cell("m", "c:d")["nt_flag"] == "better"
    assert board.cell("m", "c:d")["nt_p_worse"] > 0.9


def test_the_verdict_keeps_the_test_points_floor_under_the_seed_spread():
    from dabench.verdicts import nt_verdict

    # three seeds agreeing to a hundredth of a point on a 0.3-point loss: without the floor this is
    # "significant"; with a 1-point sampling spread of a gap it is not
    gaps = [-0.0030, -0.0031, -0.0029]
    assert nt_verdict(gaps).flag == "negative transfer"
    assert nt_verdict(gaps, point_sd=0.01).flag == "n.s."


def test_holm_is_applied_per_method_not_over_all_methods():
    # two methods, one pair each: per method there is one test (no correction);
    # over all methods Holm would double m's p-value past 0.05
    board = compute_leaderboard(_rows({("m", "a:b"): SIGNIFICANT, ("other", "a:b"): NOISE}))
    c = board.cell("m", "a:b")
    assert c["nt_p_holm"] == pytest.approx(c["nt_p"])
    assert c["nt_flag"] == "negative transfer"


def test_reference_rows_get_no_verdict():
    # the oracle is far better than source-only on every seed: it would test "better"
    board = compute_leaderboard(_rows({("m", "a:b"): NOISE}, oracle={"a:b": [0.95, 0.96, 0.97]}))
    o = board.cell("target-oracle", "a:b")
    assert o["nt_flag"] == "n/a" and math.isnan(o["nt_p"])
    assert board.cell("source-only", "a:b")["nt_flag"] == "n/a"


def test_only_the_backbone_changes_the_run_key(registry, tmp_path):
    from dabench.suite import parse_suite

    text = 'name = "k"\nseeds = 1\npairs = ["digits:mnist"]\n{bb}\n[methods.source-only]\n'
    a = parse_suite(write(tmp_path / "a.toml", text.format(bb="")), registry).expand(registry)
    others = sorted(set(registry.backbones) - {"default"})
    assert others, "needs a second registered backbone"
    b = parse_suite(write(tmp_path / "b.toml", text.format(bb=f'backbone = "{others[0]}"')), registry).expand(registry)
    assert len(a) == len(b) == 1 and a[0].backbone != b[0].backbone
    assert a[0].key != b[0].key


def test_cbst_threshold_rank_is_the_floor_of_the_portion():
    torch = pytest.importorskip("torch")
    from dabench_plugins.cbst import class_balanced_thresholds

    # five points predicted as class 0 with confidences 0.9 .. 0.55, portion 0.5: p * N = 2.5,
    # rank floor(2.5) = 2 (the reference's kc_parameters) -> the second largest confidence, 0.8
    conf = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.55], dtype=torch.float64)
    proba = torch.stack([conf, 1 - conf], dim=1)
    thr = class_balanced_thresholds(proba, 0.5)
    assert thr[0].item() == pytest.approx(0.8)
    assert math.isinf(thr[1].item())
    # a class too small for one sample at this portion selects nothing
    assert math.isinf(class_balanced_thresholds(proba[:1], 0.5)[0].item())


KIT_TRAIN_PEEKER = '''
import gc
import numpy as np
from dabench import Method, hookimpl


class _P:
    def __init__(self, n):
        self.n = n
    def predict_proba(self, X, domain="target"):
        return np.full((len(X), self.n), 1.0 / self.n)
    def embed(self, X, domain="target"):
        return np.asarray(X, dtype=np.float32)


class TrainPeeker(Method):
    """Reads the target *train* labels of whatever split it finds."""
    name = "kit-train-peeker"
    def fit(self, task):
        for o in gc.get_objects():
            if type(o).__name__ == "PairSplit":
                try:
                    o.target_train.y[:3]
                except Exception:
                    pass
        return _P(task.n_classes)


@hookimpl
def dabench_methods(register):
    register(TrainPeeker)
'''


def test_the_kit_guards_target_train_labels_of_non_oracle_methods(tmp_path):
    from dabench.plugins import _module_from_path
    from dabench.testing import run_checks

    mod = _module_from_path(write(tmp_path / "kittrainpeeker.py", KIT_TRAIN_PEEKER))
    [r] = run_checks(mod.TrainPeeker, checks=["check_no_target_labels"], plugin=mod)
    assert r.status == "FAIL" and "target train labels" in r.message, r
