"""Self-training (CBST, self-ensembling) and contrastive (CAN) plugins: their
distinctive mechanisms, not only that they run."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from conftest import make_task
from dabench import diagnostics

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


# --------------------------------------------------------------------------
# CBST
# --------------------------------------------------------------------------


def _skewed_proba() -> torch.Tensor:
    """800 confident class-0 predictions (0.9-0.99) and 200 unsure class-1 ones (0.55-0.7)."""
    g = torch.Generator().manual_seed(0)
    c0 = 0.9 + 0.09 * torch.rand(800, generator=g)
    c1 = 0.55 + 0.15 * torch.rand(200, generator=g)
    p0 = torch.stack([c0, 1 - c0], 1)
    p1 = torch.stack([1 - c1, c1], 1)
    return torch.cat([p0, p1]).double()


def test_cbst_selection_keeps_each_class_portion_under_skewed_confidence():
    """A global top-20% threshold would pick class 0 only; CBST's per-class
    thresholds pick the top 20% of *each* predicted class (160 + 40)."""
    from dabench_plugins.cbst import class_balanced_thresholds, select_pseudo_labels

    proba = _skewed_proba()
    conf = proba.max(1).values
    global_top = torch.topk(conf, 200).indices
    assert (proba[global_top].argmax(1) == 0).all()  # the failure CBST fixes

    labels, selected = select_pseudo_labels(proba, 0.2)
    assert int(selected.sum()) == 200
    counts = torch.bincount(labels[selected], minlength=2).tolist()
    assert counts == [160, 40]
    # the selected class-1 samples are exactly its 40 most confident ones
    c1_conf = proba[800:, 1]
    assert set((800 + torch.topk(c1_conf, 40).indices).tolist()) == set(
        selected.nonzero().squeeze(1)[labels[selected] == 1].tolist())
    thr = class_balanced_thresholds(proba, 0.2)
    assert thr[1] < thr[0] < 1


def test_cbst_normalised_argmax_and_unpredicted_classes():
    """Labels are argmax_c p_c / exp(-k_c) (Eq. 5), which can differ from the
    plain argmax; selection needs that maximum >= 1; the threshold sits at rank
    floor(p * N_c) as in the reference's kc_parameters, so a class nobody
    predicts, or too rare for one sample at portion p, gets no pseudo-labels."""
    from dabench_plugins.cbst import class_balanced_thresholds, select_pseudo_labels

    proba = torch.tensor([[0.99, 0.01, 0.00, 0.00, 0.0],
                          [0.97, 0.03, 0.00, 0.00, 0.0],
                          [0.95, 0.00, 0.05, 0.00, 0.0],
                          [0.55, 0.00, 0.45, 0.00, 0.0],   # predicted 0, but p_2 reaches class 2's threshold
                          [0.20, 0.35, 0.45, 0.00, 0.0],   # class-2 predictions: 0.45 and 0.40
                          [0.20, 0.00, 0.40, 0.00, 0.4 - 1e-9],
                          [0.10, 0.90, 0.00, 0.00, 0.0],
                          [0.30, 0.70, 0.00, 0.00, 0.0],
                          [0.30, 0.00, 0.00, 0.00, 0.7]], dtype=torch.float64)  # the only class-4 prediction
    thr = class_balanced_thresholds(proba, 0.5)
    # class 0: [0.99, 0.97, 0.95, 0.55] -> rank 2 -> 0.97; class 1: [0.9, 0.7] -> rank 1 -> 0.9;
    # class 2: [0.45, 0.40] -> rank 1 -> 0.45; class 3: never predicted; class 4: floor(0.5 * 1) = 0
    assert torch.allclose(thr[:3], torch.tensor([0.97, 0.9, 0.45], dtype=torch.float64))
    assert torch.isinf(thr[3]) and torch.isinf(thr[4])
    labels, selected = select_pseudo_labels(proba, 0.5)
    assert selected.tolist() == [True, True, False, True, True, False, True, False, False]
    assert labels[selected].tolist() == [0, 0, 2, 2, 1]
    assert proba[3].argmax() == 0 and labels[3] == 2  # the normalisation flipped this label


def test_cbst_starts_from_the_source_model_and_relabels_with_the_current_model(registry, monkeypatch):
    """No warm-up: the first labelling is the shared source model's prediction;
    every round labels the target again with the *current* model (which has
    moved since); p follows min(p0 + r * step, max); the learning rate is
    lr / sqrt(2)^r in round r (the reference's solve_AO.py); and the rounds
    take exactly task.budget.steps SGD steps."""
    import dabench_plugins.cbst as cbst_mod

    portions, lrs, probas, steps_taken = [], [], [], []
    real_select, real_set_lr, real_predict = cbst_mod.select_pseudo_labels, cbst_mod.set_lr, cbst_mod.predict_all
    real_step = torch.optim.SGD.step

    def spy_select(proba, portion):
        portions.append(portion)
        return real_select(proba, portion)

    def spy_lr(opt, lr):
        lrs.append(lr)
        return real_set_lr(opt, lr)

    def spy_predict(enc, clf, X, *a):
        out = real_predict(enc, clf, X, *a)
        probas.append(out)
        return out

    def count_step(self, *a, **k):
        steps_taken.append(1)
        return real_step(self, *a, **k)

    task, _ = make_task(registry, steps=40, source_lr=0.05)
    monkeypatch.setattr(cbst_mod, "select_pseudo_labels", spy_select)
    monkeypatch.setattr(cbst_mod, "set_lr", spy_lr)
    monkeypatch.setattr(cbst_mod, "predict_all", spy_predict)
    monkeypatch.setattr(torch.optim.SGD, "step", count_step)
    method = registry.methods["cbst"](rounds=4, portion0=0.2, portion_step=0.15, portion_max=0.5, lr=0.04)
    with diagnostics.collect() as diag:
        method.fit(task)
    assert np.allclose(portions, [0.2, 0.35, 0.5, 0.5])
    assert np.allclose(lrs, [0.04 / np.sqrt(2) ** r for r in range(4)])
    assert len(steps_taken) == 40
    source = task.source_model.predictor().predict_proba(task.target_train.X)
    assert np.allclose(probas[0].numpy(), source, atol=1e-5)  # round 0: the source model
    assert len(probas) == 5  # one labelling per round, and the final one for pred_change
    for a, b in zip(probas, probas[1:]):
        assert not torch.allclose(a, b)  # the model that labels has moved between rounds
    assert diag["pseudo_label_rate_q1"] < diag["pseudo_label_rate_q4"]


def test_cbst_engages_on_a_small_pair(registry):
    """With the default schedule (20 -> 50 % over 7 rounds) the selected fraction
    grows, the pseudo-labels act and the predictions move."""
    task, _ = make_task(registry, steps=140, batch_size=64, source_lr=0.05)
    with diagnostics.collect() as diag:
        registry.methods["cbst"]().fit(task)
    assert 0.15 <= diag["pseudo_label_rate_q1"] <= 0.25 and 0.4 <= diag["pseudo_label_rate_q4"] <= 0.5
    assert 0 < diag["pseudo_label_agreement"] <= 1
    assert diag["pred_change"] > 0.01 and diag["engaged"] == 1.0


# --------------------------------------------------------------------------
# Self-ensembling (mean teacher)
# --------------------------------------------------------------------------


def test_ema_update_is_the_mean_teacher_rule():
    from dabench_plugins.self_ensembling import ema_update

    torch.manual_seed(0)
    student = torch.nn.Linear(3, 2)
    teacher = copy.deepcopy(student)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    before = [p.clone() for p in teacher.parameters()]
    ema_update(teacher, student, 0.9)
    for t, b, s in zip(teacher.parameters(), before, student.parameters()):
        assert torch.allclose(t, 0.9 * b + 0.1 * s)


def test_consistency_uses_teacher_probabilities_and_confidence_mask():
    """Only samples the teacher is confident about count; gradients reach the
    student's probabilities only (the teacher's are a fixed target)."""
    from dabench_plugins.self_ensembling import consistency_loss

    stu = torch.tensor([[0.5, 0.5], [0.2, 0.8], [0.6, 0.4]], requires_grad=True)
    tea = torch.tensor([[0.99, 0.01], [0.6, 0.4], [0.0, 1.0]], requires_grad=True)
    loss, mask = consistency_loss(stu, tea, confidence=0.968)
    assert mask.tolist() == [1.0, 0.0, 1.0]
    expected = (((0.5 - 0.99) ** 2 + (0.5 - 0.01) ** 2) / 2 + ((0.6 - 0.0) ** 2 + (0.4 - 1.0) ** 2) / 2) / 3
    assert loss.item() == pytest.approx(expected)
    loss.backward()
    assert tea.grad is None
    assert stu.grad[1].abs().sum() == 0 and stu.grad[0].abs().sum() > 0


def test_augmentations_shift_images_and_noise_vectors():
    """Images: a pure 1-pixel translation moves the pixels by one column; two
    calls give different (independent) views.  Vectors: noise scales with each
    feature's std."""
    from dabench_plugins.self_ensembling import Augment

    img = torch.zeros(1, 1, 8, 8)
    img[0, 0, 2:6, 3] = 1.0
    aug = Augment((1, 8, 8), torch.device("cpu"), seed=0, translate=0.0, affine_std=0.0, noise_std=0.0)
    assert torch.equal(aug(img.reshape(1, -1)), img.reshape(1, -1))  # identity when switched off
    theta_shift = Augment((1, 8, 8), torch.device("cpu"), seed=0, translate=1.0, affine_std=0.0, noise_std=0.0)
    theta_shift._rand = lambda *size: torch.ones(*size)  # shift = +1 px in x and y
    out = theta_shift(img.reshape(1, -1)).reshape(8, 8)
    # the sampling grid moves by +1 px, so the content moves by one pixel up and left
    assert torch.allclose(out, torch.roll(img[0, 0], shifts=(-1, -1), dims=(0, 1)), atol=1e-5)

    rnd = Augment((1, 8, 8), torch.device("cpu"), seed=1)
    x = img.reshape(1, -1).repeat(4, 1)
    a, b = rnd(x), rnd(x)
    assert not torch.allclose(a, b)

    std = torch.tensor([1.0, 100.0])
    vec = Augment((2,), torch.device("cpu"), seed=0, noise_std=0.1, feature_std=std)
    d = vec(torch.zeros(20000, 2))
    assert d.std(0)[0].item() == pytest.approx(0.1, rel=0.05)
    assert d.std(0)[1].item() == pytest.approx(10.0, rel=0.05)


