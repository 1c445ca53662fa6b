"""Target-oracle reference: the shared network trained on *labelled target* data.

An upper reference, not a domain-adaptation method: it declares the
``oracle`` requirement, so the host hands it the labels of the target *train*
split (``task.target_train_labels``; the target *test* split stays with the
host) and shows it as a reference row that is never ranked.

Everything else matches ``source-only`` (and therefore ``dann``): feature
extractor ``task.backbone(task.target_shape)`` plus a linear classifier,
cross-entropy, ``task.budget.steps`` SGD steps (momentum 0.9) on batches of
``task.budget.batch_size``, learning rate annealed ``mu_p = lr / (1 + 10 p) ** 0.75``
(Ganin et al. 2016).  It needs no shared feature space: it only ever sees
target inputs (on a heterogeneous pair its predictor has no source encoder).
"""

from __future__ import annotations

from torch import nn

from dabench import Float, Method, Task, hookimpl
from dabench.training import BACKBONE_LR_MULT, TorchPredictor, fit_supervised, resolve_device, seed_everything, stream_seed


class TargetOracle(Method):
    """Supervised training on the labelled target train split (reference only)."""

    name = "target-oracle"
    family = "reference"
    version = "1"
    reference = True
    requires = frozenset({"oracle"})
    paper = "Target-supervised upper reference ('Train on target'), Ganin et al., JMLR 17(59), 2016, Table 2"
    hyperparameters = {
        "lr": Float(0.01, 1e-3, 0.1, log=True, help="initial SGD learning rate mu0 (annealed)"),
        "weight_decay": Float(5e-4, 1e-6, 1e-2, log=True, help="L2 weight decay"),
        "backbone_lr_mult": BACKBONE_LR_MULT,
    }

    @classmethod
    def skip(cls, task: Task) -> str | None:
        if task.target_train_labels is None:
            return "needs the labelled target train split (the host gives it to 'oracle' methods only)"
        return super().skip(task)

    def fit(self, task: Task) -> TorchPredictor:
        if task.target_train_labels is None:
            raise ValueError("target-oracle needs task.target_train_labels (declare requires={'oracle'})")
        seed_everything(task.seed)
        device = resolve_device(task.device)
        encoder, dim = task.backbone(task.target_shape)
        classifier = nn.Linear(dim, task.n_classes)
        fit_supervised(encoder, classifier, task.target_train.X, task.target_train_labels,
                       steps=task.budget.steps, batch_size=task.budget.batch_size,
                       lr=self.lr, weight_decay=self.weight_decay, device=device,
                       seed=stream_seed(task.seed, 2), backbone_lr_mult=self.backbone_lr_mult)
        # On a heterogeneous pair the encoder only understands target inputs.
        enc = encoder if task.same_feature_space else {"target": encoder}
        return TorchPredictor(enc, classifier, device)


@hookimpl
def dabench_methods(register) -> None:  # type: ignore[no-untyped-def]
    register(TargetOracle)
