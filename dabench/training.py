"""Shared training helpers for deep method plugins.

Plugin authors may use any of these (they are public API)::

    from dabench.training import (seed_everything, resolve_device, TensorBatches,
                                  TorchPredictor, check_finite, annealed_lr, set_lr)

- :func:`seed_everything` seeds Python, NumPy and torch (CPU results are then
  bit-for-bit reproducible for a seed and a thread count).
- :func:`resolve_device` turns ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:i"``
  into a :class:`torch.device`, with an error that says what to do.
- :class:`TensorBatches` keeps a dataset on the device once and yields
  shuffled minibatches from a seeded generator (no DataLoader, no per-batch
  host-to-device copy).
- :func:`check_finite` raises :class:`DivergedError` when the loss is NaN or
  infinite; the host stores such a run as ``failed`` with the message.
- :class:`TorchPredictor` wraps trained encoder(s) and a classifier into the
  :class:`dabench.Predictor` protocol (eval mode, no grad, batched, NumPy out).
- :func:`fit_supervised` trains an encoder and a classifier with
  cross-entropy under the DANN paper's optimiser and schedule (the loop of
  the ``source-only`` and ``target-oracle`` baselines).
- Schedules: :func:`annealed_lr` (``mu0 / (1 + alpha p) ** beta``),
  :func:`grl_lambda` (``2 / (1 + exp(-gamma p)) - 1``) and
  :func:`progress`; :func:`grad_reverse` is the gradient reversal layer of
  Ganin et al. (2016).
"""

from __future__ import annotations

import math
import random
import re
from typing import Any, Iterator, Mapping, NamedTuple

import numpy as np
import torch
from torch import nn

from .contract import BACKBONE_LR_MULT as _BACKBONE_LR_MULT

__all__ = [
    "BACKBONE_LR_MULT",
    "Batch",
    "CHECK_EVERY",
    "DivergedError",
    "GradReverse",
    "TensorBatches",
    "TorchPredictor",
    "amp_context",
    "annealed_lr",
    "backbone_param_groups",
    "check_finite",
    "fit_supervised",
    "grad_reverse",
    "grl_lambda",
    "make_sgd",
    "progress",
    "resolve_device",
    "seed_everything",
    "set_lr",
    "stream_seed",
]


