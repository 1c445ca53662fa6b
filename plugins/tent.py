"""TENT: fully test-time adaptation by entropy minimisation.

Wang, Shelhamer, Liu, Olshausen, Darrell. "Tent: Fully Test-Time Adaptation
by Entropy Minimization", ICLR 2021; reference code DequanWang/tent
(``tent.py``: ``configure_model``, ``collect_params``,
``forward_and_adapt``; ``cfgs``: the optimiser settings).

Track ``test-time``: the method gets the host's shared source model; the
host streams the target test inputs to it in seeded batches and scores the
predictions it returns for each batch.

What is followed:

- **Normalisation statistics from the test batch** (Sec. 3): every batch
  normalisation layer normalises with the current batch's mean and variance
  (train-mode BN with ``track_running_stats = False`` and the running
  averages removed, as ``configure_model``).
- **Only the affine parameters adapt** (Sec. 3, "modulation parameters"):
  the scale and shift of every normalisation layer are optimised; every
  other parameter is frozen (``collect_params``).
- **Entropy minimisation, online** (Eq. 1, ``forward_and_adapt``): for each
  batch, one forward pass gives the outputs; the loss is their mean
  softmax entropy; one optimiser step updates the affine parameters; the
  outputs of that forward pass (made with the parameters before the
  update) are the batch's predictions.  The adapted parameters carry over
  to the next batch (online, not episodic: no reset).
- Optimiser: Adam, lr 1e-3, betas (0.9, 0.999), no weight decay (the
  reference's CIFAR-10-C setting, ``cfgs/tent.yaml``); ``optimizer = "sgd"``
  gives its ImageNet-C setting (SGD, momentum 0.9, Nesterov; lr 0.00025 there).
  ``steps`` (default 1) optimisation steps per batch, the reference's
  ``OPTIM.STEPS``.

Changed, and why:

- All batch-normalisation layers adapt (``BatchNorm1d`` too: the reference
  handles the ``BatchNorm2d`` of its convnets; dabench's backbones also
  normalise linear layers).
- The rest of the network is in eval mode (dropout off; the reference puts
  the whole model in train mode, and its CIFAR and ImageNet models have no
  active dropout).
- A batch with a single value per channel (a one-sample batch through a
  ``BatchNorm1d``) has no variance to normalise with: it is predicted with
  the source statistics and the current affine parameters, without an
  update.

The stream's batch size is the pair's ``budget.batch_size`` (the reference
uses 200 on CIFAR-10-C and 64 on ImageNet-C).  After the stream,
``predict_proba``/``embed`` (used by the host for source accuracy) run the
adapted model without further updates, with batch statistics over chunks
of the stream's batch size.

Needs a backbone with batch normalisation (``default-bn``, ``mlp-bn``,
``dann-mnist-bn``, ``small-cnn-bn``, ``dtn``); without one it skips.

Health signals: ``entropy_q1``..``entropy_q4`` (mean prediction entropy
over each quarter of the stream, before each update), ``entropy_drop``
(mean over batches of the batch's entropy before minus after its update,
by a second forward pass: > 0 when the step lowered the entropy it
minimises), ``adapted_param_fraction`` (the fraction of the model's
parameters that TENT updates), ``n_norm_layers`` and ``engaged`` (1.0 when
parameters were updated and lowered the entropy on average).
"""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
import torch
from torch import nn

from dabench import Choice, Float, Int, Method, Task, diagnostics, hookimpl
from dabench.tracks import input_batches, norm_layers, skip_without_norm_layers
from dabench.training import DivergedError, resolve_device, seed_everything


