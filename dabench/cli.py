"""The ``dabench`` command line.

    dabench list methods|datasets|suites|validators|plugins [--json]
    dabench run SUITE [--results DIR] [--methods a,b] [--pairs x,y] [--seeds N]
                      [--device auto|cpu|cuda[:i]] [--retry-failed] [--time-limit S]
                      [--jobs N] [--threads N] [--executor local|ray [--address ADDR]]
                      [--clear METHOD[:SOURCE:TARGET]]...
    dabench leaderboard DIR [--format md|csv|json|html] [--out FILE] [--validator NAME]
                            [--clear METHOD[:SOURCE:TARGET]]...
    dabench plugin check NAME|PATH      (the conformance kit, dabench.testing)
    dabench plugin new NAME [--dir DIR] (a ready plugin package)
    dabench data list|download NAME|verify NAME [--data-root DIR]   (see dabench.cli_data)

Every command takes ``--plugins-dir DIR`` (load each ``*.py`` there as a
plugin).  Exit codes: 0 success, 1 runtime failure, 2 bad input (suite,
arguments, missing data), 130 interrupted.

``dabench run`` exits 0 when every run is stored, also when methods failed
(their runs are stored as ``failed`` with the reason and listed in the
leaderboard: a method's failure is a result); it exits 1 when the host
failed: a run failed for a reason of the host (not of its method), a pair's
data is missing, a worker process could not start, or the store could not
be written (a full disk says so).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from . import __version__

EXIT_BAD_INPUT = 2
EXIT_HOST_FAILURE = 1


class Console:
    """All user-facing output of the CLI goes through here (stderr for
    progress and diagnostics, stdout for requested data)."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self.tty = sys.stderr.isatty()

    def out(self, text: str = "") -> None:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()

    def info(self, text: str) -> None:
        if not self.quiet:
            sys.stderr.write(text + "\n")
            sys.stderr.flush()

    def error(self, text: str) -> None:
        sys.stderr.write(f"dabench: error: {text}\n")
        sys.stderr.flush()

    def warn(self, text: str) -> None:
        sys.stderr.write(f"dabench: warning: {text}\n")
        sys.stderr.flush()


