"""Backbones of the standard image benchmarks (entry point ``image-backbones``).

Registered names (``backbone = "..."`` in a suite), each a factory
``factory(shape) -> (module, out_dim)`` taking flattened ``[0, 1]`` inputs
like every dabench backbone:

- ``"lenet"``: the LeNet variant of the digit benchmarks (ADDA, Tzeng et al.
  2017; CDAN, Long et al. 2018; TLlib's ``lenet``): conv5×5-20, maxpool 2,
  ReLU, conv5×5-50, dropout2d 0.5, maxpool 2, ReLU, flatten, fc-500, ReLU,
  dropout 0.5 (500-d features).  Used for MNIST↔USPS at 28×28.
- ``"lenet-tllib"``: that LeNet followed by TLlib's 256-d bottleneck
  (``Linear(500, 256)``, batch norm, ReLU), the network of TLlib's digit
  DANN/CDAN scripts.
- ``"dtn"``: the DTN of the SVHN→MNIST benchmark (CDAN; TLlib's ``dtn``):
  three conv5×5 stride-2 layers (64, 128, 256 channels) with batch norm,
  dropout2d (0.1, 0.3, 0.5) and ReLU, then fc-512, batch norm, ReLU,
  dropout 0.5 (512-d features).  Used at 32×32.
- ``"resnet50"``, ``"resnet101"``: torchvision ResNets with ImageNet weights
  (``IMAGENET1K_V1``, the weights the Office/VisDA papers used), the final
  fc removed (2048-d pooled features), fine-tuned end to end (marked
  pretrained: methods fine-tune them at ``backbone_lr_mult``, default 0.1,
  times the heads' learning rate).  Inputs are normalised with the ImageNet
  mean and sd, channels-last on CUDA.  torchvision is imported only
  when such a backbone is built (never on the CPU-only path); the weights
  download to torch's cache (``TORCH_HOME``) on first use.

Pixels are mapped from [0, 1] to [-1, 1] for LeNet and DTN (the
``Normalize(0.5, 0.5)`` of the published pipelines).

For the **head protocol**, :func:`get_feature_extractor` gives the frozen
ResNet feature extractors whose outputs :mod:`dabench.data.features` caches
(``<domain>@resnet50`` domains of :mod:`dabench.data.standard`).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from . import hookimpl
from .backbones import _channels_last, _check_shape, _Unflatten, mark_pretrained
from .data.core import DataError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: Load the ImageNet weights (tests switch this off so they never download).
PRETRAINED = True
RESNET_WEIGHTS = {"resnet50": "ResNet50_Weights.IMAGENET1K_V1", "resnet101": "ResNet101_Weights.IMAGENET1K_V1"}


def _image_shape(shape: tuple[int, ...], name: str, min_hw: int) -> tuple[int, int, int]:
    shape = _check_shape(shape)
    if len(shape) != 3 or shape[1] < min_hw or shape[2] < min_hw:
        raise ValueError(f"{name} backbone needs (C, H, W) images of at least {min_hw}x{min_hw}, got {shape}")
    return shape  # type: ignore[return-value]


def _flat_dim(net: nn.Module, shape: tuple[int, int, int]) -> int:
    with torch.no_grad():
        was = net.training
        net.eval()
        d = net(torch.zeros(1, *shape)).shape[1]
        net.train(was)
    return int(d)


def lenet_backbone(shape: tuple[int, ...]) -> tuple[nn.Module, int]:
    """LeNet as in the digit DA benchmarks (500-d output)."""
    c, h, w = _image_shape(shape, "lenet", 16)
    convs = nn.Sequential(
        nn.Conv2d(c, 20, kernel_size=5), nn.MaxPool2d(2), nn.ReLU(),
        nn.Conv2d(20, 50, kernel_size=5), nn.Dropout2d(p=0.5), nn.MaxPool2d(2), nn.ReLU(),
        nn.Flatten(),
    )
    d = _flat_dim(convs, (c, h, w))
    net = nn.Sequential(_Unflatten((c, h, w)), convs, nn.Linear(d, 500), nn.ReLU(), nn.Dropout(p=0.5))
    return _channels_last(net), 500


def lenet_tllib_backbone(shape: tuple[int, ...], bottleneck: int = 256) -> tuple[nn.Module, int]:
    """TLlib's digit network: :func:`lenet_backbone` followed by the
    bottleneck of its ``ImageClassifier`` (``Linear(500, 256)``,
    ``BatchNorm1d``, ReLU; ``bottleneck_dim=256`` in the DANN/CDAN digit
    scripts), 256-d output.  The linear head of every method sits on the
    bottleneck, as in TLlib."""
    net, d = lenet_backbone(shape)
    net = nn.Sequential(net, nn.Linear(d, bottleneck), nn.BatchNorm1d(bottleneck), nn.ReLU())
    return _channels_last(net), bottleneck


def dtn_backbone(shape: tuple[int, ...]) -> tuple[nn.Module, int]:
    """DTN as in the SVHN→MNIST benchmark (512-d output)."""
    c, h, w = _image_shape(shape, "dtn", 16)
    convs = nn.Sequential(
        nn.Conv2d(c, 64, kernel_size=5, stride=2, padding=2), nn.BatchNorm2d(64), nn.Dropout2d(0.1), nn.ReLU(),
        nn.Conv2d(64, 128, kernel_size=5, stride=2, padding=2), nn.BatchNorm2d(128), nn.Dropout2d(0.3), nn.ReLU(),
        nn.Conv2d(128, 256, kernel_size=5, stride=2, padding=2), nn.BatchNorm2d(256), nn.Dropout2d(0.5), nn.ReLU(),
        nn.Flatten(),
    )
    d = _flat_dim(convs, (c, h, w))
    net = nn.Sequential(_Unflatten((c, h, w)), convs, nn.Linear(d, 512), nn.BatchNorm1d(512), nn.ReLU(),
                        nn.Dropout(0.5))
    return _channels_last(net), 512


def _torchvision_resnet(name: str) -> nn.Module:
    try:
        import torchvision.models as tvm
    except Exception as exc:  # ImportError, or a torchvision built for another torch
        raise DataError(f"the {name} backbone needs torchvision ({type(exc).__name__}: {exc}); install the "
                        f"torchvision build matching your torch (pip install torchvision)") from exc
    weights = getattr(tvm, RESNET_WEIGHTS[name].split(".")[0]).IMAGENET1K_V1 if PRETRAINED else None
    net = getattr(tvm, name)(weights=weights)
    net.fc = nn.Identity()
    return net


class _ImageNetInput(nn.Module):
    """``(n, 3*H*W)`` in [0, 1] -> ImageNet-normalised ``(n, 3, H, W)``."""

    def __init__(self, shape: tuple[int, int, int]) -> None:
        super().__init__()
        self.shape = shape
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], *self.shape)
        if self.shape[0] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = (x - self.mean) / self.std
        if x.is_cuda:  # channels-last convolutions on the GPU (tensor cores); CPU results unchanged
            x = x.contiguous(memory_format=torch.channels_last)
        return x


def _resnet_factory(name: str):
    def factory(shape: tuple[int, ...]) -> tuple[nn.Module, int]:
        c, h, w = _image_shape(shape, name, 32)
        if c not in (1, 3):
            raise ValueError(f"{name} backbone needs 1- or 3-channel images, got {shape}")
        net = nn.Sequential(_ImageNetInput((c, h, w)), _torchvision_resnet(name))
        if PRETRAINED:  # fine-tuned at backbone_lr_mult x the heads' learning rate
            mark_pretrained(net, f"torchvision {RESNET_WEIGHTS[name]}")
        return net, 2048

    factory.__name__ = f"{name}_backbone"
    factory.__doc__ = f"torchvision {name} with ImageNet weights ({RESNET_WEIGHTS[name]}), fc removed (2048-d)."
    return factory


resnet50_backbone = _resnet_factory("resnet50")
resnet101_backbone = _resnet_factory("resnet101")


def get_feature_extractor(name: str, device: str | None = None):
    """The frozen head-protocol extractor ``name`` (``resnet50``/``resnet101``)
    as a :class:`dabench.data.features.FeatureExtractor`; the network is built
    (and torchvision imported) only when features must be extracted."""
    from .data.features import FeatureExtractor

    if name not in RESNET_WEIGHTS:
        raise DataError(f"unknown feature extractor {name!r}; available: {sorted(RESNET_WEIGHTS)}")

    def build():
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        net = nn.Sequential(_ImageNetInput((3, 224, 224)), _torchvision_resnet(name)).to(dev).eval()

        @torch.no_grad()
        def extract(batch: np.ndarray) -> np.ndarray:
            x = torch.from_numpy(np.ascontiguousarray(batch)).to(dev).float().div_(255.0).flatten(1)
            return net(x).float().cpu().numpy()

        return extract

    return FeatureExtractor(name=name, weights=f"torchvision {RESNET_WEIGHTS[name]}",
                            preprocessing="RGB, bilinear, ImageNet mean/std", out_dim=2048, build=build)


@hookimpl
def dabench_backbones(register) -> None:  # type: ignore[no-untyped-def]
    """Register LeNet, DTN and the ImageNet ResNets."""
    register("lenet", lenet_backbone)
    register("lenet-tllib", lenet_tllib_backbone)
    register("dtn", dtn_backbone)
    register("resnet50", resnet50_backbone)
    register("resnet101", resnet101_backbone)


__all__ = ["dtn_backbone", "get_feature_extractor", "lenet_backbone", "lenet_tllib_backbone", "resnet101_backbone", "resnet50_backbone"]
