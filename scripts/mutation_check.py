"""A small mutation check: apply one plausible bug at a time to the store,
suite, verdict, kit, worker and executor code, run only the tests that
should catch it, and report the mutants that survive.

    python scripts/mutation_check.py            # every mutant
    python scripts/mutation_check.py -k holm    # the mutants whose name contains "holm"
    python scripts/mutation_check.py --list

Each mutant is one exact text replacement (the script refuses to run when
the original text is not found exactly once, so it cannot silently test
nothing), and first checks that each mutant's tests pass on the unmutated
code (so a failure means the mutant was caught, not that the tests were
broken).  Files are restored after each mutant, also on Ctrl-C.  Exit code:
0 when every mutant was killed, 1 otherwise, 2 when the baseline fails.  Run it before resolving a
change to these modules; add a mutant (and the test that kills it) when a
bug slips through.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]


MUTANTS = (
    # the spot-check: plausible bugs in the verdict, the key, CBST, the kit, resume, DANN
    Mutant("nt-verdict-flags-a-gain", "dabench/verdicts.py",
           "    elif pw < alpha:\n", "    elif min(pw, pb) < alpha:\n",
           ("tests/test_mutations.py",)),
    Mutant("nt-verdict-drops-point-floor", "dabench/verdicts.py",
           "    t, pw, pb = one_sided_t(d, floor)", "    t, pw, pb = one_sided_t(d, 0.0)",
           ("tests/test_mutations.py",)),
    Mutant("holm-over-all-methods", "dabench/leaderboard.py",
           'for m, idx in out.groupby("method").groups.items():', 'for m, idx in [(None, out.index)]:',
           ("tests/test_mutations.py",)),
    Mutant("reference-rows-tested", "dabench/leaderboard.py",
           'testable = r["status"] == "ok" and r["method"] != ref and not reference.get(r["method"], False)',
           'testable = r["status"] == "ok" and r["method"] != ref',
           ("tests/test_mutations.py",)),
    Mutant("backbone-not-in-run-key", "dabench/suite.py",
           "            backbone=self.backbone,\n            contract=CONTRACT_VERSION,",
           "            contract=CONTRACT_VERSION,",
           ("tests/test_mutations.py",)),
    Mutant("cbst-rank-ceiled", "plugins/cbst.py",
           "rank = min(mc.numel(), math.floor(portion * mc.numel() + 1e-9))",
           "rank = min(mc.numel(), math.ceil(portion * mc.numel() - 1e-9))",
           ("tests/test_mutations.py",)),
    Mutant("kit-target-train-unguarded", "dabench/testing.py",
           'target_train=_guarded(raw.target_train, "target train labels", _ACCESSES),',
           "target_train=raw.target_train,",
           ("tests/test_mutations.py",)),
    Mutant("resume-recomputes-stored-runs", "dabench/runner.py",
           'todo = [s for s in specs if s.key not in status or (retry_failed and status[s.key] == "failed")]',
           "todo = list(specs)",
           ("tests/test_runner.py::test_failures_are_stored_and_the_sweep_goes_on",)),
    Mutant("gradient-reversal-sign", "dabench/training.py",
           "return grad_output.neg() * ctx.coeff, None", "return grad_output * ctx.coeff, None",
           ("tests/test_cdan_baselines.py::test_cdan_domain_gradient_is_reversed_into_features_and_entropy_weights",)),
    # this host's promises
    Mutant("store-overwrites-ok-rows", "dabench/store.py",
           'if row is not None and _RANK.get(record["status"], 0) < _RANK.get(row[0], 0):\n                return False',
           "if False:\n                return False",
           ("tests/test_hardening.py::test_an_ok_row_is_never_overwritten",)),
    Mutant("claims-ignore-live-leases", "dabench/store.py",
           "if lease is not None and lease.owner != self.owner and lease.alive(now):", "if False:",
           ("tests/test_hardening.py::test_leases_share_runs_between_invocations_and_expire_with_their_owner",)),
    Mutant("dead-owners-keep-their-leases", "dabench/store.py",
           "            if not _pid_alive(self.pid):\n                return False",
           "            if not _pid_alive(self.pid):\n                return True",
           ("tests/test_hardening.py::test_leases_share_runs_between_invocations_and_expire_with_their_owner",)),
    Mutant("suspicious-cells-ranked", "dabench/ranking.py",
           '                and not bool(getattr(r, "suspicious", False)))', "                and True)",
           ("tests/test_trust.py::test_suspicion_rules",)),
    Mutant("worker-gets-target-train-labels", "dabench/isolation.py",
           "target_train=Unlabeled(split.target_train.X), target_labeled", "target_train=split.target_train, target_labeled",
           ("tests/test_trust.py::test_what_a_worker_receives_holds_no_target_labels",)),
    Mutant("worker-gets-target-test-labels", "dabench/isolation.py",
           "eval_target=split.target_test.X,", "eval_target=split.target_test,",
           ("tests/test_trust.py::test_what_a_worker_receives_holds_no_target_labels",)),
    Mutant("suite-dedupe-quadratic", "dabench/suite.py",
           "        if text not in seen:  # a set: linear in the number of points",
           "        if text not in {canonical_json(u) for u in unique}:",
           ("tests/test_hardening.py::test_suite_expansion_is_linear_capped_and_range_checked",)),
    Mutant("no-state-reset-between-runs", "dabench/executors.py",
           "        try:\n            state.reset()\n        except StateNotRestored as exc:",
           "        try:\n            pass\n        except StateNotRestored as exc:",
           ("tests/test_hostile.py::test_each_run_starts_from_a_clean_process_state",)),
    Mutant("no-retry-after-a-crash", "dabench/executors.py",
           "if crashes[spec.key] == 1:", "if False:",
           ("tests/test_hostile.py::test_every_run_ends_in_the_store_and_the_sweep_goes_on[None]",)),
)


def run_tests(tests: tuple[str, ...], timeout: int) -> int | None:
    """pytest's exit code on ``tests`` (None: timed out)."""
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    try:
        return subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests],
                              cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env).returncode
    except subprocess.TimeoutExpired:
        return None


