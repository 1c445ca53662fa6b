"""CDAN: Conditional Adversarial Domain Adaptation (with the entropy variant CDAN+E).

Long, Cao, Wang, Jordan.  "Conditional Adversarial Domain Adaptation",
NeurIPS 2018 (arXiv:1705.10667).  Reference code: github.com/thuml/CDAN.

What is followed:

- Network: feature extractor ``F`` = ``task.backbone(shape)`` giving ``f``, a
  linear classifier ``G`` giving ``g = softmax(G(f))`` (the benchmark's shared
  network, as in the ``dann`` plugin), and a domain discriminator ``D``.
- The discriminator is conditioned on the classifier's prediction through the
  multilinear map (Sec. 3.1): ``D`` sees ``T(h) = f (x) g``, the outer product
  of the ``d_f`` features and the ``C`` class probabilities, flattened to
  ``d_f * C`` numbers (:func:`multilinear_map`).  When ``d_f * C`` exceeds
  4096 (the paper's rule) the randomized multilinear map
  ``T_odot(f, g) = (R_f f) (.) (R_g g) / sqrt(d)`` is used instead
  (:class:`RandomizedMultilinearMap`): ``R_f``, ``R_g`` are random matrices
  with zero-mean unit-variance Gaussian entries, drawn once per run (from the
  run seed) and fixed; ``<T_odot(h), T_odot(h')>`` is an unbiased estimate
  of ``<T(h), T(h')>`` (the paper's Theorem/Eq. 6).  ``d`` is
  ``random_dim`` (1024 in the paper's Office experiments).  The
  ``multilinear`` hyperparameter can force either map.
- Entropy conditioning, CDAN+E (Sec. 3.2, Eq. 9): each example of the
  discriminator loss is weighted by ``w = 1 + exp(-H(g))``, ``H`` the entropy
  of ``g``, so that confident (easy-to-transfer) examples count more;
  ``entropy = False`` gives plain CDAN (all weights 1).  As in the reference
  code (``loss.CDAN``), the weights are normalised to sum to one within each
  domain's batch and the loss is the weighted sum divided by the total
  weight: ``L_d = (weighted mean over source + weighted mean over target) /
  2``.  Plain CDAN is the mean logistic loss over the whole batch (the
  reference's ``BCELoss()``), the same scale.  (Version 1 summed the two
  domain means, twice the reference's scale.)
- Minimax by gradient reversal (the reference code's implementation of
  Eq. 7): ``D`` descends ``L_d`` at the full learning rate; the feature
  extractor ascends it with weight ``lambda_p`` through ``f`` (a reversal
  layer between the features and the map), and, with CDAN+E, through the
  entropy weights: the reference registers the same reversal hook on
  ``H(g)`` (``entropy.register_hook(grl_hook(coeff))``), so the classifier
  too ascends ``L_d`` through the weights (pushing towards predictions
  whose weight makes the discriminator's job harder).  ``g`` itself is
  detached where it enters the map, as in the reference.
  ``lambda_p = lambda_max (2 / (1 + exp(-gamma p)) - 1)``, ``gamma = 10``,
  ``lambda_max = 1``: the reference's ``calc_coeff`` ramp to 1 (there over
  a fixed 10,000 iterations, about its digit runs' length; here over the
  run's budget, ``p`` = progress).
- Discriminator: ``disc_layers`` hidden ReLU layers of ``disc_hidden`` units
  with dropout ``disc_dropout`` after each, one logit out, linear layers
  initialised as the reference's ``init_weights`` (Xavier-normal weights,
  zero biases).  The default, two layers of 500 with dropout 0.5, is the
  reference code's digits discriminator (``AdversarialNetwork(., 500)`` in
  ``train_uspsmnist.py`` / ``train_svhnmnist.py``); its Office/VisDA one
  (``train_image.py``) is 1024 wide.
- Optimiser: SGD with momentum 0.9 and weight decay 5e-4 (the reference's
  digit settings, lr 0.01), learning rate annealed
  ``mu0 / (1 + 10 p) ** 0.75`` (the reference's ``inv`` schedule for
  Office; its digit scripts halve the rate every few epochs instead), one
  batch of ``task.budget.batch_size`` labelled source and one of unlabelled
  target samples per step, forwarded together (as the reference does).

Simplified or changed, and why:

- The shared linear head on the backbone replaces the paper's ResNet-50 +
  bottleneck (or LeNet/DTN for digits), so CDAN and DANN differ only in what
  the discriminator sees.
- The reference's digit scripts train the first epoch on source only
  (``start_epoch = 1``); here the lambda ramp, which starts at 0, plays
  that role within the budget.
- Budgets are hundreds of CPU steps, not the paper's tens of thousands; the
  quick suite measures relative gains, not the paper's numbers.
- Cost: as DANN plus the outer product (``d_f * C`` inputs to a 500-wide
  layer): about 1.2-1.5x a DANN step with the defaults.

Health signals (:mod:`dabench.diagnostics`), as the ``dann`` plugin:
``disc_acc_start`` / ``disc_acc_end`` (discriminator accuracy over the first
and last tenth of the steps, read from the training batches) and
``engaged`` (1 when ``disc_acc_end`` < 0.9: the discriminator does not
separate the domains at the end, so the adversarial term still acts).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from dabench import Bool, Choice, Float, Int, Method, Task, diagnostics, hookimpl
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

#: Above this many outer-product entries the paper switches to the randomized map.
MAX_FULL_DIM = 4096
#: ``engaged`` is 1 when the discriminator's accuracy over the last tenth of
#: training is below this (as in the ``dann`` plugin).
ENGAGED_BELOW = 0.9


def multilinear_map(f: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``T(f, g) = f (x) g`` per row: ``(n, d_f)``, ``(n, C)`` -> ``(n, d_f * C)``,
    entry ``i * C + j`` equal to ``f[:, i] * g[:, j]``."""
    return torch.bmm(f.unsqueeze(2), g.unsqueeze(1)).reshape(f.shape[0], -1)