# --------------------------------------------------------------------------
# Seeds and devices
# --------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy's global generator and torch (CPU and CUDA).

    On CPU every op dabench uses is deterministic, so a seeded run gives the
    same result twice (for the same ``torch.get_num_threads()``).  On CUDA
    this also makes cuDNN pick deterministic kernels (``benchmark = False``);
    a few CUDA kernels (atomics in scatter/index backward) may still differ
    in the last bits between runs.
    """
    seed = int(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device
    if torch.backends.cudnn.is_available():
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


def stream_seed(seed: int, stream: int) -> int:
    """A seed for an independent random stream ``stream`` of run seed ``seed``
    (e.g. one stream for source batches, one for target batches)."""
    ss = np.random.SeedSequence([int(seed) % 2**63, int(stream)])
    return int(ss.generate_state(1, dtype=np.uint64)[0] % 2**63)


_DEVICE_RE = re.compile(r"^(cpu|cuda(:\d+)?|auto)$")


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """Map a device string to a :class:`torch.device`.

    ``"auto"`` (or ``None``) is ``cuda`` when a GPU is visible, else ``cpu``.
    ``"cpu"``, ``"cuda"`` and ``"cuda:i"`` are checked against what this
    machine has; anything else raises :class:`ValueError` saying what is valid.
    """
    if isinstance(name, torch.device):
        name = str(name)
    name = "auto" if name is None else str(name).strip().lower()
    if not _DEVICE_RE.match(name):
        raise ValueError(f"unknown device {name!r}: use 'auto', 'cpu', 'cuda' or 'cuda:<index>'")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(
            f"device {name!r} requested but no CUDA GPU is visible to torch "
            f"(torch {torch.__version__}, CUDA build: {torch.version.cuda is not None}); "
            "use --device cpu, or install a CUDA build of torch"
        )
    if ":" in name:
        index = int(name.split(":", 1)[1])
        count = torch.cuda.device_count()
        if index >= count:
            raise ValueError(f"device {name!r} requested but only {count} CUDA device(s) exist (cuda:0..cuda:{count - 1})")
    return torch.device(name)


# --------------------------------------------------------------------------
# Minibatches from tensors kept on the device
# --------------------------------------------------------------------------


class Batch(NamedTuple):
    """One minibatch: inputs, labels (or None), weights (or None) and the
    row indices into the full dataset (for per-sample state such as pseudo-labels)."""

    x: torch.Tensor
    y: torch.Tensor | None
    w: torch.Tensor | None
    index: torch.Tensor


def _to_tensor(a: Any, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if isinstance(a, torch.Tensor):
        return a.detach().to(device=device, dtype=dtype)
    # np.array(..., copy) avoids torch's warning on the read-only arrays of a Task
    return torch.from_numpy(np.array(a, copy=True)).to(device=device, dtype=dtype)


class TensorBatches:
    """Shuffled minibatches of a dataset held on ``device`` as tensors, or
    decoded batch by batch from a streamed image domain.

    The data is copied to the device once.  Each epoch is a fresh permutation
    drawn from a CPU :class:`torch.Generator` seeded with ``seed``, so the
    order is the same for a seed on every device.  No sample repeats within
    an epoch.

    - ``next()`` returns the next :class:`Batch`, starting a new epoch when
      the current one is used up; with ``drop_last=True`` (default) every
      batch has exactly ``batch_size`` rows (the tail of a permutation that
      does not fill a batch is skipped, and a different tail is skipped next
      epoch).
    - iterating (``for b in batches``) is ``next()`` forever;
    - ``epoch()`` yields one pass over all rows (the last batch may be short).

    ``batch_size`` larger than the dataset is clamped to its size.

    **Streamed domains.**  When ``X`` is a streamed image domain
    (:class:`dabench.data.stream.ImageStream`, e.g. an image folder or the
    Office/VisDA images end to end), the same calls yield the same
    :class:`Batch` objects, in the same order for a seed: ``b.x`` holds the
    batch's images decoded by loader worker processes (pinned memory and
    prefetch on CUDA), float32 in [0, 1] and flattened like a Task's arrays;
    ``y``, ``w`` and ``index`` are as for arrays (the order differs only when
    ``epoch()`` is interleaved with ``next()``: a stream draws ``next()``'s
    permutations ahead, as its loader prefetches).  With ``augment=True``
    (default) the images get the training transform the suite's protocol
    names (``augment``: random resized crop + flip, ...), seeded per sample;
    ``augment=False`` gives the deterministic test transform (e.g. for a
    pass that pseudo-labels the data).  ``batches.X`` is then the stream,
    not a tensor.  Arrays are never augmented.
    """

    def __init__(
        self,
        X: Any,
        y: Any | None = None,
        weights: Any | None = None,
        *,
        batch_size: int,
        device: str | torch.device = "cpu",
        seed: int = 0,
        drop_last: bool = True,
        augment: bool = True,
    ) -> None:
        from .data.stream import is_stream

        device = torch.device(device)
        self.streamed = is_stream(X)
        self.X = X if self.streamed else _to_tensor(X, torch.float32, device)
        self.n = int(len(X) if self.streamed else self.X.shape[0])
        if self.n == 0:
            raise ValueError("TensorBatches needs at least one sample")
        self.y = None if y is None else _to_tensor(y, torch.long, device)
        self.w = None if weights is None else _to_tensor(weights, torch.float32, device)
        for label, t in (("y", self.y), ("weights", self.w)):
            if t is not None and int(t.shape[0]) != self.n:
                raise ValueError(f"X has {self.n} rows but {label} has {int(t.shape[0])}")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = min(int(batch_size), self.n)
        self.device = device
        self.drop_last = drop_last
        self._gen = torch.Generator().manual_seed(int(seed) % 2**63)
        self._perm: torch.Tensor | None = None
        self._pos = 0
        self.epochs = 0  #: permutations drawn so far
        #: the training transform of a streamed domain ("none" for arrays)
        self.augment = self.X.augment if self.streamed and augment else "none"
        self._aug_rng = np.random.default_rng(np.random.SeedSequence([int(seed) % 2**63, 0xA06]))
        self._stream_it: Iterator[tuple[torch.Tensor, torch.Tensor]] | None = None

    def __len__(self) -> int:
        """Batches per epoch."""
        if self.drop_last:
            return self.n // self.batch_size
        return -(-self.n // self.batch_size)

    def _new_perm(self) -> torch.Tensor:
        self.epochs += 1
        perm = torch.randperm(self.n, generator=self._gen)
        return perm if self.streamed else perm.to(self.device)

    def _take(self, idx: torch.Tensor) -> Batch:
        return Batch(
            self.X[idx],
            None if self.y is None else self.y[idx],
            None if self.w is None else self.w[idx],
            idx,
        )

    # ---- streamed domains: the same batches, decoded by loader workers

    def _spec(self, rows: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        seeds = None
        if self.augment != "none":
            seeds = self._aug_rng.integers(0, 2**63, size=len(rows), dtype=np.int64)
        return rows.numpy(), seeds

    def _next_specs(self) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
        # the same sequence as next() on arrays: batches of a permutation
        # while they fill, then a fresh permutation
        while True:
            perm = self._new_perm()
            for start in range(0, self.n - self.batch_size + 1, self.batch_size):
                yield self._spec(perm[start : start + self.batch_size])

    def _stream(self, specs: Any) -> Iterator[Batch]:
        from .data.stream import stream_batches

        mode = self.augment if self.augment != "none" else "test"
        for x, rows in stream_batches(self.X, specs, mode=mode, device=self.device):
            yield Batch(x, None if self.y is None else self.y[rows], None if self.w is None else self.w[rows], rows)

    def next(self) -> Batch:
        if self.streamed:
            if self._stream_it is None:
                self._stream_it = self._stream(self._next_specs())
            return next(self._stream_it)
        end = self._pos + self.batch_size
        if self._perm is None or end > self.n:
            self._perm, self._pos = self._new_perm(), 0
            end = self.batch_size
        idx = self._perm[self._pos : end]
        self._pos = end
        return self._take(idx)

    __next__ = next

    def __iter__(self) -> Iterator[Batch]:
        while True:
            yield self.next()

    def epoch(self) -> Iterator[Batch]:
        """One pass over every row in a fresh order (the last batch may be short).
        Independent of the position of ``next()``."""
        perm = self._new_perm()
        if self.streamed:
            yield from self._stream([self._spec(perm[s : s + self.batch_size])
                                     for s in range(0, self.n, self.batch_size)])
            return
        for start in range(0, self.n, self.batch_size):
            yield self._take(perm[start : start + self.batch_size])

    def close(self) -> None:
        """Stop a streamed domain's loader workers now (they also stop when
        this object is garbage-collected)."""
        it, self._stream_it = self._stream_it, None
        if it is not None:
            it.close()


# --------------------------------------------------------------------------
# Divergence
# --------------------------------------------------------------------------


class DivergedError(RuntimeError):
    """Training diverged (a NaN or infinite loss or prediction).

    Raised from ``fit``; the host records the run as ``failed`` with this
    message as the reason, and the sweep goes on.
    """


def check_finite(loss: torch.Tensor | float, step: int, every: int = 1) -> None:
    """Raise :class:`DivergedError` when ``loss`` is NaN or infinite.

    Only checks when ``step % every == 0`` (reading a CUDA scalar forces a
    device sync, so loops check every few steps; a NaN never heals, so it is
    still caught, and :class:`TorchPredictor` catches what the last steps
    missed).  On CPU ``every=1`` costs nothing measurable.
    """
    if every > 1 and step % every:
        return
    value = float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)
    if not math.isfinite(value):
        raise DivergedError(
            f"loss became {value} at step {step}: training diverged "
            "(try a lower learning rate or a smaller adaptation weight)"
        )


# --------------------------------------------------------------------------
# Schedules, optimiser and the gradient reversal layer
# --------------------------------------------------------------------------


def progress(step: int, steps: int) -> float:
    """Training progress ``p`` in [0, 1]: 0 at the first step, 1 at the last."""
    return 0.0 if steps <= 1 else min(1.0, max(0.0, step / (steps - 1)))


def annealed_lr(p: float, lr0: float, alpha: float = 10.0, beta: float = 0.75) -> float:
    """DANN's learning-rate annealing ``mu_p = mu0 / (1 + alpha p) ** beta``
    (Ganin et al. 2016, Sec. 5.2.2), ``p`` the training progress in [0, 1]."""
    return lr0 / (1.0 + alpha * p) ** beta


def grl_lambda(p: float, gamma: float = 10.0, max_value: float = 1.0) -> float:
    """DANN's adaptation-factor schedule ``lambda_p = 2 / (1 + exp(-gamma p)) - 1``
    (Ganin et al. 2016, Sec. 5.2.2), scaled by ``max_value``: 0 at p=0, rising
    to ``max_value`` as p -> 1, which damps the noisy domain signal early on."""
    return max_value * (2.0 / (1.0 + math.exp(-gamma * p)) - 1.0)


def make_sgd(params: Any, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
             nesterov: bool = False) -> torch.optim.SGD:
    """SGD with momentum; parameter groups may carry an ``lr_mult`` key that
    :func:`set_lr` honours (e.g. 0.1 for a pretrained backbone).

    Uses torch's fused SGD kernel where the parameters' device supports it
    (one kernel for every parameter instead of a Python loop over them: the
    optimiser step is about 3x cheaper on CPU), else the default
    implementation.  Same update rule; vectorised rounding may differ from
    the unfused loop in the last bit, still deterministic for a seed.
    Create it after moving the modules to their device.
    """
    params = list(params)
    kw = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)
    try:
        return torch.optim.SGD(params, fused=True, **kw)
    except (RuntimeError, TypeError, ValueError):  # device or dtype without a fused kernel, older torch
        return torch.optim.SGD(params, **kw)


#: The hyperparameter a method that fine-tunes ``task.backbone`` declares
#: (``"backbone_lr_mult": BACKBONE_LR_MULT``) and passes to
#: :func:`backbone_param_groups` (defined in :mod:`dabench.contract`).
BACKBONE_LR_MULT = _BACKBONE_LR_MULT


def backbone_param_groups(backbone: nn.Module, heads: Any, backbone_lr_mult: float) -> list[dict]:
    """Optimiser parameter groups: ``backbone``'s parameters with ``lr_mult =
    backbone_lr_mult`` when the backbone is pretrained
    (:func:`dabench.backbones.is_pretrained`: e.g. the ImageNet ResNets),
    else 1 (a backbone trained from scratch, as TLlib's ``--scratch``), and
    the parameters of ``heads`` (a module or an iterable of modules) with
    ``lr_mult = 1``.  :func:`set_lr` applies the multipliers."""
    from .backbones import is_pretrained

    if isinstance(heads, nn.Module):
        heads = [heads]
    mult = float(backbone_lr_mult) if is_pretrained(backbone) else 1.0
    groups = [{"params": list(backbone.parameters()), "lr_mult": mult, "name": "backbone"},
              {"params": [p for h in heads for p in h.parameters()], "lr_mult": 1.0, "name": "heads"}]
    return [g for g in groups if g["params"]]


def amp_context(device: str | torch.device, enabled: bool) -> Any:
    """Mixed precision for a suite with ``[protocol] amp = true``: bf16
    autocast on CUDA (no loss scaling needed), nothing on CPU, so CPU
    results never change.  On a GPU without bf16 a warning says that the
    run stays in fp32."""
    import contextlib

    if not enabled or not str(device).startswith("cuda"):
        return contextlib.nullcontext()
    if not torch.cuda.is_bf16_supported():
        import logging

        logging.getLogger("dabench").warning("amp = true: %s has no bf16 support; running in fp32", device)
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's learning rate to ``lr * group.get("lr_mult", 1)``."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)


class GradReverse(torch.autograd.Function):
    """Gradient reversal layer (Ganin et al. 2016, Sec. 4.2): the identity in
    the forward pass; multiplies the incoming gradient by ``-coeff`` backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, coeff: float) -> torch.Tensor:
        ctx.coeff = float(coeff)
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad_output.neg() * ctx.coeff, None