def run_mutant(m: Mutant, timeout: int) -> tuple[str, float]:
    path = ROOT / m.path
    original = path.read_text(encoding="utf-8")
    n = original.count(m.old)
    if n != 1:
        return f"NOT APPLIED (original text found {n} times: update the mutant)", 0.0
    t0 = time.time()
    try:
        path.write_text(original.replace(m.old, m.new), encoding="utf-8")
        code = run_tests(m.tests, timeout)
        status = {None: "killed (timeout)", 0: "SURVIVED", 1: "killed"}.get(code, f"killed (pytest exit {code})")
    finally:
        path.write_text(original, encoding="utf-8")
    return status, time.time() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-k", help="only mutants whose name contains this")
    p.add_argument("--list", action="store_true", help="list the mutants and exit")
    p.add_argument("--timeout", type=int, default=900, help="seconds per mutant (default 900)")
    p.add_argument("--no-baseline", action="store_true",
                   help="skip checking that each mutant's tests pass on the unmutated code")
    args = p.parse_args(argv)
    mutants = [m for m in MUTANTS if not args.k or args.k in m.name]
    if args.list:
        for m in mutants:
            print(f"{m.name:<34} {m.path:<26} {' '.join(m.tests)}")
        return 0
    if not args.no_baseline:
        # a mutant counts as killed only if its tests pass without it
        for tests in dict.fromkeys(m.tests for m in mutants):
            code = run_tests(tests, args.timeout)
            if code != 0:
                print(f"baseline: {' '.join(tests)} fail without any mutant (pytest exit {code}): fix them first")
                return 2
        print(f"baseline: the {len(set(m.tests for m in mutants))} test selections pass without mutants")
    survived = 0
    for m in mutants:
        status, secs = run_mutant(m, args.timeout)
        survived += not status.startswith("killed")
        print(f"{m.name:<34} {status} ({secs:.0f} s)", flush=True)
    print(f"{len(mutants) - survived} of {len(mutants)} mutants killed")
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
