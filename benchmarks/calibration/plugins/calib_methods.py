"""Throw-away methods for calibrating the negative-transfer verdict (not
built-in plugins: the calibration loads this file with ``--plugins-dir``).

- ``calib-null``: the pair's reference method under another name, trained
  with its own independent seed stream (``stream_seed(seed, 0xCA11B)``) on
  the same data split: where the reference is ``source-only`` it is the
  shared source model's recipe (:func:`dabench.source_model.train_source_model`)
  at another seed; where it is ``target-only-k`` (labelled target samples or
  native feature spaces) it is that plugin at another seed.  It differs from
  the reference by training noise only, so a calibrated test flags it in at
  most ``alpha`` of the cells.
- ``calib-planted``: the same model (same seed stream, so the same weights),
  whose target predictions are changed, on a fraction ``flip`` of the target
  inputs chosen by a hash of the input (no label used), to the class the
  model finds least likely: a known loss of about ``flip x accuracy`` points
  (for two classes ``flip x (2 accuracy - 1)``, a wrong prediction turned
  right); source predictions are untouched.  The calibration chooses ``flip``
  per pair for a loss of about 5 points and measures the exact loss with
  labels (planted minus null, same weights).

The two share trained models in-process (runs are ordered pair, seed,
method), so the planted effect costs no training.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import replace
from typing import Any

import numpy as np

from dabench import Float, Method, Task, hookimpl
from dabench.source_model import SourceModel, SourceRecipe, train_source_model
from dabench.training import TorchPredictor, stream_seed

NULL_STREAM = 0xCA11B
_CACHE: "OrderedDict[tuple, TorchPredictor]" = OrderedDict()


def _digest(task: Task) -> str:
    h = hashlib.sha256()
    for part in (task.source_train.X, task.source_train.y, task.target_train.X):
        h.update(np.ascontiguousarray(part).tobytes())
    if task.target_labeled is not None:
        h.update(np.ascontiguousarray(task.target_labeled.X).tobytes())
        h.update(np.ascontiguousarray(task.target_labeled.y).tobytes())
    return h.hexdigest()


def _null_model(task: Task, lr: float, weight_decay: float) -> TorchPredictor:
    """The reference's model at the null seed stream (cached per task)."""
    use_k = task.target_labeled is not None or not task.same_feature_space
    seed = stream_seed(task.seed, NULL_STREAM)
    key = (_digest(task), task.seed, use_k, lr, weight_decay, task.budget.steps, task.budget.batch_size,
           task.device)
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    other = replace(task, seed=seed)
    if use_k:
        from dabench_plugins.target_only_k import TargetOnlyK

        pred = TargetOnlyK(lr=lr, weight_decay=weight_decay).fit(other)
    else:
        recipe = SourceRecipe(lr=lr, weight_decay=weight_decay).resolved(task.budget.steps, task.budget.batch_size)
        state, acc = train_source_model(other, recipe)
        pred = SourceModel(state, task.backbone, task.source_shape, task.n_classes, recipe, "calib-null", acc,
                           task.device).predictor(task.device)
    _CACHE[key] = pred
    while len(_CACHE) > 4:
        _CACHE.popitem(last=False)
    return pred


class _Planted:
    """A predictor whose target predictions are turned to the least likely
    class on the inputs whose hash (with ``seed``) falls below ``flip``."""

    def __init__(self, inner: Any, flip: float, seed: int) -> None:
        self._inner, self.flip, self._key = inner, float(flip), int(seed).to_bytes(8, "little", signed=False)

    def _chosen(self, X: np.ndarray) -> np.ndarray:
        rows = np.ascontiguousarray(np.asarray(X).reshape(len(X), -1))
        u = [int.from_bytes(hashlib.blake2b(r.tobytes(), digest_size=8, key=self._key).digest(), "little") / 2**64
             for r in rows]
        return np.asarray(u) < self.flip

    def predict_proba(self, X: Any, domain: str = "target") -> np.ndarray:
        p = np.array(self._inner.predict_proba(X, domain=domain), dtype=np.float64)
        if domain != "target" or self.flip <= 0:
            return p
        idx = np.flatnonzero(self._chosen(X))
        hi, lo = p[idx].argmax(1), p[idx].argmin(1)
        a, b = p[idx, hi].copy(), p[idx, lo].copy()
        p[idx, hi], p[idx, lo] = b, a  # swap: the least likely class becomes the prediction
        return p

    def embed(self, X: Any, domain: str = "target") -> np.ndarray:
        return self._inner.embed(X, domain=domain)


_HP = {
    "lr": Float(0.01, 1e-3, 0.1, log=True, help="the reference's learning rate (set it to the suite's)"),
    "weight_decay": Float(5e-4, 1e-6, 1e-2, log=True, help="the reference's weight decay"),
}


class CalibNull(Method):
    """The pair's reference at an independent seed stream (training noise only)."""

    name = "calib-null"
    family = "baseline"
    version = "1"
    paper = "Calibration null for the negative-transfer verdict (dabench benchmarks/calibration)"
    hyperparameters = dict(_HP)

    def fit(self, task: Task) -> TorchPredictor:
        return _null_model(task, self.lr, self.weight_decay)


class CalibPlanted(Method):
    """``calib-null`` with a planted target-accuracy loss."""

    name = "calib-planted"
    family = "baseline"
    version = "1"
    paper = "Calibration planted effect for the negative-transfer verdict (dabench benchmarks/calibration)"
    hyperparameters = {**_HP, "flip": Float(0.05, 0.0, 1.0, help="fraction of target inputs whose prediction "
                                                               "is turned to the least likely class")}

    def fit(self, task: Task) -> _Planted:
        return _Planted(_null_model(task, self.lr, self.weight_decay), self.flip,
                        stream_seed(task.seed, NULL_STREAM + 1))


@hookimpl
def dabench_methods(register) -> None:  # type: ignore[no-untyped-def]
    register(CalibNull)
    register(CalibPlanted)
