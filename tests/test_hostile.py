"""A host that survives hostile plugins: every run ends in the store (exits,
BaseExceptions, kill -9, segfaults, hangs), each run starts from a clean
process state, workers die with their driver, a plugin exiting at import
fails alone, and the exit code tells host failures from method failures."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import run_cli, write
from dabench.store import RunStore

HOSTILE = """
import os, signal, sys, time
import numpy as np
from dabench import Method, hookimpl

LOG = {log!r}


class _Uniform:
    def __init__(self, k):
        self.k = k
    def predict_proba(self, X, domain="target"):
        return np.full((len(X), self.k), 1.0 / self.k)
    def embed(self, X, domain="target"):
        return np.asarray(X)


def _log(what):
    with open(LOG, "a") as f:
        f.write(f"{{what}} {{os.getpid()}}\\n")


class Exits(Method):
    name = "exits"
    def fit(self, task):
        sys.exit(3)


class Custom(BaseException):
    pass


class RaisesBase(Method):
    name = "raises-base"
    def fit(self, task):
        raise Custom("not an Exception")


class Interrupts(Method):
    name = "interrupts"
    def fit(self, task):
        raise KeyboardInterrupt


class Kills(Method):
    name = "kills"
    def fit(self, task):
        _log("kills")
        os.kill(os.getpid(), signal.SIGKILL)


class Segfaults(Method):
    name = "segfaults"
    def fit(self, task):
        import ctypes
        _log("segfaults")
        ctypes.string_at(0)


class Hangs(Method):
    name = "hangs"
    def fit(self, task):
        _log("hangs")
        time.sleep(3600)
        return _Uniform(task.n_classes)


class SkipRaises(Method):
    name = "skip-raises"
    @classmethod
    def skip(cls, task):
        raise SystemExit("skip exits")
    def fit(self, task):
        return _Uniform(task.n_classes)


@hookimpl
def dabench_methods(register):
    for c in (Exits, RaisesBase, Interrupts, Kills, Segfaults, Hangs, SkipRaises):
        register(c)
