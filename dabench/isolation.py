"""Where ``fit`` runs: a process that does not hold the target test labels.

Plugins are trusted code: dabench does not sandbox them.  What the host
does guarantee is narrower and real: the process that runs a method's
``fit`` (and its ``skip``, its predictor and the validators) never holds
the target test labels, nor the target train labels of a method that is not
the target-oracle.  The split is made in the driver; a worker receives

- :class:`SplitInputs`: what the :class:`~dabench.contract.Task` carries
  (labelled source train/val, unlabelled target train, the ``k`` labelled
  target samples when the protocol gives them) plus the *unlabelled*
  evaluation inputs (target test and source test ``X``);
- a :class:`RunRequest` per run (the target train labels ride along only
  for methods declaring the ``oracle`` requirement);

and returns a :class:`WorkerOutcome`: predicted classes on the evaluation
inputs, validator scores and label-free extras, wall time and memory.  The
driver keeps :class:`SplitLabels` and computes accuracy, macro-F1 and
source accuracy (:func:`labelled_metrics`).

So walking the call stack or scanning the garbage collector inside ``fit``
finds no target labels.  A plugin can still reload a public dataset through
the registry and match rows; that is what the leaderboard's suspicion flag
(a method beating the target-oracle) is for.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .contract import Labeled, Task, Unlabeled

__all__ = [
    "RunRequest",
    "SplitInputs",
    "SplitLabels",
    "WorkerOutcome",
    "compute",
    "labelled_metrics",
]


@dataclass(frozen=True)
class SplitInputs:
    """What a worker may hold for one split (pair, protocol, seed): the
    Task's data and the unlabelled evaluation inputs.  No target labels."""

    key: tuple
    name: str
    source_train: Labeled
    source_val: Labeled
    target_train: Unlabeled
    target_labeled: Labeled | None
    source_shape: tuple[int, ...]
    target_shape: tuple[int, ...]
    n_classes: int
    #: target test inputs (their labels stay in the driver)
    eval_target: np.ndarray = field(repr=False)
    #: source test inputs (for the source accuracy after adaptation)
    eval_source: np.ndarray = field(repr=False)

    @property
    def same_feature_space(self) -> bool:
        return self.source_shape == self.target_shape

    @classmethod
    def of(cls, split: Any, key: tuple) -> "SplitInputs":
        """The worker's part of a :class:`~dabench.data.core.PairSplit`."""
        return cls(key=key, name=split.name, source_train=split.source_train, source_val=split.source_val,
                   target_train=Unlabeled(split.target_train.X), target_labeled=split.target_labeled,
                   source_shape=split.source_shape, target_shape=split.target_shape, n_classes=split.n_classes,
                   eval_target=split.target_test.X, eval_source=split.source_test.X)

    def task(self, *, seed: int, device: str, budget: Any, backbone: Any,
             target_train_labels: np.ndarray | None = None) -> Task:
        return Task(
            source_train=self.source_train, source_val=self.source_val, target_train=self.target_train,
            target_labeled=self.target_labeled, source_shape=self.source_shape, target_shape=self.target_shape,
            same_feature_space=self.same_feature_space, n_classes=self.n_classes, device=device, seed=seed,
            budget=budget, backbone=backbone, target_train_labels=target_train_labels,
        )


@dataclass(frozen=True)
class SplitLabels:
    """What only the driver holds: the evaluation labels of one split."""

    target_test: np.ndarray = field(repr=False)
    source_test: np.ndarray = field(repr=False)
    n_classes: int
    same_feature_space: bool

    @classmethod
    def of(cls, split: Any) -> "SplitLabels":
        return cls(split.target_test.y, split.source_test.y, split.n_classes, split.same_feature_space)


@dataclass(frozen=True)
class RunRequest:
    """One run for a worker: the spec, its device, and which split it uses."""

    spec: Any  # dabench.suite.RunSpec
    device: str
    split_key: tuple
    #: target *train* labels, only for methods declaring ``oracle``
    oracle_labels: np.ndarray | None = field(default=None, repr=False)
    #: the shared source-model cache (None: trained, not cached)
    source_model_dir: str | None = None


