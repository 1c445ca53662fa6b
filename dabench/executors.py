"""Executors: where the runs of a sweep are computed.

The driver (:meth:`dabench.runner.Runner.run`) expands the suite, skips the
keys already stored, hands the rest to an executor, and writes each result
to the run store *itself*, one transaction per run, as results come back.
Executors only compute :class:`~dabench.runner.RunResult` objects; no worker
ever opens the store, so the store stays the single source of truth: killing
the driver at any moment (even ``kill -9``) loses at most the runs in
flight, and a rerun computes exactly the missing keys.

Three executors:

- :class:`SerialExecutor`: every run in the driver process, one after the
  other (the default where only one core is usable, or with ``--jobs 1``).
- :class:`PoolExecutor` (the default on CPU with two or more usable cores:
  one worker per core, see :func:`default_jobs`; ``--jobs N`` for ``N``):
  worker processes started with the ``spawn`` method.  Each worker rebuilds
  the registry from the same plugins (entry points and ``--plugins-dir``),
  keeps its own data and split caches, and is pinned to one device for its
  whole life; with ``--device cuda`` worker ``i`` runs on
  ``cuda:(i mod #GPUs)`` (by default one worker per visible GPU).  A worker
  that dies (segfault, out of memory) loses only the run it held: that run
  is reported as lost, not stored, so the next invocation runs it again;
  the worker is replaced and the sweep goes on.
- :class:`RayExecutor` (``--executor ray [--address ADDR]``): each run is one
  Ray task declaring its resources (``num_cpus``, and ``num_gpus=1`` on
  CUDA); the driver waits on the tasks with ``ray.wait`` and stores each
  result as it completes.  Ray is an optional extra (``pip install
  "dabench[ray]"``), imported only when this executor is used.

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
from collections import deque
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Sequence

if TYPE_CHECKING:  # pragma: no cover
    from .runner import RunResult, Runner
    from .suite import RunSpec

log = logging.getLogger("dabench")

__all__ = [
    "ExecutorError",
    "LostRun",
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


@dataclass(frozen=True)
class LostRun:
    """A run whose worker died before returning a result.  It is not stored,
    so rerunning the sweep computes it."""

    spec: "RunSpec"
    reason: str
    device: str | None = None


Outcome = "RunResult | LostRun"
OnDispatch = Callable[["RunSpec", str], None]


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
    threads: int | None = None  # torch intra-op threads; None: torch's default (not used by dabench's executors)
    source_model_dir: str | None = None  # the shared source-model cache of the driver's runner

    @classmethod
    def of(cls, runner: "Runner", threads: int | None = None) -> "WorkerConfig":
        return cls(
            plugins_dir=None if runner.plugins_dir is None else str(runner.plugins_dir),
            data_root=None if runner.data_root is None else str(runner.data_root),
            threads=threads,
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
        registry = get_registry(plugins_dir=config.plugins_dir)
        for err in registry.errors:
            log.warning("%s", err)
        runner = Runner(registry, store=None, device="cpu", data_root=config.data_root,
                        plugins_dir=config.plugins_dir, source_model_dir=config.source_model_dir)
        _WORKER_RUNNERS[config] = runner
    return runner


def _run_in_worker(runner: "Runner", spec: "RunSpec", device: str) -> "RunResult":
    from .runner import RunResult, _reason

    try:
        return runner.run_one(spec, device=device)
    except Exception as exc:  # run_one keeps method errors; this is anything else
        return RunResult(spec, "failed", f"worker: {_reason(exc)}", device=device)


# ------------------------------------------------------------------ serial


class SerialExecutor:
    """Every run in the driver process, in suite order, with ``threads``
    torch threads (default :data:`DEFAULT_THREADS`)."""

    name = "serial"
    workers = 1

    def __init__(self, threads: int | None = None) -> None:
        self.threads = DEFAULT_THREADS if threads is None else int(threads)

    def describe(self) -> str:
        return f"serial ({self.threads} thread{'s' if self.threads != 1 else ''} per run)"

    def map(self, runner: "Runner", specs: Sequence["RunSpec"], on_dispatch: OnDispatch) -> Iterator[Any]:
        import torch

        from threadpoolctl import threadpool_limits

        before = torch.get_num_threads()
        if self.threads:
            torch.set_num_threads(self.threads)
        blas = threadpool_limits(limits=self.threads) if self.threads else None
        saved_env = _set_thread_env(self.threads)  # for libraries a run loads later
        try:
            for spec in specs:
                on_dispatch(spec, runner.device)
                yield runner.run_one(spec)
        finally:
            torch.set_num_threads(before)
            if blas is not None:
                blas.restore_original_limits()
            _restore_env(saved_env)


# ------------------------------------------------------------------ process pool


def _pool_worker(conn: Connection, config: WorkerConfig, device: str) -> None:
    """Body of a pool worker: build the runner, then answer run requests
    until told to stop or the driver goes away."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's to handle
    try:
        runner = worker_runner(config)
        if device.startswith("cuda"):
            import torch

            torch.cuda.set_device(device)
    except BaseException as exc:  # noqa: BLE001 - reported to the driver
        from .runner import _reason

        try:
            conn.send(("init-error", _reason(exc)))
        finally:
            return
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return  # the driver is gone
        if msg is None:
            return
        spec, run_device = msg
        result = _run_in_worker(runner, spec, run_device)
        try:
            conn.send(("result", result))
        except (BrokenPipeError, OSError):
            return


