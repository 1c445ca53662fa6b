"""Heterogeneous domain adaptation: source and target in different feature
spaces, one label set (e.g. 8x8 digits, 64 features -> MNIST, 784 features,
with ``feature_space = "native"``).  Two methods:

``stn`` (semi-supervised; needs k labelled target samples per class)
    Yao, Zhang, Li, Ye, "Heterogeneous Domain Adaptation via Soft Transfer
    Network", ACM Multimedia 2019.  Followed:

    - domain-specific projection networks ``f_s``, ``f_t`` into one shared
      ``latent_dim``-d space (here ``task.backbone(shape)`` of each domain,
      then ``Linear(., latent_dim)`` + ReLU) and one shared linear classifier
      ``g`` (their Fig. 2);
    - supervised loss on labelled source plus labelled target,
      ``CE(g f_s(x_s), y_s) + CE(g f_t(x_l), y_l)`` (their Eq. 3);
    - the soft-MMD alignment (their Eqs. 4-7) with the linear kernel (mean
      embeddings): the marginal term ``||mean f_s(x_s) - mean f_t(x_t)||^2``
      plus the class-conditional terms ``1/C sum_c ||mu_s^c - mu_t^c||^2``
      where the target class means use the labelled target with one-hot
      labels and the unlabelled target with *soft* labels, the classifier's
      current probabilities (held constant in the gradient);
    - the alignment weight rises ``beta_p = beta (2 / (1 + exp(-10 p)) - 1)``
      so the soft labels are used once the classifier means something (the
      paper re-estimates soft labels every iteration; the ramp replaces its
      fixed schedule).

    Simplified: linear-kernel MMD (the paper's choice of kernel is a
    Gaussian on the projections; the mean embedding is its first-order
    version and costs nothing); class means per minibatch (classes absent
    from a source batch are left out of that step's sum); the same SGD
    optimiser and learning-rate annealing as every other method here
    instead of the paper's Adam.

``gw-hda`` (unsupervised; semi-supervised when the protocol gives labelled target samples)
    Optimal transport across spaces with the Gromov-Wasserstein distance
    (Mémoli, "Gromov-Wasserstein distances and the metric approach to object
    matching", FoCM 2011; Peyré, Cuturi, Solomon, "Gromov-Wasserstein
    averaging of kernel and distance matrices", ICML 2016), used for HDA as
    in Yan, Li, Wu, Min, Tan, Wu, "Semi-supervised optimal transport for
    heterogeneous domain adaptation" (SSOT / SGW), IJCAI 2018.  Followed:

    - a class-stratified subsample of ``n_match`` source points and
      ``n_match`` target points, uniform masses;
    - intra-domain cost matrices in each domain's own space, Euclidean or
      geodesic (shortest paths on a symmetric ``knn``-nearest-neighbour graph,
      as in Solomon et al., "Entropic metric alignment for correspondence
      problems", SIGGRAPH 2016), each divided by its mean;
    - the GW coupling ``T`` for the square loss;
    - **semi-supervised (SSOT), when ``task.target_labeled`` is given**: as
      in Yan et al., the labelled target samples enter the transport problem
      itself, so that source samples are sent to labelled target samples of
      their own class: the target subsample holds every labelled target
      sample (plus unlabelled ones up to ``n_match``), and the objective
      becomes ``GW(T) + label_weight * <T, M>`` with ``M_ij = 1`` when
      target point ``j`` is labelled with a class other than source point
      ``i``'s (0 otherwise): mass across the label boundary is penalised.
      Solved by POT's fused-GW conditional gradient
      (``ot.gromov.fused_gromov_wasserstein``, Vayer et al., ICML 2019, with
      ``alpha = 1 / (1 + label_weight)``).  The labelled samples also train
      the classifier (cross-entropy through the target encoder), as in STN;
    - label propagation through the coupling (Redko et al., AISTATS 2019):
      ``q_j(c) = sum_i T_ij [y_i = c] / sum_i T_ij`` for matched unlabelled
      target ``j``;
    - a shared classifier on domain-specific encoders (as in ``stn``) trained
      with cross-entropy on the source (and the labelled target) and soft
      cross-entropy to ``q`` on the matched target points.

    Simplified: SGW uses the *entropic* GW discrepancy and its own
    label-consistency regulariser optimised by KL projections; here the
    coupling is the exact (non-entropic) GW with the label term above as a
    linear cost, solved by conditional gradient (no entropic
    regularisation parameter to set).  The coupling is computed once on
    subsamples (GW costs O(n^3) per iteration); the label transfer is not
    iterated.  GW is invariant to isometries, so without labels it can
    only identify classes when the two domains' class geometries agree; on
    digits -> MNIST pixel spaces they do not (correlation of class-mean
    distance matrices about 0.4) and the unsupervised variant is expected
    to lose to ``target-only-k`` there: a documented limit of unsupervised
    HDA, not a bug.  Skipped on pairs that share a feature space (use a
    homogeneous method there).

    Health signals: ``transport_confidence``, the mean over matched
    unlabelled target points of ``max_c q_j(c)`` (``1/C``: the coupling
    carries no label information; 1: every point receives one class), and
    ``ssot`` (1 when labelled target samples shaped the coupling).
"""

