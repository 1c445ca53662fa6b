"""Health signals: what a method records about whether its adaptation engaged.

A benchmark cell that reads "no effect" means something only if the
method's adaptation term actually acted: a domain classifier that the
features never fool, a confidence mask that never opens or a pseudo-label
set made only of samples the model already gets right all look like "no
effect" in the accuracy table.  Methods therefore record a few numbers
while they train, with one call::

    from dabench import diagnostics

    diagnostics.record("disc_acc_start", 0.57)     # a finite number
    diagnostics.record("mask_rate_q4", 0.31)

The host collects them per run (whatever process runs ``fit``) and stores
them in the store's ``extras`` table as ``diag_<name>``; the leaderboard
shows them.  Outside a run (a plugin's own tests) :func:`collect` gathers
them::

    with diagnostics.collect() as diag:
        method.fit(task)
    assert diag["mask_rate_q4"] > 0

A name is lower-case letters, digits and ``_`` (at most 48 characters); a
later record of the same name replaces the earlier one.  :func:`record`
outside any collection does nothing, so a method never fails for lack of
a collector.

Conventional names read by the report (others are stored and shown as is):

- ``engaged``: 1.0 when the method's adaptation term acted (e.g. the mask
  opened for a meaningful fraction of the target), 0.0 when it never did;
- adversarial: ``disc_acc_start`` / ``disc_acc_end`` (domain-classifier
  accuracy over the first and last tenth of training);
- self-training: ``mask_rate`` / ``pseudo_label_rate`` (fraction of target
  samples used) and their per-quarter values ``..._q1``..``..._q4``;
- clustering: ``kept_fraction``, ``cluster_agreement`` (agreement of the
  clusters with the source model's predictions);
- reweighting: ``weight_ess`` (effective sample size of the weights over
  the number of samples).
"""

from __future__ import annotations

import contextlib
import math
import re
from contextvars import ContextVar
from typing import Iterator

_NAME = re.compile(r"^[a-z][a-z0-9_]{0,47}$")
_current: ContextVar[dict[str, float] | None] = ContextVar("dabench_diagnostics", default=None)


def record(name: str, value: float) -> None:
    """Record health signal ``name`` = ``value`` for the current run.

    Raises ``ValueError`` for a malformed name; a non-finite value is stored
    as missing (None)."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"diagnostic name {name!r} must be lower-case letters, digits and '_' "
                         "(starting with a letter, at most 48 characters)")
    sink = _current.get()
    if sink is None:
        return
    v = float(value)
    sink[name] = v if math.isfinite(v) else None  # type: ignore[assignment]


@contextlib.contextmanager
def collect() -> Iterator[dict[str, float]]:
    """Collect the signals recorded inside the block into the yielded dict."""
    sink: dict[str, float] = {}
    token = _current.set(sink)
    try:
        yield sink
    finally:
        _current.reset(token)


def quarters(values: list[float], name: str) -> None:
    """Record the mean of ``values`` (one per training step, in order) over
    each quarter of training as ``name_q1`` .. ``name_q4`` and overall as
    ``name``."""
    if not values:
        return
    n = len(values)
    record(name, sum(values) / n)
    for q in range(4):
        part = values[q * n // 4:(q + 1) * n // 4] or values[-1:]
        record(f"{name}_q{q + 1}", sum(part) / len(part))


__all__ = ["collect", "quarters", "record"]
