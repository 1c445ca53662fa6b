"""What running ``fit`` in a worker process costs (``--benchmark-only``).

Since ``fit`` runs where the host holds no target labels, the serial
executor computes every run in one long-lived worker process: it starts once
per sweep, receives each split once, and restores the process-wide state of
torch, NumPy and scikit-learn before every run.  This times, on a trivial
method (so only the host's overhead is left):

- ``inprocess``: N runs in the driver process (what serial runs were);
- ``worker``: the same N runs through the serial executor's worker, start
  included;
- ``spawn``: starting one fresh worker process until it is ready, i.e. what
  a fresh process per run would add to every run.

The summary prints the worker's overhead per run, its start cost, and the
spawn cost for comparison.
"""

from __future__ import annotations

import os
import textwrap
import time
from pathlib import Path

import pytest

from dabench.executors import InProcessExecutor, SerialExecutor
from dabench.plugins import get_registry
from dabench.runner import Runner
from dabench.store import RunStore
from dabench.suite import parse_suite

N_SEEDS = int(os.environ.get("DABENCH_BENCH_RUNS", "40"))

TRIVIAL = '''
import numpy as np
from dabench import Method, hookimpl


class _Uniform:
    def __init__(self, k):
        self.k = k
    def predict_proba(self, X, domain="target"):
        return np.full((len(X), self.k), 1.0 / self.k)
    def embed(self, X, domain="target"):
        return np.asarray(X)


class Trivial(Method):
    name = "trivial"
    def fit(self, task):
        return _Uniform(task.n_classes)


@hookimpl
def dabench_methods(register):
    register(Trivial)
'''


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("overhead")
    (d / "p").mkdir()
    (d / "p" / "trivial.py").write_text(TRIVIAL)
    # one split for all runs (one seed per run would time split-making too)
    (d / "s.toml").write_text(textwrap.dedent(f"""
        name = "overhead"
        seeds = [0]
        pairs = ["covshift-source:covshift-target"]
        [methods.trivial]
        random = {{ n = 1, seed = 0 }}
        """))
    reg = get_registry(plugins_dir=d / "p")
    suite = parse_suite(d / "s.toml", reg)
    return d, reg, suite


@pytest.mark.parametrize("where", ["inprocess", "worker"])
def test_runs_of_a_trivial_method(benchmark, setup, where):
    d, reg, suite = setup
    # N runs of one split: N copies of the pair under N budgets would change the split key, so
    # instead N seeds of a tiny pair (each seed one split, as in a real sweep)
    suite = suite.restrict(seeds=N_SEEDS)
    rounds = iter(range(100))

    def sweep() -> None:
        with RunStore(d / f"{where}{next(rounds)}") as st:
            ex = InProcessExecutor(threads=1) if where == "inprocess" else SerialExecutor(threads=1)
            summary = Runner(reg, st, device="cpu", plugins_dir=d / "p").run(suite, executor=ex)
        assert summary.ok == N_SEEDS, summary

    benchmark.group = "worker overhead"
    benchmark.pedantic(sweep, rounds=2, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update(kind="worker", where=where, runs=N_SEEDS, loadavg=os.getloadavg()[0])


def test_spawning_a_worker(benchmark, setup):
    import multiprocessing as mp

    from dabench.executors import WorkerConfig, _Worker

    d, reg, _ = setup
    config = WorkerConfig(plugins_dir=str(d / "p"), threads=1)

    def spawn() -> None:
        w = _Worker(mp.get_context("spawn"), config, "cpu", 0)
        t0 = time.time()
        msg = w.conn.recv()
        assert msg[0] == "ready" and time.time() - t0 < 600
        w.stop()

    benchmark.group = "worker overhead"
    benchmark.pedantic(spawn, rounds=3, iterations=1)
    benchmark.extra_info.update(kind="worker", where="spawn", runs=1, loadavg=os.getloadavg()[0])
