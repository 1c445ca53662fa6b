"""The pytorch-adapt bridge: pytorch-adapt's algorithms as dabench methods.

pytorch-adapt (Musgrave, Belongie, Lim, "PyTorch Adapt", arXiv:2211.15673,
2022; https://github.com/KevinMusgrave/pytorch-adapt) builds each algorithm
from *hooks*: composable callables that compute features, losses and the
optimiser steps.  This plugin drives those hooks (``pytorch_adapt.hooks``,
``.layers``, ``.weighters``) inside dabench's contract: the network is
dabench's (``task.backbone`` as pytorch-adapt's ``G``, a linear classifier as
``C``), the data comes from the :class:`dabench.Task`, and every step is one
call of the algorithm's hook, which computes the losses and steps the
optimisers exactly as pytorch-adapt does.

Methods (``pa-`` + pytorch-adapt's name), all with SGD (momentum 0.9) and
DANN's annealed learning rate, ``lr / (1 + 10 p) ** 0.75``, like the native
methods, so that differences come from the algorithm:

- ``pa-dann``: ``DANNHook`` (Ganin et al., JMLR 2016): gradient reversal with
  a *constant* weight ``grl_weight`` (pytorch-adapt has no lambda schedule),
  discriminator MLP on ``G``'s features.
- ``pa-cdan``: ``CDANHook`` (Long et al., NeurIPS 2018): a GAN-style
  discriminator on the multilinear map of features and softmax outputs (the
  outer product when ``d * n_classes <= 4096``, else pytorch-adapt's
  ``RandomizedDotProduct`` with 1024 outputs, as in the paper).
- ``pa-mcc``: ``ClassifierHook`` + ``MCCHook`` (Jin et al., ECCV 2020).
- ``pa-bnm``: ``ClassifierHook`` + ``BNMHook`` (Cui et al., CVPR 2020).
- ``pa-atdoc``: ``ClassifierHook`` + ``ATDOCHook`` (Liang et al., CVPR 2021,
  the neighbourhood-aggregation variant, k = 5).
- ``pa-mcd``: ``MCDHook`` (Saito et al., CVPR 2018): two classifiers, the
  generator step repeated 4 times; predictions average both classifiers.
- ``pa-mmd``: ``AlignerPlusCHook`` with multi-kernel ``MMDLoss`` on features
  and softmax outputs (DAN, Long et al., ICML 2015).
- ``pa-jmmd``: ``AlignerPlusCHook`` + ``JointAlignerHook`` (JAN, Long et al.,
  ICML 2017): joint MMD of features and softmax outputs.
- ``pa-coral``: ``AlignerPlusCHook`` + ``AlignerHook(CORALLoss)`` on the
  logits (Deep CORAL, Sun & Saenko, ECCV-W 2016, aligns the last layer).

Choices and simplifications: losses are *summed* with the declared weights
(pytorch-adapt's ``SumWeighter``, the papers' ``L_cls + lambda L_adapt``)
instead of pytorch-adapt's default ``MeanWeighter``, which divides every
loss by their number; budgets are dabench's (CPU-sized).

Validators (``pa-im``, ``pa-entropy``, ``pa-bnm``, ``pa-snd``...) are
registered when ``pytorch_adapt.validators`` imports; it imports torchvision,
and where that fails the bridge says so (``dabench list validators``).

Install: ``pip install 'dabench[pytorch-adapt]'``, or without torchvision's
CUDA wheels: ``pip install --no-deps pytorch-adapt==0.0.83 torchmetrics==0.9.3
pytorch-metric-learning==1.6.3 'setuptools>=77.0.3,<81' tqdm`` (pytorch-adapt 0.0.83
pins these; it imports ``pkg_resources``, gone from setuptools 81).  When
pytorch-adapt is absent the bridge registers nothing and says why in
``dabench list plugins``.  pytorch-adapt is imported lazily, in ``fit``.
"""

from __future__ import annotations

import importlib.util
import math
from functools import lru_cache
from typing import Any

