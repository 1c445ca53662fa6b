"""CAN: Contrastive Adaptation Network.

Kang, Jiang, Yang, Hauptmann. "Contrastive Adaptation Network for
Unsupervised Domain Adaptation", CVPR 2019 (and the authors' code,
kgl-prml/Contrastive-Adaptation-Network-for-Unsupervised-Domain-Adaptation).

Why CAN (and not a cross-domain InfoNCE method such as CDCL): CAN's
contrastive term is a kernel discrepancy between class-conditional feature
distributions, which is well defined on the benchmark's small backbones and
batches and needs neither a projection head, a memory bank nor large
batches of negatives; and its target labels come from clustering initialised
by source class centres, so every choice inside the method is made without
target labels.

What is followed:

- Start (Sec. 3.3; the authors fine-tune an ImageNet model trained on the
  labelled source): the host's shared source model (``task.source_model``),
  so every one of ``task.budget.steps`` steps is adaptation.
- Contrastive domain discrepancy (Sec. 3.2, Eqs. 5-7):
  ``D_cdd = 1/M sum_c D^{cc} - 1/(M(M-1)) sum_{c != c'} D^{cc'}``, where
  ``D^{c1 c2}`` is the squared MMD between the source features of class
  ``c1`` and the target features of (cluster) class ``c2``:
  ``mean k(s_c1, s_c1) + mean k(t_c2, t_c2) - 2 mean k(s_c1, t_c2)``.  It
  pulls same-class source and target features together (intra-class term)
  and pushes different classes apart (inter-class term).
- The kernel: a sum of ``kernel_num`` Gaussian kernels ``exp(-d^2 / g_i)``
  with bandwidths ``g_i = g * kernel_mul ** (i - kernel_num // 2)``, where
  ``g`` is the mean squared distance inside each (c1, c2) block (the
  authors' code; 5 kernels, factor 2), summed over the two layers CAN
  aligns: the features (backbone output) and the class probabilities.
- Alternating optimisation (Sec. 3.3, ``solver/can_solver.py``): before each
  of ``loops`` loops, (i) the *current* network embeds the source and the
  target; the source class centres (mean feature per source label) are the
  initial target cluster centres, so cluster ``c`` starts as class ``c``;
  spherical k-means (distance ``0.5 (1 - cos)``) runs until the centres
  move less than 0.005, and the final clusters are matched one-to-one to
  the initial centres by the Hungarian algorithm (the reference's
  ``align_centers``); (ii) ambiguous target samples farther than
  ``dist_threshold`` (D0, 0.05 as in the authors' Office configs) from
  their centre are discarded, and classes with fewer than ``min_per_class``
  (N0, 3) remaining target samples are left out of the loop; (iii) the
  network is trained with ``CE(source) + cdd_weight * D_cdd`` (beta = 0.3).
- Class-aware sampling (Sec. 3.3): each step picks ``classes_per_step``
  valid classes at random and, for each, the same number of source samples
  (by label) and target samples (by cluster), ``max(3, batch // (2 M))``
  per class and domain (3 in the authors' Office setting); the cross-entropy
  uses a separate ordinary source batch, as in the authors' code.  With a
  batch-normalised backbone the ordinary source batch, the class-aware
  source block and the target block go through the network separately
  (each normalised with its own statistics), as the reference forwards them
  with domain-specific batch norm; without batch norm they go together.

Simplified or changed, and why:

- The reference keeps two sets of batch-norm layers (one per domain,
  ``bn_domain_map``); here one set is shared (the benchmark's backbone),
  only the batch statistics are per domain during training.
- The loops split ``task.budget.steps`` evenly (the reference runs an
  epoch of the class-aware loader per loop and stops on convergence).
  Source centres use at most 2000 source training samples per loop; class
  samples are drawn with replacement (tiny clusters repeat samples).
- SGD with momentum 0.9 and the benchmark's annealed learning rate.
- Version 1 trained its own source model in the first 30 % of its budget:
  its clusters started from a weak network's centres and were about 50 %
  correct on the quick suite's image pairs.
- Cost: an adaptation step forwards an ordinary source batch plus the
  class-aware source and target blocks (about 2x a source-only step) and
  adds the CDD kernels; each loop embeds up to 2000 source and all target
  samples and runs k-means.

Health signals (:mod:`dabench.diagnostics`):

- ``kept_fraction`` (and ``_q1``..``_q4``): the fraction of the target
  train split kept by the D0 filter in the current loop;
- ``cluster_agreement`` (and per quarter): agreement of the target clusters
  with the source model's predictions (1 in the first loop when k-means
  does not move; how far the clusters moved away from the source model);
- ``cdd_active``: the fraction of steps on which CDD acted (at least one
  valid class);
- ``engaged``: 1 when CDD acted on at least half of the steps.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from dabench import Float, Int, Method, Task, diagnostics, hookimpl
from dabench.backbones import has_batch_norm
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

#: Spherical k-means stops when the mean centre shift (0.5 (1 - cos)) is below this (authors' EPS).
KMEANS_EPS = 0.005
KMEANS_MAX_ITER = 100
#: Source samples used for the class centres in each loop.
MAX_CENTRE_SAMPLES = 2000
#: ``engaged`` is 1 when CDD acted on at least this fraction of the steps.
ENGAGED_MIN_ACTIVE = 0.5


# --------------------------------------------------------------------------
# Clustering
# --------------------------------------------------------------------------


def cosine_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise ``0.5 (1 - cos(a_i, b_j))``, shape ``(len(a), len(b))``."""
    return 0.5 * (1.0 - F.normalize(a, dim=1) @ F.normalize(b, dim=1).T)