def softmax_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per-row entropy of ``softmax(logits)`` (the reference's ``softmax_entropy``)."""
    return -(logits.softmax(1) * logits.log_softmax(1)).sum(1)


def configure_model(encoder: nn.Module, classifier: nn.Module) -> tuple[list[nn.Parameter], list[nn.Module]]:
    """TENT's model configuration: everything frozen and in eval mode except
    the normalisation layers, which use batch statistics (running averages
    removed) and whose affine parameters are returned for optimisation."""
    model = nn.ModuleList([encoder, classifier])
    model.eval()
    model.requires_grad_(False)
    params: list[nn.Parameter] = []
    layers = norm_layers(model)
    for m in layers:
        m.train()
        m.track_running_stats = False
        m.running_mean = None
        m.running_var = None
        for p in (m.weight, m.bias):
            if p is not None:
                p.requires_grad_(True)
                params.append(p)
    return params, layers


class TentAdapter:
    """The online adapter TENT returns (an :class:`dabench.contract.OnlineAdapter`)."""

    def __init__(self, encoder: nn.Module, classifier: nn.Module, optimizer: torch.optim.Optimizer,
                 layers: list[nn.Module], source_stats: list[tuple[torch.Tensor, torch.Tensor]],
                 steps: int, device: torch.device, chunk: int, n_params: int) -> None:
        self.encoder, self.classifier = encoder, classifier
        self.optimizer = optimizer
        self.layers = layers
        self.source_stats = source_stats
        self.steps = steps
        self.device = device
        self.chunk = max(2, int(chunk))
        self.entropies: list[float] = []
        self.drops: list[float] = []
        self.n_params = n_params
        self.n_adapted = sum(p.numel() for g in optimizer.param_groups for p in g["params"])

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.encoder(x))

    def _degenerate(self, x: torch.Tensor) -> bool:
        return len(x) < 2 and any(isinstance(m, nn.BatchNorm1d) for m in self.layers)

    @contextlib.contextmanager
    def _source_stats(self):
        """Normalise with the source statistics (for a batch without variance)."""
        for m, (mean, var) in zip(self.layers, self.source_stats):
            m.running_mean, m.running_var = mean, var
            m.eval()
        try:
            yield
        finally:
            for m in self.layers:
                m.running_mean = m.running_var = None
                m.train()

    def _tensor(self, X: np.ndarray) -> torch.Tensor:
        X = np.asarray(X, dtype=np.float32).reshape(len(X), -1)
        return torch.from_numpy(np.array(X, copy=True)).to(self.device)

    def predict_batch(self, X: np.ndarray) -> np.ndarray:
        """Adapt on the batch and return its predictions (those of the forward
        pass before the last update, as ``forward_and_adapt``)."""
        x = self._tensor(X)
        if self._degenerate(x):
            with torch.no_grad(), self._source_stats():
                return torch.softmax(self._forward(x), 1).double().cpu().numpy()
        outputs = None
        for _ in range(self.steps):
            with torch.enable_grad():
                outputs = self._forward(x)
                ent = softmax_entropy(outputs)
                loss = ent.mean(0)
                loss.backward()
            if not torch.isfinite(loss):
                raise DivergedError(f"TENT's entropy became {float(loss)} on a test batch: adaptation diverged "
                                    "(try a lower lr)")
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        before = float(ent.detach().mean())
        self.entropies.append(before)
        with torch.no_grad():
            self.drops.append(before - float(softmax_entropy(self._forward(x)).mean()))
        self.record_diagnostics()  # after every batch: the run's collector keeps the last values
        return torch.softmax(outputs.detach(), 1).double().cpu().numpy()

    @torch.no_grad()
    def _map(self, X: Any, head: bool) -> np.ndarray:
        out = []
        for xb, _ in input_batches(X, self.chunk, device=self.device):
            if self._degenerate(xb):
                with self._source_stats():
                    z = self.encoder(xb)
            else:
                z = self.encoder(xb)
            out.append(torch.softmax(self.classifier(z), 1).double() if head else z.float())
        a = torch.cat(out).cpu().numpy()
        if not np.isfinite(a).all():
            raise DivergedError("TENT's adapted model outputs non-finite values")
        return a

    def predict_proba(self, X: Any, domain: str = "target") -> np.ndarray:
        """The adapted model after the stream (no further updates); ``X`` an
        array or a streamed domain, in chunks of the stream's batch size."""
        p = self._map(X, head=True)
        return p / p.sum(1, keepdims=True)

    def embed(self, X: Any, domain: str = "target") -> np.ndarray:
        return self._map(X, head=False)

    def record_diagnostics(self) -> None:
        diagnostics.quarters(self.entropies, "entropy")
        drop = float(np.mean(self.drops)) if self.drops else float("nan")
        diagnostics.record("entropy_drop", drop)
        diagnostics.record("adapted_param_fraction", self.n_adapted / max(1, self.n_params))
        diagnostics.record("n_norm_layers", float(len(self.layers)))
        diagnostics.record("engaged", float(self.n_adapted > 0 and bool(self.drops) and drop > 0))


class Tent(Method):
    """Test-time entropy minimisation on the normalisation layers' affine parameters (Wang et al. 2021)."""

    name = "tent"
    family = "normalisation"
    version = "1"
    track = "test-time"
    requires = frozenset({"same_feature_space", "source_model"})
    requires_contract = "1.3"
    paper = ("Wang, Shelhamer, Liu, Olshausen, Darrell, Tent: Fully Test-Time Adaptation by Entropy "
             "Minimization, ICLR 2021")
    hyperparameters = {
        "lr": Float(1e-3, 1e-5, 1e-1, log=True, help="learning rate of the affine parameters (reference: 1e-3 Adam)"),
        "optimizer": Choice("adam", ("adam", "sgd"), help="adam (CIFAR-10-C setting) or sgd (momentum 0.9, Nesterov)"),
        "steps": Int(1, 1, 10, help="optimisation steps per test batch (reference: 1)"),
    }

    @classmethod
    def skip(cls, task: Task) -> str | None:
        return super().skip(task) or skip_without_norm_layers(task, cls.name)

    def fit(self, task: Task) -> TentAdapter:
        seed_everything(task.seed)
        device = resolve_device(task.device)
        encoder, classifier = task.source_model.build(str(device))
        source_stats = [(m.running_mean.clone(), m.running_var.clone()) for m in norm_layers(encoder)]
        n_params = sum(p.numel() for m in (encoder, classifier) for p in m.parameters())
        params, layers = configure_model(encoder, classifier)
        if not params:
            raise RuntimeError("the source model has no normalisation layer with affine parameters: nothing for "
                               "TENT to adapt (use a -bn backbone)")
        if self.optimizer == "adam":
            opt: torch.optim.Optimizer = torch.optim.Adam(params, lr=self.lr, betas=(0.9, 0.999), weight_decay=0.0)
        else:
            opt = torch.optim.SGD(params, lr=self.lr, momentum=0.9, nesterov=True, weight_decay=0.0)
        return TentAdapter(encoder, classifier, opt, layers, source_stats, self.steps, device,
                           task.budget.batch_size, n_params)


@hookimpl
def dabench_methods(register) -> None:  # type: ignore[no-untyped-def]
    register(Tent)
