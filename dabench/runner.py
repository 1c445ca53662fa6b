"""Execute a suite: expand runs, skip the keys already stored, run the rest.

Each run builds the pair split for its seed (cached across the runs that
share it), gives the method a :class:`~dabench.Task`, evaluates the returned
predictor on data the method never saw (target test, source test), scores
every validator, and writes one row to the store in one transaction.  A
method that raises, or whose loss diverges, is stored as ``failed`` with the
reason; the sweep goes on.  ``KeyboardInterrupt`` stops the sweep between
stores, never inside one.

Where runs are computed is the executor's business (:mod:`dabench.executors`:
serial, a process pool, Ray); whatever the executor, only this driver writes
the store.
"""

from __future__ import annotations

import logging
import math
import os
import platform
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

import numpy as np

from . import __version__
from .contract import Task
from .data.core import DataError, DomainSpec, PairSplit, check_domain_arrays, make_split
from .plugins import Registry
from .store import RunScores, RunStore, canonical_json
from .suite import RunSpec, Suite

log = logging.getLogger("dabench")


@dataclass
class RunResult:
    spec: RunSpec
    status: str
    reason: str | None = None
    target_acc: float | None = None
    target_f1: float | None = None
    source_acc: float | None = None
    scores: dict[str, float | None] = field(default_factory=dict)
    wall_time_s: float = 0.0
    peak_mem_mb: float | None = None
    device: str | None = None  # where it ran (None: the runner's device)
    #: what else determines the result: the torch intra-op threads the run
    #: had (BLAS/OpenMP pools are capped at the same count by the executors)
    #: and the torch version
    threads: int | None = None
    torch_version: str | None = None
    #: the pair's data is missing or fails its checks (a DataError): the run
    #: is reported but not stored, so that it runs once the data is there
    data_error: bool = False
    #: the shared source model the run used (methods requiring "source_model")
    source_model: Any = None  # dabench.source_model.SourceModelInfo
    #: health signals the method recorded (dabench.diagnostics)
    diagnostics: dict[str, float | None] = field(default_factory=dict)


@dataclass
class Summary:
    total: int
    already_done: int
    ran: int = 0
    ok: int = 0
    failed: int = 0
    skipped: int = 0
    lost: int = 0  # runs whose worker died: not stored, a rerun computes them
    no_data: int = 0  # runs whose data is missing: not stored (see ``missing_data``)
    #: shared source models trained by this sweep / reused from the cache (distinct keys)
    source_models_trained: set[str] = field(default_factory=set)
    source_models_reused: set[str] = field(default_factory=set)
    #: the distinct data errors, each with the pairs it stopped
    missing_data: dict[str, list[str]] = field(default_factory=dict)
    wall_time_s: float = 0.0


# ---------------------------------------------------------------- memory


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter of this process (Linux)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_mb() -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    except Exception:
        return None


# ---------------------------------------------------------------- evaluation


class PredictorError(RuntimeError):
    pass


def _checked_proba(predictor: Any, X: np.ndarray, domain: str, n_classes: int) -> np.ndarray:
    p = np.asarray(predictor.predict_proba(X, domain=domain), dtype=np.float64)
    if p.shape != (len(X), n_classes):
        raise PredictorError(f"predict_proba returned shape {p.shape}, expected {(len(X), n_classes)}")
    if not np.isfinite(p).all():
        raise PredictorError("predict_proba returned non-finite values")
    if (p < -1e-6).any() or not np.allclose(p.sum(1), 1.0, atol=1e-3):
        raise PredictorError("predict_proba rows are not probability distributions (negative or not summing to 1)")
    return p


def macro_f1(y: np.ndarray, pred: np.ndarray, n_classes: int) -> float:
    from sklearn.metrics import f1_score

    return float(f1_score(y, pred, labels=list(range(n_classes)), average="macro", zero_division=0))


#: How many target-train points' predicted classes are stored per run (in
#: order, so runs of one pair and seed can be compared point by point).
N_STORED_PREDICTIONS = 500


