"""Self-ensembling: a mean teacher for domain adaptation.

French, Mackiewicz, Fisher. "Self-ensembling for visual domain adaptation",
ICLR 2018, built on the mean teacher of Tarvainen & Valpola, "Mean teachers
are better role models", NeurIPS 2017.

Why this consistency method (and not FixMatch): it is the consistency method
designed for, and evaluated on, unsupervised domain adaptation (digit pairs,
VisDA-2017 winner), and its augmentations (small affine jitter, translation,
Gaussian noise) are ones that can be written for any flattened image tensor
without an image library; FixMatch's strong RandAugment policy needs
photometric/geometric ops from torchvision/PIL and was designed for
semi-supervised learning within one domain.

What is followed (Sec. 3 and the authors' code,
Britefury/self-ensemble-visual-domain-adapt, ``experiment_domainadapt_meanteacher.py``):

- Training from scratch, source and target together.  French et al. train
  student and teacher from randomly initialised weights on labelled source
  and unlabelled target batches from the first step (their confidence
  threshold is what keeps the consistency term quiet until the teacher is
  sure, so no source pre-training or ramp-up is needed); this plugin does
  the same and therefore does *not* start from the host's shared source
  model.  It is compared with source-only at the same budget, as DANN is.
- A student network trained by Adam (learning rate ``lr`` = 1e-3, the
  reference's default, constant, no weight decay; a *pretrained* backbone
  at ``backbone_lr_mult`` times it, as every dabench method) and a teacher whose
  weights are an exponential moving average of the student's: after every
  student step ``theta_T <- alpha theta_T + (1 - alpha) theta_S``
  (``teacher_alpha`` 0.99; the reference's ``WeightEMA`` averages the
  parameters only).
- Separate source and target batches through the student (the reference's
  default, ``combine_batches`` off): with batch normalisation each batch is
  normalised with its own domain's statistics, which the paper singles out
  as essential (Sec. 3.2).  The teacher runs in training mode on its target
  view, as in the reference, so its batch-norm running statistics are
  those of the target domain, and so are the returned model's.
- **Batch normalisation is required.**  When the pair's backbone has none,
  the plugin uses the batch-norm variant of the built-in backbone
  (``default`` -> ``default-bn``, ``mlp`` -> ``mlp-bn``, ``dann-mnist`` ->
  ``dann-mnist-bn``, ``small-cnn`` -> ``small-cnn-bn``) and records
  ``bn_variant = 1``: per-domain statistics are part of the method as
  published, so the row's gain over source-only then includes them (read
  it with that in mind, or give the pair a ``-bn`` backbone so that every
  method shares it).  A backbone with no batch norm and no known variant
  (a third party's) is skipped with that reason.
- Every sample is augmented; each target sample is augmented twice,
  independently, once for the student and once for the teacher.  Loss
  (the reference's ``compute_aug_loss``):
  ``CE(student(aug(x_s)), y_s) + unsup_weight * (L_cons + class_balance * L_bal)``,
  ``unsup_weight`` 3.
- Consistency ``L_cons``: the squared difference between the student's and
  the teacher's class probabilities on the two views, averaged over classes,
  counted only for samples whose teacher confidence ``max_c p_T(c)`` exceeds
  ``confidence`` (0.96837722, the reference's default), averaged over the
  batch.  The teacher's output is a fixed target (no gradient).
- Class balance ``L_bal``: the binary cross-entropy between the student's
  mean target prediction over the batch and the uniform distribution
  ``1/C``, averaged over classes times ``C``, scaled by the fraction of
  confident samples; weight ``class_balance`` 0.005 inside the unsupervised
  term, so ``unsup_weight * class_balance`` overall, as in the reference.
- Augmentations for images ``(C, H, W)``: per sample, a random affine matrix
  ``I + N(0, affine_std)`` and a uniform translation in
  ``[-translate, translate]`` pixels, resampled bilinearly
  (``torch.nn.functional.affine_grid``/``grid_sample``, on the device, no
  torchvision), then additive Gaussian noise of std ``noise_std`` (pixels in
  [0, 1]); the reference's digit setting is 0.1 / 2 px / 0.1.  For vectors:
  additive Gaussian noise of ``noise_std`` times each feature's standard
  deviation (pooled over source and target train), then feature dropout with
  rate ``feature_dropout`` (default 0: on 2-d inputs such as the moons,
  dropping a feature destroys the sample).
- The teacher is the returned model (French et al. report the teacher).

Simplified or changed, and why:

- The network is the pair's backbone (batch-norm variant) plus a linear
  head, not the reference's per-benchmark architectures.
- No intensity scale/offset/flip augmentation (the reference uses it only
  for MNIST<->SVHN); no Gaussian ramp-up alternative to the threshold.
- The reference keeps the teacher of the epoch with the highest mask rate
  (a label-free choice); this plugin returns the final teacher.
- Version 1 used SGD at the benchmark's annealed rate, forwarded source and
  target in one batch through a network without batch norm and weighted
  the class balance without ``unsup_weight``: its mask stayed shut
  (0.000 / 0.000 / 0.000 / 0.002 of the target batch per quarter on
  mnist -> mnistm), so the consistency term never acted.
- Cost per step: student forward/backward on a source and a target batch,
  one teacher forward on the target batch and three augmentations (about
  2.5-3x a source-only step).

Health signals (:mod:`dabench.diagnostics`): ``mask_rate`` and
``mask_rate_q1``..``_q4`` (fraction of the target batch whose teacher
confidence passes the threshold, per quarter of the steps), ``bn_variant``
and ``engaged``: 1 when the mask was open for at least 10 % of the target
batch over the last quarter of training, so the consistency term acted.
"""

