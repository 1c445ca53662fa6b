"""Default feature extractors (backbones) and the plugin that registers them.

A backbone factory is ``factory(shape) -> (torch.nn.Module, out_dim)``.  The
module takes *flattened* inputs ``(n, prod(shape))`` (that is how a
:class:`dabench.Task` stores ``X``) and returns ``(n, out_dim)`` features; it
reshapes image inputs itself.  Factories build fresh weights from torch's
global generator, so a method seeds (``dabench.training.seed_everything``)
before calling ``task.backbone(shape)``.  A factory whose module starts from
pretrained weights marks it with :func:`mark_pretrained`; methods fine-tune
such a backbone at ``backbone_lr_mult`` (default 0.1) times the heads'
learning rate, and train the others at the heads' rate.

Registered names (``backbone = "..."`` in a suite):

- ``"default"``: :func:`default_backbone`: an MLP for vectors, a small CNN
  for images (the MNIST feature extractor of Ganin et al. 2016 for images of
  at least 20x20 pixels, a 3x3-conv net for smaller ones such as 8x8 digits).
- ``"mlp"``: :func:`mlp_backbone`: the MLP on any input, images flattened.
- ``"dann-mnist"``: :func:`dann_mnist_backbone`: the 5x5-conv CNN for any
  image size of at least 20x20.
- ``"small-cnn"``: :func:`small_cnn_backbone`.
- ``"default-bn"``, ``"mlp-bn"``, ``"dann-mnist-bn"``, ``"small-cnn-bn"``: the
  same networks with batch normalisation after every convolution and hidden
  linear layer (before the non-linearity), as in the digit networks of the
  self-ensembling and SHOT reference code; methods that adapt normalisation
  statistics or affine parameters (AdaBN, TENT) need one of these, and
  methods that keep per-domain statistics (self-ensembling) use them.
  Train-mode batch statistics depend on what is in a batch: a method that
  forwards source and target in one concatenated batch normalises them with
  mixed statistics, and its eval-mode running averages are of that mixture.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import nn

from . import hookimpl

__all__ = [
    "MLP_HIDDEN",
    "FEATURE_DIM",
    "default_backbone",
    "default_bn_backbone",
    "has_batch_norm",
    "dann_mnist_backbone",
    "is_pretrained",
    "mark_pretrained",
    "mlp_backbone",
    "small_cnn_backbone",
]

#: Width of the MLP backbone's hidden layers (and its output).
MLP_HIDDEN = 64
#: Output width of the CNN backbones (the bottleneck after the conv stack).
FEATURE_DIM = 128


class _Unflatten(nn.Module):
    """``(n, C*H*W)`` -> ``(n, C, H, W)``, rescaling [0, 1] pixels to [-1, 1]."""

    def __init__(self, shape: tuple[int, int, int]) -> None:
        super().__init__()
        self.shape = tuple(int(s) for s in shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # channels-last: with the conv weights in the same layout (see
        # _channels_last) CPU convolutions and pooling run about 1.4x faster
        return (x.reshape(x.shape[0], *self.shape) * 2.0 - 1.0).contiguous(memory_format=torch.channels_last)

    def extra_repr(self) -> str:
        return f"shape={self.shape}, scale=[0,1]->[-1,1]"


def _channels_last(net: nn.Module) -> nn.Module:
    """Store the conv weights channels-last, matching :class:`_Unflatten`'s
    output (numerically the same network; faster on CPU and on GPUs with
    tensor cores)."""
    return net.to(memory_format=torch.channels_last)


def mark_pretrained(module: nn.Module, weights: str) -> nn.Module:
    """Declare that ``module`` starts from pretrained ``weights`` (e.g.
    ``"torchvision ResNet50_Weights.IMAGENET1K_V1"``): methods then fine-tune
    it at ``backbone_lr_mult`` times their learning rate
    (:func:`dabench.training.backbone_param_groups`).  Returns ``module``."""
    module.dabench_pretrained = str(weights)
    return module


def is_pretrained(module: nn.Module) -> bool:
    """Whether a backbone factory marked ``module`` with :func:`mark_pretrained`."""
    return bool(getattr(module, "dabench_pretrained", None))


def _check_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    shape = tuple(int(s) for s in shape)
    if not shape or any(s < 1 for s in shape):
        raise ValueError(f"backbone: invalid input shape {shape}")
    return shape


def mlp_backbone(shape: tuple[int, ...], hidden: int = MLP_HIDDEN, layers: int = 2,
                 norm: bool = False) -> tuple[nn.Module, int]:
    """An MLP ``d -> hidden -> ... -> hidden`` with ReLU after every layer
    (with ``norm``, ``BatchNorm1d`` before each ReLU).

    Works on any shape (inputs are already flat).  ``layers`` hidden layers of
    ``hidden`` units; the output is the last hidden layer.
    """
    shape = _check_shape(shape)
    d = math.prod(shape)
    mods: list[nn.Module] = []
    width = d
    for _ in range(layers):
        mods += [nn.Linear(width, hidden), *([nn.BatchNorm1d(hidden)] if norm else []), nn.ReLU()]
        width = hidden
    return nn.Sequential(*mods), hidden


def dann_mnist_backbone(shape: tuple[int, ...], out_dim: int = FEATURE_DIM, norm: bool = False) -> tuple[nn.Module, int]:
    """The MNIST feature extractor of Ganin et al. (2016, Fig. 4):
    conv5x5-32, ReLU, maxpool 2, conv5x5-48, ReLU, maxpool 2, followed by a
    ``Linear(., out_dim)`` + ReLU bottleneck (the paper's first 100-unit
    layer of the label predictor, widened to 128) so that every method gets a
    compact embedding and a linear classifier on top suffices.

    Pixels are rescaled from [0, 1] to [-1, 1]; no batch norm (as in the
    paper; it also keeps eval-mode predictions independent of batch
    composition and domain statistics).  Each max-pool comes before its
    ReLU: the same function as ReLU-then-pool (ReLU is monotone), on a
    quarter of the activations.  Tensors and conv weights are channels-last.
    With ``norm``, batch normalisation follows each convolution and the
    bottleneck's linear layer (the ``"dann-mnist-bn"`` backbone).
    """
    shape = _check_shape(shape)
    if len(shape) != 3 or shape[1] < 20 or shape[2] < 20:
        raise ValueError(f"dann-mnist backbone needs (C, H, W) images of at least 20x20, got {shape}")
    c, h, w = shape
    h2, w2 = ((h - 4) // 2 - 4) // 2, ((w - 4) // 2 - 4) // 2
    bn2 = (lambda n: [nn.BatchNorm2d(n)]) if norm else (lambda n: [])
    bn1 = (lambda n: [nn.BatchNorm1d(n)]) if norm else (lambda n: [])
    net = nn.Sequential(
        _Unflatten(shape),
        nn.Conv2d(c, 32, 5), *bn2(32), nn.MaxPool2d(2), nn.ReLU(),
        nn.Conv2d(32, 48, 5), *bn2(48), nn.MaxPool2d(2), nn.ReLU(),
        nn.Flatten(),
        nn.Linear(48 * h2 * w2, out_dim), *bn1(out_dim), nn.ReLU(),
    )
    return _channels_last(net), out_dim


def small_cnn_backbone(shape: tuple[int, ...], out_dim: int = FEATURE_DIM, norm: bool = False) -> tuple[nn.Module, int]:
    """A 3x3-conv net for small images (e.g. 8x8 digits): conv3x3-32, ReLU,
    maxpool 2 (when the image is at least 4x4), conv3x3-64, ReLU, flatten,
    then ``Linear(., out_dim)`` + ReLU.  Pixels are rescaled to [-1, 1].
    With ``norm``, batch normalisation before each ReLU."""
    shape = _check_shape(shape)
    if len(shape) != 3:
        raise ValueError(f"small-cnn backbone needs (C, H, W) images, got {shape}")
    c, h, w = shape
    pool = h >= 4 and w >= 4
    bn2 = [nn.BatchNorm2d(32)] if norm else []
    mods: list[nn.Module] = [_Unflatten(shape), nn.Conv2d(c, 32, 3, padding=1), *bn2, nn.ReLU()]
    if pool:
        mods.append(nn.MaxPool2d(2))
        h, w = h // 2, w // 2
    mods += [nn.Conv2d(32, 64, 3, padding=1), *([nn.BatchNorm2d(64)] if norm else []), nn.ReLU(), nn.Flatten(),
             nn.Linear(64 * h * w, out_dim), *([nn.BatchNorm1d(out_dim)] if norm else []), nn.ReLU()]
    return _channels_last(nn.Sequential(*mods)), out_dim


def default_bn_backbone(shape: tuple[int, ...]) -> tuple[nn.Module, int]:
    """:func:`default_backbone` with batch normalisation (``"default-bn"``)."""
    shape = _check_shape(shape)
    if len(shape) == 3:
        if shape[1] >= 20 and shape[2] >= 20:
            return dann_mnist_backbone(shape, norm=True)
        return small_cnn_backbone(shape, norm=True)
    return mlp_backbone(shape, norm=True)


def has_batch_norm(module: nn.Module) -> bool:
    """Whether ``module`` contains a batch-normalisation layer."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


def default_backbone(shape: tuple[int, ...]) -> tuple[nn.Module, int]:
    """The default feature extractor for inputs of ``shape``.

    - vectors ``(d,)``: :func:`mlp_backbone` (two hidden layers of 64, ReLU);
    - images ``(C, H, W)`` with H, W >= 20: :func:`dann_mnist_backbone`;
    - smaller images: :func:`small_cnn_backbone`.
    """
    shape = _check_shape(shape)
    if len(shape) == 3:
        if shape[1] >= 20 and shape[2] >= 20:
            return dann_mnist_backbone(shape)
        return small_cnn_backbone(shape)
    return mlp_backbone(shape)


@hookimpl
def dabench_backbones(register) -> None:  # type: ignore[no-untyped-def]
    """Register the built-in backbones."""
    register("default", default_backbone)
    register("mlp", mlp_backbone)
    register("dann-mnist", dann_mnist_backbone)
    register("small-cnn", small_cnn_backbone)
    register("default-bn", default_bn_backbone)
    register("mlp-bn", functools.partial(mlp_backbone, norm=True))
    register("dann-mnist-bn", functools.partial(dann_mnist_backbone, norm=True))
    register("small-cnn-bn", functools.partial(small_cnn_backbone, norm=True))