def bbse_prior(source_proba: np.ndarray, source_y: np.ndarray, target_proba: np.ndarray) -> np.ndarray:
    """Target class prior estimated without target labels (black-box shift
    estimation, Lipton, Wang, Smola, ICML 2018, with soft confusions).

    ``C[i, j] = mean over labelled source points of p(yhat = i | x) 1[y = j]``
    and ``mu[i] = mean over target points of p(yhat = i | x)``; under label
    shift ``mu = C w`` with ``w_j = q(y = j) / p(y = j)``.  ``w`` is solved by
    least squares, clipped at 0, and ``q = w p`` normalised.
    """
    k = source_proba.shape[1]
    onehot = np.eye(k)[np.asarray(source_y, dtype=np.int64)]
    C = source_proba.T @ onehot / len(source_y)
    mu = target_proba.mean(0)
    w = np.clip(np.linalg.lstsq(C, mu, rcond=None)[0], 0.0, None)
    q = w * onehot.mean(0)
    return q / q.sum() if q.sum() > 0 else np.full(k, 1.0 / k)


def label_free_extras(predictor: Any, task: Task, n_classes: int) -> dict[str, float | str]:
    """Per-run statistics computed without target labels, for the
    leaderboard's negative-transfer warning: the mean predicted target class
    distribution (``prior_pred_<c>``), its BBSE estimate (``prior_bbse_<c>``)
    and the predicted classes of the first target-train points
    (``target_pred``, comma separated)."""
    pt = _checked_proba(predictor, task.target_train.X, "target", n_classes)
    pv = _checked_proba(predictor, task.source_val.X, "source", n_classes)
    extras: dict[str, float | str] = {}
    for c, v in enumerate(pt.mean(0)):
        extras[f"prior_pred_{c}"] = float(v)
    for c, v in enumerate(bbse_prior(pv, task.source_val.y, pt)):
        extras[f"prior_bbse_{c}"] = float(v)
    extras["target_pred"] = ",".join(str(int(c)) for c in pt[:N_STORED_PREDICTIONS].argmax(1))
    return extras


class _MemoPredictor:
    """A trained predictor whose ``predict_proba``/``embed`` results are kept
    per input array, for one evaluation: the validators and the label-free
    statistics ask for the same arrays (target train, source val) many times,
    and a forward pass of a CNN over them costs more than everything else.
    Every other attribute (e.g. ``importance_weights``) passes through."""

    def __init__(self, predictor: Any) -> None:
        from .training import TorchPredictor

        self._inner = predictor
        self._memo: dict[tuple, tuple[Any, np.ndarray]] = {}
        # both outputs from one pass: a TorchPredictor whose predict_proba and embed are its own
        t = type(predictor)
        self._joint = (isinstance(predictor, TorchPredictor) and t.predict_proba is TorchPredictor.predict_proba
                       and t.embed is TorchPredictor.embed)

    def _call(self, fn: str, X: Any, domain: str) -> np.ndarray:
        key = (fn, id(X), domain)
        hit = self._memo.get(key)
        if hit is not None and hit[0] is X:  # the array itself is kept, so its id is not reused
            return hit[1].copy()
        if self._joint:
            p, z = self._inner.predict_proba_and_embed(X, domain=domain)
            self._memo[("predict_proba", id(X), domain)] = (X, p)
            self._memo[("embed", id(X), domain)] = (X, z)
            out = p if fn == "predict_proba" else z
        else:
            out = np.asarray(getattr(self._inner, fn)(X, domain=domain))
            self._memo[key] = (X, out)
        return out.copy()

    def predict_proba(self, X: Any, domain: str = "target") -> np.ndarray:
        return self._call("predict_proba", X, domain)

    def embed(self, X: Any, domain: str = "target") -> np.ndarray:
        return self._call("embed", X, domain)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def evaluate(predictor: Any, split: PairSplit, task: Task, validators: dict[str, Any]) -> tuple[dict, RunScores]:
    """Target/source metrics (with the host's labels) and the validator
    scores; the scores carry the run's label-free extras
    (:func:`label_free_extras`) to the store."""
    predictor = _MemoPredictor(predictor)
    pt = _checked_proba(predictor, split.target_test.X, "target", split.n_classes)
    yhat = pt.argmax(1)
    metrics = {
        "target_acc": float((yhat == split.target_test.y).mean()),
        "target_f1": macro_f1(split.target_test.y, yhat, split.n_classes),
    }
    try:
        ps = _checked_proba(predictor, split.source_test.X, "source", split.n_classes)
        metrics["source_acc"] = float((ps.argmax(1) == split.source_test.y).mean())
    except ValueError:
        # On a heterogeneous pair a target-only model (target-oracle,
        # target-only-k) has no source encoder: no source accuracy to report.
        if split.same_feature_space:
            raise
        metrics["source_acc"] = None
    no_source = metrics["source_acc"] is None
    scores = RunScores()
    for name, v in sorted(validators.items()):
        try:
            s = float(v.score(predictor, task))
            scores[name] = s if math.isfinite(s) else None
        except Exception as exc:  # a broken validator must not fail the run
            # a target-only model on a heterogeneous pair has no source side: validators
            # that need one have no score there, which is expected, not worth a warning
            (log.debug if no_source else log.warning)("validator %s failed on %s: %s", name, split.name, exc)
            scores[name] = None
    try:
        scores.extras = label_free_extras(predictor, task, split.n_classes)
    except Exception as exc:  # statistics for the warning must not fail the run
        (log.debug if no_source else log.warning)("label-free statistics failed on %s: %s", split.name, exc)
    return metrics, scores