def _fmt_time(s: float) -> str:
    s = int(round(s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


def _registry(args: argparse.Namespace, console: Console):
    from .plugins import get_registry

    reg = get_registry(plugins_dir=getattr(args, "plugins_dir", None))
    for err in reg.errors:
        console.warn(str(err))
    return reg


# ------------------------------------------------------------------ list


def cmd_list(args: argparse.Namespace, console: Console) -> int:
    reg = _registry(args, console)
    what = args.what
    kinds = {"methods": ("method", "validator", "plugin"), "validators": ("validator", "plugin"),
             "datasets": ("dataset", "plugin")}.get(what, ())
    for u in reg.unavailable:
        if u.kind in kinds:
            console.warn(str(u))
    rows: list[dict[str, Any]]
    if what == "methods":
        rows = []
        for name, cls in sorted(reg.methods.items()):
            rows.append({
                "name": name, "family": cls.family, "version": str(cls.version),
                "plugin": reg.owner.get(("method", name), ""),
                "requires": sorted(cls.requires), "reference": bool(cls.reference),
                "paper": cls.paper,
                "hyperparameters": {k: {"default": hp.default, "kind": hp.kind, "low": hp.low, "high": hp.high,
                                        "log": hp.log, "choices": list(hp.choices)}
                                    for k, hp in sorted(cls.hyperparameters.items())},
            })
    elif what == "datasets":
        rows = [{"name": n, "label_space": d.label_space, "n_classes": d.n_classes, "shape": list(d.shape),
                 "base": d.base, "plugin": reg.owner.get(("dataset", n), ""), "description": d.description,
                 "source": d.source} for n, d in sorted(reg.datasets.items())]
    elif what == "validators":
        rows = [{"name": n, "paper": getattr(v, "paper", ""), "plugin": reg.owner.get(("validator", n), "")}
                for n, v in sorted(reg.validators.items())]
    elif what == "plugins":
        rows = [{"name": p.name, "origin": p.origin, "methods": p.methods, "datasets": p.datasets,
                 "validators": p.validators, "backbones": p.backbones,
                 "unavailable": [{"kind": k, "name": n, "reason": r} for k, n, r in p.unavailable]}
                for p in reg.plugins.values()]
        rows += [{"name": e.plugin, "error": e.message} for e in reg.errors]
    else:  # suites
        from .suite import SuiteError, parse_suite

        folder = Path(args.suites_dir)
        rows = []
        for path in sorted(folder.glob("*.toml")):
            try:
                s = parse_suite(path, reg)
                runs = len(s.expand(reg))
                rows.append({"name": s.name, "path": str(path), "pairs": [p.name for p in s.pairs],
                             "methods": [m.name for m in s.methods], "seeds": len(s.seeds), "runs": runs,
                             "description": s.description})
            except SuiteError as e:
                rows.append({"name": path.stem, "path": str(path), "error": str(e)})
    if args.json:
        console.out(json.dumps(rows, indent=2, default=str))
        return 0
    if not rows:
        console.out(f"no {what} found")
        return 0
    for r in rows:
        if "error" in r:
            console.out(f"{r['name']:<22} ERROR: {r['error']}")
        elif what == "methods":
            req = f"  requires: {', '.join(r['requires'])}" if r["requires"] else ""
            console.out(f"{r['name']:<16} {r['family']:<13} v{r['version']:<4} [{r['plugin']}]{req}")
        elif what == "datasets":
            console.out(f"{r['name']:<18} {r['label_space']:<11} {r['n_classes']:>3} classes  shape {tuple(r['shape'])}  "
                        f"{r['description']}")
        elif what == "validators":
            console.out(f"{r['name']:<14} {r['paper']}")
        elif what == "plugins":
            console.out(f"{r['name']:<16} {r['origin']}")
            for u in r["unavailable"]:
                what_ = "the whole plugin" if u["kind"] == "plugin" else f"{u['kind']} {u['name']}"
                console.out(f"{'':<16}   unavailable: {what_}: {u['reason']}")
        else:
            console.out(f"{r['name']:<14} {r['path']:<28} {r['runs']:>4} runs  {len(r['pairs'])} pairs × "
                        f"{len(r['methods'])} methods × {r['seeds']} seeds")
    return 0


# ------------------------------------------------------------------ run


def _split_list(s: str | None) -> list[str] | None:
    return [x.strip() for x in s.split(",") if x.strip()] if s else None


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {n}")
    return n


def _positive_seconds(text: str) -> float:
    import math

    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not math.isfinite(v) or v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return v


def _result_line(r: Any, with_device: bool = False) -> str:
    """``ok: target acc 0.912, source acc 0.990 (1.2 s)`` or ``failed: reason``.
    A metric may be missing (a target-only model on a heterogeneous pair has
    no source accuracy): it reads ``n/a``."""
    if r.status != "ok":
        return f"{r.status}: {r.reason}"

    def acc(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.3f}"

    where = f" on {r.device}" if with_device else ""
    return f"ok: target acc {acc(r.target_acc)}, source acc {acc(r.source_acc)} ({r.wall_time_s:.1f} s{where})"


def cmd_run(args: argparse.Namespace, console: Console) -> int:
    from .executors import ExecutorError, make_executor
    from .leaderboard import LeaderboardError, write_reports
    from .runner import Runner
    from .store import RunStore, StoreError, canonical_json
    from .suite import SuiteError, parse_suite
    from .training import resolve_device

    reg = _registry(args, console)
    try:
        full = parse_suite(args.suite, reg, data_root=args.data_root)
        suite = full.restrict(_split_list(args.methods), _split_list(args.pairs), args.seeds)
    except SuiteError as e:
        console.error(str(e))
        return EXIT_BAD_INPUT
    if args.time_limit is not None:
        suite.time_limit_s = float(args.time_limit)
    cleared = sorted(set(full.cleared) | set(args.clear or ()))
    try:
        device = str(resolve_device(args.device))
    except (ValueError, RuntimeError) as e:
        console.error(f"--device: {e}")
        return EXIT_BAD_INPUT
    try:
        executor = make_executor(args.executor, device=device, jobs=args.jobs, address=args.address,
                                 threads=args.threads)
    except ExecutorError as e:
        console.error(str(e))
        return EXIT_BAD_INPUT
    results = Path(args.results) if args.results else Path("results") / suite.name
    try:
        store = RunStore(results)
    except (StoreError, OSError) as e:
        console.error(str(e))
        return EXIT_BAD_INPUT
    time_limit = f"; per-run time limit {suite.time_limit_s:g} s"

    serial = executor.name == "serial"

    def label(s: Any) -> str:
        return f"{s.pair.name.replace(':', '→')} · {s.method}{f' #{s.point}' if s.point else ''} · seed {s.seed}"

    def on_event(kind: str, **ev: Any) -> None:
        if kind == "start":
            console.info(f"dabench {__version__}: suite {suite.name!r} ({suite.path}) on {device}: "
                         f"{ev['total']} runs, {ev['done']} already in {store.path}, {ev['todo']} to do")
            if not serial and ev["todo"]:
                console.info(f"executor: {executor.describe()}{time_limit}")
        elif kind == "run_retry":
            console.warn(f"{label(ev['spec'])}: {ev['reason']}; retrying it once on a fresh worker")
        elif kind == "waiting":
            console.info(f"waiting for {ev['n']} run(s) another dabench run on this store is computing "
                         f"({', '.join(ev['owners']) or 'owner unknown'}); they are stored by it, or computed here "
                         f"if it stops")
        elif not serial:  # runs finish out of order: one line per finished run
            if kind in ("run_end", "run_no_data"):
                done, todo, el = ev["index"] + 1, ev["todo"], ev["elapsed"]
                eta = _fmt_time(el / done * (todo - done))
                if kind == "run_no_data":
                    what = _no_data_line(ev)
                else:
                    what = _result_line(ev["result"], with_device=True)
                console.info(f"[{done}/{todo}] {label(ev['spec'])} · {what} · elapsed {_fmt_time(el)} · "
                             f"remaining ~{eta}")
        elif kind == "run_start":
            s = ev["spec"]
            done, todo, el = ev["index"], ev["todo"], ev["elapsed"]
            eta = f"~{_fmt_time(el / done * (todo - done))}" if done else "?"
            console.info(f"[{done + 1}/{todo}] {s.pair.name.replace(':', '→')} · {s.method}"
                         f"{f' #{s.point}' if s.point else ''} · seed {s.seed} · elapsed {_fmt_time(el)} · remaining {eta}")
        elif kind == "run_end":
            console.info(f"      {_result_line(ev['result'])}")
        elif kind == "run_no_data":
            console.info(f"      {_no_data_line(ev)}")

    try:
        store.set_meta("validator", suite.validator)
        store.set_meta("published", canonical_json(full.published))
        store.set_meta("cleared", json.dumps(cleared))
    except StoreError as e:
        console.error(str(e))
        return EXIT_HOST_FAILURE
    runner = Runner(reg, store, device=device, data_root=args.data_root, on_event=on_event,
                    plugins_dir=args.plugins_dir, time_limit_s=suite.time_limit_s)
    try:
        summary = runner.run(suite, retry_failed=args.retry_failed, executor=executor)
    except (ExecutorError, StoreError) as e:
        try:
            n = store.count()
            console.error(f"{e}; {n} runs are safely stored in {store.path}")
        except StoreError:
            console.error(str(e))
        return EXIT_HOST_FAILURE
    except KeyboardInterrupt:
        console.error(f"interrupted; {store.count()} runs are safely stored in {store.path}; "
                      f"rerun the same command to resume")
        return 130
    stored = store.count()
    store.close()
    paths: dict = {}
    try:
        # the leaderboard of the whole suite as it is now (also the runs that
        # --methods/--pairs/--seeds left out of this invocation, never stale points)
        paths = write_reports(results, results, validator=suite.validator, suite=suite.name,
                              formats=("md", "csv", "html"), keys={s.key for s in full.expand(reg)},
                              cleared=cleared)
    except LeaderboardError as e:
        if not (summary.no_data and not stored):  # with no data and no runs there is nothing to report
            console.error(f"the runs are stored, but the leaderboard could not be written: {e}")
            return EXIT_BAD_INPUT
    except (StoreError, OSError) as e:
        console.error(f"the runs are stored, but the leaderboard could not be written: {e}")
        return EXIT_HOST_FAILURE
    console.info(f"done in {_fmt_time(summary.wall_time_s)}: {summary.ran} runs ({summary.ok} ok, "
                 f"{summary.failed} failed, {summary.skipped} skipped), {summary.already_done} already stored"
                 + (f", {summary.by_others} stored by another dabench run" if summary.by_others else ""))
    if summary.source_models_trained or summary.source_models_reused:
        console.info(f"shared source models: {len(summary.source_models_trained)} trained, "
                     f"{len(summary.source_models_reused)} reused from {results / 'source-models'}")
    for p in paths.values():
        console.info(f"wrote {p}")
    if summary.retried:
        console.warn(f"{summary.retried} run(s) crashed their worker and were retried once")
    if summary.failed:
        console.warn(f"{summary.failed} runs failed; their reasons are in the leaderboard; "
                     f"`--retry-failed` reruns them")
    code = 0
    if summary.host_errors:
        console.error(f"{summary.host_errors} run(s) failed for a reason of the host, not of their method "
                      f"(see their reasons, which start with 'host:'); exit code {EXIT_HOST_FAILURE}")
        code = EXIT_HOST_FAILURE
    if summary.no_data:
        console.error(f"{summary.no_data} runs did not run because their data is missing or fails its checks "
                      f"(nothing was stored for them; rerun the same command once the data is there):")
        for reason, pairs in summary.missing_data.items():
            console.error(f"  pair(s) {', '.join(pairs)}: {reason}")
        code = EXIT_HOST_FAILURE
    return code


def _no_data_line(ev: dict) -> str:
    """What the progress shows for a run whose data is missing: the whole
    message the first time, a pointer to it afterwards."""
    if ev["first"]:
        return f"not run: {ev['reason']}"
    return "not run: its data is missing (see the message above; repeated at the end)"


# ------------------------------------------------------------------ leaderboard


def cmd_leaderboard(args: argparse.Namespace, console: Console) -> int:
    from .leaderboard import LeaderboardError, build_leaderboard, render
    from .store import RunStore, StoreError

    try:
        with RunStore.open_readonly(args.dir) as st:
            validator = args.validator or st.get_meta("validator") or "source-val"
            stored_cleared = st.get_meta("cleared")
    except StoreError as e:
        console.error(str(e))
        return EXIT_BAD_INPUT
    try:
        cleared = set(json.loads(stored_cleared)) if stored_cleared else set()
    except ValueError:
        cleared = set()
    cleared |= set(args.clear or ())
    try:
        board = build_leaderboard(args.dir, validator=validator, suite=args.suite, cleared=sorted(cleared))
    except (LeaderboardError, StoreError) as e:
        console.error(str(e))
        return EXIT_BAD_INPUT
    try:
        text = render(board, args.format)
    except LeaderboardError as e:
        console.error(str(e))
        return EXIT_BAD_INPUT
    if args.out:
        try:
            Path(args.out).write_text(text, encoding="utf-8")
        except OSError as e:
            console.error(f"cannot write {args.out}: {e}")
            return EXIT_HOST_FAILURE
        console.info(f"wrote {args.out}")
    else:
        console.out(text.rstrip("\n"))
    return 0


# ------------------------------------------------------------------ main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dabench", description="Benchmark domain adaptation methods honestly.")
    p.add_argument("--version", action="version", version=f"dabench {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--plugins-dir", metavar="DIR", help="also load every .py file in DIR as a plugin")
    common.add_argument("-v", "--verbose", action="store_true", help="debug logging (tracebacks of failed runs)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    ls = sub.add_parser("list", parents=[common], help="list methods, datasets, suites, validators or plugins")
    ls.add_argument("what", choices=["methods", "datasets", "suites", "validators", "plugins"])
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    ls.add_argument("--suites-dir", default="suites", help="folder of suite files (default: ./suites)")
    ls.set_defaults(func=cmd_list)

    run = sub.add_parser("run", parents=[common], help="run a suite (resumes: stored runs are skipped)")
    run.add_argument("suite", metavar="SUITE", help="a suite TOML file, e.g. suites/quick.toml")
    run.add_argument("--results", metavar="DIR", help="results folder (default: results/<suite name>)")
    run.add_argument("--methods", metavar="A,B", help="only these methods of the suite")
    run.add_argument("--pairs", metavar="X,Y", help="only these pairs of the suite (source:target)")
    run.add_argument("--seeds", type=int, metavar="N", help="use seeds 0..N-1 instead of the suite's")
    run.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:i (default: auto)")
    run.add_argument("--data-root", metavar="DIR",
                     help="where downloadable datasets live, and where relative paths of a suite's "
                          "[domains.NAME] files are looked up first (default: $DABENCH_DATA, else the "
                          "per-user data folder)")
    run.add_argument("--retry-failed", action="store_true", help="rerun runs stored as failed")
    run.add_argument("--time-limit", type=_positive_seconds, metavar="S",
                     help="per-run wall-time limit in seconds; a run over it is stored as failed "
                          "(default: the suite's time_limit_s, else 14400 = 4 h)")
    run.add_argument("--clear", action="append", metavar="METHOD[:SOURCE:TARGET]",
                     help="clear a suspicion flag after checking the method (repeatable; adds to the suite's "
                          "`cleared` list): its cells are ranked again")
    run.add_argument("--jobs", type=_positive_int, metavar="N",
                     help="runs computed in parallel: N worker processes (local), at most N runs in flight (ray); "
                          "default 1 on CPU, one worker per visible GPU with --device cuda")
    run.add_argument("--threads", type=_positive_int, metavar="N",
                     help="torch threads per run (default: every core serially, cores // jobs in a pool, 1 on Ray); "
                          "results are bit-for-bit reproducible for a given thread count")
    run.add_argument("--executor", choices=["local", "ray"], default="local",
                     help="local (serial or --jobs N processes) or ray (each run a Ray task; pip install dabench[ray])")
    run.add_argument("--address", metavar="ADDR",
                     help="Ray cluster address for --executor ray (default: start a local Ray instance)")
    run.set_defaults(func=cmd_run)

    lb = sub.add_parser("leaderboard", parents=[common], help="render the leaderboard of a results folder")
    lb.add_argument("dir", metavar="DIR", help="a results folder holding runs.sqlite")
    lb.add_argument("--format", choices=["md", "csv", "json", "html"], default="md",
                    help="md, csv, json (every number and flag) or html (self-contained page with plots)")
    lb.add_argument("--out", metavar="FILE", help="write to FILE instead of stdout")
    lb.add_argument("--validator", help="validator for hyperparameter selection (default: the suite's)")
    lb.add_argument("--suite", help="which suite, when the store holds several")
    lb.add_argument("--clear", action="append", metavar="METHOD[:SOURCE:TARGET]",
                    help="clear a suspicion flag after checking the method (repeatable; adds to the list "
                         "`dabench run` recorded): its cells are ranked again")
    lb.set_defaults(func=cmd_leaderboard)

    from .cli_plugin import add_parser as add_plugin_parser

    add_plugin_parser(sub, common)
    from .cli_data import add_parser as add_data_parser

    add_data_parser(sub, [common])
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="dabench: %(levelname)s: %(message)s")
    console = Console()
    try:
        return int(args.func(args, console) or 0)
    except KeyboardInterrupt:
        console.error("interrupted")
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
