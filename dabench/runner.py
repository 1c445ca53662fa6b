"""Execute a suite: expand runs, skip the keys already stored, run the rest.

The driver (this module) builds the pair split for each seed (cached across
the runs that share it) and keeps its target test labels.  A worker process
(:mod:`dabench.isolation`, :mod:`dabench.executors`) receives only what the
:class:`~dabench.Task` carries plus the unlabelled evaluation inputs, runs
the method's ``skip`` and ``fit``, predicts on target test and source test
inputs, scores every validator, and returns predicted classes; the driver
computes accuracy, macro-F1 and source accuracy and writes one row to the
store in one transaction.

Every run ends in the store: a method that raises (``SystemExit`` and other
``BaseException`` included), whose loss diverges, that kills or crashes its
worker (retried once on a fresh worker first) or that exceeds the per-run
time limit is stored as ``failed`` with the reason; the sweep goes on.
``KeyboardInterrupt`` (Ctrl-C) stops the sweep between stores, never inside
one.  Concurrent invocations on one results folder claim each run in the
store before computing it (:meth:`dabench.store.RunStore.claim`), so no run
is computed twice.

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
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

import numpy as np

from . import __version__
from .contract import Task
from .data.core import DataError, DomainSpec, PairSplit, check_domain_arrays, make_split
from .isolation import RunRequest, SplitInputs, SplitLabels, WorkerOutcome, compute, labelled_metrics
from .plugins import Registry
from .store import Lease, RunScores, RunStore, canonical_json
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
    #: peak resident memory the run added above its worker's RSS at its start (MiB)
    rss_peak_mb: float | None = None
    #: peak of torch's CUDA allocator during the run (MiB; None on CPU)
    gpu_peak_mb: float | None = None
    device: str | None = None  # where it ran (None: the runner's device)
    #: what else determines the result: the torch intra-op threads the run
    #: had (BLAS/OpenMP pools are capped at the same count by the executors)
    #: and the torch version
    threads: int | None = None
    torch_version: str | None = None
    #: the pair's data is missing or fails its checks (a DataError): the run
    #: is reported but not stored, so that it runs once the data is there
    data_error: bool = False
    #: the run failed for a reason of the host (not of the method): it is
    #: stored as failed, and ``dabench run`` exits non-zero
    host_error: bool = False
    #: the shared source model the run used (methods requiring "source_model")
    source_model: Any = None  # dabench.source_model.SourceModelInfo
    #: health signals the method recorded (dabench.diagnostics)
    diagnostics: dict[str, float | None] = field(default_factory=dict)


@dataclass(frozen=True)
class Deferred:
    """A run this invocation did not compute: another invocation stored it
    meanwhile (``state == "done"``) or is computing it (``"held"``)."""

    spec: RunSpec
    state: str
    lease: Lease | None = None


@dataclass
class Prepared:
    """A run ready for a worker: the request, the split's worker-side inputs,
    and the labels the driver keeps to score the result."""

    spec: RunSpec
    request: RunRequest
    inputs: SplitInputs
    labels: SplitLabels


@dataclass
class Summary:
    total: int
    already_done: int
    ran: int = 0
    ok: int = 0
    failed: int = 0
    skipped: int = 0
    no_data: int = 0  # runs whose data is missing: not stored (see ``missing_data``)
    #: failed runs whose failure lies with the host, not the method (see ``RunResult.host_error``)
    host_errors: int = 0
    #: runs retried once after they crashed their worker
    retried: int = 0
    #: runs another invocation on the same store stored or computed meanwhile
    by_others: int = 0
    #: shared source models trained by this sweep / reused from the cache (distinct keys)
    source_models_trained: set[str] = field(default_factory=set)
    source_models_reused: set[str] = field(default_factory=set)
    #: the distinct data errors, each with the pairs it stopped
    missing_data: dict[str, list[str]] = field(default_factory=dict)
    wall_time_s: float = 0.0


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
    """Macro-averaged F1 over classes ``0 .. n_classes-1``, as scikit-learn's
    ``f1_score(average="macro", zero_division=0)`` (``2 tp / (2 tp + fp + fn)``
    per class, 0 where that is 0/0), in NumPy: the driver scores every run
    and need not import scikit-learn for it."""
    y = np.asarray(y, dtype=np.int64)
    pred = np.asarray(pred, dtype=np.int64)
    both = np.bincount(y[y == pred], minlength=n_classes)[:n_classes].astype(np.float64)  # tp
    fp = np.bincount(pred, minlength=n_classes)[:n_classes] - both
    fn = np.bincount(y, minlength=n_classes)[:n_classes] - both
    den = 2 * both + fp + fn
    f1 = np.divide(2 * both, den, out=np.zeros(n_classes), where=den > 0)
    return float(f1.mean())


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


def labelled_extras(labels: SplitLabels, target_pred: np.ndarray) -> dict[str, float | str]:
    """Per-run statistics the host computes with the labels it keeps, for the
    labelled verdicts (never for the label-free warning): which target test
    points the run got right (``target_correct``, :func:`dabench.verdicts.encode_bits`,
    in test order: runs of one pair and seed share the points), and the
    accuracy of always predicting the majority class of the source and target
    test splits (``source_chance``, ``target_chance``) and their sizes
    (``source_n``, ``target_n``), against which a failed training is
    recognised (:mod:`dabench.health`).  Computed in the driver, which holds
    the labels (``labels``: :class:`~dabench.isolation.SplitLabels`)."""
    from .source_model import chance_level
    from .verdicts import encode_bits

    return {
        "target_correct": encode_bits(np.asarray(target_pred) == labels.target_test),
        "source_chance": chance_level(labels.source_test, labels.n_classes),
        "target_chance": chance_level(labels.target_test, labels.n_classes),
        "source_n": float(len(labels.source_test)),
        "target_n": float(len(labels.target_test)),
    }


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


def _score_validators(validators: dict[str, Any], predictor: Any, task: Task, where: str,
                      quiet: bool = False) -> RunScores:
    """Every validator's score of ``predictor`` on ``task`` (None where it
    fails: a broken validator must not fail the run).  A validator that
    needs data the task's track withholds (e.g. ``source-val`` on a
    source-free run) has no score there, as expected: no warning."""
    from .tracks import TrackViolation

    scores = RunScores()
    for name, v in sorted(validators.items()):
        try:
            s = float(v.score(predictor, task))
            scores[name] = s if math.isfinite(s) else None
        except Exception as exc:
            expected = quiet or isinstance(exc, TrackViolation)
            (log.debug if expected else log.warning)("validator %s failed on %s: %s", name, where, exc)
            scores[name] = None
    return scores


def _rows(X: Any, idx: np.ndarray) -> Any:
    """Rows ``idx`` of an array (a copy) or of a streamed domain (a sub-stream)."""
    from .data.stream import is_stream

    return X[idx] if is_stream(X) else np.asarray(X)[idx]


def evaluate_stream_unlabelled(adapter: Any, stream: tuple[np.ndarray, np.ndarray], inputs: SplitInputs,
                               task: Task, validators: dict[str, Any]
                               ) -> tuple[np.ndarray, np.ndarray | None, RunScores]:
    """What a worker computes after a test-time run, without any target
    label: the classes the adapter predicted on the stream (``stream =
    (proba, order)`` from :func:`dabench.tracks.run_stream`, rows in the
    original order), the classes its state after the stream predicts on the
    source test inputs when it offers ``predict_proba`` (forgetting; else
    None), and the validator scores.  Validators see the stream
    (:func:`dabench.tracks.validator_view`); the label-free extras are the
    stream's predicted class distribution."""
    from .tracks import StreamedPredictor, stream_order, validator_view

    proba, order = stream
    n = inputs.n_classes
    target_pred = proba.argmax(1)
    source_pred = None
    if callable(getattr(adapter, "predict_proba", None)):
        # in a seeded shuffled order like the stream: an adapter normalising with batch statistics
        # would otherwise see the split's class-sorted rows in single-class chunks
        perm = stream_order(len(inputs.eval_source), task.seed)
        ps = _checked_proba(adapter, _rows(inputs.eval_source, perm), "source", n)
        source_pred = np.empty(len(perm), dtype=np.int64)
        source_pred[perm] = ps.argmax(1)
    X_stream = _rows(inputs.eval_target, order)
    vtask = validator_view(task, "test-time", stream_X=X_stream)
    scores = _score_validators(validators, StreamedPredictor(X_stream, proba[order], adapter), vtask, inputs.name)
    scores.extras = {f"prior_pred_{c}": float(v) for c, v in enumerate(proba.mean(0))}
    return target_pred, source_pred, scores


