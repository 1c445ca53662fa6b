"""Run health for the report: did adaptation engage, did training fail?

Two questions the accuracy table cannot answer by itself, decided per run
from what the store keeps (the method's health signals, ``diag_<name>``
extras recorded with :mod:`dabench.diagnostics`, and the host's accuracies):

- **Never engaged**: the method's adaptation term never acted, so its cell
  measures the method's backbone, not its adaptation.  Per conventional
  signal (:data:`ENGAGEMENT_RULES`; the report prints the same text):

  - ``engaged``: the method's own verdict (0 = never engaged) decides alone;
  - ``disc_acc_end`` (adversarial; with ``disc_acc_start``): the domain
    classifier ends at least :data:`DISC_ACC_NEVER_FOOLED` accurate on
    balanced domain batches and no less accurate than it started: the
    features never fooled it;
  - ``mask_rate`` / ``pseudo_label_rate`` (self-training; with their
    quarters ``_q1``..``_q4``): the share of target samples used never
    reaches :data:`MIN_TARGET_USE` in any quarter (the mask never opened);
  - ``kept_fraction`` (clustering): below :data:`MIN_TARGET_USE` of the
    target kept;
  - ``weight_ess`` (reweighting): the weights' effective sample size is at
    least :data:`ESS_UNIFORM` of the sample: the weights are uniform and
    reweighting changed nothing.

  A run engaged when any recorded rule says so; it never engaged when every
  recorded rule says it did not; with no rule-bearing signal it is unknown.
  A cell **never engaged** when every run with signals never engaged (it is
  marked, and neither ranked nor given a negative-transfer verdict); a cell
  where some runs engaged says in how many.

- **Failed training**: a run whose source test accuracy is at chance
  learned nothing from its labelled data (e.g. unscaled sparse features):
  its target accuracy is not a result.  *At chance*: not above the accuracy
  of always predicting the majority class of the source test split
  (``source_chance``) by more than two binomial standard errors of that
  rate (at least one point).  The shared source model's validation accuracy
  (``source_model_val_acc``) is checked the same way; a model trained on
  target labels only (``target-oracle``, ``target-only-k``) or that never saw
  source data (no source accuracy) is judged on target accuracy against
  ``target_chance`` instead.  A cell
  with any such run is marked and never ranked; where the pair's reference
  failed, the cells compared with it get no verdict.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

__all__ = [
    "DISC_ACC_NEVER_FOOLED",
    "ENGAGEMENT_RULES",
    "ESS_UNIFORM",
    "FAILED_TRAINING_RULE",
    "MIN_TARGET_USE",
    "RunHealth",
    "at_chance",
    "cell_engagement",
    "run_health",
]

#: Adversarial: a domain classifier at least this accurate at the end was never fooled.
DISC_ACC_NEVER_FOOLED = 0.8
#: Self-training / clustering: below this share of the target used, the mask never opened.
MIN_TARGET_USE = 0.01
#: Reweighting: an effective sample size of at least this share means uniform weights.
ESS_UNIFORM = 0.99

#: The rules as the report prints them: (signal, "never engaged when ...").
ENGAGEMENT_RULES: tuple[tuple[str, str], ...] = (
    ("engaged", "the method recorded engaged = 0 (its own verdict; decides alone)"),
    ("disc_acc_end", f"adversarial: the domain classifier ends at least {DISC_ACC_NEVER_FOOLED:.0%} accurate on "
                     f"balanced domain batches and no less accurate than it started (disc_acc_start): the features "
                     f"never fooled it"),
    ("mask_rate", f"self-training: the confidence mask admits under {MIN_TARGET_USE:.0%} of the target in every "
                  f"quarter of training (mask_rate, mask_rate_q1..q4)"),
    ("pseudo_label_rate", f"self-training: under {MIN_TARGET_USE:.0%} of the target pseudo-labelled in every "
                          f"quarter (pseudo_label_rate, _q1..q4)"),
    ("kept_fraction", f"clustering: under {MIN_TARGET_USE:.0%} of the target kept"),
    ("weight_ess", f"reweighting: effective sample size of the weights at least {ESS_UNIFORM:.0%} of the sample "
                   f"(uniform weights)"),
)

FAILED_TRAINING_RULE = (
    "source test accuracy not above always predicting the source's majority class by more than two binomial "
    "standard errors (at least 1 point); the same for the shared source model's validation accuracy; models "
    "trained on target labels only (target-oracle, target-only-k) and models without source accuracy are judged "
    "on target accuracy against the target's majority class instead"
)


def _num(row: Mapping[str, Any], key: str) -> float | None:
    v = row.get(key)
    if v is None or isinstance(v, (str, bytes)):
        return None
    try:
        v = float(v)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def at_chance(acc: float | None, chance: float | None, n: int | None = None) -> bool:
    """Whether accuracy ``acc`` is within sampling noise of ``chance`` (the
    majority-class rate) on ``n`` test points (unknown ``n``: 400)."""
    if acc is None or chance is None:
        return False
    n = n or 400
    margin = max(0.01, 2.0 * math.sqrt(max(chance * (1.0 - chance), 0.0) / n))
    return acc <= chance + margin


def _engaged_by_rules(diag: Mapping[str, float]) -> tuple[bool | None, list[str]]:
    """(engaged?, the signals that said "never engaged") from the conventional signals."""
    votes: list[bool] = []
    never: list[str] = []
    end = diag.get("disc_acc_end")
    if end is not None:
        start = diag.get("disc_acc_start")
        no = end >= DISC_ACC_NEVER_FOOLED and (start is None or end >= start)
        votes.append(not no)
        if no:
            never.append(f"disc_acc_end {end:.2f}" + (f" (start {start:.2f})" if start is not None else ""))
    for name in ("mask_rate", "pseudo_label_rate"):
        vals = [diag[k] for k in (name, *(f"{name}_q{q}" for q in range(1, 5))) if diag.get(k) is not None]
        if vals:
            no = max(vals) < MIN_TARGET_USE
            votes.append(not no)
            if no:
                never.append(f"{name} at most {max(vals):.3f}")
    kept = diag.get("kept_fraction")
    if kept is not None:
        votes.append(kept >= MIN_TARGET_USE)
        if kept < MIN_TARGET_USE:
            never.append(f"kept_fraction {kept:.3f}")
    ess = diag.get("weight_ess")
    if ess is not None:
        votes.append(ess < ESS_UNIFORM)
        if ess >= ESS_UNIFORM:
            never.append(f"weight_ess {ess:.3f}")
    if not votes:
        return None, []
    return any(votes), never


@dataclass(frozen=True)
class RunHealth:
    """One run's health: ``engaged`` (None: no signal to judge by), the
    signals behind a "never engaged", and why training failed (None: it did
    not)."""

    engaged: bool | None
    never_signals: tuple[str, ...]
    failed_training: str | None


def run_health(row: Mapping[str, Any], target_trained: bool = False) -> RunHealth:
    """Health of one stored run (a ``RunStore.rows()`` dict: ``x_diag_*``,
    ``x_source_chance`` ... extras).  ``target_trained``: the run's model
    learns from target labels only (``target-oracle``, ``target-only-k``), so
    its training is judged on target accuracy (its source accuracy says how a
    target model transfers back, not whether it learned)."""
    diag = {k[len("x_diag_"):]: _num(row, k) for k in row if k.startswith("x_diag_")}
    diag = {k: v for k, v in diag.items() if v is not None}
    if "engaged" in diag:
        engaged: bool | None = diag["engaged"] >= 0.5
        never = () if engaged else ("engaged = 0",)
    else:
        engaged, nv = _engaged_by_rules(diag)
        never = tuple(nv) if engaged is False else ()
    return RunHealth(engaged, never, _failed_training(row, target_trained))


def _failed_training(row: Mapping[str, Any], target_trained: bool = False) -> str | None:
    if target_trained:
        return _target_at_chance(row, "for a model trained on target labels")
    n_src = _num(row, "x_source_n")
    src, chance = _num(row, "source_acc"), _num(row, "x_source_chance")
    if chance is None:  # stores from before source_chance: 1 / classes when the class count is known
        k = sum(1 for key in row if key.startswith("x_prior_pred_") and _num(row, key) is not None)
        chance = 1.0 / k if k >= 2 else None
    if src is not None and at_chance(src, chance, int(n_src) if n_src else None):
        return f"source accuracy {100 * src:.1f} % at chance ({100 * chance:.1f} %)"
    val = _num(row, "x_source_model_val_acc")
    if val is not None and at_chance(val, chance, int(n_src) if n_src else None):
        return f"shared source model's validation accuracy {100 * val:.1f} % at chance ({100 * chance:.1f} %)"
    if src is None:
        return _target_at_chance(row, "for a model without source data")
    return None


def _target_at_chance(row: Mapping[str, Any], why: str) -> str | None:
    tgt, tchance, n_t = _num(row, "target_acc"), _num(row, "x_target_chance"), _num(row, "x_target_n")
    if at_chance(tgt, tchance, int(n_t) if n_t else None):
        return f"target accuracy {100 * tgt:.1f} % at chance ({100 * tchance:.1f} %) {why}"
    return None


def cell_engagement(healths: list[RunHealth]) -> tuple[str | None, str]:
    """``("engaged" | "partly" | "never" | None, note)`` over a cell's runs."""
    known = [h for h in healths if h.engaged is not None]
    if not known:
        return None, ""
    k = sum(1 for h in known if h.engaged)
    if k == len(known):
        return "engaged", f"engaged in {k} of {len(known)} runs"
    signals = sorted({s.split(" ")[0] for h in known if not h.engaged for s in h.never_signals})
    if k == 0:
        return "never", f"never engaged in {len(known)} runs ({', '.join(signals)})"
    return "partly", f"engaged in {k} of {len(known)} runs (not: {', '.join(signals)})"
