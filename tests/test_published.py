"""Suites citing published results: validated, kept with the store, compared in every report."""

from __future__ import annotations

import json

import pytest

from conftest import TINY_SUITE, run_cli, write
from dabench.suite import SuiteError, parse_suite

CITED = TINY_SUITE + """
[[published]]
pair = "moons:moons-rot35"
method = "dann"
accuracy = 90.0
baseline = 70.0
source = "A paper, Table 1"
setting = "their net"
note = "why we differ"
"""


def test_published_entries_are_compared_in_md_and_json(tmp_path):
    path = write(tmp_path / "s.toml", CITED)
    res = tmp_path / "res"
    r = run_cli("run", str(path), "--results", str(res))
    assert r.returncode == 0, r.stderr
    md = (res / "leaderboard.md").read_text()
    assert "## Published vs dabench" in md and "A paper, Table 1" in md and "why we differ" in md
    line = next(ln for ln in md.splitlines() if ln.startswith("| moons") and "A paper" in ln)
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[2] == "90.0" and cells[5] == "+20.0"  # published and its gain over its baseline
    j = run_cli("leaderboard", str(res), "--format", "json")
    (row,) = json.loads(j.stdout)["published"]
    assert row["accuracy"] == 90.0 and row["n_seeds"] == 2
    assert row["gap"] == pytest.approx(row["dabench_mean"] - 90.0)
    assert row["dabench_gain"] is not None


@pytest.mark.parametrize("entry, key, expected", [
    ('pair = "moons:moons-rot35"\nmethod = "dann"\naccuracy = 190.0\nsource = "x"', "published[0].accuracy",
     "percentage"),
    ('pair = "digits:mnist"\nmethod = "dann"\naccuracy = 90.0\nsource = "x"', "published[0].pair",
     "not a pair of this suite"),
    ('pair = "moons:moons-rot35"\nmethod = "cdan"\naccuracy = 90.0\nsource = "x"', "published[0].method",
     "not a method of this suite"),
    ('pair = "moons:moons-rot35"\nmethod = "dann"\naccuracy = 90.0', "published[0].source", "missing"),
])
def test_malformed_published_entries(registry, tmp_path, entry, key, expected):
    path = write(tmp_path / "s.toml", TINY_SUITE + "\n[[published]]\n" + entry + "\n")
    with pytest.raises(SuiteError) as ei:
        parse_suite(path, registry)
    assert ei.value.key == key and expected in str(ei.value)
