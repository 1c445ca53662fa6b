"""SHOT, TENT, AdaBN and bn-adapt: each method's mechanism, as its paper states it."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from conftest import make_task
from dabench import diagnostics
from dabench.source_model import SourceRecipe, with_source_model
from dabench.tracks import norm_layers, run_stream, task_for_track
from dabench_plugins.bn_adapt import AdaBN, BNAdapt
from dabench_plugins.shot import SHOT, centroid_pseudo_labels, im_terms
from dabench_plugins.tent import Tent, configure_model


@pytest.fixture(scope="module")
def bn_task(registry):
    """moons on the mlp-bn backbone with a trained shared source model (the host's uda task)."""
    from dataclasses import replace

    task, split = make_task(registry, steps=60, max_source=400, max_target=400)
    task = replace(task, backbone=registry.backbones["mlp-bn"])
    return with_source_model(task, SourceRecipe(lr=0.05)), split


def _params(*modules):
    return {f"{i}.{k}": v.detach().clone() for i, m in enumerate(modules) for k, v in m.named_parameters()}


# ---------------------------------------------------------------- SHOT


def test_centroid_pseudo_labels_recover_clusters_from_noisy_predictions():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[4.0, 0, 0, 0], [0, 4.0, 0, 0], [0, 0, 4.0, 0]])
    y = torch.arange(300) % 3
    feats = centres[y] + 0.5 * torch.randn(300, 4, generator=g)
    wrong = torch.rand(300, generator=g) < 0.3  # the classifier is wrong on 30% of the points
    pred = torch.where(wrong, (y + 1) % 3, y)
    logits = torch.full((300, 4), -2.0)
    logits[torch.arange(300), pred] = 1.0  # a 4th class nobody belongs to, with some softmax mass
    labels = centroid_pseudo_labels(feats, torch.softmax(logits, 1))
    assert (labels == y).float().mean() > 0.97  # the centroids fix what the classifier got wrong
    assert set(labels.tolist()) <= {0, 1, 2}  # the empty class captures nobody (no NaN centroid)


def test_information_maximisation_terms():
    uniform = torch.full((8, 4), 0.25)
    ent, div = im_terms(uniform)
    assert float(ent) == pytest.approx(math.log(4), abs=1e-3) and float(div) == pytest.approx(math.log(4), abs=1e-3)
    onehot = torch.eye(4).repeat(2, 1)  # confident and diverse: what IM wants
    ent, div = im_terms(onehot)
    assert float(ent) == pytest.approx(0.0, abs=1e-3) and float(div) == pytest.approx(math.log(4), abs=1e-3)
    collapsed = torch.eye(4)[[0] * 8]  # confident but one class: the diversity term is 0
    assert float(im_terms(collapsed)[1]) == pytest.approx(0.0, abs=1e-3)


def test_shot_trains_the_encoder_on_target_under_a_frozen_hypothesis(bn_task):
    task, split = bn_task
    view, log = task_for_track(task, "source-free")
    enc0, clf0 = task.source_model.build("cpu")
    with diagnostics.collect() as d:
        pred = SHOT().fit(view)
    assert not log  # no source data reached for
    clf1 = pred.classifier
    assert all(torch.equal(a, b) for a, b in zip(clf0.parameters(), clf1.parameters()))  # the hypothesis is frozen
    enc1 = pred.encoders["target"]
    assert not all(torch.equal(a, b) for a, b in zip(enc0.parameters(), enc1.parameters()))
    assert d["im_entropy_end"] < d["im_entropy_start"]  # information maximisation acted
    assert d["im_diversity_end"] > 0.6 * math.log(2)
    assert 0.0 < d["pl_agree_source_first"] <= 1.0 and d["engaged"] == 1.0


def test_shot_without_pseudo_labels_is_shot_im(bn_task):
    task, _ = bn_task
    with diagnostics.collect() as d:
        SHOT(cls_par=0.0).fit(task_for_track(task, "source-free")[0])
    assert d["pl_agree_source_first"] is None  # no pseudo-labelling ran
    assert d["im_entropy_end"] < d["im_entropy_start"]


# ---------------------------------------------------------------- TENT


def test_tent_configures_only_the_normalisation_affine_parameters(bn_task):
    task, _ = bn_task
    enc, clf = task.source_model.build("cpu")
    params, layers = configure_model(enc, clf)
    assert len(layers) == 2 and len(params) == 4  # two BatchNorm1d: weight and bias each
    trainable = [p for m in (enc, clf) for p in m.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in params}
    assert all(m.training and m.running_mean is None and not m.track_running_stats for m in layers)
    assert not any(m.training for m in enc.modules() if not isinstance(m, nn.BatchNorm1d) and m is not enc)


