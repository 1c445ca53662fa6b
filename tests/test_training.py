"""The shared training helpers: batches, schedules, the gradient reversal layer, the predictor."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from dabench.training import (
    DivergedError,
    TensorBatches,
    TorchPredictor,
    annealed_lr,
    check_finite,
    grad_reverse,
    grl_lambda,
    progress,
    resolve_device,
    stream_seed,
)


def test_grl_is_identity_forward_and_negated_scaled_gradient_backward():
    x = torch.randn(5, 3, requires_grad=True)
    y = grad_reverse(x, 0.7)
    assert torch.equal(y, x)
    y.sum().backward()
    assert torch.allclose(x.grad, torch.full_like(x, -0.7))


def test_published_schedules():
    # Ganin et al. 2016, Sec. 5.2.2: lambda_p = 2/(1+exp(-10p)) - 1, mu_p = mu0/(1+10p)^0.75
    assert grl_lambda(0.0) == 0.0
    assert grl_lambda(0.5) == pytest.approx(2 / (1 + math.exp(-5)) - 1)
    assert grl_lambda(1.0, max_value=0.3) == pytest.approx(0.3 * (2 / (1 + math.exp(-10)) - 1))
    assert annealed_lr(0.0, 0.01) == 0.01
    assert annealed_lr(1.0, 0.01) == pytest.approx(0.01 / 11 ** 0.75)
    assert progress(0, 100) == 0.0 and progress(99, 100) == 1.0 and progress(0, 1) == 0.0


def test_batches_cover_every_row_once_per_epoch_and_are_seeded():
    X = np.arange(10, dtype=np.float32)[:, None]
    y = np.arange(10)
    a = TensorBatches(X, y, batch_size=5, seed=3)
    seen = torch.cat([a.next().index for _ in range(2)])
    assert sorted(seen.tolist()) == list(range(10))
    b = TensorBatches(X, y, batch_size=5, seed=3)
    c = TensorBatches(X, y, batch_size=5, seed=4)
    first_b = [b.next().index.tolist() for _ in range(4)]
    first_c = [c.next().index.tolist() for _ in range(4)]
    a2 = TensorBatches(X, y, batch_size=5, seed=3)
    assert first_b == [a2.next().index.tolist() for _ in range(4)]
    assert first_b != first_c
    batch = TensorBatches(X, y, batch_size=4, seed=0).next()
    assert torch.equal(batch.x[:, 0].long(), batch.y)  # rows and labels stay together
    assert len(TensorBatches(X, batch_size=4)) == 2
    assert [len(bt.index) for bt in TensorBatches(X, batch_size=4, drop_last=False).epoch()] == [4, 4, 2]
    assert TensorBatches(X, batch_size=50).batch_size == 10
    with pytest.raises(ValueError, match="y has 3"):
        TensorBatches(X, y[:3], batch_size=2)
    assert stream_seed(0, 1) != stream_seed(0, 2) and stream_seed(0, 1) == stream_seed(0, 1)


def test_check_finite_and_device_errors():
    check_finite(torch.tensor(1.0), 0)
    check_finite(float("nan"), 3, every=2)  # not a checking step
    with pytest.raises(DivergedError, match="step 4"):
        check_finite(torch.tensor(float("nan")), 4, every=2)
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--device cpu"):
            resolve_device("cuda")


def test_predictor_outputs_probabilities_and_per_domain_encoders():
    torch.manual_seed(0)
    enc_s, enc_t, head = nn.Linear(4, 3), nn.Linear(6, 3), nn.Linear(3, 2)
    pred = TorchPredictor({"source": enc_s, "target": enc_t}, head, batch_size=7)
    p = pred.predict_proba(np.random.rand(20, 6), "target")
    assert p.shape == (20, 2) and np.allclose(p.sum(1), 1) and (p >= 0).all()
    assert pred.embed(np.random.rand(9, 4), "source").shape == (9, 3)
    assert pred.predict_proba(np.zeros((0, 6)), "target").shape == (0, 2)
    with pytest.raises(ValueError, match="domain"):
        pred.predict_proba(np.zeros((1, 6)), "both")
    only_t = TorchPredictor({"target": enc_t}, head)
    with pytest.raises(ValueError, match="no encoder for the source"):
        only_t.embed(np.zeros((1, 4)), "source")
    with torch.no_grad():
        head.weight.fill_(float("nan"))
    with pytest.raises(DivergedError):
        pred.predict_proba(np.random.rand(3, 6), "target")


def test_one_pass_for_proba_and_embedding_and_memoised_evaluation():
    """``predict_proba_and_embed`` equals the two separate calls, and the
    evaluation wrapper runs the encoder once per (array, domain), however many
    validators ask for it."""
    from dabench.runner import _MemoPredictor

    calls = []

    class Counting(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            calls.append(len(x))
            return torch.relu(self.lin(x))

    torch.manual_seed(0)
    pred = TorchPredictor(Counting(), nn.Linear(3, 2), batch_size=7)
    X = np.random.default_rng(0).normal(size=(20, 4)).astype(np.float32)
    p, z = pred.predict_proba_and_embed(X)
    np.testing.assert_array_equal(p, pred.predict_proba(X))
    np.testing.assert_array_equal(z, pred.embed(X))
    assert p.dtype == np.float64 and np.allclose(p.sum(1), 1.0)

    calls.clear()
    memo = _MemoPredictor(pred)
    for _ in range(3):
        np.testing.assert_array_equal(memo.predict_proba(X), p)
        np.testing.assert_array_equal(memo.embed(X), z)
    assert sum(calls) == len(X)  # one pass over X (in batches of 7) for all six calls
    memo.predict_proba(X, domain="source")
    assert sum(calls) == 2 * len(X)  # another domain is another pass
    out = memo.predict_proba(X)
    out[:] = 0  # callers get copies: the memo cannot be corrupted
    np.testing.assert_array_equal(memo.predict_proba(X), p)
