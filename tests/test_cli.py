"""What a new user meets first: progress lines that name what runs, listings
that line up, a leaderboard command that says what to do, plain wording."""

from __future__ import annotations

import json
import re

import pytest

from conftest import write
from dabench.cli import main

VARIANTS_SUITE = """
name = "variants"
seeds = 1
pairs = [
  "moons:moons-rot35",
  { pair = "moons:moons-rot35", protocol = { max_source = 200 } },
]

[protocol]
max_source = 2000

[budget]
steps = 5
batch_size = 16

[methods.dann]
grid = { lambda_max = [0.3, 1.0] }

[methods.source-only]
"""


@pytest.fixture(scope="module")
def variants_run(tmp_path_factory):
    """One in-process serial run of a suite listing one pair under two
    protocols and a method with two grid points: (folder, stderr)."""
    import contextlib
    import io

    tmp = tmp_path_factory.mktemp("variants")
    suite = write(tmp / "variants.toml", VARIANTS_SUITE)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(["run", str(suite), "--results", str(tmp / "res"), "--device", "cpu", "--jobs", "1"])
    assert rc == 0, err.getvalue()
    return tmp, err.getvalue()


def test_progress_lines_name_protocol_variants_and_grid_values(variants_run):
    _, err = variants_run
    lines = [l for l in err.splitlines() if l.startswith("[")]
    labels = [l.split(" · elapsed")[0].split("] ", 1)[1] for l in lines]
    assert len(labels) == 6 and len(set(labels)) == 6, labels  # every run named unambiguously
    assert "moons→moons-rot35 [max_source=200] · dann lambda_max=1 · seed 0" in labels
    assert "moons→moons-rot35 [max_source=2000] · dann lambda_max=0.3 · seed 0" in labels
    assert "moons→moons-rot35 [max_source=2000] · source-only · seed 0" in labels  # one point: just the name
    assert "done in" in err and "6 runs (6 ok, 0 failed, 0 skipped)" in err


def test_list_suites_names_each_pair_variant_once(variants_run, capsys):
    tmp, _ = variants_run
    assert main(["list", "suites", "--json", "--suites-dir", str(tmp)]) == 0
    [row] = json.loads(capsys.readouterr().out)
    assert row["pairs"] == ["moons:moons-rot35 [max_source=2000]", "moons:moons-rot35 [max_source=200]"]
    assert main(["list", "suites", "--suites-dir", str(tmp)]) == 0
    assert "6 runs  2 pairs × 2 methods × 1 seed" in capsys.readouterr().out


def test_the_report_states_the_settings_that_determine_results(variants_run):
    import torch

    tmp, _ = variants_run
    md = (tmp / "res" / "leaderboard.md").read_text()
    assert f"Computed with: torch `{torch.__version__}`, `1` torch thread per run, device `cpu`." in md


def test_leaderboard_html_without_out_writes_a_file_next_to_the_store(variants_run, capsys):
    tmp, _ = variants_run
    res = tmp / "res"
    (res / "leaderboard.html").unlink()
    assert main(["leaderboard", str(res), "--format", "html"]) == 0
    out, err = capsys.readouterr()
    assert out == "" and f"wrote {res / 'leaderboard.html'}" in err
    assert (res / "leaderboard.html").read_text().startswith("<!DOCTYPE html>")
    # another validator than the suite's does not overwrite the suite's page
    assert main(["leaderboard", str(res), "--format", "html", "--validator", "entropy"]) == 0
    assert (res / "leaderboard-entropy.html").is_file()


def test_leaderboard_of_a_folder_without_its_store_says_which_run_makes_it(tmp_path, monkeypatch, capsys):
    """A fresh clone has results/quick's reports but not the store they were
    made from: one line naming the run command."""
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "suites" / "mine.toml", VARIANTS_SUITE.replace('"variants"', '"mine"'))
    write(tmp_path / "results" / "mine" / "leaderboard.md", "# Leaderboard: mine\n")
    assert main(["leaderboard", "results/mine"]) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert "results/mine holds the reports (leaderboard.md) but not the run store" in line
    assert "run `dabench run suites/mine.toml` to compute it" in line
    assert main(["leaderboard", "elsewhere"]) == 2
    assert "no run store at elsewhere/runs.sqlite" in capsys.readouterr().err


def test_list_methods_columns_line_up(capsys):
    assert main(["list", "methods"]) == 0
    lines = capsys.readouterr().out.splitlines()
    starts = {m.start() for m in (re.search(r" v\d", l) for l in lines) if m}
    assert len(lines) > 5 and len(starts) == 1, lines  # the version column starts at one offset


def test_cli_plural_wording():
    from dabench.cli import plural

    assert plural(1, "run") == "1 run" and plural(2, "run") == "2 runs" and plural(0, "run") == "0 runs"
