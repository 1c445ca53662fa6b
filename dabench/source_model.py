"""The shared source model: trained once by the host, handed to every method
that starts from one.

Self-training (CBST, self-ensembling), clustering (CAN), source-free and
test-time methods start, in their papers, from a network trained on the
labelled source domain.  Rather than each plugin training its own short
warm-up inside its budget (so that two methods never start from the same
point and a sweep trains the same model again and again), the host trains
**one source model per (pair, protocol, seed, backbone, recipe)** with one
declared recipe, caches it on disk, and gives every method that declares
``requires = {"source_model"}`` a fresh copy as ``task.source_model``
(a :class:`SourceModel`).  The ``source-only`` baseline is that model,
evaluated.

The recipe (:class:`SourceRecipe`, the suite's ``[source_model]`` table)
is the supervised loop of :func:`dabench.training.fit_supervised`:
``task.backbone(shape)`` + a linear classifier, cross-entropy, SGD with
momentum 0.9, weight decay, learning rate annealed ``lr / (1 + 10 p) **
0.75`` (Ganin et al. 2016), seeded by the run seed.  Its resolved values
and :data:`RECIPE_VERSION` are part of the run key of every run that uses
the model, so changing the recipe recomputes those runs.

Cache entries (``<cache>/<key>.pt`` + ``<key>.json``) are keyed by the
sha256 of everything that determines the weights (pair, protocol, data
fingerprints, seed, backbone, input shape, recipe, device type, torch
version and CPU thread count) and checked by the sha256 of the weights
file: a stale, truncated or corrupt entry is rebuilt, never used.  Writers
go through unique temporary names and an atomic rename, under a file lock
per key, so concurrent workers never race: the second waits for the first
and reuses its model.  Weights are read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from .contract import Task

log = logging.getLogger("dabench")

#: Bump when the training loop of the recipe changes (it enters every run
#: key of methods that start from the source model).
RECIPE_VERSION = "1"
#: Bump when the cache layout changes.
CACHE_FORMAT = "1"


@dataclass(frozen=True)
class SourceRecipe:
    """How the host trains the shared source model (suite: ``[source_model]``,
    also per pair).  ``steps`` / ``batch_size`` default to the pair's budget."""

    steps: int | None = None
    batch_size: int | None = None
    lr: float = 0.01
    weight_decay: float = 5e-4
    #: learning rate of a *pretrained* backbone relative to the classifier's
    #: (TLlib: 0.1; :func:`dabench.training.backbone_param_groups`); a
    #: backbone trained from scratch learns at the classifier's rate
    backbone_lr_mult: float = 0.1

    def resolved(self, steps: int, batch_size: int) -> dict[str, Any]:
        """The recipe as recorded in run keys and cache keys, with the pair's
        budget filled in where the suite did not set it.  ``backbone_lr_mult``
        appears only when it is not the default 0.1, so keys written before
        it existed stay valid (the default is what those runs used: it only
        acts on pretrained backbones, which they did not have)."""
        d = {
            "version": RECIPE_VERSION,
            "steps": int(self.steps if self.steps is not None else steps),
            "batch_size": int(self.batch_size if self.batch_size is not None else batch_size),
            "lr": float(self.lr),
            "weight_decay": float(self.weight_decay),
        }
        if self.backbone_lr_mult != 0.1:
            d["backbone_lr_mult"] = float(self.backbone_lr_mult)
        return d


