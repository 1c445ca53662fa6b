"""Instance reweighting (iw-discriminative, iw-kliep), the target-only-k baseline
and the heterogeneous methods (stn, gw-hda): their distinctive mechanisms."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import make_task

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _gauss_ratio(X, mu_t, sd_t):
    """p_t / p_s for p_s = N(0, I), p_t = N(mu_t, sd_t^2 I), normalised to mean 1 on X."""
    d = X.shape[1]
    log_t = -0.5 * (((X - mu_t) / sd_t) ** 2).sum(1) - d * np.log(sd_t)
    log_s = -0.5 * (X**2).sum(1)
    r = np.exp(log_t - log_s)
    return r / r.mean()


# ------------------------------------------------------------ density ratios


@pytest.mark.parametrize("dim", [1, 2])
@pytest.mark.parametrize("estimator,sd_t", [("logreg", 1.0), ("logreg-quadratic", 0.7), ("kliep", 0.7)])
def test_density_ratio_recovers_a_known_gaussian_ratio(dim, estimator, sd_t):
    """Source N(0, I), target N(0.5, sd^2 I): the estimated weights (normalised to
    mean 1, no clipping) match the true ratio: correlation > 0.95 and median
    relative error < 15 %.  The linear logistic model is exact for equal
    variances; with unequal ones the log-ratio is quadratic."""
    from dabench_plugins.reweighting import DiscriminativeRatio, ImportanceWeights, KLIEPRatio

    rng = np.random.default_rng(dim)
    Xs = rng.standard_normal((1000, dim))
    Xt = 0.5 + sd_t * rng.standard_normal((1000, dim))
    est = {"logreg": DiscriminativeRatio(C=1.0), "logreg-quadratic": DiscriminativeRatio(C=1.0, quadratic=True),
           "kliep": KLIEPRatio(seed=0)}[estimator].fit(Xs, Xt)
    w = ImportanceWeights(est, Xs, power=1.0, clip=1e6)(Xs)
    true = _gauss_ratio(Xs, 0.5, sd_t)
    assert np.corrcoef(w, true)[0, 1] > 0.95
    assert np.median(np.abs(w - true) / true) < 0.15


def test_kliep_ascent_raises_the_target_likelihood():
    """KLIEP's projected ascent (Sugiyama et al. 2008) keeps b.alpha = 1, alpha >= 0
    and ends with a higher target log-likelihood than the uniform start."""
    from dabench_plugins.reweighting import kliep_alpha

    rng = np.random.default_rng(0)
    xs, xt = rng.standard_normal((300, 1)), 1.0 + 0.5 * rng.standard_normal((200, 1))
    c = xt[:50]
    A = np.exp(-((xt - c.T) ** 2) / 2)
    b = np.exp(-((xs - c.T) ** 2) / 2).mean(0)
    alpha = kliep_alpha(A, b)
    uniform = np.ones(50) / b.sum()
    assert alpha.min() >= 0 and abs(b @ alpha - 1) < 1e-9
    assert np.mean(np.log(A @ alpha)) > np.mean(np.log(A @ uniform)) + 0.05


def test_flattening_and_clipping_shape_the_weights():
    from dabench_plugins.reweighting import DiscriminativeRatio, ImportanceWeights

    rng = np.random.default_rng(1)
    Xs, Xt = rng.standard_normal((500, 2)), 1.5 + rng.standard_normal((500, 2))
    est = DiscriminativeRatio().fit(Xs, Xt)
    plain = ImportanceWeights(est, Xs, 1.0, 1e6)(Xs)
    clipped = ImportanceWeights(est, Xs, 1.0, 3.0)(Xs)
    flat = ImportanceWeights(est, Xs, 0.0, 10.0)(Xs)
    assert abs(plain.mean() - 1) < 1e-4 and abs(clipped.mean() - 1) < 1e-4
    assert plain.max() > 3 * 1.5 and clipped.max() <= 3.0 / np.minimum(plain, 3.0).mean() + 1e-4
    assert np.allclose(flat, 1.0)  # power 0: no reweighting at all


@pytest.mark.parametrize("name", ["iw-discriminative", "iw-kliep"])
def test_predictor_exposes_the_training_weights(registry, name):
    """The agreed validator interface: importance_weights(X) at source inputs,
    shape (n,), non-negative, mean 1 over source train, higher where the target is."""
    from dabench.training import TorchPredictor

    task, split = make_task(registry, "covshift-source:covshift-target", steps=5, max_source=600, max_target=600)
    pred = registry.methods[name](clip=20.0).fit(task)
    assert isinstance(pred, TorchPredictor)
    w = pred.importance_weights(task.source_train.X)
    assert w.shape == (len(task.source_train),) and (w >= 0).all()
    assert abs(float(w.mean()) - 1.0) < 1e-3 and w.std() > 0.05
    wv = pred.importance_weights(task.source_val.X)
    assert wv.shape == (len(task.source_val),) and np.isfinite(wv).all()
    # source points nearer the target mean get more weight
    mu_t = task.target_train.X.mean(0)
    dist = np.linalg.norm(task.source_train.X - mu_t, axis=1)
    assert np.corrcoef(w, -dist)[0, 1] > 0.3


def test_power_zero_is_exactly_source_only_and_weights_change_the_model(registry):
    """The weighted cross-entropy is the only difference from source-only:
    with power 0 (all weights 1) the predictions are bit-identical."""
    task, split = make_task(registry, "covshift-source:covshift-target", steps=40)
    X = split.target_test.X
    from dabench.source_model import SourceRecipe, with_source_model

    # source-only is the host's source model, trained by the same supervised loop
    so = registry.methods["source-only"]().fit(with_source_model(task, SourceRecipe(lr=0.03))).predict_proba(X)
    flat = registry.methods["iw-discriminative"](lr=0.03, power=0.0).fit(task).predict_proba(X)
    full = registry.methods["iw-discriminative"](lr=0.03, power=1.0).fit(task).predict_proba(X)
    assert np.array_equal(so, flat)
    assert not np.allclose(so, full, atol=1e-3)


def test_reweighting_leaves_weights_near_one_without_shift(registry):
    """When source and target are drawn from the same p(x) (here the covariate-shift
    source split against itself) the estimated ratio is close to 1 everywhere."""
    task, _ = make_task(registry, "covshift-source:covshift-source", steps=1)
    from dabench_plugins.reweighting import IWKLIEP

    w = IWKLIEP().estimate(task)(task.source_train.X)
    assert np.percentile(np.abs(w - 1), 90) < 0.35


def test_importing_the_plugins_leaves_sklearn_metadata_routing_off():
    """skada switches scikit-learn's metadata routing on globally when imported;
    these plugins must neither import it nor change the setting."""
    code = ("import sys, sklearn; from dabench.plugins import get_registry; r = get_registry(); "
            "import dabench_plugins.reweighting, dabench_plugins.heterogeneous, dabench_plugins.target_only_k; "
            "assert {'iw-discriminative', 'iw-kliep', 'stn', 'gw-hda', 'target-only-k'} <= set(r.methods); "
            "print(sklearn.get_config()['enable_metadata_routing'], 'skada' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False False"


# ------------------------------------------------------------ target-only-k


def test_target_only_k_skips_without_labels_and_ignores_the_source(registry):
    cls = registry.methods["target-only-k"]
    plain, _ = make_task(registry, "digits:mnist", steps=1, feature_space="native", max_target=300, max_source=300)
    assert "k_target" in cls.skip(plain)
    task, split = make_task(registry, "digits:mnist", steps=30, feature_space="native", k_target=2,
                            max_target=300, max_source=300)
    assert cls.skip(task) is None and len(task.target_labeled) == 20
    X = split.target_test.X
    a = cls().fit(task).predict_proba(X)
    # scrambled source labels and inputs: a target-only model must not notice
    rng = np.random.default_rng(0)
    from dabench.contract import Labeled

    noisy = dataclasses.replace(task, source_train=Labeled(rng.random(task.source_train.X.shape),
                                                           rng.permutation(task.source_train.y)))
    b = cls().fit(noisy).predict_proba(X)
    assert np.array_equal(a, b)
    with pytest.raises(ValueError, match="source"):
        cls().fit(task).predict_proba(task.source_train.X, domain="source")


def test_runner_reports_no_source_accuracy_for_a_target_only_model_on_a_native_pair(registry):
    from dabench.runner import evaluate

    task, split = make_task(registry, "digits:mnist", steps=3, feature_space="native", k_target=1,
                            max_target=200, max_source=200)
    pred = registry.methods["target-only-k"]().fit(task)
    metrics, _ = evaluate(pred, split, task, {})
    assert metrics["source_acc"] is None and 0 <= metrics["target_acc"] <= 1


def test_weight_ess_and_reweighting_health_signals(registry):
    """ESS / n is 1 for uniform weights and about 1/n when one sample carries
    them; on the covariate-shift pair the estimated weights are far from
    uniform, so reweighting engaged."""
    from dabench import diagnostics
    from dabench_plugins.reweighting import weight_ess

    assert weight_ess(np.ones(50)) == pytest.approx(1.0)
    assert weight_ess(np.r_[100.0, np.full(99, 1e-9)]) == pytest.approx(0.01, rel=1e-3)
    assert weight_ess(np.r_[np.ones(50), 3 * np.ones(50)]) == pytest.approx(16 / 20)
    task, _ = make_task(registry, "covshift-source:covshift-target", steps=5)
    with diagnostics.collect() as diag:
        registry.methods["iw-discriminative"]().fit(task)
    assert 0 < diag["weight_ess"] < 0.9 and diag["weight_max"] > 1 and diag["engaged"] == 1.0


# ------------------------------------------------------------ heterogeneous


def test_stn_encoders_take_different_input_dims_into_one_latent_space(registry):
    task, split = make_task(registry, "digits:mnist", steps=4, feature_space="native", k_target=1,
                            max_target=300, max_source=300)
    assert not task.same_feature_space and task.source_dim == 64 and task.target_dim == 784
    pred = registry.methods["stn"](latent_dim=32).fit(task)
    zs = pred.embed(split.source_test.X, "source")
    zt = pred.embed(split.target_test.X, "target")
    assert zs.shape == (len(split.source_test), 32) and zt.shape == (len(split.target_test), 32)
    assert pred.predict_proba(split.source_test.X, "source").shape == (len(split.source_test), 10)
    assert pred.predict_proba(split.target_test.X, "target").shape == (len(split.target_test), 10)


def test_soft_mmd_matches_class_means_through_soft_labels():
    """Zero when the target's (soft-)labelled class means equal the source's;
    positive when the soft labels assign the target clusters to the wrong class;
    its gradient moves the target features toward their class's source mean."""
    from dabench_plugins.heterogeneous import soft_mmd

    torch.manual_seed(0)
    means = torch.tensor([[0.0, 0.0], [4.0, 0.0], [0.0, 4.0]])
    ys = torch.arange(3).repeat_interleave(10)
    zs = means[ys]
    zt = means[torch.arange(3).repeat_interleave(5)].clone().requires_grad_(True)
    right = torch.nn.functional.one_hot(torch.arange(3).repeat_interleave(5), 3).float()
    wrong = right[:, [1, 2, 0]]
    assert soft_mmd(zs, ys, zt, right, 3).item() < 1e-10
    assert soft_mmd(zs, ys, zt, wrong, 3).item() > 1.0
    shifted = (zt.detach() + torch.tensor([1.0, -1.0])).requires_grad_(True)
    loss = soft_mmd(zs, ys, shifted, 0.8 * right + 0.2 / 3, 3)
    loss.backward()
    step = shifted.detach() - 0.1 * shifted.grad
    assert soft_mmd(zs, ys, step, 0.8 * right + 0.2 / 3, 3) < loss.detach()


