"""Executors: where the runs of a sweep are computed.

The driver (:meth:`dabench.runner.Runner.run`) expands the suite, skips the
keys already stored, hands the rest to an executor, and writes each result
to the run store *itself*, one transaction per run, as results come back.
Executors only compute :class:`~dabench.runner.RunResult` objects; no worker
ever opens the store, so the store stays the single source of truth: killing
the driver at any moment (even ``kill -9``) loses at most the runs in
flight, and a rerun computes exactly the missing keys.

``fit`` never runs in the driver: the driver makes each split and keeps its
target test labels; a worker process receives what the Task carries plus the
unlabelled evaluation inputs (:mod:`dabench.isolation`) and returns
predictions, which the driver scores.

Executors:

- :class:`SerialExecutor` (the default where only one core is usable, or
  with ``--jobs 1``): one worker process computes every run, one after the
  other.  It is started once per sweep (a fresh torch process costs 1-2 s,
  more than most quick-suite runs) and restores the process-wide state of
  torch, NumPy and scikit-learn before every run (:mod:`dabench.cleanstate`);
  a worker that cannot (torch refuses some mixes of its precision APIs) is
  replaced by a fresh one before the next run.
- :class:`PoolExecutor` (the default on CPU with two or more usable cores:
  one worker per core, see :func:`default_jobs`; ``--jobs N`` for ``N``):
  such workers, each pinned to one device for its whole life; with
  ``--device cuda`` worker ``i`` runs on ``cuda:(i mod #GPUs)`` (by default
  one worker per visible GPU).
- :class:`RayExecutor` (``--executor ray [--address ADDR]``): each run is one
  Ray task declaring its resources (``num_cpus``, and ``num_gpus=1`` on
  CUDA); the driver waits on the tasks with ``ray.wait`` and stores each
  result as it completes.  Ray is an optional extra (``pip install
  "dabench[ray]"``), imported only when this executor is used.
- :class:`InProcessExecutor` (library use only): runs in the driver process,
  for registries assembled in memory that a worker cannot rebuild (the
  conformance kit); no isolation, no time limit, no crash protection.

Every run ends in the store.  With the serial and pool executors a worker
that dies while computing a run (``kill -9``, a segfault, ``os._exit``) is
replaced and the run retried once on the fresh worker, then stored as
``failed`` with the cause (``killed by signal 9 (SIGKILL)``); a run that
exceeds the per-run time limit has its worker (and the worker's child
processes) killed and is stored as ``failed`` (``timed out after N s``).
Workers die with their driver (Linux parent-death signal) and ignore Ctrl-C,
which is the driver's to handle.  Ray retries a task whose worker died once
(``max_retries``), then the run is stored as failed; its time limit counts
from submission.

Threads.  Every run, whatever the executor, gets :data:`DEFAULT_THREADS`
(1) torch intra-op thread and the same cap on NumPy's/SciPy's BLAS and
OpenMP pools, unless ``--threads`` says otherwise.  One thread per run is
both the fastest and the most robust setting for the small models of the
embedded pairs (an OpenMP pool that spins on a contended core makes a run
10-50 times slower beside another busy process), and one *fixed* count
makes results reproducible: runs are deterministic for a seed and a thread
count, and CPU convolutions and BLAS reductions round differently with
another thread count, so a result would otherwise depend on ``--jobs`` and
on the executor.  The thread count and the torch version of every run are
stored with it and stated in the report.  The tests check that serial,
pool and Ray sweeps store the same keys and metrics.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection, wait
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

if TYPE_CHECKING:  # pragma: no cover
    from .runner import Prepared, Runner
    from .suite import RunSpec

log = logging.getLogger("dabench")

__all__ = [
    "ExecutorError",
    "InProcessExecutor",
    "PoolExecutor",
    "RayExecutor",
    "SerialExecutor",
    "DEFAULT_THREADS",
    "WorkerConfig",
    "available_cores",
    "default_jobs",
    "make_executor",
    "plan_devices",
    "threads_per_worker",
]


class ExecutorError(RuntimeError):
    """An executor cannot start (bad option, missing optional package, dead
    workers); the message says what to do."""


OnDispatch = Callable[["RunSpec", str], None]

#: How often (seconds) a waiting driver renews its leases in the store.
HEARTBEAT_S = 30.0


# ------------------------------------------------------------------ helpers


#: Torch threads (and BLAS/OpenMP threads) of every run unless ``--threads``
#: says otherwise; see the module docstring.
DEFAULT_THREADS = 1

#: Memory a default pool keeps free per worker (a quick-suite worker peaks
#: at 0.5-0.8 GB); more workers than this allows are not started by default.
WORKER_MEMORY_BYTES = 1536 * 2**20


def _cgroup_cpu_limit() -> int | None:
    """The CPU quota of this process's cgroup (v2 ``cpu.max`` or v1
    ``cpu.cfs_quota_us``), rounded up, or None when there is none."""
    candidates = [("/sys/fs/cgroup/cpu.max", None),
                  ("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", "/sys/fs/cgroup/cpu/cpu.cfs_period_us")]
    for quota_path, period_path in candidates:
        try:
            with open(quota_path) as f:
                parts = f.read().split()
            if period_path is None:
                quota, period = parts[0], parts[1]
            else:
                with open(period_path) as f:
                    quota, period = parts[0], f.read().split()[0]
            if quota in ("max", "-1"):
                return None
            return max(1, -(-int(quota) // int(period)))
        except (OSError, ValueError, IndexError):
            continue
    return None


def available_cores() -> int:
    """CPU cores this process may use: its affinity mask, capped by a
    container's CPU quota."""
    try:
        n = max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        n = max(1, os.cpu_count() or 1)
    quota = _cgroup_cpu_limit()
    return min(n, quota) if quota else n


