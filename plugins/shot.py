"""SHOT: source hypothesis transfer (source-free domain adaptation).

Liang, Hu, Feng. "Do We Really Need to Access the Source Data? Source
Hypothesis Transfer for Unsupervised Domain Adaptation", ICML 2020;
reference code tim-learn/SHOT (``digit/uda_digit.py``, ``train_target`` and
``obtain_label``), whose digit settings are the defaults here.

Track ``source-free``: the method gets the host's shared source model and
the unlabelled target train inputs, no source data.

What is followed:

- **Frozen hypothesis** (Sec. 3.1): the source classifier (the linear head
  of the shared source model) is kept fixed; only the feature encoder is
  trained on the target, in train mode (batch normalisation uses batch
  statistics, as ``netF.train()`` in the reference).
- **Information maximisation** (Sec. 3.2, Eq. 3): per batch
  ``L_ent - L_div`` with ``L_ent`` the mean prediction entropy and
  ``L_div`` the entropy of the mean prediction (the diversity term,
  ``gent``), both with ``log(p + 1e-5)`` as in the reference, weighted by
  ``ent_par`` (1.0).
- **Self-supervised pseudo-labels** (Sec. 3.3, Eq. 4-6): at the start of
  every epoch over the target train set, in eval mode, the features of all
  target points (with a constant 1 appended and L2-normalised, as the
  reference's ``obtain_label``) give class centroids weighted by the
  softmax predictions; each point takes the class of its nearest centroid
  in cosine distance; the centroids are then recomputed from these hard
  labels and the labelling repeated once.  The pseudo-labels enter a
  cross-entropy weighted by ``cls_par`` (beta = 0.3 for digits).
- Optimiser as the reference: SGD, momentum 0.9, Nesterov, weight decay
  1e-3, learning rate ``lr * (1 + 10 p) ** -0.75`` over the run's progress
  ``p`` (lr 0.01).

Changed, and why:

- **Budget**: ``epochs`` passes over the target train set (30, as the
  reference's ``max_epoch``), at most ``task.budget.steps`` steps of
  ``task.budget.batch_size`` target samples; an epoch is
  ``ceil(n_target / batch_size)`` steps and pseudo-labels are refreshed at
  each epoch's start.  Batches are drawn without replacement and the
  incomplete tail of an epoch is skipped (the reference keeps it).
- **The source model** is the host's shared one (backbone + linear head,
  cross-entropy; see :mod:`dabench.source_model`), not SHOT's source recipe
  (a BN bottleneck, a weight-normalised head and label smoothing 0.1).
- **Empty classes**: a class that no point joins in the hard-label round
  gets no centroid (infinite distance).  The digit reference computes a
  zero centroid whose cosine distance is NaN, and ``argmin`` then picks
  that class for every point; its object-recognition code keeps only
  classes above a count threshold, which this follows with threshold 0.

Health signals (``dabench.diagnostics``): ``pl_agree_source_first`` /
``pl_agree_source_last`` (agreement of the first and last pseudo-labelling
with the source model's own predictions: 1.0 means the pseudo-labels add
nothing), ``pl_changed`` (mean fraction of pseudo-labels changed between
consecutive labellings), the IM terms on the target train set before and
after (``im_entropy_start``/``_end``, ``im_diversity_start``/``_end``),
``pred_changed`` (fraction of target train predictions that differ from the
source model's) and ``engaged`` (1.0 when ``pred_changed`` >= 1%).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from dabench import Bool, Float, Int, Method, Task, diagnostics, hookimpl
from dabench.tracks import input_batches
from dabench.training import (
    CHECK_EVERY,
    TensorBatches,
    TorchPredictor,
    annealed_lr,
    check_finite,
    progress,
    resolve_device,
    seed_everything,
    set_lr,
    stream_seed,
)

#: The reference's epsilon inside ``log(p + eps)``.
EPS = 1e-5


def entropy(p: torch.Tensor) -> torch.Tensor:
    """Per-row entropy ``-sum p log(p + 1e-5)`` (the reference's ``loss.Entropy``)."""
    return -(p * torch.log(p + EPS)).sum(dim=1)


def im_terms(p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean entropy, entropy of the mean prediction)`` of softmax rows ``p``:
    information maximisation minimises the first and maximises the second."""
    m = p.mean(dim=0)
    return entropy(p).mean(), -(m * torch.log(m + EPS)).sum()


def _cosine_nearest(features: torch.Tensor, centroids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    f = F.normalize(features, dim=1)
    c = F.normalize(centroids, dim=1)
    dist = 1.0 - f @ c.T
    dist[:, ~valid] = math.inf
    return dist.argmin(dim=1)


def centroid_pseudo_labels(features: torch.Tensor, proba: torch.Tensor) -> torch.Tensor:
    """SHOT's self-supervised pseudo-labels (Liang et al. 2020, Eq. 4-6;
    ``obtain_label`` of the reference code).

    ``features`` get a constant 1 column and are L2-normalised; centroids
    ``c_k = sum_x p_k(x) f(x) / sum_x p_k(x)`` weighted by the softmax
    ``proba``; labels by the nearest centroid in cosine distance; then one
    more round with centroids of the hard labels (classes without a member
    are left out).
    """
    f = torch.cat([features, torch.ones(len(features), 1, dtype=features.dtype, device=features.device)], dim=1)
    f = F.normalize(f, dim=1)
    k = proba.shape[1]
    aff = proba
    centroids = aff.T @ f / (1e-8 + aff.sum(dim=0)[:, None])
    labels = _cosine_nearest(f, centroids, torch.ones(k, dtype=torch.bool, device=f.device))
    aff = F.one_hot(labels, k).to(f.dtype)
    counts = aff.sum(dim=0)
    centroids = aff.T @ f / (1e-8 + counts[:, None])
    return _cosine_nearest(f, centroids, counts > 0)


@torch.no_grad()
def _features_and_proba(encoder: nn.Module, classifier: nn.Module, X: Any, device: torch.device,
                        batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Features and softmax of every row of ``X`` (an array or a streamed
    domain, test transform) in eval mode."""
    was = encoder.training
    encoder.eval()
    feats, probs = [], []
    for x, _ in input_batches(X, batch_size, device=device):
        z = encoder(x)
        feats.append(z)
        probs.append(torch.softmax(classifier(z), dim=1))
    encoder.train(was)
    return torch.cat(feats), torch.cat(probs)