def test_gw_recovers_a_rotation_embedded_in_another_dimension():
    """Two point clouds, one a rotated copy of the other embedded in 5-d and
    shuffled: the GW coupling is the inverse permutation, and labels carried
    through it are right."""
    from dabench_plugins.heterogeneous import gw_coupling, intra_costs, transport_labels

    rng = np.random.default_rng(0)
    centres = np.array([[0.0, 0.0], [3.0, 0.0], [0.0, 5.0]])
    ys = rng.integers(0, 3, 60)
    Xs = centres[ys] + 0.6 * rng.standard_normal((60, 2))
    theta = 0.7
    R = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    Q, _ = np.linalg.qr(rng.standard_normal((5, 5)))
    perm = rng.permutation(60)
    Xt = (np.hstack([Xs @ R.T, np.zeros((60, 3))]) @ Q.T)[perm]
    for geometry in ("euclidean", "geodesic"):
        T = gw_coupling(intra_costs(Xs, geometry, knn=8), intra_costs(Xt, geometry, knn=8))
        assert (T.argmax(0)[np.argsort(perm)] == np.arange(60)).mean() > 0.9, geometry
        q = transport_labels(T, ys, 3)
        assert (q.argmax(1) == ys[perm]).mean() > 0.9, geometry


def test_ssot_labelled_target_samples_decide_a_symmetric_coupling():
    """Two mirror-image classes: swapping them is an isometry, so GW alone cannot
    tell which target blob is which (here it picks the swap).  With a few
    labelled target samples in the coupling (SSOT's label term) the transported
    labels are right, and they follow the labels given (flipped labels, flipped
    transport): the labels, not chance, decide."""
    from dabench_plugins.heterogeneous import gw_coupling, intra_costs, label_cost, transport_labels

    rng = np.random.default_rng(0)
    n, k = 60, 3
    ys = np.repeat([0, 1], n // 2)
    Xs = np.c_[np.where(ys == 0, -2.0, 2.0), np.zeros(n)] + 0.5 * rng.standard_normal((n, 2))
    yt = rng.permutation(ys)
    Q, _ = np.linalg.qr(rng.standard_normal((3, 3)))
    Xt = np.c_[np.where(yt == 0, -2.0, 2.0), np.zeros(n), np.zeros(n)] + np.c_[0.5 * rng.standard_normal((n, 2)),
                                                                                np.zeros(n)]
    Xt = Xt @ Q.T
    lab = np.r_[np.flatnonzero(yt == 0)[:k], np.flatnonzero(yt == 1)[:k]]
    order = np.r_[lab, np.setdiff1d(np.arange(n), lab)]  # labelled target points first
    Xt, yt = Xt[order], yt[order]
    M = label_cost(ys, yt[:2 * k], n)
    assert M.shape == (n, n) and not M[:, 2 * k:].any()
    assert (M[:, :2 * k] == (ys[:, None] != yt[None, :2 * k])).all()
    Cs, Ct = intra_costs(Xs), intra_costs(Xt)

    def acc(T, truth):
        return (transport_labels(T, ys, 2).argmax(1)[2 * k:] == truth[2 * k:]).mean()

    assert acc(gw_coupling(Cs, Ct, M=M), yt) > 0.95
    assert acc(gw_coupling(Cs, Ct, M=label_cost(ys, 1 - yt[:2 * k], n)), 1 - yt) > 0.95


def test_gw_hda_uses_the_labelled_target_samples_when_given(registry, monkeypatch):
    """With k_target > 0 the labelled samples enter the coupling (a label cost)
    and the loss (their true labels); without, the coupling is plain GW."""
    import dabench_plugins.heterogeneous as het
    from dabench import diagnostics

    costs = []
    real = het.gw_coupling

    def spy(Cs, Ct, *a, M=None, **kw):
        costs.append(M)
        return real(Cs, Ct, *a, M=M, **kw)

    monkeypatch.setattr(het, "gw_coupling", spy)
    cls = registry.methods["gw-hda"]
    task, _ = make_task(registry, "digits:mnist", steps=3, feature_space="native", k_target=2,
                        max_target=300, max_source=300)
    Xm, q = cls(n_match=60).transported(task)
    assert costs[-1] is not None and costs[-1].shape == (60, len(Xm)) == (60, 60)
    k = len(task.target_labeled)
    assert np.array_equal(Xm[:k], task.target_labeled.X)
    assert np.array_equal(q[:k].argmax(1), task.target_labeled.y) and np.allclose(q[:k].max(1), 1.0)
    with diagnostics.collect() as diag:
        cls(n_match=60, latent_dim=16).fit(task)
    assert diag["ssot"] == 1.0 and 0.1 <= diag["transport_confidence"] <= 1.0
    plain, _ = make_task(registry, "digits:mnist", steps=3, feature_space="native", max_target=300, max_source=300)
    cls(n_match=60).transported(plain)
    assert costs[-1] is None


def test_gw_hda_needs_no_target_labels_and_skips_shared_spaces(registry):
    cls = registry.methods["gw-hda"]
    assert "target_labels" not in cls.requires and "same_feature_space" not in cls.requires
    shared, _ = make_task(registry, "moons:moons-rot35", steps=1)
    assert "heterogeneous" in cls.skip(shared)
    task, split = make_task(registry, "digits:mnist", steps=3, feature_space="native", max_target=300, max_source=300)
    assert task.target_labeled is None and cls.skip(task) is None
    idx, q = cls(n_match=60).transported(task)
    assert q.shape == (len(idx), 10) and np.allclose(q.sum(1), 1.0)
    pred = cls(n_match=60, latent_dim=16).fit(task)
    assert pred.embed(split.target_test.X, "target").shape[1] == pred.embed(split.source_test.X, "source").shape[1]


@pytest.mark.parametrize("name,pair,protocol", [
    ("iw-kliep", "covshift-source:covshift-target", {}),
    ("stn", "digits:mnist", {"feature_space": "native", "k_target": 1}),
    ("gw-hda", "digits:mnist", {"feature_space": "native"}),
])
def test_seeded_fit_is_deterministic_on_cpu(registry, name, pair, protocol):
    task, split = make_task(registry, pair, steps=4, max_source=300, max_target=300, **protocol)
    params = {"n_match": 60} if name == "gw-hda" else {}
    a = registry.methods[name](**params).fit(task).predict_proba(split.target_test.X)
    b = registry.methods[name](**params).fit(task).predict_proba(split.target_test.X)
    assert np.array_equal(a, b)


def test_native_pair_suite_runs_end_to_end(tmp_path):
    """A suite with a heterogeneous pair: the target-only and heterogeneous methods
    run (no source accuracy for the target-only one), source-only is skipped."""
    from conftest import run_cli, write

    suite = write(tmp_path / "het.toml", """
        name = "het"
        seeds = 1
        pairs = [ { pair = "digits:mnist", protocol = { feature_space = "native", k_target = 1 } } ]
        [protocol]
        max_source = 200
        max_target = 200
        [budget]
        steps = 3
        batch_size = 16
        [methods.source-only]
        [methods.target-only-k]
        [methods.stn]
        [methods.gw-hda]
        params = { n_match = 50 }
    """)
    out = run_cli("run", str(suite), "--results", str(tmp_path / "res"))
    assert out.returncode == 0, out.stdout + out.stderr
    log = out.stdout + out.stderr
    assert "source acc n/a" in log
    assert "skipped: needs a shared feature space" in log
    board = (tmp_path / "res" / "leaderboard.md").read_text()
    for name in ("target-only-k", "stn", "gw-hda"):
        assert name in board
