"""A clean process state for every run in a long-lived worker.

A worker process computes many runs one after the other (starting a fresh
torch process costs 1-2 s, more than most quick-suite runs), so whatever a
run changes in the process-wide state of torch, NumPy, scikit-learn or the
interpreter would otherwise leak into the next run: a plugin that calls
``torch.set_default_dtype(torch.float64)`` would make the next method's
float32 batches fail, and that failure would be stored as the next method's.

:func:`capture` records that state once, right after the worker started
(threads capped, plugins loaded); :meth:`ProcessState.reset` puts it back
after every run and checks it: what cannot be put back (torch refuses some
combinations of its legacy and new precision APIs) makes the worker replace
itself by a fresh process before the next run.  What is covered:

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

__all__ = ["ProcessState", "StateNotRestored", "capture"]


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
    new_api = {path: getattr(_backend(path), "fp32_precision", None) for path in _FP32_PATHS}
    if any(v is not None for v in new_api.values()):  # torch >= 2.9: the new precision API
        s["fp32_precision"] = new_api
    return s


#: backends whose ``fp32_precision`` torch's new precision API sets ("" is ``torch.backends``)
_FP32_PATHS = ("", "cuda.matmul", "cudnn", "cudnn.conv", "cudnn.rnn", "mkldnn", "mkldnn.matmul", "mkldnn.conv",
               "mkldnn.rnn")


def _backend(path: str) -> Any:
    import torch

    obj: Any = torch.backends
    for part in filter(None, path.split(".")):
        obj = getattr(obj, part, None)
    return obj


def _restore_torch(s: dict[str, Any]) -> None:
    """Put torch's settings back, calling a setter only where the value
    changed: some setters are costly the first time (``use_deterministic_algorithms``
    imports sympy through torch, seconds on a busy machine).

    The float32 matmul precision goes first: it also sets the TF32 flags,
    and setting a TF32 flag by itself under another precision leaves torch
    in a "mixed API" state whose getters raise."""
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
    try:
        precision = torch.get_float32_matmul_precision()
    except RuntimeError:  # a run mixed torch's legacy and new precision APIs: setting it again resets both
        precision = None
    if precision != s["matmul_precision"]:
        torch.set_float32_matmul_precision(s["matmul_precision"])
    for path, value in s.get("fp32_precision", {}).items():  # after the legacy setter, which sets these too
        obj = _backend(path)
        if value is not None and getattr(obj, "fp32_precision", value) != value:
            obj.fp32_precision = value
    if torch.backends.cuda.matmul.allow_tf32 != s["matmul_tf32"]:
        torch.backends.cuda.matmul.allow_tf32 = s["matmul_tf32"]
    cudnn = torch.backends.cudnn
    if (cudnn.enabled, cudnn.deterministic, cudnn.benchmark, cudnn.allow_tf32) != s["cudnn"]:
        cudnn.enabled, cudnn.deterministic, cudnn.benchmark, cudnn.allow_tf32 = s["cudnn"]
    if torch.get_num_threads() != s["threads"]:
        torch.set_num_threads(s["threads"])


class StateNotRestored(RuntimeError):
    """The process state could not be put back: the worker must be replaced."""


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
        if self.blas_threads is not None:  # before torch: capping OpenMP also caps torch's own pool
            from threadpoolctl import threadpool_info, threadpool_limits

            if any(i["num_threads"] != self.blas_threads for i in threadpool_info()):
                threadpool_limits(limits=self.blas_threads)
        _restore_torch(self.torch)
        sk = sys.modules.get("sklearn")
        if sk is not None:
            import sklearn

            # a run may import scikit-learn for the first time: then its
            # defaults are what the next run must see
            target = self.sklearn if self.sklearn is not None else _sklearn_defaults()
            if sklearn.get_config() != target:
                sklearn.set_config(**target)
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

    def mismatch(self) -> str | None:
        """What differs from the captured state now (None: nothing)."""
        try:
            now = capture(self.blas_threads)
        except Exception as exc:  # noqa: BLE001 - a getter that raises is a state we cannot vouch for
            return f"reading the process state raised {type(exc).__name__}: {exc}"
        for name in ("torch", "numpy_err", "numpy_print", "environ", "cwd", "recursion_limit"):
            if getattr(now, name) != getattr(self, name):
                return name
        if now.warning_filters != self.warning_filters:
            return "warning filters"
        if now.sklearn is not None and now.sklearn != (self.sklearn if self.sklearn is not None
                                                        else _sklearn_defaults()):
            return "scikit-learn config"
        if self.blas_threads is not None:
            from threadpoolctl import threadpool_info

            if any(i["num_threads"] != self.blas_threads for i in threadpool_info()):
                return "BLAS/OpenMP thread pools"
        return None

    def reset(self) -> None:
        """:meth:`restore`, then check; :class:`StateNotRestored` when some
        setting could not be put back (the caller replaces the process)."""
        try:
            self.restore()
        except Exception as exc:  # noqa: BLE001 - reported as a state that cannot be restored
            raise StateNotRestored(f"restoring the process state raised {type(exc).__name__}: {exc}") from exc
        why = self.mismatch()
        if why is not None:
            raise StateNotRestored(f"{why} could not be restored")


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
