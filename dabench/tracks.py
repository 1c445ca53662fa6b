"""Tracks: what a method is given, and how the host evaluates it.

dabench runs methods under three settings (:data:`dabench.contract.TRACKS`,
declared by each method class as ``track``), all starting from the same
host-trained shared source model (:mod:`dabench.source_model`):

``uda``
    The Task holds labelled source train/val data and unlabelled target
    train inputs; ``fit`` returns a :class:`~dabench.Predictor` that the
    host evaluates on the target test split it keeps.

``source-free``
    The Task holds the shared source model and the unlabelled target train
    inputs, and **no source data at all**: ``source_train`` and
    ``source_val`` are :class:`Withheld` placeholders, and ``target_labeled``
    is None.  Reading a withheld field raises :class:`TrackViolation`; the
    host fails the run with that reason, also when the method catches the
    error and carries on (every access is recorded).  Evaluation as for
    ``uda``.

``test-time``
    The Task holds the shared source model only (source data and the target
    train split are withheld).  ``fit`` prepares and returns an
    :class:`~dabench.contract.OnlineAdapter`; the host then delivers the
    target **test** inputs as a stream (:func:`stream_order`: a permutation
    seeded by the run seed, in batches of the pair's ``budget.batch_size``,
    the last one possibly shorter), calling ``predict_batch`` once per batch
    and scoring the probabilities it returns against the labels it keeps
    (:func:`run_stream`).  A batch is never delivered before the previous
    one is predicted, and never twice: the predictions for a batch can only
    depend on that batch and the ones before it.

The verdict of every track is against the same reference: the untouched
shared source model (``source-only``), paired by seed.

**Validators and label-free statistics per track** (:func:`validator_view`):
a validator scores what the method could see.  Under ``source-free`` it
gets the method's own Task, so validators that need source data
(``source-val``, ``dev``) have no score (stored as missing; the leaderboard
then cannot select among several hyperparameter points by them: use
``entropy``, ``im``, ``snd`` or ``bnm``).  Under ``test-time`` it gets a
Task whose ``target_train`` holds the stream's inputs in stream order, with
a predictor (:class:`StreamedPredictor`) that answers with the predictions
the adapter actually returned online.  The host's label-free statistics
for the negative-transfer warning use the same predictions (the stream's
predicted class distribution); the point-by-point comparison with the
reference (``target_pred``) needs predictions on target train points and
is not recorded for test-time runs.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace
from typing import Any, Iterator

import numpy as np

from .contract import TRACKS, ContractError, Task, Unlabeled

__all__ = [
    "STREAM_SEED_STREAM",
    "input_batches",
    "StreamError",
    "StreamedPredictor",
    "TRACKS",
    "TrackViolation",
    "Withheld",
    "has_norm_layers",
    "norm_layers",
    "run_stream",
    "skip_without_norm_layers",
    "stream_order",
    "task_for_track",
    "validator_view",
]

#: The random stream (see :func:`dabench.training.stream_seed`) that orders the test-time stream.
STREAM_SEED_STREAM = 0x7E57


class TrackViolation(ContractError):
    """A method reached for data its track withholds; the run fails with this message."""


class StreamError(RuntimeError):
    """A test-time adapter answered a batch with something that is not a probability matrix."""


class Withheld:
    """Stands in a :class:`~dabench.Task` field that the task's track withholds.

    Any use (an attribute such as ``.X``, ``len()``, iteration, indexing,
    truthiness, conversion to an array) is recorded in the shared access log
    and raises :class:`TrackViolation` naming the field and the track.
    ``repr`` is allowed (tasks print).
    """

    __slots__ = ("_field", "_track", "_log")
    #: marks the class, for code that must not read a withheld field (``Task.streamed``)
    __dabench_withheld__ = True

    def __init__(self, field: str, track: str, log: list[str]) -> None:
        object.__setattr__(self, "_field", field)
        object.__setattr__(self, "_track", track)
        object.__setattr__(self, "_log", log)

    def _refuse(self, how: str) -> Any:
        field, track = object.__getattribute__(self, "_field"), object.__getattribute__(self, "_track")
        object.__getattribute__(self, "_log").append(f"task.{field}{how}")
        raise TrackViolation(
            f"the {track} track withholds task.{field} (reached for with {how or 'a read'}): "
            f"{TRACKS[track]}; use only what the task holds (task.source_model"
            + ("" if track == "test-time" else ", task.target_train") + ")")

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") and name.endswith("__"):  # protocol probes (copy, pickle, numpy)
            raise AttributeError(name)
        return self._refuse(f".{name}")

    def __setattr__(self, name: str, value: Any) -> None:
        if name in Withheld.__slots__:  # copy and pickle restore the slots
            object.__setattr__(self, name, value)
            return
        self._refuse(f".{name} = ...")

    def __len__(self) -> int:
        return self._refuse(" (len)")

    def __iter__(self):
        return self._refuse(" (iteration)")

    def __getitem__(self, key: Any) -> Any:
        return self._refuse(" (indexing)")

    def __bool__(self) -> bool:
        return self._refuse(" (truth test)")

    def __array__(self, *args: Any, **kwargs: Any) -> Any:
        return self._refuse(" (conversion to an array)")

    def __repr__(self) -> str:
        return f"<{object.__getattribute__(self, '_field')} withheld by the {object.__getattribute__(self, '_track')} track>"


def task_for_track(task: Task, track: str, log: list[str] | None = None) -> tuple[Task, list[str]]:
    """The Task a method of ``track`` sees, built from the host's full
    ``uda`` task (with the shared source model attached), and the access log
    its :class:`Withheld` fields write to (``log``, or a new list; empty
    while the method behaves).

    ``uda`` returns ``task`` itself.  The other tracks keep the source model
    (None before the host attached it, e.g. for ``Method.skip``) and the metadata (shapes, classes, device, seed, budget, backbone
    factory) and withhold the data the track does not give.
    """
    if track not in TRACKS:
        raise ContractError(f"unknown track {track!r}; known tracks: {list(TRACKS)}")
    log = [] if log is None else log
    if track == "uda":
        return task, log
    fields: dict[str, Any] = {
        "source_train": Withheld("source_train", track, log),
        "source_val": Withheld("source_val", track, log),
        "target_labeled": None,
        "target_train_labels": None,
        "track": track,
    }
    if track == "test-time":
        fields["target_train"] = Withheld("target_train", track, log)
    return replace(task, **fields), log


# ---------------------------------------------------------------- the test-time stream


def input_batches(X: Any, batch_size: int, *, rows: Any = None, device: Any = "cpu"
                  ) -> Iterator[tuple[Any, np.ndarray]]:
    """``(x, rows)`` batches of ``X`` (an array, or a streamed image domain
    decoded with its test transform by loader workers) in the order of
    ``rows`` (default ``0..n-1``): ``x`` a float32 ``(b, prod(shape))``
    tensor on ``device``, ``rows`` the indices it holds."""
    import torch

    from .data.stream import is_stream, stream_batches

    n = len(X)
    rows = np.arange(n) if rows is None else np.asarray(rows, dtype=np.int64)
    bs = max(1, int(batch_size))
    specs = [rows[i:i + bs] for i in range(0, len(rows), bs)]
    if is_stream(X):
        for xb, idx in stream_batches(X, [(r, None) for r in specs], mode="test", device=device):
            yield xb, idx.cpu().numpy()
        return
    A = np.asarray(X, dtype=np.float32)
    for r in specs:
        xb = np.array(A[r], copy=True)
        yield torch.from_numpy(xb.reshape(len(xb), -1)).to(device), r


def stream_order(n: int, seed: int) -> np.ndarray:
    """The order in which the ``n`` target test points are streamed for run
    seed ``seed`` (a permutation; the same for every method of that seed)."""
    from .training import stream_seed

    return np.random.default_rng(stream_seed(seed, STREAM_SEED_STREAM)).permutation(int(n))


def _checked_batch(p: Any, n: int, n_classes: int, i: int) -> np.ndarray:
    p = np.asarray(p, dtype=np.float64)
    if p.shape != (n, n_classes):
        raise StreamError(f"predict_batch returned shape {p.shape} for stream batch {i} of {n} inputs, "
                          f"expected {(n, n_classes)}")
    if not np.isfinite(p).all():
        raise StreamError(f"predict_batch returned non-finite values for stream batch {i}")
    if (p < -1e-6).any() or not np.allclose(p.sum(1), 1.0, atol=1e-3):
        raise StreamError(f"predict_batch rows are not probability distributions for stream batch {i} "
                          "(negative or not summing to 1); apply softmax to logits")
    return p


def run_stream(adapter: Any, X: np.ndarray, *, seed: int, batch_size: int, n_classes: int
               ) -> tuple[np.ndarray, np.ndarray]:
    """Feed ``X`` (the host's target test inputs) to a test-time ``adapter``
    batch by batch in :func:`stream_order`; return ``(proba, order)`` with
    ``proba[i]`` the prediction the adapter returned for ``X[i]`` (rows in
    the original order of ``X``) and ``order`` the stream order.

    Each batch is a fresh read-only copy, handed over once; the next batch
    is only formed after the adapter returned the predictions of this one.
    """
    predict = getattr(adapter, "predict_batch", None)
    if not callable(predict):
        raise ContractError(f"a test-time method's fit must return an OnlineAdapter with predict_batch(X); "
                            f"it returned {type(adapter).__name__}")
    n = len(X)
    order = stream_order(n, seed)
    proba = np.empty((n, n_classes), dtype=np.float64)
    # a streamed image domain is decoded batch by batch (test transform) as any array batch is copied
    for i, (x, idx) in enumerate(input_batches(X, batch_size, rows=order)):
        xb = x.numpy()
        xb.setflags(write=False)
        proba[idx] = _checked_batch(predict(xb), len(idx), n_classes, i)
    return proba, order


class StreamedPredictor:
    """The predictions a test-time adapter returned online, as a predictor
    for validators: ``predict_proba(X, "target")`` answers, row by row, with
    the prediction the stream produced for that input (rows are matched by
    their bytes, or by their image file for a streamed domain; an input that
    was not in the stream raises).  ``embed`` and the source domain go to the
    adapter's final state when it offers them.
    """

    def __init__(self, X_stream: Any, proba_stream: np.ndarray, adapter: Any) -> None:
        self._p = np.asarray(proba_stream, dtype=np.float64)
        self._adapter = adapter
        self._index = {k: i for i, k in enumerate(self._keys(X_stream))}

    @staticmethod
    def _keys(X: Any) -> list[Any]:
        from .data.stream import is_stream

        if is_stream(X):
            return list(X.files)
        A = np.asarray(X, dtype=np.float32).reshape(len(X), -1)
        return [hashlib.blake2b(np.ascontiguousarray(r).tobytes(), digest_size=16).digest() for r in A]

    def predict_proba(self, X: Any, domain: str = "target") -> np.ndarray:
        if domain != "target":
            return self._final("predict_proba", X, domain)
        try:
            rows = [self._index[k] for k in self._keys(X)]
        except KeyError:
            raise ValueError("these inputs were not in the test stream: a test-time run has predictions "
                             "only for the stream it adapted on") from None
        return self._p[np.asarray(rows, dtype=np.int64)].copy()

    def _final(self, fn: str, X: np.ndarray, domain: str) -> np.ndarray:
        f = getattr(self._adapter, fn, None)
        if not callable(f):
            raise ValueError(f"the test-time adapter has no {fn}(X, domain) for its state after the stream")
        return np.asarray(f(X, domain=domain))

    def embed(self, X: np.ndarray, domain: str = "target") -> np.ndarray:
        return self._final("embed", X, domain)


def validator_view(task: Task, track: str, *, stream_X: np.ndarray | None = None) -> Task:
    """The Task a validator scores a run with: the method's own view for
    ``uda`` and ``source-free`` (``task`` as given), and for ``test-time`` a
    view whose ``target_train`` holds the stream inputs in stream order
    (``stream_X``)."""
    if track != "test-time":
        return task
    if stream_X is None:
        raise ValueError("a test-time validator view needs the stream inputs")
    return replace(task, target_train=Unlabeled(stream_X))


# ---------------------------------------------------------------- normalisation layers


def norm_layers(module: Any) -> list[Any]:
    """The batch-normalisation layers of ``module`` (in registration order)."""
    from torch import nn

    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def has_norm_layers(task: Task) -> bool:
    """Whether the task's source model (or, before one is attached, a fresh
    network of the task's backbone) has batch-normalisation layers."""
    import torch

    if task.source_model is not None:
        encoder, _ = task.source_model.build("cpu")
    else:
        with torch.random.fork_rng(devices=[]):  # must not move the caller's RNG
            encoder, _ = task.backbone(task.source_shape)
    return bool(norm_layers(encoder))


def skip_without_norm_layers(task: Task, method: str) -> str | None:
    """The skip reason of a method that adapts normalisation layers (TENT,
    BN adaptation) when the source model has none, else None."""
    if has_norm_layers(task):
        return None
    return (f"{method} adapts batch-normalisation layers and this backbone has none: "
            f"use a -bn backbone (default-bn, mlp-bn, dann-mnist-bn, small-cnn-bn)")
