"""Source-only baseline: the host's shared source model, evaluated as is.

The lower reference every adaptation method must beat.  The model is the
one the host trains once per (pair, seed, backbone, recipe) and hands to
every method that starts from a source model (CBST, self-ensembling, CAN,
source-free and test-time methods; see :mod:`dabench.source_model`), so
"method minus source-only" measures what the method added to that very
model.  Its recipe is the suite's ``[source_model]`` table:

- feature extractor ``task.backbone(task.source_shape)`` and a linear
  classifier on top, cross-entropy on labelled source batches;
- ``steps`` SGD steps (momentum 0.9, weight decay) on batches of
  ``batch_size`` source samples (default: the pair's budget), learning rate
  annealed as in Ganin et al. (2016), ``mu_p = lr / (1 + 10 p) ** 0.75``
  with ``p`` the training progress in [0, 1].

The DANN plugin trains the same network with the same optimiser and
schedule plus its adversarial term, so "DANN minus source-only" measures
adaptation alone when both use the same budget and learning rate.
"""

from __future__ import annotations

from dabench import Method, Task, hookimpl
from dabench.training import TorchPredictor


class SourceOnly(Method):
    """The shared source model (trained on labelled source data only), applied to the target as is."""

    name = "source-only"
    family = "baseline"
    version = "2"
    requires = frozenset({"same_feature_space", "source_model"})
    requires_contract = "1.1"
    paper = "No adaptation; the lower reference of Ganin et al., JMLR 17(59), 2016 (Table 2, 'Source only')"
    hyperparameters: dict = {}

    def fit(self, task: Task) -> TorchPredictor:
        return task.source_model.predictor(task.device)


@hookimpl
def dabench_methods(register) -> None:  # type: ignore[no-untyped-def]
    register(SourceOnly)