from __future__ import annotations

import copy
import functools
from typing import Any, Callable

import torch
from torch import nn
from torch.nn import functional as F

from dabench import Float, Method, Task, diagnostics, hookimpl
from dabench import backbones as _bb
from dabench.training import (
    BACKBONE_LR_MULT,
    CHECK_EVERY,
    TensorBatches,
    TorchPredictor,
    check_finite,
    backbone_param_groups,
    resolve_device,
    seed_everything,
    stream_seed,
)

#: ``engaged`` is 1 when the mask's mean over the last quarter reaches this.
ENGAGED_MIN_MASK = 0.1

#: Built-in backbones without batch norm -> their batch-norm variants.
_BN_VARIANTS: dict[Callable, Callable] = {
    _bb.default_backbone: _bb.default_bn_backbone,
    _bb.mlp_backbone: functools.partial(_bb.mlp_backbone, norm=True),
    _bb.dann_mnist_backbone: functools.partial(_bb.dann_mnist_backbone, norm=True),
    _bb.small_cnn_backbone: functools.partial(_bb.small_cnn_backbone, norm=True),
}
#: Built-in factories known to have batch norm (recognised without building them).
_BN_NAMES = {"default_bn_backbone", "dtn_backbone", "resnet50_backbone", "resnet101_backbone"}


def batch_norm_backbone(factory: Callable, shape: tuple[int, ...]) -> tuple[Callable | None, bool]:
    """``(factory to use, substituted)``: ``factory`` itself when its network
    has batch norm, the batch-norm variant of a built-in backbone without it
    (``substituted`` True), or ``(None, False)`` when there is neither."""
    base: Any = factory
    kwargs: dict = {}
    if isinstance(factory, functools.partial):
        base, kwargs = factory.func, dict(factory.keywords)
        if kwargs.get("norm"):
            return factory, False
    if getattr(base, "__name__", "") in _BN_NAMES:
        return factory, False
    if base in _BN_VARIANTS:
        if kwargs or (isinstance(factory, functools.partial) and factory.args):
            return functools.partial(base, *getattr(factory, "args", ()), **dict(kwargs, norm=True)), True
        return _BN_VARIANTS[base], True
    with torch.random.fork_rng(devices=[]):  # an unknown factory: look inside (must not move the RNG)
        module, _ = factory(shape)
    return (factory, False) if _bb.has_batch_norm(module) else (None, False)


