"""Target-only-k baseline: the shared network trained on the k labelled target
samples per class alone.

In semi-supervised and heterogeneous domain adaptation the few labelled
target samples already give a classifier without any source data; a method
that uses the source too must beat it, or the transfer was negative.  This is
the reference of those settings (e.g. the "target-only" / "SVMt" rows of
Hoffman et al., "Efficient learning of domain-invariant image
representations", ICLR 2013; Li et al., "Heterogeneous domain adaptation
through progressive alignment" (CDLS), TNNLS 2019; Yao et al., "Heterogeneous
domain adaptation via soft transfer network", ACM MM 2019, Tables 2-4).

What is followed: the ``source-only`` / ``target-oracle`` network and
optimiser (``task.backbone(task.target_shape)`` + linear classifier,
cross-entropy, ``task.budget.steps`` SGD steps with momentum 0.9, learning rate
annealed ``lr / (1 + 10 p) ** 0.75``), trained on ``task.target_labeled``
(``k x n_classes`` samples; batches of ``min(batch_size, k x n_classes)``).
It never sees source data, so its predictor has no source encoder on a
heterogeneous pair; on a shared space it also predicts source inputs (with
the target model) so forgetting can be measured.

Skipped, with the reason, when the suite's protocol has ``k_target = 0``.
"""

from __future__ import annotations

from torch import nn

from dabench import Float, Method, Task, hookimpl
from dabench.training import BACKBONE_LR_MULT, TorchPredictor, fit_supervised, resolve_device, seed_everything, stream_seed


class TargetOnlyK(Method):
    """Supervised training on the k labelled target samples per class only."""

    name = "target-only-k"
    family = "baseline"
    version = "1"
    requires = frozenset({"target_labels"})
    paper = ("Target-only baseline of semi-supervised/heterogeneous DA, e.g. 'SVMt' in Hoffman et al. ICLR 2013, "
             "Yao et al. ACM MM 2019 (STN)")
    hyperparameters = {
        "lr": Float(0.01, 1e-3, 0.1, log=True, help="initial SGD learning rate mu0 (annealed)"),
        "weight_decay": Float(5e-4, 1e-6, 1e-2, log=True, help="L2 weight decay"),
        "backbone_lr_mult": BACKBONE_LR_MULT,
    }

    def fit(self, task: Task) -> TorchPredictor:
        if task.target_labeled is None:
            raise ValueError("target-only-k needs task.target_labeled: set k_target > 0 in the suite's protocol")
        seed_everything(task.seed)
        device = resolve_device(task.device)
        encoder, dim = task.backbone(task.target_shape)
        classifier = nn.Linear(dim, task.n_classes)
        fit_supervised(encoder, classifier, task.target_labeled.X, task.target_labeled.y,
                       steps=task.budget.steps, batch_size=task.budget.batch_size,
                       lr=self.lr, weight_decay=self.weight_decay, device=device,
                       seed=stream_seed(task.seed, 3), backbone_lr_mult=self.backbone_lr_mult)
        enc = encoder if task.same_feature_space else {"target": encoder}
        return TorchPredictor(enc, classifier, device)


@hookimpl
def dabench_methods(register) -> None:  # type: ignore[no-untyped-def]
    register(TargetOnlyK)