@dataclass
class WorkerOutcome:
    """What a worker returns for one run (no labelled metric: the driver
    computes those)."""

    status: str  # "ok", "failed" or "skipped"
    reason: str | None = None
    target_pred: np.ndarray | None = field(default=None, repr=False)  # classes predicted on eval_target
    source_pred: np.ndarray | None = field(default=None, repr=False)  # None: the model has no source side
    scores: Any = None  # dabench.store.RunScores
    wall_time_s: float = 0.0
    rss_peak_mb: float | None = None
    gpu_peak_mb: float | None = None
    #: the failure lies with the host (the worker's plugins differ from the
    #: driver's, a bug), not with the method: the CLI exits non-zero
    host_error: bool = False
    #: where it ran, when the worker knows better than the driver (a Ray GPU)
    device: str | None = None
    #: the shared source model the run used (a dabench.source_model.SourceModelInfo)
    source_model: Any = None
    #: health signals the method recorded (dabench.diagnostics)
    diagnostics: dict[str, float | None] = field(default_factory=dict)
    #: the run's data could not be read (an image of a streamed domain that
    #: cannot be decoded): reported as missing data, not stored
    data_error: bool = False
    #: what else determines the result: the torch intra-op threads and torch's version
    threads: int | None = None
    torch_version: str | None = None


# ---------------------------------------------------------------- memory