class Augment:
    """Random augmentation of flattened inputs on their device.

    ``shape`` is the per-sample shape: ``(C, H, W)`` images get affine jitter,
    translation and pixel noise; anything else is treated as a vector and
    gets scaled Gaussian noise and feature dropout.  Random numbers come from
    one seeded :class:`torch.Generator` on the device, so a seed gives the
    same views on CPU every time.
    """

    def __init__(self, shape: tuple[int, ...], device: torch.device, seed: int, *,
                 translate: float = 2.0, affine_std: float = 0.1, noise_std: float = 0.1,
                 feature_dropout: float = 0.0, feature_std: torch.Tensor | None = None) -> None:
        self.shape = tuple(int(s) for s in shape)
        self.image = len(self.shape) == 3
        self.translate, self.affine_std, self.noise_std = translate, affine_std, noise_std
        self.feature_dropout = feature_dropout
        self.feature_std = feature_std
        self.gen = torch.Generator(device=device).manual_seed(int(seed) % 2**63)
        self.device = device

    def _randn(self, *size: int) -> torch.Tensor:
        return torch.randn(*size, generator=self.gen, device=self.device)

    def _rand(self, *size: int) -> torch.Tensor:
        return torch.rand(*size, generator=self.gen, device=self.device)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        if self.image:
            c, h, w = self.shape
            img = x.reshape(n, c, h, w)
            if self.affine_std > 0 or self.translate > 0:
                theta = torch.eye(2, 3, device=x.device).repeat(n, 1, 1)
                if self.affine_std > 0:
                    theta[:, :, :2] += self.affine_std * self._randn(n, 2, 2)
                if self.translate > 0:
                    # pixels -> normalised coordinates of affine_grid (align_corners=False)
                    shift = (self._rand(n, 2) * 2 - 1) * self.translate
                    theta[:, 0, 2] = shift[:, 0] * 2.0 / w
                    theta[:, 1, 2] = shift[:, 1] * 2.0 / h
                grid = F.affine_grid(theta, [n, c, h, w], align_corners=False)
                img = F.grid_sample(img, grid, mode="bilinear", padding_mode="border", align_corners=False)
            out = img.reshape(n, -1)
            if self.noise_std > 0:
                out = out + self.noise_std * self._randn(*out.shape)
            return out
        out = x
        if self.noise_std > 0:
            scale = self.noise_std if self.feature_std is None else self.noise_std * self.feature_std
            out = out + scale * self._randn(*out.shape)
        if self.feature_dropout > 0:
            keep = (self._rand(*out.shape) >= self.feature_dropout).to(out.dtype)
            out = out * keep / (1.0 - self.feature_dropout)
        return out


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, alpha: float) -> None:
    """``theta_T <- alpha theta_T + (1 - alpha) theta_S`` for every parameter."""
    # one fused op over all parameters: t + (1 - alpha) (s - t)
    torch._foreach_lerp_(list(teacher.parameters()), [p.detach() for p in student.parameters()], 1.0 - alpha)


def consistency_loss(student_proba: torch.Tensor, teacher_proba: torch.Tensor,
                     confidence: float) -> tuple[torch.Tensor, torch.Tensor]:
    """French et al.'s masked squared-difference consistency (the reference's
    ``compute_aug_loss`` with ``loss='var'``).

    Returns ``(loss, mask)``: ``loss`` is the batch mean of
    ``mask_i * mean_c (p_S(c|x_i) - p_T(c|x_i))^2`` with ``mask_i = 1`` where
    the teacher's confidence exceeds ``confidence``; the teacher's
    probabilities are treated as constants.
    """
    teacher_proba = teacher_proba.detach()
    mask = (teacher_proba.max(dim=1).values > confidence).to(student_proba.dtype)
    per_sample = ((student_proba - teacher_proba) ** 2).mean(dim=1)
    return (per_sample * mask).mean(), mask


def class_balance_loss(student_proba: torch.Tensor) -> torch.Tensor:
    """BCE between the batch-mean prediction and the uniform ``1/C``, summed over classes."""
    n_classes = student_proba.shape[1]
    mean = student_proba.mean(dim=0)
    u = 1.0 / n_classes
    eps = 1e-6
    bce = -(u * torch.log(mean + eps) + (1 - u) * torch.log(1 - mean + eps))
    return bce.mean() * n_classes


