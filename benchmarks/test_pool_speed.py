"""Quick-suite wall time with 1 worker (the serial executor) and 2 workers
(the process pool), 1 thread per run in both (dabench's default).

A subset of the quick suite keeps it reasonable: by default every pair and
method with one seed (105 of its 315 runs); ``DABENCH_BENCH_SEEDS=3`` times
the whole suite, ``DABENCH_BENCH_PAIRS=a:b,c:d`` restricts the pairs.
One round each: a sweep is minutes long, and its runs already average out.
"""

from __future__ import annotations

import os
import resource
from pathlib import Path

import pytest

from dabench.executors import make_executor
from dabench.plugins import get_registry
from dabench.runner import Runner
from dabench.store import RunStore
from dabench.suite import parse_suite

ROOT = Path(__file__).resolve().parents[1]
SEEDS = int(os.environ.get("DABENCH_BENCH_SEEDS", "1"))
PAIRS = [p for p in os.environ.get("DABENCH_BENCH_PAIRS", "").split(",") if p] or None


@pytest.mark.parametrize("jobs", [1, 2])
def test_quick_suite_wall_time(benchmark, jobs, tmp_path):
    reg = get_registry()
    suite = parse_suite(ROOT / "suites" / "quick.toml", reg).restrict(pairs=PAIRS, seeds=SEEDS)
    runs = len(suite.expand(reg))
    rounds = iter(range(100))

    def sweep() -> None:
        with RunStore(tmp_path / f"r{next(rounds)}") as st:
            summary = Runner(reg, st, device="cpu").run(suite, executor=make_executor("local", device="cpu", jobs=jobs))
        # every run computed (ok, failed or skipped by its method), none lost by a worker
        assert summary.ok + summary.failed + summary.skipped == runs and summary.ok > 0, summary

    before = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    benchmark.group = "quick suite"
    benchmark.pedantic(sweep, rounds=1, iterations=1, warmup_rounds=0)
    after = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = sum((a.ru_utime + a.ru_stime) - (b.ru_utime + b.ru_stime) for a, b in zip(after, before))
    benchmark.extra_info.update(kind="pool", jobs=jobs, runs=runs, seeds=SEEDS, cpu_s=cpu,
                                pairs=",".join(p.name for p in suite.pairs),
                                loadavg=os.getloadavg()[0])