import numpy as np

from dabench import Float, Int, Method, Task, hookimpl
from dabench.contract import BACKBONE_LR_MULT

#: The dabench contract this plugin was written for.
dabench_contract = "1"

PA_VERSION = "0.0.83"
#: Modules pytorch-adapt's hooks need at import time.
REQUIRED = ("pytorch_adapt", "torchmetrics", "pytorch_metric_learning", "pkg_resources", "tqdm")
INSTALL = ("pip install --no-deps pytorch-adapt==0.0.83 torchmetrics==0.9.3 pytorch-metric-learning==1.6.3 "
           "'setuptools>=77.0.3,<81' tqdm")


def missing_modules() -> list[str]:
    """Required modules that are not installed (cheap: no import)."""
    return [m for m in REQUIRED if importlib.util.find_spec(m) is None]


class BridgeUnavailable(RuntimeError):
    """pytorch-adapt (or one of its pinned dependencies) cannot be imported."""


@lru_cache(maxsize=1)
def _pa() -> Any:
    """Import the parts of pytorch-adapt the methods use."""
    missing = missing_modules()
    if missing:
        raise BridgeUnavailable(f"pytorch-adapt bridge: {', '.join(missing)} not installed; {INSTALL}")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchmetrics warns about pkg_resources at import
        try:
            from pytorch_adapt import hooks, layers, weighters
            from pytorch_adapt.layers.utils import get_kernel_scales
        except Exception as exc:
            raise BridgeUnavailable(f"pytorch-adapt failed to import: {type(exc).__name__}: {exc}; {INSTALL}") from exc
    ns = type("pa", (), {})()
    ns.hooks, ns.layers, ns.weighters, ns.get_kernel_scales = hooks, layers, weighters, get_kernel_scales
    return ns


# ----------------------------------------------------------------- modules


def _torch():
    import torch

    return torch


def _disc(in_dim: int, hidden: int, layers: int):
    """Domain discriminator: ``layers`` hidden ReLU layers, one logit, output shape ``(n,)``."""
    nn = _torch().nn
    mods: list[Any] = []
    width = in_dim
    for _ in range(layers):
        mods += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    mods += [nn.Linear(width, 1), nn.Flatten(0)]
    return nn.Sequential(*mods)


def _outer_product_module():
    torch = _torch()

    class OuterProduct(torch.nn.Module):
        """CDAN's multilinear map ``f (x) g`` (Long et al. 2018, Eq. 4), flattened."""

        def forward(self, f: Any, g: Any) -> Any:
            return torch.bmm(g.unsqueeze(2), f.unsqueeze(1)).flatten(1)

    return OuterProduct()


def _mean_softmax_head(heads: Any):
    torch = _torch()

    class MeanSoftmax(torch.nn.Module):
        """Log of the mean of the classifiers' softmax outputs, so that the
        predictor's softmax gives the averaged probabilities."""

        def __init__(self, models: Any) -> None:
            super().__init__()
            self.models = models

        def forward(self, x: Any) -> Any:
            p = torch.stack([torch.softmax(m(x), dim=1) for m in self.models]).mean(0)
            return torch.log(p.clamp_min(1e-12))

    return MeanSoftmax(heads)


# ----------------------------------------------------------------- methods


_COMMON = {
    "lr": Float(0.01, 1e-3, 0.1, log=True, help="initial SGD learning rate (annealed as in DANN)"),
    "weight_decay": Float(5e-4, 1e-6, 1e-2, log=True, help="L2 weight decay"),
    "backbone_lr_mult": BACKBONE_LR_MULT,
}