def _available_memory() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def default_jobs(cores: int | None = None, memory: int | None = None) -> int:
    """Runs computed at once on CPU by default: one single-threaded run per
    usable core, as long as each worker has :data:`WORKER_MEMORY_BYTES` of
    the available memory."""
    cores = available_cores() if cores is None else cores
    memory = _available_memory() if memory is None else memory
    jobs = max(1, cores)
    if memory:
        jobs = min(jobs, max(1, memory // WORKER_MEMORY_BYTES))
    return jobs


def threads_per_worker(jobs: int, cores: int | None = None) -> int:
    """``max(1, cores // jobs)``: the most threads per run that ``jobs``
    parallel runs can use without oversubscribing the cores."""
    cores = available_cores() if cores is None else cores
    return max(1, cores // max(1, jobs))


def plan_devices(device: str, jobs: int | None, gpu_count: int) -> list[str]:
    """The device of each worker.

    - ``cpu``: ``jobs`` (default :func:`default_jobs`) workers on ``cpu``;
    - ``cuda`` (no index): ``jobs`` workers, default one per visible GPU,
      worker ``i`` pinned to ``cuda:(i mod gpu_count)``;
    - ``cuda:k``: ``jobs`` (default 1) workers all on ``cuda:k``.
    """
    if jobs is not None and jobs < 1:
        raise ExecutorError(f"--jobs must be a positive integer, got {jobs}")
    if device == "cuda":
        if gpu_count < 1:
            raise ExecutorError("device 'cuda' requested but no CUDA GPU is visible; use --device cpu")
        n = jobs or gpu_count
        return [f"cuda:{i % gpu_count}" for i in range(n)]
    if device == "cpu":
        return [device] * (jobs or default_jobs())
    return [device] * (jobs or 1)


def _cuda_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@dataclass(frozen=True)
class WorkerConfig:
    """What a worker process needs to rebuild the driver's runner.  Plain,
    picklable values: a worker loads the plugins itself (the same entry
    points, the same ``plugins_dir``, the same ``DABENCH_DISABLE_PLUGINS``
    from the inherited environment)."""

    plugins_dir: str | None = None
    data_root: str | None = None
    threads: int | None = None  # torch intra-op threads; None: torch's default
    entrypoints: bool = True
    blocked: tuple[str, ...] = ()
    source_model_dir: str | None = None  # the shared source-model cache of the driver's runner

    @classmethod
    def of(cls, runner: "Runner", threads: int | None = None) -> "WorkerConfig":
        """The config that rebuilds ``runner``'s registry in a worker; an
        :class:`ExecutorError` when it was assembled in memory."""
        source = getattr(runner.registry, "source", None)
        if source is None:
            raise ExecutorError(
                "this registry was assembled in memory (not by dabench.plugins.get_registry), so a worker "
                "process cannot rebuild it: pass executor=dabench.executors.InProcessExecutor() to compute "
                "its runs in this process")
        plugins_dir = runner.plugins_dir if runner.plugins_dir is not None else source.get("plugins_dir")
        return cls(
            plugins_dir=None if plugins_dir is None else str(plugins_dir),
            data_root=None if runner.data_root is None else str(runner.data_root),
            threads=threads,
            entrypoints=bool(source.get("entrypoints", True)),
            blocked=tuple(sorted(source.get("blocked", ()))),
            source_model_dir=None if runner.source_model_dir is None else str(runner.source_model_dir),
        )


_WORKER_RUNNERS: dict[WorkerConfig, "Runner"] = {}


#: environment variables that size the BLAS/OpenMP thread pools of a new process
_THREAD_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def _set_thread_env(threads: int | None) -> dict[str, str | None]:
    """Set :data:`_THREAD_ENV` to ``threads`` (read by a BLAS/OpenMP library
    when it loads, in this process or a child); return the old values."""
    saved = {k: os.environ.get(k) for k in _THREAD_ENV}
    if threads is not None:
        os.environ.update({k: str(int(threads)) for k in _THREAD_ENV})
    return saved


def _restore_env(saved: dict[str, str | None]) -> None:
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def limit_blas_threads(threads: int | None) -> None:
    """Cap this process's BLAS/OpenMP thread pools (NumPy's, SciPy's,
    scikit-learn's OpenMP) at ``threads``, as torch's are: their reductions
    also round differently with another thread count, so a run's result
    would depend on the executor (Ray caps them at 1 for its tasks).  The
    pools loaded now are capped by threadpoolctl; one a run loads later
    (SciPy's OpenBLAS) reads the environment this sets."""
    if threads is None:
        return
    from threadpoolctl import threadpool_limits

    _set_thread_env(threads)
    threadpool_limits(limits=int(threads))


def _set_threads(threads: int | None) -> None:
    if threads is None:
        return
    import torch

    torch.set_num_threads(int(threads))
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set, or parallel work already ran
        pass
    limit_blas_threads(threads)


def worker_runner(config: WorkerConfig) -> "Runner":
    """The runner of this worker process for ``config`` (built once, reused
    by every run the process computes, so data and splits stay cached)."""
    runner = _WORKER_RUNNERS.get(config)
    if runner is None:
        from .plugins import get_registry
        from .runner import Runner

        _set_threads(config.threads)
        registry = get_registry(plugins_dir=config.plugins_dir, entrypoints=config.entrypoints,
                                blocked=config.blocked)
        for err in registry.errors:
            log.warning("%s", err)
        runner = Runner(registry, store=None, device="cpu", data_root=config.data_root,
                        plugins_dir=config.plugins_dir, source_model_dir=config.source_model_dir)
        _WORKER_RUNNERS[config] = runner
    return runner


# ------------------------------------------------------------------ in process


class InProcessExecutor:
    """Every run in the driver process, in suite order (library use: for a
    registry assembled in memory, which worker processes cannot rebuild).

    No isolation: ``fit`` runs in the process holding the split's labels.
    No time limit, and a run that kills its process kills the sweep."""

    name = "in-process"
    workers = 1

    def __init__(self, threads: int | None = None) -> None:
        self.threads = DEFAULT_THREADS if threads is None else int(threads)

    def describe(self) -> str:
        return f"in the driver process ({self.threads} thread{'s' if self.threads != 1 else ''} per run)"

    def map(self, runner: "Runner", specs: Sequence["RunSpec"], on_dispatch: OnDispatch) -> Iterator[Any]:
        import torch

        from threadpoolctl import threadpool_limits

        from .isolation import compute
        from .runner import Prepared

        before = torch.get_num_threads()
        if self.threads:
            torch.set_num_threads(self.threads)
        blas = threadpool_limits(limits=self.threads) if self.threads else None
        saved_env = _set_thread_env(self.threads)  # for libraries a run loads later
        try:
            for spec in specs:
                prep = runner.prepare(spec)
                if not isinstance(prep, Prepared):
                    yield prep
                    continue
                on_dispatch(spec, runner.device)
                outcome = compute(runner.registry, prep.request, prep.inputs, catch_interrupt=False)
                yield runner.finish(prep, outcome)
        finally:
            torch.set_num_threads(before)
            if blas is not None:
                blas.restore_original_limits()
            _restore_env(saved_env)


# ------------------------------------------------------------------ worker processes


PR_SET_PDEATHSIG = 1


def _die_with_parent(driver_pid: int) -> None:
    """Ask the kernel to SIGKILL this process when the driver dies (Linux),
    and exit now if it is already gone."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the worker exits when its pipe closes
        pass
    if os.getppid() != driver_pid:
        os._exit(0)


def _describe_death(code: int | None) -> str:
    if code is None:
        return "no exit code"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        what = {"SIGSEGV": ", a segmentation fault", "SIGABRT": ", aborted", "SIGBUS": ", a bus error",
                "SIGKILL": " (out of memory, or killed)", "SIGFPE": ", a floating-point exception"}.get(name, "")
        return f"killed by signal {-code} ({name}{what})"
    return f"exited with code {code}"


def _warm_up() -> None:
    """Import what every run needs but dabench imports lazily (the training
    helpers, scikit-learn for the DEV validator: seconds on a busy machine),
    before the worker says it is ready, so that the first run's time limit
    measures the run, not the worker's imports."""
    import importlib

    for name in ("dabench.training", "dabench.runner", "dabench.diagnostics", "sklearn.linear_model",
                 "sklearn.preprocessing"):
        try:
            importlib.import_module(name)
        except ImportError:  # pragma: no cover - a dependency missing shows up in the run itself
            pass


def _pool_worker(conn: Connection, config: WorkerConfig, device: str, driver_pid: int) -> None:
    """Body of a worker process: build the runner, then answer split and run
    messages until told to stop or the driver goes away."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's to handle
    try:
        os.setpgrp()  # its own process group: a time limit kills the run's child processes too
    except OSError:
        pass
    _die_with_parent(driver_pid)
    from .cleanstate import StateNotRestored, capture
    from .isolation import WorkerOutcome, compute
    from .runner import _reason

    try:
        runner = worker_runner(config)
        if device.startswith("cuda"):
            import torch

            torch.cuda.set_device(device)
        _warm_up()
        state = capture(blas_threads=config.threads)
    except BaseException as exc:  # noqa: BLE001 - reported to the driver
        try:
            conn.send(("init-error", _reason(exc)))
        finally:
            return
    try:
        conn.send(("ready", os.getpid()))
    except (BrokenPipeError, OSError):
        return
    inputs = None
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return  # the driver is gone
        if msg is None:
            return
        if msg[0] == "split":
            inputs = None  # free the previous split's arrays first
            inputs = msg[1]
            continue
        request = msg[1]
        if inputs is None:
            outcome = WorkerOutcome("failed", "host: the worker received a run before its split", host_error=True)
        else:
            outcome = compute(runner.registry, request, inputs)
        # put the process state back for the next run; what cannot be put
        # back retires this worker (the driver starts a fresh one)
        retire = None
        try:
            state.reset()
        except StateNotRestored as exc:
            retire = str(exc)
        try:
            conn.send(("result", outcome, retire))
        except (BrokenPipeError, OSError):
            return
        except Exception as exc:  # noqa: BLE001 - e.g. scores a plugin made unpicklable
            try:
                conn.send(("result", WorkerOutcome("failed", f"the run's result could not be sent back: "
                                                             f"{_reason(exc)}"), retire))
            except (BrokenPipeError, OSError):
                return
        if retire is not None:
            return


class _Worker:
    def __init__(self, ctx: Any, config: WorkerConfig, device: str, slot: int) -> None:
        self.device, self.slot = device, slot
        self.conn, child = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(target=_pool_worker, args=(child, config, device, os.getpid()),
                                name=f"dabench-worker-{slot}", daemon=True)
        self.proc.start()
        child.close()
        self.ready = False
        self.prepared: "Prepared | None" = None
        self.deadline: float | None = None
        self.started = 0.0
        self.split_key: tuple | None = None  # the split the worker holds
        self.last_key: tuple | None = None  # the split of its last run (for scheduling)

    def stop(self, timeout: float = 5.0) -> None:
        try:
            if self.proc.is_alive():
                self.conn.send(None)
        except (BrokenPipeError, OSError):
            pass
        self.proc.join(timeout)
        if self.proc.is_alive():
            self.kill()
        self.conn.close()

    def kill(self) -> None:
        """SIGKILL the worker and its process group (the run's own children)."""
        if self.proc.pid is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError, OSError):
                pass
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(5.0)
        try:
            self.conn.close()
        except OSError:
            pass


class _ProcessExecutor:
    """Runs in long-lived worker processes (see the module docstring)."""

    name = "process"
    start_method = "spawn"
    #: workers that die while starting, or while idle, before the sweep gives up
    max_restarts = 4

    devices: list[str]
    threads: int | None

    def _devices(self, runner: "Runner") -> list[str]:
        return self.devices

    def map(self, runner: "Runner", specs: Sequence["RunSpec"], on_dispatch: OnDispatch) -> Iterator[Any]:
        from .runner import Prepared

        if not specs:
            return
        ctx = mp.get_context(self.start_method)
        config = WorkerConfig.of(runner, self.threads)
        devices = self._devices(runner)[: len(specs)]
        runner.split_cache_size = len(devices) + 1
        limit = runner.time_limit_s
        pending: deque = deque(specs)
        crashes: dict[str, int] = {}
        workers = [_Worker(ctx, config, d, i) for i, d in enumerate(devices)]
        restarts = 0
        last_beat = time.monotonic()
        try:
            while pending or any(w.prepared is not None for w in workers):
                for w in workers:
                    while w.ready and w.prepared is None and pending:
                        spec = self._pick(pending, w.last_key, runner)
                        prep = runner.prepare(spec, w.device)
                        if not isinstance(prep, Prepared):
                            yield prep
                            continue
                        try:
                            if w.split_key != prep.inputs.key:
                                w.split_key = None
                                w.conn.send(("split", prep.inputs))
                                w.split_key = prep.inputs.key
                            w.conn.send(("run", prep.request))
                        except (BrokenPipeError, OSError):
                            pending.appendleft(spec)
                            break  # its death is handled below
                        w.prepared, w.last_key = prep, prep.inputs.key
                        w.started = time.monotonic()
                        w.deadline = w.started + limit if limit else None
                        on_dispatch(spec, w.device)
                watch = [w for w in workers if w.prepared is not None or not w.ready or not w.proc.is_alive()]
                if not watch:
                    if pending:
                        continue
                    break
                now = time.monotonic()
                timeout = HEARTBEAT_S
                deadlines = [w.deadline for w in watch if w.deadline is not None]
                if deadlines:
                    timeout = max(0.0, min(timeout, min(deadlines) - now))
                ready = wait([w.conn for w in watch] + [w.proc.sentinel for w in watch], timeout)
                now = time.monotonic()
                if now - last_beat >= HEARTBEAT_S:
                    runner.heartbeat()
                    last_beat = now
                for i, w in enumerate(list(workers)):
                    if w.conn in ready or w.proc.sentinel in ready:
                        msg = None
                        try:
                            if w.conn.poll():
                                msg = w.conn.recv()
                        except (EOFError, OSError):
                            msg = None
                        if msg is not None and msg[0] == "ready":
                            w.ready = True
                            continue
                        if msg is not None and msg[0] == "init-error":
                            raise ExecutorError(f"a worker process could not start: {msg[1]}")
                        if msg is not None and msg[0] == "result":
                            prep, w.prepared, w.deadline = w.prepared, None, None
                            if len(msg) > 2 and msg[2]:  # it could not restore the process state: retired
                                log.info("worker %d on %s retired after a run: %s", w.slot, w.device, msg[2])
                                w.stop()
                                workers[i] = _Worker(ctx, config, w.device, w.slot)
                                workers[i].last_key = w.last_key
                            if prep is not None:
                                yield runner.finish(prep, msg[1], w.device)
                            continue
                        if not w.proc.is_alive():
                            w.proc.join()
                            code = w.proc.exitcode
                            prep = w.prepared
                            w.kill()
                            if prep is None:
                                restarts += 1
                                if restarts > self.max_restarts or not w.ready:
                                    raise ExecutorError(
                                        f"a worker process on {w.device} died "
                                        f"{'while starting' if not w.ready else 'while idle'} "
                                        f"({_describe_death(code)}); run with -v to see its output")
                            workers[i] = _Worker(ctx, config, w.device, w.slot)
                            if prep is not None:
                                spec = prep.spec
                                crashes[spec.key] = crashes.get(spec.key, 0) + 1
                                why = f"the worker process died while computing the run ({_describe_death(code)})"
                                if crashes[spec.key] == 1:
                                    runner.on_retry(spec, why)
                                    pending.appendleft(spec)
                                else:
                                    yield runner.failure(spec, f"{why}; it also died on the retry on a fresh worker",
                                                         w.device, wall_time_s=now - w.started)
                            continue
                    if w.prepared is not None and w.deadline is not None and now >= w.deadline:
                        prep = w.prepared
                        w.kill()
                        workers[i] = _Worker(ctx, config, w.device, w.slot)
                        yield runner.failure(
                            prep.spec, f"timed out after {limit:g} s (the per-run time limit: the suite's "
                                       f"time_limit_s or --time-limit); its worker was killed", w.device,
                            wall_time_s=now - w.started)
        finally:
            for w in workers:
                if w.prepared is not None or not w.ready:
                    w.kill()  # interrupted mid-run: do not wait for it
                else:
                    w.stop()

    @staticmethod
    def _pick(pending: deque, split_key: tuple | None, runner: "Runner") -> "RunSpec":
        if split_key is not None:
            for i, spec in enumerate(pending):
                if runner.split_key(spec) == split_key:
                    del pending[i]
                    return spec
                if i >= 64:  # look a little ahead only
                    break
        return pending.popleft()


class SerialExecutor(_ProcessExecutor):
    """Every run, in suite order, in one worker process on the runner's
    device, with ``threads`` torch threads (default :data:`DEFAULT_THREADS`).
    The worker restores the process-wide state of torch, NumPy
    and scikit-learn before each run."""

    name = "serial"
    workers = 1

    def __init__(self, threads: int | None = None) -> None:
        self.threads = DEFAULT_THREADS if threads is None else int(threads)

    def _devices(self, runner: "Runner") -> list[str]:
        return [runner.device]

    def describe(self) -> str:
        return f"serial, in one worker process ({self.threads} thread{'s' if self.threads != 1 else ''} per run)"


class PoolExecutor(_ProcessExecutor):
    """``len(devices)`` spawned worker processes, worker ``i`` pinned to
    ``devices[i]``, each with ``threads`` torch threads (default
    :data:`DEFAULT_THREADS`).

    Scheduling keeps data local: a free worker takes the next pending run of
    the pair and seed it ran last (its split is already there) when there is
    one, else the next run in suite order.
    """

    name = "pool"

    def __init__(self, devices: Sequence[str], threads: int | None = None,
                 start_method: str = "spawn", max_restarts: int | None = None) -> None:
        if not devices:
            raise ExecutorError("a process pool needs at least one worker")
        self.devices = list(devices)
        self.workers = len(self.devices)
        self.threads = DEFAULT_THREADS if threads is None else int(threads)
        self.start_method = start_method
        self.max_restarts = 2 * self.workers if max_restarts is None else max_restarts

    def describe(self) -> str:
        devs = sorted(set(self.devices))
        return (f"process pool of {self.workers} workers ({', '.join(devs)}; "
                f"{self.threads} thread{'s' if self.threads != 1 else ''} per run)")


# ------------------------------------------------------------------ Ray


def _import_ray() -> Any:
    try:
        import ray  # noqa: PLC0415 - optional extra, imported lazily
    except ImportError:
        raise ExecutorError(
            "--executor ray needs Ray, which is not installed: pip install \"dabench[ray]\" "
            "(or pip install ray)"
        ) from None
    return ray


_RAY_STATE: dict[WorkerConfig, Any] = {}


def _ray_task(config: WorkerConfig, request: Any, inputs: Any) -> Any:
    """One run inside a Ray worker process (its runner is cached per
    process, and the process state is restored before each run)."""
    from .cleanstate import StateNotRestored, capture
    from .isolation import compute

    runner = worker_runner(config)
    _set_threads(config.threads)
    state = _RAY_STATE.get(config)
    if state is None:
        _warm_up()
        state = _RAY_STATE[config] = capture(blas_threads=config.threads)
    else:
        try:
            state.reset()
        except StateNotRestored:  # an earlier task left what cannot be put back: Ray retries on a fresh worker
            os._exit(75)
    device = request.device
    if device.startswith("cuda"):
        request = replace(request, device="cuda:0")  # Ray restricts CUDA_VISIBLE_DEVICES to the task's GPU
    outcome = compute(runner.registry, request, inputs)
    if device.startswith("cuda"):
        import ray

        ids = ray.get_gpu_ids()
        outcome.device = f"cuda:{ids[0]}" if ids else "cuda:0"
    return outcome


class RayExecutor:
    """Each run a Ray task (``num_cpus=cpus_per_run``, ``num_gpus=1`` on CUDA).

    ``address`` is passed to ``ray.init`` (``"auto"``, ``"ray://host:10001"``
    or ``"host:6379"``); without it a local Ray instance is started with the
    machine's cores, unless Ray is already initialised in this process (then
    that instance is used).  Results are collected with ``ray.wait`` as they
    complete and stored by the driver; a task whose worker or node dies is
    retried by Ray ``max_retries`` times (default once), then stored as
    failed.  Each split's worker-side inputs go to the object store once
    (``ray.put``); the labels stay in the driver.  At most ``max_in_flight``
    tasks are submitted at a time (default: the cluster's CPUs divided by
    ``cpus_per_run``), so that the per-run time limit, counted from
    submission, is spent running.

    The runs of the cluster import dabench and the plugins themselves: install
    them on every node (a ``--plugins-dir`` path must exist on every node).
    """

    name = "ray"

    def __init__(self, device: str = "cpu", address: str | None = None, cpus_per_run: int = 1,
                 max_in_flight: int | None = None, max_retries: int = 1) -> None:
        if cpus_per_run < 1:
            raise ExecutorError(f"cpus per run must be >= 1, got {cpus_per_run}")
        _import_ray()  # fail early, with the install command, when the extra is missing
        self.device = device
        self.address = address
        self.cpus_per_run = int(cpus_per_run)
        self.max_in_flight = max_in_flight
        self.max_retries = int(max_retries)
        self.workers = max_in_flight or 0

    def describe(self) -> str:
        where = self.address or "a local Ray instance"
        gpu = ", 1 GPU" if self.device.startswith("cuda") else ""
        return f"Ray on {where} ({self.cpus_per_run} CPU{gpu} per run)"

    def map(self, runner: "Runner", specs: Sequence["RunSpec"], on_dispatch: OnDispatch) -> Iterator[Any]:
        if not specs:
            return
        ray = _import_ray()
        started = False
        if not ray.is_initialized():
            kw: dict[str, Any] = dict(include_dashboard=False, logging_level=logging.WARNING,
                                      log_to_driver=False)
            try:
                if self.address:
                    ray.init(address=self.address, **kw)
                else:
                    ray.init(num_cpus=available_cores(), **kw)
            except Exception as exc:  # connection refused, bad address...
                raise ExecutorError(f"could not start or reach Ray"
                                    f"{f' at {self.address!r}' if self.address else ''}: {exc}") from None
            started = True
        from .runner import Prepared

        gpu = self.device.startswith("cuda")
        config = WorkerConfig.of(runner, self.cpus_per_run)
        task = ray.remote(_ray_task).options(num_cpus=self.cpus_per_run, num_gpus=1 if gpu else 0,
                                             max_retries=self.max_retries)
        if self.max_in_flight:
            limit = self.max_in_flight
        else:
            key = "GPU" if gpu else "CPU"
            per = 1 if gpu else self.cpus_per_run
            limit = max(1, int(ray.cluster_resources().get(key, 1)) // per)
        runner.split_cache_size = limit + 1
        time_limit = runner.time_limit_s
        pending: deque = deque(specs)
        in_flight: dict[Any, tuple["Prepared", float | None]] = {}
        split_refs: OrderedDict = OrderedDict()
        last_beat = time.monotonic()
        try:
            while pending or in_flight:
                while pending and len(in_flight) < limit:
                    spec = pending.popleft()
                    prep = runner.prepare(spec, self.device)
                    if not isinstance(prep, Prepared):
                        yield prep
                        continue
                    sref = split_refs.get(prep.inputs.key)
                    if sref is None:
                        sref = split_refs[prep.inputs.key] = ray.put(prep.inputs)
                        while len(split_refs) > limit + 1:
                            split_refs.popitem(last=False)
                    else:
                        split_refs.move_to_end(prep.inputs.key)
                    ref = task.remote(config, prep.request, sref)
                    in_flight[ref] = (prep, time.monotonic() + time_limit if time_limit else None)
                    on_dispatch(spec, self.device)
                if not in_flight:
                    continue
                now = time.monotonic()
                deadlines = [d for _, d in in_flight.values() if d is not None]
                timeout = HEARTBEAT_S if not deadlines else max(0.0, min(HEARTBEAT_S, min(deadlines) - now))
                ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=timeout)
                now = time.monotonic()
                if now - last_beat >= HEARTBEAT_S:
                    runner.heartbeat()
                    last_beat = now
                for ref in ready:
                    prep, _ = in_flight.pop(ref)
                    try:
                        outcome = ray.get(ref)
                    except Exception as exc:  # the task's worker or node died, after its retries
                        kind = type(exc).__name__
                        msg = str(exc).splitlines()[0] if str(exc) else ""
                        host = any(k in kind for k in ("NodeDied", "ObjectLost", "RaySystem", "OwnerDied"))
                        yield runner.failure(prep.spec, f"the Ray task failed (retried {self.max_retries} time(s)): "
                                                        f"{kind}: {msg}", self.device, host_error=host)
                        continue
                    yield runner.finish(prep, outcome, getattr(outcome, "device", None) or self.device)
                for ref, (prep, deadline) in list(in_flight.items()):
                    if deadline is not None and now >= deadline:
                        in_flight.pop(ref)
                        try:
                            ray.cancel(ref, force=True)
                        except Exception:  # noqa: BLE001 - best effort
                            pass
                        yield runner.failure(prep.spec, f"timed out after {time_limit:g} s (the per-run time limit, "
                                                        f"counted from submission to Ray); the task was cancelled",
                                             self.device, wall_time_s=time_limit)
        finally:
            for ref in in_flight:
                try:
                    ray.cancel(ref, force=True)
                except Exception:  # noqa: BLE001 - best effort on the way out
                    pass
            if started:
                ray.shutdown()


# ------------------------------------------------------------------ factory


def make_executor(kind: str = "local", *, device: str = "cpu", jobs: int | None = None,
                  address: str | None = None, threads: int | None = None) -> Any:
    """The executor for the CLI options ``--executor``, ``--jobs``,
    ``--address``, ``--threads``.

    ``local``: on CPU, ``jobs`` (default :func:`default_jobs`: one per usable
    core) single-threaded runs at once, in a process pool, or serially in
    this process when that is one; on ``cuda``, one worker per visible GPU
    (or ``jobs``); on one ``cuda:k``, serial unless ``jobs`` says otherwise.
    Every run gets ``threads`` threads (default :data:`DEFAULT_THREADS`).
    """
    if threads is not None and threads < 1:
        raise ExecutorError(f"--threads must be a positive integer, got {threads}")
    if kind == "ray":
        return RayExecutor(device=device, address=address, max_in_flight=jobs, cpus_per_run=threads or DEFAULT_THREADS)
    if kind != "local":
        raise ExecutorError(f"unknown executor {kind!r}: use 'local' or 'ray'")
    if address:
        raise ExecutorError("--address is for --executor ray")
    gpus = _cuda_count() if device == "cuda" else 0
    devices = plan_devices(device, jobs, gpus)
    if len(devices) == 1:
        return SerialExecutor(threads)
    return PoolExecutor(devices, threads=threads)