def test_self_ensembling_teacher_sees_its_own_view_and_tracks_the_student(registry, monkeypatch):
    """Each step the teacher gets an independently augmented target view (3
    augment calls: source, student target, teacher target) and the returned
    model is the EMA teacher, not the student."""
    import dabench_plugins.self_ensembling as se

    calls = []
    real_call = se.Augment.__call__

    def spy(self, x):
        out = real_call(self, x)
        calls.append(out)
        return out

    monkeypatch.setattr(se.Augment, "__call__", spy)
    students = []
    real_ema = se.ema_update

    def spy_ema(teacher, student, alpha):
        students.append(student)
        return real_ema(teacher, student, alpha)

    monkeypatch.setattr(se, "ema_update", spy_ema)
    task, _ = make_task(registry, steps=5)
    pred = registry.methods["self-ensembling"](teacher_alpha=0.9).fit(task)
    assert len(calls) == 15
    assert not torch.allclose(calls[1], calls[2])  # student and teacher target views differ
    student = students[-1]
    assert pred.classifier is not student.classifier
    assert not torch.allclose(pred.classifier.weight, student.classifier.weight)


def test_unsupervised_loss_weights_the_class_balance_inside_the_unsupervised_term():
    """As the reference's compute_aug_loss: L_cons + class_balance * L_bal * mean(mask),
    the whole later multiplied by unsup_weight; a shut mask silences both terms."""
    from dabench_plugins.self_ensembling import class_balance_loss, consistency_loss, unsupervised_loss

    stu = torch.tensor([[0.5, 0.5], [0.2, 0.8], [0.6, 0.4]])
    tea = torch.tensor([[0.99, 0.01], [0.6, 0.4], [0.0, 1.0]])
    unsup, mask = unsupervised_loss(stu, tea, 0.96837722, 0.005)
    cons, _ = consistency_loss(stu, tea, 0.96837722)
    assert unsup.item() == pytest.approx(cons.item() + 0.005 * class_balance_loss(stu).item() * 2 / 3)
    unsure = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8]])
    shut, mask0 = unsupervised_loss(stu, unsure, 0.96837722, 0.005)
    assert mask0.sum() == 0 and shut.item() == 0.0