from __future__ import annotations


import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from dabench import Choice, Float, Int, Method, Task, diagnostics, hookimpl
from dabench.training import (
    CHECK_EVERY,
    TensorBatches,
    TorchPredictor,
    annealed_lr,
    check_finite,
    grl_lambda,
    make_sgd,
    progress,
    resolve_device,
    seed_everything,
    set_lr,
    stream_seed,
)


def domain_encoder(task: Task, domain: str, latent_dim: int) -> nn.Module:
    """``f_d``: the task's backbone for that domain's input shape, then a
    linear projection + ReLU into the shared ``latent_dim``-d space."""
    shape = task.source_shape if domain == "source" else task.target_shape
    body, dim = task.backbone(shape)
    return nn.Sequential(body, nn.Linear(dim, latent_dim), nn.ReLU())


def soft_mmd(zs: torch.Tensor, ys: torch.Tensor, zt: torch.Tensor, pt: torch.Tensor, n_classes: int) -> torch.Tensor:
    """STN's soft-MMD with a linear kernel: marginal mean discrepancy plus the
    mean over classes present in the source batch of the class-conditional
    mean discrepancies, target class means weighted by ``pt`` (n_t, C) soft
    (or one-hot) labels."""
    marginal = (zs.mean(0) - zt.mean(0)).pow(2).sum()
    onehot = F.one_hot(ys, n_classes).to(zs.dtype)  # (n_s, C)
    cnt_s = onehot.sum(0)
    cnt_t = pt.sum(0)
    present = (cnt_s > 0) & (cnt_t > 1e-6)
    if not bool(present.any()):
        return marginal
    mu_s = (onehot.T @ zs) / cnt_s.clamp_min(1.0)[:, None]
    mu_t = (pt.T @ zt) / cnt_t.clamp_min(1e-6)[:, None]
    cond = (mu_s - mu_t).pow(2).sum(1)[present].mean()
    return marginal + cond