class PytorchAdaptMethod(Method):
    """Base class: one pytorch-adapt hook call per training step."""

    family = "other"
    version = "1"
    requires = frozenset({"same_feature_space"})
    hyperparameters = dict(_COMMON)
    #: pytorch-adapt's hook class(es) this method drives (for docs and listings).
    pa_hook = ""

    # subclasses: the models besides G and C, the optimiser groups, the hook
    def extra_models(self, pa: Any, dim: int, task: Task) -> dict[str, Any]:
        return {}

    def classifier(self, dim: int, task: Task) -> Any:
        return _torch().nn.Linear(dim, task.n_classes)

    def build_hook(self, pa: Any, opts: dict[str, Any], dim: int, task: Task) -> Any:
        raise NotImplementedError

    def predict_head(self, models: dict[str, Any]) -> Any:
        return models["C"]

    def fit(self, task: Task) -> Any:
        pa = _pa()
        torch = _torch()
        from dabench.training import (
            TensorBatches,
            TorchPredictor,
            annealed_lr,
            backbone_param_groups,
            check_finite,
            make_sgd,
            progress,
            resolve_device,
            seed_everything,
            set_lr,
            stream_seed,
        )

        seed_everything(task.seed)
        device = resolve_device(task.device)
        encoder, dim = task.backbone(task.source_shape)
        models: dict[str, Any] = {"G": encoder, "C": self.classifier(dim, task)}
        models.update(self.extra_models(pa, dim, task))
        for m in models.values():
            m.to(device).train()
        groups = {k: backbone_param_groups(m, (), self.backbone_lr_mult) if k == "G" else list(m.parameters())
                  for k, m in models.items()}
        opts = {k: make_sgd(groups[k], lr=self.lr, momentum=0.9, weight_decay=self.weight_decay)
                for k, m in models.items() if any(True for _ in m.parameters())}
        hook = self.build_hook(pa, opts, dim, task)
        bs = task.budget.batch_size
        src = TensorBatches(task.source_train.X, task.source_train.y, batch_size=bs, device=device,
                            seed=stream_seed(task.seed, 1))
        tgt = TensorBatches(task.target_train.X, batch_size=bs, device=device, seed=stream_seed(task.seed, 2))
        ns, nt = src.batch_size, tgt.batch_size
        domains = {"src_domain": torch.zeros(ns, device=device), "target_domain": torch.ones(nt, device=device)}
        steps = task.budget.steps
        for step in range(steps):
            lr = annealed_lr(progress(step, steps), self.lr)
            for opt in opts.values():
                set_lr(opt, lr)
            s, t = src.next(), tgt.next()
            data = {"src_imgs": s.x, "src_labels": s.y, "target_imgs": t.x, "src_sample_idx": s.index,
                    "target_sample_idx": t.index, **domains}
            _, losses = hook({**models, **data})
            for group in losses.values():
                for name, value in (group.items() if isinstance(group, dict) else [("loss", group)]):
                    if not math.isfinite(float(value)):
                        check_finite(float(value), step)
        return TorchPredictor(models["G"], self.predict_head(models), device)


def _sum(pa: Any, **weights: float) -> Any:
    return pa.weighters.SumWeighter(weights={k: float(v) for k, v in weights.items()})


class PaDANN(PytorchAdaptMethod):
    """pytorch-adapt's DANNHook: gradient reversal, constant weight (Ganin et al. 2016)."""

    name = "pa-dann"
    family = "adversarial"
    pa_hook = "DANNHook"
    paper = "Ganin et al., JMLR 17(59), 2016, via pytorch-adapt 0.0.83 DANNHook (Musgrave et al. 2022)"
    hyperparameters = {
        **_COMMON,
        "grl_weight": Float(0.3, 0.01, 3.0, log=True,
                            help="gradient reversal weight, constant over training (pytorch-adapt's default is 1)"),
        "disc_hidden": Int(100, 16, 1024, log=True, help="hidden units per discriminator layer"),
        "disc_layers": Int(1, 1, 3, help="hidden layers of the discriminator"),
    }

    def extra_models(self, pa: Any, dim: int, task: Task) -> dict[str, Any]:
        return {"D": _disc(dim, self.disc_hidden, self.disc_layers)}

    def build_hook(self, pa: Any, opts: dict[str, Any], dim: int, task: Task) -> Any:
        return pa.hooks.DANNHook(opts=list(opts.values()), gradient_reversal_weight=self.grl_weight,
                                 weighter=_sum(pa))