def class_centres(feats: torch.Tensor, labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Mean feature per class (zero rows for absent classes)."""
    centres = torch.zeros(n_classes, feats.shape[1], dtype=feats.dtype, device=feats.device)
    centres.index_add_(0, labels, feats)
    counts = torch.bincount(labels, minlength=n_classes).clamp_min(1).to(feats.dtype)
    return centres / counts[:, None]


def spherical_kmeans(feats: torch.Tensor, init: torch.Tensor, eps: float = KMEANS_EPS,
                     max_iter: int = KMEANS_MAX_ITER) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cluster ``feats`` under the cosine distance starting from centres ``init``.

    Returns ``(assign, dist, centres)``: each row's cluster, its distance to
    that cluster's centre, and the final centres.  A cluster that loses all
    its members keeps its previous centre.
    """
    centres = init.clone()
    k = len(centres)
    assign = torch.zeros(len(feats), dtype=torch.long, device=feats.device)
    for _ in range(max_iter):
        assign = cosine_distance(feats, centres).argmin(dim=1)
        counts = torch.bincount(assign, minlength=k)
        new = class_centres(feats, assign, k)
        new[counts == 0] = centres[counts == 0]
        shift = torch.diagonal(cosine_distance(new, centres)).mean()
        centres = new
        if float(shift) < eps:
            break
    d = cosine_distance(feats, centres)
    assign = d.argmin(dim=1)
    return assign, d.gather(1, assign[:, None]).squeeze(1), centres


def align_clusters(centres: torch.Tensor, init: torch.Tensor) -> torch.Tensor:
    """``perm`` with ``perm[k]`` the class of final cluster ``k``: the one-to-one
    matching of the final centres to the initial (source) centres with the
    least total cosine distance (Hungarian algorithm, the reference's
    ``align_centers``)."""
    from scipy.optimize import linear_sum_assignment

    cost = cosine_distance(centres, init).detach().cpu().double().numpy()
    rows, cols = linear_sum_assignment(cost)
    perm = torch.empty(len(centres), dtype=torch.long)
    perm[torch.as_tensor(rows)] = torch.as_tensor(cols, dtype=torch.long)
    return perm.to(centres.device)


# --------------------------------------------------------------------------
# Contrastive domain discrepancy
# --------------------------------------------------------------------------


def _layer_kernels(s: torch.Tensor, t: torch.Tensor, m: int, kernel_num: int,
                   kernel_mul: float) -> torch.Tensor:
    """Mean kernel values per class block for one layer.

    ``s`` and ``t`` hold ``M`` classes of ``m`` rows each, class-major.
    Returns a ``(3, M, M)`` tensor: for the block pair ``(c1, c2)``, with the
    bandwidth estimated on that pair, the mean kernel inside source class
    ``c1``, inside target class ``c2``, and between the two.  (Written with
    few, batched ops: on CPU the cost of these small tensors is per op.)
    """
    M = s.shape[0] // m
    x = torch.cat([s, t])
    sq = (x * x).sum(1)
    d = (sq[:, None] + sq[None, :] - 2 * x @ x.T).clamp_min(0)  # (2Mm, 2Mm)
    d = d.view(2, M, m, 2, M, m).permute(0, 3, 1, 4, 2, 5)  # (dom, dom, M, M, m, m)
    dss = torch.diagonal(d[0, 0], dim1=0, dim2=1).permute(2, 0, 1)  # (M, m, m) within source class
    dtt = torch.diagonal(d[1, 1], dim1=0, dim2=1).permute(2, 0, 1)
    dst = d[0, 1]  # (M, M, m, m)
    blocks = torch.stack([dss[:, None].expand(M, M, m, m), dtt[None, :].expand(M, M, m, m), dst])
    sums = blocks.sum((3, 4))  # (3, M, M)
    # bandwidth of block (c1, c2): mean off-diagonal squared distance over ss(c1) + tt(c2) + 2 st(c1,c2)
    gamma = ((sums[0] + sums[1] + 2 * sums[2]) / (4 * m * m - 2 * m)).detach().clamp_min(1e-5)
    muls = torch.tensor([kernel_mul ** (i - kernel_num // 2) for i in range(kernel_num)],
                        dtype=s.dtype, device=s.device)
    g = (gamma[:, :, None] * muls).reciprocal()  # (M, M, K)
    e = torch.exp(-blocks[:, :, :, None] * g[None, :, :, :, None, None])  # (3, M, M, K, m, m)
    return e.sum(3).mean((3, 4))


def cdd(source_layers: list[torch.Tensor], target_layers: list[torch.Tensor], m: int,
        kernel_num: int = 5, kernel_mul: float = 2.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Contrastive domain discrepancy over ``M`` classes of ``m`` samples per domain.

    Each element of ``source_layers``/``target_layers`` is one layer's
    features, ``(M * m, d)``, class-major and class-aligned (block ``c`` of
    the target holds the samples clustered into the class of source block
    ``c``).  Kernels are summed over layers.  Returns ``(cdd, intra, inter)``.
    """
    k = sum(_layer_kernels(s, t, m, kernel_num, kernel_mul) for s, t in zip(source_layers, target_layers))
    mmd = k[0] + k[1] - 2 * k[2]  # (M, M): D^{c1 c2}
    M = mmd.shape[0]
    intra = torch.diagonal(mmd).sum() / M
    if M < 2:
        return intra, intra, torch.zeros_like(intra)
    inter = (mmd.sum() - torch.diagonal(mmd).sum()) / (M * (M - 1))
    return intra - inter, intra, inter


# --------------------------------------------------------------------------
# Class-aware sampling
# --------------------------------------------------------------------------


class ClassSampler:
    """Draws ``m`` rows of given classes (with replacement) from a seeded CPU generator."""

    def __init__(self, labels: torch.Tensor, n_classes: int, seed: int) -> None:
        labels = labels.cpu()
        self.order = torch.argsort(labels, stable=True)
        self.counts = torch.bincount(labels, minlength=n_classes)
        self.starts = torch.cumsum(self.counts, 0) - self.counts
        self.gen = torch.Generator().manual_seed(int(seed) % 2**63)

    def sample(self, classes: torch.Tensor, m: int) -> torch.Tensor:
        u = torch.rand(len(classes), m, generator=self.gen)
        pos = self.starts[classes, None] + (u * self.counts[classes, None]).long()
        return self.order[pos].reshape(-1)


@torch.no_grad()
def _embed(encoder: nn.Module, X: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    encoder.eval()
    out = torch.cat([encoder(X[i:i + batch_size]) for i in range(0, len(X), batch_size)])
    encoder.train()
    return out


@torch.no_grad()
def _predict(encoder: nn.Module, classifier: nn.Module, X: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    encoder.eval()
    classifier.eval()
    out = torch.cat([classifier(encoder(X[i:i + batch_size])).argmax(1) for i in range(0, len(X), batch_size)])
    encoder.train()
    classifier.train()
    return out


class CAN(Method):
    """Class-aware contrastive domain discrepancy with alternating clustering (Kang et al. 2019)."""

    name = "can"
    family = "contrastive"
    version = "2"
    requires = frozenset({"same_feature_space", "source_model", "arrays"})
    requires_contract = "1.2"
    paper = "Kang et al., Contrastive Adaptation Network for Unsupervised Domain Adaptation, CVPR 2019"
    hyperparameters = {
        "lr": Float(0.01, 1e-4, 0.1, log=True, help="initial SGD learning rate (annealed over the run)"),
        "weight_decay": Float(5e-4, 1e-6, 1e-2, log=True, help="L2 weight decay"),
        "backbone_lr_mult": BACKBONE_LR_MULT,
        "cdd_weight": Float(0.3, 0.01, 3.0, log=True, help="weight beta of the CDD loss"),
        "loops": Int(4, 1, 20, help="alternating-optimisation loops (cluster, filter, train)"),
        "dist_threshold": Float(0.05, 0.001, 0.5, log=True, help="D0: max cosine distance (0.5(1-cos)) to the cluster centre"),
        "min_per_class": Int(3, 1, 50, help="N0: classes with fewer kept target samples are left out of a loop"),
        "classes_per_step": Int(10, 2, 100, help="classes drawn per class-aware batch"),
        "kernel_num": Int(5, 1, 9, help="Gaussian kernels in the multi-bandwidth kernel"),
        "kernel_mul": Float(2.0, 1.2, 4.0, help="ratio between neighbouring kernel bandwidths"),
    }

    def cluster(self, encoder: nn.Module, Xs: torch.Tensor, ys: torch.Tensor, Xt: torch.Tensor,
                n_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One clustering stage: ``(target cluster labels, kept mask)``.

        Centres start at the source class centres of the current network;
        after k-means the clusters are matched to those centres one-to-one."""
        fs, ft = _embed(encoder, Xs), _embed(encoder, Xt)
        init = class_centres(fs, ys, n_classes)
        assign, dist, centres = spherical_kmeans(ft, init)
        assign = align_clusters(centres, init)[assign]
        return assign, dist <= self.dist_threshold

    def fit(self, task: Task) -> TorchPredictor:
        seed_everything(task.seed)
        device = resolve_device(task.device)
        encoder, classifier = task.source_model.build(device)
        separate = has_batch_norm(encoder)  # per-domain batch statistics, as the reference's per-domain BN
        params = backbone_param_groups(encoder, classifier, self.backbone_lr_mult)
        opt = make_sgd(params, lr=self.lr, momentum=0.9, weight_decay=self.weight_decay)
        bs = task.budget.batch_size
        C = task.n_classes
        src = TensorBatches(task.source_train.X, task.source_train.y, batch_size=bs,
                            device=device, seed=stream_seed(task.seed, 1))
        Xt = torch.as_tensor(np.array(task.target_train.X, copy=True), device=device)
        ncs = min(len(src.X), MAX_CENTRE_SAMPLES)
        centre_idx = torch.randperm(len(src.X), generator=torch.Generator().manual_seed(
            stream_seed(task.seed, 3)))[:ncs].to(device)
        src_sampler = ClassSampler(src.y, C, stream_seed(task.seed, 4))
        pick_gen = torch.Generator().manual_seed(stream_seed(task.seed, 5))
        source_pred = _predict(encoder, classifier, Xt)

        steps = task.budget.steps
        per_loop = np.diff(np.linspace(0, steps, self.loops + 1).round().astype(int))
        loss = torch.zeros((), device=device)
        step = 0
        kept_per_step: list[float] = []
        agree_per_step: list[float] = []
        active = 0

        def sgd_step(value: torch.Tensor) -> None:
            opt.zero_grad(set_to_none=True)
            value.backward()
            opt.step()
            check_finite(value, step, every=CHECK_EVERY)

        src_counts = torch.bincount(src.y.cpu(), minlength=C)
        for loop, n_steps in enumerate(per_loop):
            if n_steps <= 0:
                continue
            assign, kept = self.cluster(encoder, src.X[centre_idx], src.y[centre_idx], Xt, C)
            kept_per_step += [float(kept.float().mean())] * int(n_steps)
            agree_per_step += [float((assign == source_pred).float().mean())] * int(n_steps)
            counts = torch.bincount(assign[kept].cpu(), minlength=C)
            valid = ((counts >= self.min_per_class) & (src_counts > 0)).nonzero().squeeze(1)
            log.debug("can loop %d: %d of %d target kept, %d valid classes", loop, int(kept.sum()), len(Xt), len(valid))
            kept_idx = kept.nonzero().squeeze(1)
            tgt_sampler = (ClassSampler(assign[kept_idx], C, stream_seed(task.seed, 100 + loop))
                           if len(valid) else None)
            kept_idx_cpu = kept_idx.cpu()
            n_pick = min(self.classes_per_step, len(valid))
            m = max(3, bs // (2 * max(n_pick, 1)))
            for _ in range(int(n_steps)):
                set_lr(opt, annealed_lr(progress(step, steps), self.lr))
                s = src.next()
                if tgt_sampler is None:  # no valid class this loop: source cross-entropy only
                    loss = F.cross_entropy(classifier(encoder(s.x)), s.y)
                    sgd_step(loss)
                    step += 1
                    continue
                classes = valid[torch.randperm(len(valid), generator=pick_gen)[:n_pick]]
                si = src_sampler.sample(classes, m).to(device)
                ti = kept_idx_cpu[tgt_sampler.sample(classes, m)].to(device)
                ns, nc = len(s.x), len(si)
                if separate:
                    f_plain, f_s, f_t = encoder(s.x), encoder(src.X[si]), encoder(Xt[ti])
                    f = torch.cat([f_s, f_t])
                    ce = F.cross_entropy(classifier(f_plain), s.y)
                    probs = torch.softmax(classifier(f), dim=1)
                else:
                    feats = encoder(torch.cat([s.x, src.X[si], Xt[ti]]))
                    logits = classifier(feats)
                    ce = F.cross_entropy(logits[:ns], s.y)
                    probs = torch.softmax(logits[ns:], dim=1)
                    f = feats[ns:]
                d, _, _ = cdd([f[:nc], probs[:nc]], [f[nc:], probs[nc:]], m,
                              self.kernel_num, self.kernel_mul)
                loss = ce + self.cdd_weight * d
                sgd_step(loss)
                active += 1
                step += 1
        check_finite(loss, steps)
        diagnostics.quarters(kept_per_step, "kept_fraction")
        diagnostics.quarters(agree_per_step, "cluster_agreement")
        frac_active = active / max(1, steps)
        diagnostics.record("cdd_active", frac_active)
        diagnostics.record("engaged", float(frac_active >= ENGAGED_MIN_ACTIVE))
        return TorchPredictor(encoder, classifier, device)


@hookimpl
def dabench_methods(register) -> None:  # type: ignore[no-untyped-def]
    register(CAN)
