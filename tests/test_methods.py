"""The built-in method plugins: their distinctive mechanisms, not only that they run."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dabench import training
from conftest import make_task

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _acc(pred, X, y, domain="target"):
    return float((pred.predict_proba(X, domain).argmax(1) == y).mean())


def test_dann_reverses_the_domain_gradient_with_the_published_schedule(registry, monkeypatch):
    """Every step passes the features through the GRL with lambda_p = 2/(1+exp(-10p))-1
    (times lambda_max), and the learning rate follows mu0/(1+10p)^0.75."""
    lams, lrs = [], []
    real_grl, real_set_lr = training.grad_reverse, training.set_lr
    import dabench_plugins.dann as dann_mod

    def spy_grl(x, coeff):
        lams.append(coeff)
        return real_grl(x, coeff)

    def spy_lr(opt, lr):
        lrs.append(lr)
        return real_set_lr(opt, lr)

    monkeypatch.setattr(dann_mod, "grad_reverse", spy_grl)
    monkeypatch.setattr(dann_mod, "set_lr", spy_lr)
    task, _ = make_task(registry, steps=11)
    registry.methods["dann"](lambda_max=0.5, lr=0.02).fit(task)
    p = np.arange(11) / 10
    assert np.allclose(lams, 0.5 * (2 / (1 + np.exp(-10 * p)) - 1))
    assert np.allclose(lrs, 0.02 / (1 + 10 * p) ** 0.75)


def test_dann_feature_gradient_from_domain_loss_is_reversed(registry):
    """With the label loss removed, the GRL makes the encoder *ascend* the domain
    loss: one SGD step on the encoder raises L_d measured with the discriminator fixed."""
    from dabench_plugins.dann import domain_classifier

    torch.manual_seed(0)
    enc, disc = torch.nn.Linear(2, 8), domain_classifier(8, 16, 1)
    xs, xt = torch.randn(64, 2), torch.randn(64, 2) + 2
    dom = torch.cat([torch.zeros(64), torch.ones(64)])

    def dloss(grl: bool):
        f = enc(torch.cat([xs, xt]))
        return torch.nn.functional.binary_cross_entropy_with_logits(
            disc(training.grad_reverse(f, 1.0) if grl else f).squeeze(1), dom)

    before = dloss(False).item()
    enc.zero_grad()
    dloss(True).backward()
    with torch.no_grad():
        for prm in enc.parameters():
            prm -= 0.5 * prm.grad
    assert dloss(False).item() > before


@pytest.mark.parametrize("name", ["source-only", "dann"])
def test_seeded_fit_is_deterministic_on_cpu(registry, name):
    task, split = make_task(registry, steps=40, source_lr=0.01)
    X = split.target_test.X
    a = registry.methods[name]().fit(task).predict_proba(X)
    b = registry.methods[name]().fit(task).predict_proba(X)
    assert np.array_equal(a, b)


def test_dann_beats_source_only_on_rotated_moons(registry):
    """The DANN paper's toy experiment (Sec. 5.1): on moons rotated by 35 degrees,
    adversarial alignment lifts target accuracy well above the source-only model."""
    task, split = make_task(registry, steps=3000, batch_size=64, source_lr=0.05)
    X, y = split.target_test.X, split.target_test.y
    so = _acc(registry.methods["source-only"]().fit(task), X, y)
    dann = _acc(registry.methods["dann"](lr=0.05, lambda_max=0.3).fit(task), X, y)
    assert dann > so + 0.1, (so, dann)


def test_oracle_sees_target_train_labels_and_fits_the_target(registry):
    task, split = make_task(registry, steps=600, batch_size=64, oracle=True)
    assert task.target_train_labels is not None
    acc = _acc(registry.methods["target-oracle"](lr=0.05).fit(task), split.target_test.X, split.target_test.y)
    assert acc > 0.95
    plain, _ = make_task(registry, steps=10)
    with pytest.raises(Exception, match="oracle|label"):
        registry.methods["target-oracle"]().fit(plain)


def test_divergence_is_raised_as_diverged_error(registry):
    task, _ = make_task(registry, "covshift-source:covshift-target", steps=400)
    with pytest.raises(training.DivergedError, match="diverged"):
        registry.methods["dann"](lr=0.1, lambda_max=3.0, weight_decay=1e-6).fit(task)


def test_dann_records_domain_classifier_accuracy_and_engagement(registry):
    """The health signal tracks the adversarial game: on the covariate-shift pair a
    domain classifier that the features barely fight (lambda 0.03) ends up
    separating the domains (engaged 0), while with lambda = 1 the features keep it
    near chance (engaged 1)."""
    from dabench import diagnostics

    task, _ = make_task(registry, "covshift-source:covshift-target", steps=200, batch_size=64)
    with diagnostics.collect() as weak:
        registry.methods["dann"](lambda_max=0.03).fit(task)
    with diagnostics.collect() as full:
        registry.methods["dann"](lambda_max=1.0).fit(task)
    assert weak["disc_acc_start"] < 0.7 and full["disc_acc_start"] < 0.7  # lambda ~ 0 early on: both start naive
    assert weak["disc_acc_end"] > 0.9 and weak["engaged"] == 0.0
    assert full["disc_acc_end"] < 0.7 and full["engaged"] == 1.0


def test_domain_accuracy_summary_uses_the_first_and_last_tenth():
    from dabench import diagnostics
    from dabench_plugins.dann import ENGAGED_BELOW, record_domain_accuracy

    acc = [torch.tensor(v) for v in [0.5, 0.6] + [0.7] * 16 + [0.95, 0.97]]
    with diagnostics.collect() as d:
        record_domain_accuracy(acc)
    assert d["disc_acc_start"] == pytest.approx(0.55) and d["disc_acc_end"] == pytest.approx(0.96)
    assert d["engaged"] == float(0.96 < ENGAGED_BELOW) == 0.0