class PaCDAN(PytorchAdaptMethod):
    """pytorch-adapt's CDANHook: conditional adversarial adaptation (Long et al. 2018)."""

    name = "pa-cdan"
    family = "adversarial"
    pa_hook = "CDANHook"
    paper = "Long et al., Conditional Adversarial Domain Adaptation, NeurIPS 2018, via pytorch-adapt 0.0.83 CDANHook"
    hyperparameters = {
        **_COMMON,
        "domain_weight": Float(0.3, 0.01, 3.0, log=True, help="weight of the generator's domain loss"),
        "disc_hidden": Int(100, 16, 1024, log=True, help="hidden units per discriminator layer"),
    }

    def extra_models(self, pa: Any, dim: int, task: Task) -> dict[str, Any]:
        c = task.n_classes
        if dim * c <= 4096:
            combiner, width = _outer_product_module(), dim * c
        else:
            combiner, width = pa.layers.RandomizedDotProduct([dim, c], 1024), 1024
        return {"D": _disc(width, self.disc_hidden, 1), "feature_combiner": combiner}

    def build_hook(self, pa: Any, opts: dict[str, Any], dim: int, task: Task) -> Any:
        w = self.domain_weight
        return pa.hooks.CDANHook(
            d_opts=[opts["D"]], g_opts=[opts["G"], opts["C"]],
            d_weighter=_sum(pa),
            g_weighter=_sum(pa, g_src_domain_loss=w, g_target_domain_loss=w))


class _ClassifierPlus(PytorchAdaptMethod):
    """Source cross-entropy plus one target loss hook, summed with ``weight``."""

    loss_key = ""

    def post_hook(self, pa: Any, dim: int, task: Task) -> Any:
        raise NotImplementedError

    def build_hook(self, pa: Any, opts: dict[str, Any], dim: int, task: Task) -> Any:
        return pa.hooks.ClassifierHook(opts=list(opts.values()), post=[self.post_hook(pa, dim, task)],
                                       weighter=_sum(pa, **{self.loss_key: self.weight}))


class PaMCC(_ClassifierPlus):
    """pytorch-adapt's MCCHook: minimum class confusion (Jin et al. 2020)."""

    name = "pa-mcc"
    family = "self-training"
    pa_hook = "ClassifierHook + MCCHook"
    loss_key = "mcc_loss"
    paper = "Jin et al., Minimum Class Confusion for Versatile Domain Adaptation, ECCV 2020, via pytorch-adapt 0.0.83"
    hyperparameters = {**_COMMON, "weight": Float(1.0, 0.03, 3.0, log=True, help="weight of the MCC loss")}

    def post_hook(self, pa: Any, dim: int, task: Task) -> Any:
        return pa.hooks.MCCHook()


class PaBNM(_ClassifierPlus):
    """pytorch-adapt's BNMHook: batch nuclear-norm maximisation (Cui et al. 2020)."""

    name = "pa-bnm"
    family = "self-training"
    pa_hook = "ClassifierHook + BNMHook"
    loss_key = "bnm_loss"
    paper = "Cui et al., Towards Discriminability and Diversity: Batch Nuclear-norm Maximization, CVPR 2020, via pytorch-adapt 0.0.83"
    hyperparameters = {**_COMMON, "weight": Float(1.0, 0.03, 3.0, log=True, help="weight of the BNM loss")}

    def post_hook(self, pa: Any, dim: int, task: Task) -> Any:
        return pa.hooks.BNMHook()


