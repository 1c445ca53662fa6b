"""CBST: class-balanced self-training.

Zou, Yu, Vijaya Kumar, Wang. "Unsupervised Domain Adaptation for Semantic
Segmentation via Class-Balanced Self-Training", ECCV 2018.

The paper adapts a segmentation network pixel by pixel; here the same
procedure runs on whole samples (one prediction per sample instead of one
per pixel), which is what the self-training formulation itself describes.

What is followed:

- Self-training as alternating optimisation (Sec. 3.2-3.3): the network is
  first trained on labelled source data; then, for ``rounds`` rounds, (a) the
  current model labels the target (pseudo-label generation, network fixed),
  and (b) the network is trained on source labels plus the selected
  pseudo-labelled target samples (pseudo-labels fixed) with cross-entropy,
  Eq. 3: ``min_w  - sum_s y_s log p(x_s)  - sum_t sum_c yhat_t^c log p(c|x_t)``.
- Class-balanced selection (Sec. 3.3, Eq. 5 and Algorithm 2): for each class
  ``c``, take the confidences ``max_c' p(c'|x_t)`` of the target samples whose
  prediction is ``c``, sort them in descending order and set
  ``exp(-k_c)`` to the value at rank ``p * N_c``: the top ``p``-portion of
  *each* class's predictions.  Then ``yhat_t = argmax_c p(c|x_t) / exp(-k_c)``
  and the sample is selected only when that maximum is at least 1
  (``yhat_t = 0`` otherwise).  A single global threshold would pick only the
  classes the model is most confident about (easy classes dominate); the
  per-class ``k_c`` keeps every predicted class represented.
- The portion schedule (Sec. 4.3, "Implementation details"): ``p`` starts at
  ``portion0`` (20%), grows by ``portion_step`` (5%) every round and is capped
  at ``portion_max`` (50%).
- SGD with momentum 0.9 and the shared benchmark schedule
  ``lr / (1 + 10 q) ** 0.75`` over the whole run's progress ``q``; every
  training step of a round draws one batch of labelled source samples and
  one batch of selected pseudo-labelled target samples
  (``task.budget.batch_size`` each) and minimises
  ``CE_source + target_weight * CE_target``.

Simplified or changed, and why:

- Budget: source pre-training takes ``warmup`` of ``task.budget.steps`` SGD
  steps and the rest is split evenly among the rounds, so the whole run
  costs ``task.budget.steps`` steps (the paper fine-tunes each round for a
  fixed number of epochs from an ImageNet-pretrained, source-trained model).
  Pseudo-labelling one round costs one forward pass over the target train
  set; a round's step forwards a source and a target batch.  Measured on the
  quick suite: about 1.1-1.3x the source-only wall time on the MLP pairs and
  1.8x on digits->mnist.
- One network (backbone + linear head) shared by all benchmark methods; no
  spatial priors (CBST-SP) since the inputs are not segmentation maps.
- ``target_weight`` (1 in the paper) is exposed as a hyperparameter.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from dabench import Float, Int, Method, Task, hookimpl
from dabench.training import (
    BACKBONE_LR_MULT,
    CHECK_EVERY,
    TensorBatches,
    TorchPredictor,
    annealed_lr,
    check_finite,
    backbone_param_groups,
    make_sgd,
    progress,
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
    """``exp(-k_c)`` per class (Zou et al. 2018, Algorithm 2).

    For each class ``c``, the confidences of the samples predicted as ``c``
    are sorted in descending order; the threshold is the value at rank
    ``ceil(p * N_c)`` (1-based), so that the top ``p``-portion of every
    predicted class reaches its threshold.  Classes nobody predicts get an
    infinite threshold (nothing can be selected for them).
    """
    conf, pred = proba.max(dim=1)
    n_classes = proba.shape[1]
    thr = torch.full((n_classes,), math.inf, dtype=proba.dtype, device=proba.device)
    for c in range(n_classes):
        mc = conf[pred == c]
        if mc.numel() == 0:
            continue
        mc, _ = torch.sort(mc, descending=True)
        rank = max(1, math.ceil(portion * mc.numel()))
        thr[c] = mc[min(rank, mc.numel()) - 1]
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


class CBST(Method):
    """Class-balanced self-training with per-class confidence thresholds (Zou et al. 2018)."""

    name = "cbst"
    family = "self-training"
    version = "1"
    requires = frozenset({"same_feature_space", "arrays"})
    paper = ("Zou et al., Unsupervised Domain Adaptation for Semantic Segmentation via "
             "Class-Balanced Self-Training, ECCV 2018")
    hyperparameters = {
        "lr": Float(0.01, 1e-3, 0.1, log=True, help="initial SGD learning rate (annealed over the whole run)"),
        "weight_decay": Float(5e-4, 1e-6, 1e-2, log=True, help="L2 weight decay"),
        "backbone_lr_mult": BACKBONE_LR_MULT,
        "warmup": Float(0.4, 0.1, 0.9, help="fraction of the step budget spent on source pre-training"),
        "rounds": Int(3, 1, 10, help="self-training rounds (pseudo-label, then train)"),
        "portion0": Float(0.2, 0.05, 1.0, help="portion p of each class selected in the first round"),
        "portion_step": Float(0.05, 0.0, 0.5, help="increase of p per round"),
        "portion_max": Float(0.5, 0.05, 1.0, help="cap on p"),
        "target_weight": Float(1.0, 0.1, 3.0, log=True, help="weight of the pseudo-label cross-entropy"),
    }

    def fit(self, task: Task) -> TorchPredictor:
        seed_everything(task.seed)
        device = resolve_device(task.device)
        encoder, dim = task.backbone(task.source_shape)
        classifier = nn.Linear(dim, task.n_classes)
        for m in (encoder, classifier):
            m.to(device).train()
        params = backbone_param_groups(encoder, classifier, self.backbone_lr_mult)
        opt = make_sgd(params, lr=self.lr, momentum=0.9, weight_decay=self.weight_decay)
        bs = task.budget.batch_size
        src = TensorBatches(task.source_train.X, task.source_train.y, batch_size=bs,
                            device=device, seed=stream_seed(task.seed, 1))
        Xt = src.X.new_tensor(np.array(task.target_train.X, copy=True))

        steps = task.budget.steps
        warm = min(steps, max(1, round(self.warmup * steps)))
        per_round = np.diff(np.linspace(warm, steps, self.rounds + 1).round().astype(int))
        portions = portion_schedule(self.rounds, self.portion0, self.portion_step, self.portion_max)

        loss = torch.zeros((), device=device)
        step = 0

        def sgd_step(loss_value: torch.Tensor) -> None:
            opt.zero_grad(set_to_none=True)
            loss_value.backward()
            opt.step()

        for _ in range(warm):
            set_lr(opt, annealed_lr(progress(step, steps), self.lr))
            s = src.next()
            loss = F.cross_entropy(classifier(encoder(s.x)), s.y)
            sgd_step(loss)
            check_finite(loss, step, every=CHECK_EVERY)
            step += 1

        for r, (n_steps, portion) in enumerate(zip(per_round, portions)):
            if n_steps <= 0:
                continue
            labels, selected = select_pseudo_labels(predict_all(encoder, classifier, Xt), portion)
            idx = selected.nonzero().squeeze(1)
            log.debug("cbst round %d: p=%.3f, %d of %d target samples selected", r, portion, len(idx), len(Xt))
            tgt = TensorBatches(Xt[idx], labels[idx], batch_size=bs, device=device,
                                seed=stream_seed(task.seed, 100 + r))
            for _ in range(int(n_steps)):
                set_lr(opt, annealed_lr(progress(step, steps), self.lr))
                s, t = src.next(), tgt.next()
                logits = classifier(encoder(torch.cat([s.x, t.x])))
                ns = len(s.x)
                loss = (F.cross_entropy(logits[:ns], s.y)
                        + self.target_weight * F.cross_entropy(logits[ns:], t.y))
                sgd_step(loss)
                check_finite(loss, step, every=CHECK_EVERY)
                step += 1
        check_finite(loss, steps)
        return TorchPredictor(encoder, classifier, device)


@hookimpl
def dabench_methods(register) -> None:  # type: ignore[no-untyped-def]
    register(CBST)
