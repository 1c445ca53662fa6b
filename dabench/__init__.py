"""dabench: a plugin-based benchmark suite for domain adaptation.

Plugin authors need only this namespace::

    from dabench import hookimpl, Method, Float, Int, Choice, Bool
"""

from __future__ import annotations

import pluggy

from .contract import (
    CONTRACT_VERSION,
    FAMILIES,
    REQUIREMENTS,
    Bool,
    Budget,
    Choice,
    ContractError,
    Float,
    HParam,
    Int,
    Labeled,
    Method,
    Predictor,
    Task,
    Unlabeled,
)

__version__ = "0.1.0"

from . import diagnostics  # noqa: E402  (health signals: dabench.diagnostics.record)

hookimpl = pluggy.HookimplMarker("dabench")

__all__ = [
    "CONTRACT_VERSION",
    "FAMILIES",
    "REQUIREMENTS",
    "Bool",
    "Budget",
    "Choice",
    "ContractError",
    "Float",
    "HParam",
    "Int",
    "Labeled",
    "Method",
    "Predictor",
    "Task",
    "Unlabeled",
    "diagnostics",
    "hookimpl",
    "__version__",
]
