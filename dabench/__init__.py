"""dabench: a plugin-based benchmark suite for domain adaptation.

Plugin authors need only this namespace::

    from dabench import hookimpl, Method, Float, Int, Choice, Bool
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: What ``from dabench import ...`` offers plugin authors.  Imported on first
#: use (PEP 562), so that ``dabench --help`` or a mistyped name on the command
#: line is answered without loading NumPy, pluggy or anything heavier.
_CONTRACT_NAMES = (
    "CONTRACT_VERSION",
    "FAMILIES",
    "REQUIREMENTS",
    "TRACKS",
    "Bool",
    "Budget",
    "Choice",
    "ContractError",
    "Float",
    "HParam",
    "Int",
    "Labeled",
    "Method",
    "OnlineAdapter",
    "Predictor",
    "Task",
    "Unlabeled",
)

__all__ = [*_CONTRACT_NAMES, "diagnostics", "hookimpl", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "hookimpl":
        import pluggy

        value: Any = pluggy.HookimplMarker("dabench")
    elif name in _CONTRACT_NAMES:
        from . import contract

        value = getattr(contract, name)
    elif name == "diagnostics":  # health signals: dabench.diagnostics.record
        import importlib

        value = importlib.import_module(".diagnostics", __name__)
    else:
        raise AttributeError(f"module 'dabench' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # pragma: no cover - what static checkers see
    import pluggy

    from . import diagnostics
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

    hookimpl: pluggy.HookimplMarker