def evaluate_unlabelled(predictor: Any, inputs: SplitInputs, task: Task, validators: dict[str, Any],
                        extras_task: Task | None = None) -> tuple[np.ndarray, np.ndarray | None, RunScores]:
    """What a worker computes after ``fit``, without any target label: the
    classes predicted on the target test and source test inputs (None for
    the source side of a target-only model on a heterogeneous pair), and the
    validator scores (validators see ``task``, the method's view) carrying
    the run's label-free extras (:func:`label_free_extras`, computed on
    ``extras_task``, default ``task``)."""
    predictor = _MemoPredictor(predictor)
    n = inputs.n_classes
    target_pred = _checked_proba(predictor, inputs.eval_target, "target", n).argmax(1)
    try:
        source_pred: np.ndarray | None = _checked_proba(predictor, inputs.eval_source, "source", n).argmax(1)
    except ValueError:
        # On a heterogeneous pair a target-only model (target-oracle,
        # target-only-k) has no source encoder: no source accuracy to report.
        if inputs.same_feature_space:
            raise
        source_pred = None
    no_source = source_pred is None
    # a target-only model on a heterogeneous pair has no source side: validators
    # that need one have no score there, which is expected, not worth a warning
    scores = _score_validators(validators, predictor, task, inputs.name, quiet=no_source)
    try:
        scores.extras = label_free_extras(predictor, extras_task or task, n)
    except Exception as exc:  # statistics for the warning must not fail the run
        (log.debug if no_source else log.warning)("label-free statistics failed on %s: %s", inputs.name, exc)
    return target_pred, source_pred, scores