"""

SUITE = """
name = "hostile"
seeds = 1
pairs = ["moons:moons-rot35"]
[budget]
steps = 20
batch_size = 32
{methods}
"""


def _suite(tmp_path: Path, methods: list[str], name: str = "s.toml") -> Path:
    return write(tmp_path / name, SUITE.format(methods="\n".join(f"[methods.{m}]" for m in methods)))


def _rows(folder: Path) -> dict[str, dict]:
    with RunStore.open_readonly(folder) as st:
        return {r["method"]: r for r in st.rows()}


# one worker (the serial path) and a pool of two: both explicit, so that a 2-core machine,
# where the default is two, does not run the pool twice
@pytest.mark.parametrize("jobs", ["1", "2"])
def test_every_run_ends_in_the_store_and_the_sweep_goes_on(tmp_path, jobs):
    log = tmp_path / "hostile.log"
    pdir = write(tmp_path / "p" / "hostile.py", HOSTILE.format(log=str(log))).parent
    methods = ["exits", "raises-base", "interrupts", "kills", "segfaults", "skip-raises", "source-only"]
    suite = _suite(tmp_path, methods)
    args = ["run", str(suite), "--results", str(tmp_path / "res"), "--plugins-dir", str(pdir), "--device", "cpu"]
    r = run_cli(*args, "--jobs", jobs)
    # only methods failed: the host did its job, the exit code is 0
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    rows = _rows(tmp_path / "res")
    assert set(rows) == set(methods)
    assert rows["source-only"]["status"] == "ok"
    reasons = {m: rows[m]["reason"] for m in methods if m != "source-only"}
    assert all(rows[m]["status"] == "failed" for m in reasons)
    assert reasons["exits"] == "SystemExit: 3"
    assert reasons["raises-base"] == "Custom: not an Exception"
    assert reasons["interrupts"] == "KeyboardInterrupt"
    assert reasons["skip-raises"] == "skip: SystemExit: skip exits"
    assert "killed by signal 9 (SIGKILL" in reasons["kills"] and "retry" in reasons["kills"]
    assert "killed by signal 11 (SIGSEGV" in reasons["segfaults"]
    # each crash was retried once, on a fresh worker
    attempts = [line.split() for line in log.read_text().splitlines()]
    assert [a[0] for a in attempts].count("kills") == 2 and [a[0] for a in attempts].count("segfaults") == 2
    assert len({a[1] for a in attempts}) == 4  # four different worker processes
    assert r.stderr.count("retrying it once on a fresh worker") == 2
    # a rerun has nothing to do: failures are results
    again = run_cli(*args)
    assert again.returncode == 0 and "0 to do" in again.stderr


def test_a_run_over_the_time_limit_is_killed_and_stored_as_failed(tmp_path):
    log = tmp_path / "hostile.log"
    pdir = write(tmp_path / "p" / "hostile.py", HOSTILE.format(log=str(log))).parent
    suite = _suite(tmp_path, ["hangs", "source-only"])
    r = run_cli("run", str(suite), "--results", str(tmp_path / "res"), "--plugins-dir", str(pdir),
                "--device", "cpu", "--time-limit", "20")
    assert r.returncode == 0, r.stderr
    rows = _rows(tmp_path / "res")
    assert rows["hangs"]["status"] == "failed"
    assert rows["hangs"]["reason"].startswith("timed out after 20 s")
    assert rows["source-only"]["status"] == "ok"  # the sweep went on, on a fresh worker
    pid = int(log.read_text().split()[1])
    assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1][:3]


def test_the_suite_sets_the_time_limit_and_the_cli_overrides_it(tmp_path, registry):
    from dabench.suite import DEFAULT_TIME_LIMIT_S, SuiteError, parse_suite

    s = parse_suite(_suite(tmp_path, ["source-only"]), registry)
    assert s.time_limit_s == DEFAULT_TIME_LIMIT_S == 4 * 3600
    text = SUITE.format(methods="[methods.source-only]").replace("seeds = 1", "seeds = 1\ntime_limit_s = 90")
    assert parse_suite(write(tmp_path / "t.toml", text), registry).time_limit_s == 90
    with pytest.raises(SuiteError, match="time_limit_s"):
        parse_suite(write(tmp_path / "u.toml", text.replace("= 90", "= -1")), registry)


CLEAN_STATE = """
import json, os, sys, warnings
import numpy as np
import torch
from dabench import Method, hookimpl
from dabench.training import TorchPredictor

LOG = {log!r}


class _Uniform:
    def __init__(self, k):
        self.k = k
    def predict_proba(self, X, domain="target"):
        return np.full((len(X), self.k), 1.0 / self.k)
    def embed(self, X, domain="target"):
        return np.asarray(X)


class Mess(Method):
    '''Changes every process-wide setting it can, then succeeds.'''
    name = "mess"
    def fit(self, task):
        import sklearn
        torch.set_default_dtype(torch.float64)
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.set_num_threads(torch.get_num_threads() + 1)
        torch.set_grad_enabled(False)
        torch.autograd.set_detect_anomaly(True)
        torch.backends.cudnn.benchmark = True
        torch.set_float32_matmul_precision("medium")
        np.seterr(all="raise")
        np.set_printoptions(precision=2)
        sklearn.set_config(assume_finite=True, enable_metadata_routing=True)
        os.environ["DABENCH_LEAK"] = "1"
        os.chdir("/")
        warnings.simplefilter("error")
        sys.setrecursionlimit(12345)
        return _Uniform(task.n_classes)


class Probe(Method):
    '''Records the process-wide settings it finds.'''
    name = "probe"
    def fit(self, task):
        import sklearn
        cfg = sklearn.get_config()
        state = {{
            "pid": os.getpid(),
            "dtype": str(torch.get_default_dtype()),
            "deterministic": torch.are_deterministic_algorithms_enabled(),
            "threads": torch.get_num_threads(),
            "grad": torch.is_grad_enabled(),
            "anomaly": torch.is_anomaly_enabled(),
            "cudnn_benchmark": torch.backends.cudnn.benchmark,
            "matmul": torch.get_float32_matmul_precision(),
            "np_err": np.geterr()["divide"],
            "np_precision": np.get_printoptions()["precision"],
            "sk_finite": cfg["assume_finite"], "sk_routing": cfg["enable_metadata_routing"],
            "env": os.environ.get("DABENCH_LEAK"),
            "cwd": os.getcwd(),
            "warnings": [f[0] for f in warnings.filters[:1]],
            "recursion": sys.getrecursionlimit(),
        }}
        with open(LOG, "a") as f:
            f.write(json.dumps(state) + "\\n")
        return _Uniform(task.n_classes)