class _Worker:
    def __init__(self, ctx: Any, config: WorkerConfig, device: str, slot: int) -> None:
        self.device, self.slot = device, slot
        self.conn, child = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(target=_pool_worker, args=(child, config, device),
                                name=f"dabench-worker-{slot}", daemon=True)
        self.proc.start()
        child.close()
        self.spec: "RunSpec | None" = None
        self.split_key: tuple | None = None

    def stop(self, timeout: float = 5.0) -> None:
        try:
            if self.proc.is_alive():
                self.conn.send(None)
        except (BrokenPipeError, OSError):
            pass
        self.proc.join(timeout)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(timeout)
        self.conn.close()

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.terminate()
        self.proc.join(5.0)
        self.conn.close()


def _split_key(spec: "RunSpec") -> tuple:
    return (spec.pair.name, spec.pair.protocol, spec.seed)


class PoolExecutor:
    """``len(devices)`` spawned worker processes, worker ``i`` pinned to
    ``devices[i]``, each with ``threads`` torch threads (default
    :data:`DEFAULT_THREADS`).

    Scheduling keeps data local: a free worker takes the next pending run of
    the pair and seed it ran last (its cached split) when there is one, else
    the next run in suite order.
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

    def map(self, runner: "Runner", specs: Sequence["RunSpec"], on_dispatch: OnDispatch) -> Iterator[Any]:
        if not specs:
            return
        ctx = mp.get_context(self.start_method)
        config = WorkerConfig.of(runner, self.threads)
        pending: deque = deque(specs)
        workers = [_Worker(ctx, config, d, i) for i, d in enumerate(self.devices[: len(specs)])]
        restarts = 0
        try:
            while pending or any(w.spec is not None for w in workers):
                for w in workers:
                    if w.spec is None and pending:
                        spec = self._pick(pending, w.split_key)
                        try:
                            w.conn.send((spec, w.device))
                        except (BrokenPipeError, OSError):
                            pending.appendleft(spec)
                            continue  # its death is handled below
                        w.spec, w.split_key = spec, _split_key(spec)
                        on_dispatch(spec, w.device)
                busy = [w for w in workers if w.spec is not None or not w.proc.is_alive()]
                if not busy:
                    continue
                ready = wait([w.conn for w in busy] + [w.proc.sentinel for w in busy])
                for i, w in enumerate(list(workers)):
                    if w.conn not in ready and w.proc.sentinel not in ready:
                        continue
                    msg = None
                    try:
                        if w.conn.poll():
                            msg = w.conn.recv()
                    except (EOFError, OSError):
                        msg = None
                    if msg is not None and msg[0] == "result":
                        spec, w.spec = w.spec, None
                        yield msg[1]
                        continue
                    if msg is not None and msg[0] == "init-error":
                        raise ExecutorError(f"a pool worker could not start: {msg[1]}")
                    if w.proc.is_alive():
                        continue
                    # the worker died: its run is lost (not stored); replace it
                    w.proc.join()
                    code = w.proc.exitcode
                    lost, w.spec = w.spec, None
                    w.conn.close()
                    if lost is not None:
                        yield LostRun(lost, f"worker process on {w.device} died (exit code {code})", w.device)
                    restarts += 1
                    if restarts > self.max_restarts:
                        raise ExecutorError(
                            f"pool workers died {restarts} times (last exit code {code}); "
                            "stopping the sweep: rerun with --jobs 1 to see the failure in the driver")
                    workers[i] = _Worker(ctx, config, w.device, w.slot)
        finally:
            for w in workers:
                if w.spec is not None:
                    w.kill()  # interrupted mid-run: do not wait for it
                else:
                    w.stop()

    @staticmethod
    def _pick(pending: deque, split_key: tuple | None) -> "RunSpec":
        if split_key is not None:
            for i, spec in enumerate(pending):
                if _split_key(spec) == split_key:
                    del pending[i]
                    return spec
                if i >= 64:  # look a little ahead only
                    break
        return pending.popleft()


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


def _ray_task(config: WorkerConfig, spec: "RunSpec", device: str) -> "RunResult":
    """One run inside a Ray worker process (its runner is cached per process)."""
    runner = worker_runner(config)
    _set_threads(config.threads)
    run_device = device
    if device.startswith("cuda"):
        run_device = "cuda:0"  # Ray restricts CUDA_VISIBLE_DEVICES to the task's GPU
    result = _run_in_worker(runner, spec, run_device)
    if device.startswith("cuda"):
        import ray

        ids = ray.get_gpu_ids()
        result.device = f"cuda:{ids[0]}" if ids else run_device
    return result


class RayExecutor:
    """Each run a Ray task (``num_cpus=cpus_per_run``, ``num_gpus=1`` on CUDA).

    ``address`` is passed to ``ray.init`` (``"auto"``, ``"ray://host:10001"``
    or ``"host:6379"``); without it a local Ray instance is started with the
    machine's cores, unless Ray is already initialised in this process (then
    that instance is used).  Results are collected with ``ray.wait`` as they
    complete and stored by the driver; a task whose worker or node dies is
    retried by Ray ``max_retries`` times, then reported lost (not stored).

    The runs of the cluster import dabench and the plugins themselves: install
    them on every node (a ``--plugins-dir`` path must exist on every node).
    """

    name = "ray"

    def __init__(self, device: str = "cpu", address: str | None = None, cpus_per_run: int = 1,
                 max_in_flight: int | None = None, max_retries: int = 2) -> None:
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
        gpu = self.device.startswith("cuda")
        config = WorkerConfig.of(runner, self.cpus_per_run)
        task = ray.remote(_ray_task).options(num_cpus=self.cpus_per_run, num_gpus=1 if gpu else 0,
                                             max_retries=self.max_retries)
        if self.max_in_flight:
            limit = self.max_in_flight
        else:
            cpus = int(ray.cluster_resources().get("CPU", 1))
            limit = max(1, 2 * cpus // self.cpus_per_run)
        pending: deque = deque(specs)
        in_flight: dict[Any, "RunSpec"] = {}
        try:
            while pending or in_flight:
                while pending and len(in_flight) < limit:
                    spec = pending.popleft()
                    in_flight[task.remote(config, spec, self.device)] = spec
                    on_dispatch(spec, self.device)
                ready, _ = ray.wait(list(in_flight), num_returns=1)
                for ref in ready:
                    spec = in_flight.pop(ref)
                    try:
                        result = ray.get(ref)
                    except Exception as exc:  # worker/node died after its retries
                        yield LostRun(spec, f"Ray task lost: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
                        continue
                    yield result
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
