"""Executors: a process pool and Ray compute the same runs as the serial
worker, only the driver writes the store, workers are pinned to devices, a
run that kills its worker is retried once then stored as failed, and a
killed driver resumes exactly."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import TINY_SUITE, run_cli, write
from dabench.executors import (
    DEFAULT_THREADS,
    ExecutorError,
    PoolExecutor,
    RayExecutor,
    SerialExecutor,
    available_cores,
    default_jobs,
    make_executor,
    plan_devices,
    threads_per_worker,
)
from dabench.plugins import get_registry
from dabench.runner import Runner
from dabench.store import RunStore
from dabench.suite import parse_suite

METRICS = ("status", "target_acc", "target_f1", "source_acc", "device")


def _results(store: RunStore) -> dict[str, tuple]:
    out = {}
    for r in store.rows():
        vals = tuple(sorted((k, v) for k, v in r.items() if k.startswith("val_")))
        out[r["key"]] = tuple(r[m] for m in METRICS) + vals
    return out


def _sweep(tmp_path: Path, name: str, suite_text: str, executor=None, plugins_dir=None):
    reg = get_registry(plugins_dir=plugins_dir)
    suite = parse_suite(write(tmp_path / f"{name}.toml", suite_text), reg)
    with RunStore(tmp_path / name) as st:
        summary = Runner(reg, st, device="cpu", plugins_dir=plugins_dir).run(suite, executor=executor)
        return summary, _results(st)


# ------------------------------------------------------------------ planning


def test_device_plan_one_worker_per_gpu_round_robin():
    assert plan_devices("cuda", None, 4) == ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]
    assert plan_devices("cuda", 6, 4) == ["cuda:0", "cuda:1", "cuda:2", "cuda:3", "cuda:0", "cuda:1"]
    assert plan_devices("cuda:2", 3, 4) == ["cuda:2"] * 3
    assert plan_devices("cpu", None, 0) == ["cpu"] * default_jobs()
    assert plan_devices("cpu", 3, 0) == ["cpu"] * 3
    with pytest.raises(ExecutorError, match="no CUDA GPU"):
        plan_devices("cuda", None, 0)
    with pytest.raises(ExecutorError, match="positive"):
        plan_devices("cpu", 0, 0)
    assert threads_per_worker(2, cores=2) == 1
    assert threads_per_worker(3, cores=2) == 1
    assert threads_per_worker(2, cores=16) == 8
    assert isinstance(make_executor("local", device="cpu", jobs=1), SerialExecutor)
    pool = make_executor("local", device="cpu", jobs=3)
    assert isinstance(pool, PoolExecutor) and pool.devices == ["cpu"] * 3
    with pytest.raises(ExecutorError, match="--address is for --executor ray"):
        make_executor("local", device="cpu", address="auto")


# ------------------------------------------------------------------ the pool

WHERE = """
import json, os
import numpy as np
import torch
from dabench import Method, Int, hookimpl

LOG = {log!r}


class _Uniform:
    def __init__(self, k):
        self.k = k
    def predict_proba(self, X, domain="target"):
        return np.full((len(X), self.k), 1.0 / self.k)
    def embed(self, X, domain="target"):
        return np.asarray(X)