@hookimpl
def dabench_methods(register):
    register(Mess)
    register(Probe)
"""


def test_each_run_starts_from_a_clean_process_state(tmp_path):
    log = tmp_path / "state.jsonl"
    pdir = write(tmp_path / "p" / "state.py", CLEAN_STATE.format(log=str(log))).parent
    # probe runs first (the worker's own state), then mess, then probe and a
    # built-in float32 method in the same worker
    text = SUITE.format(methods="[methods.probe]\n[methods.mess]\n[methods.source-only]").replace(
        "seeds = 1", "seeds = [0, 1]")
    suite = write(tmp_path / "s.toml", text)
    # probe before mess within a seed: the suite's method order is probe, mess, source-only
    r = run_cli("run", str(suite), "--results", str(tmp_path / "res"), "--plugins-dir", str(pdir),
                "--device", "cpu", "--threads", "1", "--jobs", "1")  # one worker, in suite order
    assert r.returncode == 0, r.stderr
    states = [json.loads(x) for x in log.read_text().splitlines()]
    assert len(states) == 2 and states[0]["pid"] == states[1]["pid"]  # one long-lived worker
    before, after = states  # seed 0's probe, then seed 1's probe after seed 0's mess
    assert before["dtype"] == "torch.float32" and before["threads"] == 1
    for k in before:
        if k != "pid":
            assert after[k] == before[k], (k, after[k], before[k])
    with RunStore.open_readonly(tmp_path / "res") as st:
        rows = st.rows()
    # source-only ran right after mess changed the default dtype to float64: still ok
    assert {r["status"] for r in rows} == {"ok"}


UNRESTORABLE = CLEAN_STATE.replace("@hookimpl", '''
class Unrestorable(Method):
    \'\'\'Leaves a state the worker cannot vouch for (it tells the check so).\'\'\'
    name = "unrestorable"
    def fit(self, task):
        import dabench.cleanstate as c
        c.ProcessState.mismatch = lambda self: "a setting of the test"
        return _Uniform(task.n_classes)


@hookimpl''').replace("    register(Probe)", "    register(Probe)\n    register(Unrestorable)")


def test_a_worker_that_cannot_restore_its_state_is_replaced(tmp_path):
    log = tmp_path / "state.jsonl"
    pdir = write(tmp_path / "p" / "state.py", UNRESTORABLE.format(log=str(log))).parent
    text = SUITE.format(methods="[methods.probe]\n[methods.unrestorable]").replace("seeds = 1", "seeds = [0, 1]")
    suite = write(tmp_path / "s.toml", text)
    r = run_cli("run", str(suite), "--results", str(tmp_path / "res"), "--plugins-dir", str(pdir),
                "--device", "cpu", "--threads", "1", "--jobs", "1")  # one worker, in suite order
    assert r.returncode == 0, r.stderr
    assert "retrying" not in r.stderr  # no run is blamed
    states = [json.loads(x) for x in log.read_text().splitlines()]
    assert len(states) == 2 and states[0]["pid"] != states[1]["pid"]  # a fresh worker after unrestorable
    with RunStore.open_readonly(tmp_path / "res") as st:
        assert {x["status"] for x in st.rows()} == {"ok"} and st.count() == 4


def _alive(pid: int) -> bool:
    p = Path(f"/proc/{pid}/stat")
    try:
        return "Z" not in p.read_text().rsplit(")", 1)[1][:3]
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc and its parent-death signal")
def test_a_busy_worker_dies_with_its_killed_driver(tmp_path):
    log = tmp_path / "hostile.log"
    pdir = write(tmp_path / "p" / "hostile.py", HOSTILE.format(log=str(log))).parent
    suite = _suite(tmp_path, ["hangs"])
    proc = subprocess.Popen([sys.executable, "-m", "dabench", "run", str(suite), "--results", str(tmp_path / "res"),
                             "--plugins-dir", str(pdir), "--device", "cpu"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while time.time() < deadline and not (log.exists() and log.read_text().strip()):
        time.sleep(0.1)
    assert log.exists(), "the hanging run never started"
    worker = int(log.read_text().split()[1])
    assert worker != proc.pid and _alive(worker)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 10
    while time.time() < deadline and _alive(worker):
        time.sleep(0.1)
    assert not _alive(worker), "the worker outlived its killed driver"


EXIT_AT_IMPORT = """
import sys
sys.exit(0)
"""


def test_a_plugin_exiting_at_import_fails_alone(tmp_path):
    pdir = tmp_path / "p"
    write(pdir / "exiter.py", EXIT_AT_IMPORT)
    suite = _suite(tmp_path, ["source-only"])
    r = run_cli("run", str(suite), "--results", str(tmp_path / "res"), "--plugins-dir", str(pdir), "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert "plugin 'exiter'" in r.stderr and "SystemExit" in r.stderr
    assert _rows(tmp_path / "res")["source-only"]["status"] == "ok"
    listed = run_cli("list", "methods", "--plugins-dir", str(pdir))
    assert listed.returncode == 0 and "source-only" in listed.stdout


DRIVER_ONLY = """
import multiprocessing
import numpy as np
from dabench import Method, hookimpl