def test_tent_predicts_each_batch_before_updating_on_it_and_carries_the_update_over(bn_task):
    task, split = bn_task
    view = task_for_track(task, "test-time")[0]
    adapter = Tent().fit(view)
    X = np.asarray(split.target_test.X)
    first = X[:32]
    enc, clf = task.source_model.build("cpu")
    enc.train()  # batch statistics, the source model's parameters: what TENT's first forward pass sees
    with torch.no_grad():
        expect = torch.softmax(clf(enc(torch.from_numpy(np.array(first)))), 1).double().numpy()
    before = _params(adapter.encoder, adapter.classifier)
    with diagnostics.collect() as d:
        got = adapter.predict_batch(first)
    np.testing.assert_allclose(got, expect, atol=1e-6)
    after = _params(adapter.encoder, adapter.classifier)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"0.1.weight", "0.1.bias", "0.4.weight", "0.4.bias"}  # BN affine only
    total = sum(v.numel() for v in before.values())
    assert d["adapted_param_fraction"] == pytest.approx(4 * 64 / total) and d["n_norm_layers"] == 2.0
    # minimising the entropy on a batch lowers it (the update carries over to the next call)
    for _ in range(5):
        with diagnostics.collect() as d:
            adapter.predict_batch(first)
        assert d["entropy_drop"] > 0
    assert d["engaged"] == 1.0


def test_tent_on_a_stream_changes_predictions_only_through_the_normalisation_layers(bn_task):
    task, split = bn_task
    adapter = Tent(lr=1e-2).fit(task_for_track(task, "test-time")[0])
    proba, order = run_stream(adapter, split.target_test.X, seed=0, batch_size=32, n_classes=2)
    src = task.source_model.predictor("cpu").predict_proba(split.target_test.X)
    assert (proba.argmax(1) != src.argmax(1)).mean() > 0.0
    one = adapter.predict_batch(np.asarray(split.target_test.X[:1]))  # one sample through BatchNorm1d
    assert one.shape == (1, 2) and np.isfinite(one).all()


# ---------------------------------------------------------------- BN adaptation


def test_bn_adapt_with_prior_zero_normalises_with_the_test_batch_statistics(bn_task):
    task, split = bn_task
    adapter = BNAdapt().fit(task_for_track(task, "test-time")[0])
    X = np.asarray(split.target_test.X[:40])
    enc, clf = task.source_model.build("cpu")
    enc.train()
    with torch.no_grad():
        expect = torch.softmax(clf(enc(torch.from_numpy(np.array(X)))), 1).double().numpy()
    np.testing.assert_allclose(adapter.predict_batch(X), expect, atol=1e-5)
    np.testing.assert_array_equal(adapter.predict_batch(X), adapter.predict_batch(X))  # stateless
    src_stats = [(m.running_mean, m.running_var) for m in norm_layers(task.source_model.build("cpu")[0])]
    for m, (mean, var) in zip(norm_layers(adapter.encoder), src_stats):  # the source statistics are restored
        assert torch.equal(m.running_mean, mean) and torch.equal(m.running_var, var)


def test_bn_adapt_prior_strength_moves_towards_the_source_model(bn_task):
    task, split = bn_task
    X = np.asarray(split.target_test.X[:8])
    source = task.source_model.predictor("cpu").predict_proba(X)
    view = task_for_track(task, "test-time")[0]
    gaps = [np.abs(BNAdapt(prior_strength=n).fit(view).predict_batch(X) - source).max() for n in (0.0, 8.0, 512.0)]
    assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 0.05


def test_adabn_replaces_each_layer_statistics_by_the_target_ones_layer_by_layer(bn_task):
    task, split = bn_task
    view, log = task_for_track(task, "source-free")
    with diagnostics.collect() as d:
        pred = AdaBN().fit(view)
    assert not log and d["n_norm_layers"] == 2.0 and d["stat_shift"] > 0
    enc = pred.encoders["target"]
    lin1, bn1, _, lin2, bn2, _ = list(enc)
    Xt = torch.from_numpy(np.array(view.target_train.X))
    with torch.no_grad():
        h1 = lin1(Xt)
        np.testing.assert_allclose(bn1.running_mean, h1.mean(0), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(bn1.running_var, h1.var(0, unbiased=False), rtol=1e-4, atol=1e-5)
        h2 = lin2(torch.relu(bn1(h1)))  # the layer above sees the adapted layer below
        np.testing.assert_allclose(bn2.running_mean, h2.mean(0), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(bn2.running_var, h2.var(0, unbiased=False), rtol=1e-4, atol=1e-5)
    # one set of statistics per domain: source inputs keep the source statistics
    Xs = split.source_test.X
    np.testing.assert_allclose(pred.predict_proba(Xs, "source"),
                               task.source_model.predictor("cpu").predict_proba(Xs, "source"), atol=1e-6)