def test_batch_norm_backbone_variants():
    """Self-ensembling keeps per-domain batch statistics: a built-in backbone
    without batch norm is replaced by its -bn variant; one with batch norm is
    kept; an unknown one without is refused (skip, with the reason)."""
    import functools

    from dabench import backbones as bb
    from dabench_plugins.self_ensembling import batch_norm_backbone

    f, sub = batch_norm_backbone(bb.default_backbone, (2,))
    assert sub and bb.has_batch_norm(f((2,))[0]) and bb.has_batch_norm(f((1, 28, 28))[0])
    f, sub = batch_norm_backbone(bb.dann_mnist_backbone, (1, 28, 28))
    assert sub and bb.has_batch_norm(f((1, 28, 28))[0])
    keep = functools.partial(bb.mlp_backbone, norm=True)
    assert batch_norm_backbone(keep, (2,)) == (keep, False)
    wide = functools.partial(bb.mlp_backbone, hidden=16)
    f, sub = batch_norm_backbone(wide, (2,))
    assert sub and f((2,))[1] == 16 and bb.has_batch_norm(f((2,))[0])

    def plain(shape):
        return torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.ReLU()), 4

    assert batch_norm_backbone(plain, (2,)) == (None, False)


def test_self_ensembling_skips_a_backbone_without_batch_norm(registry):
    import dataclasses

    task, _ = make_task(registry, steps=2)

    def plain(shape):
        return torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.ReLU()), 4

    cls = registry.methods["self-ensembling"]
    assert cls.skip(task) is None  # the default backbone has a -bn variant
    reason = cls.skip(dataclasses.replace(task, backbone=plain))
    assert "batch normalisation" in reason and "default-bn" in reason