def _rss_mb() -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def _hwm_mb() -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter of this process to its current
    RSS (Linux ``clear_refs``); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class MemoryMeter:
    """Peak memory of one run: resident memory above the process's RSS when
    the run started (Linux; None elsewhere), and the CUDA allocator's peak."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")
        self.device = device
        self.baseline = _rss_mb() if _reset_peak_rss() else None
        if self.cuda:
            import torch

            torch.cuda.reset_peak_memory_stats(device)

    def read(self) -> tuple[float | None, float | None]:
        rss = None
        if self.baseline is not None:
            hwm = _hwm_mb()
            rss = None if hwm is None else max(0.0, hwm - self.baseline)
        gpu = None
        if self.cuda:
            import torch

            gpu = torch.cuda.max_memory_allocated(self.device) / 2**20
        return rss, gpu


# ---------------------------------------------------------------- the run


def _reason(exc: BaseException) -> str:
    from .runner import _reason as reason

    return reason(exc)


def compute(registry: Any, request: RunRequest, inputs: SplitInputs, *,
            catch_interrupt: bool = True) -> WorkerOutcome:
    """Run one request in this process: build the Task, ask the method to
    ``skip``, seed, ``fit``, predict on the evaluation inputs, score the
    validators.  Every exception (``SystemExit`` and other ``BaseException``
    included) becomes a ``failed`` outcome with its reason; with
    ``catch_interrupt=False`` a ``KeyboardInterrupt`` propagates (the
    in-process executor, where it may be the user's Ctrl-C)."""
    from .data.core import DataError
    from .runner import evaluate_stream_unlabelled, evaluate_unlabelled
    from .training import amp_context, seed_everything

    spec = request.spec
    if inputs.key != request.split_key:
        return WorkerOutcome("failed", f"host: the worker holds split {inputs.key}, not {request.split_key}",
                             host_error=True)
    cls = registry.methods.get(spec.method)
    backbone = registry.backbones.get(spec.backbone)
    if cls is None or backbone is None:
        what = f"method {spec.method!r}" if cls is None else f"backbone {spec.backbone!r}"
        return WorkerOutcome("failed", f"host: the worker process does not have {what} (its plugins differ "
                                       f"from the driver's)", host_error=True)
    task = inputs.task(seed=spec.seed, device=request.device, budget=spec.pair.budget, backbone=backbone,
                       target_train_labels=request.oracle_labels)
    from .tracks import TrackViolation, run_stream, task_for_track

    track = getattr(cls, "track", "uda")
    try:  # skip sees what the method will see (its track's view, before the source model is attached)
        reason = cls.skip(task_for_track(task, track)[0])
    except KeyboardInterrupt:
        if not catch_interrupt:
            raise
        return WorkerOutcome("failed", "skip: KeyboardInterrupt")
    except BaseException as exc:  # noqa: BLE001 - a plugin's skip() fails its own run
        return WorkerOutcome("failed", f"skip: {_reason(exc)}")
    if reason:
        return WorkerOutcome("skipped", str(reason))
    sm_info = None
    if "source_model" in cls.requires:
        # trained (or loaded from the cache) here, in the process that runs fit, from the Task's source data
        from .source_model import attach_source_model, cache_identity

        t_sm = time.perf_counter()
        try:
            recipe = spec.source_recipe or spec.pair.source_recipe.resolved(spec.pair.budget.steps,
                                                                            spec.pair.budget.batch_size)
            ident = cache_identity(pair=spec.pair.name, protocol=spec.pair.protocol.as_dict(),
                                   fingerprints=spec.pair.fingerprints(), seed=spec.seed,
                                   backbone=spec.backbone, shape=task.source_shape, n_classes=task.n_classes,
                                   recipe=recipe, device=request.device)
            with amp_context(request.device, spec.pair.protocol.amp):
                task, sm_info = attach_source_model(task, recipe=recipe, identity=ident,
                                                    cache_dir=request.source_model_dir)
        except KeyboardInterrupt:
            if not catch_interrupt:
                raise
            return WorkerOutcome("failed", "source model: KeyboardInterrupt", wall_time_s=time.perf_counter() - t_sm)
        except DataError as exc:  # an image of a streamed domain that cannot be decoded
            return WorkerOutcome("failed", str(exc), data_error=True)
        except BaseException as exc:  # noqa: BLE001 - fails this run only
            return WorkerOutcome("failed", f"source model: {_reason(exc)}", wall_time_s=time.perf_counter() - t_sm)
    from . import diagnostics

    import torch

    settings = {"threads": torch.get_num_threads(), "torch_version": torch.__version__}
    meter = MemoryMeter(request.device)
    t0 = time.perf_counter()
    wall = 0.0
    try:
        view, withheld = task_for_track(task, track)
        seed_everything(spec.seed)
        method = cls(**spec.params)
        with amp_context(request.device, spec.pair.protocol.amp):  # bf16 on CUDA when the suite asks; never on CPU
            with diagnostics.collect() as diag:
                predictor = method.fit(view)
                if track == "test-time":  # the host streams the target test inputs to the adapter
                    stream = run_stream(predictor, inputs.eval_target, seed=spec.seed,
                                        batch_size=spec.pair.budget.batch_size, n_classes=inputs.n_classes)
            if withheld:  # the method caught the TrackViolation and carried on: still a violation
                raise TrackViolation(f"the method reached for data the {track} track withholds "
                                     f"({', '.join(sorted(set(withheld)))}) and went on")
            wall = time.perf_counter() - t0
            if track == "test-time":
                target_pred, source_pred, scores = evaluate_stream_unlabelled(predictor, stream, inputs, view,
                                                                              registry.validators)
            else:
                target_pred, source_pred, scores = evaluate_unlabelled(predictor, inputs, view, registry.validators,
                                                                       extras_task=task)
    except DataError as exc:  # an image of a streamed domain that cannot be decoded: the data's fault
        return WorkerOutcome("failed", str(exc), data_error=True)
    except KeyboardInterrupt as exc:
        if not catch_interrupt:
            raise
        rss, gpu = meter.read()
        return WorkerOutcome("failed", _reason(exc), wall_time_s=time.perf_counter() - t0, rss_peak_mb=rss,
                             gpu_peak_mb=gpu, source_model=sm_info, **settings)
    except BaseException as exc:  # noqa: BLE001 - SystemExit & co. fail this run only
        import logging
        import traceback

        logging.getLogger("dabench").debug("run %s failed:\n%s", spec.key, traceback.format_exc())
        rss, gpu = meter.read()
        return WorkerOutcome("failed", _reason(exc), wall_time_s=time.perf_counter() - t0, rss_peak_mb=rss,
                             gpu_peak_mb=gpu, source_model=sm_info, **settings)
    for name, value in diag.items():
        scores.extras[f"diag_{name}"] = value
    if sm_info is not None:
        scores.extras["source_model"] = sm_info.key
        if sm_info.source_val_acc is not None:
            scores.extras["source_model_val_acc"] = sm_info.source_val_acc
    rss, gpu = meter.read()
    return WorkerOutcome("ok", None, target_pred, source_pred, scores, wall, rss, gpu, source_model=sm_info,
                         diagnostics=dict(diag), **settings)


def labelled_metrics(labels: SplitLabels, target_pred: np.ndarray,
                     source_pred: np.ndarray | None) -> dict[str, float | None]:
    """Target accuracy and macro-F1, and source accuracy, from predicted
    classes and the labels only the driver holds."""
    from .runner import PredictorError, macro_f1

    target_pred = np.asarray(target_pred)
    if target_pred.shape != labels.target_test.shape:
        raise PredictorError(f"the worker returned {target_pred.shape} target predictions for "
                             f"{labels.target_test.shape} test points")
    out: dict[str, float | None] = {
        "target_acc": float((target_pred == labels.target_test).mean()),
        "target_f1": macro_f1(labels.target_test, target_pred, labels.n_classes),
        "source_acc": None,
    }
    if source_pred is not None:
        acc = float((np.asarray(source_pred) == labels.source_test).mean())
        out["source_acc"] = acc if math.isfinite(acc) else None
    return out
