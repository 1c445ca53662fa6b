"""CBST: class-balanced self-training.

Zou, Yu, Vijaya Kumar, Wang. "Unsupervised Domain Adaptation for Semantic
Segmentation via Class-Balanced Self-Training", ECCV 2018.

The paper adapts a segmentation network pixel by pixel; here the same
procedure runs on whole samples (one prediction per sample instead of one
per pixel), which is what the self-training formulation itself describes.

Reference code: github.com/yzou2/CBST (``issegm/solve_AO.py`` drives the
rounds, the self-training script computes ``kc_parameters`` and the
pseudo-labels).

What is followed:

- Self-training as alternating optimisation (Sec. 3.2-3.3), starting, as in
  the paper, from a network trained on the labelled source: the host's
  shared source model (``task.source_model``), so every one of
  ``task.budget.steps`` steps is adaptation.  For ``rounds`` rounds: (a) the
  *current* model labels the whole target train split (pseudo-label
  generation, network fixed; the reference re-runs its validation phase
  with the latest round's weights), then (b) the network is trained on
  source labels plus the selected pseudo-labelled target samples
  (pseudo-labels fixed) with cross-entropy, Eq. 3:
  ``min_w  - sum_s y_s log p(x_s)  - sum_t sum_c yhat_t^c log p(c|x_t)``.
- Class-balanced selection (Sec. 3.3, Eq. 5 and Algorithm 2; the
  reference's ``kc_parameters`` with ``--kc-policy cb``): for each class
  ``c``, the confidences ``max_c' p(c'|x_t)`` of the target samples
  predicted ``c`` are sorted in descending order and ``exp(-k_c)`` is the
  value at rank ``floor(p * N_c)``: the top ``p``-portion of *each*
  predicted class.  Then ``yhat_t = argmax_c p(c|x_t) / exp(-k_c)`` and the
  sample is selected only when that maximum is at least 1 (ignored
  otherwise).  A single global threshold would pick only the classes the
  model is most confident about; the per-class ``k_c`` keeps every
  predicted class represented.
- The portion schedule (Sec. 4.3 and ``solve_AO.py``): ``p`` starts at
  ``portion0`` (20 %, the paper), grows by ``portion_step`` (5 %) every
  round and is capped at ``portion_max`` (50 %).  The default 7 rounds
  run the whole schedule 20, 25, ..., 50 %: the late, larger portions are
  where samples beyond the source model's easiest ones enter.
- Learning rate: SGD with momentum 0.9; the reference divides the rate by
  ``sqrt(2)`` after every round (``lr = lr / math.sqrt(2)``) and keeps it
  constant within a round; so does this plugin.  Each step draws one batch
  of labelled source samples and one of selected pseudo-labelled target
  samples (``task.budget.batch_size`` each, forwarded together as the
  reference mixes source and target images) and minimises
  ``CE_source + target_weight * CE_target``.

Simplified or changed, and why:

- The paper adapts a segmentation network pixel by pixel; here the same
  procedure runs on whole samples (one prediction per sample).  No spatial
  priors (CBST-SP), no rare-class mining (``--mine-port``), no source
  image sub-sampling: they are segmentation-specific.
- Budget: ``task.budget.steps`` is split evenly among the rounds (the
  reference trains a fixed number of epochs per round).  A class with
  ``floor(p * N_c) = 0`` gets no pseudo-labels that round (the reference
  sets its threshold to 1, which only a probability of exactly 1 reaches).
- Version 1 trained its own source model in the first 40 % of its budget
  and ran 3 rounds (20, 25, 30 %): it only ever selected the 20-30 % of the
  target its short warm-up was surest of (samples it already got right)
  and learned nothing new from them.
- Cost: ``rounds`` forward passes over the target train split plus
  ``task.budget.steps`` steps on a source and a target batch (about 2x a
  source-only step); the source model itself is trained once by the host.

Health signals (:mod:`dabench.diagnostics`); pseudo-label *accuracy* needs
target labels and is not recorded:

- ``pseudo_label_rate`` (and ``_q1``..``_q4`` per quarter of the steps):
  the fraction of the target train split selected;
- ``pseudo_label_agreement`` (and per quarter): the fraction of the
  selected pseudo-labels equal to the source model's prediction (1 in the
  first round by construction; below 1 later when the adapted model
  labels samples differently);
- ``pred_change``: the fraction of the target train split whose predicted
  class after adaptation differs from the source model's;
- ``engaged``: 1 when pseudo-labels were used (mean rate >= 5 %) and the
  predictions moved on at least 1 % of the target, else 0.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from dabench import Float, Int, Method, Task, diagnostics, hookimpl
from dabench.training import (
    BACKBONE_LR_MULT,
    CHECK_EVERY,
    TensorBatches,
    TorchPredictor,
    check_finite,
    backbone_param_groups,
    make_sgd,
    resolve_device,
    seed_everything,
    set_lr,
    stream_seed,
)

log = logging.getLogger(__name__)


def portion_schedule(rounds: int, portion0: float, step: float, portion_max: float) -> list[float]:
    """The portion ``p`` of each round: ``min(portion0 + r * step, portion_max)``."""
    return [min(portion0 + r * step, portion_max) for r in range(rounds)]


def class_balanced_thresholds(proba: torch.Tensor, portion: float) -> torch.Tensor:
    """``exp(-k_c)`` per class (Zou et al. 2018, Algorithm 2; the reference's
    ``kc_parameters``).

    For each class ``c``, the confidences of the samples predicted as ``c``
    are sorted in descending order; the threshold is the value at rank
    ``floor(p * N_c)`` (1-based), so that the top ``p``-portion of every
    predicted class reaches its threshold.  Classes nobody predicts, or too
    few for one sample at portion ``p``, get an infinite threshold (nothing
    is selected for them).
    """
    conf, pred = proba.max(dim=1)
    n_classes = proba.shape[1]
    thr = torch.full((n_classes,), math.inf, dtype=proba.dtype, device=proba.device)
    for c in range(n_classes):
        mc = conf[pred == c]
        if mc.numel() == 0:
            continue
        mc, _ = torch.sort(mc, descending=True)
        rank = min(mc.numel(), math.floor(portion * mc.numel() + 1e-9))
        if rank >= 1:
            thr[c] = mc[rank - 1]
    return thr


def select_pseudo_labels(proba: torch.Tensor, portion: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Class-balanced pseudo-labels (Zou et al. 2018, Eq. 5).

    Returns ``(labels, selected)``: ``labels = argmax_c p_c / exp(-k_c)`` and
    ``selected`` is True where that normalised maximum is at least 1.
    """
    thr = class_balanced_thresholds(proba, portion)
    ratio = proba / thr[None, :]  # inf threshold -> ratio 0
    best, labels = ratio.max(dim=1)
    return labels, best >= 1.0