# ---------------------------------------------------------------- runner


def _reason(exc: BaseException) -> str:
    msg = str(exc).strip().replace("\n", " ")
    if len(msg) > 500:
        msg = msg[:497] + "..."
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__


class Runner:
    """Runs a suite's specs against a registry and a store."""

    def __init__(self, registry: Registry, store: RunStore | None, device: str = "cpu",
                 data_root: str | Path | None = None,
                 on_event: Callable[..., None] | None = None,
                 plugins_dir: str | Path | None = None,
                 source_model_dir: str | Path | None = None) -> None:
        self.registry = registry
        self.store = store
        self.device = device
        self.data_root = Path(data_root) if data_root else None
        #: where the registry's extra plugins came from: worker processes
        #: (pool, Ray) rebuild the same registry from it
        self.plugins_dir = Path(plugins_dir) if plugins_dir else None
        #: the cache of shared source models (default: ``source-models/`` in
        #: the store's folder; None without a store: trained, not cached)
        if source_model_dir is None and store is not None:
            source_model_dir = Path(store.folder) / "source-models"
        self.source_model_dir = Path(source_model_dir) if source_model_dir else None
        self.on_event = on_event or (lambda *a, **k: None)
        self._split_cache: dict[tuple, PairSplit] = {}
        self._load = lru_cache(maxsize=16)(self._load_domain)

    def _load_domain(self, spec: DomainSpec) -> tuple[np.ndarray, np.ndarray]:
        return check_domain_arrays(spec, *spec.load(self.data_root))

    def split(self, spec: RunSpec) -> PairSplit:
        key = (spec.pair.name, canonical_json(spec.pair.protocol.as_dict()), spec.seed,
               canonical_json(spec.pair.fingerprints()))
        if key not in self._split_cache:
            self._split_cache.clear()  # runs are ordered by pair and seed: keep one
            p = spec.pair
            s_spec, t_spec = p.domain(p.source, self.registry), p.domain(p.target, self.registry)
            self._split_cache[key] = make_split(
                p.name, s_spec, t_spec, self._load(s_spec), self._load(t_spec), spec.seed, p.protocol,
            )
        return self._split_cache[key]

    def run_one(self, spec: RunSpec, device: str | None = None) -> RunResult:
        """Compute one run on ``device`` (default: the runner's) and return
        its result; never writes the store."""
        from .training import amp_context, seed_everything

        device = device or self.device
        cls = self.registry.methods[spec.method]
        t0 = time.perf_counter()
        try:
            split = self.split(spec)
        except DataError as exc:  # missing/corrupt files: not the method's failure, not stored
            return RunResult(spec, "failed", str(exc), device=device, data_error=True)
        except Exception as exc:
            return RunResult(spec, "failed", f"data: {_reason(exc)}", wall_time_s=time.perf_counter() - t0,
                             device=device)
        task = split.task(
            seed=spec.seed, device=device, budget=spec.pair.budget,
            backbone=self.registry.backbones[spec.backbone], oracle="oracle" in cls.requires,
        )
        reason = cls.skip(task)
        if reason:
            return RunResult(spec, "skipped", reason, device=device)
        sm_info = None
        if "source_model" in cls.requires:
            from .source_model import attach_source_model, cache_identity

            t_sm = time.perf_counter()
            try:
                recipe = spec.source_recipe or spec.pair.source_recipe.resolved(spec.pair.budget.steps,
                                                                                spec.pair.budget.batch_size)
                ident = cache_identity(pair=spec.pair.name, protocol=spec.pair.protocol.as_dict(),
                                       fingerprints=spec.pair.fingerprints(), seed=spec.seed,
                                       backbone=spec.backbone, shape=task.source_shape, n_classes=task.n_classes,
                                       recipe=recipe, device=device)
                with amp_context(device, spec.pair.protocol.amp):
                    task, sm_info = attach_source_model(task, recipe=recipe, identity=ident,
                                                        cache_dir=self.source_model_dir)
            except KeyboardInterrupt:
                raise
            except DataError as exc:  # an image of a streamed domain that cannot be decoded
                return RunResult(spec, "failed", str(exc), device=device, data_error=True)
            except Exception as exc:
                log.debug("source model for %s failed:\n%s", spec.key, traceback.format_exc())
                return RunResult(spec, "failed", f"source model: {_reason(exc)}",
                                 wall_time_s=time.perf_counter() - t_sm, device=device)
        cuda = device.startswith("cuda")
        import torch

        settings = {"threads": torch.get_num_threads(), "torch_version": torch.__version__}
        _reset_peak_rss()
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        from . import diagnostics

        try:
            seed_everything(spec.seed)
            method = cls(**spec.params)
            with amp_context(device, spec.pair.protocol.amp):  # bf16 on CUDA when the suite asks; never on CPU
                with diagnostics.collect() as diag:
                    predictor = method.fit(task)
                wall = time.perf_counter() - t0
                metrics, scores = evaluate(predictor, split, task, self.registry.validators)
        except KeyboardInterrupt:
            raise
        except DataError as exc:  # an image of a streamed domain that cannot be decoded: the data's fault
            return RunResult(spec, "failed", str(exc), device=device, data_error=True)
        except Exception as exc:
            log.debug("run %s failed:\n%s", spec.key, traceback.format_exc())
            return RunResult(spec, "failed", _reason(exc), wall_time_s=time.perf_counter() - t0,
                             peak_mem_mb=_peak_rss_mb(), device=device, source_model=sm_info, **settings)
        for name, value in diag.items():
            scores.extras[f"diag_{name}"] = value
        if sm_info is not None:
            scores.extras["source_model"] = sm_info.key
            if sm_info.source_val_acc is not None:
                scores.extras["source_model_val_acc"] = sm_info.source_val_acc
        peak = _peak_rss_mb()
        if cuda:
            peak = torch.cuda.max_memory_allocated(device) / 2**20
        return RunResult(spec, "ok", None, metrics["target_acc"], metrics["target_f1"], metrics.get("source_acc"),
                         scores, wall, peak, device, source_model=sm_info, diagnostics=dict(diag), **settings)

    def record(self, r: RunResult, started: str) -> dict[str, Any]:
        s = r.spec
        cls = self.registry.methods[s.method]
        return {
            "key": s.key, "suite": s.suite, "pair": s.pair.name, "method": s.method,
            "method_version": s.method_version, "family": cls.family, "reference": int(bool(cls.reference)),
            "params": canonical_json(s.params), "point": s.point, "seed": s.seed,
            "protocol": canonical_json(s.pair.protocol.as_dict()),
            "budget": canonical_json({"steps": s.pair.budget.steps, "batch_size": s.pair.budget.batch_size}),
            "backbone": s.backbone, "status": r.status, "reason": r.reason,
            "target_acc": r.target_acc, "target_f1": r.target_f1, "source_acc": r.source_acc,
            "wall_time_s": r.wall_time_s, "peak_mem_mb": r.peak_mem_mb,
            "device": (r.device or self.device) if r.status == "ok" else None,
            "threads": r.threads, "torch_version": r.torch_version,
            "started_at": started, "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "dabench_version": __version__,
        }

    def run(self, suite: Suite, retry_failed: bool = False, executor: Any = None) -> Summary:
        """Run every spec of ``suite`` not yet in the store (and the failed
        ones with ``retry_failed``) on ``executor`` (default: serial), storing
        each result the moment it comes back.

        Events sent to ``on_event``: ``start`` (total, todo, done, executor),
        ``run_start`` when a run is handed to a worker (index in dispatch
        order, spec, device), ``run_end`` when its result is stored (index =
        number of results so far - 1, result), ``run_lost`` when its worker
        died (it is not stored), ``run_no_data`` when its pair's data is
        missing or fails its checks (not stored; ``first`` is true the first
        time this error is seen), ``end`` (summary).
        """
        from .executors import LostRun, SerialExecutor

        if self.store is None:
            raise RuntimeError("Runner.run needs a store")
        executor = executor if executor is not None else SerialExecutor()
        specs = suite.expand(self.registry)
        status = self.store.statuses()
        todo = [s for s in specs if s.key not in status or (retry_failed and status[s.key] == "failed")]
        summary = Summary(total=len(specs), already_done=len(specs) - len(todo))
        self.on_event("start", suite=suite, total=len(specs), todo=len(todo), done=summary.already_done,
                      executor=executor)
        t_start = time.perf_counter()
        started: dict[str, str] = {}

        def dispatched(spec: RunSpec, device: str) -> None:
            started[spec.key] = datetime.now(timezone.utc).isoformat(timespec="seconds")
            self.on_event("run_start", index=len(started) - 1, todo=len(todo), spec=spec, device=device,
                          elapsed=time.perf_counter() - t_start, completed=summary.ran + summary.lost + summary.no_data)

        for result in executor.map(self, todo, dispatched):
            spec = result.spec
            if isinstance(result, LostRun):
                summary.lost += 1
                log.warning("run %s lost (%s); it is not stored, rerun the sweep to compute it",
                            spec.key[:12], result.reason)
                self.on_event("run_lost", index=summary.ran + summary.lost + summary.no_data - 1, todo=len(todo), spec=spec,
                              reason=result.reason, elapsed=time.perf_counter() - t_start)
                continue
            if result.data_error:
                summary.no_data += 1
                pairs = summary.missing_data.setdefault(result.reason or "", [])
                first = not pairs
                if spec.pair.name not in pairs:
                    pairs.append(spec.pair.name)
                self.on_event("run_no_data", index=summary.ran + summary.lost + summary.no_data - 1,
                              todo=len(todo), spec=spec, reason=result.reason, first=first,
                              elapsed=time.perf_counter() - t_start)
                continue
            rec = self.record(result, started.get(spec.key) or datetime.now(timezone.utc).isoformat(timespec="seconds"))
            self.store.write(rec, result.scores)
            sm = result.source_model
            if sm is not None:
                if sm.trained:
                    self.store.add_source_model(sm, trained_by=spec.key)
                    summary.source_models_trained.add(sm.key)
                elif sm.key not in summary.source_models_trained:
                    summary.source_models_reused.add(sm.key)
            summary.ran += 1
            setattr(summary, result.status, getattr(summary, result.status) + 1)
            hook_rec = dict(rec, **{f"val_{k}": v for k, v in result.scores.items()})
            try:
                self.registry.pm.hook.dabench_run_finished(record=hook_rec) if self.registry.pm else None
            except Exception as exc:
                log.warning("a dabench_run_finished hook failed (ignored): %s", _reason(exc))
            self.on_event("run_end", index=summary.ran + summary.lost + summary.no_data - 1, todo=len(todo), spec=spec,
                          result=result, elapsed=time.perf_counter() - t_start)
        summary.wall_time_s = time.perf_counter() - t_start
        self.on_event("end", summary=summary)
        return summary


def host_info() -> str:
    return f"{platform.node()} {platform.machine()} {os.cpu_count()} cpus"