class PaATDOC(_ClassifierPlus):
    """pytorch-adapt's ATDOCHook: neighbourhood-aggregated pseudo-labels (Liang et al. 2021)."""

    name = "pa-atdoc"
    family = "self-training"
    pa_hook = "ClassifierHook + ATDOCHook"
    loss_key = "pseudo_label_loss"
    paper = "Liang et al., Domain Adaptation with Auxiliary Target Domain-Oriented Classifier, CVPR 2021, via pytorch-adapt 0.0.83"
    hyperparameters = {
        **_COMMON,
        "weight": Float(0.2, 0.01, 1.0, log=True, help="weight of the pseudo-label loss"),
        "k": Int(5, 1, 20, help="neighbours aggregated per target sample"),
    }

    def post_hook(self, pa: Any, dim: int, task: Task) -> Any:
        return pa.hooks.ATDOCHook(dataset_size=len(task.target_train), feature_dim=dim,
                                  num_classes=task.n_classes, k=self.k)


class PaMCD(PytorchAdaptMethod):
    """pytorch-adapt's MCDHook: maximum classifier discrepancy (Saito et al. 2018)."""

    name = "pa-mcd"
    family = "adversarial"
    pa_hook = "MCDHook"
    paper = "Saito et al., Maximum Classifier Discrepancy for Unsupervised Domain Adaptation, CVPR 2018, via pytorch-adapt 0.0.83"
    hyperparameters = {**_COMMON, "repeat": Int(4, 1, 8, help="generator steps per iteration (num_k)")}

    def classifier(self, dim: int, task: Task) -> Any:
        from pytorch_adapt.layers import MultipleModels

        nn = _torch().nn
        return MultipleModels(nn.Linear(dim, task.n_classes), nn.Linear(dim, task.n_classes))

    def build_hook(self, pa: Any, opts: dict[str, Any], dim: int, task: Task) -> Any:
        return pa.hooks.MCDHook(g_opts=[opts["G"]], c_opts=[opts["C"]], repeat=self.repeat,
                                x_weighter=_sum(pa), y_weighter=_sum(pa), z_weighter=_sum(pa))

    def predict_head(self, models: dict[str, Any]) -> Any:
        return _mean_softmax_head(models["C"].models)


class _Aligner(PytorchAdaptMethod):
    family = "discrepancy"
    loss_keys: tuple[str, ...] = ()

    def aligner(self, pa: Any) -> Any:
        return None

    def loss_fn(self, pa: Any) -> Any:
        return pa.layers.MMDLoss(kernel_scales=pa.get_kernel_scales(low=-3, high=3, num_kernels=10))

    softmax = True

    def build_hook(self, pa: Any, opts: dict[str, Any], dim: int, task: Task) -> Any:
        return pa.hooks.AlignerPlusCHook(
            opts=list(opts.values()), loss_fn=self.loss_fn(pa), aligner_hook=self.aligner(pa),
            softmax=self.softmax, weighter=_sum(pa, **{k: self.weight for k in self.loss_keys}))


class PaMMD(_Aligner):
    """pytorch-adapt's multi-kernel MMD on features and softmax outputs (DAN, Long et al. 2015)."""

    name = "pa-mmd"
    pa_hook = "AlignerPlusCHook + MMDLoss"
    loss_keys = ("features_confusion_loss", "logits_confusion_loss")
    paper = "Long et al., Learning Transferable Features with Deep Adaptation Networks, ICML 2015, via pytorch-adapt 0.0.83"
    hyperparameters = {**_COMMON, "weight": Float(1.0, 0.03, 10.0, log=True, help="weight of each MMD term")}


class PaJMMD(_Aligner):
    """pytorch-adapt's joint MMD of features and softmax outputs (JAN, Long et al. 2017)."""

    name = "pa-jmmd"
    pa_hook = "AlignerPlusCHook + JointAlignerHook + MMDLoss"
    loss_keys = ("joint_confusion_loss",)
    paper = "Long et al., Deep Transfer Learning with Joint Adaptation Networks, ICML 2017, via pytorch-adapt 0.0.83"
    hyperparameters = {**_COMMON, "weight": Float(1.0, 0.03, 10.0, log=True, help="weight of the JMMD term")}

    def aligner(self, pa: Any) -> Any:
        return pa.hooks.JointAlignerHook(loss_fn=self.loss_fn(pa))


