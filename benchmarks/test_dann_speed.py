"""DANN training speed: dabench vs a hand-written torch loop (the floor), pytorch-adapt and skada.

Same pair, data, networks, batch size, optimiser and step count for every
implementation (see ``dann_impls.py``); the quick suite's budget for the
pair.  Each round trains from scratch; the target accuracy of the last round
is kept next to the timing so the ratios are read at (roughly) equal
accuracy.  ``conftest.py`` prints the ratios at the end of the session.

Environment: ``DABENCH_BENCH_ROUNDS`` (default 2) rounds per benchmark,
``DABENCH_BENCH_THREADS`` torch threads (default 1: framework overhead is
what is compared, and one thread keeps the figures steady on a shared
machine).
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time

import pytest
import torch

from dann_impls import IMPLS, PAIRS, accuracy, missing, task_and_split

ROUNDS = int(os.environ.get("DABENCH_BENCH_ROUNDS", "2"))
THREADS = int(os.environ.get("DABENCH_BENCH_THREADS", "1"))


@pytest.mark.parametrize("pair", list(PAIRS))
@pytest.mark.parametrize("impl", list(IMPLS))
def test_dann_training(benchmark, impl, pair):
    reason = missing(impl)
    if reason:
        pytest.skip(reason)
    torch.set_num_threads(THREADS)
    task, split = task_and_split(pair)
    # warm up (first-call costs: lazy imports, allocator, autograd) outside the timing
    IMPLS[impl](dataclasses.replace(task, budget=dataclasses.replace(task.budget, steps=10)))
    out: dict = {}
    cpu: list[float] = []

    def train() -> None:
        t = time.process_time()
        out["fit"] = IMPLS[impl](task)
        cpu.append(time.process_time() - t)

    benchmark.group = f"dann {pair}"
    benchmark.pedantic(train, rounds=ROUNDS, iterations=1, warmup_rounds=0)
    predict, steps = out["fit"]
    benchmark.extra_info.update(kind="dann", impl=impl, pair=pair, steps=steps, threads=THREADS,
                                cpu_s=statistics.median(cpu), target_acc=accuracy(predict, split),
                                loadavg=os.getloadavg()[0])
