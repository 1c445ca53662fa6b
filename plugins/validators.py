"""Built-in validators (hyperparameter selection without target labels).

- ``source-val``: accuracy on the held-out source validation split: the
  classical choice (e.g. Ganin et al. 2016 use a source validation set).
- ``entropy``: negative mean prediction entropy on the unlabelled target
  (Morerio et al., ICLR 2018, "Minimal-entropy correlation alignment" use
  target entropy for model selection).
- ``im``: information maximisation, H(mean prediction) - mean H(prediction)
  on the unlabelled target (Gomes et al. NeurIPS 2010; used as a validator
  by Musgrave et al., ECCV 2022 "Benchmarking Validation Methods for UDA").
"""

from __future__ import annotations

import numpy as np

from dabench import hookimpl
from dabench.validators import Validator, entropy


def _source_val(predictor, task) -> float:
    p = predictor.predict_proba(task.source_val.X, domain="source")
    return float((p.argmax(1) == task.source_val.y).mean())


def _neg_entropy(predictor, task) -> float:
    p = predictor.predict_proba(task.target_train.X, domain="target")
    return float(-entropy(p).mean())


def _im(predictor, task) -> float:
    p = predictor.predict_proba(task.target_train.X, domain="target")
    return float(entropy(p.mean(0)) - entropy(p).mean())


@hookimpl
def dabench_validators(register):
    register(Validator("source-val", _source_val, "Ganin et al. 2016 (JMLR), source validation", "source validation accuracy"))
    register(Validator("entropy", _neg_entropy, "Morerio et al. 2018 (ICLR)", "minus the mean target prediction entropy"))
    register(Validator("im", _im, "Gomes et al. 2010 (NeurIPS); Musgrave et al. 2022 (ECCV)", "information maximisation on target"))
