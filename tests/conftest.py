from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def registry():
    from dabench.plugins import get_registry

    return get_registry()


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip(), encoding="utf-8")
    return path


def run_cli(*args: str, env: dict | None = None, cwd: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``python -m dabench ARGS`` in a fresh process."""
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "dabench", *args], capture_output=True, text=True,
                          env=e, cwd=cwd, timeout=timeout)


TINY_SUITE = """
name = "tiny"
seeds = 2
pairs = ["moons:moons-rot35"]

[budget]
steps = 60
batch_size = 32

[methods.source-only]
[methods.dann]
"""


def make_task(registry, pair: str = "moons:moons-rot35", *, seed: int = 0, steps: int = 50,
              batch_size: int = 32, oracle: bool = False, source_lr: float | None = None, **protocol):
    """(task, split) for an embedded ``pair``, built as the runner builds them;
    with ``source_lr`` the task carries a shared source model trained at that
    learning rate for ``steps`` steps (as the host gives methods requiring one)."""
    from dabench.contract import Budget
    from dabench.data.core import Protocol, make_split

    s, t = pair.split(":")
    src, tgt = registry.datasets[s], registry.datasets[t]
    split = make_split(pair, src, tgt, src.load(None), tgt.load(None), seed=seed,
                       protocol=Protocol(**protocol))
    task = split.task(seed=seed, device="cpu", budget=Budget(steps, batch_size),
                      backbone=registry.backbones["default"], oracle=oracle)
    if source_lr is not None:
        from dabench.source_model import SourceRecipe, with_source_model

        task = with_source_model(task, SourceRecipe(lr=source_lr))
    return task, split


def write_image_folder(root: Path, classes=("cat", "dog", "owl"), per_class: int = 12, size=(20, 16),
                       shift: float = 0.0, seed: int = 0, fmt: str = "JPEG") -> Path:
    """An ImageFolder layout ``root/<class>/<i>.jpg`` of small learnable images:
    each class has its own colour stripes, plus noise; ``shift`` brightens
    the whole domain (a covariate shift)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    h, w = size
    for k, c in enumerate(classes):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            base = np.zeros((h, w, 3), dtype=np.float64)
            base[:, :, k % 3] = 180.0
            base[(k * 3) % h: (k * 3) % h + 4] += 60.0
            img = base + 40.0 * shift + rng.normal(0.0, 25.0, size=(h, w, 3))
            ext = "jpg" if fmt == "JPEG" else fmt.lower()
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / c / f"{i:03d}.{ext}", format=fmt)
    return root
