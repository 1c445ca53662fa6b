"""GPU check of the streamed image path: ResNet-50 + DANN through dabench vs a plain loop.

    python scripts/gpu_streamed_resnet50.py --folder DIR [--steps 150] [--batch 64] [--out results.json]

Prepared for a machine with a CUDA GPU (the device check of issue 14; not run
on the CPU-only development machine).  In one process, on the same generated
image folder (``DIR/src/<class>/*.jpg`` and ``DIR/tgt/<class>/*.jpg``; make it
with ``--make N``) and the same batch size:

1. **dabench**: an ``imagefolder`` suite (224x224, ``augment = "crop-flip"``,
   ``amp = true``), ``backbone = "resnet50"`` with random initial weights (no
   weights can be downloaded there), method ``dann``, run by
   ``dabench.runner.Runner.run_one`` on ``cuda``: images decoded by loader
   workers, pinned memory, prefetch, bf16 autocast, channels-last.
2. **plain loop**: a hand-written DANN step (same ResNet-50, linear head,
   one-hidden-layer discriminator behind a gradient reversal layer, SGD) fed
   by ``torchvision.datasets.ImageFolder`` + ``transforms`` (Resize 256x256,
   RandomResizedCrop 224, flip, ToTensor, Normalize) and a ``DataLoader`` with
   the same number of workers, pinned memory, bf16 autocast and channels-last.
   Without torchvision the plain loop reads the folder with a hand-written
   PIL dataset and the script's own ResNet-50 (the torchvision architecture),
   which then also stands in for dabench's backbone.

Images/s counts source + target images per training step, after a warm-up,
for ``--steps`` steps; the GPU's name, torch's version and the worker count
are recorded.  Aim: under 6 minutes on one GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


# ---------------------------------------------------------------- a torchvision-free ResNet-50


class _Bottleneck(nn.Module):
    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        cout = width * 4
        self.body = nn.Sequential(
            nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.down = None if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.body(x) + (x if self.down is None else self.down(x)))


def resnet50_plain() -> nn.Module:
    """torchvision's ResNet-50 architecture (fc removed: 2048-d output), random weights."""
    layers: list[nn.Module] = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True),
                               nn.MaxPool2d(3, 2, 1)]
    cin = 64
    for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
        for b in range(blocks):
            layers.append(_Bottleneck(cin, width, stride if b == 0 else 1))
            cin = width * 4
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return nn.Sequential(*layers)


def _torchvision():
    try:
        import torchvision

        return torchvision
    except Exception:  # absent, or built for another torch
        return None


# ---------------------------------------------------------------- data


def make_folders(root: Path, n: int, side: int = 160, classes: int = 10) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for dom, shift in (("src", 0.0), ("tgt", 1.0)):
        for i in range(n):
            k = i % classes
            d = root / dom / f"c{k}"
            d.mkdir(parents=True, exist_ok=True)
            img = np.zeros((side, side, 3))
            img[:, :, k % 3] = 150.0
            img[(7 * k) % side: (7 * k) % side + 20] += 80.0
            img += 40.0 * shift + rng.normal(0.0, 30.0, size=img.shape)
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(d / f"{i:05d}.jpg", quality=90)


class _PilFolder(torch.utils.data.Dataset):
    """A hand-written ImageFolder + RandomResizedCrop/flip transform (PIL), for the plain loop without torchvision."""

    def __init__(self, root: Path) -> None:
        self.items = [(str(p), k) for k, c in enumerate(sorted(d.name for d in root.iterdir() if d.is_dir()))
                      for p in sorted((root / c).glob("*.jpg"))]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        from dabench.data.stream import decode

        path, label = self.items[i]
        x = decode(path, "crop-flip", (224, 224), (256, 256), seed=int(torch.randint(0, 2**62, ())))
        return torch.from_numpy(x.copy()), label


