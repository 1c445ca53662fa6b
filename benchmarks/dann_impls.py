"""One DANN configuration written four ways, for the speed benchmarks.

Every implementation trains the same networks (dabench's default backbone
for the pair, a linear label head, a 100-unit domain classifier), with the
same data, batch size (``bs`` source + ``bs`` target per step), SGD with
momentum 0.9, weight decay 5e-4, initial learning rate 0.03 and the same
number of steps; they differ only in the framework around the step:

- ``dabench``: the built-in plugin, ``DANN(lr=0.03, lambda_max=0.3).fit(task)``;
- ``floor``: a minimal hand-written torch loop (tensors in memory, a
  permutation per epoch, a GRL autograd function, the DANN lambda and
  learning-rate schedules), the fastest a Python DANN step can reasonably
  be; it draws the same batches as dabench, so it computes the same model;
- ``pytorch-adapt``: its ``DANNHook`` (features, GRL, domain loss and
  optimiser step as hooks; ``SumWeighter`` so the loss is the same sum as
  dabench's; the GRL weight and learning rate follow the same schedules);
- ``skada``: ``skada.deep.DANN`` (a skorch net with its
  ``DomainBalancedDataLoader``; its GRL weight stays 1 and there is no
  learning-rate schedule: skada has none built in, so its accuracy may
  differ a little).

Each ``fit_*`` returns ``(predict, steps)``: a function mapping target
inputs to predicted classes, and the number of optimisation steps taken
(skada trains whole epochs, so its step count is rounded up to epochs).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from functools import lru_cache
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

LR, WD, LAMBDA_MAX, GAMMA, DISC_HIDDEN = 0.03, 5e-4, 0.3, 10.0, 100

#: the pairs benchmarked, with the quick suite's budget for them
PAIRS = {
    "moons:moons-rot35": dict(steps=1500, batch_size=64),
    "mnist:mnistm": dict(steps=300, batch_size=64),
}


@lru_cache(maxsize=4)
def task_and_split(pair: str, seed: int = 0):
    """The quick suite's task and split for ``pair`` (2,000 samples per domain at most)."""
    from dabench.contract import Budget
    from dabench.data.core import Protocol, make_split
    from dabench.plugins import get_registry

    reg = get_registry()
    s, t = pair.split(":")
    src, tgt = reg.datasets[s], reg.datasets[t]
    split = make_split(pair, src, tgt, src.load(None), tgt.load(None), seed=seed,
                       protocol=Protocol(max_source=2000, max_target=2000))
    task = split.task(seed=seed, device="cpu", budget=Budget(**PAIRS[pair]),
                      backbone=reg.backbones["default"])
    return task, split


def accuracy(predict: Callable[[np.ndarray], np.ndarray], split: Any) -> float:
    return float((predict(split.target_test.X) == split.target_test.y).mean())


def _nets(task: Any) -> tuple[nn.Module, nn.Module, nn.Module]:
    torch.manual_seed(task.seed)
    enc, dim = task.backbone(task.source_shape)
    cls = nn.Linear(dim, task.n_classes)
    disc = nn.Sequential(nn.Linear(dim, DISC_HIDDEN), nn.ReLU(), nn.Linear(DISC_HIDDEN, 1))
    return enc, cls, disc


def _predictor(enc: nn.Module, cls: nn.Module) -> Callable[[np.ndarray], np.ndarray]:
    enc.eval(), cls.eval()

    @torch.no_grad()
    def predict(X: np.ndarray) -> np.ndarray:
        return cls(enc(torch.from_numpy(np.array(X, dtype=np.float32)))).argmax(1).numpy()

    return predict


def _schedules(step: int, steps: int) -> tuple[float, float]:
    p = step / max(1, steps - 1)
    return LR / (1 + 10 * p) ** 0.75, LAMBDA_MAX * (2 / (1 + math.exp(-GAMMA * p)) - 1)


