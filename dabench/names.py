"""Closest-name suggestions for typos ("did you mean 'dann'?").

One helper for every place a user types a name the host knows: CLI
choices and options, ``--methods``/``--pairs``, a suite's method, dataset,
validator, backbone and hyperparameter names, plugin and dataset names.
Standard library only, so the CLI can refuse a typo before it loads torch
or any plugin.
"""

from __future__ import annotations

import difflib
from typing import Iterable

__all__ = ["closest", "did_you_mean"]


def closest(word: str, choices: Iterable[str], n: int = 3, cutoff: float = 0.6) -> list[str]:
    """Up to ``n`` of ``choices`` closest to ``word``, best first.

    ``difflib``'s ratio, and also a case-insensitive match and names that
    contain ``word`` (or are contained in it), so ``DANN`` finds ``dann`` and
    ``kliep`` finds ``iw-kliep``."""
    pool = sorted({str(c) for c in choices})
    if not word or not pool:
        return []
    low = word.lower()
    exact = [c for c in pool if c.lower() == low and c != word]
    if exact:  # only the case differs
        return exact[:n]
    by_low = {c.lower(): c for c in pool}
    scored = sorted(((difflib.SequenceMatcher(None, low, c).ratio(), c) for c in by_low), key=lambda t: (-t[0], t[1]))
    scored = [(r, c) for r, c in scored if r >= cutoff]
    # the clearly best ones only: 'sorce-only' finds 'source-only', not also 'target-only-k'
    found = [by_low[c] for r, c in scored if r >= scored[0][0] - 0.1] if scored else []
    if not found and len(low) >= 3:  # no close spelling: a name that contains it ('kliep' -> 'iw-kliep')
        found += [c for c in pool if low in c.lower() or (len(c) >= 3 and c.lower() in low)]
    out: list[str] = []
    for c in found:
        if c not in out and c != word:
            out.append(c)
    return out[:n]


def did_you_mean(word: str, choices: Iterable[str], n: int = 3) -> str:
    """``"did you mean 'dann'?"`` (or ``"did you mean 'a' or 'b'?"``), or ``""``
    when nothing is close."""
    near = closest(word, choices, n=n)
    if not near:
        return ""
    quoted = [repr(c) for c in near]
    alt = quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " or " + quoted[-1]
    return f"did you mean {alt}?"
