"""Built-in validators (hyperparameter selection without target labels).

Every validator scores a trained predictor from what a method may see (the
:class:`dabench.Task`: labelled source, unlabelled target); higher is better.

- ``source-val``: accuracy on the held-out source validation split: the
  classical choice (e.g. Ganin et al. 2016 use a source validation set).
- ``entropy``: negative mean prediction entropy on the unlabelled target
  (Morerio et al., ICLR 2018, "Minimal-entropy correlation alignment" use
  target entropy for model selection).
- ``im``: information maximisation, H(mean prediction) - mean H(prediction)
  on the unlabelled target (Gomes et al. NeurIPS 2010; used as a validator
  by Musgrave et al., ECCV 2022 "Benchmarking Validation Methods for UDA").
- ``snd``: soft neighbourhood density (Saito, Kim, Teterwak, Sclaroff,
  Darrell, Saenko, ICCV 2021, "Tune it the Right Way: Unsupervised
  Validation of Domain Adaptation via Soft Neighborhood Density"): the mean
  entropy of the softmax (temperature 0.05) over cosine similarities to the
  other target points.  As in the paper (and its code) the points are the
  classifier's softmax outputs on target data; we use a seeded subsample of
  at most 1,000 target points (the paper uses the whole target set; the
  similarity matrix is quadratic in size).
- ``dev``: deep embedded validation (You, Wang, Long, Wang, ICML 2019,
  "Towards Accurate Model Selection in Deep Unsupervised Domain
  Adaptation"): the importance-weighted cross-entropy on the source
  validation split with the control variate of Algorithm 1.  The density
  ratio p_t/p_s comes from a logistic-regression domain classifier on the
  model's embeddings (source train vs target train, up to 2,000 each), as in
  the paper; when the predictor itself offers ``importance_weights(X)``
  (p_t/p_s ratios at source inputs ``X``, as instance-reweighting methods
  do) those weights are used instead.  DEV is a risk (lower is better), so
  the validator returns its negative.
- ``bnm``: batch nuclear norm (Cui, Wang, Zhuo, Li, Huang, Tian, CVPR 2020,
  "Towards Discriminability and Diversity: Batch Nuclear-norm Maximization
  under Label Insufficient Situations"): the nuclear norm of the target
  prediction matrix, normalised to [0, 1]; high for confident and diverse
  predictions.
"""

from __future__ import annotations

import numpy as np

from dabench import hookimpl
from dabench.validators import (
    Validator,
    batch_nuclear_norm,
    dev_risk,
    domain_density_ratio,
    entropy,
    soft_neighbourhood_density,
)

SND_TEMPERATURE = 0.05
SND_MAX_POINTS = 1000


def _source_val(predictor, task) -> float:
    p = predictor.predict_proba(task.source_val.X, domain="source")
    return float((p.argmax(1) == task.source_val.y).mean())


def _neg_entropy(predictor, task) -> float:
    p = predictor.predict_proba(task.target_train.X, domain="target")
    return float(-entropy(p).mean())


def _im(predictor, task) -> float:
    p = predictor.predict_proba(task.target_train.X, domain="target")
    return float(entropy(p.mean(0)) - entropy(p).mean())


def _subsample(X: np.ndarray, n: int, seed: int) -> np.ndarray:
    if len(X) <= n:
        return X
    idx = np.sort(np.random.default_rng(seed).choice(len(X), n, replace=False))
    return X[idx]


def _snd(predictor, task) -> float:
    X = _subsample(task.target_train.X, SND_MAX_POINTS, task.seed)
    return soft_neighbourhood_density(predictor.predict_proba(X, domain="target"), SND_TEMPERATURE)


def dev_weights(predictor, task) -> np.ndarray:
    """p_t/p_s at the source validation inputs: the predictor's own
    ``importance_weights`` when it has them, else a domain classifier on its
    embeddings."""
    Xv = task.source_val.X
    own = getattr(predictor, "importance_weights", None)
    if callable(own):
        w = np.asarray(own(Xv), dtype=np.float64).reshape(-1)
        if w.shape != (len(Xv),):
            raise ValueError(f"importance_weights returned shape {w.shape}, expected {(len(Xv),)}")
        return w
    fs = predictor.embed(task.source_train.X, domain="source")
    ft = predictor.embed(task.target_train.X, domain="target")
    fv = predictor.embed(Xv, domain="source")
    return domain_density_ratio(fs, ft, fv, seed=task.seed)


def _dev(predictor, task) -> float:
    p = np.asarray(predictor.predict_proba(task.source_val.X, domain="source"), dtype=np.float64)
    losses = -np.log(np.clip(p[np.arange(len(p)), task.source_val.y], 1e-12, 1.0))
    return -dev_risk(losses, dev_weights(predictor, task))


def _bnm(predictor, task) -> float:
    return batch_nuclear_norm(predictor.predict_proba(task.target_train.X, domain="target"))


@hookimpl
def dabench_validators(register):
    register(Validator("source-val", _source_val, "Ganin et al. 2016 (JMLR), source validation", "source validation accuracy"))
    register(Validator("entropy", _neg_entropy, "Morerio et al. 2018 (ICLR)", "minus the mean target prediction entropy"))
    register(Validator("im", _im, "Gomes et al. 2010 (NeurIPS); Musgrave et al. 2022 (ECCV)", "information maximisation on target"))
    register(Validator("snd", _snd, "Saito et al. 2021 (ICCV), Tune it the Right Way",
                       "soft neighbourhood density of target softmax outputs, temperature 0.05"))
    register(Validator("dev", _dev, "You et al. 2019 (ICML), Towards Accurate Model Selection in Deep UDA",
                       "minus the importance-weighted source validation loss with control variate"))
    register(Validator("bnm", _bnm, "Cui et al. 2020 (CVPR), Batch Nuclear-norm Maximization",
                       "normalised nuclear norm of the target prediction matrix"))