class _Batches:
    """Minimal epoch-permutation sampler, drawing the same indices as
    dabench's ``TensorBatches`` for the same seed (so the floor computes the
    same numbers as the plugin and their accuracies are equal)."""

    def __init__(self, n: int, bs: int, seed: int) -> None:
        self.n, self.bs, self.pos = n, bs, n
        self.gen = torch.Generator().manual_seed(seed % 2**63)
        self.perm = torch.empty(0, dtype=torch.long)

    def next(self) -> torch.Tensor:
        if self.pos + self.bs > self.n:
            self.perm, self.pos = torch.randperm(self.n, generator=self.gen), 0
        self.pos += self.bs
        return self.perm[self.pos - self.bs : self.pos]


def _samplers(task: Any, ns: int, nt: int, bs: int) -> tuple[_Batches, _Batches]:
    from dabench.training import stream_seed  # the seed derivation only

    return _Batches(ns, bs, stream_seed(task.seed, 1)), _Batches(nt, bs, stream_seed(task.seed, 2))


def _tensors(task: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (torch.from_numpy(np.array(task.source_train.X)), torch.from_numpy(np.array(task.source_train.y)),
            torch.from_numpy(np.array(task.target_train.X)))


# ------------------------------------------------------------------ dabench


def fit_dabench(task: Any) -> tuple[Callable, int]:
    from dabench_plugins.dann import DANN

    pred = DANN(lr=LR, weight_decay=WD, lambda_max=LAMBDA_MAX, gamma=GAMMA, disc_hidden=DISC_HIDDEN).fit(task)
    return (lambda X: pred.predict_proba(X).argmax(1)), task.budget.steps


# ------------------------------------------------------------------ the floor


class _GRL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, lam):  # type: ignore[override]
        ctx.lam = lam
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        return -ctx.lam * g, None


def fit_floor(task: Any) -> tuple[Callable, int]:
    enc, cls, disc = _nets(task)
    params = [p for m in (enc, cls, disc) for p in m.parameters()]
    opt = torch.optim.SGD(params, lr=LR, momentum=0.9, weight_decay=WD)
    Xs, ys, Xt = _tensors(task)
    bs, steps = task.budget.batch_size, task.budget.steps
    si, ti = _samplers(task, len(Xs), len(Xt), bs)
    zeros, ones = torch.zeros(bs), torch.ones(bs)
    for step in range(steps):
        lr, lam = _schedules(step, steps)
        for g in opt.param_groups:
            g["lr"] = lr
        i, j = si.next(), ti.next()
        f = enc(torch.cat([Xs[i], Xt[j]]))
        d = disc(_GRL.apply(f, lam)).squeeze(1)
        loss = (F.cross_entropy(cls(f[:bs]), ys[i]) + F.binary_cross_entropy_with_logits(d[:bs], zeros)
                + F.binary_cross_entropy_with_logits(d[bs:], ones))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return _predictor(enc, cls), steps


# ------------------------------------------------------------------ pytorch-adapt


class _Squeeze(nn.Module):
    def __init__(self, m: nn.Module) -> None:
        super().__init__()
        self.m = m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.m(x).squeeze(1)


