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


def _rows_normalised(F: np.ndarray) -> np.ndarray:
    F = np.asarray(F, dtype=np.float64).reshape(len(F), -1)
    return F / np.maximum(np.linalg.norm(F, axis=1, keepdims=True), 1e-12)


def soft_neighbourhood_density(F: np.ndarray, temperature: float = 0.05) -> float:
    """SND of Saito et al., ICCV 2021, Eq. 1-3: the mean entropy of each
    point's soft-neighbour distribution.

    Rows of ``F`` are L2-normalised; ``M_ij`` is their cosine similarity,
    ``P_ij = softmax_j(M_ij / temperature)`` over ``j != i``, and SND is the
    mean over ``i`` of ``H(P_i)``.  Higher means points have many close
    neighbours (dense, well-clustered outputs), which the paper finds to
    indicate a good adaptation model.
    """
    F = _rows_normalised(F)
    n = len(F)
    if n < 2:
        raise ValueError("SND needs at least 2 points")
    M = (F @ F.T) / float(temperature)
    np.fill_diagonal(M, -np.inf)
    M -= M.max(axis=1, keepdims=True)
    P = np.exp(M)
    P /= P.sum(axis=1, keepdims=True)
    return float(entropy(P, axis=1).mean())


def batch_nuclear_norm(P: np.ndarray) -> float:
    """BNM (Cui et al., CVPR 2020): the nuclear norm of the prediction matrix
    ``P`` (n × C, probability rows), normalised to [0, 1] by its maximum
    ``sqrt(n · min(n, C))``.

    The paper maximises ``||P||_* / n`` because it bounds from below both
    prediction confidence (Frobenius norm) and diversity (rank); the maximum,
    1 here, is reached by confident (one-hot) predictions spread evenly
    over the classes.  Our normalisation only rescales it so that values are
    comparable across sample sizes.
    """
    P = np.asarray(P, dtype=np.float64)
    n, c = P.shape
    if n == 0:
        raise ValueError("BNM needs at least one prediction")
    return float(np.linalg.svd(P, compute_uv=False).sum() / np.sqrt(n * min(n, c)))


def dev_risk(losses: np.ndarray, weights: np.ndarray) -> float:
    """Deep Embedded Validation risk (You et al., ICML 2019, Algorithm 1).

    ``losses`` are per-sample validation losses on held-out *source* data,
    ``weights`` the density ratios ``p_t(x) / p_s(x)`` at those points.  With
    ``L = w · loss``, the control-variate estimate is
    ``mean(L) + eta · mean(w) - eta`` with ``eta = -Cov(L, w) / Var(w)``
    (``mean(w)`` should be 1, so the control variate reduces variance
    without bias).  When the weights do not vary (``Var(w) = 0``) there is
    nothing to control for and ``eta = 0``.  Lower is better.
    """
    losses = np.asarray(losses, dtype=np.float64).ravel()
    w = np.asarray(weights, dtype=np.float64).ravel()
    if losses.shape != w.shape or len(w) == 0:
        raise ValueError(f"losses and weights must be non-empty and of one length, got {losses.shape}, {w.shape}")
    if not (np.isfinite(w).all() and (w >= 0).all()):
        raise ValueError("importance weights must be finite and non-negative")
    L = w * losses
    var = float(w.var(ddof=1)) if len(w) > 1 else 0.0
    if var <= 1e-12 * max(1.0, float(np.mean(w)) ** 2):
        eta = 0.0
    else:
        cov = float(np.cov(np.vstack([L, w]), ddof=1)[0, 1])
        eta = -cov / var
    return float(L.mean() + eta * w.mean() - eta)


def domain_density_ratio(
    source_fit: np.ndarray, target_fit: np.ndarray, at: np.ndarray, *, seed: int = 0, max_fit: int = 2000
) -> np.ndarray:
    """``p_t(x) / p_s(x)`` at the points ``at`` from a domain classifier.

    Logistic regression on standardised features separates ``source_fit``
    (label 0) from ``target_fit`` (label 1), each subsampled (seeded) to at
    most ``max_fit`` rows; with ``d(x) = P(target | x)`` the ratio is
    ``(n_s / n_t) · d / (1 - d)`` (You et al. 2019, Sec. 4.2, who also use a
    discriminative domain classifier).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(seed)

    def sub(A: np.ndarray) -> np.ndarray:
        A = np.asarray(A, dtype=np.float64).reshape(len(A), -1)
        return A[rng.choice(len(A), max_fit, replace=False)] if len(A) > max_fit else A

    S, T = sub(source_fit), sub(target_fit)
    X = np.vstack([S, T])
    y = np.r_[np.zeros(len(S)), np.ones(len(T))]
    scaler = StandardScaler().fit(X)
    clf = LogisticRegression(C=1.0, max_iter=1000).fit(scaler.transform(X), y)
    A = np.asarray(at, dtype=np.float64).reshape(len(at), -1)
    d = np.clip(clf.predict_proba(scaler.transform(A))[:, 1], 1e-6, 1 - 1e-6)
    return (len(S) / len(T)) * d / (1.0 - d)