class SourceModel:
    """A trained source model as a method receives it (``task.source_model``).

    - :meth:`build` returns a *fresh* ``(encoder, classifier)`` pair loaded
      with the trained weights (in train mode, on ``device``): methods may
      modify them freely, the next method gets untouched copies.
    - :meth:`predictor` wraps a fresh copy as a :class:`~dabench.training.TorchPredictor`.
    - ``dim`` is the encoder's output width; ``recipe`` the resolved recipe;
      ``key`` the cache key; ``source_val_acc`` its accuracy on the source
      validation split (a model near chance is a failed training, flagged in
      the report).
    """

    def __init__(self, state: dict[str, dict[str, Any]], backbone: Callable, shape: tuple[int, ...],
                 n_classes: int, recipe: dict[str, Any], key: str, source_val_acc: float | None,
                 device: str = "cpu") -> None:
        self._state = state
        self._backbone = backbone
        self.shape = tuple(shape)
        self.n_classes = int(n_classes)
        self.recipe = dict(recipe)
        self.key = key
        self.source_val_acc = source_val_acc
        self.device = device
        enc, dim = self._modules()
        self.dim = dim

    def _modules(self) -> tuple[Any, int]:
        import torch

        with torch.random.fork_rng(devices=[]):  # building must not move the caller's RNG
            encoder, dim = self._backbone(self.shape)
        return encoder, dim

    def build(self, device: str | None = None) -> tuple[Any, Any]:
        """Fresh ``(encoder, classifier)`` with the source model's weights."""
        import torch
        from torch import nn

        from .training import resolve_device

        dev = resolve_device(device or self.device)
        encoder, dim = self._modules()
        with torch.random.fork_rng(devices=[]):
            classifier = nn.Linear(dim, self.n_classes)
        encoder.load_state_dict(copy.deepcopy(self._state["encoder"]))
        classifier.load_state_dict(copy.deepcopy(self._state["classifier"]))
        return encoder.to(dev).train(), classifier.to(dev).train()

    def predictor(self, device: str | None = None) -> Any:
        """The source model as a :class:`~dabench.training.TorchPredictor` (a fresh copy)."""
        from .training import TorchPredictor, resolve_device

        dev = resolve_device(device or self.device)
        encoder, classifier = self.build(str(dev))
        return TorchPredictor(encoder, classifier, dev)

    def __repr__(self) -> str:
        return f"SourceModel(key={self.key[:12]}, recipe={self.recipe}, dim={self.dim})"


@dataclass
class SourceModelInfo:
    """What the host records about the source model of one run."""

    key: str
    trained: bool  # trained by this run (False: reused from the cache)
    wall_time_s: float
    source_val_acc: float | None
    identity: dict[str, Any]


# --------------------------------------------------------------------- cache


def cache_identity(*, pair: str, protocol: dict, fingerprints: dict | None, seed: int, backbone: str,
                   shape: tuple[int, ...], n_classes: int, recipe: dict, device: str) -> dict[str, Any]:
    """Everything that determines the trained weights."""
    import torch

    dev_type = "cuda" if str(device).startswith("cuda") else "cpu"
    ident = {
        "format": CACHE_FORMAT, "pair": pair, "protocol": protocol, "data": fingerprints or {},
        "seed": int(seed), "backbone": backbone, "shape": list(shape), "n_classes": int(n_classes),
        "recipe": recipe, "device": dev_type, "torch": torch.__version__,
    }
    if dev_type == "cpu":
        ident["threads"] = torch.get_num_threads()
    return ident


def cache_key(identity: dict[str, Any]) -> str:
    from .store import canonical_json

    return hashlib.sha256(canonical_json(identity).encode()).hexdigest()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``path`` (created if needed)."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _atomic_write(path: Path, write: Callable[[Any], None], mode: str = "wb") -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def read_entry(cache_dir: Path, key: str) -> tuple[dict, dict] | None:
    """``(state, manifest)`` of an intact entry, else None (a damaged entry is
    removed with a warning so that it is rebuilt)."""
    import torch

    pt, manifest = cache_dir / f"{key}.pt", cache_dir / f"{key}.json"
    if not pt.exists() and not manifest.exists():
        return None
    try:
        meta = json.loads(manifest.read_text(encoding="utf-8"))
        if meta.get("key") != key or meta.get("format") != CACHE_FORMAT:
            raise ValueError("manifest does not describe this entry")
        if _sha256(pt) != meta.get("sha256"):
            raise ValueError("the weights file does not match its checksum")
        state = torch.load(pt, map_location="cpu", weights_only=True)
        if not (isinstance(state, dict) and {"encoder", "classifier"} <= set(state)):
            raise ValueError("the weights file lacks the encoder or the classifier")
        return state, meta
    except (OSError, ValueError, RuntimeError, json.JSONDecodeError, EOFError) as exc:
        log.warning("source model cache entry %s is damaged (%s); it is rebuilt", pt, exc)
        for p in (pt, manifest):
            with contextlib.suppress(OSError):
                p.unlink()
        return None


