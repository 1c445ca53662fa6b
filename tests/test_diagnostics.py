"""Health signals (dabench.diagnostics): recorded by methods, stored per run."""

from __future__ import annotations

import sqlite3

import pytest

from conftest import run_cli, write
from dabench import diagnostics


def test_record_collect_and_names():
    diagnostics.record("outside", 1.0)  # no collector: ignored, never an error
    with diagnostics.collect() as d:
        diagnostics.record("disc_acc_start", 0.5)
        diagnostics.record("disc_acc_start", 0.6)  # replaces
        diagnostics.record("bad_value", float("nan"))
        diagnostics.quarters([0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0], "mask_rate")
    assert d["disc_acc_start"] == 0.6 and d["bad_value"] is None
    assert d["mask_rate_q1"] == 0.0 and d["mask_rate_q4"] == 1.0 and d["mask_rate"] == 0.75
    for bad in ("Upper", "with space", "", "x" * 49, "1abc"):
        with pytest.raises(ValueError, match="diagnostic name"):
            diagnostics.record(bad, 1.0)


PLUGIN = """
from dabench import Method, diagnostics, hookimpl
from dabench.training import TorchPredictor
import torch

class Recorder(Method):
    name = "recorder"
    def fit(self, task):
        diagnostics.record("engaged", 1.0)
        diagnostics.record("seed_seen", float(task.seed))
        return TorchPredictor(torch.nn.Identity(), torch.nn.Linear(task.source_dim, task.n_classes))

@hookimpl
def dabench_methods(register):
    register(Recorder)
"""


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_signals_are_stored_as_extras(tmp_path, jobs):
    write(tmp_path / "p" / "rec.py", PLUGIN)
    suite = write(tmp_path / "s.toml", 'name = "d"\nseeds = 2\npairs = ["moons:moons-rot35"]\n[methods.recorder]\n')
    r = run_cli("run", str(suite), "--results", str(tmp_path / "res"), "--plugins-dir", str(tmp_path / "p"),
                "--jobs", jobs)
    assert r.returncode == 0, r.stderr
    with sqlite3.connect(tmp_path / "res" / "runs.sqlite") as con:
        rows = con.execute("SELECT r.seed, e.name, e.value FROM extras e JOIN runs r USING (key) "
                           "WHERE e.name LIKE 'diag_%' ORDER BY r.seed, e.name").fetchall()
    assert rows == [(0, "diag_engaged", 1.0), (0, "diag_seed_seen", 0.0),
                    (1, "diag_engaged", 1.0), (1, "diag_seed_seen", 1.0)]