class SHOT(Method):
    """Source hypothesis transfer: frozen source classifier, information
    maximisation and centroid pseudo-labels on the target (Liang et al. 2020)."""

    name = "shot"
    family = "self-training"
    version = "1"
    track = "source-free"
    requires = frozenset({"same_feature_space", "source_model"})
    requires_contract = "1.3"
    paper = ("Liang, Hu, Feng, Do We Really Need to Access the Source Data? Source Hypothesis Transfer for "
             "Unsupervised Domain Adaptation, ICML 2020 (SHOT)")
    hyperparameters = {
        "lr": Float(0.01, 1e-4, 0.1, log=True, help="initial SGD learning rate, annealed (1 + 10 p)^-0.75"),
        "cls_par": Float(0.3, 0.0, 1.0, help="beta: weight of the pseudo-label cross-entropy (0 = SHOT-IM)"),
        "ent_par": Float(1.0, 0.0, 2.0, help="weight of the information-maximisation loss"),
        "diversity": Bool(True, help="include the diversity term (entropy of the mean prediction; 'gent')"),
        "weight_decay": Float(1e-3, 1e-6, 1e-2, log=True, help="L2 weight decay (reference: 1e-3)"),
        "epochs": Int(30, 1, 100, help="passes over the target train set (reference: 30), capped by the budget's steps"),
    }

    def fit(self, task: Task) -> TorchPredictor:
        seed_everything(task.seed)
        device = resolve_device(task.device)
        encoder, classifier = task.source_model.build(str(device))
        classifier.eval()
        classifier.requires_grad_(False)  # the source hypothesis stays fixed
        encoder.train()
        opt = torch.optim.SGD(encoder.parameters(), lr=self.lr, momentum=0.9, nesterov=True,
                              weight_decay=self.weight_decay)
        bs = task.budget.batch_size
        Xt = task.target_train.X
        batches = TensorBatches(Xt, batch_size=bs, device=device, seed=stream_seed(task.seed, 2))
        interval = max(1, math.ceil(batches.n / batches.batch_size))
        steps = min(task.budget.steps, self.epochs * interval)

        _, p0 = _features_and_proba(encoder, classifier, Xt, device)
        source_pred = p0.argmax(1)
        ent0, div0 = im_terms(p0)

        labels: torch.Tensor | None = None
        agree_first = agree_last = math.nan
        changed: list[float] = []
        loss = torch.zeros((), device=device)
        for step in range(steps):
            if self.cls_par > 0 and step % interval == 0:
                feats, proba = _features_and_proba(encoder, classifier, Xt, device)
                new = centroid_pseudo_labels(feats, proba)
                if labels is not None:
                    changed.append(float((new != labels).float().mean()))
                labels = new
                agree_last = float((labels == source_pred).float().mean())
                if math.isnan(agree_first):
                    agree_first = agree_last
            set_lr(opt, annealed_lr(progress(step, steps), self.lr))
            b = batches.next()
            out = classifier(encoder(b.x))
            p = torch.softmax(out, dim=1)
            loss = torch.zeros((), device=device)
            if self.cls_par > 0:
                loss = loss + self.cls_par * F.cross_entropy(out, labels[b.index])
            if self.ent_par > 0:
                ent, div = im_terms(p)
                loss = loss + self.ent_par * (ent - div if self.diversity else ent)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            check_finite(loss, step, every=CHECK_EVERY)
        check_finite(loss, steps)

        _, p1 = _features_and_proba(encoder, classifier, Xt, device)
        ent1, div1 = im_terms(p1)
        pred_changed = float((p1.argmax(1) != source_pred).float().mean())
        for name, value in (("pl_agree_source_first", agree_first), ("pl_agree_source_last", agree_last),
                            ("pl_changed", float(np.mean(changed)) if changed else math.nan),
                            ("im_entropy_start", float(ent0)), ("im_entropy_end", float(ent1)),
                            ("im_diversity_start", float(div0)), ("im_diversity_end", float(div1)),
                            ("pred_changed", pred_changed), ("engaged", float(pred_changed >= 0.01))):
            diagnostics.record(name, value)
        return TorchPredictor(encoder, classifier, device)


@hookimpl
def dabench_methods(register) -> None:  # type: ignore[no-untyped-def]
    register(SHOT)