def write_entry(cache_dir: Path, key: str, state: dict, meta: dict) -> None:
    import torch

    cache_dir.mkdir(parents=True, exist_ok=True)
    pt, manifest = cache_dir / f"{key}.pt", cache_dir / f"{key}.json"
    _atomic_write(pt, lambda f: torch.save(state, f))
    meta = dict(meta, key=key, format=CACHE_FORMAT, sha256=_sha256(pt))
    _atomic_write(manifest, lambda f: f.write(json.dumps(meta, indent=1, sort_keys=True)), mode="w")


# --------------------------------------------------------------------- training


def train_source_model(task: Task, recipe: dict[str, Any]) -> tuple[dict, float | None]:
    """Train ``task.backbone(source_shape)`` + a linear classifier on the
    labelled source train split by ``recipe``; return ``(state, source_val_acc)``."""
    from torch import nn

    from .training import TorchPredictor, fit_supervised, resolve_device, seed_everything, stream_seed

    seed_everything(task.seed)
    device = resolve_device(task.device)
    encoder, dim = task.backbone(task.source_shape)
    classifier = nn.Linear(dim, task.n_classes)
    fit_supervised(encoder, classifier, task.source_train.X, task.source_train.y,
                   steps=recipe["steps"], batch_size=recipe["batch_size"], lr=recipe["lr"],
                   weight_decay=recipe["weight_decay"], device=device, seed=stream_seed(task.seed, 1),
                   backbone_lr_mult=recipe.get("backbone_lr_mult", 0.1))
    acc = None
    if len(task.source_val):
        p = TorchPredictor(encoder, classifier, device).predict_proba(task.source_val.X, "source")
        acc = float((p.argmax(1) == task.source_val.y).mean())
    state = {"encoder": {k: v.detach().cpu().clone() for k, v in encoder.state_dict().items()},
             "classifier": {k: v.detach().cpu().clone() for k, v in classifier.state_dict().items()}}
    return state, acc


def attach_source_model(task: Task, *, recipe: dict[str, Any], identity: dict[str, Any],
                        cache_dir: str | os.PathLike | None) -> tuple[Task, SourceModelInfo]:
    """``task`` with ``source_model`` set: loaded from ``cache_dir`` when an
    intact entry exists, else trained (and cached when ``cache_dir`` is set)."""
    key = cache_key(identity)
    t0 = time.perf_counter()
    trained = False
    if cache_dir is None:
        state, acc = train_source_model(task, recipe)
        trained = True
    else:
        cache_dir = Path(cache_dir)
        with _locked(cache_dir / f".{key}.lock"):
            hit = read_entry(cache_dir, key)
            if hit is not None:
                state, meta = hit
                acc = meta.get("source_val_acc")
            else:
                state, acc = train_source_model(task, recipe)
                trained = True
                write_entry(cache_dir, key, state, {"identity": identity, "source_val_acc": acc,
                                                    "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    model = SourceModel(state, task.backbone, task.source_shape, task.n_classes, recipe, key, acc, task.device)
    info = SourceModelInfo(key, trained, time.perf_counter() - t0, acc, identity)
    return replace(task, source_model=model), info


def with_source_model(task: Task, recipe: SourceRecipe | None = None,
                      cache_dir: str | os.PathLike | None = None) -> Task:
    """``task`` with a source model trained by ``recipe`` (default: the
    default recipe at the task's budget), for tests and direct use of a
    method outside a sweep (the host does this itself in a sweep)."""
    rec = (recipe or SourceRecipe()).resolved(task.budget.steps, task.budget.batch_size)
    ident = cache_identity(pair="<direct>", protocol={}, fingerprints=None, seed=task.seed, backbone="<task>",
                           shape=task.source_shape, n_classes=task.n_classes, recipe=rec, device=task.device)
    return attach_source_model(task, recipe=rec, identity=ident, cache_dir=cache_dir)[0]


def chance_level(y: np.ndarray, n_classes: int) -> float:
    """Accuracy of always predicting the majority class of ``y``."""
    counts = np.bincount(np.asarray(y, dtype=np.int64), minlength=n_classes)
    return float(counts.max() / max(1, counts.sum()))


__all__ = ["CACHE_FORMAT", "RECIPE_VERSION", "SourceModel", "SourceModelInfo", "SourceRecipe",
           "attach_source_model", "cache_identity", "cache_key", "chance_level", "read_entry",
           "train_source_model", "with_source_model", "write_entry"]
