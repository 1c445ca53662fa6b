"""``dabench plugin``: commands for plugin authors.

    dabench plugin check NAME|PATH [--checks a,b] [--json]
    dabench plugin new NAME [--dir DIR] [--force]

``check`` runs the conformance kit (:mod:`dabench.testing`) on a registered
method, every method of a registered plugin, a plugin file (``.py``), a
folder of plugin files, a package folder, or a plugin project folder (one
with a ``pyproject.toml`` declaring ``dabench`` entry points: checked before
it is installed).  One line per check: PASS, SKIP (with why) or FAIL (with
what to change); exit code 1 when anything fails, 2 when TARGET is unknown.

``new`` writes a ready plugin project: ``pyproject.toml`` with the entry
point, the package with a working method, a test calling the kit, a README.
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import sys
import textwrap
import tomllib
from pathlib import Path
from types import ModuleType
from typing import Any

EXIT_FAIL = 1
EXIT_BAD_INPUT = 2


def add_parser(subparsers: Any, common: argparse.ArgumentParser) -> None:
    """Add the ``plugin`` command group to the CLI's subparsers."""
    p = subparsers.add_parser("plugin", help="plugin authoring: check a plugin, scaffold a new one")
    sub = p.add_subparsers(dest="plugin_command", required=True, metavar="SUBCOMMAND")

    chk = sub.add_parser("check", parents=[common], help="run the conformance kit on a method or plugin")
    chk.add_argument("target", metavar="NAME|PATH",
                     help="a method or plugin name, a plugin .py file, a folder, or a plugin project folder")
    chk.add_argument("--checks", metavar="A,B", help="only these checks (default: all)")
    chk.add_argument("--json", action="store_true", help="machine-readable results")
    chk.set_defaults(func=cmd_check)

    new = sub.add_parser("new", parents=[common], help="write a ready plugin package")
    new.add_argument("name", metavar="NAME", help="the method name, lower-case with dashes (e.g. my-method)")
    new.add_argument("--dir", default=".", metavar="DIR", help="where to create dabench-NAME/ (default: .)")
    new.add_argument("--force", action="store_true", help="overwrite files of an existing project folder")
    new.set_defaults(func=cmd_new)


# ------------------------------------------------------------------ check


class _TargetError(Exception):
    pass


