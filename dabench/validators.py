"""Validators: scores that choose hyperparameters without target labels.

A validator is any object with a ``name``, a ``paper`` and a
``score(predictor, task) -> float`` method (higher is better).  It sees what a
method sees (a :class:`dabench.Task`), never target test labels.  Plugins
register validators through the ``dabench_validators`` hook.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from .contract import Predictor, Task


@dataclass(frozen=True)
class Validator:
    name: str
    score_fn: Callable[[Predictor, Task], float]
    paper: str = ""
    description: str = ""

    def score(self, predictor: Predictor, task: Task) -> float:
        return float(self.score_fn(predictor, task))


def entropy(p: np.ndarray, axis: int = -1) -> np.ndarray:
    """Shannon entropy (nats) of probability rows."""
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-12, 1.0)
    return -(p * np.log(p)).sum(axis=axis)
