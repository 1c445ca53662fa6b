"""CDAN (multilinear conditioning, entropy weights, reversed feature gradient) and the
pretrained-backbone baselines (frozen features, fine-tuning with layer-wise lr decay)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import make_task

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


# --------------------------------------------------------------------------
# CDAN
# --------------------------------------------------------------------------


def test_multilinear_map_is_the_flattened_outer_product():
    from dabench_plugins.cdan import multilinear_map

    f = torch.tensor([[1.0, 2.0, 3.0], [0.0, -1.0, 0.5]])
    g = torch.tensor([[0.25, 0.75], [1.0, 0.0]])
    t = multilinear_map(f, g)
    assert t.shape == (2, 6)
    # entry i*C + j is f_i * g_j
    assert torch.equal(t[0], torch.tensor([0.25, 0.75, 0.5, 1.5, 0.75, 2.25]))
    assert torch.equal(t[1], torch.tensor([0.0, 0.0, -1.0, 0.0, 0.5, 0.0]))
    assert torch.allclose(t.reshape(2, 3, 2), torch.einsum("ni,nj->nij", f, g))


def test_randomized_map_preserves_inner_products_of_the_outer_product():
    """<T_odot(h), T_odot(h')> estimates <f (x) g, f' (x) g'> = <f,f'><g,g'> (Long et al. Sec. 3.1)."""
    from dabench_plugins.cdan import RandomizedMultilinearMap, multilinear_map

    gen = torch.Generator().manual_seed(0)
    f = torch.randn(40, 32, generator=gen)
    g = torch.softmax(3 * torch.randn(40, 5, generator=gen), dim=1)
    exact = multilinear_map(f, g) @ multilinear_map(f, g).T
    errs = []
    for d in (256, 16384):
        rmap = RandomizedMultilinearMap(32, 5, d, torch.Generator().manual_seed(1))
        r = rmap(f, g)
        assert r.shape == (40, d)
        approx = r @ r.T
        errs.append(float((approx - exact).abs().mean() / exact.abs().mean()))
        corr = np.corrcoef(approx.flatten().numpy(), exact.flatten().numpy())[0, 1]
        assert corr > (0.7 if d == 256 else 0.97), (d, corr)
    assert errs[1] < errs[0] / 3 and errs[1] < 0.15, errs  # error shrinks like 1/sqrt(d)


def test_cdan_switches_to_the_random_map_above_4096_dims(registry):
    cls = registry.methods["cdan"]
    rmap, d_in = cls().conditioning(128, 10, torch.device("cpu"), 0)
    assert rmap is None and d_in == 1280
    rmap, d_in = cls(random_dim=256).conditioning(512, 10, torch.device("cpu"), 0)
    assert rmap is not None and d_in == 256
    rmap, d_in = cls(multilinear="random", random_dim=64).conditioning(8, 2, torch.device("cpu"), 0)
    assert rmap is not None and d_in == 64


def test_entropy_weights_favour_confident_predictions():
    from dabench_plugins.cdan import entropy_weights

    probs = torch.tensor([[1.0, 0.0, 0.0], [0.8, 0.1, 0.1], [0.5, 0.3, 0.2], [1 / 3, 1 / 3, 1 / 3]])
    w = entropy_weights(probs)
    assert torch.isclose(w.sum(), torch.tensor(1.0))
    assert (w[:-1] > w[1:]).all()  # weight falls as entropy rises
    # 1 + exp(-H): 2 for a one-hot row, 1 + 1/C for the uniform row
    assert torch.isclose(w[0] / w[3], torch.tensor(2.0 / (1 + 1 / 3)), atol=1e-5)


def test_cdan_domain_gradient_is_reversed_into_features_and_entropy_weights():
    """The reference's gradient paths: the features get -lambda times the
    domain-loss gradient (reversal between f and the map); with CDAN+E the
    entropy weights are behind the same reversal (the reference's
    entropy.register_hook(grl_hook(coeff))), so the classifier too gets
    -lambda times its gradient through them; g itself is detached in the map
    (plain CDAN: no gradient reaches the classifier); the discriminator's
    gradient is never reversed."""
    from dabench_plugins.cdan import conditional_domain_loss, discriminator

    torch.manual_seed(0)
    enc, clf = torch.nn.Linear(3, 6), torch.nn.Linear(6, 4)
    disc = discriminator(24, 16, 1, 0.0)
    x = torch.randn(20, 3)
    x[10:] += 1.5

    def grads(lam, use_entropy):
        for m in (enc, clf, disc):
            m.zero_grad(set_to_none=True)
        f = enc(x)
        conditional_domain_loss(f, clf(f), 10, disc, None, lam, use_entropy).backward()
        return ([p.grad.clone() for p in enc.parameters()], [p.grad.clone() for p in disc.parameters()],
                [None if p.grad is None else p.grad.clone() for p in clf.parameters()])

    for use_entropy in (False, True):
        enc_plain, disc_plain, clf_plain = grads(-1.0, use_entropy)  # factor -1 is the identity: the true gradient
        enc_rev, disc_rev, clf_rev = grads(0.5, use_entropy)
        for a, b in zip(enc_rev, enc_plain):
            assert torch.allclose(a, -0.5 * b, atol=1e-6)
        for a, b in zip(disc_rev, disc_plain):
            assert torch.allclose(a, b)
        if use_entropy:
            assert all(g is not None and g.abs().sum() > 0 for g in clf_rev)
            for a, b in zip(clf_rev, clf_plain):
                assert torch.allclose(a, -0.5 * b, atol=1e-7)
        else:
            assert all(g is None for g in clf_rev)
    # one step of the encoder along its (reversed) gradient raises the domain loss
    enc_rev, _, _ = grads(1.0, True)
    with torch.no_grad():
        before = conditional_domain_loss(enc(x), clf(enc(x)), 10, disc, None, 1.0, True).item()
        for p, g in zip(enc.parameters(), enc_rev):
            p -= 1.0 * g
        after = conditional_domain_loss(enc(x), clf(enc(x)), 10, disc, None, 1.0, True).item()
    assert after > before


def test_cdan_loss_has_the_reference_scale():
    """thuml's loss.CDAN: plain CDAN is BCELoss() over the whole batch; CDAN+E is
    sum(w * bce) / sum(w) with w = (1 + exp(-H)) normalised to sum 1 per domain,
    i.e. the mean of the two domains' weighted means (half the sum of version 1)."""
    from dabench_plugins.cdan import conditional_domain_loss, discriminator, entropy, multilinear_map

    torch.manual_seed(1)
    f, logits = torch.randn(12, 5), torch.randn(12, 3) * 2
    disc = discriminator(15, 8, 1, 0.0)
    ns = 5  # unequal domain sizes: the per-domain normalisation matters
    d = disc(multilinear_map(f, torch.softmax(logits, 1))).squeeze(1)
    dom = torch.cat([torch.zeros(ns), torch.ones(12 - ns)])
    bce = torch.nn.functional.binary_cross_entropy_with_logits(d, dom, reduction="none")
    plain = conditional_domain_loss(f, logits, ns, disc, None, 1.0, False)
    assert plain.item() == pytest.approx(bce.mean().item(), rel=1e-6)
    h = 1.0 + torch.exp(-entropy(torch.softmax(logits, 1)))
    w = torch.cat([h[:ns] / h[:ns].sum(), h[ns:] / h[ns:].sum()])
    expected = (w * bce).sum() / w.sum()
    weighted = conditional_domain_loss(f, logits, ns, disc, None, 1.0, True)
    assert weighted.item() == pytest.approx(expected.item(), rel=1e-6)
    halves = 0.5 * ((w[:ns] * bce[:ns]).sum() + (w[ns:] * bce[ns:]).sum())
    assert weighted.item() == pytest.approx(halves.item(), rel=1e-6)


def test_cdan_discriminator_is_the_reference_adversarial_network():
    """Defaults: 2 hidden layers of 500 with dropout 0.5 (AdversarialNetwork(., 500)),
    Xavier-normal weights, zero biases (init_weights); lambda ramps to 1; CDAN+E."""
    from dabench_plugins.cdan import CDAN, discriminator

    params = CDAN().get_params()
    assert (params["disc_layers"], params["disc_hidden"], params["disc_dropout"]) == (2, 500, 0.5)
    assert params["lambda_max"] == 1.0 and params["entropy"] is True
    torch.manual_seed(0)
    disc = discriminator(1280, 500, 2, 0.5)
    linears = [m for m in disc if isinstance(m, torch.nn.Linear)]
    assert [m.out_features for m in linears] == [500, 500, 1]
    assert sum(isinstance(m, torch.nn.Dropout) for m in disc) == 2
    assert all(float(m.bias.abs().sum()) == 0.0 for m in linears)
    assert float(linears[0].weight.std()) == pytest.approx((2.0 / (1280 + 500)) ** 0.5, rel=0.05)  # Xavier normal


def test_cdan_runs_the_published_schedules_records_its_signals_and_is_deterministic(registry, monkeypatch):
    import dabench_plugins.cdan as cdan_mod
    from dabench import diagnostics, training

    lams = []

    def spy(x, coeff):
        lams.append(coeff)
        return training.grad_reverse(x, coeff)

    monkeypatch.setattr(cdan_mod, "grad_reverse", spy)
    task, split = make_task(registry, steps=11)
    with diagnostics.collect() as diag:
        a = registry.methods["cdan"](lambda_max=0.5).fit(task).predict_proba(split.target_test.X)
    p = np.arange(11) / 10
    expected = 0.5 * (2 / (1 + np.exp(-10 * p)) - 1)
    assert np.allclose(lams[0::2], expected) and np.allclose(lams[1::2], expected)  # features, entropy
    assert 0 <= diag["disc_acc_start"] <= 1 and 0 <= diag["disc_acc_end"] <= 1
    assert diag["engaged"] == float(diag["disc_acc_end"] < cdan_mod.ENGAGED_BELOW)
    b = registry.methods["cdan"](lambda_max=0.5).fit(task).predict_proba(split.target_test.X)
    assert np.array_equal(a, b)


# --------------------------------------------------------------------------
# Pretrained-backbone baselines
# --------------------------------------------------------------------------


def _pretrained_state(registry, task, method):
    """The cached pretrained backbone weights ``method`` started from."""
    from dabench_plugins.pretraining import pretrain_denoising, pretrain_steps

    torch.manual_seed(123)  # a different init: the state must come from the cache
    enc, dim = task.backbone(task.source_shape)
    pre, _ = pretrain_steps(task.budget.steps, method.pretrain_frac)
    pretrain_denoising(task, enc, dim, steps=pre, on=method.pretrain_on, noise=method.pretrain_noise,
                       lr=method.pretrain_lr, device=torch.device("cpu"))
    return {k: v.clone() for k, v in enc.state_dict().items()}


def test_pretraining_uses_no_labels_and_a_hit_equals_a_miss(registry):
    from dataclasses import replace

    from dabench.contract import Labeled
    from dabench_plugins import pretraining

    task, split = make_task(registry, steps=30)
    pretraining.clear_cache()
    a = registry.methods["frozen-features"]().fit(task).predict_proba(split.target_test.X)
    b = registry.methods["frozen-features"]().fit(task).predict_proba(split.target_test.X)  # cache hit
    assert np.array_equal(a, b)
    # scrambled source labels change the head but not the pretrained backbone
    y = np.random.default_rng(0).permutation(task.source_train.y)
    scrambled = replace(task, source_train=Labeled(task.source_train.X, y))
    m = registry.methods["frozen-features"]()
    pretraining.clear_cache()
    s1 = _pretrained_state(registry, task, m)
    pretraining.clear_cache()
    s2 = _pretrained_state(registry, scrambled, m)
    assert all(torch.equal(s1[k], s2[k]) for k in s1)


def test_frozen_features_keeps_the_pretrained_backbone_bit_identical(registry):
    task, split = make_task(registry, steps=200, batch_size=64)
    method = registry.methods["frozen-features"](lr=0.05)
    pred = method.fit(task)
    pretrained = _pretrained_state(registry, task, method)
    torch.manual_seed(0)
    fresh, _ = task.backbone(task.source_shape)
    fitted = pred.encoders["target"].state_dict()
    assert all(torch.equal(fitted[k], pretrained[k]) for k in pretrained)
    assert not all(torch.equal(fresh.state_dict()[k], pretrained[k]) for k in pretrained)  # it was pretrained
    acc = (pred.predict_proba(task.source_val.X, "source").argmax(1) == task.source_val.y).mean()
    assert acc > 0.7  # the new head learned the source task on the fixed features


def test_fine_tuning_updates_only_the_top_blocks_with_decayed_learning_rates(registry, monkeypatch):
    import dabench_plugins.fine_tuning as ft
    from dabench.training import annealed_lr

    opts = []
    real = ft.make_sgd

    def spy(*args, **kw):
        opts.append(real(*args, **kw))
        return opts[-1]

    monkeypatch.setattr(ft, "make_sgd", spy)
    task, _ = make_task(registry, steps=60)  # MLP backbone: two blocks
    method = registry.methods["fine-tuning"](unfrozen_blocks=1, layer_decay=0.25, lr=0.04)
    pred = method.fit(task)
    pretrained = _pretrained_state(registry, task, method)
    fitted = pred.encoders["target"].state_dict()
    blocks = ft.backbone_blocks(pred.encoders["target"])
    assert len(blocks) == 2
    names = [k for k in fitted]  # "0.weight", "0.bias" (bottom), "2.weight", "2.bias" (top)
    bottom, top = names[:2], names[2:]
    assert all(torch.equal(fitted[k], pretrained[k]) for k in bottom)
    assert all(not torch.equal(fitted[k], pretrained[k]) for k in top)
    groups = opts[0].param_groups
    assert len(groups) == 2  # head + the one unfrozen block
    final = annealed_lr(1.0, 0.04)
    assert groups[0]["lr"] == pytest.approx(final) and groups[1]["lr"] == pytest.approx(0.25 * final)


def test_layer_wise_decay_groups_for_a_cnn_backbone(registry):
    from dabench.backbones import dann_mnist_backbone
    from dabench.training import make_sgd, set_lr
    from dabench_plugins.fine_tuning import backbone_blocks, parameter_groups

    enc, dim = dann_mnist_backbone((1, 28, 28))
    head = torch.nn.Linear(dim, 10)
    opt = make_sgd(parameter_groups(enc, head, 2, 0.5), lr=0.1)
    set_lr(opt, 0.1)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.1, 0.05, 0.025])
    convs = backbone_blocks(enc)
    assert [type(b).__name__ for b in convs] == ["Conv2d", "Conv2d", "Linear"]
    assert not any(p.requires_grad for p in convs[0].parameters())
    assert all(p.requires_grad for b in convs[1:] for p in b.parameters())