def _import_project(folder: Path) -> list[tuple[str, ModuleType]]:
    """Import the modules a project's pyproject.toml lists as dabench entry points."""
    try:
        meta = tomllib.loads((folder / "pyproject.toml").read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise _TargetError(f"{folder / 'pyproject.toml'}: {e}") from None
    eps = meta.get("project", {}).get("entry-points", {}).get("dabench", {})
    if not eps:
        raise _TargetError(f"{folder / 'pyproject.toml'} declares no [project.entry-points.dabench]; "
                           'add e.g. my-method = "my_package"')
    roots = [folder / "src", folder]
    for r in reversed(roots):
        if r.is_dir() and str(r) not in sys.path:
            sys.path.insert(0, str(r))
    out = []
    for name, value in sorted(eps.items()):
        modname = str(value).split(":")[0]
        out.append((name, importlib.import_module(modname)))
    return out


def _load_target(target: str, args: argparse.Namespace,
                 console: Any) -> tuple[list[tuple[type, ModuleType | None]], list[str], list[str]]:
    """``[(method class, plugin module)]``, plugin-level error lines and
    notes (what a plugin says is unavailable here) for TARGET."""
    from .plugins import (
        PluginError,
        _module_from_path,
        build_registry,
        check_plugin_contract,
        get_plugin_manager,
        get_registry,
    )

    path = Path(target)
    if path.exists():
        modules: list[tuple[str, ModuleType]] = []
        errors: list[str] = []
        try:
            if path.is_file():
                if path.suffix != ".py":
                    raise _TargetError(f"{path} is not a .py file")
                modules.append((path.stem, _module_from_path(path)))
            elif (path / "pyproject.toml").is_file():
                modules += _import_project(path)
            elif (path / "__init__.py").is_file():
                sys.path.insert(0, str(path.resolve().parent))
                modules.append((path.name, importlib.import_module(path.name)))
            else:
                files = sorted(p for p in path.glob("*.py") if not p.name.startswith("_"))
                if not files:
                    raise _TargetError(f"{path} holds no .py plugin files")
                for f in files:
                    try:
                        modules.append((f.stem, _module_from_path(f)))
                    except Exception as exc:
                        errors.append(str(PluginError(f.stem, f"failed to import {f}: {type(exc).__name__}: {exc}")))
        except _TargetError:
            raise
        except Exception as exc:
            raise _TargetError(f"cannot import {path}: {type(exc).__name__}: {exc}") from None
        found: list[tuple[type, ModuleType | None]] = []
        notes: list[str] = []
        for name, mod in modules:
            mismatch = check_plugin_contract(mod)
            if mismatch:
                errors.append(str(PluginError(name, mismatch)))
                continue
            pm = get_plugin_manager(entrypoints=False)
            try:
                pm.register(mod, name=name)
            except Exception as exc:
                errors.append(str(PluginError(name, f"pluggy refuses it: {exc}")))
                continue
            reg = build_registry(pm)
            errors += [str(e) for e in reg.errors]
            notes += [str(u) for u in reg.unavailable]
            found += [(cls, mod) for _, cls in sorted(reg.methods.items())]
        return found, errors, notes

    reg = get_registry(plugins_dir=getattr(args, "plugins_dir", None))
    if target in reg.methods:
        owner = reg.owner.get(("method", target))
        plugin = reg.pm.get_plugin(owner) if reg.pm and owner else None
        return [(reg.methods[target], plugin if isinstance(plugin, ModuleType) else None)], [], []
    if target in reg.plugins:
        info = reg.plugins[target]
        plugin = reg.pm.get_plugin(target) if reg.pm else None
        errs = [str(e) for e in reg.errors if e.plugin == target]
        notes = [str(u) for u in reg.unavailable if u.plugin == target]
        return [(reg.methods[m], plugin if isinstance(plugin, ModuleType) else None) for m in info.methods], errs, notes
    errs = [str(e) for e in reg.errors if e.plugin == target]
    if errs:
        return [], errs, []
    raise _TargetError(f"{target!r} is neither a file or folder nor a registered method or plugin; "
                       f"methods: {', '.join(sorted(reg.methods))}")


def cmd_check(args: argparse.Namespace, console: Any) -> int:
    from .testing import CHECKS, run_checks

    checks = None
    if args.checks:
        checks = [c.strip() for c in args.checks.split(",") if c.strip()]
        known = [n for n, _ in CHECKS]
        bad = [c for c in checks if c not in known]
        if bad:
            console.error(f"--checks: unknown {bad}; checks: {', '.join(known)}")
            return EXIT_BAD_INPUT
    try:
        methods, errors, notes = _load_target(args.target, args, console)
    except _TargetError as e:
        console.error(str(e))
        return EXIT_BAD_INPUT
    rows: list[dict[str, Any]] = []
    for line in errors:
        console.out(f"FAIL  {line}")
    for line in notes:
        console.out(f"SKIP  {line}")
    if not methods and not errors and not notes:
        console.out(f"FAIL  {args.target}: registers no method; add a @hookimpl dabench_methods(register) "
                    "that calls register(YourMethod)")
        return EXIT_FAIL
    failed = bool(errors) or not methods
    counts = {"PASS": 0, "FAIL": 0, "SKIP": 0}
    for cls, plugin in methods:
        console.info(f"checking {cls.name} ({cls.__module__}.{cls.__name__}) ...")
        results = run_checks(cls, checks=checks, plugin=plugin)
        width = max(len(r.check) for r in results)
        for r in results:
            counts[r.status] += 1
            first, *rest = (r.message or "").splitlines() or [""]
            console.out(f"{r.status:<4}  {r.method}  {r.check:<{width}}  {first}")
            for extra in rest:
                console.out(f"      {extra}")
            rows.append({"method": r.method, "check": r.check, "status": r.status, "message": r.message})
        failed = failed or any(r.status == "FAIL" for r in results)
    if args.json:
        console.out(json.dumps({"results": rows, "errors": errors, "unavailable": notes}, indent=2))
    console.out(f"{len(methods)} method(s): {counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped"
                + (f", {len(errors)} plugin problem(s)" if errors else "")
                + (f", {len(notes)} unavailable here" if notes else ""))
    return EXIT_FAIL if failed else 0


# ------------------------------------------------------------------ new

_NAME_RE = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")


def scaffold(name: str, folder: Path, force: bool = False) -> list[Path]:
    """Write the plugin project ``folder/dabench-<name>``; return the files written."""
    if not _NAME_RE.match(name):
        raise ValueError(f"{name!r} is not a valid method name: use lower-case letters, digits and single dashes, "
                         "starting with a letter (e.g. my-method)")
    pkg = "dabench_" + name.replace("-", "_")
    cls = "".join(part.capitalize() for part in name.split("-"))
    if not cls[0].isalpha():
        cls = "M" + cls
    root = folder / f"dabench-{name}"
    if root.exists() and any(root.iterdir()) and not force:
        raise FileExistsError(f"{root} exists and is not empty; choose another --dir or pass --force")
    from .contract import CONTRACT_VERSION  # not at the top: the CLI parser loads this module, NumPy stays unloaded

    subs = {"NAME": name, "PKG": pkg, "CLS": cls, "CONTRACT": CONTRACT_VERSION}
    files = {
        root / "pyproject.toml": _PYPROJECT,
        root / pkg / "__init__.py": _MODULE,
        root / "tests" / "test_conformance.py": _TEST,
        root / "README.md": _README,
    }
    written = []
    for path, template in files.items():
        text = template
        for k, v in subs.items():
            text = text.replace("{{" + k + "}}", v)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip(), encoding="utf-8")
        written.append(path)
    return written


