"""Prints the benchmark ratios at the end of ``python -m pytest benchmarks --benchmark-only``.

- DANN step, dabench vs the hand-written floor: ``floor time / dabench time``
  per step (1.0 = no overhead; the bar is >= 0.9);
- pytorch-adapt and skada vs dabench: ``their time / dabench time`` per
  step (> 1: dabench is faster), with each one's target accuracy;
- the quick-suite subset: ``1-worker wall time / 2-worker wall time``.

Wall-clock medians and process CPU time are both shown, with the 1-minute
load average: on a shared machine, wall time depends on the load.
"""

from __future__ import annotations

import os
import platform


def _session_benchmarks(config):
    bs = getattr(config, "_benchmarksession", None)
    return [] if bs is None else [b for b in bs.benchmarks if b.stats and b.stats.rounds]


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    benches = _session_benchmarks(config)
    if not benches:
        return
    w = terminalreporter.write_line
    w("")
    w(f"dabench benchmark ratios ({platform.node()}, {os.cpu_count()} cpus, load average now "
      f"{os.getloadavg()[0]:.1f})")
    dann: dict[str, dict[str, object]] = {}
    pool: dict[int, object] = {}
    worker: dict[str, object] = {}
    for b in benches:
        info = b.extra_info
        if info.get("kind") == "dann":
            dann.setdefault(info["pair"], {})[info["impl"]] = b
        elif info.get("kind") == "pool":
            pool[info["jobs"]] = b
        elif info.get("kind") == "worker":
            worker[info["where"]] = b
    for pair, impls in sorted(dann.items()):
        ref = impls.get("dabench")
        if ref is None:
            continue
        rs = ref.extra_info

        def per_step(b, key):
            v = b.stats.median if key == "wall" else b.extra_info["cpu_s"]
            return v / b.extra_info["steps"]

        w(f"DANN on {pair} ({rs['steps']} steps, {rs['threads']} torch thread(s); "
          f"dabench {per_step(ref, 'wall') * 1e3:.2f} ms/step wall, {per_step(ref, 'cpu') * 1e3:.2f} ms/step cpu, "
          f"target acc {rs['target_acc']:.3f}, load {rs['loadavg']:.1f})")
        floor = impls.get("floor")
        if floor is not None:
            w(f"  floor / dabench (>= 0.9 expected):  wall {per_step(floor, 'wall') / per_step(ref, 'wall'):.3f}   "
              f"cpu {per_step(floor, 'cpu') / per_step(ref, 'cpu'):.3f}   (floor acc {floor.extra_info['target_acc']:.3f})")
        for other in ("pytorch-adapt", "skada"):
            b = impls.get(other)
            if b is None:
                w(f"  {other}: not run (not installed)")
                continue
            w(f"  {other} / dabench (> 1: dabench faster): wall {per_step(b, 'wall') / per_step(ref, 'wall'):.2f}   "
              f"cpu {per_step(b, 'cpu') / per_step(ref, 'cpu'):.2f}   "
              f"(acc {b.extra_info['target_acc']:.3f} vs {rs['target_acc']:.3f}, {b.extra_info['steps']} steps)")
    if 1 in pool and 2 in pool:
        one, two = pool[1], pool[2]
        w(f"quick suite, {one.extra_info['runs']} runs ({one.extra_info['seeds']} seed(s); pairs "
          f"{one.extra_info.get('pairs', 'all')}):")
        w(f"  "
          f"1 worker {one.stats.median:.1f} s, 2 workers {two.stats.median:.1f} s wall -> "
          f"speed-up {one.stats.median / two.stats.median:.2f}x  "
          f"(cpu {one.extra_info['cpu_s']:.0f} s vs {two.extra_info['cpu_s']:.0f} s; "
          f"load {one.extra_info['loadavg']:.1f} / {two.extra_info['loadavg']:.1f})")
    if "inprocess" in worker and "worker" in worker:
        a, b = worker["inprocess"], worker["worker"]
        n = a.extra_info["runs"]
        spawn = worker.get("spawn")
        start = spawn.stats.median if spawn is not None else 0.0
        w(f"fit in a worker process, {n} runs of a trivial method (one split each): in process "
          f"{a.stats.median:.2f} s, through the serial worker {b.stats.median:.2f} s, of which starting the "
          f"worker ~{start:.2f} s -> {(b.stats.median - start - a.stats.median) / n * 1e3:+.0f} ms per run "
          f"besides the start (a fresh process per run would add ~{start:.2f} s to every run); "
          f"load {b.extra_info['loadavg']:.1f}")
