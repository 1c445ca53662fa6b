"""`dabench plugin new|check`, and contract versioning at plugin load time."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import TINY_SUITE, run_cli, write
from dabench.contract import CONTRACT_REVISION, CONTRACT_VERSION, contract_mismatch
from dabench.plugins import get_registry


def test_new_plugin_installs_lists_checks_and_runs_in_a_suite(tmp_path):
    """The bar: `dabench plugin new`, installed into a fresh location, shows in
    `dabench list methods`, passes `dabench plugin check` and its own kit
    test, and runs in a suite."""
    new = run_cli("plugin", "new", "ent-min", "--dir", str(tmp_path))
    assert new.returncode == 0, new.stderr
    project = tmp_path / "dabench-ent-min"
    assert {p.name for p in project.iterdir()} >= {"pyproject.toml", "README.md", "dabench_ent_min", "tests"}

    site = tmp_path / "site"
    pip = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--target", str(site), str(project)], capture_output=True, text=True, timeout=300)
    assert pip.returncode == 0, pip.stderr
    # one torch thread: the tiny runs below are faster than on a contended pool
    env = {"PYTHONPATH": str(site) + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}

    assert "ent-min" not in {m["name"] for m in json.loads(run_cli("list", "methods", "--json").stdout)}
    listed = run_cli("list", "methods", "--json", env=env)
    assert listed.returncode == 0, listed.stderr
    rows = {m["name"]: m for m in json.loads(listed.stdout)}
    assert rows["ent-min"]["plugin"] == "ent-min" and rows["ent-min"]["family"] == "self-training"

    check = run_cli("plugin", "check", "ent-min", env=env)
    assert check.returncode == 0, check.stdout + check.stderr
    lines = [l for l in check.stdout.splitlines() if l.startswith(("PASS", "FAIL", "SKIP"))]
    from dabench.testing import CHECKS

    assert len(lines) == len(CHECKS) and not any(l.startswith("FAIL") for l in lines), check.stdout
    assert any(l.startswith("PASS  ent-min  check_determinism") for l in lines)

    # the generated test is the kit, one pytest test per check (ids end with the check name for -k)
    e = dict(os.environ, **env)
    test = subprocess.run([sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", str(project / "tests")],
                          capture_output=True, text=True, env=e, cwd=tmp_path, timeout=600)
    assert test.returncode == 0, test.stdout + test.stderr
    assert "test_dabench_conformance[ent-min-check_determinism] PASSED" in test.stdout, test.stdout
    n = len(CHECKS)
    assert f" {n - 1} passed, 1 skipped" in test.stdout or f" {n} passed" in test.stdout, test.stdout

    suite = write(tmp_path / "s.toml", TINY_SUITE.replace("[methods.dann]", "[methods.ent-min]"))
    run = run_cli("run", str(suite), "--results", str(tmp_path / "res"), "--device", "cpu", "--methods", "ent-min",
                  env=env)
    assert run.returncode == 0, run.stderr
    from dabench.store import RunStore

    with RunStore(tmp_path / "res") as st:
        mine = [r for r in st.rows() if r["method"] == "ent-min"]
    assert len(mine) == 2 and all(r["status"] == "ok" and r["target_acc"] > 0.5 for r in mine)


def test_check_reports_failures_with_what_to_change_and_exit_1(tmp_path):
    d = tmp_path / "plugs"
    write(d / "sloppy.py", """
        import numpy as np
        from dabench import Float, Method, hookimpl

        class Sloppy(Method):
            name = "sloppy"
            hyperparameters = {"t": Float(1.0, 0.1, 10.0)}
            def fit(self, task):
                task.source_train.X
                rng = np.random.default_rng()
                class P:
                    def predict_proba(self, X, domain="target"):
                        z = rng.uniform(size=(len(X), task.n_classes))
                        return z / z.sum(1, keepdims=True)
                    def embed(self, X, domain="target"):
                        return np.asarray(X)
                return P()

        @hookimpl
        def dabench_methods(register):
            register(Sloppy)
        """)
    write(d / "broken.py", "import no_such_module_xyz\n")
    r = run_cli("plugin", "check", str(d), "--checks", "check_fit_predict,check_determinism")
    assert r.returncode == 1, r.stdout + r.stderr
    out = r.stdout
    assert "PASS  sloppy  check_fit_predict" in out
    assert "FAIL  sloppy  check_determinism" in out and "derive every random stream from task.seed" in out
    assert "FAIL  plugin 'broken'" in out and "no_such_module_xyz" in out
    assert "Traceback" not in r.stderr

    single = run_cli("plugin", "check", str(d / "sloppy.py"), "--checks", "check_hyperparameters")
    assert single.returncode == 0 and "PASS  sloppy  check_hyperparameters" in single.stdout

    bad = run_cli("plugin", "check", "no-such-method")
    assert bad.returncode == 2 and "neither a file or folder nor a registered method" in bad.stderr
    bad = run_cli("plugin", "check", "dann", "--checks", "check_speed")
    assert bad.returncode == 2 and "unknown ['check_speed']" in bad.stderr


def test_new_refuses_bad_names_and_existing_projects(tmp_path):
    r = run_cli("plugin", "new", "My Method", "--dir", str(tmp_path))
    assert r.returncode == 2 and "not a valid method name" in r.stderr
    assert run_cli("plugin", "new", "abc", "--dir", str(tmp_path)).returncode == 0
    again = run_cli("plugin", "new", "abc", "--dir", str(tmp_path))
    assert again.returncode == 2 and "exists and is not empty" in again.stderr


# ---------------------------------------------------------------- versioning


def test_contract_compatibility_rules():
    assert contract_mismatch(CONTRACT_VERSION) is None
    assert contract_mismatch(f"{CONTRACT_VERSION}.{CONTRACT_REVISION}") is None
    assert "upgrade dabench" in contract_mismatch(f"{CONTRACT_VERSION}.{CONTRACT_REVISION + 1}")
    future = str(int(CONTRACT_VERSION) + 1)
    assert f"written for dabench contract {future}" in contract_mismatch(future)
    assert "not a version like" in contract_mismatch("one")


def test_incompatible_plugins_get_a_clear_error_at_load_time_naming_them(tmp_path):
    future = str(int(CONTRACT_VERSION) + 1)
    d = tmp_path / "plugs"
    write(d / "from_the_future.py", f"""
        from dabench import Method, hookimpl
        dabench_contract = "{future}"
        raise RuntimeError("a skipped plugin must not register anything")
        """.replace('raise RuntimeError("a skipped plugin must not register anything")', "LOADED = True"))
    write(d / "needs_newer.py", f"""
        import numpy as np
        from dabench import Method, hookimpl

        class Newer(Method):
            name = "needs-newer"
            requires_contract = "{CONTRACT_VERSION}.{CONTRACT_REVISION + 1}"
            def fit(self, task):
                raise NotImplementedError

        @hookimpl
        def dabench_methods(register):
            register(Newer)
        """)
    write(d / "current.py", f"""
        from dabench import hookimpl
        from dabench_plugins.source_only import SourceOnly
        dabench_contract = "{CONTRACT_VERSION}"

        class Current(SourceOnly):
            name = "current-contract"

        @hookimpl
        def dabench_methods(register):
            register(Current)
        """)
    reg = get_registry(plugins_dir=d)
    msgs = {e.plugin: e.message for e in reg.errors}
    assert f"written for dabench contract {future}" in msgs["from_the_future"]
    assert "it was skipped" in msgs["from_the_future"]
    assert "from_the_future" not in reg.plugins
    assert "method 'needs-newer' needs dabench contract" in msgs["needs_newer"] and "upgrade dabench" in msgs["needs_newer"]
    assert "needs-newer" not in reg.methods and "current-contract" in reg.methods

    r = run_cli("list", "methods", "--plugins-dir", str(d))
    assert r.returncode == 0 and "current-contract" in r.stdout
    assert f"dabench: warning: plugin 'from_the_future': " in r.stderr
    assert "Traceback" not in r.stderr
    chk = run_cli("plugin", "check", str(d / "from_the_future.py"))
    assert chk.returncode == 1 and f"written for dabench contract {future}" in chk.stdout
