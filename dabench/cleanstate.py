"""A clean process state for every run in a long-lived worker.

A worker process computes many runs one after the other (starting a fresh
torch process costs 1-2 s, more than most quick-suite runs), so whatever a
run changes in the process-wide state of torch, NumPy, scikit-learn or the
interpreter would otherwise leak into the next run: a plugin that calls
``torch.set_default_dtype(torch.float64)`` would make the next method's
float32 batches fail, and that failure would be stored as the next method's.

:func:`capture` records that state once, right after the worker started
(threads capped, plugins loaded); :meth:`ProcessState.restore` puts it back
before every run.  What is covered:

- torch: default dtype, default device, grad mode, anomaly detection,
  deterministic-algorithms mode (and ``warn_only``), cuDNN flags
  (``enabled``, ``deterministic``, ``benchmark``, ``allow_tf32``), CUDA matmul
  TF32, ``float32_matmul_precision``, intra-op threads;
- NumPy: floating-point error handling (``seterr``) and print options (the
  legacy global generator is reseeded by every run anyway);
- scikit-learn: its global config (``set_config``: assume_finite, working
  memory, array API dispatch, metadata routing, ...), when it is imported;
- BLAS/OpenMP thread pools (threadpoolctl), when the worker caps them;
- the interpreter: environment variables, working directory, warning
  filters, recursion limit.

Plugin modules' own caches are the plugins' business and are kept.
"""

from __future__ import annotations

import os
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ProcessState", "capture"]


def _torch_state() -> dict[str, Any]:
    import torch

    s: dict[str, Any] = {
        "dtype": torch.get_default_dtype(),
        "grad": torch.is_grad_enabled(),
        "anomaly": torch.is_anomaly_enabled(),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "deterministic_warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
        "cudnn": (torch.backends.cudnn.enabled, torch.backends.cudnn.deterministic,
                  torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32),
        "matmul_tf32": torch.backends.cuda.matmul.allow_tf32,
        "matmul_precision": torch.get_float32_matmul_precision(),
        "threads": torch.get_num_threads(),
    }
    if hasattr(torch, "get_default_device"):
        s["device"] = torch.get_default_device()
    return s


def _restore_torch(s: dict[str, Any]) -> None:
    """Put torch's settings back, calling a setter only where the value
    changed: some setters are costly the first time (``use_deterministic_algorithms``
    imports sympy through torch, seconds on a busy machine)."""
    import torch

    if torch.get_default_dtype() != s["dtype"]:
        torch.set_default_dtype(s["dtype"])
    if "device" in s and torch.get_default_device() != s["device"]:
        torch.set_default_device(None if s["device"] == torch.device("cpu") else s["device"])
    if torch.is_grad_enabled() != s["grad"]:
        torch.set_grad_enabled(s["grad"])
    if torch.is_anomaly_enabled() != s["anomaly"]:
        torch.set_anomaly_enabled(s["anomaly"])
    if (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()) != (
            s["deterministic"], s["deterministic_warn_only"]):
        torch.use_deterministic_algorithms(s["deterministic"], warn_only=s["deterministic_warn_only"])
    cudnn = torch.backends.cudnn
    if (cudnn.enabled, cudnn.deterministic, cudnn.benchmark, cudnn.allow_tf32) != s["cudnn"]:
        cudnn.enabled, cudnn.deterministic, cudnn.benchmark, cudnn.allow_tf32 = s["cudnn"]
    if torch.backends.cuda.matmul.allow_tf32 != s["matmul_tf32"]:
        torch.backends.cuda.matmul.allow_tf32 = s["matmul_tf32"]
    if torch.get_float32_matmul_precision() != s["matmul_precision"]:
        torch.set_float32_matmul_precision(s["matmul_precision"])
    if torch.get_num_threads() != s["threads"]:
        torch.set_num_threads(s["threads"])


@dataclass
class ProcessState:
    """The process-wide settings a run may change (see the module docstring)."""

    torch: dict[str, Any]
    numpy_err: dict[str, str]
    numpy_print: dict[str, Any]
    sklearn: dict[str, Any] | None
    blas_threads: int | None
    environ: dict[str, str]
    cwd: str
    warning_filters: list = field(repr=False, default_factory=list)
    recursion_limit: int = 1000

    def restore(self) -> None:
        """Put every captured setting back (cheap: a few attribute writes).

        The libraries first: restoring torch's settings may import modules
        lazily (sympy, through torch), which add warning filters of their own;
        the interpreter's settings last, so they are exactly as captured."""
        import numpy as np

        np.seterr(**self.numpy_err)
        np.set_printoptions(**self.numpy_print)
        _restore_torch(self.torch)
        sk = sys.modules.get("sklearn")
        if sk is not None:
            import sklearn

            # a run may import scikit-learn for the first time: then its
            # defaults are what the next run must see
            target = self.sklearn if self.sklearn is not None else _sklearn_defaults()
            if sklearn.get_config() != target:
                sklearn.set_config(**target)
        if self.blas_threads is not None:
            from threadpoolctl import threadpool_info, threadpool_limits

            if any(i["num_threads"] != self.blas_threads for i in threadpool_info()):
                threadpool_limits(limits=self.blas_threads)
        if dict(os.environ) != self.environ:
            os.environ.clear()
            os.environ.update(self.environ)
        try:
            if os.getcwd() != self.cwd:
                os.chdir(self.cwd)
        except OSError:  # the run deleted the folder it moved to
            os.chdir(self.cwd)
        sys.setrecursionlimit(self.recursion_limit)
        warnings.filters[:] = self.warning_filters
        warnings._filters_mutated()  # type: ignore[attr-defined]  # invalidate the per-module caches


def _sklearn_defaults() -> dict[str, Any]:
    """scikit-learn's default config (what a thread sees before any set_config)."""
    from sklearn._config import _global_config  # type: ignore[attr-defined]

    return dict(_global_config)


def capture(blas_threads: int | None = None) -> ProcessState:
    """Record the current process state (call once, before the first run).

    ``blas_threads``: the BLAS/OpenMP cap the worker applies (None: none)."""
    import numpy as np

    sk = None
    if "sklearn" in sys.modules:
        import sklearn

        sk = dict(sklearn.get_config())
    popts = dict(np.get_printoptions())
    return ProcessState(
        torch=_torch_state(),
        numpy_err=dict(np.geterr()),
        numpy_print=popts,
        sklearn=sk,
        blas_threads=blas_threads,
        environ=dict(os.environ),
        cwd=os.getcwd(),
        warning_filters=list(warnings.filters),
        recursion_limit=sys.getrecursionlimit(),
    )