class STN(Method):
    """Soft Transfer Network (Yao et al. 2019): semi-supervised HDA."""

    name = "stn"
    family = "heterogeneous"
    version = "1"
    requires = frozenset({"target_labels"})
    paper = "Yao, Zhang, Li, Ye, Heterogeneous Domain Adaptation via Soft Transfer Network, ACM MM 2019"
    hyperparameters = {
        "lr": Float(0.01, 1e-3, 0.1, log=True, help="initial SGD learning rate mu0 (annealed)"),
        "weight_decay": Float(5e-4, 1e-6, 1e-2, log=True, help="L2 weight decay"),
        "beta": Float(1.0, 0.01, 10.0, log=True, help="final weight of the soft-MMD alignment"),
        "latent_dim": Int(128, 16, 512, log=True, help="dimension of the shared latent space"),
    }

    def fit(self, task: Task) -> TorchPredictor:
        if task.target_labeled is None:
            raise ValueError("stn needs task.target_labeled: set k_target > 0 in the suite's protocol")
        seed_everything(task.seed)
        device = resolve_device(task.device)
        enc_s = domain_encoder(task, "source", self.latent_dim)
        enc_t = domain_encoder(task, "target", self.latent_dim)
        clf = nn.Linear(self.latent_dim, task.n_classes)
        mods = (enc_s, enc_t, clf)
        for m in mods:
            m.to(device).train()
        opt = make_sgd([p for m in mods for p in m.parameters()], lr=self.lr, momentum=0.9,
                       weight_decay=self.weight_decay)
        bs, C = task.budget.batch_size, task.n_classes
        src = TensorBatches(task.source_train.X, task.source_train.y, batch_size=bs, device=device,
                            seed=stream_seed(task.seed, 1))
        tgt = TensorBatches(task.target_train.X, batch_size=bs, device=device, seed=stream_seed(task.seed, 2))
        lab = TensorBatches(task.target_labeled.X, task.target_labeled.y, batch_size=bs, device=device,
                            seed=stream_seed(task.seed, 3))
        steps = task.budget.steps
        loss = torch.zeros(())
        for step in range(steps):
            p = progress(step, steps)
            set_lr(opt, annealed_lr(p, self.lr))
            beta = grl_lambda(p, 10.0, self.beta)
            s, u, l = src.next(), tgt.next(), lab.next()
            zs = enc_s(s.x)
            zt = enc_t(torch.cat([l.x, u.x]))
            logits_t = clf(zt)
            sup = F.cross_entropy(clf(zs), s.y) + F.cross_entropy(logits_t[: len(l.x)], l.y)
            soft = torch.softmax(logits_t[len(l.x):].detach(), dim=1)
            pt = torch.cat([F.one_hot(l.y, C).to(zt.dtype), soft])
            loss = sup + beta * soft_mmd(zs, s.y, zt, pt, C)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            check_finite(loss, step, every=CHECK_EVERY)
        check_finite(loss, steps)
        return TorchPredictor({"source": enc_s, "target": enc_t}, clf, device)


# --------------------------------------------------------------------------
# Gromov-Wasserstein label transfer
# --------------------------------------------------------------------------


def intra_costs(X: np.ndarray, geometry: str = "euclidean", knn: int = 10) -> np.ndarray:
    """Pairwise cost matrix of ``X`` in its own space, divided by its mean."""
    X = np.asarray(X, dtype=np.float64)
    sq = (X * X).sum(1)
    D = np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2.0 * X @ X.T, 0.0))
    np.fill_diagonal(D, 0.0)
    if geometry == "geodesic":
        from scipy.sparse import csr_matrix
        from scipy.sparse.csgraph import shortest_path

        n = len(X)
        k = min(knn, n - 1)
        nbr = np.argsort(D, axis=1)[:, 1 : k + 1]
        rows = np.repeat(np.arange(n), k)
        G = csr_matrix((D[rows, nbr.ravel()], (rows, nbr.ravel())), shape=(n, n))
        G = G.maximum(G.T)
        D = shortest_path(G, directed=False)
        finite = np.isfinite(D)
        D[~finite] = D[finite].max() * 1.5 if finite.any() else 1.0
    elif geometry != "euclidean":
        raise ValueError(f"geometry must be 'euclidean' or 'geodesic', got {geometry!r}")
    m = D.mean()
    return D / m if m > 0 else D


