"""Self-supervised backbone pretraining shared by the ``frozen-features`` and
``fine-tuning`` baselines (a helper module, not a plugin: it registers nothing).

Why this and not ImageNet.  The literature's version of both baselines starts
from a backbone pretrained on a large labelled upstream task: ImageNet CNN
features (DeCAF, Donahue et al., ICML 2014) kept fixed under a new classifier,
or fine-tuned with smaller learning rates for lower layers (Yosinski et al.,
NeurIPS 2014; discriminative fine-tuning, Howard & Ruder, ACL 2018).  The
embedded data of dabench runs without network access and has no upstream
corpus (the embedded domains are the pairs themselves), and the vector pairs
have no natural upstream task at all.  So the backbone is pretrained here by a
*denoising autoencoder* (Vincent et al., ICML 2008) on unlabelled inputs:

- ``on = "both"`` (default): the source-train and target-train inputs of the
  pair, the protocol of Glorot, Bordes & Bengio (ICML 2011), who pretrain
  (stacked) denoising autoencoders on the unlabelled data of all domains and
  then train a linear classifier on the source features.  The features have
  seen target *inputs*, never a label; this is the standard unsupervised-
  pretraining baseline of the domain-adaptation literature.
- ``on = "source"``: source-train inputs only (nothing of the target is seen).

No label of any split is used (neither target labels nor source labels), nor
the source-validation inputs kept for the validators, nor any test split.

The autoencoder is ``x -> backbone -> Linear -> x_hat`` with masking noise
(each input coordinate zeroed with probability ``noise``, Vincent et al.),
squared error to the clean input, SGD with momentum 0.9 and the DANN
learning-rate annealing, batches of ``task.budget.batch_size``.  The
pretraining steps are part of the run's ``task.budget.steps`` (the caller
passes its share).

Cache: the pretrained weights are cached in-process, keyed by a digest of the
input arrays, the input shape, the seed, the backbone factory, the device and
every pretraining setting, so the two baselines and every grid point of one
(pair, seed) pay for pretraining once.  Training runs under a forked torch
RNG, so a cache hit and a miss leave the caller's random state identical and
results are the same either way.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from dabench import Choice, Float, Task
from dabench.training import (
    CHECK_EVERY,
    TensorBatches,
    annealed_lr,
    check_finite,
    make_sgd,
    progress,
    set_lr,
    stream_seed,
)

__all__ = ["PRETRAIN_HPARAMS", "pretrain_denoising", "pretrain_steps", "clear_cache"]

#: Hyperparameters of the pretraining stage, declared by both baselines.
PRETRAIN_HPARAMS = {
    "pretrain_frac": Float(0.5, 0.1, 0.9, help="share of task.budget.steps spent on autoencoder pretraining"),
    "pretrain_on": Choice("both", ("both", "source"),
                          help="unlabelled inputs the autoencoder sees: source+target train, or source train"),
    "pretrain_noise": Float(0.3, 0.0, 0.7, help="masking-noise rate of the denoising autoencoder"),
    "pretrain_lr": Float(0.03, 1e-3, 0.1, log=True, help="initial SGD learning rate of pretraining (annealed)"),
}

_CACHE: "OrderedDict[tuple, dict[str, torch.Tensor]]" = OrderedDict()
_CACHE_SIZE = 16


def clear_cache() -> None:
    """Forget every cached pretrained backbone."""
    _CACHE.clear()


def pretrain_steps(steps: int, frac: float) -> tuple[int, int]:
    """Split a run's step budget into (pretraining steps, supervised steps), each >= 1."""
    steps = int(steps)
    if steps < 2:
        return 1, 1
    pre = min(steps - 1, max(1, int(round(frac * steps))))
    return pre, steps - pre


def _digest(*arrays: np.ndarray) -> str:
    h = hashlib.blake2b(digest_size=16)
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(str((a.shape, a.dtype.str)).encode())
        h.update(memoryview(a).cast("B"))
    return h.hexdigest()


def _factory_id(factory: Any) -> str:
    f = getattr(factory, "func", factory)  # functools.partial
    return f"{getattr(f, '__module__', '?')}.{getattr(f, '__qualname__', repr(f))}:{id(factory)}"


def pretrain_denoising(task: Task, encoder: nn.Module, dim: int, *, steps: int, on: str,
                       noise: float, lr: float, device: torch.device) -> None:
    """Pretrain ``encoder`` (output width ``dim``) in place as the encoder of a
    denoising autoencoder on unlabelled inputs of ``task`` (see the module
    docstring), or load the cached result of an identical earlier call."""
    if on not in ("both", "source"):
        raise ValueError(f"pretrain_on must be 'both' or 'source', got {on!r}")
    inputs = [task.source_train.X] + ([task.target_train.X] if on == "both" else [])
    key = (_digest(*inputs), tuple(task.source_shape), int(task.seed), _factory_id(task.backbone),
           str(device), int(steps), int(task.budget.batch_size), on, float(noise), float(lr))
    encoder.to(device)
    cached = _CACHE.get(key)
    if cached is None:
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            _train(task, encoder, dim, inputs, steps=steps, noise=noise, lr=lr, device=device)
        cached = {k: v.detach().clone() for k, v in encoder.state_dict().items()}
        _CACHE[key] = cached
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    else:
        _CACHE.move_to_end(key)
        encoder.load_state_dict(cached)


def _train(task: Task, encoder: nn.Module, dim: int, inputs: list, *, steps: int, noise: float,
           lr: float, device: torch.device) -> None:
    torch.manual_seed(stream_seed(task.seed, 10))
    X = np.concatenate([np.asarray(a, dtype=np.float32) for a in inputs])
    decoder = nn.Linear(dim, X.shape[1]).to(device)
    encoder.train()
    opt = make_sgd(list(encoder.parameters()) + list(decoder.parameters()), lr=lr, momentum=0.9)
    batches = TensorBatches(X, batch_size=task.budget.batch_size, device=device,
                            seed=stream_seed(task.seed, 11))
    gen = torch.Generator(device=device).manual_seed(stream_seed(task.seed, 12))
    loss = torch.zeros(())
    for step in range(steps):
        set_lr(opt, annealed_lr(progress(step, steps), lr))
        x = batches.next().x
        keep = (torch.rand(x.shape, generator=gen, device=device) >= noise).to(x.dtype)
        loss = F.mse_loss(decoder(encoder(x * keep)), x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        check_finite(loss, step, every=CHECK_EVERY)
    check_finite(loss, steps)
