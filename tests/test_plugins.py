"""Plugin discovery: entry points (built-in and third-party), --plugins-dir, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, TINY_SUITE, run_cli, write
from dabench.plugins import get_registry

BUILTIN_METHODS = {"source-only", "target-oracle", "dann"}


def test_builtins_come_from_the_entry_point_group(registry):
    assert BUILTIN_METHODS <= set(registry.methods)
    assert {"moons", "moons-rot35", "digits", "mnist", "mnistm"} <= set(registry.datasets)
    assert "source-val" in registry.validators and "default" in registry.backbones
    for m in BUILTIN_METHODS:
        origin = registry.plugins[registry.owner[("method", m)]].origin
        assert origin.startswith("entry point dabench_plugins."), origin
    assert registry.errors == []


def test_disable_plugins_env(monkeypatch):
    monkeypatch.setenv("DABENCH_DISABLE_PLUGINS", "dann, target-oracle")
    reg = get_registry()
    assert "dann" not in reg.methods and "target-oracle" not in reg.methods and "source-only" in reg.methods


@pytest.fixture()
def messy_plugins_dir(tmp_path):
    d = tmp_path / "plugins"
    write(d / "good.py", """
        import numpy as np
        from dabench import Method, Float, hookimpl

        class Prior(Method):
            '''Predicts the source class prior (a trivial but real baseline).'''
            name = "class-prior"
            family = "baseline"
            hyperparameters = {"smooth": Float(1.0, 0.0, 10.0)}
            def fit(self, task):
                counts = np.bincount(task.source_train.y, minlength=task.n_classes) + self.smooth
                p = counts / counts.sum()
                class P:
                    def predict_proba(self, X, domain="target"):
                        return np.tile(p, (len(X), 1))
                    def embed(self, X, domain="target"):
                        return np.asarray(X)
                return P()

        @hookimpl
        def dabench_methods(register):
            register(Prior)
        """)
    write(d / "broken.py", "import no_such_module_anywhere\n")
    write(d / "invalid.py", """
        from dabench import Method, hookimpl
        class NoFit(Method):
            name = "no-fit"
        @hookimpl
        def dabench_methods(register):
            register(NoFit)
        """)
    write(d / "dup.py", """
        from dabench import hookimpl
        from dabench_plugins.source_only import SourceOnly
        class Again(SourceOnly):
            pass
        @hookimpl
        def dabench_methods(register):
            register(Again)
        """)
    return d


def test_plugins_dir_errors_are_one_line_each_and_isolated(messy_plugins_dir):
    reg = get_registry(plugins_dir=messy_plugins_dir)
    assert "class-prior" in reg.methods and BUILTIN_METHODS <= set(reg.methods)
    msgs = {e.plugin: str(e) for e in reg.errors}
    assert set(msgs) == {"broken", "invalid", "dup"}
    assert "no_such_module_anywhere" in msgs["broken"]
    assert "does not implement fit" in msgs["invalid"]
    assert "already registered by plugin 'source-only'" in msgs["dup"]
    assert all("\n" not in m for m in msgs.values())


def test_cli_lists_methods_with_warnings_for_broken_plugins(messy_plugins_dir):
    r = run_cli("list", "methods", "--plugins-dir", str(messy_plugins_dir))
    assert r.returncode == 0, r.stderr
    assert "class-prior" in r.stdout and "dann" in r.stdout
    warn = [l for l in r.stderr.splitlines() if l.startswith("dabench: warning: plugin")]
    # one line per broken plugin in the folder (an optional built-in such as
    # the pytorch-adapt bridge may add its own "unavailable" line where its
    # extra is not installed; that one is not counted here)
    messy = [l for l in warn if l.split("'")[1] in {"broken", "invalid", "dup"}]
    assert len(messy) == 3, r.stderr
    assert sorted(l.split("'")[1] for l in messy) == ["broken", "dup", "invalid"]
    assert "Traceback" not in r.stderr


def test_third_party_package_is_found_only_through_its_entry_point(tmp_path):
    """Install tests/toy_plugin (a separate distribution) into a temporary
    site folder; the host finds it through the `dabench` entry-point group."""
    site = tmp_path / "site"
    pip = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--target", str(site), str(ROOT / "tests" / "toy_plugin")],
        capture_output=True, text=True, timeout=300)
    assert pip.returncode == 0, pip.stderr
    assert list(site.glob("dabench_toy-*.dist-info"))
    env = {"PYTHONPATH": str(site) + os.pathsep + os.environ.get("PYTHONPATH", "")}

    before = json.loads(run_cli("list", "methods", "--json").stdout)
    assert "toy-centroid" not in {m["name"] for m in before}
    after = run_cli("list", "methods", "--json", env=env)
    assert after.returncode == 0, after.stderr
    rows = {m["name"]: m for m in json.loads(after.stdout)}
    assert rows["toy-centroid"]["plugin"] == "toy"

    suite = write(tmp_path / "toy.toml", TINY_SUITE.replace("[methods.dann]", "[methods.toy-centroid]"))
    run = run_cli("run", str(suite), "--results", str(tmp_path / "res"), "--device", "cpu", env=env)
    assert run.returncode == 0, run.stderr
    from dabench.store import RunStore

    rows = RunStore(tmp_path / "res").rows()
    toy = [r for r in rows if r["method"] == "toy-centroid"]
    assert len(toy) == 2 and all(r["status"] == "ok" for r in toy)