def gw_coupling(Cs: np.ndarray, Ct: np.ndarray, max_iter: int = 200, M: np.ndarray | None = None,
                label_weight: float = 1.0) -> np.ndarray:
    """The square-loss Gromov-Wasserstein coupling between uniform measures
    (POT's conditional gradient; imported here, POT is only needed by gw-hda).

    With a cross-domain cost ``M`` (the semi-supervised label term), the
    coupling minimises ``GW(T) + label_weight * <T, M>`` (POT's fused GW with
    ``alpha = 1 / (1 + label_weight)``, the objective scaled by ``1 + label_weight``)."""
    import ot

    p = np.full(len(Cs), 1.0 / len(Cs))
    q = np.full(len(Ct), 1.0 / len(Ct))
    if M is None:
        return np.asarray(ot.gromov.gromov_wasserstein(Cs, Ct, p, q, loss_fun="square_loss", max_iter=max_iter))
    return np.asarray(ot.gromov.fused_gromov_wasserstein(np.asarray(M, dtype=np.float64), Cs, Ct, p, q,
                                                         loss_fun="square_loss", alpha=1.0 / (1.0 + label_weight),
                                                         max_iter=max_iter))


def label_cost(ys: np.ndarray, yt_labelled: np.ndarray, n_target: int) -> np.ndarray:
    """SSOT's label term: ``M[i, j] = 1`` when target point ``j`` (one of the
    first ``len(yt_labelled)`` points, the labelled ones) has a label other
    than source point ``i``'s; 0 for unlabelled target points."""
    M = np.zeros((len(ys), n_target))
    k = len(yt_labelled)
    M[:, :k] = (np.asarray(ys)[:, None] != np.asarray(yt_labelled)[None, :]).astype(np.float64)
    return M


def transport_labels(T: np.ndarray, ys: np.ndarray, n_classes: int) -> np.ndarray:
    """Label propagation through a coupling: row j of the result is the
    class distribution of the source mass sent to target point j."""
    P = T.T @ np.eye(n_classes)[ys]
    tot = P.sum(1, keepdims=True)
    return np.where(tot > 0, P / np.maximum(tot, 1e-300), 1.0 / n_classes)


def stratified_subsample(y: np.ndarray, n: int, n_classes: int, rng: np.random.Generator) -> np.ndarray:
    """About ``n`` indices with every class in proportion (at least one each)."""
    if n >= len(y):
        return np.arange(len(y))
    out = []
    for c in range(n_classes):
        idx = np.flatnonzero(y == c)
        if len(idx):
            m = max(1, int(round(n * len(idx) / len(y))))
            out.append(rng.choice(idx, min(m, len(idx)), replace=False))
    return np.sort(np.concatenate(out))


