"""What the host guarantees about target labels, and the suspicion flag.

Three cheating plugins, each about ten lines of trickery:

- ``cheat-stack`` walks the call stack from ``fit`` looking for the
  runner's split;
- ``cheat-gc`` scans the garbage collector for split objects;
- ``cheat-registry`` reloads the public datasets through the registry and
  matches rows.

The first two must no longer reach any label (``fit`` runs in a worker that
does not hold them); the third cannot be prevented (plugins are trusted
code) and is flagged as too good to be true, in every report format, and
left out of the ranks until cleared.  Run in the driver's process (the
in-process executor, as every run was before), the first two do reach the
labels, and are flagged too.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import run_cli, write
from dabench.store import RunStore

CHEATS = """
import gc, json, os, sys
import numpy as np
from dabench import Method, hookimpl

LOG = {log!r}
PAIR = "covshift-source:covshift-target"


class _Lookup:
    '''Predicts the label of every row it has seen, uniform otherwise.'''
    def __init__(self, table, k):
        self.table, self.k = table, k
    def predict_proba(self, X, domain="target"):
        out = np.full((len(X), self.k), 1.0 / self.k)
        for i, row in enumerate(np.asarray(X, dtype=np.float32)):
            c = self.table.get(row.tobytes())
            if c is not None:
                out[i] = np.eye(self.k)[c]
        return out
    def embed(self, X, domain="target"):
        return np.asarray(X)


def _table(pairs):
    table = {{}}
    for X, y in pairs:
        try:  # other tests' splits may still be alive in this process (streamed images, guarded labels)
            rows, labels = np.asarray(X, dtype=np.float32), np.asarray(y)
        except Exception:
            continue
        for row, c in zip(rows, labels):
            table[row.tobytes()] = int(c)
    return table


def _labelled(obj):
    '''(X, y) pairs of target test data an object holds: a split, a runner's split cache.'''
    found = []
    tt = getattr(obj, "target_test", None)
    if tt is not None and hasattr(tt, "X"):
        try:
            found.append((tt.X, object.__getattribute__(tt, "y")))
        except Exception:
            pass
    cache = getattr(obj, "_split_cache", None)
    if isinstance(cache, dict):
        for v in cache.values():
            for x in (v if isinstance(v, tuple) else (v,)):
                found += _labelled(x)
    return found


def _record(name, found):
    with open(LOG, "a") as f:
        f.write(json.dumps({{"method": name, "found": bool(found), "pid": os.getpid()}}) + "\\n")


class CheatStack(Method):
    name = "cheat-stack"
    def fit(self, task):
        found, f = [], sys._getframe()
        while f is not None:
            for v in list(f.f_locals.values()):
                found += _labelled(v)
            f = f.f_back
        _record(self.name, found)
        return _Lookup(_table(found), task.n_classes)


class CheatGC(Method):
    name = "cheat-gc"
    def fit(self, task):
        found = []
        for o in gc.get_objects():
            if type(o).__name__ in ("PairSplit", "Runner"):
                found += _labelled(o)
        _record(self.name, found)
        return _Lookup(_table(found), task.n_classes)


class CheatRegistry(Method):
    name = "cheat-registry"
    def fit(self, task):
        from dabench.plugins import get_registry
        found = []
        for d in get_registry().datasets.values():
            if tuple(d.shape) == tuple(task.target_shape) and d.n_classes == task.n_classes:
                try:
                    found.append(d.load(None))
                except Exception:
                    pass
        _record(self.name, found)
        return _Lookup(_table(found), task.n_classes)


@hookimpl
def dabench_methods(register):
    for c in (CheatStack, CheatGC, CheatRegistry):
        register(c)