def cmd_new(args: argparse.Namespace, console: Any) -> int:
    try:
        files = scaffold(args.name, Path(args.dir), force=args.force)
    except (ValueError, FileExistsError, OSError) as e:
        console.error(str(e))
        return EXIT_BAD_INPUT
    root = files[0].parent
    for f in files:
        console.info(f"wrote {f}")
    console.info(textwrap.dedent(f"""
        next steps:
          pip install -e {root}            # the method appears in `dabench list methods`
          dabench plugin check {args.name}
          python -m pytest {root / 'tests'}""").rstrip())
    return 0


_PYPROJECT = '''
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "dabench-{{NAME}}"
version = "0.1.0"
description = "The {{NAME}} domain adaptation method as a dabench plugin."
readme = "README.md"
requires-python = ">=3.11"
dependencies = ["dabench>=0.1", "torch>=2.2"]

[project.optional-dependencies]
test = ["pytest>=8"]

# dabench finds the plugin through this entry-point group.
[project.entry-points.dabench]
{{NAME}} = "{{PKG}}"

[tool.setuptools]
packages = ["{{PKG}}"]
'''

_MODULE = '''
"""{{NAME}}: a dabench method plugin.

Generated by ``dabench plugin new {{NAME}}`` as a working starting point:
entropy minimisation (Grandvalet & Bengio, "Semi-supervised Learning by
Entropy Minimization", NeurIPS 2004), used for domain adaptation as in
e.g. Long et al. (RTN, NeurIPS 2016): the shared network (``task.backbone``
plus a linear classifier) minimises the cross-entropy on labelled source
batches plus ``entropy_weight`` times the mean prediction entropy on
unlabelled target batches, pushing target decision boundaries away from
dense target regions.  Optimiser and schedule: SGD with momentum 0.9 and
DANN's annealed learning rate (Ganin et al. 2016).

Replace ``fit`` with your method; keep the docstring saying which paper and
which choices you follow.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from dabench import Float, Method, Task, hookimpl
from dabench.training import (
    CHECK_EVERY,
    TensorBatches,
    TorchPredictor,
    annealed_lr,
    check_finite,
    make_sgd,
    progress,
    resolve_device,
    seed_everything,
    set_lr,
    stream_seed,
)

#: The dabench contract this plugin was written for (checked at load time).
dabench_contract = "{{CONTRACT}}"


class {{CLS}}(Method):
    """Source cross-entropy plus target entropy minimisation."""

    name = "{{NAME}}"
    family = "self-training"
    version = "1"  # bump when a change alters results (it enters the run key)
    requires = frozenset({"same_feature_space"})
    paper = "Grandvalet & Bengio, Semi-supervised Learning by Entropy Minimization, NeurIPS 2004"
    hyperparameters = {
        "lr": Float(0.01, 1e-3, 0.1, log=True, help="initial SGD learning rate (annealed)"),
        "weight_decay": Float(5e-4, 1e-6, 1e-2, log=True, help="L2 weight decay"),
        "entropy_weight": Float(0.1, 0.0, 1.0, help="weight of the target entropy term"),
    }

    def fit(self, task: Task) -> TorchPredictor:
        seed_everything(task.seed)
        device = resolve_device(task.device)
        encoder, dim = task.backbone(task.source_shape)
        classifier = nn.Linear(dim, task.n_classes)
        encoder.to(device).train()
        classifier.to(device).train()
        opt = make_sgd(list(encoder.parameters()) + list(classifier.parameters()),
                       lr=self.lr, momentum=0.9, weight_decay=self.weight_decay)
        bs = task.budget.batch_size
        src = TensorBatches(task.source_train.X, task.source_train.y, batch_size=bs,
                            device=device, seed=stream_seed(task.seed, 1))
        tgt = TensorBatches(task.target_train.X, batch_size=bs, device=device,
                            seed=stream_seed(task.seed, 2))
        steps = task.budget.steps
        loss = torch.zeros(())
        for step in range(steps):
            set_lr(opt, annealed_lr(progress(step, steps), self.lr))
            s, t = src.next(), tgt.next()
            ce = F.cross_entropy(classifier(encoder(s.x)), s.y)
            log_p = F.log_softmax(classifier(encoder(t.x)), dim=1)
            entropy = -(log_p.exp() * log_p).sum(1).mean()
            loss = ce + self.entropy_weight * entropy
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            check_finite(loss, step, every=CHECK_EVERY)
        check_finite(loss, steps)
        return TorchPredictor(encoder, classifier, device)


@hookimpl
def dabench_methods(register) -> None:  # type: ignore[no-untyped-def]
    register({{CLS}})
'''

_TEST = '''
"""The dabench conformance kit: one test per check.

    python -m pytest tests/                       # every check
    python -m pytest tests/ -k check_determinism  # one check
"""

import {{PKG}}
from {{PKG}} import {{CLS}}

from dabench.testing import parametrize_with_checks


@parametrize_with_checks([{{CLS}}], plugin={{PKG}})
def test_dabench_conformance(method, check):
    check(method)
'''

_README = '''
# dabench-{{NAME}}

The `{{NAME}}` method as a [dabench](https://github.com/) plugin.

```sh
pip install -e .                       # registers the `dabench` entry point
dabench list methods                   # shows {{NAME}}
dabench plugin check {{NAME}}          # the conformance kit, one line per check
python -m pytest tests/                # the same kit as pytest tests
```

Use it in a suite:

```toml
[methods.{{NAME}}]
grid = { entropy_weight = [0.03, 0.1, 0.3] }
```

`{{PKG}}/__init__.py` holds the method (entropy minimisation, Grandvalet &
Bengio 2004, as a starting point). Bump `version` when a change alters
results; `dabench_contract` names the dabench contract the plugin was written
for. The plugin author's guide is `docs/plugin-guide.md` in dabench.
'''