def grad_reverse(x: torch.Tensor, coeff: float = 1.0) -> torch.Tensor:
    """Apply the gradient reversal layer with factor ``coeff`` (lambda)."""
    return GradReverse.apply(x, coeff)


# --------------------------------------------------------------------------
# The predictor
# --------------------------------------------------------------------------

DOMAINS = ("source", "target")


class TorchPredictor:
    """A trained torch model as a :class:`dabench.Predictor`.

    :param encoder: the feature extractor, or a dict ``{"source": enc_s,
        "target": enc_t}`` for methods with one encoder per domain
        (heterogeneous DA).
    :param classifier: maps features to class logits.
    :param device: where to run inference.
    :param batch_size: rows per forward pass (default 128 on CPU, where
        small batches stay in cache and run about twice as fast as 1024,
        and 1024 on CUDA).

    Modules are put in eval mode; calls run under ``torch.no_grad()`` in
    batches and return NumPy arrays: ``predict_proba`` gives float64 rows that
    sum to 1, ``embed`` the encoder output (float32).  Non-finite outputs raise
    :class:`DivergedError`.
    """

    def __init__(
        self,
        encoder: nn.Module | Mapping[str, nn.Module],
        classifier: nn.Module,
        device: str | torch.device = "cpu",
        batch_size: int | None = None,
    ) -> None:
        self.device = torch.device(device)
        if isinstance(encoder, nn.Module):
            encoders = {d: encoder for d in DOMAINS}
        else:
            encoders = dict(encoder)
            unknown = set(encoders) - set(DOMAINS)
            if unknown or not encoders:
                raise ValueError(f"encoder dict keys must be among {DOMAINS}, got {sorted(encoders)}")
        self.encoders = {d: m.to(self.device).eval() for d, m in encoders.items()}
        self.classifier = classifier.to(self.device).eval()
        if batch_size is None:
            batch_size = 1024 if self.device.type == "cuda" else 128
        self.batch_size = int(batch_size)

    def _encoder(self, domain: str) -> nn.Module:
        if domain not in DOMAINS:
            raise ValueError(f"domain must be 'source' or 'target', got {domain!r}")
        try:
            return self.encoders[domain]
        except KeyError:
            raise ValueError(f"this predictor has no encoder for the {domain} domain") from None

    @torch.no_grad()
    def _map2(self, X: np.ndarray, domain: str, head: bool, features: bool) -> tuple[np.ndarray | None, np.ndarray | None]:
        """One pass over ``X``: (probabilities if ``head``, embeddings if ``features``)."""
        from .data.stream import is_stream, sequential_specs, stream_batches

        enc = self._encoder(domain)
        if is_stream(X):  # decoded batch by batch (test transform) by loader workers
            inputs: Iterator[torch.Tensor] = (xb for xb, _ in stream_batches(
                X, sequential_specs(len(X), self.batch_size), device=self.device))
        else:
            X = np.asarray(X, dtype=np.float32)
            if X.ndim == 1:
                X = X[None, :]
            X = X.reshape(len(X), int(np.prod(X.shape[1:])))
            inputs = (torch.from_numpy(np.array(X[start : start + self.batch_size], copy=True)).to(self.device)
                      for start in range(0, len(X), self.batch_size))
        probs, feats = [], []
        for xb in inputs:
            z = enc(xb)
            if features:
                feats.append(z.float().cpu())
            if head:
                probs.append(torch.softmax(self.classifier(z).float(), dim=1).cpu())
        out: list[np.ndarray | None] = []
        for want, parts, is_head in ((head, probs, True), (features, feats, False)):
            if not want:
                out.append(None)
                continue
            if not parts:
                out.append(np.zeros((0, self._empty_width(enc, is_head)), dtype=np.float64 if is_head else np.float32))
                continue
            a = torch.cat(parts).numpy()
            if not np.isfinite(a).all():
                raise DivergedError(
                    f"the model outputs non-finite {'probabilities' if is_head else 'embeddings'}: training diverged")
            out.append(a)
        return out[0], out[1]

    def _map(self, X: np.ndarray, domain: str, head: bool) -> np.ndarray:
        p, z = self._map2(X, domain, head=head, features=not head)
        return p if head else z

    def _empty_width(self, enc: nn.Module, head: bool) -> int:
        last = [m for m in (self.classifier if head else enc).modules() if isinstance(m, nn.Linear)]
        return last[-1].out_features if last else 0

    def predict_proba(self, X: np.ndarray, domain: str = "target") -> np.ndarray:
        """Class probabilities, shape ``(n, n_classes)``, rows summing to 1."""
        return self._normalise(self._map(X, domain, head=True))

    @staticmethod
    def _normalise(p: np.ndarray) -> np.ndarray:
        p = p.astype(np.float64)
        p /= p.sum(axis=1, keepdims=True) if len(p) else 1.0
        return p

    def embed(self, X: np.ndarray, domain: str = "target") -> np.ndarray:
        """Encoder features, shape ``(n, d)``."""
        return self._map(X, domain, head=False)

    def predict_proba_and_embed(self, X: np.ndarray, domain: str = "target") -> tuple[np.ndarray, np.ndarray]:
        """``(predict_proba(X), embed(X))`` from one forward pass of the encoder."""
        p, z = self._map2(X, domain, head=True, features=True)
        return self._normalise(p), z


