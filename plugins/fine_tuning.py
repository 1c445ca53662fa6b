"""Fine-tuning baseline: the top blocks of a pretrained backbone unfrozen, layer-wise learning-rate decay.

Paper-standard version: start from an ImageNet-pretrained network, keep the
lower layers fixed and fine-tune the top ones on the source labels (Yosinski,
Clune, Bengio & Lipson, "How transferable are features in deep neural
networks?", NeurIPS 2014), with smaller learning rates for lower layers
(discriminative fine-tuning, Howard & Ruder, "Universal Language Model
Fine-tuning for Text Classification", ACL 2018: ``eta_{l-1} = eta_l / 2.6``).

What "pretrained" means here: the same denoising-autoencoder pretraining on
unlabelled inputs as the ``frozen-features`` baseline (see
``dabench_plugins.pretraining``: no labels, source+target train inputs by
default as in Glorot et al. 2011; the pretrained weights are shared through
the in-process cache), because the embedded data has no upstream corpus and
runs offline.

Procedure:

1. ``round(pretrain_frac * task.budget.steps)`` steps of autoencoder
   pretraining;
2. the backbone's *blocks* are its layers with weights (``Linear`` and
   ``Conv2d`` modules in forward order: two for the MLP backbone, three for
   the CNNs); the top ``unfrozen_blocks`` are trained, the rest stay frozen
   (``unfrozen_blocks = 0`` trains the head only);
3. a new linear head is trained with the unfrozen blocks by cross-entropy on
   source for the remaining steps: SGD with momentum 0.9 and the DANN
   learning-rate annealing; the head learns at ``lr``, the top block at
   ``lr * layer_decay``, the next at ``lr * layer_decay ** 2`` and so on
   (discriminative fine-tuning).

Simplified: no gradual unfreezing or slanted triangular schedule (ULMFiT's
other two tricks); the decay is per layer with weights, not per ResNet stage.
"""

from __future__ import annotations

from torch import nn
from torch.nn import functional as F

from dabench import Float, Int, Method, Task, hookimpl
from dabench.training import (
    CHECK_EVERY,
    TensorBatches,
    TorchPredictor,
    annealed_lr,
    check_finite,
    make_sgd,
    progress,
    resolve_device,
    seed_everything,
    set_lr,
    stream_seed,
)

from .pretraining import PRETRAIN_HPARAMS, pretrain_denoising, pretrain_steps


def backbone_blocks(encoder: nn.Module) -> list[nn.Module]:
    """The layers of ``encoder`` that own weights, bottom to top."""
    return [m for m in encoder.modules() if any(True for _ in m.parameters(recurse=False))]


def parameter_groups(encoder: nn.Module, head: nn.Module, unfrozen: int,
                     decay: float) -> list[dict]:
    """Freeze all but the top ``unfrozen`` blocks of ``encoder``; return SGD groups
    with ``lr_mult`` 1 for ``head`` and ``decay ** j`` for the j-th block from the top."""
    blocks = backbone_blocks(encoder)
    n = max(0, min(int(unfrozen), len(blocks)))
    for b in blocks[: len(blocks) - n]:
        for prm in b.parameters(recurse=False):
            prm.requires_grad_(False)
    groups = [{"params": list(head.parameters()), "lr_mult": 1.0}]
    for j, b in enumerate(reversed(blocks[len(blocks) - n:]), start=1):
        groups.append({"params": list(b.parameters(recurse=False)), "lr_mult": float(decay) ** j})
    return groups


class FineTuning(Method):
    """Top blocks of a pretrained backbone fine-tuned on source with layer-wise lr decay."""

    name = "fine-tuning"
    family = "baseline"
    version = "1"
    requires = frozenset({"same_feature_space", "arrays"})
    paper = ("Yosinski et al., How transferable are features in deep neural networks?, NeurIPS 2014; "
             "discriminative fine-tuning, Howard & Ruder, ACL 2018; backbone pretrained as a denoising "
             "autoencoder on unlabelled inputs (Glorot et al., ICML 2011)")
    hyperparameters = {
        "lr": Float(0.01, 1e-3, 0.1, log=True, help="initial SGD learning rate of the head (annealed)"),
        "weight_decay": Float(5e-4, 1e-6, 1e-2, log=True, help="L2 weight decay"),
        "unfrozen_blocks": Int(2, 0, 4, help="top backbone blocks (layers with weights) trained"),
        "layer_decay": Float(1 / 2.6, 0.05, 1.0, log=True,
                             help="learning-rate factor per block below the head (ULMFiT: 1/2.6)"),
        **PRETRAIN_HPARAMS,
    }

    def fit(self, task: Task) -> TorchPredictor:
        seed_everything(task.seed)
        device = resolve_device(task.device)
        encoder, dim = task.backbone(task.source_shape)
        pre, rest = pretrain_steps(task.budget.steps, self.pretrain_frac)
        pretrain_denoising(task, encoder, dim, steps=pre, on=self.pretrain_on,
                           noise=self.pretrain_noise, lr=self.pretrain_lr, device=device)
        head = nn.Linear(dim, task.n_classes).to(device)
        encoder.train()
        opt = make_sgd(parameter_groups(encoder, head, self.unfrozen_blocks, self.layer_decay),
                       lr=self.lr, momentum=0.9, weight_decay=self.weight_decay)
        batches = TensorBatches(task.source_train.X, task.source_train.y, batch_size=task.budget.batch_size,
                                device=device, seed=stream_seed(task.seed, 1))
        loss = None
        for step in range(rest):
            set_lr(opt, annealed_lr(progress(step, rest), self.lr))
            b = batches.next()
            loss = F.cross_entropy(head(encoder(b.x)), b.y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            check_finite(loss, step, every=CHECK_EVERY)
        if loss is not None:
            check_finite(loss, rest)
        return TorchPredictor(encoder, head, device)


@hookimpl
def dabench_methods(register) -> None:  # type: ignore[no-untyped-def]
    register(FineTuning)