class RandomizedMultilinearMap(nn.Module):
    """``T_odot(f, g) = (f R_f) * (g R_g) / sqrt(d)`` with fixed Gaussian ``R_f``
    (``d_f x d``) and ``R_g`` (``C x d``) drawn from ``generator``.

    For every pair of rows, ``E[<T_odot(f,g), T_odot(f',g')>] = <f, f'> <g, g'>
    = <f (x) g, f' (x) g'>`` (Long et al. 2018, Sec. 3.1)."""

    def __init__(self, f_dim: int, g_dim: int, out_dim: int, generator: torch.Generator) -> None:
        super().__init__()
        self.out_dim = int(out_dim)
        self.register_buffer("R_f", torch.randn(f_dim, out_dim, generator=generator))
        self.register_buffer("R_g", torch.randn(g_dim, out_dim, generator=generator))

    def forward(self, f: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return (f @ self.R_f) * (g @ self.R_g) / math.sqrt(self.out_dim)


def entropy(probs: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Row entropies ``H(g) = -sum_c g_c log(g_c + eps)`` (the reference's ``Entropy``)."""
    return -(probs * torch.log(probs + eps)).sum(dim=1)


def entropy_weights(probs: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """CDAN+E weights ``1 + exp(-H(g))`` normalised to sum to 1 over the rows
    (Eq. 9); confident rows (low entropy) get more weight.  No gradient."""
    w = 1.0 + torch.exp(-entropy(probs.detach(), eps))
    return w / w.sum()


def discriminator(in_dim: int, hidden: int, layers: int, dropout: float) -> nn.Sequential:
    """``D``: ``layers`` x (Linear, ReLU, Dropout) of ``hidden`` units, then one
    logit; linear weights Xavier-normal, biases zero (the reference's ``init_weights``)."""
    mods: list[nn.Module] = []
    width = in_dim
    for _ in range(layers):
        mods += [nn.Linear(width, hidden), nn.ReLU()]
        if dropout > 0:
            mods.append(nn.Dropout(dropout))
        width = hidden
    mods.append(nn.Linear(width, 1))
    for m in mods:
        if isinstance(m, nn.Linear):
            nn.init.xavier_normal_(m.weight)
            nn.init.zeros_(m.bias)
    return nn.Sequential(*mods)


def conditional_domain_loss(feats: torch.Tensor, logits: torch.Tensor, ns: int, disc: nn.Module,
                            rmap: nn.Module | None, lam: float, use_entropy: bool,
                            out: list | None = None) -> torch.Tensor:
    """The CDAN(+E) discriminator loss on a batch whose first ``ns`` rows are
    source (domain 0) and the rest target (domain 1), at the reference's scale.

    ``D`` sees ``T(f_rev, g)``, ``f_rev`` the features behind the gradient
    reversal layer with factor ``lam`` and ``g = softmax(logits)`` detached.
    Plain CDAN: the mean logistic loss over all rows.  CDAN+E: weights
    ``1 + exp(-H(g))`` with ``H`` behind a reversal layer of the same factor
    (so the classifier ascends the loss through them, as in the reference),
    normalised to sum to 1 per domain; the loss is the weighted sum over
    both domains divided by the total weight (2), i.e. the mean of the two
    domains' weighted means.  When ``out`` is a list, the discriminator's
    accuracy on the batch (a 0-d tensor, no gradient) is appended to it."""
    n = feats.shape[0]
    probs = torch.softmax(logits, dim=1)
    g = probs.detach()
    f_rev = grad_reverse(feats, lam)
    h = multilinear_map(f_rev, g) if rmap is None else rmap(f_rev, g)
    domain = torch.cat([feats.new_zeros(ns), feats.new_ones(n - ns)])
    d = disc(h).squeeze(1)
    if out is not None:
        with torch.no_grad():
            out.append(((d > 0).to(domain.dtype) == domain).float().mean())
    bce = F.binary_cross_entropy_with_logits(d, domain, reduction="none")
    if not use_entropy:
        return bce.mean()
    w = 1.0 + torch.exp(-grad_reverse(entropy(probs), lam))
    ws, wt = w[:ns], w[ns:]
    weight = torch.cat([ws / ws.detach().sum(), wt / wt.detach().sum()])
    return (weight * bce).sum() / weight.detach().sum()


def record_domain_accuracy(acc_per_step: list[torch.Tensor]) -> None:
    """Record ``disc_acc_start`` / ``disc_acc_end`` (mean discriminator accuracy
    over the first and last tenth of the steps) and ``engaged``."""
    if not acc_per_step:
        return
    acc = torch.stack(acc_per_step).float().cpu()
    tenth = max(1, len(acc) // 10)
    end = float(acc[-tenth:].mean())
    diagnostics.record("disc_acc_start", float(acc[:tenth].mean()))
    diagnostics.record("disc_acc_end", end)
    diagnostics.record("engaged", float(end < ENGAGED_BELOW))


class CDAN(Method):
    """Adversarial alignment of the joint (feature, prediction) distribution (Long et al. 2018)."""

    name = "cdan"
    family = "adversarial"
    version = "2"
    requires = frozenset({"same_feature_space"})
    paper = "Long, Cao, Wang, Jordan, Conditional Adversarial Domain Adaptation, NeurIPS 2018"
    hyperparameters = {
        "lr": Float(0.01, 1e-3, 0.1, log=True, help="initial SGD learning rate mu0 (annealed)"),
        "weight_decay": Float(5e-4, 1e-6, 1e-2, log=True, help="L2 weight decay"),
        "backbone_lr_mult": BACKBONE_LR_MULT,
        "lambda_max": Float(1.0, 0.03, 3.0, log=True, help="final adversarial weight lambda"),
        "gamma": Float(10.0, 1.0, 30.0, log=True, help="steepness of the lambda schedule"),
        "entropy": Bool(True, help="CDAN+E: weight examples by 1 + exp(-entropy)"),
        "multilinear": Choice("auto", ("auto", "full", "random"),
                              help="outer product f (x) g, the randomized map, or auto (random above 4096 dims)"),
        "random_dim": Int(1024, 64, 4096, log=True, help="output size d of the randomized multilinear map"),
        "disc_hidden": Int(500, 16, 1024, log=True, help="hidden units per discriminator layer"),
        "disc_layers": Int(2, 1, 3, help="hidden layers of the discriminator"),
        "disc_dropout": Float(0.5, 0.0, 0.9, help="dropout after each discriminator hidden layer"),
    }

    def conditioning(self, f_dim: int, n_classes: int, device: torch.device,
                     seed: int) -> tuple[nn.Module | None, int]:
        """(randomized map or None for the full outer product, discriminator input size)."""
        full = f_dim * n_classes
        use_random = self.multilinear == "random" or (self.multilinear == "auto" and full > MAX_FULL_DIM)
        if not use_random:
            return None, full
        gen = torch.Generator().manual_seed(seed)
        return RandomizedMultilinearMap(f_dim, n_classes, self.random_dim, gen).to(device), self.random_dim

    def fit(self, task: Task) -> TorchPredictor:
        seed_everything(task.seed)
        device = resolve_device(task.device)
        encoder, dim = task.backbone(task.source_shape)
        classifier = nn.Linear(dim, task.n_classes)
        rmap, d_in = self.conditioning(dim, task.n_classes, device, stream_seed(task.seed, 3))
        disc = discriminator(d_in, self.disc_hidden, self.disc_layers, self.disc_dropout)
        for m in (encoder, classifier, disc):
            m.to(device).train()
        params = backbone_param_groups(encoder, (classifier, disc), self.backbone_lr_mult)
        opt = make_sgd(params, lr=self.lr, momentum=0.9, weight_decay=self.weight_decay)
        bs = task.budget.batch_size
        src = TensorBatches(task.source_train.X, task.source_train.y, batch_size=bs,
                            device=device, seed=stream_seed(task.seed, 1))
        tgt = TensorBatches(task.target_train.X, batch_size=bs,
                            device=device, seed=stream_seed(task.seed, 2))
        ns = src.batch_size
        steps = task.budget.steps
        loss = torch.zeros(())
        disc_acc: list[torch.Tensor] = []
        for step in range(steps):
            p = progress(step, steps)
            set_lr(opt, annealed_lr(p, self.lr))
            lam = grl_lambda(p, self.gamma, self.lambda_max)
            s, t = src.next(), tgt.next()
            feats = encoder(torch.cat([s.x, t.x]))
            logits = classifier(feats)
            cls_loss = F.cross_entropy(logits[:ns], s.y)
            dom_loss = conditional_domain_loss(feats, logits, ns, disc, rmap, lam, self.entropy, out=disc_acc)
            loss = cls_loss + dom_loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            check_finite(loss, step, every=CHECK_EVERY)
        check_finite(loss, steps)
        record_domain_accuracy(disc_acc)
        return TorchPredictor(encoder, classifier, device)


@hookimpl
def dabench_methods(register) -> None:  # type: ignore[no-untyped-def]
    register(CDAN)
