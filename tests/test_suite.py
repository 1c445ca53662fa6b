"""Suite files: schema validation errors and expansion into runs."""

from __future__ import annotations

import pytest

from conftest import ROOT, TINY_SUITE, run_cli, write
from dabench.suite import SuiteError, parse_suite

BAD = {
    "unknown_method": (TINY_SUITE + "[methods.no-such-method]\n", "methods.no-such-method", "unknown method"),
    "missing_pairs": (TINY_SUITE.replace('pairs = ["moons:moons-rot35"]\n', ""), "pairs", "missing"),
    "missing_name": (TINY_SUITE.replace('name = "tiny"\n', ""), "name", "missing"),
    "wrong_type": (TINY_SUITE.replace("seeds = 2", 'seeds = "two"'), "seeds", "expected a positive integer"),
    "wrong_type_budget": (TINY_SUITE.replace("steps = 60", "steps = 6.5"), "budget.steps", "expected a positive integer"),
    "unknown_pair": (TINY_SUITE.replace("moons-rot35", "moons-rot90"), "pairs[0]", "unknown target dataset 'moons-rot90'"),
    "bad_pair_syntax": (TINY_SUITE.replace("moons:moons-rot35", "moons-to-moons"), "pairs[0]", '"source:target"'),
    "label_spaces": (TINY_SUITE.replace("moons:moons-rot35", "moons:mnist"), "pairs[0]", "different label spaces"),
    "unknown_key": (TINY_SUITE + "\n[protocol]\nk_targets = 1\n", "protocol.k_targets", "unknown key"),
    "unknown_hparam": (TINY_SUITE + "params = { no_such = 1.0 }\n", "methods.dann.params.no_such", "no such hyperparameter"),
    "out_of_range": (TINY_SUITE + "params = { lr = -1.0 }\n", "methods.dann", "below its range"),
    "bad_toml": ("name = \n", "", "not valid TOML"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_malformed_suite_errors_name_file_and_key(registry, tmp_path, case):
    text, key, expected = BAD[case]
    path = write(tmp_path / f"{case}.toml", text)
    with pytest.raises(SuiteError) as ei:
        parse_suite(path, registry)
    msg = str(ei.value)
    assert str(path) in msg and expected in msg
    assert ei.value.key == key


@pytest.mark.parametrize("case", ["unknown_method", "wrong_type", "unknown_pair", "missing_pairs"])
def test_cli_exits_2_without_traceback_on_bad_suite(tmp_path, case):
    text, key, expected = BAD[case]
    path = write(tmp_path / f"{case}.toml", text)
    r = run_cli("run", str(path), "--results", str(tmp_path / "res"))
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert str(path) in r.stderr and key in r.stderr and expected in r.stderr
    assert not (tmp_path / "res" / "runs.sqlite").exists(), "a bad suite must not touch the store"


def test_expansion_grid_random_and_keys(registry, tmp_path):
    path = write(tmp_path / "s.toml", TINY_SUITE + 'grid = { lambda_max = [0.5, 1.0] }\n'
                 + '[methods.target-oracle]\nrandom = { n = 3, seed = 7 }\n')
    s = parse_suite(path, registry)
    specs = s.expand(registry)
    by_method = {}
    for sp in specs:
        by_method.setdefault(sp.method, set()).add(sp.point)
    assert by_method == {"source-only": {0}, "dann": {0, 1}, "target-oracle": {0, 1, 2}}
    assert len(specs) == 2 * (1 + 2 + 3)
    keys = [sp.key for sp in specs]
    assert len(set(keys)) == len(keys)
    # deterministic: parsing again gives the same keys (random points are seeded)
    assert [sp.key for sp in parse_suite(path, registry).expand(registry)] == keys
    # the key changes with what changes a result, not with the suite's name
    renamed = write(tmp_path / "t.toml", path.read_text().replace('name = "tiny"', 'name = "other"'))
    assert [sp.key for sp in parse_suite(renamed, registry).expand(registry)] == keys
    longer = write(tmp_path / "u.toml", path.read_text().replace("steps = 60", "steps = 61"))
    assert not set(sp.key for sp in parse_suite(longer, registry).expand(registry)) & set(keys)


def test_restrict_filters_and_rejects_unknown(registry, tmp_path):
    s = parse_suite(write(tmp_path / "s.toml", TINY_SUITE), registry)
    r = s.restrict(methods=["dann"], seeds=1)
    assert [m.name for m in r.methods] == ["dann"] and r.seeds == [0]
    with pytest.raises(SuiteError, match="'digits:mnist' is not a pair of this suite"):
        s.restrict(pairs=["digits:mnist"])
    # a pair as progress lines and reports print it is accepted
    assert [p.name for p in s.restrict(pairs=["moons→moons-rot35"]).pairs] == ["moons:moons-rot35"]


# ------------------------------------------------------------------ typos

TYPOS = {
    # suite text edit, key in the message, the suggestion it must make
    "method": (TINY_SUITE.replace("[methods.dann]", "[methods.dnn]"), "methods.dnn", "did you mean 'dann'?"),
    "dataset": (TINY_SUITE.replace("moons-rot35", "moons-rot53"), "pairs[0]", "did you mean 'moons-rot35'?"),
    "validator": (TINY_SUITE.replace('name = "tiny"', 'name = "tiny"\nvalidator = "entropi"'), "validator",
                  "did you mean 'entropy'?"),
    "hyperparameter": (TINY_SUITE + "params = { lamda_max = 1.0 }\n", "methods.dann.params.lamda_max",
                       "did you mean 'lambda_max'?"),
    "key": (TINY_SUITE.replace("seeds = 2", "seed = 2"), "seed", "did you mean 'seeds'?"),
}


@pytest.mark.parametrize("case", sorted(TYPOS))
def test_a_typo_in_a_suite_names_the_closest_name(registry, tmp_path, case):
    text, key, hint = TYPOS[case]
    with pytest.raises(SuiteError) as ei:
        parse_suite(write(tmp_path / "s.toml", text), registry)
    assert ei.value.key == key and hint in str(ei.value), str(ei.value)


def test_a_method_of_an_unavailable_plugin_says_why(registry, tmp_path):
    from dataclasses import replace

    from dabench.plugins import Unavailable

    reg = replace(registry, unavailable=[Unavailable("extra", "method", "fancy", "needs fancylib: pip install fancylib")])
    with pytest.raises(SuiteError, match="method 'fancy' is unavailable here: needs fancylib"):
        parse_suite(write(tmp_path / "s.toml", TINY_SUITE + "[methods.fancy]\n"), reg)
    reg = replace(registry, unavailable=[Unavailable("extra", "plugin", "extra", "extralib not installed")])
    with pytest.raises(SuiteError, match=r"unavailable here: plugin 'extra'; `dabench list plugins` says why"):
        parse_suite(write(tmp_path / "s.toml", TINY_SUITE + "[methods.fancy]\n"), reg)


@pytest.mark.parametrize("args, hint", [
    (["--methods", "dnn"], "did you mean 'dann'?"),
    (["--methods", "dann,sorce-only"], "did you mean 'source-only'?"),
    (["--pairs", "moons:moons-rot53"], "did you mean 'moons:moons-rot35'?"),
])
def test_cli_filter_typos_are_refused_before_plugins_load(tmp_path, args, hint):
    """--methods/--pairs are checked against the suite file itself: exit 2
    with the closest names, and neither torch, NumPy nor any plugin is
    imported (what makes the refusal take a fraction of a second)."""
    import subprocess
    import sys

    suite = write(tmp_path / "s.toml", TINY_SUITE)
    code = ("import sys; from dabench.cli import main; rc = main(sys.argv[1:]); "
            "loaded = sorted(m for m in ('torch', 'numpy', 'pandas', 'pluggy', 'dabench.plugins') if m in sys.modules); "
            "print('LOADED', loaded, file=sys.stderr); sys.exit(rc)")
    r = subprocess.run([sys.executable, "-c", code, "run", str(suite), "--results", str(tmp_path / "r"), *args],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert hint in r.stderr and str(suite) in r.stderr
    assert "LOADED []" in r.stderr
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("args, hint", [
    (["rnu"], "did you mean 'run'?"),
    (["list", "metods"], "did you mean 'methods'?"),
    (["leaderboard", "x", "--format", "htm"], "did you mean 'html'?"),
    (["run", "s.toml", "--mehtods", "dann"], "did you mean '--methods'"),
    (["run", "s.toml", "--device", "gpu"], "did you mean 'cuda'?"),
])
def test_cli_argument_typos_name_the_closest_choice(args, hint, capsys):
    from dabench.cli import main

    with pytest.raises(SystemExit) as ei:
        main(args)
    assert ei.value.code == 2
    assert hint in capsys.readouterr().err


def test_a_missing_suite_file_names_the_closest_one(tmp_path):
    write(tmp_path / "suites" / "quick.toml", TINY_SUITE)
    r = run_cli("run", "suites/quik.toml", cwd=tmp_path)
    assert r.returncode == 2 and "no such suite file; did you mean 'suites/quick.toml'?" in r.stderr


def test_repository_suites_are_valid(registry):
    for path in sorted((ROOT / "suites").glob("*.toml")):
        parse_suite(path, registry).expand(registry)