# --------------------------------------------------------------------------
# The plain supervised loop of the baselines
# --------------------------------------------------------------------------

#: Sync-free loops: read the loss for the NaN check every this many steps.
CHECK_EVERY = 25


def fit_supervised(
    encoder: nn.Module,
    classifier: nn.Module,
    X: Any,
    y: Any,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    device: str | torch.device,
    seed: int,
    backbone_lr_mult: float = 1.0,
) -> None:
    """Train ``classifier(encoder(x))`` on ``(X, y)`` with cross-entropy, in place.

    ``steps`` SGD steps (momentum 0.9, ``weight_decay``) on minibatches of
    ``batch_size`` drawn by :class:`TensorBatches` with ``seed`` (``X`` may be
    a streamed image domain: its batches get the training augmentation); the
    learning rate is annealed ``lr / (1 + 10 p) ** 0.75`` (Ganin et al. 2016),
    times ``backbone_lr_mult`` for a pretrained ``encoder``
    (:func:`backbone_param_groups`).  Raises :class:`DivergedError` on a
    non-finite loss.
    """
    device = torch.device(device)
    encoder.to(device).train()
    classifier.to(device).train()
    opt = make_sgd(backbone_param_groups(encoder, classifier, backbone_lr_mult),
                   lr=lr, momentum=0.9, weight_decay=weight_decay)
    batches = TensorBatches(X, y, batch_size=batch_size, device=device, seed=seed)
    loss = torch.zeros(())
    for step in range(steps):
        set_lr(opt, annealed_lr(progress(step, steps), lr))
        b = batches.next()
        loss = nn.functional.cross_entropy(classifier(encoder(b.x)), b.y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        check_finite(loss, step, every=CHECK_EVERY)
    check_finite(loss, steps)