def test_self_ensembling_follows_the_reference_training_step(registry, monkeypatch):
    """From scratch (no source model), Adam at 1e-3; the student sees the source and
    the target batch in separate forward passes (each normalised with its own
    statistics); the teacher sees only its own target view, in training mode, so
    its batch-norm running statistics are target statistics; bn_variant is recorded."""
    import dabench_plugins.self_ensembling as se

    adams = []
    real_adam = torch.optim.Adam

    def spy_adam(params, **kw):
        adams.append(kw)
        return real_adam(params, **kw)

    monkeypatch.setattr(torch.optim, "Adam", spy_adam)
    views = []
    real_call = se.Augment.__call__

    def spy_aug(self, x):
        out = real_call(self, x)
        views.append(out)
        return out

    monkeypatch.setattr(se.Augment, "__call__", spy_aug)
    batches, modes = [], []
    real_forward = se.TeacherStudent.forward

    def spy_forward(self, x):
        batches.append((id(self), x))
        modes.append(self.training)
        return real_forward(self, x)

    monkeypatch.setattr(se.TeacherStudent, "forward", spy_forward)
    task, _ = make_task(registry, steps=3, batch_size=16)
    assert task.source_model is None and "source_model" not in registry.methods["self-ensembling"].requires
    with diagnostics.collect() as diag:
        pred = registry.methods["self-ensembling"]().fit(task)
    assert adams == [{"lr": 1e-3}]
    student_id = batches[0][0]
    teacher_id = next(i for i, _ in batches if i != student_id)
    assert [len(x) for i, x in batches if i == student_id] == [16] * 6  # never a mixed 32-row batch
    teacher_inputs = [x for i, x in batches if i == teacher_id]
    assert all(torch.equal(t, views[3 * k + 2]) for k, t in enumerate(teacher_inputs))  # the teacher's target view
    assert all(modes)
    assert diag["bn_variant"] == 1.0
    bn = [m for m in pred.encoders["target"].modules() if isinstance(m, torch.nn.BatchNorm1d)][0]
    assert int(bn.num_batches_tracked) == 3  # the teacher's own three target batches