def _plain_loader(root: Path, batch: int, workers: int):
    tv = _torchvision()
    if tv is not None:
        T = tv.transforms
        tf = T.Compose([T.Resize((256, 256)), T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.ToTensor(),
                        T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
        ds = tv.datasets.ImageFolder(str(root), transform=tf)
    else:
        ds = _PilFolder(root)
    return torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, drop_last=True, num_workers=workers,
                                       pin_memory=True, persistent_workers=workers > 0,
                                       prefetch_factor=4 if workers else None)


def _forever(loader):
    while True:
        yield from loader


# ---------------------------------------------------------------- the two paths


def plain_dann(root: Path, steps: int, warmup: int, batch: int, workers: int, device: str) -> dict:
    from dabench.training import grad_reverse

    tv = _torchvision()
    torch.manual_seed(0)
    if tv is not None:
        net = tv.models.resnet50(weights=None)
        net.fc = nn.Identity()
    else:
        net = resnet50_plain()
    head, disc = nn.Linear(2048, 10), nn.Sequential(nn.Linear(2048, 100), nn.ReLU(), nn.Linear(100, 1))
    mods = nn.ModuleList([net, head, disc]).to(device).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(mods.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    src, tgt = _forever(_plain_loader(root / "src", batch, workers)), _forever(_plain_loader(root / "tgt", batch, workers))
    mean = torch.tensor((0.485, 0.456, 0.406), device=device).view(1, 3, 1, 1)
    std = torch.tensor((0.229, 0.224, 0.225), device=device).view(1, 3, 1, 1)
    dom = torch.cat([torch.zeros(batch), torch.ones(batch)]).to(device)
    t0 = None
    for step in range(warmup + steps):
        if step == warmup:
            torch.cuda.synchronize() if device.startswith("cuda") else None
            t0 = time.perf_counter()
        (xs, ys), (xt, _) = next(src), next(tgt)
        x = torch.cat([xs, xt]).to(device, non_blocking=True)
        if x.dtype == torch.uint8:  # the torchvision-free dataset yields pixels
            x = (x.float() / 255.0 - mean) / std
        x = x.contiguous(memory_format=torch.channels_last)
        ys = ys.to(device, non_blocking=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda")):
            f = net(x)
            loss = nn.functional.cross_entropy(head(f[:batch]), ys) + \
                nn.functional.binary_cross_entropy_with_logits(disc(grad_reverse(f, 1.0)).squeeze(1).float(), dom)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    torch.cuda.synchronize() if device.startswith("cuda") else None
    dt = time.perf_counter() - t0
    return {"images_per_s": 2 * batch * steps / dt, "s": dt, "loss": float(loss.detach()),
            "data": "torchvision ImageFolder + transforms" if tv is not None else "hand-written PIL dataset",
            "network": "torchvision resnet50" if tv is not None else "the script's ResNet-50"}


def dabench_dann(root: Path, steps: int, warmup: int, batch: int, device: str, work: Path) -> dict:
    from dabench import image_backbones
    from dabench.plugins import get_registry
    from dabench.runner import Runner
    from dabench.suite import parse_suite

    image_backbones.PRETRAINED = False  # random initial weights: nothing can be downloaded
    registry = get_registry()
    if _torchvision() is None:
        def _plain_backbone(shape):
            return nn.Sequential(image_backbones._ImageNetInput(tuple(shape)), resnet50_plain()), 2048

        registry.backbones["resnet50"] = _plain_backbone
    suite = work / "gpu.toml"
    suite.write_text(f"""
name = "gpu-streamed"
seeds = 1
backbone = "resnet50"
pairs = ["src:tgt"]
[protocol]
augment = "crop-flip"
amp = true
[budget]
steps = {{steps}}
batch_size = {batch}
[domains.src]
path = "{root / 'src'}"
format = "imagefolder"
label_space = "gpu10"
size = [224, 224]
[domains.tgt]
path = "{root / 'tgt'}"
format = "imagefolder"
label_space = "gpu10"
size = [224, 224]
[methods.dann]
""")
    out = {}
    # the run's fit time for `warmup` and `warmup + steps` steps: the difference is `steps` steady steps
    for n in (warmup, warmup + steps):
        text = suite.read_text()
        path = work / f"gpu{n}.toml"
        path.write_text(text.replace("{steps}", str(n)))
        (spec,) = parse_suite(path, registry).expand(registry)
        r = Runner(registry, None).run_one(spec, device=device)
        if r.status != "ok":
            raise SystemExit(f"dabench run failed: {r.reason}")
        out[n] = r
    dt = out[warmup + steps].wall_time_s - out[warmup].wall_time_s
    return {"images_per_s": 2 * batch * steps / dt, "s": dt, "target_acc": out[warmup + steps].target_acc,
            "peak_gpu_mem_mb": out[warmup + steps].gpu_peak_mb}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--folder", required=True, help="folder with src/ and tgt/ image folders")
    ap.add_argument("--make", type=int, default=0, help="first generate N images per domain there")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "gpu_streamed_resnet50.json"))
    a = ap.parse_args()
    root = Path(a.folder)
    if a.make:
        make_folders(root, a.make)
    from dabench.data.stream import loader_workers

    workers = loader_workers()
    rec = {"device": torch.cuda.get_device_name(0) if a.device.startswith("cuda") else "cpu",
           "torch": torch.__version__, "torchvision": getattr(_torchvision(), "__version__", None),
           "loader_workers": workers, "batch": a.batch, "steps": a.steps, "warmup": a.warmup,
           "images_per_domain": sum(1 for _ in (root / "src").rglob("*.jpg"))}
    t0 = time.perf_counter()
    rec["dabench"] = dabench_dann(root, a.steps, a.warmup, a.batch, a.device, Path(a.out).resolve().parent)
    rec["plain"] = plain_dann(root, a.steps, a.warmup, a.batch, workers, a.device)
    rec["dabench_over_plain"] = rec["dabench"]["images_per_s"] / rec["plain"]["images_per_s"]
    rec["total_s"] = time.perf_counter() - t0
    Path(a.out).write_text(json.dumps(rec, indent=1))
    print(json.dumps(rec, indent=1))


if __name__ == "__main__":
    main()