"""

SUITE = """
name = "trust"
seeds = 2
pairs = ["covshift-source:covshift-target"]
[protocol]
max_source = 600
max_target = 600
# raw inputs, so that the registry cheat's rows match without undoing the host's standardisation
standardize = "none"
[budget]
steps = 150
batch_size = 64
[methods.source-only]
[methods.target-oracle]
{cheats}
"""

PAIR = "covshift-source:covshift-target"
ALL = ["cheat-stack", "cheat-gc", "cheat-registry"]


def _setup(tmp_path: Path, cheats=ALL):
    log = tmp_path / "cheats.jsonl"
    pdir = write(tmp_path / "p" / "cheats.py", CHEATS.format(log=str(log))).parent
    suite = write(tmp_path / "trust.toml", SUITE.format(cheats="\n".join(f"[methods.{c}]" for c in cheats)))
    return log, pdir, suite


def _found(log: Path) -> dict[str, set[bool]]:
    out: dict[str, set[bool]] = {}
    for line in log.read_text().splitlines():
        x = json.loads(line)
        out.setdefault(x["method"], set()).add(x["found"])
    return out


# one worker (the serial path) and a pool of two: both explicit, so that a 2-core machine,
# where the default is two, does not run the pool twice
@pytest.mark.parametrize("jobs", ["1", "2"])
def test_fit_runs_where_the_host_holds_no_target_labels(tmp_path, jobs):
    log, pdir, suite = _setup(tmp_path, ["cheat-stack", "cheat-gc"])
    r = run_cli("run", str(suite), "--results", str(tmp_path / "res"), "--plugins-dir", str(pdir), "--device", "cpu",
                "--methods", "cheat-stack,cheat-gc", "--jobs", jobs)
    assert r.returncode == 0, r.stderr
    assert _found(log) == {"cheat-stack": {False}, "cheat-gc": {False}}
    with RunStore.open_readonly(tmp_path / "res") as st:
        accs = [x["target_acc"] for x in st.rows()]
    assert len(accs) == 4 and max(accs) < 0.6  # uniform predictions on 3 classes: nothing was found


def test_cheats_are_flagged_in_every_format_and_not_ranked_until_cleared(tmp_path):
    log, pdir, suite = _setup(tmp_path)
    res = tmp_path / "res"
    r = run_cli("run", str(suite), "--results", str(res), "--plugins-dir", str(pdir), "--device", "cpu")
    assert r.returncode == 0, r.stderr
    found = _found(log)
    assert found["cheat-stack"] == {False} and found["cheat-gc"] == {False}
    assert found["cheat-registry"] == {True}  # public data: it cannot be kept from a plugin
    with RunStore.open_readonly(res) as st:
        accs = {(x["method"], x["seed"]): x["target_acc"] for x in st.rows()}
    assert min(accs[("cheat-registry", s)] for s in (0, 1)) == 1.0
    assert max(accs[("target-oracle", s)] for s in (0, 1)) < 0.99

    md = (res / "leaderboard.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| cheat-registry"))
    assert "**SUSPECT**" in row and row.rstrip().endswith("— |")  # no average rank
    assert "## Too good to be true" in md and "near-perfect target accuracy" in md
    assert not any("**SUSPECT**" in line for line in md.splitlines() if line.startswith(("| source-only", "| cheat-s")))
    import pandas as pd

    csv = pd.read_csv(res / "leaderboard.csv")
    cell = csv[(csv["method"] == "cheat-registry")].iloc[0]
    assert bool(cell["suspicious"]) and "target-oracle" in cell["suspicion"] and pd.isna(cell["rank"])
    assert not csv[csv["method"] != "cheat-registry"]["suspicious"].any()
    html = (res / "leaderboard.html").read_text()
    assert 'class="suspect"' in html and "Too good to be true" in html
    j = run_cli("leaderboard", str(res), "--format", "json")
    doc = json.loads(j.stdout)
    jc = next(c for c in doc["cells"] if c["method"] == "cheat-registry")
    assert jc["suspicious"] is True and jc["rank"] is None
    assert doc["suspicion"]["near_perfect"] == 0.99

    # a person checks the method and clears it: ranked again, and still marked as cleared
    cleared = run_cli("leaderboard", str(res), "--format", "json", "--clear", f"cheat-registry:{PAIR}")
    jc = next(c for c in json.loads(cleared.stdout)["cells"] if c["method"] == "cheat-registry")
    assert jc["suspicious"] is False and jc["suspicion_cleared"] is True and jc["rank"] == 1.0
    md2 = run_cli("leaderboard", str(res), "--clear", "cheat-registry").stdout
    assert "cleared (ranked)" in md2


def test_in_the_drivers_process_the_first_two_cheats_reach_the_labels_and_are_flagged(tmp_path):
    """What every run looked like before fit moved to a worker: the flag is
    the safety net for any route to the labels."""
    from dabench.executors import InProcessExecutor
    from dabench.leaderboard import build_leaderboard
    from dabench.plugins import get_registry
    from dabench.runner import Runner
    from dabench.suite import parse_suite

    log, pdir, suite_path = _setup(tmp_path, ["cheat-stack", "cheat-gc"])
    reg = get_registry(plugins_dir=pdir)
    suite = parse_suite(suite_path, reg)
    with RunStore(tmp_path / "res") as st:
        summary = Runner(reg, st, device="cpu").run(suite, executor=InProcessExecutor(threads=1))
    assert summary.ok == 8
    assert _found(log) == {"cheat-stack": {True}, "cheat-gc": {True}}
    board = build_leaderboard(tmp_path / "res", validator="source-val")
    for m in ("cheat-stack", "cheat-gc"):
        c = board.cell(m, PAIR)
        assert c["target_acc_mean"] == 1.0 and c["suspicious"] and c["rank"] != c["rank"]  # NaN rank
    assert not board.cell("source-only", PAIR)["suspicious"]


def test_suspicion_rules(tmp_path):
    """Beating the oracle beyond the seed spread, or near-perfect where the
    oracle is not; an oracle below the pair's reference is no upper bound."""
    from dabench.leaderboard import compute_leaderboard
    from dabench.store import canonical_json

    def rows(accs: dict[str, list[float]]):
        out = []
        for m, vals in accs.items():
            for seed, a in enumerate(vals):
                out.append({"key": f"{m}{seed}", "suite": "s", "pair": "a:b", "method": m, "point": 0, "seed": seed,
                            "status": "ok", "params": canonical_json({}), "target_acc": a, "source_acc": 0.9,
                            "reference": int(m == "target-oracle"), "family": "x",
                            "protocol": canonical_json({"k_target": 0, "feature_space": "shared"})})
        return out

    base = {"source-only": [0.70, 0.71, 0.72], "target-oracle": [0.90, 0.91, 0.92]}
    b = compute_leaderboard(rows({**base, "m": [0.93, 0.935, 0.94]}))  # +2.5 points, spread 2 points: flagged
    assert b.cell("m", "a:b")["suspicious"] and "beats target-oracle" in b.cell("m", "a:b")["suspicion"]
    assert b.cell("m", "a:b")["rank"] != b.cell("m", "a:b")["rank"]  # NaN: not ranked until cleared
    assert "m" not in {x for g in b.rank_groups for x in g.methods}  # no finding: not in a rank group
    b = compute_leaderboard(rows({**base, "m": [0.93, 0.935, 0.94]}), cleared=["m"])
    assert not b.cell("m", "a:b")["suspicious"] and b.cell("m", "a:b")["rank"] == 1.0
    b = compute_leaderboard(rows({**base, "m": [0.91, 0.92, 0.93]}))  # +1 point, within the spread
    assert not b.cell("m", "a:b")["suspicious"] and b.cell("m", "a:b")["rank"] == 1.0
    b = compute_leaderboard(rows({"source-only": [0.7] * 3, "target-oracle": [0.985] * 3, "m": [0.992] * 3}))
    assert "near-perfect" in b.cell("m", "a:b")["suspicion"]  # within the 1-point margin, but near-perfect
    b = compute_leaderboard(rows({"source-only": [0.7] * 3, "target-oracle": [0.995] * 3, "m": [0.996] * 3}))
    assert not b.cell("m", "a:b")["suspicious"]  # the oracle is near-perfect too
    # an undertrained oracle (below source-only): only the near-perfect rule applies
    b = compute_leaderboard(rows({"source-only": [0.89] * 3, "target-oracle": [0.80] * 3, "m": [0.90] * 3}))
    assert not b.cell("m", "a:b")["suspicious"] and b.suspicion["oracle_below_reference"] == ["a→b"]
    b = compute_leaderboard(rows({"source-only": [0.89] * 3, "target-oracle": [0.80] * 3, "m": [1.0] * 3}))
    assert b.cell("m", "a:b")["suspicious"]
    # no oracle: nothing can be flagged, and the report says so
    b = compute_leaderboard(rows({"source-only": [0.7] * 3, "m": [1.0] * 3}))
    assert not b.cell("m", "a:b")["suspicious"]
    from dabench.leaderboard import to_markdown

    assert "the check could not run" in to_markdown(b)