def evaluate(predictor: Any, split: PairSplit, task: Task, validators: dict[str, Any]) -> tuple[dict, RunScores]:
    """Target/source metrics (with the host's labels) and the validator
    scores, in this process: :func:`evaluate_unlabelled` then
    :func:`~dabench.isolation.labelled_metrics`; the scores carry the
    labelled extras too (:func:`labelled_extras`)."""
    target_pred, source_pred, scores = evaluate_unlabelled(predictor, SplitInputs.of(split, ()), task, validators)
    labels = SplitLabels.of(split)
    scores.extras.update(labelled_extras(labels, target_pred))
    return labelled_metrics(labels, target_pred, source_pred), scores


# ---------------------------------------------------------------- runner


def _reason(exc: BaseException) -> str:
    msg = str(exc).strip().replace("\n", " ")
    if len(msg) > 500:
        msg = msg[:497] + "..."
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__


class Runner:
    """Runs a suite's specs against a registry and a store.

    ``time_limit_s`` caps each run's wall time in a worker (default: the
    suite's ``time_limit_s``, see :data:`dabench.suite.DEFAULT_TIME_LIMIT_S`)."""

    def __init__(self, registry: Registry, store: RunStore | None, device: str = "cpu",
                 data_root: str | Path | None = None,
                 on_event: Callable[..., None] | None = None,
                 plugins_dir: str | Path | None = None,
                 source_model_dir: str | Path | None = None,
                 time_limit_s: float | None = None) -> None:
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
        self.time_limit_s = time_limit_s
        #: splits kept in the driver (LRU); executors size it to their workers
        self.split_cache_size = 2
        self._split_cache: OrderedDict[tuple, tuple[PairSplit, SplitInputs, SplitLabels]] = OrderedDict()
        self._load = lru_cache(maxsize=16)(self._load_domain)
        #: runs stored as failed before this time may be claimed again (``--retry-failed``)
        self._retry_before: str | None = None
        self._claiming = False
        #: executors call it when a run crashed its worker and is retried once
        self.on_retry: Callable[[RunSpec, str], None] = lambda spec, reason: None

    def _load_domain(self, spec: DomainSpec) -> tuple[np.ndarray, np.ndarray]:
        return check_domain_arrays(spec, *spec.load(self.data_root))

    @staticmethod
    def split_key(spec: RunSpec) -> tuple:
        return (spec.pair.name, canonical_json(spec.pair.protocol.as_dict()), spec.seed,
                canonical_json(spec.pair.fingerprints()))

    def _cached(self, spec: RunSpec) -> tuple[PairSplit, SplitInputs, SplitLabels]:
        key = self.split_key(spec)
        hit = self._split_cache.get(key)
        if hit is None:
            p = spec.pair
            s_spec, t_spec = p.domain(p.source, self.registry), p.domain(p.target, self.registry)
            split = make_split(
                p.name, s_spec, t_spec, self._load(s_spec), self._load(t_spec), spec.seed, p.protocol,
            )
            hit = (split, SplitInputs.of(split, key), SplitLabels.of(split))
            self._split_cache[key] = hit
            while len(self._split_cache) > max(1, self.split_cache_size):
                self._split_cache.popitem(last=False)
        else:
            self._split_cache.move_to_end(key)
        return hit

    def split(self, spec: RunSpec) -> PairSplit:
        """The split of ``spec``'s pair and seed (held by the driver only)."""
        return self._cached(spec)[0]

    def prepare(self, spec: RunSpec, device: str | None = None) -> "Prepared | RunResult | Deferred":
        """Driver side, before a run goes to a worker: claim it in the store
        (when the runner has one and is running a sweep), build its split,
        and return what the worker needs (:class:`Prepared`); or a finished
        :class:`RunResult` when its data is missing or broken; or a
        :class:`Deferred` when another invocation stored or holds it."""
        device = device or self.device
        if self._claiming and self.store is not None:
            claim = self.store.claim(spec.key, self._retry_before)
            if claim.state != "claimed":
                return Deferred(spec, claim.state, claim.lease)
        t0 = time.perf_counter()
        try:
            _, inputs, labels = self._cached(spec)
        except DataError as exc:  # missing/corrupt files: not the method's failure, not stored
            self._release(spec)
            return RunResult(spec, "failed", str(exc), device=device, data_error=True)
        except Exception as exc:
            return RunResult(spec, "failed", f"data: {_reason(exc)}", wall_time_s=time.perf_counter() - t0,
                             device=device)
        cls = self.registry.methods[spec.method]
        oracle = None
        if "oracle" in cls.requires:
            oracle = np.array(self._cached(spec)[0].target_train.y)
        request = RunRequest(spec, device, inputs.key, oracle,
                             None if self.source_model_dir is None else str(self.source_model_dir))
        return Prepared(spec, request, inputs, labels)

    def _release(self, spec: RunSpec) -> None:
        if self._claiming and self.store is not None:
            self.store.release(spec.key)

    def finish(self, prepared: Prepared, outcome: WorkerOutcome, device: str | None = None) -> RunResult:
        """Driver side, after the worker: score the predictions with the
        labels only the driver holds."""
        spec = prepared.spec
        device = device or prepared.request.device
        if outcome.status != "ok":
            return RunResult(spec, outcome.status, outcome.reason, wall_time_s=outcome.wall_time_s,
                             rss_peak_mb=outcome.rss_peak_mb, gpu_peak_mb=outcome.gpu_peak_mb, device=device,
                             host_error=outcome.host_error, source_model=outcome.source_model,
                             data_error=outcome.data_error, threads=outcome.threads,
                             torch_version=outcome.torch_version)
        try:
            m = labelled_metrics(prepared.labels, outcome.target_pred, outcome.source_pred)
        except Exception as exc:  # predictions of the wrong shape
            return RunResult(spec, "failed", _reason(exc), wall_time_s=outcome.wall_time_s, device=device,
                             source_model=outcome.source_model)
        scores = outcome.scores if outcome.scores is not None else RunScores()
        try:
            scores.extras.update(labelled_extras(prepared.labels, outcome.target_pred))
        except Exception as exc:  # noqa: BLE001 - statistics for the verdicts must not fail the run
            log.warning("labelled statistics failed on %s: %s", spec.key, exc)
        return RunResult(spec, "ok", None, m["target_acc"], m["target_f1"], m["source_acc"],
                         scores, outcome.wall_time_s,
                         outcome.rss_peak_mb, outcome.gpu_peak_mb, device, source_model=outcome.source_model,
                         diagnostics=dict(outcome.diagnostics or {}), threads=outcome.threads,
                         torch_version=outcome.torch_version)

    def failure(self, spec: RunSpec, reason: str, device: str | None = None, *, wall_time_s: float = 0.0,
                host_error: bool = False) -> RunResult:
        """A failed result an executor reports for a run whose worker could
        not return one (it crashed, was killed, or timed out)."""
        return RunResult(spec, "failed", reason, wall_time_s=wall_time_s, device=device or self.device,
                         host_error=host_error)

    def run_one(self, spec: RunSpec, device: str | None = None) -> RunResult:
        """Compute one run in *this* process on ``device`` (default: the
        runner's) and return its result; never writes the store.

        This process then holds the split's labels while ``fit`` runs: the
        executors run fit in a worker instead (:mod:`dabench.isolation`)."""
        device = device or self.device
        prepared = self.prepare(spec, device)
        if not isinstance(prepared, Prepared):
            if isinstance(prepared, Deferred):  # pragma: no cover - run_one does not claim
                raise RuntimeError(f"run {spec.key} is {prepared.state} by another invocation")
            return prepared
        outcome = compute(self.registry, prepared.request, prepared.inputs, catch_interrupt=False)
        return self.finish(prepared, outcome, device)

    def heartbeat(self) -> None:
        """Keep this invocation's leases alive (executors call it while they wait)."""
        if self._claiming and self.store is not None:
            try:
                self.store.renew()
            except Exception as exc:  # noqa: BLE001 - a missed heartbeat is not fatal
                log.debug("lease heartbeat failed: %s", exc)

    def record(self, r: RunResult, started: str) -> dict[str, Any]:
        s = r.spec
        cls = self.registry.methods[s.method]
        return {
            "key": s.key, "suite": s.suite, "pair": s.pair.name, "method": s.method,
            "method_version": s.method_version, "family": cls.family, "reference": int(bool(cls.reference)),
            "params": canonical_json(s.params), "point": s.point, "seed": s.seed,
            "protocol": canonical_json(s.pair.protocol.as_dict()),
            "budget": canonical_json({"steps": s.pair.budget.steps, "batch_size": s.pair.budget.batch_size}),
            "backbone": s.backbone, "track": getattr(cls, "track", "uda"), "status": r.status, "reason": r.reason,
            "target_acc": r.target_acc, "target_f1": r.target_f1, "source_acc": r.source_acc,
            "wall_time_s": r.wall_time_s, "rss_peak_mb": r.rss_peak_mb, "gpu_peak_mb": r.gpu_peak_mb,
            "device": (r.device or self.device) if r.status == "ok" else None,
            "threads": r.threads, "torch_version": r.torch_version,
            "started_at": started, "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "dabench_version": __version__,
        }

    def run(self, suite: Suite, retry_failed: bool = False, executor: Any = None,
            wait_poll_s: float = 2.0) -> Summary:
        """Run every spec of ``suite`` not yet in the store (and the failed
        ones with ``retry_failed``) on ``executor`` (default: one worker
        process, :class:`~dabench.executors.SerialExecutor`), storing each
        result the moment it comes back.

        Each run is claimed in the store right before it is computed; runs
        another live invocation holds are waited for (polling every
        ``wait_poll_s`` seconds) and taken over if their owner dies.

        Events sent to ``on_event``: ``start`` (total, todo, done, executor),
        ``run_start`` when a run is handed to a worker (index in dispatch
        order, spec, device), ``run_retry`` when a run crashed its worker and
        is retried once (spec, reason), ``run_end`` when its result is stored
        (index = number of results so far - 1, result), ``run_no_data`` when
        its pair's data is missing or fails its checks (not stored; ``first``
        is true the first time this error is seen), ``waiting`` when runs are
        held by another invocation (n, owners), ``end`` (summary).
        """
        from .executors import SerialExecutor

        if self.store is None:
            raise RuntimeError("Runner.run needs a store")
        if self.time_limit_s is None:
            self.time_limit_s = getattr(suite, "time_limit_s", None)
        executor = executor if executor is not None else SerialExecutor()
        specs = suite.expand(self.registry)
        status = self.store.statuses()
        todo = [s for s in specs if s.key not in status or (retry_failed and status[s.key] == "failed")]
        summary = Summary(total=len(specs), already_done=len(specs) - len(todo))
        self.on_event("start", suite=suite, total=len(specs), todo=len(todo), done=summary.already_done,
                      executor=executor)
        t_start = time.perf_counter()
        started: dict[str, str] = {}
        self._retry_before = datetime.now(timezone.utc).isoformat(timespec="seconds") if retry_failed else None
        self._claiming = True
        n_results = 0

        def dispatched(spec: RunSpec, device: str) -> None:
            started[spec.key] = datetime.now(timezone.utc).isoformat(timespec="seconds")
            self.on_event("run_start", index=len(started) - 1, todo=len(todo), spec=spec, device=device,
                          elapsed=time.perf_counter() - t_start, completed=n_results)

        def retried(spec: RunSpec, reason: str) -> None:
            summary.retried += 1
            log.info("run %s crashed its worker (%s); retrying it once on a fresh worker", spec.key[:12], reason)
            self.on_event("run_retry", spec=spec, reason=reason, elapsed=time.perf_counter() - t_start)

        self.on_retry = retried
        try:
            pending = list(todo)
            while pending:
                held: list[Deferred] = []
                for result in executor.map(self, pending, dispatched):
                    spec = result.spec
                    if isinstance(result, Deferred):
                        if result.state == "held":
                            held.append(result)
                        else:
                            summary.by_others += 1
                        continue
                    if result.data_error:
                        self._release(spec)  # not stored: a later invocation runs it once the data is there
                        summary.no_data += 1
                        n_results += 1
                        pairs = summary.missing_data.setdefault(result.reason or "", [])
                        first = not pairs
                        if spec.pair.name not in pairs:
                            pairs.append(spec.pair.name)
                        self.on_event("run_no_data", index=n_results - 1, todo=len(todo), spec=spec,
                                      reason=result.reason, first=first, elapsed=time.perf_counter() - t_start)
                        continue
                    rec = self.record(result, started.get(spec.key)
                                      or datetime.now(timezone.utc).isoformat(timespec="seconds"))
                    if not self.store.write(rec, result.scores):
                        summary.by_others += 1  # another invocation stored it first: theirs is kept
                        continue
                    sm = result.source_model
                    if sm is not None:
                        if sm.trained:
                            self.store.add_source_model(sm, trained_by=spec.key)
                            summary.source_models_trained.add(sm.key)
                            # a parallel run that loaded it may have finished first: it was not reused
                            summary.source_models_reused.discard(sm.key)
                        elif sm.key not in summary.source_models_trained:
                            summary.source_models_reused.add(sm.key)
                    summary.ran += 1
                    n_results += 1
                    setattr(summary, result.status, getattr(summary, result.status) + 1)
                    if result.host_error:
                        summary.host_errors += 1
                    hook_rec = dict(rec, **{f"val_{k}": v for k, v in result.scores.items()})
                    try:
                        self.registry.pm.hook.dabench_run_finished(record=hook_rec) if self.registry.pm else None
                    except KeyboardInterrupt:
                        raise
                    except BaseException as exc:  # noqa: BLE001 - a logger plugin must not stop the sweep
                        log.warning("a dabench_run_finished hook failed (ignored): %s", _reason(exc))
                    self.on_event("run_end", index=n_results - 1, todo=len(todo), spec=spec,
                                  result=result, elapsed=time.perf_counter() - t_start)
                pending = self._wait_for(held, wait_poll_s, summary)
        finally:
            self._claiming = False
            try:
                self.store.release_all()
            except Exception as exc:  # noqa: BLE001 - leases of a dead owner expire anyway
                log.debug("could not release leases: %s", exc)
        summary.wall_time_s = time.perf_counter() - t_start
        self.on_event("end", summary=summary)
        return summary

    def _wait_for(self, held: list[Deferred], poll_s: float, summary: Summary) -> list[RunSpec]:
        """Wait until each run another invocation holds is stored (by it) or
        its lease is abandoned; return the abandoned ones (claimed now), to
        compute here."""
        if not held:
            return []
        owners = sorted({d.lease.describe() for d in held if d.lease is not None})
        self.on_event("waiting", n=len(held), owners=owners)
        waiting, free = list(held), []
        while True:
            still = []
            for d in waiting:
                c = self.store.claim(d.spec.key, self._retry_before)
                if c.state == "done":
                    summary.by_others += 1
                elif c.state == "claimed":
                    free.append(d.spec)
                else:
                    still.append(d)
            if not still:
                return free
            waiting = still
            time.sleep(poll_s)


def host_info() -> str:
    return f"{platform.node()} {platform.machine()} {os.cpu_count()} cpus"