def test_self_ensembling_mask_opens_and_engages(registry):
    """On the moons the teacher becomes confident on the target: the confidence
    mask opens over training (the consistency term acts) and engaged is 1."""
    task, _ = make_task(registry, steps=300, batch_size=64)
    with diagnostics.collect() as diag:
        registry.methods["self-ensembling"]().fit(task)
    assert diag["mask_rate_q1"] < diag["mask_rate_q4"]
    assert diag["mask_rate_q4"] >= 0.1 and diag["engaged"] == 1.0


# --------------------------------------------------------------------------
# CAN
# --------------------------------------------------------------------------


def test_spherical_kmeans_maps_target_clusters_to_source_class_centres():
    """Initialised with source class centres, cluster c is class c even when the
    target clusters are rotated and scaled away from the source."""
    from dabench_plugins.can import class_centres, spherical_kmeans

    g = torch.Generator().manual_seed(0)
    dirs = torch.eye(4)[:3] * 3 + 0.5  # three class directions in 4-d
    ys = torch.arange(3).repeat_interleave(50)
    fs = dirs[ys] + 0.3 * torch.randn(150, 4, generator=g)
    yt = torch.arange(3).repeat_interleave(40)
    a = torch.tensor(0.35)  # a 20-degree rotation in the plane of the first two axes
    rot = torch.eye(4)
    rot[:2, :2] = torch.stack([torch.stack([a.cos(), -a.sin()]), torch.stack([a.sin(), a.cos()])])
    ft = 5.0 * (dirs[yt] @ rot) + 0.5 * torch.randn(120, 4, generator=g)
    assign, dist, centres = spherical_kmeans(ft, class_centres(fs, ys, 3))
    assert (assign == yt).float().mean() > 0.95
    assert dist.shape == (120,) and (dist >= 0).all()


def test_cdd_is_lower_when_target_classes_align_with_source_classes():
    """Intra-class discrepancy is small and inter-class large when target class c
    sits on source class c; with the target classes swapped, CDD rises."""
    from dabench_plugins.can import cdd

    g = torch.Generator().manual_seed(0)
    m = 16
    mu = torch.tensor([[0.0, 0.0], [4.0, 4.0]])
    s = torch.cat([mu[c] + 0.3 * torch.randn(m, 2, generator=g) for c in (0, 1)])
    t_aligned = torch.cat([mu[c] + 0.3 * torch.randn(m, 2, generator=g) for c in (0, 1)])
    t_swapped = torch.cat([t_aligned[m:], t_aligned[:m]])
    aligned, intra_a, inter_a = cdd([s], [t_aligned], m)
    swapped, intra_s, inter_s = cdd([s], [t_swapped], m)
    assert aligned < 0 < swapped
    assert intra_a < intra_s and inter_a > inter_s
    # gradient descent on CDD moves the target features of class 0 towards source class 0
    t = t_swapped.clone().requires_grad_(True)
    opt = torch.optim.SGD([t], lr=0.5)
    for _ in range(50):
        opt.zero_grad()
        cdd([s], [t], m)[0].backward()
        opt.step()
    assert cdd([s], [t.detach()], m)[0] < swapped


