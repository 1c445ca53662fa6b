"""Running suites: failures stored not fatal, resume after kill -9, determinism."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time


from conftest import TINY_SUITE, run_cli, write
from dabench.plugins import get_registry
from dabench.runner import Runner
from dabench.store import RunStore
from dabench.suite import parse_suite

FAILING = """
import numpy as np
from dabench import Method, Float, hookimpl


class _Uniform:
    def __init__(self, k, bad=False):
        self.k, self.bad = k, bad
    def predict_proba(self, X, domain="target"):
        return np.full((len(X), self.k), 2.0 if self.bad else 1.0 / self.k)
    def embed(self, X, domain="target"):
        return np.asarray(X)


class Crashes(Method):
    name = "crashes"
    hyperparameters = {}
    def fit(self, task):
        raise RuntimeError("boom in fit")


class Diverges(Method):
    name = "diverges"
    hyperparameters = {"lr": Float(1e6, 1.0, 1e9, log=True)}
    def fit(self, task):
        import torch
        from dabench.training import check_finite
        w = torch.ones(1, requires_grad=True)
        for step in range(100):
            loss = (w * self.lr) ** 8
            check_finite(loss, step)
            loss.backward()
            with torch.no_grad():
                w -= self.lr * w.grad
        return _Uniform(task.n_classes)


class BadProba(Method):
    name = "bad-proba"
    hyperparameters = {}
    def fit(self, task):
        return _Uniform(task.n_classes, bad=True)


@hookimpl
def dabench_methods(register):
    register(Crashes)
    register(Diverges)
    register(BadProba)
"""


def test_failures_are_stored_and_the_sweep_goes_on(tmp_path):
    pdir = tmp_path / "p"
    write(pdir / "failing.py", FAILING)
    suite = write(tmp_path / "s.toml", TINY_SUITE.replace("[methods.dann]", "[methods.crashes]\n[methods.diverges]\n[methods.bad-proba]"))
    r = run_cli("run", str(suite), "--results", str(tmp_path / "res"), "--plugins-dir", str(pdir), "--device", "cpu")
    assert r.returncode == 0, r.stderr
    rows = {(x["method"], x["seed"]): x for x in RunStore(tmp_path / "res").rows()}
    assert len(rows) == 8
    for seed in (0, 1):
        assert rows[("source-only", seed)]["status"] == "ok"
        assert rows[("crashes", seed)]["status"] == "failed"
        assert "RuntimeError: boom in fit" in rows[("crashes", seed)]["reason"]
        assert rows[("diverges", seed)]["status"] == "failed"
        assert "DivergedError" in rows[("diverges", seed)]["reason"]
        assert "probability" in rows[("bad-proba", seed)]["reason"]
    assert (tmp_path / "res" / "leaderboard.md").exists()
    # a rerun performs zero new runs; --retry-failed reruns only the failed ones
    again = run_cli("run", str(suite), "--results", str(tmp_path / "res"), "--plugins-dir", str(pdir))
    assert "0 to do" in again.stderr and "done in" in again.stderr
    retry = run_cli("run", str(suite), "--results", str(tmp_path / "res"), "--plugins-dir", str(pdir), "--retry-failed")
    assert "6 to do" in retry.stderr


def test_run_finished_hook_sees_every_stored_run(tmp_path):
    pdir = tmp_path / "p"
    log = tmp_path / "log.jsonl"
    write(pdir / "logger.py", f"""
        import json
        from dabench import hookimpl
        @hookimpl
        def dabench_run_finished(record):
            with open({str(log)!r}, "a") as f:
                f.write(json.dumps(record) + "\\n")
        """)
    suite = write(tmp_path / "s.toml", TINY_SUITE)
    r = run_cli("run", str(suite), "--results", str(tmp_path / "res"), "--plugins-dir", str(pdir), "--methods", "source-only")
    assert r.returncode == 0, r.stderr
    recs = [json.loads(l) for l in log.read_text().splitlines()]
    assert len(recs) == 2 and {x["status"] for x in recs} == {"ok"}
    assert "val_source-val" in recs[0] and recs[0]["target_acc"] is not None


def _rows_by_key(folder):
    return {r["key"]: r for r in RunStore(folder).rows()}


def test_kill_9_mid_sweep_then_resume_loses_and_duplicates_nothing(tmp_path):
    suite = write(tmp_path / "s.toml", TINY_SUITE.replace("seeds = 2", "seeds = 6"))
    res = tmp_path / "res"
    # one worker (the pool of two is killed the same way in test_executors)
    proc = subprocess.Popen([sys.executable, "-m", "dabench", "run", str(suite), "--results", str(res), "--device", "cpu",
                             "--jobs", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    db = res / "runs.sqlite"
    deadline = time.time() + 120
    n = 0
    while time.time() < deadline:
        if db.exists():
            try:
                with sqlite3.connect(db, timeout=5) as con:
                    n = con.execute("SELECT COUNT(*) FROM runs").fetchone()[0]
            except sqlite3.OperationalError:
                n = 0
            if n >= 3:
                break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 3 <= n < 12, f"the sweep should have been killed mid-way (had {n} runs)"
    with sqlite3.connect(db) as con:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    partial = _rows_by_key(res)
    r = run_cli("run", str(suite), "--results", str(res), "--device", "cpu", "--jobs", "1")
    assert r.returncode == 0, r.stderr
    assert f"{len(partial)} already in" in r.stderr
    final = _rows_by_key(res)
    with sqlite3.connect(db) as con:
        assert con.execute("SELECT COUNT(*) FROM runs").fetchone()[0] == 12
    assert all(x["status"] == "ok" for x in final.values())
    # runs stored before the kill are untouched, and the resumed sweep equals a clean one
    for k, row in partial.items():
        assert final[k] == row
    clean = tmp_path / "clean"
    assert run_cli("run", str(suite), "--results", str(clean), "--device", "cpu").returncode == 0
    ref = _rows_by_key(clean)
    assert set(ref) == set(final)
    for k in ref:
        assert ref[k]["target_acc"] == final[k]["target_acc"]
        assert ref[k]["val_source-val"] == final[k]["val_source-val"]


def test_seeded_runs_are_deterministic_on_cpu(tmp_path):
    reg = get_registry()
    suite = parse_suite(write(tmp_path / "s.toml", TINY_SUITE), reg)
    results = []
    for folder in ("a", "b"):
        with RunStore(tmp_path / folder) as st:
            Runner(reg, st, device="cpu").run(suite)
            results.append({r["key"]: (r["target_acc"], r["source_acc"], r["val_entropy"]) for r in st.rows()})
    assert results[0] == results[1]
    assert len(results[0]) == 4