class DriverOnly(Method):
    '''Registered in the driver only: its worker cannot run it (a host failure).'''
    name = "driver-only"
    def fit(self, task):
        raise AssertionError("never reached")


@hookimpl
def dabench_methods(register):
    if multiprocessing.parent_process() is None:
        register(DriverOnly)
"""


def test_host_failures_make_the_exit_code_non_zero(tmp_path):
    pdir = tmp_path / "p"
    write(pdir / "driveronly.py", DRIVER_ONLY)
    suite = _suite(tmp_path, ["driver-only", "source-only"])
    r = run_cli("run", str(suite), "--results", str(tmp_path / "res"), "--plugins-dir", str(pdir), "--device", "cpu")
    assert r.returncode == 1, r.stderr
    assert "failed for a reason of the host" in r.stderr
    rows = _rows(tmp_path / "res")
    assert rows["driver-only"]["status"] == "failed" and rows["driver-only"]["reason"].startswith("host:")
    assert rows["source-only"]["status"] == "ok"


def test_peak_memory_is_two_fields_without_the_process_baseline(tmp_path):
    pdir = tmp_path / "p"
    write(pdir / "alloc.py", """
        import numpy as np
        from dabench import Method, Int, hookimpl

        class _Uniform:
            def __init__(self, k):
                self.k = k
            def predict_proba(self, X, domain="target"):
                return np.full((len(X), self.k), 1.0 / self.k)
            def embed(self, X, domain="target"):
                return np.asarray(X)

        class Alloc(Method):
            name = "alloc"
            hyperparameters = {"mb": Int(0, 0, 1000)}
            def fit(self, task):
                a = np.ones(self.mb * 2**20 // 8)  # touched: resident
                del a
                return _Uniform(task.n_classes)

        @hookimpl
        def dabench_methods(register):
            register(Alloc)
        """)
    suite = write(tmp_path / "s.toml", SUITE.format(methods="[methods.alloc]\ngrid = { mb = [0, 300] }"))
    r = run_cli("run", str(suite), "--results", str(tmp_path / "res"), "--plugins-dir", str(pdir), "--device", "cpu")
    assert r.returncode == 0, r.stderr
    with RunStore.open_readonly(tmp_path / "res") as st:
        by_point = {x["point"]: x for x in st.rows()}
    if by_point[0]["rss_peak_mb"] is None:
        pytest.skip("this kernel does not let a process reset its peak RSS (/proc/self/clear_refs)")
    # not the process high-water mark (torch alone is ~400 MB resident): what the run added
    assert by_point[0]["rss_peak_mb"] < 150
    assert 250 <= by_point[1]["rss_peak_mb"] < 600
    assert by_point[0]["gpu_peak_mb"] is None and by_point[1]["gpu_peak_mb"] is None  # CPU runs
