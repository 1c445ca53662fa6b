"""Frozen-feature baseline: a pretrained backbone kept fixed, a new linear head trained on source.

Paper-standard version: deep features of an ImageNet-pretrained CNN used as a
fixed representation with a new classifier on top (DeCAF, Donahue et al.,
"DeCAF: A Deep Convolutional Activation Feature for Generic Visual
Recognition", ICML 2014; the Office "source only" rows with fixed DeCAF
features).

What "pretrained" means here (see ``dabench_plugins.pretraining``): the
embedded data has no upstream corpus and runs offline, so the backbone is
pretrained as a denoising autoencoder (Vincent et al. 2008) on unlabelled
inputs, by default the source-train and target-train inputs of the pair as in
Glorot, Bordes & Bengio (ICML 2011).  No label is used for pretraining; the
head uses source labels only.  ``pretrain_on = "source"`` keeps the target
out of pretraining too.

Procedure:

1. ``round(pretrain_frac * task.budget.steps)`` steps of autoencoder
   pretraining of ``task.backbone(task.source_shape)`` (cached in-process per
   pair, seed and settings);
2. the backbone is frozen (``requires_grad = False``, its weights never
   change) and the source-train features are extracted once, as DeCAF does;
3. a new linear head is trained with cross-entropy on those features for the
   remaining steps (SGD, momentum 0.9, DANN learning-rate annealing, L2
   weight decay), batches of ``task.budget.batch_size``.

Simplified: a linear softmax head trained by SGD stands for DeCAF's
logistic regression / linear SVM; no ImageNet weights (no network, no
upstream data; the paper version would need torchvision and a download).
"""

from __future__ import annotations

import torch
from torch import nn

from dabench import Float, Method, Task, hookimpl
from dabench.training import TorchPredictor, fit_supervised, resolve_device, seed_everything, stream_seed

from .pretraining import PRETRAIN_HPARAMS, pretrain_denoising, pretrain_steps


@torch.no_grad()
def extract(encoder: nn.Module, X, device: torch.device, batch_size: int = 1024) -> torch.Tensor:
    """Features of ``X`` (rows) through the frozen ``encoder``, kept on ``device``."""
    outs = []
    for start in range(0, len(X), batch_size):
        xb = torch.as_tensor(X[start:start + batch_size].copy(), dtype=torch.float32, device=device)
        outs.append(encoder(xb))
    return torch.cat(outs)


class FrozenFeatures(Method):
    """Pretrained backbone frozen; only a new linear head is trained on source labels."""

    name = "frozen-features"
    family = "baseline"
    version = "1"
    requires = frozenset({"same_feature_space", "arrays"})
    paper = ("Donahue et al., DeCAF, ICML 2014 (fixed pretrained features); here pretrained as a "
             "denoising autoencoder on unlabelled inputs, Glorot, Bordes & Bengio, ICML 2011")
    hyperparameters = {
        "lr": Float(0.01, 1e-3, 0.1, log=True, help="initial SGD learning rate of the head (annealed)"),
        "weight_decay": Float(5e-4, 1e-6, 1e-2, log=True, help="L2 weight decay of the head"),
        **PRETRAIN_HPARAMS,
    }

    def fit(self, task: Task) -> TorchPredictor:
        seed_everything(task.seed)
        device = resolve_device(task.device)
        encoder, dim = task.backbone(task.source_shape)
        pre, rest = pretrain_steps(task.budget.steps, self.pretrain_frac)
        pretrain_denoising(task, encoder, dim, steps=pre, on=self.pretrain_on,
                           noise=self.pretrain_noise, lr=self.pretrain_lr, device=device)
        encoder.eval()
        for prm in encoder.parameters():
            prm.requires_grad_(False)
        feats = extract(encoder, task.source_train.X, device)
        head = nn.Linear(dim, task.n_classes)
        fit_supervised(nn.Identity(), head, feats, task.source_train.y, steps=rest,
                       batch_size=task.budget.batch_size, lr=self.lr, weight_decay=self.weight_decay,
                       device=device, seed=stream_seed(task.seed, 1))
        return TorchPredictor(encoder, head, device)


@hookimpl
def dabench_methods(register) -> None:  # type: ignore[no-untyped-def]
    register(FrozenFeatures)
