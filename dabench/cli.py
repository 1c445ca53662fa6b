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
from pathlib import Path
from typing import Any, Sequence

from . import __version__
from .names import did_you_mean

EXIT_BAD_INPUT = 2
EXIT_HOST_FAILURE = 1


class Parser(argparse.ArgumentParser):
    """argparse with "did you mean" for mistyped choices (commands,
    ``list`` targets, formats) and options; the subcommand parsers are of
    this class too."""

    def _check_value(self, action: argparse.Action, value: Any) -> None:
        if action.choices is not None and value not in action.choices:
            hint = did_you_mean(str(value), [str(c) for c in action.choices])
            choices = ", ".join(repr(c) for c in action.choices)
            raise argparse.ArgumentError(action, f"invalid choice: {value!r}{'; ' + hint if hint else ''} "
                                                 f"(choose from {choices})")
        super()._check_value(action, value)

    def option_strings(self) -> list[str]:
        return [o for a in self._actions for o in a.option_strings if o.startswith("--")]


_DEVICES = ("auto", "cpu", "cuda", "cuda:0")


def _device(text: str) -> str:
    """``--device``: checked for its form here (before torch loads); whether
    this machine has it is checked when the run starts."""
    import re

    name = text.strip().lower()
    if not re.match(r"^(cpu|cuda(:\d+)?|auto)$", name):
        hint = "did you mean 'cuda'?" if name.startswith("gpu") else did_you_mean(name, _DEVICES)
        raise argparse.ArgumentTypeError(f"unknown device {text!r}{'; ' + hint if hint else ''} "
                                         f"(use auto, cpu, cuda or cuda:<index>)")
    return name


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