def _find(obj: Any, cls: type, seen: set | None = None) -> list:
    """Every instance of ``cls`` reachable from ``obj``'s attributes (hooks nest)."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return []
    seen.add(id(obj))
    if isinstance(obj, cls):
        return [obj]
    out = []
    items = obj if isinstance(obj, (list, tuple)) else getattr(obj, "__dict__", {}).values()
    for v in items:
        if isinstance(v, (list, tuple)) or hasattr(v, "__dict__"):
            out += _find(v, cls, seen)
    return out


def fit_pytorch_adapt(task: Any) -> tuple[Callable, int]:
    from pytorch_adapt.hooks import DANNHook
    from pytorch_adapt.layers import GradientReversal
    from pytorch_adapt.weighters import SumWeighter

    enc, cls, disc = _nets(task)
    params = [p for m in (enc, cls, disc) for p in m.parameters()]
    opt = torch.optim.SGD(params, lr=LR, momentum=0.9, weight_decay=WD)
    hook = DANNHook(opts=[opt], weighter=SumWeighter())
    grls = _find(hook, GradientReversal)
    assert grls, "pytorch-adapt's DANNHook has no GradientReversal layer to schedule"
    models = {"G": enc, "C": cls, "D": _Squeeze(disc)}
    Xs, ys, Xt = _tensors(task)
    bs, steps = task.budget.batch_size, task.budget.steps
    si, ti = _samplers(task, len(Xs), len(Xt), bs)
    zeros, ones = torch.zeros(bs), torch.ones(bs)
    for m in models.values():
        m.train()
    for step in range(steps):
        lr, lam = _schedules(step, steps)
        for g in opt.param_groups:
            g["lr"] = lr
        for grl in grls:
            grl.update_weight(lam)
        i, j = si.next(), ti.next()
        hook({**models, "src_imgs": Xs[i], "src_labels": ys[i], "target_imgs": Xt[j],
              "src_domain": zeros, "target_domain": ones})
    return _predictor(enc, cls), steps


# ------------------------------------------------------------------ skada


class _SkadaDisc(nn.Module):
    """Our domain classifier behind a GRL, with the sigmoid skada's BCELoss expects."""

    def __init__(self, disc: nn.Module) -> None:
        super().__init__()
        self.disc = disc

    def forward(self, x: torch.Tensor, sample_weight: Any = None) -> torch.Tensor:
        return torch.sigmoid(self.disc(_GRL.apply(x, 1.0))).squeeze(1)


def fit_skada(task: Any) -> tuple[Callable, int]:
    from skada.deep import DANN as SkadaDANN
    from skorch.callbacks import Callback

    class _Count(Callback):
        n = 0

        def on_batch_end(self, net: Any, batch: Any = None, training: bool = False, **kw: Any) -> None:
            if training:
                _Count.n += 1

    enc, cls, disc = _nets(task)
    module = nn.Sequential(OrderedDict(encoder=enc, head=cls))
    Xs, ys, Xt = (t.numpy() for t in _tensors(task))
    bs, steps = task.budget.batch_size, task.budget.steps
    per_epoch = math.ceil(max(len(Xs), len(Xt)) / bs)
    _Count.n = 0
    net = SkadaDANN(module, layer_name="encoder", reg=1.0, domain_classifier=_SkadaDisc(disc),
                    batch_size=bs, max_epochs=math.ceil(steps / per_epoch), optimizer=torch.optim.SGD,
                    optimizer__momentum=0.9, optimizer__weight_decay=WD, lr=LR, train_split=None,
                    device="cpu", verbose=0, callbacks=[_Count()])
    X = np.concatenate([Xs, Xt]).astype(np.float32)
    y = np.concatenate([ys, -np.ones(len(Xt), dtype=ys.dtype)])
    sample_domain = np.concatenate([np.ones(len(Xs), dtype=np.int64), -2 * np.ones(len(Xt), dtype=np.int64)])
    net.fit(X, y, sample_domain=sample_domain)
    return _predictor(enc, cls), _Count.n


IMPLS: dict[str, Callable[[Any], tuple[Callable, int]]] = {
    "dabench": fit_dabench,
    "floor": fit_floor,
    "pytorch-adapt": fit_pytorch_adapt,
    "skada": fit_skada,
}


def missing(impl: str) -> str | None:
    """Why ``impl`` cannot run here (an optional package is absent), or None."""
    import importlib.util

    need = {"pytorch-adapt": ["pytorch_adapt"], "skada": ["skada", "skorch"]}.get(impl, [])
    absent = [m for m in need if importlib.util.find_spec(m) is None]
    if absent:
        return f"{impl} is not installed ({', '.join(absent)} missing); see the README, section Benchmarks"
    return None