def test_can_trains_cdd_on_class_aware_batches(registry, monkeypatch):
    """No warm-up: every step computes CDD on equal per-class source and target
    blocks (m rows per class), and clustering runs once per loop."""
    import dabench_plugins.can as can_mod

    seen, clusters = [], []
    real_cdd, real_cluster = can_mod.cdd, can_mod.CAN.cluster

    def spy_cdd(src_layers, tgt_layers, m, *a):
        seen.append((src_layers[0].shape[0], tgt_layers[0].shape[0], m, len(src_layers)))
        return real_cdd(src_layers, tgt_layers, m, *a)

    def spy_cluster(self, *a):
        out = real_cluster(self, *a)
        clusters.append(out)
        return out

    monkeypatch.setattr(can_mod, "cdd", spy_cdd)
    monkeypatch.setattr(can_mod.CAN, "cluster", spy_cluster)
    task, _ = make_task(registry, steps=30, source_lr=0.05)
    registry.methods["can"](loops=3, dist_threshold=0.5).fit(task)
    assert len(clusters) == 3
    assert len(seen) == 30
    assert all(ns == nt == 2 * m and layers == 2 for ns, nt, m, layers in seen)


def test_align_clusters_matches_final_centres_to_the_source_centres():
    """The reference's align_centers: a cluster that ended nearest source class c
    is labelled c, one-to-one, even when k-means permuted them."""
    from dabench_plugins.can import align_clusters

    init = torch.eye(4)
    final = init[[2, 0, 3, 1]] + 0.1  # cluster 0 ended at class 2's centre, etc.
    assert align_clusters(final, init).tolist() == [2, 0, 3, 1]


def test_can_clusters_start_at_the_source_model_class_centres(registry, monkeypatch):
    """The first clustering starts from the class centres of the *shared source
    model's* source features (Kang et al. Sec. 3.3: cluster c starts as class c),
    and its clusters agree with the source model's predictions as far as
    nearest-centre assignment does."""
    import dabench_plugins.can as can_mod
    from dabench.training import stream_seed

    inits = []
    real_kmeans = can_mod.spherical_kmeans

    def spy(feats, init, *a, **k):
        inits.append(init.clone())
        return real_kmeans(feats, init, *a, **k)

    monkeypatch.setattr(can_mod, "spherical_kmeans", spy)
    task, _ = make_task(registry, steps=20, source_lr=0.05)
    with diagnostics.collect() as diag:
        registry.methods["can"](loops=2).fit(task)
    enc, _ = task.source_model.build("cpu")
    Xs = torch.as_tensor(np.array(task.source_train.X))
    n = min(len(Xs), can_mod.MAX_CENTRE_SAMPLES)
    idx = torch.randperm(len(Xs), generator=torch.Generator().manual_seed(stream_seed(task.seed, 3)))[:n]
    with torch.no_grad():
        expected = can_mod.class_centres(enc.eval()(Xs[idx]), torch.as_tensor(task.source_train.y)[idx], 2)
    assert len(inits) == 2
    assert torch.allclose(inits[0], expected, atol=1e-5)
    assert not torch.allclose(inits[1], expected, atol=1e-5)  # later loops: the adapted network's centres
    assert 0.5 < diag["cluster_agreement_q1"] <= 1.0
    assert 0 < diag["kept_fraction"] <= 1 and diag["cdd_active"] > 0 and diag["engaged"] == 1.0


# --------------------------------------------------------------------------
# All three: determinism on CPU
# --------------------------------------------------------------------------


@pytest.mark.parametrize("name,params", [("cbst", {}), ("self-ensembling", {}),
                                         ("can", {"dist_threshold": 0.5})])
def test_seeded_fit_is_deterministic_on_cpu(registry, name, params):
    task, split = make_task(registry, steps=40, source_lr=0.05)
    X = split.target_test.X
    a = registry.methods[name](**params).fit(task).predict_proba(X)
    b = registry.methods[name](**params).fit(task).predict_proba(X)
    assert np.array_equal(a, b)


def test_image_pair_runs_with_image_augmentation(registry):
    """The CNN path: digits (1x8x8) -> itself, two steps each."""
    task, split = make_task(registry, "digits:digits", steps=4, batch_size=16, max_source=200, max_target=200,
                            source_lr=0.05)
    for name in ("cbst", "self-ensembling", "can"):
        p = registry.methods[name](**({"dist_threshold": 0.5} if name == "can" else {})).fit(task)
        proba = p.predict_proba(split.target_test.X[:5])
        assert proba.shape == (5, 10) and np.allclose(proba.sum(1), 1)