def plural(n: int, word: str, many: str | None = None) -> str:
    """``1 run``, ``2 runs``, ``0 runs``."""
    return f"{n} {word if n == 1 else (many or word + 's')}"


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
    # what an optional plugin cannot provide here is said once, in `list plugins`
    reg = _registry(args, console)
    what = args.what
    rows: list[dict[str, Any]]
    if what == "methods":
        rows = []
        for name, cls in sorted(reg.methods.items()):
            rows.append({
                "name": name, "family": cls.family, "version": str(cls.version),
                "plugin": reg.owner.get(("method", name), ""),
                "requires": sorted(cls.requires), "track": getattr(cls, "track", "uda"),
                "reference": bool(cls.reference),
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
        from .suite import SuiteError, pair_key, parse_suite

        folder = Path(args.suites_dir)
        rows = []
        for path in sorted(folder.glob("*.toml")):
            try:
                s = parse_suite(path, reg)
                runs = len(s.expand(reg))
                labels = s.pair_labels()
                rows.append({"name": s.name, "path": str(path), "pairs": [labels[pair_key(p)] for p in s.pairs],
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
    for line in _list_lines(what, rows):
        console.out(line)
    return 0


def _columns(table: list[list[str]]) -> list[str]:
    """Rows of cells, left-aligned in columns as wide as their widest cell
    (the last column is not padded)."""
    widths = [max(len(r[i]) for r in table if i < len(r)) for i in range(max(len(r) for r in table))]
    return ["  ".join(c.ljust(widths[i]) if i < len(r) - 1 else c for i, c in enumerate(r)).rstrip() for r in table]


def _unavailable_lines(items: list[dict[str, str]]) -> list[str]:
    """``unavailable here: validators pa-im, pa-bnm: <reason>``, one line per
    reason (a plugin that lacks a dependency says it once, not per item)."""
    by_reason: dict[tuple[str, str], list[str]] = {}
    for u in items:
        by_reason.setdefault((u["kind"], u["reason"]), []).append(u["name"])
    out = []
    for (kind, reason), names in by_reason.items():
        what = "the whole plugin" if kind == "plugin" else f"{kind}{'s' if len(names) > 1 else ''} {', '.join(names)}"
        out.append(f"unavailable here: {what}: {reason}")
    return out


def _list_lines(what: str, rows: list[dict[str, Any]]) -> list[str]:
    errors = [f"{r['name']}  ERROR: {r['error']}" for r in rows if "error" in r]
    rows = [r for r in rows if "error" not in r]
    table: list[list[str]] = []
    extra: dict[int, list[str]] = {}  # lines under a row
    for r in rows:
        if what == "methods":
            table.append([r["name"], r["family"], f"v{r['version']}", f"[{r['plugin']}]",
                          f"requires: {', '.join(r['requires'])}" if r["requires"] else "",
                          f"track: {r['track']}" if r.get("track", "uda") != "uda" else ""])
        elif what == "datasets":
            table.append([r["name"], r["label_space"], f"{r['n_classes']} classes", f"shape {tuple(r['shape'])}",
                          r["description"]])
        elif what == "validators":
            table.append([r["name"], r["paper"]])
        elif what == "plugins":
            table.append([r["name"], r["origin"]])
            extra[len(table) - 1] = _unavailable_lines(r["unavailable"])
        else:
            table.append([r["name"], r["path"], plural(r["runs"], "run"),
                          f"{plural(len(r['pairs']), 'pair')} × {plural(len(r['methods']), 'method')} × "
                          f"{plural(r['seeds'], 'seed')}"])
    lines = _columns(table) if table else []
    indent = " " * (max((len(t[0]) for t in table), default=0) + 2)
    out = []
    for i, line in enumerate(lines):
        out.append(line)
        out += [indent + e for e in extra.get(i, [])]
    return out + errors


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
    from .suitefile import SuiteError, check_filters, outline

    # what the suite file itself names is checked before any plugin (or torch, or NumPy) loads
    try:
        o = outline(args.suite)
        check_filters(o.path, o.methods, o.pairs, _split_list(args.methods), _split_list(args.pairs), args.seeds)
    except SuiteError as e:
        console.error(str(e))
        return EXIT_BAD_INPUT
    from .executors import ExecutorError, make_executor
    from .leaderboard import LeaderboardError, write_reports
    from .suite import pair_key, parse_suite
    from .runner import Runner
    from .store import RunStore, StoreError, canonical_json
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
    if device == "cpu" and executor.name != "ray":
        from .executors import available_cores

        cores, per_run = available_cores(), executor.threads
        if executor.workers * per_run > cores:
            console.warn(f"{plural(executor.workers, 'run')} at once × {plural(per_run, 'thread')} each on "
                         f"{plural(cores, 'usable core')}: the threads oversubscribe the cores, which can make "
                         f"runs many times slower (the default, one single-threaded run per core, does not)")
    results = Path(args.results) if args.results else Path("results") / suite.name
    try:
        store = RunStore(results)
    except (StoreError, OSError) as e:
        console.error(str(e))
        return EXIT_BAD_INPUT
    time_limit = f"; per-run time limit {suite.time_limit_s:g} s"

    serial = executor.name == "serial"

    pair_names, point_names = full.pair_labels(), full.point_labels()

    def label(s: Any) -> str:
        """``digits→mnist [feature_space=native, k_target=3] · dann lambda_max=1 · seed 0``"""
        pair = pair_names.get(pair_key(s.pair), s.pair.name).replace(":", "→", 1)
        return f"{pair} · {point_names.get((s.method, s.point), s.method)} · seed {s.seed}"

    def on_event(kind: str, **ev: Any) -> None:
        if kind == "start":
            console.info(f"dabench {__version__}: suite {suite.name!r} ({suite.path}) on {device}: "
                         f"{plural(ev['total'], 'run')}, {ev['done']} already in {store.path}, {ev['todo']} to do")
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
            console.info(f"[{done + 1}/{todo}] {label(s)} · elapsed {_fmt_time(el)} · remaining {eta}")
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
            console.error(f"{e}; {plural(n, 'run')} safely stored in {store.path}")
        except StoreError:
            console.error(str(e))
        return EXIT_HOST_FAILURE
    except KeyboardInterrupt:
        console.error(f"interrupted; {plural(store.count(), 'run')} safely stored in {store.path}; "
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
    console.info(f"done in {_fmt_time(summary.wall_time_s)}: {plural(summary.ran, 'run')} ({summary.ok} ok, "
                 f"{summary.failed} failed, {summary.skipped} skipped), {summary.already_done} already stored"
                 + (f", {summary.by_others} stored by another dabench run" if summary.by_others else ""))
    if summary.source_models_trained or summary.source_models_reused:
        console.info(f"shared source models: {len(summary.source_models_trained)} trained, "
                     f"{len(summary.source_models_reused)} reused from {results / 'source-models'}")
    for p in paths.values():
        console.info(f"wrote {p}")
    if summary.retried:
        console.warn(f"{plural(summary.retried, 'run')} crashed {'its' if summary.retried == 1 else 'their'} "
                     f"worker and {'was' if summary.retried == 1 else 'were'} retried once")
    if summary.failed:
        one = summary.failed == 1
        console.warn(f"{plural(summary.failed, 'run')} failed; {'its reason is' if one else 'their reasons are'} "
                     f"in the leaderboard; `--retry-failed` reruns {'it' if one else 'them'}")
    code = 0
    if summary.host_errors:
        console.error(f"{plural(summary.host_errors, 'run')} failed for a reason of the host, not of their method "
                      f"(see their reasons, which start with 'host:'); exit code {EXIT_HOST_FAILURE}")
        code = EXIT_HOST_FAILURE
    if summary.no_data:
        console.error(f"{plural(summary.no_data, 'run')} did not run because their data is missing or fails its checks "
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


def _no_store_message(folder: Path) -> str:
    """Why ``dabench leaderboard FOLDER`` has nothing to read, and the one
    command that makes it work.  A committed results folder (``results/quick``
    on a fresh clone) holds the reports but not the run store they were made
    from: the store is a local cache of computed runs, rebuilt by the run."""
    from .store import STORE_NAME

    reports = sorted(p.name for p in folder.glob("leaderboard.*")) if folder.is_dir() else []
    suite_name = None
    md = folder / "leaderboard.md"
    if md.is_file():
        first = md.read_text(encoding="utf-8").partition("\n")[0]
        if first.startswith("# Leaderboard: "):
            suite_name = first[len("# Leaderboard: "):].strip()
    suite_name = suite_name or folder.name
    suite_path = None
    from .suitefile import SuiteError, outline

    for path in sorted(Path("suites").glob("*.toml")):
        try:
            if outline(path).name == suite_name:
                suite_path = path
                break
        except SuiteError:
            continue
    if suite_path is None:
        command = f"dabench run SUITE --results {folder}"
    elif folder.resolve() == (Path("results") / suite_name).resolve():
        command = f"dabench run {suite_path}"
    else:
        command = f"dabench run {suite_path} --results {folder}"
    if reports:
        return (f"{folder} holds the reports ({', '.join(reports)}) but not the run store they are made from "
                f"({STORE_NAME}, not committed): run `{command}` to compute it, then this command works")
    return f"no run store at {folder / STORE_NAME}: run `{command}` first"


def cmd_leaderboard(args: argparse.Namespace, console: Console) -> int:
    from .store import STORE_NAME

    folder = Path(args.dir)
    if not (folder / STORE_NAME).is_file():
        console.error(_no_store_message(folder))
        return EXIT_BAD_INPUT
    from .leaderboard import LeaderboardError, build_leaderboard, render
    from .store import RunStore, StoreError

    try:
        with RunStore.open_readonly(args.dir) as st:
            stored = st.get_meta("validator")
            stored_cleared = st.get_meta("cleared")
    except StoreError as e:
        console.error(str(e))
        return EXIT_BAD_INPUT
    validator = args.validator or stored or "source-val"
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
    out = args.out
    if out is None and args.format == "html":
        # a page is for a browser, not the terminal: next to the store
        tag = "".join(f"-{x}" for x in (args.suite, args.validator if args.validator != stored else None) if x)
        out = folder / f"leaderboard{tag}.html"
    if out is not None:
        try:
            Path(out).write_text(text, encoding="utf-8")
        except OSError as e:
            console.error(f"cannot write {out}: {e}" + ("; pass --out PATH to write it elsewhere" if args.out is None else ""))
            return EXIT_HOST_FAILURE
        console.info(f"wrote {out}")
    else:
        console.out(text.rstrip("\n"))
    return 0


# ------------------------------------------------------------------ main


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="dabench", description="Benchmark domain adaptation methods honestly.")
    p.add_argument("--version", action="version", version=f"dabench {__version__}")
    common = Parser(add_help=False)
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
    run.add_argument("--device", default="auto", type=_device, help="auto, cpu, cuda or cuda:i (default: auto)")
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
                          "default on CPU: one per usable core (serial on one core), one worker per visible GPU "
                          "with --device cuda")
    run.add_argument("--threads", type=_positive_int, metavar="N",
                     help="torch (and BLAS/OpenMP) threads per run, default 1 whatever the executor; results are "
                          "bit-for-bit reproducible for a given thread count, and the report states it")
    run.add_argument("--executor", choices=["local", "ray"], default="local",
                     help="local (serial or --jobs N processes) or ray (each run a Ray task; pip install dabench[ray])")
    run.add_argument("--address", metavar="ADDR",
                     help="Ray cluster address for --executor ray (default: start a local Ray instance)")
    run.set_defaults(func=cmd_run)

    lb = sub.add_parser("leaderboard", parents=[common], help="render the leaderboard of a results folder")
    lb.add_argument("dir", metavar="DIR", help="a results folder holding runs.sqlite")
    lb.add_argument("--format", choices=["md", "csv", "json", "html"], default="md",
                    help="md, csv, json (every number and flag) or html (self-contained page with plots)")
    lb.add_argument("--out", metavar="FILE",
                    help="write to FILE instead of stdout (html: default DIR/leaderboard.html)")
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


def _parse(parser: Parser, argv: Sequence[str] | None) -> argparse.Namespace:
    """``parser.parse_args`` with "did you mean" for a mistyped option."""
    args, extra = parser.parse_known_args(argv)
    if extra:
        sub = _subparser(parser, getattr(args, "command", None), getattr(args, "data_command", None),
                         getattr(args, "plugin_command", None))
        msgs = []
        for word in extra:
            hint = did_you_mean(word.split("=", 1)[0], sub.option_strings()) if word.startswith("--") else ""
            msgs.append(f"{word}{' (' + hint + ')' if hint else ''}")
        sub.error(f"unrecognized arguments: {' '.join(msgs)}")
    return args


def _subparser(parser: Parser, *path: str | None) -> Parser:
    """The (sub)parser of the command path ``("data", "list")``."""
    for name in path:
        if name is None:
            break
        actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not actions or name not in actions[0].choices:
            break
        parser = actions[0].choices[name]
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = _parse(parser, argv)
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