class GWHDA(Method):
    """HDA by Gromov-Wasserstein transport across spaces, semi-supervised (SSOT)
    when labelled target samples are given: labels transported through the
    coupling, then a shared classifier on two encoders."""

    name = "gw-hda"
    family = "heterogeneous"
    version = "2"
    requires = frozenset({"arrays"})
    paper = ("Yan, Li, Wu, Min, Tan, Wu, Semi-supervised optimal transport for heterogeneous domain adaptation, "
             "IJCAI 2018 (Gromov-Wasserstein: Mémoli, FoCM 2011; Peyré, Cuturi, Solomon, ICML 2016)")
    hyperparameters = {
        "lr": Float(0.01, 1e-3, 0.1, log=True, help="initial SGD learning rate mu0 (annealed)"),
        "weight_decay": Float(5e-4, 1e-6, 1e-2, log=True, help="L2 weight decay"),
        "n_match": Int(300, 50, 2000, log=True, help="points per domain in the GW coupling"),
        "geometry": Choice("euclidean", ("euclidean", "geodesic"), help="intra-domain distance"),
        "knn": Int(10, 3, 50, help="neighbours of the graph for geodesic distances"),
        "label_weight": Float(1.0, 0.01, 100.0, log=True,
                              help="SSOT: weight of the cost of mass sent to labelled target samples of another class"),
        "target_weight": Float(1.0, 0.1, 10.0, log=True, help="weight of the transported-label loss"),
        "latent_dim": Int(128, 16, 512, log=True, help="dimension of the shared latent space"),
    }

    @classmethod
    def skip(cls, task: Task) -> str | None:
        if task.same_feature_space:
            return "gw-hda is for heterogeneous pairs (feature_space = \"native\" with different shapes)"
        return super().skip(task)

    def transported(self, task: Task) -> tuple[np.ndarray, np.ndarray]:
        """(target inputs of the matched points, soft labels) from the GW
        coupling; with labelled target samples they come first, with their
        one-hot labels, and shape the coupling through the SSOT label term."""
        rng = np.random.default_rng(stream_seed(task.seed, 5))
        si = stratified_subsample(task.source_train.y, self.n_match, task.n_classes, rng)
        lab = task.target_labeled
        k = 0 if lab is None else len(lab)
        n_unl = min(max(self.n_match - k, 1), len(task.target_train))
        ti = np.sort(rng.choice(len(task.target_train), n_unl, replace=False))
        Xt = task.target_train.X[ti] if k == 0 else np.vstack([lab.X, task.target_train.X[ti]])
        Cs = intra_costs(task.source_train.X[si], self.geometry, self.knn)
        Ct = intra_costs(Xt, self.geometry, self.knn)
        ys = task.source_train.y[si]
        M = None if k == 0 else label_cost(ys, lab.y, len(Xt))
        T = gw_coupling(Cs, Ct, M=M, label_weight=self.label_weight)
        q = transport_labels(T, ys, task.n_classes)
        if k:
            q[:k] = np.eye(task.n_classes)[lab.y]
        return Xt, q

    def fit(self, task: Task) -> TorchPredictor:
        seed_everything(task.seed)
        device = resolve_device(task.device)
        Xm, q = self.transported(task)
        k = 0 if task.target_labeled is None else len(task.target_labeled)
        conf = q[k:].max(1)
        diagnostics.record("transport_confidence", float(conf.mean()) if len(conf) else float("nan"))
        diagnostics.record("ssot", float(k > 0))
        seed_everything(task.seed)
        enc_s = domain_encoder(task, "source", self.latent_dim)
        enc_t = domain_encoder(task, "target", self.latent_dim)
        clf = nn.Linear(self.latent_dim, task.n_classes)
        mods = (enc_s, enc_t, clf)
        for m in mods:
            m.to(device).train()
        opt = make_sgd([p for m in mods for p in m.parameters()], lr=self.lr, momentum=0.9,
                       weight_decay=self.weight_decay)
        bs = task.budget.batch_size
        src = TensorBatches(task.source_train.X, task.source_train.y, batch_size=bs, device=device,
                            seed=stream_seed(task.seed, 1))
        tgt = TensorBatches(Xm[k:], batch_size=bs, device=device, seed=stream_seed(task.seed, 2))
        qt = torch.as_tensor(q[k:], dtype=torch.float32, device=device)
        lab = None if k == 0 else TensorBatches(task.target_labeled.X, task.target_labeled.y, batch_size=bs,
                                                device=device, seed=stream_seed(task.seed, 3))
        steps = task.budget.steps
        loss = torch.zeros(())
        for step in range(steps):
            set_lr(opt, annealed_lr(progress(step, steps), self.lr))
            s, t = src.next(), tgt.next()
            logp_t = F.log_softmax(clf(enc_t(t.x)), dim=1)
            loss = F.cross_entropy(clf(enc_s(s.x)), s.y) - self.target_weight * (qt[t.index] * logp_t).sum(1).mean()
            if lab is not None:
                l = lab.next()
                loss = loss + F.cross_entropy(clf(enc_t(l.x)), l.y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            check_finite(loss, step, every=CHECK_EVERY)
        check_finite(loss, steps)
        return TorchPredictor({"source": enc_s, "target": enc_t}, clf, device)


@hookimpl
def dabench_methods(register) -> None:  # type: ignore[no-untyped-def]
    register(STN)
    register(GWHDA)