def test_what_a_worker_receives_holds_no_target_labels(registry):
    """The split's worker side (and a non-oracle run request), as pickled to a
    worker, carries no target label: only inputs."""
    import pickle

    from conftest import make_task
    from dabench.contract import Unlabeled
    from dabench.isolation import RunRequest, SplitInputs

    _, split = make_task(registry, PAIR)
    inputs = SplitInputs.of(split, ("k",))
    assert isinstance(inputs.target_train, Unlabeled) and inputs.target_labeled is None
    sent = pickle.dumps((inputs, RunRequest(None, "cpu", ("k",), None)))
    for labels in (split.target_test.y, split.target_train.y):
        assert len(labels) > 50 and labels.tobytes() not in sent
    assert split.target_test.X.tobytes() in sent  # the unlabelled evaluation inputs do go


def test_the_driver_scores_macro_f1_as_scikit_learn_does():
    import numpy as np
    from sklearn.metrics import f1_score

    from dabench.runner import macro_f1

    rng = np.random.default_rng(0)
    for n in (2, 3, 10):
        for trial in range(30):
            m = int(rng.integers(1, 60))
            y, p = rng.integers(0, n, m), rng.integers(0, n, m)
            if trial % 5 == 0:
                p = np.zeros(m, dtype=int)  # classes never predicted, or never present
            assert macro_f1(y, p, n) == pytest.approx(
                f1_score(y, p, labels=list(range(n)), average="macro", zero_division=0), abs=1e-12)
