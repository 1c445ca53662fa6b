"""Batch-normalisation adaptation: re-estimated normalisation statistics on target.

Two methods, one per track, both starting from the host's shared source
model and changing nothing but the statistics its batch-normalisation
layers normalise with (no gradient step, no label):

``adabn`` (track ``source-free``)
    Li, Wang, Shi, Liu, Hou. "Revisiting Batch Normalization For Practical
    Domain Adaptation", ICLR workshop 2017 (arXiv 1603.04779, 2016),
    Algorithm 1: for every normalisation layer, the mean and variance of
    its inputs over the **whole unlabelled target train set** replace the
    source statistics; target inputs are then normalised with the target
    statistics and source inputs with the source statistics (one set of
    statistics per domain).  The layers are estimated in forward order,
    each with the layers below it already adapted, as the algorithm's
    per-neuron statistics of the adapted network; the variance is the
    population variance over samples (and positions, for convolutions).

``bn-adapt`` (track ``test-time``)
    Schneider, Rusak, Eck, Bringmann, Brendel, Bethge. "Improving
    robustness against common corruptions by covariate shift adaptation",
    NeurIPS 2020, Sec. 2: each batch of the test stream is normalised with
    ``mu = N/(N+n) mu_s + n/(N+n) mu_t`` and ``var = N/(N+n) var_s + n/(N+n)
    var_t``: the batch's own statistics (``mu_t``, ``var_t``, the biased
    variance of train-mode BN) combined with the source statistics by a
    prior strength ``N`` (pseudo-samples) for a batch of ``n`` samples.
    ``N = 0`` (default) is full adaptation, the "BN" baseline of TENT's
    paper; large ``N`` approaches the source model.  Stateless: nothing
    carries over from one batch to the next.  A layer that sees a single
    value per channel (one sample through a ``BatchNorm1d``) has no
    variance to estimate and keeps the source statistics for that batch.

Both need a backbone with batch normalisation (``default-bn``, ``mlp-bn``,
``dann-mnist-bn``, ``small-cnn-bn``, ``dtn``); without one they skip with
the reason.

Health signals: ``n_norm_layers``, ``stat_shift`` (mean over channels of
``|mu_t - mu_s| / sqrt(var_s + eps)``: how far the target statistics lie
from the source ones, in source standard deviations; for ``bn-adapt`` the
mean over the stream's batches), ``var_ratio`` (mean ``var_t / var_s``)
and ``engaged`` (1.0 when there was a layer to adapt).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from dabench import Float, Method, Task, diagnostics, hookimpl
from dabench.tracks import input_batches, norm_layers, skip_without_norm_layers
from dabench.training import DivergedError, TorchPredictor, resolve_device, seed_everything

#: Rows per forward pass when AdaBN estimates statistics.
ESTIMATE_BATCH = 512


class _StopForward(Exception):
    pass


def _reduce_dims(x: torch.Tensor) -> list[int]:
    """Dimensions a BN layer reduces over: all but the channel dimension 1."""
    return [d for d in range(x.dim()) if d != 1]


@torch.no_grad()
def adabn_statistics(encoder: nn.Module, X: Any, device: Any = "cpu", batch_size: int = ESTIMATE_BATCH
                     ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Set every BN layer of ``encoder`` (eval mode) to the mean and
    population variance of its inputs over all of ``X`` (an array or a
    streamed domain, test transform), layer by layer in forward order (Li et
    al., Algorithm 1); return the source statistics it replaced.  The
    forward pass of layer ``k`` stops at layer ``k``."""
    layers = norm_layers(encoder)
    encoder.eval()
    source = [(m.running_mean.clone(), m.running_var.clone()) for m in layers]
    for m in layers:
        acc: dict[str, torch.Tensor | float] = {"s": 0.0, "ss": 0.0, "n": 0.0}

        def hook(mod: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            x = inputs[0].double()
            dims = _reduce_dims(x)
            acc["s"] = acc["s"] + x.sum(dim=dims)
            acc["ss"] = acc["ss"] + (x * x).sum(dim=dims)
            acc["n"] = acc["n"] + x.numel() / x.shape[1]
            raise _StopForward

        handle = m.register_forward_pre_hook(hook)
        try:
            for x, _ in input_batches(X, batch_size, device=device):
                try:
                    encoder(x)
                except _StopForward:
                    pass
        finally:
            handle.remove()
        mean = acc["s"] / acc["n"]
        var = (acc["ss"] / acc["n"] - mean * mean).clamp_min(0.0)
        m.running_mean.copy_(mean.to(m.running_mean.dtype))
        m.running_var.copy_(var.to(m.running_var.dtype))
    return source


def _shift(layers: list[nn.Module], source: list[tuple[torch.Tensor, torch.Tensor]],
           target: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[float, float]:
    shifts, ratios = [], []
    for m, (ms, vs), (mt, vt) in zip(layers, source, target):
        sd = torch.sqrt(vs + m.eps)
        shifts.append(((mt - ms).abs() / sd).mean().item())
        ratios.append((vt / (vs + m.eps)).mean().item())
    return (float(np.mean(shifts)) if shifts else float("nan"), float(np.mean(ratios)) if ratios else float("nan"))


class AdaBN(Method):
    """Target statistics for every batch-normalisation layer, estimated on the
    whole unlabelled target train set (Li et al. 2016)."""

    name = "adabn"
    family = "normalisation"
    version = "1"
    track = "source-free"
    requires = frozenset({"same_feature_space", "source_model"})
    requires_contract = "1.3"
    paper = ("Li, Wang, Shi, Liu, Hou, Revisiting Batch Normalization For Practical Domain Adaptation, "
             "arXiv 1603.04779, 2016 (AdaBN)")
    hyperparameters: dict = {}

    @classmethod
    def skip(cls, task: Task) -> str | None:
        return super().skip(task) or skip_without_norm_layers(task, cls.name)

    def fit(self, task: Task) -> TorchPredictor:
        seed_everything(task.seed)
        device = resolve_device(task.device)
        source_encoder, classifier = task.source_model.build(str(device))
        target_encoder, _ = task.source_model.build(str(device))
        source = adabn_statistics(target_encoder, task.target_train.X, device)
        layers = norm_layers(target_encoder)
        shift, ratio = _shift(layers, source, [(m.running_mean, m.running_var) for m in layers])
        for name, value in (("n_norm_layers", float(len(layers))), ("stat_shift", shift), ("var_ratio", ratio),
                            ("engaged", float(bool(layers)))):
            diagnostics.record(name, value)
        return TorchPredictor({"source": source_encoder, "target": target_encoder}, classifier, device)


class _MixedStats:
    """Forward pre-hooks that make every BN layer (in eval mode) normalise with
    the batch's statistics mixed with the source ones by prior strength N."""

    def __init__(self, layers: list[nn.Module], prior: float) -> None:
        self.layers = layers
        self.prior = float(prior)
        self.source = [(m.running_mean.clone(), m.running_var.clone()) for m in layers]
        #: (layer index, batch mean, batch variance) of the layers adapted in the last forward pass
        self.batch_stats: list[tuple[int, torch.Tensor, torch.Tensor]] = []

    def _hook(self, k: int):
        def hook(mod: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            x = inputs[0]
            ms, vs = self.source[k]
            values = x.numel() // x.shape[1]
            if values < 2:  # no variance to estimate from one value per channel
                mod.running_mean.copy_(ms)
                mod.running_var.copy_(vs)
                return
            dims = _reduce_dims(x)
            mt = x.mean(dim=dims)
            vt = x.var(dim=dims, unbiased=False)
            self.batch_stats.append((k, mt, vt))
            n = float(x.shape[0])
            w = self.prior / (self.prior + n)
            mod.running_mean.copy_(w * ms + (1 - w) * mt)
            mod.running_var.copy_(w * vs + (1 - w) * vt)
        return hook

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        handles = [m.register_forward_pre_hook(self._hook(k)) for k, m in enumerate(self.layers)]
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            for m, (ms, vs) in zip(self.layers, self.source):
                m.running_mean.copy_(ms)
                m.running_var.copy_(vs)


class BNAdaptAdapter:
    """The online adapter of ``bn-adapt`` (an :class:`dabench.contract.OnlineAdapter`)."""

    def __init__(self, encoder: nn.Module, classifier: nn.Module, prior: float, device: torch.device,
                 chunk: int) -> None:
        self.encoder, self.classifier = encoder.eval(), classifier.eval()
        self.layers = norm_layers(encoder)
        self.mixed = _MixedStats(self.layers, prior)
        self.device = device
        self.chunk = max(1, int(chunk))
        self.shifts: list[tuple[float, float]] = []

    @torch.no_grad()
    def _run(self, X: Any, head: bool) -> np.ndarray:
        """One batch (an array, or a tensor already on the device) through the mixed-statistics model."""
        if isinstance(X, torch.Tensor):
            x = X.to(self.device)
        else:
            X = np.asarray(X, dtype=np.float32).reshape(len(X), -1)
            x = torch.from_numpy(np.array(X, copy=True)).to(self.device)
        with self.mixed.active():
            z = self.encoder(x)
            out = torch.softmax(self.classifier(z), 1).double() if head else z.float()
        a = out.cpu().numpy()
        if not np.isfinite(a).all():
            raise DivergedError("bn-adapt outputs non-finite values (a layer's variance collapsed?)")
        return a

    def predict_batch(self, X: np.ndarray) -> np.ndarray:
        """Normalise the batch with its own statistics (mixed with the source
        ones by the prior strength) and predict it."""
        self.mixed.batch_stats.clear()
        p = self._run(X, head=True)
        if self.mixed.batch_stats:
            used = [k for k, _, _ in self.mixed.batch_stats]
            self.shifts.append(_shift([self.layers[k] for k in used], [self.mixed.source[k] for k in used],
                                      [(mt, vt) for _, mt, vt in self.mixed.batch_stats]))
        if self.shifts:
            diagnostics.record("stat_shift", float(np.mean([s for s, _ in self.shifts])))
            diagnostics.record("var_ratio", float(np.mean([r for _, r in self.shifts])))
        diagnostics.record("n_norm_layers", float(len(self.layers)))
        diagnostics.record("engaged", float(bool(self.layers)))
        return p

    def predict_proba(self, X: Any, domain: str = "target") -> np.ndarray:
        """The same normalisation over chunks of the stream's batch size (stateless: the model after the
        stream is the model before it); ``X`` an array or a streamed domain."""
        return np.concatenate([self._run(x, True) for x, _ in input_batches(X, self.chunk, device=self.device)])

    def embed(self, X: Any, domain: str = "target") -> np.ndarray:
        return np.concatenate([self._run(x, False) for x, _ in input_batches(X, self.chunk, device=self.device)])


class BNAdapt(Method):
    """Test-time normalisation with each test batch's statistics, combined with
    the source statistics by a prior strength N (Schneider et al. 2020)."""

    name = "bn-adapt"
    family = "normalisation"
    version = "1"
    track = "test-time"
    requires = frozenset({"same_feature_space", "source_model"})
    requires_contract = "1.3"
    paper = ("Schneider, Rusak, Eck, Bringmann, Brendel, Bethge, Improving robustness against common corruptions "
             "by covariate shift adaptation, NeurIPS 2020")
    hyperparameters = {
        "prior_strength": Float(0.0, 0.0, 512.0,
                                help="N: pseudo-samples of the source statistics (0 = the test batch's statistics "
                                     "only; large = the source model)"),
    }

    @classmethod
    def skip(cls, task: Task) -> str | None:
        return super().skip(task) or skip_without_norm_layers(task, cls.name)

    def fit(self, task: Task) -> BNAdaptAdapter:
        seed_everything(task.seed)
        device = resolve_device(task.device)
        encoder, classifier = task.source_model.build(str(device))
        if not norm_layers(encoder):
            raise RuntimeError("the source model has no batch-normalisation layer: nothing to adapt (use a -bn backbone)")
        return BNAdaptAdapter(encoder, classifier, self.prior_strength, device, task.budget.batch_size)


@hookimpl
def dabench_methods(register) -> None:  # type: ignore[no-untyped-def]
    register(AdaBN)
    register(BNAdapt)