@torch.no_grad()
def predict_all(encoder: nn.Module, classifier: nn.Module, X: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Softmax probabilities of the current model on every row of ``X`` (eval mode)."""
    encoder.eval()
    classifier.eval()
    out = [torch.softmax(classifier(encoder(X[i:i + batch_size])), dim=1) for i in range(0, len(X), batch_size)]
    encoder.train()
    classifier.train()
    return torch.cat(out)


def round_learning_rates(lr: float, rounds: int) -> list[float]:
    """The reference's per-round rates: ``lr / sqrt(2) ** r`` for round ``r``."""
    return [lr / math.sqrt(2.0) ** r for r in range(rounds)]


#: ``engaged`` needs at least this mean pseudo-label rate ...
ENGAGED_MIN_RATE = 0.05
#: ... and at least this fraction of target predictions changed.
ENGAGED_MIN_CHANGE = 0.01


class CBST(Method):
    """Class-balanced self-training with per-class confidence thresholds (Zou et al. 2018)."""

    name = "cbst"
    family = "self-training"
    version = "2"
    requires = frozenset({"same_feature_space", "source_model", "arrays"})
    requires_contract = "1.2"
    paper = ("Zou et al., Unsupervised Domain Adaptation for Semantic Segmentation via "
             "Class-Balanced Self-Training, ECCV 2018")
    hyperparameters = {
        "lr": Float(0.01, 1e-4, 0.1, log=True,
                    help="SGD learning rate of the first round (divided by sqrt(2) every round, as the reference)"),
        "weight_decay": Float(5e-4, 1e-6, 1e-2, log=True, help="L2 weight decay"),
        "backbone_lr_mult": BACKBONE_LR_MULT,
        "rounds": Int(7, 1, 20, help="self-training rounds (pseudo-label with the current model, then train)"),
        "portion0": Float(0.2, 0.05, 1.0, help="portion p of each class selected in the first round"),
        "portion_step": Float(0.05, 0.0, 0.5, help="increase of p per round"),
        "portion_max": Float(0.5, 0.05, 1.0, help="cap on p"),
        "target_weight": Float(1.0, 0.1, 3.0, log=True, help="weight of the pseudo-label cross-entropy"),
    }

    def fit(self, task: Task) -> TorchPredictor:
        seed_everything(task.seed)
        device = resolve_device(task.device)
        encoder, classifier = task.source_model.build(device)
        params = backbone_param_groups(encoder, classifier, self.backbone_lr_mult)
        opt = make_sgd(params, lr=self.lr, momentum=0.9, weight_decay=self.weight_decay)
        bs = task.budget.batch_size
        src = TensorBatches(task.source_train.X, task.source_train.y, batch_size=bs,
                            device=device, seed=stream_seed(task.seed, 1))
        Xt = src.X.new_tensor(np.array(task.target_train.X, copy=True))

        steps = task.budget.steps
        per_round = np.diff(np.linspace(0, steps, self.rounds + 1).round().astype(int))
        portions = portion_schedule(self.rounds, self.portion0, self.portion_step, self.portion_max)
        lrs = round_learning_rates(self.lr, self.rounds)

        loss = torch.zeros((), device=device)
        step = 0
        source_pred: torch.Tensor | None = None
        rate_per_step: list[float] = []
        agree_per_step: list[float] = []
        for r, (n_steps, portion) in enumerate(zip(per_round, portions)):
            if n_steps <= 0:
                continue
            proba = predict_all(encoder, classifier, Xt)
            if source_pred is None:  # the first labelling is the source model's
                source_pred = proba.argmax(1)
            labels, selected = select_pseudo_labels(proba, portion)
            idx = selected.nonzero().squeeze(1)
            rate = len(idx) / max(1, len(Xt))
            agree = float((labels[idx] == source_pred[idx]).float().mean()) if len(idx) else float("nan")
            rate_per_step += [rate] * int(n_steps)
            agree_per_step += [agree] * int(n_steps)
            log.debug("cbst round %d: p=%.3f, %d of %d target samples selected (%.3f agree with the source model)",
                      r, portion, len(idx), len(Xt), agree)
            set_lr(opt, lrs[r])
            if len(idx) == 0:  # nothing selected: train on the source alone this round
                for _ in range(int(n_steps)):
                    s = src.next()
                    loss = F.cross_entropy(classifier(encoder(s.x)), s.y)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    check_finite(loss, step, every=CHECK_EVERY)
                    step += 1
                continue
            tgt = TensorBatches(Xt[idx], labels[idx], batch_size=bs, device=device,
                                seed=stream_seed(task.seed, 100 + r))
            for _ in range(int(n_steps)):
                s, t = src.next(), tgt.next()
                logits = classifier(encoder(torch.cat([s.x, t.x])))
                ns = len(s.x)
                loss = (F.cross_entropy(logits[:ns], s.y)
                        + self.target_weight * F.cross_entropy(logits[ns:], t.y))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                check_finite(loss, step, every=CHECK_EVERY)
                step += 1
        check_finite(loss, steps)
        self._record(rate_per_step, agree_per_step, source_pred,
                     predict_all(encoder, classifier, Xt).argmax(1) if source_pred is not None else None)
        return TorchPredictor(encoder, classifier, device)

    @staticmethod
    def _record(rates: list[float], agree: list[float], before: torch.Tensor | None,
                after: torch.Tensor | None) -> None:
        diagnostics.quarters(rates, "pseudo_label_rate")
        # over the steps of rounds that selected something (undefined otherwise)
        diagnostics.quarters([a for a in agree if a == a], "pseudo_label_agreement")
        change = float((before != after).float().mean()) if before is not None and after is not None else 0.0
        diagnostics.record("pred_change", change)
        mean_rate = sum(rates) / len(rates) if rates else 0.0
        diagnostics.record("engaged", float(mean_rate >= ENGAGED_MIN_RATE and change >= ENGAGED_MIN_CHANGE))


@hookimpl
def dabench_methods(register) -> None:  # type: ignore[no-untyped-def]
    register(CBST)