def unsupervised_loss(student_proba: torch.Tensor, teacher_proba: torch.Tensor, confidence: float,
                      class_balance: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's ``compute_aug_loss`` (no ramp-up): ``(L_cons +
    class_balance * L_bal * mean(mask), mask)``; the caller multiplies the
    whole by ``unsup_weight``."""
    cons, mask = consistency_loss(student_proba, teacher_proba, confidence)
    if class_balance > 0:
        cons = cons + class_balance * class_balance_loss(student_proba) * mask.mean()
    return cons, mask


class TeacherStudent(nn.Module):
    """Encoder + linear head as one module, so the teacher is one deepcopy."""

    def __init__(self, encoder: nn.Module, classifier: nn.Module) -> None:
        super().__init__()
        self.encoder, self.classifier = encoder, classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.encoder(x))


class SelfEnsembling(Method):
    """Mean-teacher consistency on augmented target views (French et al. 2018)."""

    name = "self-ensembling"
    family = "self-training"
    version = "2"
    requires = frozenset({"same_feature_space", "arrays"})
    paper = ("French, Mackiewicz, Fisher, Self-ensembling for visual domain adaptation, ICLR 2018 "
             "(mean teacher: Tarvainen & Valpola, NeurIPS 2017)")
    hyperparameters = {
        "lr": Float(1e-3, 1e-5, 1e-2, log=True, help="Adam learning rate (constant, as the reference)"),
        "backbone_lr_mult": BACKBONE_LR_MULT,
        "teacher_alpha": Float(0.99, 0.9, 0.999, help="EMA decay of the teacher weights"),
        "unsup_weight": Float(3.0, 0.1, 30.0, log=True, help="weight of the unsupervised (consistency + balance) loss"),
        "confidence": Float(0.96837722, 0.5, 0.999, help="teacher confidence threshold of the consistency mask"),
        "class_balance": Float(0.005, 0.0, 0.1, help="weight of the class-balance loss inside the unsupervised loss"),
        "translate": Float(2.0, 0.0, 4.0, help="images: max random translation in pixels"),
        "affine_std": Float(0.1, 0.0, 0.3, help="images: std of the random affine matrix perturbation"),
        "noise_std": Float(0.1, 0.0, 0.5, help="Gaussian noise std (pixels in [0,1]; vectors: x feature std)"),
        "feature_dropout": Float(0.0, 0.0, 0.5, help="vectors: feature dropout rate"),
    }

    @classmethod
    def skip(cls, task: Task) -> str | None:
        reason = super().skip(task)
        if reason is None and batch_norm_backbone(task.backbone, task.source_shape)[0] is None:
            name = getattr(task.backbone, "__name__", type(task.backbone).__name__)
            return (f"self-ensembling needs a backbone with batch normalisation (per-domain statistics are "
                    f"part of the method, French et al. 2018, Sec. 3.2) and {name!r} has none and no known "
                    "batch-norm variant: give the pair a backbone with batch norm (e.g. 'default-bn')")
        return reason

    def fit(self, task: Task) -> TorchPredictor:
        seed_everything(task.seed)
        device = resolve_device(task.device)
        factory, substituted = batch_norm_backbone(task.backbone, task.source_shape)
        if factory is None:
            raise ValueError(self.skip(task) or "self-ensembling needs a batch-norm backbone")
        encoder, dim = factory(task.source_shape)
        student = TeacherStudent(encoder, nn.Linear(dim, task.n_classes)).to(device).train()
        teacher = copy.deepcopy(student).train()
        for p in teacher.parameters():
            p.requires_grad_(False)
        # Adam as the reference; a pretrained backbone at backbone_lr_mult times the rate
        groups = backbone_param_groups(student.encoder, student.classifier, self.backbone_lr_mult)
        for g in groups:
            g["lr"] = self.lr * g["lr_mult"]
        opt = torch.optim.Adam(groups, lr=self.lr)
        bs = task.budget.batch_size
        src = TensorBatches(task.source_train.X, task.source_train.y, batch_size=bs,
                            device=device, seed=stream_seed(task.seed, 1))
        tgt = TensorBatches(task.target_train.X, batch_size=bs, device=device, seed=stream_seed(task.seed, 2))
        feature_std = None
        if len(task.source_shape) != 3:
            feature_std = torch.cat([src.X, tgt.X]).std(dim=0).clamp_min(1e-8)
        aug = Augment(task.source_shape, device, stream_seed(task.seed, 3), translate=self.translate,
                      affine_std=self.affine_std, noise_std=self.noise_std,
                      feature_dropout=self.feature_dropout, feature_std=feature_std)
        steps = task.budget.steps
        loss = torch.zeros((), device=device)
        masks: list[torch.Tensor] = []
        for step in range(steps):
            s, t = src.next(), tgt.next()
            # separate passes: each domain's batch normalised with its own statistics
            logits_s = student(aug(s.x))
            logits_t = student(aug(t.x))
            with torch.no_grad():  # the teacher in training mode: target batch statistics
                teacher_proba = torch.softmax(teacher(aug(t.x)), dim=1)
            student_proba = torch.softmax(logits_t, dim=1)
            unsup, mask = unsupervised_loss(student_proba, teacher_proba, self.confidence, self.class_balance)
            loss = F.cross_entropy(logits_s, s.y) + self.unsup_weight * unsup
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            ema_update(teacher, student, self.teacher_alpha)
            check_finite(loss, step, every=CHECK_EVERY)
            masks.append(mask.detach().mean())
        check_finite(loss, steps)
        rates = torch.stack(masks).float().cpu().tolist() if masks else []
        diagnostics.quarters(rates, "mask_rate")
        diagnostics.record("bn_variant", float(substituted))
        if rates:
            last = rates[3 * len(rates) // 4:] or rates[-1:]
            diagnostics.record("engaged", float(sum(last) / len(last) >= ENGAGED_MIN_MASK))
        return TorchPredictor(teacher.encoder, teacher.classifier, device)


@hookimpl
def dabench_methods(register) -> None:  # type: ignore[no-untyped-def]
    register(SelfEnsembling)
