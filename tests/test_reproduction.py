"""The README's main command reproduces the committed results: a slice of
the quick suite (an MLP, a scikit-learn reweighting and a CNN pair), run with
dabench's defaults in a fresh process, matches ``tests/data/repro-quick-slice.json``
bit for bit.  Regenerate the file after a change that alters results:
``python scripts/repro_slice.py --write``."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from conftest import ROOT

_spec = importlib.util.spec_from_file_location("repro_slice", ROOT / "scripts" / "repro_slice.py")
repro = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(repro)


@pytest.fixture(scope="module")
def expected() -> dict:
    return json.loads(repro.EXPECTED.read_text(encoding="utf-8"))


def test_the_default_command_reproduces_the_committed_slice(expected, tmp_path):
    torch_versions = {s["torch"] for s in expected["settings"]}
    if torch.__version__ not in torch_versions:
        pytest.skip(f"the expectations were computed with torch {sorted(torch_versions)}, this is "
                    f"{torch.__version__}; rerun `python scripts/repro_slice.py --write` to check this one")
    got = repro.run_slice(tmp_path / "res")
    diffs = repro.differences(expected, got)
    assert not diffs, ("the slice no longer reproduces the committed results; if the change is meant to alter "
                       "results, regenerate them with `python scripts/repro_slice.py --write`:\n" + "\n".join(diffs))


def test_the_comparison_sees_a_changed_value(expected):
    name = next(iter(expected["runs"]))
    changed = json.loads(json.dumps(expected))
    changed["runs"][name]["target_acc"] += 1e-12
    assert repro.differences(expected, expected) == []
    [line] = repro.differences(expected, changed)
    assert name in line and "target_acc" in line