class PaCORAL(_Aligner):
    """pytorch-adapt's CORALLoss on the last layer (Deep CORAL, Sun & Saenko 2016)."""

    name = "pa-coral"
    pa_hook = "AlignerPlusCHook + AlignerHook(CORALLoss, logits)"
    loss_keys = ("logits_confusion_loss",)
    softmax = False
    paper = "Sun & Saenko, Deep CORAL, ECCV 2016 Workshops, via pytorch-adapt 0.0.83"
    hyperparameters = {**_COMMON, "weight": Float(1.0, 0.03, 10.0, log=True, help="weight of the CORAL loss")}

    def loss_fn(self, pa: Any) -> Any:
        return pa.layers.CORALLoss()

    def aligner(self, pa: Any) -> Any:
        return pa.hooks.AlignerHook(loss_fn=pa.layers.CORALLoss(), layer="logits")


METHODS = (PaDANN, PaCDAN, PaMCC, PaBNM, PaATDOC, PaMCD, PaMMD, PaJMMD, PaCORAL)


# ----------------------------------------------------------------- validators

#: pytorch-adapt validator classes bridged when they import: dabench name -> (class, paper).
VALIDATORS = {
    "pa-im": ("IMValidator", "information maximisation (Musgrave et al. 2022, ECCV)"),
    "pa-entropy": ("EntropyValidator", "target prediction entropy (Morerio et al. 2018)"),
    "pa-bnm": ("BNMValidator", "batch nuclear norm (Cui et al. 2020)"),
    "pa-snd": ("SNDValidator", "soft neighbourhood density (Saito et al. 2021, ICCV)"),
}


@lru_cache(maxsize=1)
def _validators_module() -> tuple[Any, str | None]:
    if missing_modules():
        return None, "pytorch-adapt is not installed"
    if importlib.util.find_spec("torchvision") is None:
        return None, "pytorch-adapt's validators import torchvision, which is not installed here"
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import pytorch_adapt.validators as v
    except Exception as exc:
        return None, f"pytorch_adapt.validators failed to import: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return v, None


def _bridge_validator(name: str, cls_name: str, paper: str, module: Any) -> Any:
    from dabench.validators import Validator

    cls = getattr(module, cls_name)

    def score(predictor: Any, task: Task) -> float:
        torch = _torch()
        X = task.target_train.X
        p = torch.from_numpy(np.asarray(predictor.predict_proba(X, domain="target"), dtype=np.float32))
        feats = torch.from_numpy(np.asarray(predictor.embed(X, domain="target"), dtype=np.float32))
        return float(cls()(target_train={"logits": torch.log(p.clamp_min(1e-12)), "preds": p, "features": feats}))

    return Validator(name, score, f"{paper}, via pytorch-adapt {PA_VERSION} {cls_name}", f"pytorch-adapt's {cls_name}")


# ----------------------------------------------------------------- hooks


@hookimpl
def dabench_methods(register) -> None:  # type: ignore[no-untyped-def]
    if missing_modules():
        return
    for cls in METHODS:
        register(cls)


@hookimpl
def dabench_validators(register) -> None:  # type: ignore[no-untyped-def]
    module, _ = _validators_module()
    if module is None:
        return
    for name, (cls_name, paper) in VALIDATORS.items():
        if hasattr(module, cls_name):
            register(_bridge_validator(name, cls_name, paper, module))


@hookimpl
def dabench_unavailable(register) -> None:  # type: ignore[no-untyped-def]
    missing = missing_modules()
    if missing:
        register("plugin", "pytorch-adapt",
                 f"{', '.join(missing)} not installed (an optional extra: pip install 'dabench[pytorch-adapt]'; "
                 f"without torchvision, the README's --no-deps command)")
        return
    module, reason = _validators_module()
    if module is None:
        for name in VALIDATORS:
            register("validator", name, str(reason))
    else:
        for name, (cls_name, _) in VALIDATORS.items():
            if not hasattr(module, cls_name):
                register("validator", name, f"pytorch_adapt.validators has no {cls_name}")
