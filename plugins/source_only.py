"""Source-only baseline: the shared network trained on labelled source data.

The lower reference every adaptation method must beat.  The network, the
optimiser and the schedule are those of the ``dann`` plugin with the
adaptation term removed, so "DANN minus source-only" measures adaptation
alone:

- feature extractor ``task.backbone(task.source_shape)`` and a linear
  classifier on top, cross-entropy on source batches;
- ``task.budget.steps`` steps of SGD (momentum 0.9) on batches of
  ``task.budget.batch_size`` source samples, learning rate annealed as in
  Ganin et al. (2016), ``mu_p = lr / (1 + 10 p) ** 0.75`` with ``p`` the
  training progress in [0, 1].
"""

from __future__ import annotations

from torch import nn

from dabench import Float, Method, Task, hookimpl
from dabench.training import BACKBONE_LR_MULT, TorchPredictor, fit_supervised, resolve_device, seed_everything, stream_seed


class SourceOnly(Method):
    """Train on labelled source data only; apply the model to the target as is."""

    name = "source-only"
    family = "baseline"
    version = "1"
    requires = frozenset({"same_feature_space"})
    paper = "No adaptation; the lower reference of Ganin et al., JMLR 17(59), 2016 (Table 2, 'Source only')"
    hyperparameters = {
        "lr": Float(0.01, 1e-3, 0.1, log=True, help="initial SGD learning rate mu0 (annealed)"),
        "weight_decay": Float(5e-4, 1e-6, 1e-2, log=True, help="L2 weight decay"),
        "backbone_lr_mult": BACKBONE_LR_MULT,
    }

    def fit(self, task: Task) -> TorchPredictor:
        seed_everything(task.seed)
        device = resolve_device(task.device)
        encoder, dim = task.backbone(task.source_shape)
        classifier = nn.Linear(dim, task.n_classes)
        fit_supervised(encoder, classifier, task.source_train.X, task.source_train.y,
                       steps=task.budget.steps, batch_size=task.budget.batch_size,
                       lr=self.lr, weight_decay=self.weight_decay, device=device,
                       seed=stream_seed(task.seed, 1), backbone_lr_mult=self.backbone_lr_mult)
        return TorchPredictor(encoder, classifier, device)


@hookimpl
def dabench_methods(register) -> None:  # type: ignore[no-untyped-def]
    register(SourceOnly)