class Where(Method):
    '''Logs the process, device and thread count it ran with.'''
    name = "where"
    hyperparameters = {{"die_on_seed": Int(-1, -1, 100)}}

    def fit(self, task):
        import scipy.linalg  # noqa: F401 - loads SciPy's own BLAS, as scikit-learn estimators do mid-run
        from threadpoolctl import threadpool_info

        blas = sorted({{i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"}})
        with open(LOG, "a") as f:
            f.write(json.dumps({{"pid": os.getpid(), "device": task.device, "seed": task.seed,
                                 "threads": torch.get_num_threads(), "blas": blas}}) + "\\n")
        if task.seed == self.die_on_seed:
            os.kill(os.getpid(), 9)  # the worker dies mid-run
        return _Uniform(task.n_classes)


@hookimpl
def dabench_methods(register):
    register(Where)
"""

WHERE_SUITE = """
name = "where"
seeds = 6
pairs = ["moons:moons-rot35"]

[budget]
steps = 5
batch_size = 32

[methods.where]
params = {{ die_on_seed = {die} }}
"""


def test_pool_pins_workers_to_devices_and_a_run_that_kills_its_worker_is_retried_then_stored(tmp_path):
    log = tmp_path / "where.jsonl"
    pdir = write(tmp_path / "p" / "where.py", WHERE.format(log=str(log))).parent
    pool = PoolExecutor(["fake:0", "fake:1"])  # device strings are passed through to each run
    summary, rows = _sweep(tmp_path, "res", WHERE_SUITE.format(die=2), pool, plugins_dir=pdir)
    # the worker running seed 2 died: the pool replaced it and retried the run
    # once (it died again), stored it as failed and finished the others
    assert summary.failed == 1 and summary.ok == 5 and summary.retried == 1
    logged = [json.loads(x) for x in log.read_text().splitlines()]
    assert sorted(x["seed"] for x in logged) == [0, 1, 2, 2, 3, 4, 5]
    pids = {x["pid"] for x in logged}
    assert os.getpid() not in pids and len(pids) >= 2  # runs happen in the workers, not the driver
    for pid in pids:  # a worker keeps its device for its whole life
        assert len({x["device"] for x in logged if x["pid"] == pid}) == 1
    assert {x["device"] for x in logged} == {"fake:0", "fake:1"}
    assert {x["threads"] for x in logged} == {DEFAULT_THREADS}
    # BLAS pools too (NumPy's and SciPy's): their rounding also depends on the thread count
    assert all(x["blas"] == [DEFAULT_THREADS] for x in logged), logged
    by_seed = {x["seed"]: x["device"] for x in logged if x["seed"] != 2}
    with RunStore(tmp_path / "res") as st:
        # only the driver wrote: every finished run once, with the device it ran on
        stored = {r["seed"]: r for r in st.rows()}
        assert {s: r["device"] for s, r in stored.items() if r["status"] == "ok"} == by_seed
        assert st.count() == 6
        assert stored[2]["status"] == "failed" and "killed by signal 9" in stored[2]["reason"]


def test_pool_stores_the_same_keys_and_metrics_as_serial(tmp_path):
    # by default every executor gives a run the same thread count: results are bit-for-bit equal
    s_sum, serial = _sweep(tmp_path, "serial", TINY_SUITE, SerialExecutor())
    p_sum, pooled = _sweep(tmp_path, "pool", TINY_SUITE, PoolExecutor(["cpu", "cpu"]))
    assert len(serial) == 4 and s_sum.ok == p_sum.ok == 4
    assert pooled == serial  # same keys, same metrics and validator scores, bit for bit
    with RunStore(tmp_path / "pool") as st:  # what else determines a result is stored with it
        import torch

        assert {(r["threads"], r["torch_version"]) for r in st.rows()} == {(DEFAULT_THREADS, torch.__version__)}


def test_cpu_defaults_one_single_threaded_run_per_usable_core(monkeypatch):
    import dabench.executors as ex

    assert DEFAULT_THREADS == 1
    assert SerialExecutor().threads == PoolExecutor(["cpu"]).threads == DEFAULT_THREADS
    assert default_jobs(cores=8, memory=64 * 2**30) == 8
    assert default_jobs(cores=8, memory=3 * 2**30) == 2  # each worker keeps ~1.5 GB of the free memory
    assert default_jobs(cores=1, memory=None) == 1
    monkeypatch.setattr(ex, "available_cores", lambda: 4)
    monkeypatch.setattr(ex, "_available_memory", lambda: None)
    pool = make_executor("local", device="cpu")
    assert isinstance(pool, PoolExecutor) and pool.devices == ["cpu"] * 4 and pool.threads == 1
    monkeypatch.setattr(ex, "available_cores", lambda: 1)
    one = make_executor("local", device="cpu")
    assert isinstance(one, SerialExecutor) and one.threads == 1
    assert make_executor("local", device="cpu", jobs=2, threads=3).threads == 3


def test_usable_cores_honour_a_cgroup_cpu_quota(monkeypatch):
    import dabench.executors as ex

    monkeypatch.setattr(ex, "_cgroup_cpu_limit", lambda: 1)
    assert available_cores() == 1
    monkeypatch.setattr(ex, "_cgroup_cpu_limit", lambda: None)
    assert available_cores() >= 1


def test_serial_threads_cap_torch_and_blas_for_each_run(tmp_path):
    log = tmp_path / "where.jsonl"
    pdir = write(tmp_path / "p" / "where.py", WHERE.format(log=str(log))).parent
    text = WHERE_SUITE.format(die=-1).replace("seeds = 6", "seeds = 2")
    summary, _ = _sweep(tmp_path, "res", text, SerialExecutor(threads=1), plugins_dir=pdir)
    assert summary.ok == 2
    logged = [json.loads(x) for x in log.read_text().splitlines()]
    assert [(x["threads"], x["blas"]) for x in logged] == [(1, [1]), (1, [1])]


def _children(pid: int) -> set[int]:
    out = set()
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.add(int(d.name))
    return out


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc to find the workers")
def test_kill_9_the_pool_driver_then_resume_stores_every_run_exactly_once(tmp_path):
    suite = write(tmp_path / "s.toml", TINY_SUITE.replace("seeds = 2", "seeds = 6"))
    res = tmp_path / "res"
    cmd = [sys.executable, "-m", "dabench", "run", str(suite), "--results", str(res), "--device", "cpu", "--jobs", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    db = res / "runs.sqlite"
    deadline = time.time() + 180
    n, workers = 0, set()
    while time.time() < deadline:
        workers |= _children(proc.pid)
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
    assert len(workers) >= 2
    # orphaned workers notice the driver is gone and exit (after their current run at most)
    deadline = time.time() + 60
    while time.time() < deadline and any(Path(f"/proc/{p}").exists() and
                                         "Z" not in Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1][:3]
                                         for p in workers if Path(f"/proc/{p}").exists()):
        time.sleep(0.2)
    alive = [p for p in workers if Path(f"/proc/{p}").exists()
             and "Z" not in Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1][:3]]
    assert not alive, f"worker processes {alive} outlived the killed driver"
    with sqlite3.connect(db) as con:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    with RunStore(res) as st:
        partial = _results(st)
    r = run_cli("run", str(suite), "--results", str(res), "--device", "cpu", "--jobs", "2")
    assert r.returncode == 0, r.stderr
    assert f"{len(partial)} already in" in r.stderr and f"{12 - len(partial)} to do" in r.stderr
    with sqlite3.connect(db) as con:
        assert con.execute("SELECT COUNT(*), COUNT(DISTINCT key) FROM runs").fetchone() == (12, 12)
    with RunStore(res) as st:
        final = _results(st)
    assert all(v[0] == "ok" for v in final.values())
    for k, v in partial.items():  # runs stored before the kill are untouched
        assert final[k] == v


# ------------------------------------------------------------------ CLI


def test_cli_rejects_bad_executor_options(tmp_path):
    suite = write(tmp_path / "s.toml", TINY_SUITE)
    r = run_cli("run", str(suite), "--results", str(tmp_path / "r"), "--jobs", "0")
    assert r.returncode == 2 and "positive integer" in r.stderr
    r = run_cli("run", str(suite), "--results", str(tmp_path / "r"), "--address", "auto")
    assert r.returncode == 2 and "--address is for --executor ray" in r.stderr
    assert not (tmp_path / "r").exists()  # nothing created on bad input


NATIVE_SUITE = """
name = "native"
seeds = 2
pairs = [{ pair = "digits:mnist", protocol = { feature_space = "native", k_target = 1 } }]

[budget]
steps = 5
batch_size = 16

[methods.target-only-k]
"""


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_cli_progress_shows_a_missing_source_accuracy_as_n_a(tmp_path, jobs):
    """A target-only model on a heterogeneous pair has no source accuracy: the
    progress line says n/a (serial and pool), the sweep finishes."""
    suite = write(tmp_path / "s.toml", NATIVE_SUITE)
    args = ["run", str(suite), "--results", str(tmp_path / "r"), "--device", "cpu"] + (["--jobs", jobs] if jobs else [])
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    assert r.stderr.count("source acc n/a") == 2, r.stderr


def test_ray_missing_gives_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # makes `import ray` fail
    with pytest.raises(ExecutorError, match=r'pip install "dabench\[ray\]"'):
        make_executor("ray", device="cpu")


# ------------------------------------------------------------------ Ray

HAVE_RAY = importlib.util.find_spec("ray") is not None


@pytest.fixture(scope="module")
def local_ray():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.mark.skipif(not HAVE_RAY, reason='Ray is not installed (pip install "dabench[ray]")')
def test_ray_stores_the_same_keys_and_metrics_as_the_local_executor(tmp_path, local_ray):
    _, serial = _sweep(tmp_path, "serial", TINY_SUITE, SerialExecutor(threads=1))  # 1 CPU per Ray task
    summary, on_ray = _sweep(tmp_path, "ray", TINY_SUITE, RayExecutor(device="cpu"))
    assert summary.ok == 4 and summary.failed == 0
    assert on_ray == serial


@pytest.mark.skipif(not HAVE_RAY, reason='Ray is not installed (pip install "dabench[ray]")')
def test_ray_stores_a_run_whose_worker_died_as_failed(tmp_path, local_ray):
    log = tmp_path / "where.jsonl"
    pdir = write(tmp_path / "p" / "where.py", WHERE.format(log=str(log))).parent
    text = WHERE_SUITE.format(die=1).replace("seeds = 6", "seeds = 3")
    summary, rows = _sweep(tmp_path, "res", text, RayExecutor(device="cpu", max_retries=0), plugins_dir=pdir)
    assert summary.failed == 1 and summary.ok == 2
    with RunStore(tmp_path / "res") as st:
        stored = {r["seed"]: r for r in st.rows()}
        assert sorted(stored) == [0, 1, 2] and stored[1]["status"] == "failed"
        assert "Ray task failed" in stored[1]["reason"]
    pids = {json.loads(x)["pid"] for x in log.read_text().splitlines()}
    assert os.getpid() not in pids
