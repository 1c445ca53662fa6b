"""Validators: known answers for SND, BNM and DEV, and the registered plugins."""

from __future__ import annotations

import numpy as np
import pytest

from dabench.contract import Labeled, Unlabeled
from dabench.validators import (
    batch_nuclear_norm,
    dev_risk,
    domain_density_ratio,
    soft_neighbourhood_density,
)
from dabench_plugins import validators as plugin


def test_snd_higher_for_clustered_than_spread_points():
    rng = np.random.default_rng(0)
    centres = np.eye(4)
    clustered = centres[rng.integers(0, 4, 400)] + 0.01 * rng.standard_normal((400, 4))
    spread = rng.standard_normal((400, 4))
    assert soft_neighbourhood_density(clustered) > soft_neighbourhood_density(spread) + 0.5


def test_snd_known_value_for_identical_points():
    # all points equal: each point's neighbour distribution is uniform over the n - 1 others
    F = np.ones((11, 3))
    assert soft_neighbourhood_density(F) == pytest.approx(np.log(10))
    # scale does not matter (rows are normalised)
    assert soft_neighbourhood_density(5 * F) == pytest.approx(np.log(10))


def test_snd_temperature_sharpens():
    rng = np.random.default_rng(1)
    F = rng.standard_normal((200, 5))
    assert soft_neighbourhood_density(F, 0.05) < soft_neighbourhood_density(F, 1.0)


def test_bnm_maximal_for_confident_diverse_predictions():
    n, c = 60, 3
    diverse = np.eye(c)[np.arange(n) % c]
    collapsed = np.eye(c)[np.zeros(n, dtype=int)]
    uniform = np.full((n, c), 1.0 / c)
    assert batch_nuclear_norm(diverse) == pytest.approx(1.0)
    assert batch_nuclear_norm(collapsed) == pytest.approx(np.sqrt(n) / np.sqrt(n * c))
    assert batch_nuclear_norm(uniform) == pytest.approx(1.0 / c)  # rank one and unconfident: lowest
    assert batch_nuclear_norm(uniform) < batch_nuclear_norm(collapsed)
    soft = 0.7 * diverse + 0.3 / c
    assert batch_nuclear_norm(collapsed) < batch_nuclear_norm(soft) < batch_nuclear_norm(diverse)


def test_dev_equals_plain_loss_with_unit_weights():
    losses = np.array([0.1, 0.5, 2.0, 0.3])
    assert dev_risk(losses, np.ones(4)) == pytest.approx(losses.mean())


def test_dev_control_variate_is_exact_when_weighted_loss_is_linear_in_weights():
    # L = w * loss with loss = a + b / w is linear in w, so the control variate removes all
    # variance: the estimate is exactly E[L] evaluated at mean(w) = 1, i.e. a + b.
    rng = np.random.default_rng(2)
    w = rng.uniform(0.2, 3.0, 500)
    a, b = 0.4, 0.25
    losses = a + b / w
    plain = (w * losses).mean()  # a * mean(w) + b, off when mean(w) != 1
    assert plain != pytest.approx(a + b)
    assert dev_risk(losses, w) == pytest.approx(a + b)


def test_dev_rejects_bad_weights():
    with pytest.raises(ValueError, match="non-negative"):
        dev_risk(np.ones(3), np.array([1.0, -1.0, 1.0]))
    with pytest.raises(ValueError, match="one length"):
        dev_risk(np.ones(3), np.ones(2))


def test_density_ratio_from_domain_classifier():
    rng = np.random.default_rng(3)
    S = rng.normal(0.0, 1.0, (3000, 1))
    T = rng.normal(1.0, 1.0, (3000, 1))
    at = np.array([[-1.0], [0.5], [2.0]])
    w = domain_density_ratio(S, T, at)
    true = np.exp(at[:, 0] - 0.5)  # N(1,1) / N(0,1) = exp(x - 1/2)
    assert np.allclose(w, true, rtol=0.2)


class _Pred:
    """A fixed linear-softmax predictor (embedding = input)."""

    def __init__(self, weights=None):
        self.W = np.array([[3.0, -3.0], [-3.0, 3.0]])
        if weights is not None:
            self.importance_weights = weights

    def predict_proba(self, X, domain="target"):
        z = np.asarray(X, dtype=np.float64)[:, :2] @ self.W
        z -= z.max(1, keepdims=True)
        p = np.exp(z)
        return p / p.sum(1, keepdims=True)

    def embed(self, X, domain="target"):
        return np.asarray(X, dtype=np.float64)


class _Task:
    def __init__(self, seed=0):
        rng = np.random.default_rng(seed)
        y = rng.integers(0, 2, 400)
        X = (np.eye(2)[y] + 0.3 * rng.standard_normal((400, 2))).astype(np.float32)
        self.source_train = Labeled(X[:200], y[:200])
        self.source_val = Labeled(X[200:], y[200:])
        self.target_train = Unlabeled((X[:300] + 0.5).astype(np.float32))
        self.seed = seed


def test_dev_uses_the_predictors_importance_weights_when_offered():
    task = _Task()
    pred = _Pred()
    p = pred.predict_proba(task.source_val.X)
    losses = -np.log(p[np.arange(len(p)), task.source_val.y])
    calls = []

    def unit(X):
        calls.append(len(X))
        return np.ones(len(X))

    assert plugin._dev(_Pred(unit), task) == pytest.approx(-losses.mean())
    assert calls == [len(task.source_val.X)]
    # without them, a domain classifier on the embeddings gives non-uniform weights
    assert plugin._dev(pred, task) != pytest.approx(-losses.mean())
    bad = _Pred(lambda X: np.ones(3))
    with pytest.raises(ValueError, match="importance_weights returned shape"):
        plugin._dev(bad, task)


def test_registered_validators_score_a_real_predictor(registry):
    for name in ("snd", "dev", "bnm", "source-val", "entropy", "im"):
        assert name in registry.validators, name
        assert registry.validators[name].paper
    task = _Task()
    scores = {n: registry.validators[n].score(_Pred(), task) for n in ("snd", "dev", "bnm")}
    assert all(np.isfinite(v) for v in scores.values())
    assert scores["dev"] < 0  # minus a risk
    assert 0 < scores["bnm"] <= 1
