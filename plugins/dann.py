"""DANN: Domain-Adversarial Training of Neural Networks.

Ganin, Ustinova, Ajakan, Germain, Larochelle, Laviolette, Marchand, Lempitsky.
"Domain-Adversarial Training of Neural Networks", JMLR 17(59):1-35, 2016.

What is followed:

- Three parts (Sec. 4): feature extractor ``G_f`` = ``task.backbone(shape)``
  (for images of at least 20x20 the default backbone is the paper's MNIST
  extractor, conv5x5-32/pool/conv5x5-48/pool, Fig. 4, plus a 128-unit
  bottleneck), label predictor ``G_y`` (a linear layer on ``G_f``) and domain
  classifier ``G_d``: an MLP with ``disc_layers`` hidden layers of
  ``disc_hidden`` ReLU units and a logistic output.  The default, one hidden
  layer of 100 units, is the paper's MNIST domain classifier (Fig. 4); its
  SVHN/GTSRB/Office one is ``disc_layers=2, disc_hidden=1024``; TLlib's
  digit and Office discriminator is that with batch norm (``disc_bn``).
- The gradient reversal layer ``R`` between ``G_f`` and ``G_d`` (Sec. 4.2,
  Eq. 18): identity forward, gradient multiplied by ``-lambda`` backward, so one
  backward pass of ``L_y + L_d`` performs the saddle-point updates of Eqs.
  13-15 (``G_d`` descends ``L_d``, ``G_f`` ascends it with weight ``lambda``).
  ``L_d`` is the logistic loss on source (domain 0) plus on target (domain 1),
  each averaged over its batch, as in Eq. 18.
- Schedules (Sec. 5.2.2): ``lambda_p = lambda_max (2 / (1 + exp(-gamma p)) - 1)``
  with ``gamma = 10`` and SGD with momentum 0.9, learning rate
  ``mu_p = mu0 / (1 + alpha p) ** beta``, ``alpha = 10``, ``beta = 0.75``;
  ``p`` goes linearly from 0 to 1 over ``task.budget.steps`` steps.
- ``lambda`` only scales the reversed gradient reaching ``G_f``; ``G_d``
  always learns with weight 1 (Sec. 5.2.2: the schedule ``lambda_p`` is used
  for updating the feature extractor only, the domain classifier is updated
  with a fixed lambda of 1).
- Each step draws one batch of ``task.budget.batch_size`` labelled source
  samples and one of the same size of unlabelled target samples (the paper
  uses 128-sample batches, half from each domain).

Simplified or changed, and why:

- The label predictor is linear on a 128-d bottleneck instead of the paper's
  100-100-10 MLP, so all methods of the benchmark share one network
  (backbone + linear head) and differ only in their adaptation term.
- Small L2 weight decay (5e-4), also used by the source-only baseline.
- ``mu0`` is a hyperparameter (the paper: 0.01, the default here); the quick
  suite uses 0.03 for its short budgets.  Above the paper's rate the
  adversarial game can blow up (e.g. ``lr = 0.05``, ``lambda_max = 1`` gives
  a NaN loss on the covariate-shift pair); such a run fails with
  ``DivergedError`` rather than being rescued by tricks the paper does not
  use (feature normalisation, gradient clipping).
- Budgets are far shorter than the paper's (hundreds of steps, CPU-sized);
  the quick suite measures relative gains, not the paper's absolute numbers.

Health signals (:mod:`dabench.diagnostics`), read from the training batches
at no extra forward pass:

- ``disc_acc_start`` / ``disc_acc_end``: the domain classifier's accuracy
  (source vs target, threshold 0.5) over the first and the last tenth of the
  steps.  Near 0.5 at the end: the features fool it (or it never learned);
  near 1: the domains stay separable and the reversed gradient of a
  saturated classifier has all but vanished.
- ``engaged``: 1 when ``disc_acc_end`` is below :data:`ENGAGED_BELOW` (0.9),
  i.e. the classifier does not separate the domains at the end of training,
  so the adversarial term was still acting on the features; 0 otherwise.
  (A heuristic: the benchmark's reading of "the features never fool it".)
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from dabench import Bool, Float, Int, Method, Task, diagnostics, hookimpl
from dabench.training import (
    BACKBONE_LR_MULT,
    CHECK_EVERY,
    TensorBatches,
    TorchPredictor,
    annealed_lr,
    check_finite,
    grad_reverse,
    grl_lambda,
    backbone_param_groups,
    make_sgd,
    progress,
    resolve_device,
    seed_everything,
    set_lr,
    stream_seed,
)

#: ``engaged`` is 1 when the domain classifier's accuracy over the last tenth
#: of training is below this.
ENGAGED_BELOW = 0.9


def record_domain_accuracy(acc_per_step: list[torch.Tensor]) -> None:
    """Record ``disc_acc_start`` / ``disc_acc_end`` (mean domain-classifier
    accuracy over the first and last tenth of the steps) and ``engaged``."""
    if not acc_per_step:
        return
    acc = torch.stack(acc_per_step).float().cpu()
    tenth = max(1, len(acc) // 10)
    start, end = float(acc[:tenth].mean()), float(acc[-tenth:].mean())
    diagnostics.record("disc_acc_start", start)
    diagnostics.record("disc_acc_end", end)
    diagnostics.record("engaged", float(end < ENGAGED_BELOW))


def domain_classifier(in_dim: int, hidden: int, layers: int, batch_norm: bool = False) -> nn.Sequential:
    """``G_d``: ``layers`` hidden ReLU layers of ``hidden`` units, one logit out
    (with ``batch_norm``, ``BatchNorm1d`` before each ReLU, as TLlib's
    ``DomainDiscriminator``)."""
    mods: list[nn.Module] = []
    width = in_dim
    for _ in range(layers):
        mods += [nn.Linear(width, hidden), *([nn.BatchNorm1d(hidden)] if batch_norm else []), nn.ReLU()]
        width = hidden
    mods.append(nn.Linear(width, 1))
    return nn.Sequential(*mods)


class DANN(Method):
    """Domain-adversarial training with a gradient reversal layer (Ganin et al. 2016)."""

    name = "dann"
    family = "adversarial"
    version = "2"
    requires = frozenset({"same_feature_space"})
    paper = "Ganin et al., Domain-Adversarial Training of Neural Networks, JMLR 17(59):1-35, 2016"
    hyperparameters = {
        "lr": Float(0.01, 1e-3, 0.1, log=True, help="initial SGD learning rate mu0 (annealed)"),
        "weight_decay": Float(5e-4, 1e-6, 1e-2, log=True, help="L2 weight decay"),
        "backbone_lr_mult": BACKBONE_LR_MULT,
        "lambda_max": Float(1.0, 0.03, 3.0, log=True, help="final adaptation weight lambda"),
        "gamma": Float(10.0, 1.0, 30.0, log=True, help="steepness of the lambda schedule"),
        "disc_hidden": Int(100, 16, 1024, log=True, help="hidden units per domain-classifier layer"),
        "disc_layers": Int(1, 1, 3, help="hidden layers of the domain classifier"),
        "disc_bn": Bool(False, help="batch norm in the domain classifier's hidden layers (TLlib's discriminator)"),
    }

    def fit(self, task: Task) -> TorchPredictor:
        seed_everything(task.seed)
        device = resolve_device(task.device)
        encoder, dim = task.backbone(task.source_shape)
        classifier = nn.Linear(dim, task.n_classes)
        disc = domain_classifier(dim, self.disc_hidden, self.disc_layers, self.disc_bn)
        for m in (encoder, classifier, disc):
            m.to(device).train()
        params = backbone_param_groups(encoder, (classifier, disc), self.backbone_lr_mult)
        opt = make_sgd(params, lr=self.lr, momentum=0.9, weight_decay=self.weight_decay)
        bs = task.budget.batch_size
        src = TensorBatches(task.source_train.X, task.source_train.y, batch_size=bs,
                            device=device, seed=stream_seed(task.seed, 1))
        tgt = TensorBatches(task.target_train.X, batch_size=bs,
                            device=device, seed=stream_seed(task.seed, 2))
        ns, nt = src.batch_size, tgt.batch_size
        zeros = torch.zeros(ns, device=device)
        ones = torch.ones(nt, device=device)
        steps = task.budget.steps
        loss = torch.zeros(())
        disc_acc: list[torch.Tensor] = []
        for step in range(steps):
            p = progress(step, steps)
            set_lr(opt, annealed_lr(p, self.lr))
            lam = grl_lambda(p, self.gamma, self.lambda_max)
            s, t = src.next(), tgt.next()
            feats = encoder(torch.cat([s.x, t.x]))
            cls_loss = F.cross_entropy(classifier(feats[:ns]), s.y)
            d = disc(grad_reverse(feats, lam)).squeeze(1)
            dom_loss = (F.binary_cross_entropy_with_logits(d[:ns], zeros)
                        + F.binary_cross_entropy_with_logits(d[ns:], ones))
            loss = cls_loss + dom_loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            check_finite(loss, step, every=CHECK_EVERY)
            with torch.no_grad():  # stays on the device: no sync per step
                disc_acc.append(((d[:ns] < 0).sum() + (d[ns:] > 0).sum()) / float(ns + nt))
        check_finite(loss, steps)
        record_domain_accuracy(disc_acc)
        return TorchPredictor(encoder, classifier, device)


@hookimpl
def dabench_methods(register) -> None:  # type: ignore[no-untyped-def]
    register(DANN)
